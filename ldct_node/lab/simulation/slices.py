"""One slice of a data set: make (or load) its noiseless truth, scan it, measure it.

:class:`SliceTask` is everything a slice needs, so that worker processes
(:func:`slice_results`) can simulate slices apart; the noise of a slice is seeded by
its case and position alone, so the result does not depend on where it ran.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
from scipy import ndimage

from ldct_node.dicom import io as dicomio
from ldct_node.lab.simulation.phantoms import make_phantom
from ldct_node.lab.simulation.scan import ScanResult, simulate_scan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceTask:
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
class SliceResult:
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


def _run_slice(task: SliceTask) -> SliceResult:
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
    return SliceResult(
        truth=truth.astype(np.float32),
        scan=scan,
        noise_full=_soft_tissue_noise(scan.full_dose, scan.truth_recon),
        noise_low=_soft_tissue_noise(scan.low_dose, scan.truth_recon),
        objects=objects,
    )


def slice_results(tasks: list[SliceTask], workers: int) -> Generator[SliceResult, None, None]:
    if workers <= 1:
        for task in tasks:
            yield _run_slice(task)
        return
    # spawn: a forked child of a process that loaded TensorFlow can deadlock.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_run_slice, tasks, chunksize=1)
