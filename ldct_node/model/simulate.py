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
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: Linear attenuation of water (1/mm) at an effective energy of about 70 keV.
MU_WATER_PER_MM = 0.0192
#: Incident photons per detector bin per view at full dose (see ``simulate_scan``).
DEFAULT_I0 = 3.0e5
#: Standard deviation of the electronic (detector read-out) noise, in photon counts.
DEFAULT_ELECTRONIC_NOISE = 3.0
#: Reconstruction filter: ramp with a Hamming window, close to a clinical "standard"
#: soft-tissue kernel (noise power peaks near 0.2 cycles per pixel).
DEFAULT_FILTER = "hamming"
#: Counts are clipped to at least this before the log (photon starvation).
MIN_COUNTS = 1.0
#: Source-to-isocentre distance of the simulated fan-beam scanner (mm).
FAN_SOURCE_TO_ISO_MM = 595.0

GEOMETRIES = ("parallel", "fan")
FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
PHANTOM_KINDS = ("body", "water")

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
    return int(math.ceil((size - 1) * math.sqrt(2.0))) + 7


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


def _fine_positions(size: int, n_det: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Fine-grid detector position of every pixel centre at angle ``theta``.

    Returns the integer part (flattened, row-major) and the fractional part. Pixel
    (i, j) sits at x = j - c, y = i - c (pixel units, c the image centre); its detector
    coordinate is ``x cos(theta) + y sin(theta)`` from the detector centre.
    """
    c0 = (size - 1) / 2.0
    cm = (n_det - 1) / 2.0
    x = np.arange(size, dtype=np.float64) - c0
    along_rows = ((cm + x * math.cos(theta)) * _UPSAMPLE).astype(np.float32)
    along_cols = (x * math.sin(theta) * _UPSAMPLE).astype(np.float32)
    pos = (along_cols[:, None] + along_rows[None, :]).ravel()
    whole = pos.astype(np.intp)
    return whole, pos - whole


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
    half_taps = int(math.ceil(_UPSAMPLE * (math.sqrt(2.0) + 1.0) / 2.0)) + 1
    fine = np.zeros((n_angles, fine_len + 2 * half_taps + _UPSAMPLE + 1), dtype=np.float64)
    views = {t: _transformed(image, t) for t in _TRANSFORMS}
    for base, targets in _plan(n_angles, symmetric):
        whole, frac = _fine_positions(size, n_det, math.pi * base / n_angles)
        frac64 = frac.astype(np.float64)
        for target, transform in targets:
            values = views[transform]
            upper = values * frac64
            row = fine[target]
            row[half_taps : half_taps + fine_len + 1] += np.bincount(
                whole, weights=values - upper, minlength=fine_len + 1
            )
            row[half_taps + 1 : half_taps + fine_len + 2] += np.bincount(
                whole, weights=upper, minlength=fine_len + 1
            )
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
    acc = {t_: np.zeros((size * size, 4), dtype=np.float32) for t_ in _TRANSFORMS}
    for base, targets in _plan(n_angles, symmetric):
        whole, frac_pos = _fine_positions(size, n_det, math.pi * base / n_angles)
        nearest = whole + (frac_pos >= 0.5)
        for target, transform in targets:
            acc[transform] += np.take(lookup[target], nearest).view(np.float32).reshape(-1, 4)
    a = {t_: v.reshape(size, size, 4) for t_, v in acc.items()}
    # Undo the symmetry transforms of _transformed (their inverses, on the output grid).
    out = a["id"] + a["T"].transpose(1, 0, 2) + np.rot90(a["rot"], -1) + np.fliplr(a["flip"])
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
    n_pad = max(64, 1 << int(math.ceil(math.log2(2 * n_det))))
    response = _filter_response(n_pad, filter_name)
    filtered = np.fft.irfft(np.fft.rfft(sino, n=n_pad, axis=2) * response, n=n_pad, axis=2)
    image = _backproject(filtered[:, :, :n_det], size, symmetric) * np.float32(math.pi / n_angles)
    return image[0] if single else image


# ======================================================================================
# Scan simulation
# ======================================================================================


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
    half_channels = int(math.ceil(math.asin(half_width / radius) / d_gamma))
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
    i0: float = DEFAULT_I0,
    electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
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
        Incident photons per detector bin (one pixel wide at the isocentre) per view at
        full dose. Noise scales as ``1 / sqrt(i0 * n_angles)``; see the module notes for
        measured levels.
    electronic_noise
        Standard deviation (counts) of Gaussian read-out noise added to every
        measurement, at both doses; it matters only where few photons arrive.
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
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction: must be in (0, 1], got {dose_fraction}")
    if not i0 > 0:
        raise ValueError(f"i0: must be > 0, got {i0}")
    if not electronic_noise >= 0:
        raise ValueError(f"electronic_noise: must be >= 0, got {electronic_noise}")
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

    full, _ = _noisy_line_integrals(clean, i0, electronic_noise, rng)
    low, starved = _noisy_line_integrals(clean, i0 * dose_fraction, electronic_noise, rng)
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
        i0=float(i0),
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
class Phantom:
    """A noiseless phantom slice.

    ``masks`` maps region names to boolean (size, size) arrays. ``"body"`` (everything
    but the surrounding air) and ``"air"`` are always present; the body phantom adds
    ``"fat"``, ``"muscle"``, ``"soft_tissue"`` (muscle and parenchymal organs),
    ``"bone"`` (cortical and trabecular), ``"vessel"``, ``"liver"``, ``"spleen"``,
    ``"kidney"``, ``"bowel"``, ``"lung"`` and ``"lesion"`` (any of which may be empty at
    a given level); the water phantom adds ``"water"`` and ``"uniform"`` (a central disk
    of 60 % of the radius, for noise measurements).
    """

    image: np.ndarray
    pixel_spacing_mm: float
    kind: str
    slice_z_mm: float
    masks: dict[str, np.ndarray]
    lesions: tuple[Lesion, ...] = ()
    #: Case-level parameters (for provenance; plain floats and strings).
    params: dict[str, Any] = field(default_factory=dict)

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
    fov = float(fov_mm) if fov_mm is not None else 1.2 * diameter
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
    size: int, rng: np.random.Generator, slice_z: float, fov_mm: float | None
) -> Phantom:
    p = _body_params(rng)
    a, b, hu, th = p["a"], p["b"], p["hu"], p["texture_hu"]
    fov = (
        float(fov_mm) if fov_mm is not None else float(np.clip(2 * (a + p["fov_margin"]), 340, 420))
    )
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
        kidney_blobs["kidney_left" if k["side"] < 0 else "kidney_right"] = kb

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
    c.paint(vb, hu["disc"] + bone_part * (hu["cortical"] - hu["disc"]), "bone")
    inner = hu["disc"] + bone_part * (hu["trabecular"] - hu["disc"])
    c.paint(vb.shrunk(1.8), inner, "marrow", tex["fine"], th["trabecular"] * bone_part)
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
        if not les["active"] or organ_key not in organ_blobs:
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
            lesion_mask |= np.hypot(yy - les.row, xx - les.col) <= les.radius_px
    masks["lesion"] = lesion_mask
    return masks


def make_phantom(
    size: int,
    rng: np.random.Generator,
    *,
    kind: str = "body",
    slice_z: float = 0.0,
    fov_mm: float | None = None,
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
    slice_z
        Slice position in mm; organs grow, shrink, appear and disappear smoothly with it.
    fov_mm
        Field of view; default about the body width plus a margin (340-420 mm for the
        body, 1.2 x the diameter for water). ``pixel_spacing_mm = fov_mm / size``.
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
        return _body_phantom(int(size), rng, float(slice_z), fov_mm)
    if kind == "water":
        return _water_phantom(int(size), rng, float(slice_z), fov_mm)
    raise ValueError(f"kind: must be one of {PHANTOM_KINDS}, got {kind!r}")
