"""Offline denoising of DICOM files: ``ldct-node denoise INPUT... --output DIR``.

Same derived-series rules as the node (:mod:`ldct_node.dicom.derive`) but no network
and no database: inputs are grouped by series, sorted by position, denoised, and one
derived series per input series is written below the output folder. A series that
fails (corrupt pixels, not CT, nothing processable) is reported and the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from rich.progress import Progress

from ldct_node.config import Settings
from ldct_node.dicom.io import processing_skip_reason, read_instance, scan_inputs
from ldct_node.dicom.values import InputError, n_frames
from ldct_node.model.cascade import Cascade
from ldct_node.pipeline import denoise_series

logger = logging.getLogger(__name__)


@dataclass
class SeriesOutcome:
    source_series_uid: str
    n_instances: int
    derived_dir: Path | None = None
    error: str | None = None
    skipped: list[str] = field(default_factory=list)


@dataclass
class DenoiseSummary:
    outcomes: list[SeriesOutcome] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    #: Seconds spent loading the weights, within the run (benchmarks subtract it).
    load_seconds: float = 0.0

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.error is not None)

    def lines(self) -> list[str]:
        text = [f"skipped {path}: {reason}" for path, reason in self.problems]
        for o in self.outcomes:
            if o.error is not None:
                text.append(f"FAILED series {o.source_series_uid}: {o.error}")
            else:
                text.append(
                    f"series {o.source_series_uid}: {o.n_instances} slices -> {o.derived_dir}"
                )
            if o.skipped:
                text.append(f"  {len(o.skipped)} instance(s) not processed: {o.skipped[0]}")
        return text


def run_denoise(
    inputs: Sequence[Path],
    output: Path,
    *,
    settings: Settings,
    weights_dir: Path,
    blend: float | None = None,
    batch_size: int | None = None,
    progress_factory: Callable[[], Progress] | None = None,
) -> DenoiseSummary:
    """Denoise every CT series found in ``inputs`` into ``output``.

    Raises
    ------
    FileNotFoundError
        When an input path does not exist.
    ValueError
        When the inputs hold no DICOM series at all.
    """
    for path in inputs:
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
    loading = time.perf_counter()
    cascade = Cascade.load(
        weights_dir,
        batch_size=batch_size or settings.model.batch_size,
        device=settings.model.device,
        precision=settings.model.precision,
        memory_budget_mb=settings.model.memory_budget_mb,
    )
    load_seconds = time.perf_counter() - loading
    scan = scan_inputs(list(inputs))
    summary = DenoiseSummary(
        problems=[(p.path, p.reason) for p in scan.problems], load_seconds=load_seconds
    )
    if not scan.series:
        raise ValueError(
            f"no DICOM series found in {', '.join(str(p) for p in inputs)}"
            + (f" ({len(scan.problems)} unreadable file(s))" if scan.problems else "")
        )
    profile = settings.outputs[0]
    if blend is not None:
        profile = profile.model_copy(update={"blend": blend})
    output.mkdir(parents=True, exist_ok=True)
    # Progress counts slices: the frames of a multi-frame (Enhanced CT) instance each count.
    total = sum(n_frames(header) for group in scan.series for _, header in group.instances)
    bar = progress_factory() if progress_factory is not None else None
    task = bar.add_task("denoising", total=total) if bar is not None else None

    def advance(n: int) -> None:
        if bar is not None and task is not None:
            bar.advance(task, n)

    with bar if bar is not None else contextlib.nullcontext():
        for group in scan.series:
            outcome = SeriesOutcome(group.series_uid, len(group.paths))
            summary.outcomes.append(outcome)
            try:
                datasets = []
                # The scan's headers decide; pixel data is read only for what is denoised.
                for path, header in group.instances:
                    reason = processing_skip_reason(header, settings.series)
                    if reason is None:
                        datasets.append(read_instance(path))
                    else:
                        outcome.skipped.append(f"{path.name}: {reason}")
                        advance(n_frames(header))
                if not datasets:  # a group is never empty, so something was skipped
                    raise InputError(f"nothing to denoise: {outcome.skipped[0]}")
                outcome.n_instances = len(datasets)
                derived = denoise_series(
                    datasets, cascade, [profile], settings.dicom, output, progress=advance
                )
                outcome.derived_dir = derived[0].directory
            except (InputError, OSError, pydicom.errors.InvalidDicomError) as exc:
                outcome.error = str(exc)
                logger.error("series %s failed: %s", group.series_uid, exc)
    return summary
