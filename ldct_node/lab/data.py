"""Paired LDCT/NDCT training data: folder discovery, slice pairing, patch extraction.

Layout (AAPM challenge style, also what ``ldct-node simulate`` writes)::

    DATA/<case>/full_*/      normal-dose series (NDCT)
    DATA/<case>/quarter_*/   low-dose series of the same slices (LDCT); ``low_*`` also accepted
    DATA/<case>/truth/       optional noiseless truth (simulated data only; never trained on)

Slices are paired by position along the slice normal. Patches whose normal-dose
content is mostly air carry no denoising signal and are excluded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldct_node.model.scaling import hu_to_model

logger = logging.getLogger(__name__)

AIR_HU = -900.0
LOW_DOSE_PREFIXES = ("quarter_", "low_")
FULL_DOSE_PREFIX = "full_"


class DataError(ValueError):
    """Training data that cannot be used; the message says which folder and why."""


@dataclass(frozen=True)
class PairedCase:
    """One case: the NDCT and LDCT series folders of the same slices."""

    case_id: str
    full_dir: Path
    low_dir: Path


@dataclass
class PairedSlices:
    """HU stacks ``(N, H, W)`` of one case, paired slice by slice."""

    case_id: str
    ldct: np.ndarray
    ndct: np.ndarray


def find_cases(data_dir: Path) -> list[PairedCase]:
    """Find every ``<case>/full_*`` + ``<case>/quarter_*|low_*`` pair below ``data_dir``.

    A case is named by its folder's path relative to ``data_dir`` (``body/sim0001``), so
    cases of two simulations kept side by side (``body/`` and ``qa/``, both numbering
    from ``sim0001``) stay distinct in the train/validation split and the manifest.
    """
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    cases: list[PairedCase] = []
    candidates = [data_dir, *sorted(p for p in data_dir.rglob("*") if p.is_dir())]
    for folder in candidates:
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
        full = [p for p in subdirs if p.name.startswith(FULL_DOSE_PREFIX)]
        low = [p for p in subdirs if p.name.startswith(LOW_DOSE_PREFIXES)]
        if not full and not low:
            continue
        if len(full) != 1 or len(low) != 1:
            raise DataError(
                f"{folder}: expected one full_* and one quarter_*/low_* folder, "
                f"found {[p.name for p in full + low]}"
            )
        case_id = folder.relative_to(data_dir).as_posix()
        if case_id == ".":
            case_id = folder.name
        cases.append(PairedCase(case_id=case_id, full_dir=full[0], low_dir=low[0]))
    if not cases:
        raise DataError(f"{data_dir}: no <case>/full_* + <case>/quarter_* folder pairs found")
    return cases


def load_series_hu(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU stack and slice positions of the single series in ``folder``."""
    from ldct_node.dicom.io import (
        decode_hu,
        read_instance,
        scan_inputs,
        slice_normal,
        slice_position,
    )

    scan = scan_inputs([folder])
    for problem in scan.problems:
        logger.warning("skipping %s: %s", problem.path, problem.reason)
    if len(scan.series) != 1:
        raise DataError(f"{folder}: expected one DICOM series, found {len(scan.series)}")
    group = scan.series[0]
    normal = slice_normal(group.instances[0][1])
    positions = []
    for index, (_, header) in enumerate(group.instances):
        z = slice_position(header, normal)
        positions.append(float(index) if z is None else z)
    slices = [decode_hu(read_instance(path)) for path in group.paths]
    if len({s.shape for s in slices}) != 1:
        raise DataError(f"{folder}: slices of different sizes")
    return np.stack(slices), np.asarray(positions, dtype=np.float64)


def load_case(case: PairedCase) -> PairedSlices:
    """Read both series of a case and pair their slices by position."""
    ndct, z_full = load_series_hu(case.full_dir)
    ldct, z_low = load_series_hu(case.low_dir)
    if ndct.shape[1:] != ldct.shape[1:]:
        raise DataError(
            f"{case.case_id}: slice size {ndct.shape[1:]} (full) != {ldct.shape[1:]} (low dose)"
        )
    if len(z_full) == len(z_low) and np.allclose(z_full, z_low, atol=0.01):
        return PairedSlices(case.case_id, ldct=ldct, ndct=ndct)
    # Different slice counts: keep only positions present in both series.
    idx_low = [int(np.argmin(np.abs(z_low - z))) for z in z_full]
    keep = [i for i, j in enumerate(idx_low) if abs(z_low[j] - z_full[i]) < 0.01]
    if not keep:
        raise DataError(f"{case.case_id}: no slice positions in common between the two series")
    logger.warning(
        "%s: %d full-dose and %d low-dose slices; pairing the %d common positions",
        case.case_id,
        len(z_full),
        len(z_low),
        len(keep),
    )
    return PairedSlices(case.case_id, ldct=ldct[[idx_low[i] for i in keep]], ndct=ndct[keep])


def extract_patches(
    ldct: np.ndarray,
    ndct: np.ndarray,
    *,
    patch_size: int = 64,
    stride: int = 32,
    max_air_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut aligned patches from HU stacks, excluding air patches.

    Parameters
    ----------
    ldct, ndct
        HU stacks ``(N, H, W)`` of the same slices.
    patch_size, stride
        Square patch side and step in pixels.
    max_air_fraction
        A patch is excluded when more than this fraction of its NDCT pixels is
        below -900 HU (air).

    Returns
    -------
    (ldct_patches, ndct_patches)
        float32 in model range, shape ``(P, patch_size, patch_size, 1)``.
    """
    if ldct.shape != ndct.shape or ldct.ndim != 3:
        raise ValueError(
            f"ldct and ndct must be equal (N, H, W) stacks: {ldct.shape}, {ndct.shape}"
        )
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch_size and stride must be >= 1, got {patch_size}, {stride}")
    if patch_size > min(ldct.shape[1:]):
        raise ValueError(f"patch_size {patch_size} exceeds the slice size {ldct.shape[1:]}")
    n, h, w = ndct.shape
    rows = range(0, h - patch_size + 1, stride)
    cols = range(0, w - patch_size + 1, stride)
    lows: list[np.ndarray] = []
    fulls: list[np.ndarray] = []
    for k in range(n):
        for r in rows:
            for c in cols:
                full = ndct[k, r : r + patch_size, c : c + patch_size]
                if np.mean(full < AIR_HU) > max_air_fraction:
                    continue
                fulls.append(full)
                lows.append(ldct[k, r : r + patch_size, c : c + patch_size])
    if not fulls:
        empty = np.zeros((0, patch_size, patch_size, 1), np.float32)
        return empty, empty.copy()
    return hu_to_model(np.stack(lows))[..., None], hu_to_model(np.stack(fulls))[..., None]


@dataclass
class PatchSet:
    """Training and validation patches plus where they came from."""

    train_ldct: np.ndarray
    train_ndct: np.ndarray
    val_ldct: np.ndarray
    val_ndct: np.ndarray
    train_cases: list[str]
    val_cases: list[str]


def split_cases(
    case_ids: Sequence[str], val_fraction: float, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Validation by whole cases, so neighbouring slices never leak across the split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be within [0, 1), got {val_fraction}")
    ids = list(case_ids)
    if len(ids) < 2 or val_fraction == 0.0:
        return ids, []
    order = list(rng.permutation(len(ids)))
    n_val = max(1, round(len(ids) * val_fraction))
    val = sorted(ids[i] for i in order[:n_val])
    return [c for c in ids if c not in val], val
