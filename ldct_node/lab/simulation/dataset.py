"""Paired full-dose / low-dose data sets on disk (AAPM style), with their manifest."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
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
from ldct_node.lab.simulation.phantoms import PHANTOM_KINDS
from ldct_node.lab.simulation.projector import (
    DEFAULT_FILTER,
    FAN_SOURCE_TO_ISO_MM,
    FILTERS,
    GEOMETRIES,
)
from ldct_node.lab.simulation.scan import MIN_COUNTS, MU_WATER_PER_MM, check_dose_args
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
        Full-dose incident photons per ray and view; default
        :func:`~ldct_node.lab.simulation.scan.default_i0` of the image size (clinical
        noise levels at any size). The value used is recorded per
        case in simulation.json, as is the electronic noise.
    seed
        Seeds the anatomy (per case) and the noise (per slice).
    source_series
        Folders (or files) of normal-dose CT series to use as truth instead of phantoms;
        every CT series found is one case. Their noise is kept: the accepted practice.
    progress
        Show a rich progress bar over all slices.
    electronic_noise, n_angles, geometry, filter_name
        As in :func:`~ldct_node.lab.simulation.scan.simulate_scan`.
    slice_thickness_mm
        Slice spacing of phantom cases.
    phantom_kind
        ``"body"``, ``"water"`` or ``"qa"`` (see
        :func:`~ldct_node.lab.simulation.phantoms.make_phantom`).
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
    check_dose_args(dose_fraction, i0, electronic_noise)
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
        cases = source_cases(sources, n_cases, slices_per_case, template, slice_range, slice_step)
        if not cases:
            raise ValueError("source_series: no usable CT series found")
    else:
        per_case = slices_per_case or DEFAULT_SLICES_PER_CASE
        cases = phantom_cases(n_cases, per_case, slice_thickness_mm, phantom_kind, template)

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
