"""Low-dose CT simulation in the projection domain, and procedural anatomical phantoms.

Training pairs are made the way the AAPM low-dose challenge made them: the noiseless
line integrals of an image are turned into expected photon counts ``I0 * exp(-p)``,
Poisson noise is drawn once at the full-dose count ``I0`` and once, independently, at
``I0 * dose_fraction``, Gaussian electronic noise is added, the log is taken and both
sinograms are reconstructed by filtered back-projection (FBP). The noiseless sinogram
is reconstructed too (``truth_recon``): it carries the same discretisation and filter
blur as the noisy images, so ``low_dose - truth_recon`` is pure noise.

The projector is written for speed with numpy alone:

- forward projection is pixel driven: every pixel's mass is deposited (linearly, so
  there is no quantisation pattern) on a detector grid ``_UPSAMPLE`` times finer than
  the detector, and the fine histogram is then convolved with the exact footprint of
  a square pixel integrated over a detector bin (a convolution of three boxes);
- back-projection interpolates linearly, through a linearly up-sampled filtered
  projection and a nearest look-up;
- both use the eight-fold symmetry of a square grid: one set of detector positions
  serves the angles theta, 90-theta, 90+theta and 180-theta.

Fan-beam scans (``geometry="fan"``) are simulated by rebinning: fan-beam line integrals
are interpolated from a dense parallel sinogram, the noise is drawn per fan ray, and
the noisy fan data are rebinned to parallel rays (merging each ray with its conjugate)
before FBP, as scanners with rebinning reconstruction do.

Units: images are HU; lengths are mm; ``mu`` is the linear attenuation in 1/mm.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ldct_node.dicom import io as dicomio
from ldct_node.fsutil import write_text_atomic

logger = logging.getLogger(__name__)

#: Linear attenuation of water (1/mm) at an effective energy of about 70 keV.
MU_WATER_PER_MM = 0.0192
#: Full-dose incident photons per ray and view for a 512 x 512 parallel-beam scan; other
#: sizes scale it (see :func:`default_i0`).
I0_AT_512 = 4.0e5
#: Standard deviation of the electronic (read-out) noise, in photon counts, of the
#: 512 x 512 reference scan; other sizes scale it (see :func:`default_electronic_noise`).
ELECTRONIC_NOISE_AT_512 = 3.0
#: Reconstruction filter: ramp with a Hamming window, close to a clinical "standard"
#: soft-tissue kernel (noise power peaks near 0.2 cycles per pixel).
DEFAULT_FILTER = "hamming"
#: Counts are clipped to at least this before the log (photon starvation).
MIN_COUNTS = 1.0
#: Source-to-isocentre distance of the simulated fan-beam scanner (mm).
FAN_SOURCE_TO_ISO_MM = 595.0

GEOMETRIES = ("parallel", "fan")
FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
PHANTOM_KINDS = ("body", "water", "qa")

DEFAULT_SLICES_PER_CASE = 8
"""Slices per case when neither a count nor a slice range is given."""

# Sub-bins per detector bin in the forward projector; 8 keeps the projection error
# below that of scikit-image's rotation-based radon at a fraction of its cost.
_UPSAMPLE = 8
_TRANSFORMS = ("id", "T", "rot", "flip")


# ======================================================================================
# Projector
# ======================================================================================


def default_n_angles(size: int, geometry: str = "parallel") -> int:
    """Number of projection angles used when ``n_angles`` is not given.

    Parallel beam: about ``1.5 * size`` views over 180 degrees, rounded up to a multiple
    of 4 (the fast symmetric path). Fan beam: twice that over 360 degrees, so that the
    rebinned parallel sinogram has the same number of views.
    """
    if size < 2:
        raise ValueError(f"size: must be >= 2, got {size}")
    n = 4 * math.ceil(1.5 * size / 4)
    if geometry == "parallel":
        return n
    if geometry == "fan":
        return 2 * n
    raise ValueError(f"geometry: must be one of {GEOMETRIES}, got {geometry!r}")


def n_detectors(size: int) -> int:
    """Detector bins of the parallel sinogram of a ``size`` x ``size`` image.

    Bins are one pixel wide and cover the image diagonal plus the widest pixel
    footprint, so nothing of the square image falls off the detector.
    """
    if size < 2:
        raise ValueError(f"size: must be >= 2, got {size}")
    return math.ceil((size - 1) * math.sqrt(2.0)) + 7


def _plan(n_angles: int, symmetric: bool = True) -> list[tuple[int, list[tuple[int, str]]]]:
    """Base angle indices and the angles each serves through a grid symmetry.

    Angle k is ``pi * k / n_angles``. With ``n_angles % 4 == 0`` the detector positions
    of base angle k (0 <= k <= n/4) also give the angles n/2-k (transpose), n/2+k
    (rotation by 90 degrees) and n-k (left-right flip).
    """
    if not symmetric or n_angles % 4:
        return [(k, [(k, "id")]) for k in range(n_angles)]
    q = n_angles // 4
    plan: list[tuple[int, list[tuple[int, str]]]] = [(0, [(0, "id"), (2 * q, "rot")])]
    for k in range(1, q):
        plan.append((k, [(k, "id"), (2 * q - k, "T"), (2 * q + k, "rot"), (4 * q - k, "flip")]))
    plan.append((q, [(q, "id"), (3 * q, "rot")]))
    return plan


def _transformed(image: np.ndarray, transform: str) -> np.ndarray:
    """The image seen by a base angle when projecting at its symmetric partner."""
    if transform == "id":
        view = image
    elif transform == "T":
        view = image.T
    elif transform == "rot":
        view = np.rot90(image)
    else:
        view = np.fliplr(image)
    return np.ascontiguousarray(view).ravel()


def _position_terms(
    size: int, n_det: int, theta: float, offset: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Fine-grid detector position of pixel (i, j) as ``rows_term[j] + cols_term[i]``.

    Pixel (i, j) sits at x = j - c, y = i - c (pixel units, c the image centre); its
    detector coordinate is ``x cos(theta) + y sin(theta)`` from the detector centre,
    here in fine bins from the first one, plus ``offset``.
    """
    c0 = (size - 1) / 2.0
    cm = (n_det - 1) / 2.0
    x = np.arange(size, dtype=np.float64) - c0
    rows_term = ((cm + x * math.cos(theta)) * _UPSAMPLE + offset).astype(np.float32)
    cols_term = (x * math.sin(theta) * _UPSAMPLE).astype(np.float32)
    return rows_term, cols_term


def _footprint(offsets: np.ndarray, width_a: float, width_b: float) -> np.ndarray:
    """Density of the sum of three uniform variables of widths a, b and 1.

    This is the projection of a unit square pixel at an angle with ``|cos| = a`` and
    ``|sin| = b``, averaged over a detector bin of width 1; summed over bins spaced 1
    apart it is exactly 1, so projection conserves mass.
    """
    # Widths of zero (axis-aligned angles) are the limit of small widths.
    a = max(width_a, 1e-4)
    b = max(width_b, 1e-4)
    total = np.zeros_like(offsets, dtype=np.float64)
    for sa in (1.0, -1.0):
        for sb in (1.0, -1.0):
            for sc in (1.0, -1.0):
                u = offsets + (sa * a + sb * b + sc) / 2.0
                total += sa * sb * sc * np.square(np.maximum(u, 0.0)) / 2.0
    return total / (a * b)


