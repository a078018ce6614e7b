"""CT-number fidelity: the output's low-frequency content made to agree with the input's.

Quantum noise is zero-mean, so the input's mean over a few millimetres is an unbiased
estimate of the true CT number, while a network's output can drift there (a few HU
over an insert or an organ). :func:`restore_low_frequency` adds back a Gaussian
low-pass, of a width given in mm, of the difference ``input - output``:

    output' = output + G_sigma(w * (input - output)) / G_sigma(w)

The weights ``w`` leave out pixels where the difference is an edge rather than a
shift: a network sharpens or smooths a bone or air boundary by far more than the
noise, and spreading that over millimetres would paint halos. A pixel counts as an
edge where ``|input - output|`` is more than ``edge_factor`` robust standard deviations
of the difference over the slice. Where most of the neighbourhood is edge the
correction fades out (``G_sigma(w)`` below one half).

The cost is some low-frequency noise put back: about ``noise / (2 sqrt(pi) sigma_px)``
for white noise, more for CT's correlated noise. The width is the trade between the
two, chosen by measurement (README, image quality).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

EDGE_FACTOR = 4.0
"""Differences beyond this many robust standard deviations are edges, not shifts."""

_MAD_TO_STD = 1.4826

MAX_SIGMA_PX = 64.0
"""Cap on the Gaussian's sigma in pixels. A garbage PixelSpacing (0.001 mm) would ask
for sigma in the thousands and a kernel that takes minutes per slice; past the cap the
low-pass is already close to the slice mean."""


def restore_low_frequency(
    denoised: np.ndarray,
    source: np.ndarray,
    pixel_spacing_mm: float,
    fidelity_mm: float,
    edge_factor: float = EDGE_FACTOR,
) -> np.ndarray:
    """Make ``denoised`` agree with ``source`` at scales above ``fidelity_mm``.

    Parameters
    ----------
    denoised, source
        HU images of the same shape: one slice ``(rows, cols)`` or a stack of slices
        or frames ``(n, rows, cols)``, filtered slice by slice.
    pixel_spacing_mm
        In-plane pixel size; the Gaussian's sigma in pixels is
        ``fidelity_mm / pixel_spacing_mm``.
    fidelity_mm
        Sigma of the Gaussian low-pass in mm; 0 returns ``denoised`` unchanged.
    edge_factor
        Edge threshold in robust standard deviations of the difference (> 0).

    Returns
    -------
    numpy.ndarray
        float32, the shape of ``denoised``.
    """
    denoised = np.asarray(denoised)
    source = np.asarray(source)
    if denoised.shape != source.shape:
        raise ValueError(f"source: shape {source.shape} differs from denoised's {denoised.shape}")
    if denoised.ndim not in (2, 3):
        raise ValueError(f"denoised: expected 2 or 3 dimensions, got shape {denoised.shape}")
    if not (np.isfinite(fidelity_mm) and fidelity_mm >= 0):
        raise ValueError(f"fidelity_mm: must be >= 0, got {fidelity_mm}")
    if not (np.isfinite(pixel_spacing_mm) and pixel_spacing_mm > 0):
        raise ValueError(f"pixel_spacing_mm: must be > 0, got {pixel_spacing_mm}")
    if not edge_factor > 0:
        raise ValueError(f"edge_factor: must be > 0, got {edge_factor}")
    out = denoised.astype(np.float32, copy=True)
    if fidelity_mm == 0:
        return out
    sigma = min(fidelity_mm / pixel_spacing_mm, MAX_SIGMA_PX, float(max(out.shape[-2:])))
    slices = out.reshape((-1, *out.shape[-2:]))
    for k, (den, src) in enumerate(zip(slices, source.reshape(slices.shape), strict=True)):
        slices[k] = den + _low_frequency_shift(src.astype(np.float32) - den, sigma, edge_factor)
    return out


def _low_frequency_shift(diff: np.ndarray, sigma: float, edge_factor: float) -> np.ndarray:
    """Edge-excluding Gaussian mean of one slice's ``input - output`` difference."""
    moving = diff[diff != 0]  # the cascade leaves air outside the body untouched
    if moving.size == 0:
        return np.zeros_like(diff)
    centre = float(np.median(moving))
    spread = _MAD_TO_STD * float(np.median(np.abs(moving - centre)))
    if spread > 0:
        weight = (np.abs(diff - centre) <= edge_factor * spread).astype(np.float32)
    else:
        weight = np.ones_like(diff)
    num = ndimage.gaussian_filter(diff * weight, sigma, mode="nearest")
    den = ndimage.gaussian_filter(weight, sigma, mode="nearest")
    # Fade out where edges fill most of the neighbourhood: too few samples to trust.
    fade = np.clip(2.0 * den, 0.0, 1.0)
    return (num / np.maximum(den, 1e-6) * fade).astype(np.float32)
