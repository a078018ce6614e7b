"""Paired full-dose / low-dose data sets on disk (AAPM style), with their manifest."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ldct_node.dicom import io as dicomio
from ldct_node.fsutil import write_text_atomic
from ldct_node.lab.simulation.cases import (
    DEFAULT_SLICES_PER_CASE,
    Case,
    phantom_cases,
    source_cases,
)
from ldct_node.lab.simulation.parameters import SimulationParameters, positive_int
from ldct_node.lab.simulation.projector import FAN_SOURCE_TO_ISO_MM
from ldct_node.lab.simulation.scan import MIN_COUNTS, MU_WATER_PER_MM
from ldct_node.lab.simulation.slices import SliceResult, slice_results

logger = logging.getLogger(__name__)

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


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ValueError(f"output_dir: {output_dir} exists and is not a directory")
        if any(output_dir.iterdir()):
            raise ValueError(f"output_dir: {output_dir} is not empty")


def simulate_dataset(
    output_dir: Path | str,
    parameters: SimulationParameters,
    *,
    workers: int = 1,
    progress: bool = True,
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
    deterministic in the parameters, and so is every pixel: the same parameters write
    the same data, with any number of workers.

    Parameters
    ----------
    output_dir
        Created if missing; must be empty.
    parameters
        What to simulate, e.g. ``SimulationParameters(n_cases=4, size=128)``.
    workers
        Processes simulating slices in parallel (1 = in this process).
    progress
        Show a rich progress bar over all slices.
    on_progress
        Called with (slices done, slices total) after every slice.

    Returns
    -------
    list[Path]
        The case folders, in order.
    """
    if not isinstance(parameters, SimulationParameters):
        raise TypeError(
            f"parameters: expected SimulationParameters, got {type(parameters).__name__}"
        )
    if not positive_int(workers):
        raise ValueError(f"workers: must be a positive integer, got {workers!r}")
    out = Path(output_dir)
    _check_output_dir(out)
    p = parameters
    cases = _cases(p)
    params = _recorded_parameters(p, cases)
    # UIDs are derived from the parameters: same call, same UIDs; other call, others.
    run_key = json.dumps(params, sort_keys=True)
    total = params["n_slices"]
    out.mkdir(parents=True, exist_ok=True)
    logger.info(
        "simulating %d case(s), %d slice(s), dose fraction %g, into %s",
        len(cases),
        total,
        p.dose_fraction,
        out,
    )

    case_records: list[dict[str, Any]] = []
    case_dirs: list[Path] = []
    all_tasks = [task for case in cases for task in case.tasks]
    done = 0
    with (
        _progress_bar(progress, total) as advance,
        closing(slice_results(all_tasks, workers)) as results,
    ):
        for case in cases:
            slices: list[SliceResult] = []
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


def _cases(p: SimulationParameters) -> list[Case]:
    """The cases to simulate: one per source series, else ``n_cases`` phantoms."""
    # What every slice task shares (see SliceTask).
    template: dict[str, Any] = {
        "seed": int(p.seed),
        "size": p.size,
        "resample_to": p.size if p.resample_sources or p.pixel_size_mm is not None else None,
        "pixel_size_mm": None if p.pixel_size_mm is None else float(p.pixel_size_mm),
        "dose_fraction": float(p.dose_fraction),
        "i0": None if p.i0 is None else float(p.i0),
        "electronic_noise": None if p.electronic_noise is None else float(p.electronic_noise),
        "n_angles": p.n_angles,
        "geometry": p.geometry,
        "filter_name": p.filter_name,
    }
    if p.source_series:
        cases = source_cases(
            p.source_series,
            p.n_cases,
            p.slices_per_case,
            template,
            p.slice_range,
            p.slice_step,
        )
        if not cases:
            raise ValueError("source_series: no usable CT series found")
        return cases
    per_case = p.slices_per_case or DEFAULT_SLICES_PER_CASE
    return phantom_cases(p.n_cases, per_case, p.slice_thickness_mm, p.phantom_kind, template)


def _recorded_parameters(p: SimulationParameters, cases: list[Case]) -> dict[str, Any]:
    """What simulation.json records of the run (before its cases); the UIDs hash it."""
    from ldct_node import __version__

    sources = p.source_series
    return {
        "generator": "ldct-node simulate",
        "ldct_node_version": __version__,
        "seed": int(p.seed),
        "n_cases": len(cases),
        "slices_per_case": p.slices_per_case,
        "n_slices": sum(len(c.tasks) for c in cases),
        "size": p.size,
        "dose_fraction": float(p.dose_fraction),
        "i0": p.i0,
        "i0_default": p.i0 is None,
        "electronic_noise": p.electronic_noise,
        "n_angles": p.n_angles,
        "geometry": p.geometry,
        "filter_name": p.filter_name,
        "mu_water_per_mm": MU_WATER_PER_MM,
        "min_counts": MIN_COUNTS,
        "fan_source_to_iso_mm": FAN_SOURCE_TO_ISO_MM if p.geometry == "fan" else None,
        "slice_thickness_mm": p.slice_thickness_mm if not sources else None,
        "phantom_kind": p.phantom_kind if not sources else None,
        "source_series": [str(s) for s in sources],
        "resample_sources": p.resample_sources,
        "pixel_size_mm": p.pixel_size_mm,
        "slice_range": list(p.slice_range) if p.slice_range is not None else None,
        "slice_step": p.slice_step,
        "folders": {
            "full_dose": FULL_DOSE_DIR,
            "low_dose": low_dose_dir_name(p.dose_fraction),
            "truth": TRUTH_DIR,
            "truth_recon": TRUTH_RECON_DIR if p.write_truth_recon else None,
        },
    }


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
    case: Case,
    slices: list[SliceResult],
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