def project(image: np.ndarray, n_angles: int, *, symmetric: bool = True) -> np.ndarray:
    """Parallel-beam line integrals of a square image over [0, 180) degrees.

    Parameters
    ----------
    image
        (size, size) values, e.g. attenuation per pixel length.
    n_angles
        Views, at angles ``pi * k / n_angles``. Multiples of 4 take the fast path.
    symmetric
        Use the grid symmetries (same result, about 4x fewer position computations).

    Returns
    -------
    np.ndarray
        (n_angles, n_detectors(size)) float64 line integrals in pixel lengths
        (multiply by the pixel spacing for physical units). Bin b is centred
        ``b - (n_det - 1) / 2`` pixels from the rotation centre.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1] or image.shape[0] < 2:
        raise ValueError(f"image: expected a square 2-D array, got shape {image.shape}")
    if n_angles < 1:
        raise ValueError(f"n_angles: must be >= 1, got {n_angles}")
    size = image.shape[0]
    n_det = n_detectors(size)
    fine_len = _UPSAMPLE * (n_det - 1) + 1
    half_taps = math.ceil(_UPSAMPLE * (math.sqrt(2.0) + 1.0) / 2.0) + 1
    fine = np.zeros((n_angles, fine_len + 2 * half_taps + _UPSAMPLE + 1), dtype=np.float64)
    views = {t: _transformed(image, t) for t in _TRANSFORMS}
    for base, targets in _plan(n_angles, symmetric):
        rows_term, cols_term = _position_terms(size, n_det, math.pi * base / n_angles)
        pos = (cols_term[:, None] + rows_term[None, :]).ravel()
        whole = pos.astype(np.intp)
        frac64 = (pos - whole).astype(np.float64)
        for target, transform in targets:
            # A pixel at fine position w + f puts (1 - f) of its value in bin w and f in
            # bin w + 1: all of it at w, then f moved one bin on.
            total = np.bincount(whole, weights=views[transform], minlength=fine_len + 1)
            upper = np.bincount(whole, weights=views[transform] * frac64, minlength=fine_len + 1)
            row = fine[target]
            row[half_taps : half_taps + fine_len + 1] += total - upper
            row[half_taps + 1 : half_taps + fine_len + 2] += upper
    thetas = math.pi * np.arange(n_angles) / n_angles
    taps = np.arange(-half_taps, half_taps + 1)
    weights = np.stack(
        [_footprint(taps / _UPSAMPLE, abs(math.cos(t)), abs(math.sin(t))) for t in thetas]
    )
    sino = np.zeros((n_angles, n_det), dtype=np.float64)
    for col, tap in enumerate(taps):
        # bin b collects fine sample b*U - tap with weight footprint(tap / U)
        start = half_taps - tap
        sino += weights[:, col : col + 1] * fine[:, start : start + _UPSAMPLE * n_det : _UPSAMPLE]
    return sino


def _filter_response(n_pad: int, filter_name: str) -> np.ndarray:
    """rfft of the band-limited ramp (spatial-domain definition) times a window."""
    k = np.concatenate([np.arange(0, n_pad // 2 + 1), np.arange(-n_pad // 2 + 1, 0)])
    kernel = np.zeros(n_pad, dtype=np.float64)
    kernel[0] = 0.25
    odd = k % 2 == 1
    kernel[odd] = -1.0 / np.square(np.pi * k[odd])
    # Defined in space, so the response has no DC offset from sampling |f| directly.
    response = np.real(np.fft.rfft(kernel))
    f = np.fft.rfftfreq(n_pad)  # cycles per bin, 0 .. 0.5
    if filter_name == "ramp":
        window = np.ones_like(f)
    elif filter_name == "shepp-logan":
        window = np.sinc(f)
    elif filter_name == "cosine":
        window = np.cos(np.pi * f)
    elif filter_name == "hamming":
        window = 0.54 + 0.46 * np.cos(2.0 * np.pi * f)
    elif filter_name == "hann":
        window = 0.5 * (1.0 + np.cos(2.0 * np.pi * f))
    else:
        raise ValueError(f"filter_name: must be one of {FILTERS}, got {filter_name!r}")
    return response * window


def _backproject(filtered: np.ndarray, size: int, symmetric: bool = True) -> np.ndarray:
    """Linear-interpolation back-projection of up to four stacked sinograms.

    ``filtered`` has shape (K, n_angles, n_det), K <= 4; returns (K, size, size) float32
    without the ``pi / n_angles`` factor.
    """
    n_ch, n_angles, n_det = filtered.shape
    fine_len = _UPSAMPLE * (n_det - 1) + 1
    t = np.arange(fine_len, dtype=np.float64) / _UPSAMPLE
    left = np.minimum(np.floor(t).astype(np.intp), n_det - 2)
    frac = (t - left).astype(np.float32)
    # Four float32 channels per fine sample, read as one complex128 so that a single
    # np.take gathers all channels of a pixel at once.
    packed = np.zeros((n_angles, fine_len, 4), dtype=np.float32)
    for ch in range(n_ch):
        q = filtered[ch].astype(np.float32)
        packed[:, :, ch] = q[:, left] * (1.0 - frac) + q[:, left + 1] * frac
    lookup = packed.view(np.complex128)[..., 0]
    terms = [
        (_position_terms(size, n_det, math.pi * base / n_angles, offset=0.5), targets)
        for base, targets in _plan(n_angles, symmetric)
    ]
    acc = {t_: np.zeros((size, size, 4), dtype=np.float32) for t_ in _TRANSFORMS}
    # Blocks of rows keep the four accumulators in cache (about 2x faster at 512).
    rows_per_block = max(8, 32768 // size)
    for r0 in range(0, size, rows_per_block):
        r1 = min(size, r0 + rows_per_block)
        blocks = {t_: acc[t_][r0:r1].reshape(-1, 4) for t_ in _TRANSFORMS}
        for (rows_term, cols_term), targets in terms:
            # +0.5 in the rows term: truncation is rounding to the nearest fine sample
            nearest = (cols_term[r0:r1, None] + rows_term[None, :]).astype(np.intp).ravel()
            for target, transform in targets:
                gathered = np.take(lookup[target], nearest).view(np.float32)
                blocks[transform] += gathered.reshape(-1, 4)
    # Undo the symmetry transforms of _transformed (their inverses, on the output grid).
    out = (
        acc["id"] + acc["T"].transpose(1, 0, 2) + np.rot90(acc["rot"], -1) + np.fliplr(acc["flip"])
    )
    return np.ascontiguousarray(np.moveaxis(out[..., :n_ch], -1, 0))


def fbp(
    sinogram: np.ndarray,
    size: int,
    *,
    filter_name: str = DEFAULT_FILTER,
    symmetric: bool = True,
) -> np.ndarray:
    """Filtered back-projection of parallel-beam sinograms from :func:`project`.

    Parameters
    ----------
    sinogram
        (n_angles, n_det) or a stack (K, n_angles, n_det) with K <= 4, in pixel-length
        units as :func:`project` returns; ``n_det`` must be ``n_detectors(size)``.
    size
        Output image size.
    filter_name
        Ramp window: one of :data:`FILTERS`.

    Returns
    -------
    np.ndarray
        float32 image(s) (size, size) or (K, size, size) in the units of ``image``
        given to :func:`project`.
    """
    sino = np.asarray(sinogram, dtype=np.float64)
    single = sino.ndim == 2
    if single:
        sino = sino[None]
    if sino.ndim != 3 or not 1 <= sino.shape[0] <= 4:
        raise ValueError(f"sinogram: expected (n_angles, n_det) or (K<=4, ...), got {sino.shape}")
    n_det = n_detectors(size)
    if sino.shape[2] != n_det:
        raise ValueError(f"sinogram: {sino.shape[2]} detector bins, size {size} needs {n_det}")
    n_angles = sino.shape[1]
    n_pad = max(64, 1 << math.ceil(math.log2(2 * n_det)))
    response = _filter_response(n_pad, filter_name)
    filtered = np.fft.irfft(np.fft.rfft(sino, n=n_pad, axis=2) * response, n=n_pad, axis=2)
    image = _backproject(filtered[:, :, :n_det], size, symmetric) * np.float32(math.pi / n_angles)
    return image[0] if single else image


# ======================================================================================
# Scan simulation
# ======================================================================================


def default_i0(size: int, geometry: str = "parallel") -> float:
    """Full-dose incident count per ray and view that gives clinical noise at any size.

    With a fixed field of view and views proportional to the size, the FBP noise per
    pixel varies as ``sqrt(size / i0)``: a coarser image is a quieter one. The count is
    therefore scaled with the size so that every size shows the per-pixel noise of a
    512 x 512 abdomen at the same dose (measured on the body phantom with the Hamming
    kernel: 11-15 HU at full dose, 22-30 HU at quarter dose), which is what a denoiser
    trained on small images meets on clinical ones. A fan-beam scan has twice the views
    (360 degrees), so half the count per view gives the same dose.
    """
    if size < 2:
        raise ValueError(f"size: must be >= 2, got {size}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry: must be one of {GEOMETRIES}, got {geometry!r}")
    per_view = I0_AT_512 * size / 512.0
    return per_view / 2.0 if geometry == "fan" else per_view


def default_electronic_noise(size: int, geometry: str = "parallel") -> float:
    """Read-out noise (counts) that weighs as much against :func:`default_i0` as the
    reference 3 counts do against 4e5 photons at 512 x 512, so that the low-dose noise
    exceeds the 1/sqrt(dose) law by the same amount at any size."""
    return ELECTRONIC_NOISE_AT_512 * math.sqrt(default_i0(size, geometry) / I0_AT_512)


@dataclass(frozen=True)
class ScanResult:
    """Reconstructions of one simulated slice (float32 HU, same shape as the truth).

    ``full_dose`` and ``low_dose`` come from the same noiseless sinogram with independent
    noise; ``truth_recon`` is the reconstruction of the noiseless sinogram itself.
    """

    full_dose: np.ndarray
    low_dose: np.ndarray
    truth_recon: np.ndarray
    dose_fraction: float
    i0: float
    electronic_noise: float
    n_angles: int
    n_detectors: int
    geometry: str
    filter_name: str
    pixel_spacing_mm: float
    #: Fraction of low-dose rays clipped to MIN_COUNTS (photon starvation).
    starved_fraction: float


def _noisy_line_integrals(
    line_integrals: np.ndarray,
    counts: float,
    electronic_noise: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float]:
    """Poisson + Gaussian measurement of ``counts * exp(-p)``, returned as -log(I/I0)."""
    expected = counts * np.exp(-line_integrals)
    measured = rng.poisson(expected).astype(np.float64)
    if electronic_noise > 0:
        measured += rng.normal(0.0, electronic_noise, size=measured.shape)
    starved = float(np.mean(measured < MIN_COUNTS))
    return np.log(counts / np.maximum(measured, MIN_COUNTS)), starved


def _bilinear(table: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``table`` at fractional (row, col); outside the table counts as 0."""
    coords = np.stack([rows.ravel(), cols.ravel()])
    values = ndimage.map_coordinates(table, coords, order=1, mode="constant", cval=0.0)
    return values.reshape(rows.shape)


@dataclass(frozen=True)
class _FanGeometry:
    n_views: int  # over 360 degrees
    n_channels: int
    d_gamma: float  # radians per channel
    source_to_iso: float  # in pixel lengths


def _fan_geometry(size: int, n_views: int, pixel_spacing_mm: float) -> _FanGeometry:
    radius = FAN_SOURCE_TO_ISO_MM / pixel_spacing_mm
    half_width = (n_detectors(size) - 1) / 2.0 + 2.0
    if half_width >= radius:
        raise ValueError(
            f"pixel_spacing_mm: a {size}-pixel image at {pixel_spacing_mm} mm does not fit "
            f"in the fan of a scanner with {FAN_SOURCE_TO_ISO_MM} mm source-to-isocentre"
        )
    # One channel spans one pixel at the isocentre, like the parallel detector.
    d_gamma = 1.0 / radius
    half_channels = math.ceil(math.asin(half_width / radius) / d_gamma)
    return _FanGeometry(n_views, 2 * half_channels + 1, d_gamma, radius)


def _parallel_to_fan(parallel: np.ndarray, geo: _FanGeometry) -> np.ndarray:
    """Fan-beam line integrals (n_views, n_channels) from a dense parallel sinogram.

    Ray (beta, gamma) is the parallel ray theta = beta + gamma, t = R sin(gamma).
    """
    n_par, n_det = parallel.shape
    # Row n_par is theta = pi, the detector-flipped view 0; it closes the interpolation.
    table = np.vstack([parallel, parallel[:1, ::-1]])
    beta = 2.0 * math.pi * np.arange(geo.n_views) / geo.n_views
    gamma = (np.arange(geo.n_channels) - (geo.n_channels - 1) / 2.0) * geo.d_gamma
    theta = np.mod(beta[:, None] + gamma[None, :], 2.0 * math.pi)
    t = np.broadcast_to(geo.source_to_iso * np.sin(gamma)[None, :], theta.shape)
    second_half = theta >= math.pi
    theta = np.where(second_half, theta - math.pi, theta)
    t = np.where(second_half, -t, t)
    return _bilinear(table, theta / (math.pi / n_par), t + (n_det - 1) / 2.0)


def _fan_to_parallel(fan: np.ndarray, geo: _FanGeometry, n_det: int) -> np.ndarray:
    """Rebin fan data to parallel rays over 180 degrees, each merged with its conjugate."""
    n_views = geo.n_views
    table = np.vstack([fan, fan[:1]])  # view n_views is view 0 again (periodic)
    theta = 2.0 * math.pi * np.arange(n_views) / n_views
    t = np.arange(n_det) - (n_det - 1) / 2.0
    gamma = np.arcsin(t / geo.source_to_iso)
    beta = np.mod(theta[:, None] - gamma[None, :], 2.0 * math.pi)
    channel = np.broadcast_to(gamma[None, :] / geo.d_gamma + (geo.n_channels - 1) / 2.0, beta.shape)
    full_turn = _bilinear(table, beta / (2.0 * math.pi / n_views), channel)
    half = n_views // 2
    # Ray (theta + pi, -t) is ray (theta, t) measured from the other side.
    result: np.ndarray = 0.5 * (full_turn[:half] + full_turn[half:, ::-1])
    return result


