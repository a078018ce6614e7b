"""Simulated full-dose and low-dose scans of one noiseless slice.

The noiseless line integrals of an image are turned into expected photon counts
``I0 * exp(-p)``; Poisson noise is drawn once at the full-dose count ``I0`` and once,
independently, at ``I0 * dose_fraction``, Gaussian electronic noise is added, the log
is taken and both sinograms are reconstructed by filtered back-projection. The
noiseless sinogram is reconstructed too (``truth_recon``): it carries the same
discretisation and filter blur as the noisy images, so ``low_dose - truth_recon`` is
pure noise.

Units: images are HU; lengths are mm; ``mu`` is the linear attenuation in 1/mm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ldct_node.lab.simulation.projector import (
    DEFAULT_FILTER,
    FILTERS,
    GEOMETRIES,
    FanGeometry,
    default_n_angles,
    fan_geometry,
    fan_to_parallel,
    fbp,
    n_detectors,
    parallel_to_fan,
    project,
)

logger = logging.getLogger(__name__)

#: Linear attenuation of water (1/mm) at an effective energy of about 70 keV.
MU_WATER_PER_MM = 0.0192
#: Full-dose incident photons per ray and view for a 512 x 512 parallel-beam scan; other
#: sizes scale it (see :func:`default_i0`).
I0_AT_512 = 4.0e5
#: Standard deviation of the electronic (read-out) noise, in photon counts, of the
#: 512 x 512 reference scan; other sizes scale it (see :func:`default_electronic_noise`).
ELECTRONIC_NOISE_AT_512 = 3.0
#: Counts are clipped to at least this before the log (photon starvation).
MIN_COUNTS = 1.0


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


def check_dose_args(dose_fraction: float, i0: float | None, electronic_noise: float | None) -> None:
    """Raise ValueError, naming the argument, for a dose setting out of its range."""
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction: must be in (0, 1], got {dose_fraction}")
    if i0 is not None and not i0 > 0:
        raise ValueError(f"i0: must be > 0, got {i0}")
    if electronic_noise is not None and not electronic_noise >= 0:
        raise ValueError(f"electronic_noise: must be >= 0, got {electronic_noise}")


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
        :func:`~ldct_node.lab.simulation.projector.default_n_angles`.
    geometry
        ``"parallel"`` or ``"fan"`` (equiangular, rebinned to parallel before FBP).
    filter_name
        FBP ramp window, one of :data:`~ldct_node.lab.simulation.projector.FILTERS`.
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
    check_dose_args(dose_fraction, i0, electronic_noise)
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
    fan: FanGeometry | None = None
    if geometry == "parallel":
        clean = project(mu, views) * pixel_spacing_mm
    else:
        fan = fan_geometry(size, views, pixel_spacing_mm)
        # A parallel sinogram twice as dense as the rebinned one keeps the angular
        # interpolation of the noiseless data from blurring it.
        clean = parallel_to_fan(project(mu, views) * pixel_spacing_mm, fan)

    full, _ = _noisy_line_integrals(clean, counts, electronic_noise, rng)
    low, starved = _noisy_line_integrals(clean, counts * dose_fraction, electronic_noise, rng)
    stack = np.stack([full, low, clean])
    if fan is not None:
        stack = np.stack([fan_to_parallel(s, fan, n_det) for s in stack])
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
