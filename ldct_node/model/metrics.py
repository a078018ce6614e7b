"""Image-quality metrics on paired series, in HU.

Used to measure weights on a held-out set: for every case, the low-dose input, the
normal-dose reference and the cascade output are compared with each other and, for
simulated data, with the noiseless truth the simulator wrote (``<case>/truth``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ldct_node.model.cascade import Cascade
from ldct_node.model.data import DataError, find_cases, load_case, load_series_hu

# Soft tissue in the noiseless truth: where "noise" means the image minus the truth.
SOFT_TISSUE_HU = (-150.0, 150.0)
BODY_MIN_HU = -500.0


def rmse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Root-mean-square difference (HU), optionally inside ``mask``."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if mask is not None:
        diff = diff[mask]
    if diff.size == 0:
        raise ValueError("mask selects no pixels")
    return float(np.sqrt(np.mean(diff**2)))


def noise_std(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Standard deviation of ``image - truth`` inside ``mask`` (HU)."""
    diff = (np.asarray(image, np.float64) - np.asarray(truth, np.float64))[mask]
    if diff.size == 0:
        raise ValueError("mask selects no pixels")
    return float(np.std(diff))


def _truth_stack(case_dir: Path) -> np.ndarray | None:
    """The noiseless reconstruction if the simulator wrote one, else the phantom truth."""
    truth_dir = next(
        (case_dir / n for n in ("truth_recon", "truth") if (case_dir / n).is_dir()), None
    )
    if truth_dir is None:
        return None
    try:
        return load_series_hu(truth_dir)[0]
    except DataError:  # not exactly one readable series: no truth for this case
        return None


def evaluate_cases(cascade: Cascade, data_dir: Path, *, blend: float = 0.0) -> dict[str, Any]:
    """Metrics of LDCT, NDCT and the cascade output over every case in ``data_dir``.

    Returns mean values over cases: RMSE vs NDCT inside the body, and (when the
    noiseless truth is present) noise std in soft tissue and RMSE vs truth.
    """
    from scipy.ndimage import binary_erosion

    per_case: list[dict[str, float]] = []
    n_slices = 0
    for case in find_cases(data_dir):
        pair = load_case(case)
        n_slices += len(pair.ldct)
        out = cascade.denoise(pair.ldct, blend=blend)
        body = pair.ndct > BODY_MIN_HU
        row = {
            "rmse_vs_ndct_ldct": rmse(pair.ldct, pair.ndct, body),
            "rmse_vs_ndct_cascade": rmse(out, pair.ndct, body),
        }
        truth = _truth_stack(case.full_dir.parent)
        if truth is not None and truth.shape == pair.ndct.shape:
            # Eroded, so the blur of edges in a reconstruction does not count as noise.
            tissue = binary_erosion(
                (truth > SOFT_TISSUE_HU[0]) & (truth < SOFT_TISSUE_HU[1]),
                structure=np.ones((1, 7, 7), bool),
            )
            inside = truth > BODY_MIN_HU
            for name, image in (("ldct", pair.ldct), ("ndct", pair.ndct), ("cascade", out)):
                row[f"noise_std_{name}"] = noise_std(image, truth, tissue)
                row[f"rmse_vs_truth_{name}"] = rmse(image, truth, inside)
        per_case.append(row)
    keys = sorted({k for row in per_case for k in row})
    summary: dict[str, Any] = {
        k: round(float(np.mean([row[k] for row in per_case if k in row])), 2) for k in keys
    }
    summary["n_cases"] = len(per_case)
    summary["n_slices"] = n_slices
    return summary