def simulate_scan(
    truth_hu: np.ndarray,
    pixel_spacing_mm: float,
    *,
    dose_fraction: float,
    rng: np.random.Generator,
    i0: float | None = None,
    electronic_noise: float | None = None,
    n_angles: int | None = None,
    geometry: str = "parallel",
    filter_name: str = DEFAULT_FILTER,
    mu_water_per_mm: float = MU_WATER_PER_MM,
) -> ScanResult:
    """Simulate a full-dose and a low-dose CT scan of one noiseless slice.

    Parameters
    ----------
    truth_hu
        Square (size, size) noiseless image in HU; values below -1000 count as air.
    pixel_spacing_mm
        Pixel size, which sets the physical path lengths.
    dose_fraction
        Low-dose incident count relative to full dose, in (0, 1].
    rng
        Source of the Poisson and electronic noise (full dose drawn first).
    i0
        Full-dose incident photons per ray (a detector bin one pixel wide at the
        isocentre) and view; default :func:`default_i0` of the image size, which gives
        clinical noise levels. Noise scales as ``1 / sqrt(i0)``.
    electronic_noise
        Standard deviation (counts) of Gaussian read-out noise added to every
        measurement, at both doses; it matters only where few photons arrive. Default
        :func:`default_electronic_noise` of the image size.
    n_angles
        Views over 180 degrees (parallel) or 360 degrees (fan, must be even); default
        :func:`default_n_angles`.
    geometry
        ``"parallel"`` or ``"fan"`` (equiangular, rebinned to parallel before FBP).
    filter_name
        FBP ramp window, one of :data:`FILTERS`.
    mu_water_per_mm
        Attenuation of water; ``mu = mu_water * (1 + HU / 1000)``, clipped at 0.

    Returns
    -------
    ScanResult
    """
    truth = np.asarray(truth_hu, dtype=np.float64)
    if truth.ndim != 2 or truth.shape[0] != truth.shape[1] or truth.shape[0] < 8:
        raise ValueError(f"truth_hu: expected a square 2-D image >= 8x8, got {truth.shape}")
    if not np.all(np.isfinite(truth)):
        raise ValueError("truth_hu: contains NaN or infinite values")
    if not pixel_spacing_mm > 0:
        raise ValueError(f"pixel_spacing_mm: must be > 0, got {pixel_spacing_mm}")
    _check_dose_args(dose_fraction, i0, electronic_noise)
    if not mu_water_per_mm > 0:
        raise ValueError(f"mu_water_per_mm: must be > 0, got {mu_water_per_mm}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected numpy.random.Generator, got {type(rng).__name__}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry: must be one of {GEOMETRIES}, got {geometry!r}")
    if filter_name not in FILTERS:
        raise ValueError(f"filter_name: must be one of {FILTERS}, got {filter_name!r}")
    size = truth.shape[0]
    views = default_n_angles(size, geometry) if n_angles is None else int(n_angles)
    counts = default_i0(size, geometry) if i0 is None else float(i0)
    if electronic_noise is None:
        electronic_noise = default_electronic_noise(size, geometry)
    if views < 4 or (geometry == "fan" and views % 2):
        raise ValueError(f"n_angles: must be >= 4 (and even for fan beam), got {n_angles}")

    mu = np.maximum(mu_water_per_mm * (1.0 + truth / 1000.0), 0.0)
    n_det = n_detectors(size)
    fan: _FanGeometry | None = None
    if geometry == "parallel":
        clean = project(mu, views) * pixel_spacing_mm
    else:
        fan = _fan_geometry(size, views, pixel_spacing_mm)
        # A parallel sinogram twice as dense as the rebinned one keeps the angular
        # interpolation of the noiseless data from blurring it.
        clean = _parallel_to_fan(project(mu, views) * pixel_spacing_mm, fan)

    full, _ = _noisy_line_integrals(clean, counts, electronic_noise, rng)
    low, starved = _noisy_line_integrals(clean, counts * dose_fraction, electronic_noise, rng)
    stack = np.stack([full, low, clean])
    if fan is not None:
        stack = np.stack([_fan_to_parallel(s, fan, n_det) for s in stack])
    # line integrals in mm -> per pixel length, so fbp returns mu in 1/mm
    mu_images = fbp(stack / pixel_spacing_mm, size, filter_name=filter_name)
    hu = (mu_images / np.float32(mu_water_per_mm) - np.float32(1.0)) * np.float32(1000.0)
    return ScanResult(
        full_dose=hu[0],
        low_dose=hu[1],
        truth_recon=hu[2],
        dose_fraction=float(dose_fraction),
        i0=counts,
        electronic_noise=float(electronic_noise),
        n_angles=views,
        n_detectors=n_det if fan is None else fan.n_channels,
        geometry=geometry,
        filter_name=filter_name,
        pixel_spacing_mm=float(pixel_spacing_mm),
        starved_fraction=starved,
    )


# ======================================================================================
# Phantoms
# ======================================================================================

# Label codes of the phantom label map, in painting order of importance.
_LABELS = {
    "air": 0,
    "skin": 1,
    "fat": 2,
    "muscle": 3,
    "bone": 4,
    "marrow": 5,
    "csf": 6,
    "vessel": 7,
    "liver": 8,
    "spleen": 9,
    "kidney": 10,
    "bowel": 11,
    "gas": 12,
    "lung": 13,
    "fluid": 14,
    "water": 15,
    "disc": 16,
    "insert": 17,
    "low_contrast": 18,
    "edge": 19,
}


@dataclass(frozen=True)
class Lesion:
    """A low-contrast spherical lesion as it appears in one slice."""

    row: float
    col: float
    #: In-slice radius in pixels (the sphere's cross-section at this slice).
    radius_px: float
    #: Diameter of the sphere in mm.
    diameter_mm: float
    #: HU added to the organ background (negative: hypodense).
    contrast_hu: float
    organ: str


@dataclass(frozen=True)
class Region:
    """A circular object of known HU in a phantom slice, where image quality is measured.

    ``kind`` is ``"phantom"`` (the whole cylinder), ``"uniform"`` (a region for noise),
    ``"insert"`` (a sensitometry insert), ``"low_contrast"`` (a 1 % contrast disc) or
    ``"edge"`` (the rod whose edge gives the MTF). Positions are in pixels (row, col
    of the centre); ``hu`` is the noiseless value inside, ``background_hu`` around it.
    """

    name: str
    kind: str
    row: float
    col: float
    radius_px: float
    diameter_mm: float
    hu: float
    background_hu: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "row": round(self.row, 4),
            "col": round(self.col, 4),
            "radius_px": round(self.radius_px, 4),
            "diameter_mm": round(self.diameter_mm, 3),
            "hu": self.hu,
            "background_hu": self.background_hu,
        }


@dataclass(frozen=True)
class Phantom:
    """A noiseless phantom slice.

    ``masks`` maps region names to boolean (size, size) arrays. ``"body"`` (everything
    but the surrounding air) and ``"air"`` are always present; the body phantom adds
    ``"fat"``, ``"muscle"``, ``"soft_tissue"`` (muscle and parenchymal organs),
    ``"bone"`` (cortical and trabecular), ``"vessel"``, ``"liver"``, ``"spleen"``,
    ``"kidney"``, ``"bowel"``, ``"lung"`` and ``"lesion"`` (any of which may be empty at
    a given level); the water phantom adds ``"water"`` and ``"uniform"`` (a central disk
    of 60 % of the radius, for noise measurements); the QA phantom adds ``"water"``,
    ``"uniform"``, ``"insert"``, ``"low_contrast"`` and ``"edge"``, and lists every
    object with its exact HU in ``regions``.
    """

    image: np.ndarray
    pixel_spacing_mm: float
    kind: str
    slice_z_mm: float
    masks: dict[str, np.ndarray]
    lesions: tuple[Lesion, ...] = ()
    #: Case-level parameters (for provenance; plain floats and strings).
    params: dict[str, Any] = field(default_factory=dict)
    #: Objects of known HU (the QA phantom's inserts, discs, edge and uniform region).
    regions: tuple[Region, ...] = ()

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True)
class _Blob:
    """An ellipse (mm, image axes: x right, y down) with an optionally wavy outline."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0
    # (k, relative amplitude, phase): outline radius factor 1 + sum amp cos(k psi + phase)
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def scaled(self, factor: float) -> _Blob:
        return _Blob(self.cx, self.cy, self.a * factor, self.b * factor, self.angle, self.harmonics)

    def shrunk(self, margin_mm: float) -> _Blob:
        return _Blob(
            self.cx,
            self.cy,
            max(self.a - margin_mm, 0.1),
            max(self.b - margin_mm, 0.1),
            self.angle,
            self.harmonics,
        )


class _Canvas:
    """An HU image and label map painted with soft-edged (anti-aliased) shapes."""

    def __init__(self, size: int, spacing: float, background: float) -> None:
        self.size = size
        self.spacing = spacing
        self.image = np.full((size, size), background, dtype=np.float32)
        self.labels = np.zeros((size, size), dtype=np.uint8)
        self.centre = (size - 1) / 2.0

    def coverage(self, blob: _Blob) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Fraction of each pixel inside ``blob`` over its bounding box, or None."""
        d = self.spacing
        reach = max(blob.a, blob.b) * (1.0 + sum(abs(h[1]) for h in blob.harmonics))
        reach_px = reach / d + 2.0
        ci = blob.cy / d + self.centre
        cj = blob.cx / d + self.centre
        i0, i1 = max(0, int(ci - reach_px)), min(self.size, int(ci + reach_px) + 2)
        j0, j1 = max(0, int(cj - reach_px)), min(self.size, int(cj + reach_px) + 2)
        if i0 >= i1 or j0 >= j1 or blob.a <= 0 or blob.b <= 0:
            return None
        y = ((np.arange(i0, i1, dtype=np.float32) - self.centre) * d - blob.cy)[:, None]
        x = ((np.arange(j0, j1, dtype=np.float32) - self.centre) * d - blob.cx)[None, :]
        ca, sa = math.cos(blob.angle), math.sin(blob.angle)
        un = (x * ca + y * sa) / blob.a
        vn = (y * ca - x * sa) / blob.b
        q = np.sqrt(un * un + vn * vn)
        radius: np.ndarray | float = 1.0
        if blob.harmonics:
            psi = np.arctan2(vn, un)
            radius = 1.0 + sum(amp * np.cos(k * psi + ph) for k, amp, ph in blob.harmonics)
        # Distance to the outline ~ (q - radius) / |grad q|; |grad q| in 1/mm.
        grad = np.sqrt(np.square(un / blob.a) + np.square(vn / blob.b)) / np.maximum(q, 1e-6)
        dist_px = (q - radius) / (np.maximum(grad, 1e-6) * d)
        alpha = np.clip(0.5 - dist_px, 0.0, 1.0).astype(np.float32)
        return (slice(i0, i1), slice(j0, j1)), alpha

    def paint(
        self,
        blob: _Blob,
        value: float,
        label: str,
        texture: np.ndarray | None = None,
        texture_hu: float = 0.0,
    ) -> None:
        """Paint ``value`` (+ ``texture_hu`` x texture) over what is there."""
        cov = self.coverage(blob)
        if cov is None:
            return
        box, alpha = cov
        target: np.ndarray | float = value
        if texture is not None and texture_hu:
            target = value + texture_hu * texture[box]
        region = self.image[box]
        region += alpha * (target - region)
        self.labels[box][alpha >= 0.5] = _LABELS[label]

    def add_within(self, blob: _Blob, delta: float, label: str) -> bool:
        """Add ``delta`` HU inside ``blob`` where the label map says ``label``."""
        cov = self.coverage(blob)
        if cov is None:
            return False
        box, alpha = cov
        inside = self.labels[box] == _LABELS[label]
        if not inside.any():
            return False
        self.image[box] += delta * alpha * inside
        return True


