"""The cases of a data set: phantom patients, or the series of a site's normal-dose CT,
each a list of :class:`~ldct_node.lab.simulation.slices.SliceTask`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldct_node.dicom import io as dicomio
from ldct_node.lab.simulation.slices import SliceTask

logger = logging.getLogger(__name__)

DEFAULT_SLICES_PER_CASE = 8
"""Slices per case when neither a count nor a slice range is given."""


@dataclass
class Case:
    case_id: str
    index: int
    source: str
    tasks: list[SliceTask]
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


def source_cases(
    sources: Sequence[Path],
    n_cases: int,
    slices_per_case: int | None,
    template: dict[str, Any],
    slice_range: tuple[int, int] | None = None,
    slice_step: int = 1,
) -> list[Case]:
    """One case per CT series found under the sources (at most ``n_cases``)."""
    cases: list[Case] = []
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
                SliceTask(
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
            cases.append(Case(case_id, index, str(source), tasks, spacing, start, None, where))
    return cases


def phantom_cases(
    n_cases: int,
    slices_per_case: int,
    thickness: float,
    kind: str,
    template: dict[str, Any],
) -> list[Case]:
    cases = []
    for index in range(n_cases):
        zs = [(i - (slices_per_case - 1) / 2.0) * thickness for i in range(slices_per_case)]
        tasks = [
            SliceTask(
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
            Case(f"sim{index + 1:04d}", index, f"phantom:{kind}", tasks, thickness, zs[0], part)
        )
    return cases