def _textures(
    rng: np.random.Generator, size: int, spacing: float, slice_z: float
) -> dict[str, np.ndarray]:
    """Unit-variance correlated noise fields that change smoothly with ``slice_z``.

    Each scale mixes two independent fields as cos(z/L) A + sin(z/L) B, which keeps the
    variance and gives a correlation length L along z.
    """
    scales = {"fine": (0.6, 1.5), "medium": (2.0, 4.0), "coarse": (6.0, 12.0)}
    fields: dict[str, np.ndarray] = {}
    for name, (sigma_mm, length_z) in scales.items():
        pair = []
        for _ in range(2):
            white = rng.standard_normal((size, size)).astype(np.float32)
            smooth = ndimage.gaussian_filter(white, max(sigma_mm / spacing, 0.5), mode="wrap")
            pair.append(smooth / max(float(smooth.std()), 1e-6))
        phase = slice_z / length_z
        fields[name] = (math.cos(phase) * pair[0] + math.sin(phase) * pair[1]).astype(np.float32)
    return fields


def _bump(level: float, centre: float, half_extent: float) -> float:
    """Cross-section scale of an organ spanning centre +- half_extent along z (0 outside)."""
    u = (level - centre) / half_extent
    return math.sqrt(1.0 - u * u) if abs(u) < 1.0 else 0.0


def _harmonics(rng: np.random.Generator, amplitude: float) -> tuple[tuple[int, float, float], ...]:
    amps = rng.uniform(-amplitude, amplitude, size=3)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=3)
    return tuple((k, float(a), float(p)) for k, a, p in zip((2, 3, 4), amps, phases, strict=True))


def _water_phantom(
    size: int, rng: np.random.Generator, slice_z: float, fov_mm: float | None
) -> Phantom:
    diameter = float(rng.uniform(180.0, 320.0))
    # Whole millimetres, as scanners offer: pixel spacings stay short decimals.
    fov = float(fov_mm) if fov_mm is not None else float(round(1.2 * diameter))
    spacing = fov / size
    canvas = _Canvas(size, spacing, -1000.0)
    cylinder = _Blob(0.0, 0.0, diameter / 2.0, diameter / 2.0)
    canvas.paint(cylinder, 0.0, "water")
    yy, xx = np.indices((size, size))
    radius_mm = np.hypot(yy - canvas.centre, xx - canvas.centre) * spacing
    masks = {
        "body": canvas.labels == _LABELS["water"],
        "water": canvas.labels == _LABELS["water"],
        "uniform": radius_mm < 0.3 * diameter,
    }
    masks["air"] = ~masks["body"]
    return Phantom(
        image=canvas.image,
        pixel_spacing_mm=spacing,
        kind="water",
        slice_z_mm=float(slice_z),
        masks=masks,
        params={"diameter_mm": diameter, "fov_mm": fov},
    )


#: Sensitometry inserts of the QA phantom: (name, nominal HU). The materials of the
#: CT-number modules of the standard QA phantoms, from air to a Teflon-like plastic.
QA_INSERTS: tuple[tuple[str, float], ...] = (
    ("air", -1000.0),
    ("pmp", -200.0),
    ("ldpe", -100.0),
    ("polystyrene", -35.0),
    ("acrylic", 120.0),
    ("delrin", 340.0),
    ("bone_50", 725.0),
    ("teflon", 990.0),
)
#: Diameters (mm) of the QA phantom's low-contrast discs, all +QA_LOW_CONTRAST_HU over water.
QA_LOW_CONTRAST_MM: tuple[float, ...] = (15.0, 12.0, 9.0, 7.0, 5.0, 3.0)
#: Contrast of the low-contrast discs: 1 % of the water attenuation.
QA_LOW_CONTRAST_HU = 10.0
#: The edge rod (MTF): a dense rod with a sharp circular edge.
QA_EDGE_HU = 1000.0
QA_EDGE_DIAMETER_MM = 25.0
QA_INSERT_DIAMETER_MM = 12.0
#: Radius (mm) of the central uniform region used for noise.
QA_UNIFORM_RADIUS_MM = 20.0
# Ring radii (mm) of the low-contrast discs and of the inserts + edge rod.
_QA_DISC_RING_MM = 38.0
_QA_INSERT_RING_MM = 64.0


def _qa_phantom(
    size: int, rng: np.random.Generator, slice_z: float, fov_mm: float | None
) -> Phantom:
    """A water cylinder with CT-number inserts, 1 % discs, a uniform region and an edge.

    Laid out like the standard CT QA phantoms (one slice holds every module): a
    central uniform region, six low-contrast discs on an inner ring, and on an outer
    ring eight sensitometry inserts and a dense rod whose edge gives the MTF. Each
    case draws the diameter (190-230 mm), a rotation and a small off-centre shift, so
    training sees variety; the phantom is the same at every ``slice_z``.
    """
    diameter = float(rng.uniform(190.0, 230.0))
    rotation = float(rng.uniform(0.0, 2.0 * math.pi))
    shift_x, shift_y = (float(v) for v in rng.uniform(-8.0, 8.0, size=2))
    fov = float(fov_mm) if fov_mm is not None else float(round(diameter + 60.0))
    spacing = fov / size
    canvas = _Canvas(size, spacing, -1000.0)
    regions: list[Region] = []

    def add(name: str, kind: str, x: float, y: float, d_mm: float, hu: float, label: str) -> None:
        canvas.paint(_Blob(x, y, d_mm / 2.0, d_mm / 2.0), hu, label)
        regions.append(
            Region(
                name=name,
                kind=kind,
                row=y / spacing + canvas.centre,
                col=x / spacing + canvas.centre,
                radius_px=d_mm / 2.0 / spacing,
                diameter_mm=d_mm,
                hu=hu,
                background_hu=-1000.0 if kind == "phantom" else 0.0,
            )
        )

    def at(ring: float, angle: float) -> tuple[float, float]:
        return shift_x + ring * math.cos(angle), shift_y + ring * math.sin(angle)

    add("cylinder", "phantom", shift_x, shift_y, diameter, 0.0, "water")
    for k, d_mm in enumerate(QA_LOW_CONTRAST_MM):
        x, y = at(_QA_DISC_RING_MM, rotation + k * math.pi / 3.0)
        add(f"disc_{d_mm:g}mm", "low_contrast", x, y, d_mm, QA_LOW_CONTRAST_HU, "low_contrast")
    step = 2.0 * math.pi / (len(QA_INSERTS) + 1)
    for k, (name, hu) in enumerate(QA_INSERTS):
        x, y = at(_QA_INSERT_RING_MM, rotation + k * step)
        add(name, "insert", x, y, QA_INSERT_DIAMETER_MM, hu, "insert")
    x, y = at(_QA_INSERT_RING_MM, rotation + len(QA_INSERTS) * step)
    add("edge_rod", "edge", x, y, QA_EDGE_DIAMETER_MM, QA_EDGE_HU, "edge")
    # The uniform region is not painted (it is water); it only marks where to measure.
    regions.append(
        Region(
            name="uniform",
            kind="uniform",
            row=shift_y / spacing + canvas.centre,
            col=shift_x / spacing + canvas.centre,
            radius_px=QA_UNIFORM_RADIUS_MM / spacing,
            diameter_mm=2.0 * QA_UNIFORM_RADIUS_MM,
            hu=0.0,
            background_hu=0.0,
        )
    )
    lab = canvas.labels
    yy, xx = np.indices((size, size))
    uniform = regions[-1]
    masks = {
        "air": lab == _LABELS["air"],
        "body": lab != _LABELS["air"],
        "water": lab == _LABELS["water"],
        "uniform": np.hypot(yy - uniform.row, xx - uniform.col) < uniform.radius_px,
        "insert": lab == _LABELS["insert"],
        "low_contrast": lab == _LABELS["low_contrast"],
        "edge": lab == _LABELS["edge"],
    }
    return Phantom(
        image=canvas.image,
        pixel_spacing_mm=spacing,
        kind="qa",
        slice_z_mm=float(slice_z),
        masks=masks,
        params={
            "diameter_mm": diameter,
            "fov_mm": fov,
            "rotation_rad": rotation,
            "shift_mm": [shift_x, shift_y],
        },
        regions=tuple(regions),
    )


def _body_params(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one patient: sizes, positions, tissue HU and lesions.

    The number and order of draws never depends on anything but ``rng``, so the slices
    of one case (same seed, different ``slice_z``) show the same anatomy.
    """
    u = rng.uniform
    a = u(140.0, 185.0)
    b = min(u(95.0, 135.0), 0.85 * a)
    enhanced = u() < 0.85
    e = u(0.7, 1.0) if enhanced else 0.0
    p: dict[str, Any] = {
        "a": a,
        "b": b,
        "outline": _harmonics(rng, 0.03),
        "width_phase": u(0.0, 2.0 * math.pi),
        "fat": u(8.0, 35.0),
        "wall": u(6.0, 14.0),
        "level0": u(-40.0, 40.0),
        "enhancement": e,
        "fov_margin": u(10.0, 30.0),
        "hu": {
            "skin": u(10.0, 40.0),
            "fat": u(-115.0, -85.0),
            "muscle": u(40.0, 60.0),
            "liver": u(50.0, 65.0) + 40.0 * e,
            "spleen": u(40.0, 50.0) + 60.0 * e,
            "kidney": u(25.0, 35.0) + 140.0 * e,
            "aorta": u(35.0, 45.0) + u(150.0, 210.0) * e,
            "vein": u(35.0, 45.0) + u(100.0, 160.0) * e,
            "cortical": u(900.0, 1200.0),
            "trabecular": u(180.0, 350.0),
            "csf": u(0.0, 15.0),
            "disc": u(70.0, 100.0),
            "bowel_wall": u(30.0, 50.0) + 30.0 * e,
            "fluid": u(0.0, 20.0),
            "oral_contrast": u(150.0, 300.0),
            "lung": u(-870.0, -820.0),
        },
        "texture_hu": {
            "fat": u(5.0, 12.0),
            "muscle": u(4.0, 8.0),
            "organ": u(3.0, 8.0),
            "trabecular": u(50.0, 100.0),
        },
        "vb": (u(18.0, 24.0), u(14.0, 18.0)),
        "disc_phase": u(0.0, 32.0),
        "aorta": (u(3.0, 15.0), u(10.0, 13.0)),
        "ivc": (u(20.0, 30.0), u(9.0, 13.0), u(6.0, 9.0)),
        "paraspinal": (u(28.0, 36.0), u(22.0, 30.0), u(20.0, 28.0)),
        "psoas": u(14.0, 20.0),
        "liver": {
            "blob": _Blob(
                -a * u(0.35, 0.45),
                -b * u(0.05, 0.2),
                a * u(0.42, 0.52),
                b * u(0.55, 0.7),
                u(-0.3, 0.3),
                _harmonics(rng, 0.08),
            ),
            "z": (u(30.0, 60.0), u(110.0, 140.0)),
        },
        "spleen": {
            "blob": _Blob(
                a * u(0.5, 0.6),
                b * u(0.2, 0.4),
                u(40.0, 60.0),
                u(22.0, 32.0),
                u(-0.9, -0.4),
                _harmonics(rng, 0.06),
            ),
            "z": (u(30.0, 70.0), u(50.0, 70.0)),
        },
        "gallbladder": (u() < 0.6, u(0.2, 0.4), u(0.4, 0.6), u(12.0, 18.0), u(20.0, 30.0)),
        "gallbladder_z": (u(-20.0, 20.0), u(30.0, 45.0)),
        "lung_start": u(40.0, 90.0),
    }
    # The spine hangs from the back: paraspinal muscles touch the subcutaneous fat.
    p["spine_y"] = b - p["fat"] - p["paraspinal"][2] - p["vb"][1] - 22.0
    kidneys = []
    for side in (-1.0, 1.0):
        kidneys.append(
            {
                "side": side,
                "dx": u(32.0, 45.0),
                "dy": u(-5.0, 10.0),
                "size": (u(22.0, 28.0), u(28.0, 35.0)),
                "angle": side * u(0.3, 0.7),
                # the right kidney (image left) sits lower
                "z": (u(-30.0, 0.0) - (10.0 if side < 0 else 0.0), u(50.0, 65.0)),
            }
        )
    p["kidneys"] = kidneys
    p["hepatic_vessels"] = [
        (math.sqrt(u()) * 0.7, u(0.0, 2.0 * math.pi), u(3.0, 7.0), u(-60.0, 60.0), u(30.0, 80.0))
        for _ in range(6)
    ]
    content = ("gas", "fluid", "contrast")
    p["bowel"] = [
        {
            # normalised position in the abdominal cavity, mostly anterior
            "rho": math.sqrt(u()) * 0.85,
            "phi": u(-math.pi - 0.4, 0.4),
            "r": u(9.0, 22.0),
            "squash": u(0.6, 1.0),
            "angle": u(0.0, math.pi),
            "z": (u(-80.0, 80.0), u(30.0, 80.0)),
            "content": content[int(rng.choice(3, p=[0.3, 0.5, 0.2]))],
        }
        for _ in range(14)
    ]
    p["ribs"] = [
        {
            "side": side,
            "phi": u(-math.radians(60.0), math.radians(75.0)),
            "start": u(-50.0, 30.0),
            "size": (u(4.0, 6.0), u(7.0, 11.0)),
        }
        for side in (-1.0, 1.0)
        for _ in range(6)
    ]
    organs = ("liver", "spleen", "kidney_left", "kidney_right")
    n_lesions = int(rng.integers(3, 9))
    lesions = []
    for i in range(8):
        organ = organs[int(rng.choice(4, p=[0.55, 0.15, 0.15, 0.15]))]
        lesions.append(
            {
                "active": i < n_lesions,
                "organ": organ,
                "rho": math.sqrt(u()) * 0.6,
                "theta": u(0.0, 2.0 * math.pi),
                "z": u(-20.0, 20.0),
                "diameter": u(3.0, 20.0),
                "contrast": (1.0 if u() < 0.5 else -1.0) * u(5.0, 20.0),
            }
        )
    p["lesions"] = lesions
    return p


def _body_phantom(
    size: int,
    rng: np.random.Generator,
    slice_z: float,
    fov_mm: float | None,
    with_lesions: bool,
) -> Phantom:
    p = _body_params(rng)
    a, b, hu, th = p["a"], p["b"], p["hu"], p["texture_hu"]
    # Whole millimetres, as scanners offer: pixel spacings stay short decimals.
    auto_fov = float(round(min(max(2.0 * (a + p["fov_margin"]), 340.0), 420.0)))
    fov = float(fov_mm) if fov_mm is not None else auto_fov
    spacing = fov / size
    tex = _textures(rng, size, spacing, slice_z)
    level = p["level0"] + slice_z
    c = _Canvas(size, spacing, -1000.0)

    # Outline, subcutaneous fat, abdominal wall, visceral fat.
    width = 1.0 + 0.04 * math.sin(level / 150.0 + p["width_phase"])
    outline = _Blob(0.0, 0.0, a * width, b * width, 0.0, p["outline"])
    c.paint(outline, hu["skin"], "skin")
    c.paint(outline.shrunk(1.5), hu["fat"], "fat", tex["medium"], th["fat"])
    c.paint(outline.shrunk(p["fat"]), hu["muscle"], "muscle", tex["medium"], th["muscle"])
    c.paint(outline.shrunk(p["fat"] + p["wall"]), hu["fat"], "fat", tex["medium"], th["fat"])

    # Lung bases behind the liver and spleen dome.
    lung_scale = math.sqrt(min(max((level - p["lung_start"]) / 60.0, 0.0), 1.0))
    if lung_scale > 0:
        for side in (-1.0, 1.0):
            lung = _Blob(side * a * 0.45, b * 0.35, a * 0.3 * lung_scale, b * 0.45 * lung_scale)
            c.paint(lung, hu["lung"], "lung", tex["medium"], 20.0)
        # small vessels: bright spots where the fine field peaks
        spots = np.clip(tex["fine"] - 2.2, 0.0, 0.6) / 0.6 * 700.0
        lung_px = c.labels == _LABELS["lung"]
        c.image[lung_px] += spots[lung_px]

    # Bowel loops: wall, then gas, fluid or oral contrast.
    for loop in p["bowel"]:
        s = _bump(level, *loop["z"])
        if s <= 0.2:
            continue
        cav_a = max(a * width - p["fat"] - p["wall"] - loop["r"], 1.0)
        cav_b = max(b * width - p["fat"] - p["wall"] - loop["r"], 1.0)
        lx = loop["rho"] * cav_a * math.cos(loop["phi"])
        ly = loop["rho"] * cav_b * math.sin(loop["phi"])
        wall = _Blob(lx, ly, loop["r"], loop["r"] * loop["squash"], loop["angle"])
        c.paint(wall, hu["bowel_wall"], "bowel", tex["medium"], th["organ"])
        lumen = wall.shrunk(3.0)
        if loop["content"] == "gas":
            c.paint(lumen, -1000.0, "gas")
        elif loop["content"] == "fluid":
            c.paint(lumen, hu["fluid"], "bowel")
        else:
            c.paint(lumen, hu["oral_contrast"], "bowel")

    # Spine region: paraspinal muscles and psoas first, bone later.
    sy = p["spine_y"]
    vba, vbb = p["vb"]
    px_, pa, pb = p["paraspinal"]
    for side in (-1.0, 1.0):
        para = _Blob(side * px_, sy + vbb + 22.0, pa, pb)
        c.paint(para, hu["muscle"], "muscle", tex["medium"], th["muscle"])
        psoas_r = p["psoas"] * min(max(0.4 - level / 150.0, 0.3), 1.0)
        psoas = _Blob(side * (vba + psoas_r * 0.8), sy - 3.0, psoas_r, psoas_r * 1.1)
        c.paint(psoas, hu["muscle"], "muscle", tex["medium"], th["muscle"])

    # Ribs in the body wall.
    ring_a = a * width - p["fat"] - p["wall"] * 0.5
    ring_b = b * width - p["fat"] - p["wall"] * 0.5
    for rib in p["ribs"]:
        if level < rib["start"]:
            continue
        phi = rib["phi"] if rib["side"] > 0 else math.pi - rib["phi"]
        rx, ry = ring_a * math.cos(phi), ring_b * math.sin(phi)
        tangent = math.atan2(ring_b * math.cos(phi), -ring_a * math.sin(phi))
        cortex = _Blob(rx, ry, rib["size"][1], rib["size"][0], tangent)
        c.paint(cortex, hu["cortical"], "bone")
        c.paint(cortex.shrunk(1.8), hu["trabecular"], "marrow", tex["fine"], th["trabecular"])

    # Kidneys with renal sinus fat.
    kidney_blobs: dict[str, _Blob] = {}
    for k in p["kidneys"]:
        s = _bump(level, *k["z"])
        if s <= 0.15:
            continue
        kb = _Blob(
            k["side"] * (vba + k["dx"]),
            sy + k["dy"],
            k["size"][0] * s,
            k["size"][1] * s,
            k["angle"],
        )
        c.paint(kb, hu["kidney"], "kidney", tex["medium"], th["organ"])
        sinus = _Blob(
            kb.cx - k["side"] * kb.a * 0.45, kb.cy - kb.b * 0.1, kb.a * 0.35, kb.b * 0.4, kb.angle
        )
        c.paint(sinus, hu["fat"], "fat", tex["medium"], th["fat"])
        # image left is the patient's right
        kidney_blobs["kidney_right" if k["side"] < 0 else "kidney_left"] = kb

    # Spleen, liver with hepatic vessels and gallbladder.
    organ_blobs: dict[str, _Blob] = dict(kidney_blobs)
    s = _bump(level, *p["spleen"]["z"])
    if s > 0.15:
        spleen = p["spleen"]["blob"].scaled(s)
        c.paint(spleen, hu["spleen"], "spleen", tex["medium"], th["organ"])
        organ_blobs["spleen"] = spleen
    s = _bump(level, *p["liver"]["z"])
    if s > 0.15:
        liver = p["liver"]["blob"].scaled(s)
        c.paint(liver, hu["liver"], "liver", tex["medium"], th["organ"])
        organ_blobs["liver"] = liver
        for rho, ang, r, zc, half in p["hepatic_vessels"]:
            if _bump(level, zc, half) <= 0:
                continue
            vx, vy = _organ_point(liver, rho, ang)
            c.paint(_Blob(vx, vy, r, r), hu["vein"], "vessel")
        gb_on, gx, gy, gr_a, gr_b = p["gallbladder"]
        gs = _bump(level, *p["gallbladder_z"])
        if gb_on and gs > 0.2:
            gb = _Blob(liver.cx + liver.a * gx, liver.cy + liver.b * gy, gr_a * gs, gr_b * gs, 0.4)
            c.paint(gb, hu["fluid"], "fluid")

    # Great vessels in front of the spine.
    ax_, ar = p["aorta"]
    c.paint(_Blob(ax_, sy - vbb - ar - 2.0, ar, ar), hu["aorta"], "vessel")
    ix, ia, ib = p["ivc"]
    c.paint(_Blob(-ix, sy - vbb - ib - 2.0, ia, ib), hu["vein"], "vessel")

    # Vertebra: body (or disc), arch, canal, spinous and transverse processes.
    dz = (level + p["disc_phase"]) % 32.0 - 3.5
    bone_part = min(max((abs(dz) - 2.5) / 2.0, 0.0), 1.0)
    vb = _Blob(0.0, sy, vba, vbb)
    in_bone = bone_part >= 0.5
    shell = hu["disc"] + bone_part * (hu["cortical"] - hu["disc"])
    c.paint(vb, shell, "bone" if in_bone else "disc")
    inner = hu["disc"] + bone_part * (hu["trabecular"] - hu["disc"])
    texture_hu = th["trabecular"] * bone_part
    c.paint(vb.shrunk(1.8), inner, "marrow" if in_bone else "disc", tex["fine"], texture_hu)
    canal_y = sy + vbb + 9.0
    c.paint(_Blob(0.0, canal_y, 14.0, 12.0), hu["cortical"], "bone")
    c.paint(_Blob(0.0, sy + vbb + 27.0, 5.0, 13.0), hu["cortical"], "bone")
    for side in (-1.0, 1.0):
        c.paint(_Blob(side * 24.0, canal_y - 2.0, 13.0, 4.5, side * 0.25), hu["cortical"], "bone")
    c.paint(_Blob(0.0, canal_y, 8.0, 7.0), hu["csf"], "csf")

    # Low-contrast lesions (spheres) inside their organs.
    lesions: list[Lesion] = []
    for les in p["lesions"]:
        organ_key = les["organ"]
        if not with_lesions or not les["active"] or organ_key not in organ_blobs:
            continue
        half = les["diameter"] / 2.0
        dz_les = slice_z - les["z"]
        if abs(dz_les) >= half:
            continue
        r_mm = math.sqrt(half * half - dz_les * dz_les)
        if r_mm < 0.5 * spacing:
            continue
        lx, ly = _organ_point(organ_blobs[organ_key], les["rho"], les["theta"])
        label = "kidney" if organ_key.startswith("kidney") else organ_key
        if c.add_within(_Blob(lx, ly, r_mm, r_mm), les["contrast"], label):
            lesions.append(
                Lesion(
                    row=ly / spacing + c.centre,
                    col=lx / spacing + c.centre,
                    radius_px=r_mm / spacing,
                    diameter_mm=les["diameter"],
                    contrast_hu=les["contrast"],
                    organ=label,
                )
            )

    masks = _body_masks(c, lesions)
    params = {
        "half_width_mm": a,
        "half_depth_mm": b,
        "fov_mm": fov,
        "level_mm": level,
        "enhancement": p["enhancement"],
    }
    return Phantom(
        image=c.image,
        pixel_spacing_mm=spacing,
        kind="body",
        slice_z_mm=float(slice_z),
        masks=masks,
        lesions=tuple(lesions),
        params=params,
    )


def _organ_point(blob: _Blob, rho: float, theta: float) -> tuple[float, float]:
    """Point at normalised radius ``rho`` and angle ``theta`` inside an ellipse."""
    u, v = rho * blob.a * math.cos(theta), rho * blob.b * math.sin(theta)
    ca, sa = math.cos(blob.angle), math.sin(blob.angle)
    return blob.cx + u * ca - v * sa, blob.cy + u * sa + v * ca


def _body_masks(c: _Canvas, lesions: Sequence[Lesion]) -> dict[str, np.ndarray]:
    lab = c.labels

    def any_of(*names: str) -> np.ndarray:
        return np.isin(lab, [_LABELS[n] for n in names])

    masks = {
        "air": lab == _LABELS["air"],
        "body": lab != _LABELS["air"],
        "fat": lab == _LABELS["fat"],
        "muscle": lab == _LABELS["muscle"],
        "soft_tissue": any_of("muscle", "liver", "spleen", "kidney"),
        "bone": any_of("bone", "marrow"),
        "vessel": lab == _LABELS["vessel"],
        "liver": lab == _LABELS["liver"],
        "spleen": lab == _LABELS["spleen"],
        "kidney": lab == _LABELS["kidney"],
        "bowel": any_of("bowel", "gas"),
        "lung": lab == _LABELS["lung"],
    }
    lesion_mask = np.zeros_like(masks["air"])
    if lesions:
        yy, xx = np.indices(lab.shape)
        for les in lesions:
            # the soft edge reaches half a pixel beyond the radius
            lesion_mask |= np.hypot(yy - les.row, xx - les.col) < les.radius_px + 0.5
    masks["lesion"] = lesion_mask
    return masks


def make_phantom(
    size: int,
    rng: np.random.Generator,
    *,
    kind: str = "body",
    slice_z: float = 0.0,
    fov_mm: float | None = None,
    with_lesions: bool = True,
) -> Phantom:
    """A noiseless procedural phantom slice in HU.

    Parameters
    ----------
    size
        Image size (size x size pixels), >= 16.
    rng
        Draws the patient (sizes, positions, tissue values, lesions, texture). Pass a
        fresh generator with the same seed for every slice of one case: the anatomy then
        stays the same and only ``slice_z`` moves through it.
    kind
        ``"body"``: an abdomen (skin, subcutaneous and visceral fat, abdominal wall and
        back muscles, liver, spleen, kidneys, bowel, aorta and IVC with contrast,
        vertebra with cortex and trabecular bone, ribs, lung bases at upper levels,
        3-8 spherical low-contrast lesions of 5-20 HU and 3-20 mm, organ texture).
        ``"water"``: a water cylinder (0 HU, 180-320 mm) in air.
        ``"qa"``: a CT quality-assurance phantom (see :data:`QA_INSERTS`): a water
        cylinder (190-230 mm) with sensitometry inserts of -1000 to 990 HU, 1 %
        (10 HU) discs of 3-15 mm, a uniform region and a dense rod with a sharp edge;
        ``regions`` gives every object's position and exact HU.
    slice_z
        Slice position in mm; organs grow, shrink, appear and disappear smoothly with it.
    fov_mm
        Field of view; default about the body width plus a margin (340-420 mm for the
        body, 1.2 x the diameter for water, the diameter + 60 mm for the QA phantom).
        ``pixel_spacing_mm = fov_mm / size``.
    with_lesions
        ``False`` leaves the lesions out and changes nothing else: signal-absent images
        for detectability studies.
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 16:
        raise ValueError(f"size: must be an integer >= 16, got {size!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected numpy.random.Generator, got {type(rng).__name__}")
    if not math.isfinite(slice_z):
        raise ValueError(f"slice_z: must be finite, got {slice_z}")
    if fov_mm is not None and not fov_mm > 0:
        raise ValueError(f"fov_mm: must be > 0, got {fov_mm}")
    if kind == "body":
        return _body_phantom(int(size), rng, float(slice_z), fov_mm, with_lesions)
    if kind == "water":
        return _water_phantom(int(size), rng, float(slice_z), fov_mm)
    if kind == "qa":
        return _qa_phantom(int(size), rng, float(slice_z), fov_mm)
    raise ValueError(f"kind: must be one of {PHANTOM_KINDS}, got {kind!r}")


# ======================================================================================
# Paired data sets
# ======================================================================================

#: Folder names (AAPM style) of the series of one case.
FULL_DOSE_DIR = "full_dose"
TRUTH_DIR = "truth"
TRUTH_RECON_DIR = "truth_recon"
MANIFEST_NAME = "simulation.json"


def low_dose_dir_name(dose_fraction: float) -> str:
    """``quarter_dose`` for 0.25, else ``low_dose_<percent>`` (e.g. ``low_dose_10``)."""
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction: must be in (0, 1], got {dose_fraction}")
    if math.isclose(dose_fraction, 0.25):
        return "quarter_dose"
    return f"low_dose_{dose_fraction * 100:g}"


@dataclass(frozen=True)
class _SliceTask:
    case_index: int
    slice_index: int
    seed: int
    size: int
    slice_z: float
    phantom_kind: str
    source_path: str | None
    resample_to: int | None
    pixel_size_mm: float | None
    dose_fraction: float
    i0: float | None
    electronic_noise: float | None
    n_angles: int | None
    geometry: str
    filter_name: str


@dataclass(frozen=True)
class _SliceResult:
    truth: np.ndarray
    scan: ScanResult
    noise_full: float
    noise_low: float
    #: Where the phantom's objects are (simulation.json), for image-quality metrics.
    objects: dict[str, Any] | None = None


def _load_source_slice(
    path: str, resample_to: int | None, pixel_size_mm: float | None = None
) -> tuple[np.ndarray, float]:
    """HU image and pixel spacing of one source instance (resampled when asked).

    ``pixel_size_mm`` resamples to that pixel size and centres the image on a square
    canvas of ``resample_to`` pixels (air around it, or a central crop): the anatomy
    keeps its size in mm. Without it, ``resample_to`` scales the padded square image
    to that many pixels (the field of view is kept).
    """
    from pydicom import dcmread
    from skimage.transform import resize

    ds = dcmread(path)
    hu = dicomio.decode_hu(ds).astype(np.float64)
    spacing = [float(v) for v in ds.get("PixelSpacing") or [1.0, 1.0]]
    if len(spacing) != 2 or not all(v > 0 for v in spacing):
        raise ValueError(f"source_series: {path} has an unusable PixelSpacing {spacing}")
    if abs(spacing[0] - spacing[1]) > 0.01 * spacing[0]:
        raise ValueError(f"source_series: {path} has non-square pixels {spacing}")
    pixel = spacing[0]
    if pixel_size_mm is not None:
        if resample_to is None:
            raise ValueError("resample_to: needed with pixel_size_mm (the canvas size)")
        scale = pixel / pixel_size_mm
        shape = (max(1, round(hu.shape[0] * scale)), max(1, round(hu.shape[1] * scale)))
        if shape != hu.shape:
            hu = resize(hu, shape, order=1, anti_aliasing=scale < 1.0, mode="edge")
        return _fit_canvas(hu, resample_to), float(pixel_size_mm)
    if resample_to is not None and hu.shape != (resample_to, resample_to):
        side = max(hu.shape)
        pixel = pixel * side / resample_to
        hu = resize(_pad_square(hu), (resample_to, resample_to), order=1, anti_aliasing=True)
    return hu, pixel


def _fit_canvas(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` centred on a ``size`` x ``size`` canvas of air, cropped centrally if larger."""
    out = np.full((size, size), -1000.0, dtype=image.dtype)
    rows, cols = image.shape
    src_r = slice(max(0, (rows - size) // 2), max(0, (rows - size) // 2) + min(rows, size))
    src_c = slice(max(0, (cols - size) // 2), max(0, (cols - size) // 2) + min(cols, size))
    top, left = max(0, (size - rows) // 2), max(0, (size - cols) // 2)
    out[top : top + min(rows, size), left : left + min(cols, size)] = image[src_r, src_c]
    return out


def _pad_square(image: np.ndarray) -> np.ndarray:
    rows, cols = image.shape
    side = max(rows, cols)
    if rows == cols:
        return image
    top, left = (side - rows) // 2, (side - cols) // 2
    out = np.full((side, side), -1000.0, dtype=image.dtype)
    out[top : top + rows, left : left + cols] = image
    return out


def _soft_tissue_noise(noisy: np.ndarray, reference: np.ndarray) -> float:
    """Noise std (HU) over soft tissue (-150..250 HU in the noiseless reconstruction)."""
    region = ndimage.binary_erosion((reference > -150) & (reference < 250), iterations=2)
    if region.sum() < 50:
        return float("nan")
    return float(np.std((noisy - reference)[region]))


def _run_slice(task: _SliceTask) -> _SliceResult:
    """Make the truth image of one slice and scan it (runs in worker processes too)."""
    if task.source_path is None:
        phantom = make_phantom(
            task.size,
            np.random.default_rng([task.seed, task.case_index]),
            kind=task.phantom_kind,
            slice_z=task.slice_z,
        )
        truth = phantom.image.astype(np.float64)
        spacing = phantom.pixel_spacing_mm
        objects: dict[str, Any] | None = {
            "z_mm": phantom.slice_z_mm,
            "regions": [r.to_json() for r in phantom.regions],
            "lesions": [
                {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(les).items()}
                for les in phantom.lesions
            ],
        }
    else:
        objects = None
        truth, spacing = _load_source_slice(task.source_path, task.resample_to, task.pixel_size_mm)
    # Values below air (padding outside the scan circle) are air to the scanner.
    truth = np.maximum(truth, -1024.0)
    rows, cols = truth.shape
    square = _pad_square(truth)
    scan = simulate_scan(
        square,
        spacing,
        dose_fraction=task.dose_fraction,
        rng=np.random.default_rng([task.seed, task.case_index, task.slice_index, 1]),
        i0=task.i0,
        electronic_noise=task.electronic_noise,
        n_angles=task.n_angles,
        geometry=task.geometry,
        filter_name=task.filter_name,
    )
    if (rows, cols) != square.shape:
        top, left = (square.shape[0] - rows) // 2, (square.shape[1] - cols) // 2
        crop = (slice(top, top + rows), slice(left, left + cols))
        scan = ScanResult(
            **{
                **scan.__dict__,
                "full_dose": scan.full_dose[crop],
                "low_dose": scan.low_dose[crop],
                "truth_recon": scan.truth_recon[crop],
            }
        )
    return _SliceResult(
        truth=truth.astype(np.float32),
        scan=scan,
        noise_full=_soft_tissue_noise(scan.full_dose, scan.truth_recon),
        noise_low=_soft_tissue_noise(scan.low_dose, scan.truth_recon),
        objects=objects,
    )


@dataclass
class _Case:
    case_id: str
    index: int
    source: str
    tasks: list[_SliceTask]
    slice_spacing_mm: float
    start_z_mm: float
    body_part: str | None
    #: Source cases: position along the slice normal (mm) and 1-based position index
    #: in the source series of every slice, so held-out blocks can be checked.
    source_slices: list[dict[str, Any]] | None = None


def _select_slices(
    usable: list[tuple[Path, Any]],
    slices_per_case: int | None,
    slice_range: tuple[int, int] | None,
    slice_step: int,
    source: Path,
) -> list[tuple[Path, Any]]:
    """The instances of one source series to simulate, in slice-position order.

    ``slice_range`` (1-based, inclusive, in position order) picks a contiguous block,
    every ``slice_step``-th slice of it; ``slices_per_case`` then caps the count, taken
    from the middle. Without a range: the central ``slices_per_case`` (default 8).
    """
    if slice_range is not None:
        first, last = slice_range
        if last > len(usable):
            raise ValueError(
                f"slice_range: {first}:{last} is past the {len(usable)} slices of the "
                f"series under {source}"
            )
        block = usable[first - 1 : last : slice_step]
    else:
        block = usable[::slice_step]
    count = len(block) if slices_per_case is None and slice_range is not None else None
    count = count or min(slices_per_case or DEFAULT_SLICES_PER_CASE, len(block))
    start = (len(block) - count) // 2
    return block[start : start + count]


def _source_cases(
    sources: Sequence[Path],
    n_cases: int,
    slices_per_case: int | None,
    template: dict[str, Any],
    slice_range: tuple[int, int] | None = None,
    slice_step: int = 1,
) -> list[_Case]:
    """One case per CT series found under the sources (at most ``n_cases``)."""
    cases: list[_Case] = []
    for source in sources:
        if not Path(source).exists():
            raise ValueError(f"source_series: {source} does not exist")
        found = dicomio.scan_inputs([Path(source)])
        for problem in found.problems:
            logger.warning("source_series: skipping %s: %s", problem.path, problem.reason)
        for group in found.series:
            if len(cases) >= n_cases:
                return cases
            usable = [
                (path, ds)
                for path, ds in group.instances
                if str(ds.get("SOPClassUID", "")) == dicomio.CT_IMAGE_STORAGE
                and "LOCALIZER" not in [str(v).upper() for v in ds.get("ImageType", []) or []]
            ]
            if not usable:
                logger.warning("source_series: no axial CT images in a series under %s", source)
                continue
            chosen = _select_slices(usable, slices_per_case, slice_range, slice_step, source)
            normal = dicomio.slice_normal(chosen[0][1])
            positions = [dicomio.slice_position(ds, normal) for _, ds in chosen]
            steps = np.diff([p for p in positions if p is not None])
            spacing = float(np.median(np.abs(steps))) if steps.size else 0.0
            if not spacing > 0:
                spacing = float(chosen[0][1].get("SliceThickness") or 1.0)
            index = len(cases)
            case_id = f"sim{index + 1:04d}"
            tasks = [
                _SliceTask(
                    case_index=index,
                    slice_index=i,
                    slice_z=0.0,
                    phantom_kind="",
                    source_path=str(path),
                    **template,
                )
                for i, (path, _) in enumerate(chosen)
            ]
            start = positions[0] if positions[0] is not None else 0.0
            order = {str(path): i + 1 for i, (path, _) in enumerate(usable)}
            where = [
                {
                    "index": order[str(path)],
                    "position_mm": None if pos is None else round(float(pos), 3),
                }
                for (path, _), pos in zip(chosen, positions, strict=True)
            ]
            cases.append(_Case(case_id, index, str(source), tasks, spacing, start, None, where))
    return cases


def _phantom_cases(
    n_cases: int,
    slices_per_case: int,
    thickness: float,
    kind: str,
    template: dict[str, Any],
) -> list[_Case]:
    cases = []
    for index in range(n_cases):
        zs = [(i - (slices_per_case - 1) / 2.0) * thickness for i in range(slices_per_case)]
        tasks = [
            _SliceTask(
                case_index=index,
                slice_index=i,
                slice_z=z,
                phantom_kind=kind,
                source_path=None,
                **template,
            )
            for i, z in enumerate(zs)
        ]
        part = "ABDOMEN" if kind == "body" else None
        cases.append(
            _Case(f"sim{index + 1:04d}", index, f"phantom:{kind}", tasks, thickness, zs[0], part)
        )
    return cases


def _results(tasks: list[_SliceTask], workers: int) -> Generator[_SliceResult, None, None]:
    if workers <= 1:
        for task in tasks:
            yield _run_slice(task)
        return
    # spawn: a forked child of a process that loaded TensorFlow can deadlock.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_run_slice, tasks, chunksize=1)


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ValueError(f"output_dir: {output_dir} exists and is not a directory")
        if any(output_dir.iterdir()):
            raise ValueError(f"output_dir: {output_dir} is not empty")


def simulate_dataset(
    output_dir: Path | str,
    *,
    n_cases: int,
    slices_per_case: int | None = None,
    size: int = 256,
    dose_fraction: float = 0.25,
    i0: float | None = None,
    seed: int = 0,
    source_series: Sequence[Path | str] | None = None,
    progress: bool = True,
    electronic_noise: float | None = None,
    n_angles: int | None = None,
    geometry: str = "parallel",
    filter_name: str = DEFAULT_FILTER,
    slice_thickness_mm: float = 3.0,
    phantom_kind: str = "body",
    resample_sources: bool = False,
    pixel_size_mm: float | None = None,
    slice_range: tuple[int, int] | None = None,
    slice_step: int = 1,
    write_truth_recon: bool = False,
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write paired full-dose / low-dose CT series for training and evaluation.

    Layout (AAPM style)::

        output_dir/simulation.json                 every parameter, per-case noise and,
                                                   for phantoms, per slice the objects of
                                                   known HU (QA regions, lesions)
        output_dir/sim0001/full_dose/CT0001.dcm    I0
        output_dir/sim0001/quarter_dose/...        I0 * 0.25 (else low_dose_<percent>)
        output_dir/sim0001/truth/...               the noiseless image that was scanned
        output_dir/sim0001/truth_recon/...         FBP of the noiseless sinogram (optional)

    The series of a case share StudyInstanceUID and FrameOfReferenceUID, have
    consecutive slice positions and synthetic patients (``SIM^0001``). UIDs are
    deterministic in the parameters, and so is every pixel: the same call writes the
    same data.

    Parameters
    ----------
    output_dir
        Created if missing; must be empty.
    n_cases
        Phantom patients to simulate; with ``source_series``, the most series to use.
    slices_per_case
        Slices per phantom case (``slice_thickness_mm`` apart; default 8); with
        ``source_series``, the most slices taken from the middle of each series (or of
        ``slice_range``; default 8, or the whole range when one is given).
    size
        Phantom image size. Source images keep their own size unless
        ``resample_sources``.
    dose_fraction
        Low-dose count relative to full dose, in (0, 1].
    i0
        Full-dose incident photons per ray and view; default :func:`default_i0` of the
        image size (clinical noise levels at any size). The value used is recorded per
        case in simulation.json, as is the electronic noise.
    seed
        Seeds the anatomy (per case) and the noise (per slice).
    source_series
        Folders (or files) of normal-dose CT series to use as truth instead of phantoms;
        every CT series found is one case. Their noise is kept: the accepted practice.
    progress
        Show a rich progress bar over all slices.
    electronic_noise, n_angles, geometry, filter_name
        As in :func:`simulate_scan`.
    slice_thickness_mm
        Slice spacing of phantom cases.
    phantom_kind
        ``"body"``, ``"water"`` or ``"qa"`` (see :func:`make_phantom`).
    resample_sources
        Resample source images to ``size`` x ``size`` (after padding to square).
    pixel_size_mm
        Resample source images to this pixel size and centre them on a ``size`` x
        ``size`` canvas (air around, or a central crop): clinical sampling such as
        0.5-0.8 mm at 512 x 512 from any source.
    slice_range
        ``(first, last)``, 1-based and inclusive, in slice-position order: the block of
        each source series to use (training and held-out blocks of one series).
    slice_step
        Take every ``slice_step``-th slice of the series (or of ``slice_range``).
    write_truth_recon
        Also write the FBP of the noiseless sinogram of each slice.
    workers
        Processes simulating slices in parallel (1 = in this process).
    on_progress
        Called with (slices done, slices total) after every slice.

    Returns
    -------
    list[Path]
        The case folders, in order.
    """
    from ldct_node import __version__

    out = Path(output_dir)
    counts = [("n_cases", n_cases), ("slice_step", slice_step)]
    if slices_per_case is not None:
        counts.append(("slices_per_case", slices_per_case))
    for name, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if slice_range is not None and (
        len(slice_range) != 2 or not 1 <= slice_range[0] <= slice_range[1]
    ):
        raise ValueError(
            f"slice_range: must be (first, last) with 1 <= first <= last, got {slice_range!r}"
        )
    if pixel_size_mm is not None and not (math.isfinite(pixel_size_mm) and pixel_size_mm > 0):
        raise ValueError(f"pixel_size_mm: must be > 0, got {pixel_size_mm!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size: must be an integer >= 16, got {size!r}")
    _check_dose_args(dose_fraction, i0, electronic_noise)
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry: must be one of {GEOMETRIES}, got {geometry!r}")
    if filter_name not in FILTERS:
        raise ValueError(f"filter_name: must be one of {FILTERS}, got {filter_name!r}")
    if n_angles is not None and (n_angles < 4 or (geometry == "fan" and n_angles % 2)):
        raise ValueError(f"n_angles: must be >= 4 (and even for fan beam), got {n_angles}")
    if not slice_thickness_mm > 0:
        raise ValueError(f"slice_thickness_mm: must be > 0, got {slice_thickness_mm}")
    if phantom_kind not in PHANTOM_KINDS:
        raise ValueError(f"phantom_kind: must be one of {PHANTOM_KINDS}, got {phantom_kind!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be a positive integer, got {workers!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    sources = [Path(s) for s in source_series] if source_series else []
    if not sources and (pixel_size_mm is not None or slice_range is not None or slice_step > 1):
        raise ValueError(
            "pixel_size_mm, slice_range, slice_step: only for source_series (phantoms are "
            "sampled by size)"
        )
    _check_output_dir(out)

    template: dict[str, Any] = {
        "seed": int(seed),
        "size": size,
        "resample_to": size if resample_sources or pixel_size_mm is not None else None,
        "pixel_size_mm": None if pixel_size_mm is None else float(pixel_size_mm),
        "dose_fraction": float(dose_fraction),
        "i0": None if i0 is None else float(i0),
        "electronic_noise": None if electronic_noise is None else float(electronic_noise),
        "n_angles": n_angles,
        "geometry": geometry,
        "filter_name": filter_name,
    }
    if sources:
        cases = _source_cases(sources, n_cases, slices_per_case, template, slice_range, slice_step)
        if not cases:
            raise ValueError("source_series: no usable CT series found")
    else:
        per_case = slices_per_case or DEFAULT_SLICES_PER_CASE
        cases = _phantom_cases(n_cases, per_case, slice_thickness_mm, phantom_kind, template)

    params: dict[str, Any] = {
        "generator": "ldct-node simulate",
        "ldct_node_version": __version__,
        "seed": int(seed),
        "n_cases": len(cases),
        "slices_per_case": slices_per_case,
        "n_slices": sum(len(c.tasks) for c in cases),
        "size": size,
        "dose_fraction": float(dose_fraction),
        "i0": i0,
        "i0_default": i0 is None,
        "electronic_noise": electronic_noise,
        "n_angles": n_angles,
        "geometry": geometry,
        "filter_name": filter_name,
        "mu_water_per_mm": MU_WATER_PER_MM,
        "min_counts": MIN_COUNTS,
        "fan_source_to_iso_mm": FAN_SOURCE_TO_ISO_MM if geometry == "fan" else None,
        "slice_thickness_mm": slice_thickness_mm if not sources else None,
        "phantom_kind": phantom_kind if not sources else None,
        "source_series": [str(s) for s in sources],
        "resample_sources": resample_sources,
        "pixel_size_mm": pixel_size_mm,
        "slice_range": list(slice_range) if slice_range is not None else None,
        "slice_step": slice_step,
        "folders": {
            "full_dose": FULL_DOSE_DIR,
            "low_dose": low_dose_dir_name(dose_fraction),
            "truth": TRUTH_DIR,
            "truth_recon": TRUTH_RECON_DIR if write_truth_recon else None,
        },
    }
    # UIDs are derived from the parameters: same call, same UIDs; other call, others.
    run_key = json.dumps(params, sort_keys=True)
    total = params["n_slices"]
    out.mkdir(parents=True, exist_ok=True)
    logger.info(
        "simulating %d case(s), %d slice(s), dose fraction %g, into %s",
        len(cases),
        total,
        dose_fraction,
        out,
    )

    case_records: list[dict[str, Any]] = []
    case_dirs: list[Path] = []
    all_tasks = [task for case in cases for task in case.tasks]
    done = 0
    with (
        _progress_bar(progress, total) as advance,
        closing(_results(all_tasks, workers)) as results,
    ):
        for case in cases:
            slices: list[_SliceResult] = []
            for _ in case.tasks:
                slices.append(next(results))
                done += 1
                advance()
                if on_progress is not None:
                    on_progress(done, total)
            case_dir = out / case.case_id
            case_records.append(_write_case(case, slices, case_dir, run_key, params))
            case_dirs.append(case_dir)

    manifest = {**params, "cases": case_records, "complete": True}
    write_text_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote %d case(s) to %s", len(case_dirs), out)
    return case_dirs


def _check_dose_args(
    dose_fraction: float, i0: float | None, electronic_noise: float | None
) -> None:
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction: must be in (0, 1], got {dose_fraction}")
    if i0 is not None and not i0 > 0:
        raise ValueError(f"i0: must be > 0, got {i0}")
    if electronic_noise is not None and not electronic_noise >= 0:
        raise ValueError(f"electronic_noise: must be >= 0, got {electronic_noise}")


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over slices; yields a function that advances it by one."""
    if not enabled:
        yield lambda: None
        return
    from ldct_node.progress import make_progress

    with make_progress() as bar:
        task = bar.add_task("simulating slices", total=total)
        yield lambda: bar.advance(task)


def _write_case(
    case: _Case,
    slices: list[_SliceResult],
    case_dir: Path,
    run_key: str,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Write the series of one case; return its record for simulation.json."""
    from pydicom.uid import generate_uid

    first = slices[0].scan
    spacing = first.pixel_spacing_mm
    number = case.index + 1
    study_uid = generate_uid(entropy_srcs=[run_key, case.case_id, "study"])
    frame_uid = generate_uid(entropy_srcs=[run_key, case.case_id, "frame"])
    percent = f"{first.dose_fraction * 100:g}"
    extra: dict[str, object] = {
        "ConvolutionKernel": first.filter_name,
        "ManufacturerModelName": "simulated CT",
    }
    if case.body_part:
        extra["BodyPartExamined"] = case.body_part
    series: list[tuple[str, str, np.ndarray, str]] = [
        (
            params["folders"]["full_dose"],
            "Simulated full dose",
            np.stack([s.scan.full_dose for s in slices]),
            f"Simulated scan: full dose, I0 {first.i0:g} per ray",
        ),
        (
            params["folders"]["low_dose"],
            f"Simulated {percent}% dose",
            np.stack([s.scan.low_dose for s in slices]),
            f"Simulated scan: {percent}% dose, I0 {first.i0 * first.dose_fraction:g} per ray",
        ),
        (
            params["folders"]["truth"],
            "Noiseless truth",
            np.stack([s.truth for s in slices]),
            "Noiseless image that was scanned (simulation truth)",
        ),
    ]
    if params["folders"]["truth_recon"]:
        series.append(
            (
                params["folders"]["truth_recon"],
                "Noiseless reconstruction",
                np.stack([s.scan.truth_recon for s in slices]),
                "FBP of the noiseless sinogram (simulation truth, reconstructed)",
            )
        )
    counts: dict[str, int] = {}
    for series_number, (folder, description, volume, comment) in enumerate(series, start=1):
        paths = dicomio.write_ct_series(
            volume,
            case_dir / folder,
            pixel_spacing_mm=spacing,
            slice_thickness_mm=case.slice_spacing_mm,
            series_description=description,
            series_number=series_number,
            study_uid=study_uid,
            frame_of_reference_uid=frame_uid,
            patient_name=f"SIM^{number:04d}",
            patient_id=f"SIM{number:04d}",
            series_uid=generate_uid(entropy_srcs=[run_key, case.case_id, folder]),
            start_z_mm=case.start_z_mm,
            extra={**extra, "ImageComments": comment},
        )
        counts[folder] = len(paths)

    def mean_noise(values: list[float]) -> float | None:
        finite = [v for v in values if math.isfinite(v)]
        return round(float(np.mean(finite)), 2) if finite else None

    return {
        "case_id": case.case_id,
        "source": case.source,
        "n_slices": len(slices),
        "rows": int(slices[0].truth.shape[0]),
        "columns": int(slices[0].truth.shape[1]),
        "pixel_spacing_mm": spacing,
        "slice_spacing_mm": case.slice_spacing_mm,
        "i0": first.i0,
        "electronic_noise": first.electronic_noise,
        "n_angles": first.n_angles,
        "n_detectors": first.n_detectors,
        "files": counts,
        "noise_std_hu": {
            "full_dose": mean_noise([s.noise_full for s in slices]),
            "low_dose": mean_noise([s.noise_low for s in slices]),
        },
        "starved_ray_fraction": max(s.scan.starved_fraction for s in slices),
        **({"source_slices": case.source_slices} if case.source_slices is not None else {}),
        # Per slice, in instance order: the phantom's objects of known HU (see Region).
        **(
            {"slices": [s.objects for s in slices]}
            if all(s.objects is not None for s in slices)
            else {}
        ),
    }
