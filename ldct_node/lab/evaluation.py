"""`ldct-node evaluate`: image quality of denoising methods on paired series.

Reads low-dose (LDCT) and normal-dose (NDCT) series, optionally the noiseless truth,
runs every method on the LDCT and measures, against the NDCT and the truth:

- on every case: RMSE (HU, inside the body), PSNR and SSIM (soft-tissue window);
- on anatomy cases with a noiseless reconstruction: noise std (image minus truth in
  soft tissue) and RMSE vs the truth;
- on QA-phantom cases (``ldct-node simulate --phantom qa``): noise std in the uniform
  region, CNR of the 1 % low-contrast discs, CT-number bias of each sensitometry
  insert against its nominal HU, and MTF50 from the edge rod.

Where the objects are comes from the simulator's ``simulation.json`` (per case, per
slice ``regions``), so the QA metrics have exact ground truth. The report is
``report.json``, ``report.md`` and ``figure.png`` (LDCT | NDCT | each method, over
their differences to the NDCT, in a soft-tissue window, like the paper's figure 2).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ldct_node.lab import metrics as m
from ldct_node.lab.data import DataError, PairedCase, load_case, load_series_hu
from ldct_node.model.manifest import read_raw, write_raw

logger = logging.getLogger(__name__)

BODY_MIN_HU = -500.0
#: Display window of the figure's difference images (HU).
DIFFERENCE_WINDOW = (-100.0, 100.0)
#: Largest allowed CT-number error of an insert (the issue's goal), HU.
INSERT_TOLERANCE_HU = 5.0
#: MTF50 a method must keep, relative to the NDCT (no over-smoothing).
MTF_RATIO_GOAL = 0.9

Denoiser = Callable[[np.ndarray], np.ndarray]


@dataclass
class EvalCase:
    """One case: HU stacks ``(N, H, W)`` paired slice by slice, and what is known of it."""

    case_id: str
    ldct: np.ndarray
    ndct: np.ndarray
    pixel_spacing_mm: float
    truth: np.ndarray | None = None
    #: "truth_recon" (noiseless FBP: same blur as the scans) or "truth" (the phantom).
    truth_kind: str | None = None
    #: Per slice: the phantom's objects of known HU (simulation.json), if simulated.
    regions: list[list[dict[str, Any]]] | None = None

    @property
    def is_qa(self) -> bool:
        return bool(self.regions) and any(
            r["kind"] == "edge" for slice_regions in self.regions or [] for r in slice_regions
        )


@dataclass
class Method:
    """A denoiser under evaluation: a name and a function of an HU stack."""

    name: str
    run: Denoiser
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    #: Used instead of ``run`` when set: a method that may look at the case (BM3D's
    #: noise level).
    run_case: Callable[[EvalCase], np.ndarray] | None = None


# ---------------------------------------------------------------------------- loading


def _series_folders(root: Path) -> dict[str, list[Path]]:
    """Folders holding one CT series each below ``root``, by FrameOfReferenceUID."""
    from ldct_node.dicom.io import scan_inputs

    scan = scan_inputs([root])
    found: dict[str, list[Path]] = {}
    for group in scan.series:
        header = group.instances[0][1]
        key = str(header.get("FrameOfReferenceUID") or header.get("StudyInstanceUID") or "")
        folder = Path(group.paths[0]).parent
        found.setdefault(key, []).append(folder)
    return found


def _pick(folders: list[Path], prefixes: Sequence[str]) -> Path | None:
    """The folder named with the first matching prefix; the only folder if none matches."""
    for prefix in prefixes:
        named = [f for f in folders if f.name.startswith(prefix)]
        if len(named) == 1:
            return named[0]
    return folders[0] if len(folders) == 1 else None


def _regions_for(folder: Path, n_slices: int) -> list[list[dict[str, Any]]] | None:
    """The per-slice objects simulation.json records for the case ``folder`` belongs to."""
    case_dir = folder.parent
    manifest = case_dir.parent / "simulation.json"
    if not manifest.is_file():
        return None
    try:
        sim = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("%s: unreadable (%s); no regions", manifest, exc)
        return None
    for record in sim.get("cases", []):
        if record.get("case_id") == case_dir.name and "slices" in record:
            slices = [s.get("regions", []) for s in record["slices"]]
            return slices if len(slices) == n_slices else None
    return None


def _pixel_spacing(folder: Path) -> float:
    from pydicom import dcmread

    first = min(p for p in folder.iterdir() if p.is_file())
    ds = dcmread(first, stop_before_pixels=True)
    return float((ds.get("PixelSpacing") or [1.0])[0])


def load_eval_cases(
    ldct_dir: Path, reference_dir: Path, truth_dir: Path | None = None
) -> list[EvalCase]:
    """Pair the LDCT, NDCT (and truth) series found below the three folders.

    Series are paired by FrameOfReferenceUID (else StudyInstanceUID), slices by
    position. The folders may be the same tree: where a frame of reference has several
    series, ``quarter_*``/``low_*`` are the LDCT, ``full_*`` the NDCT and
    ``truth_recon`` (preferred) or ``truth`` the truth, as ``ldct-node simulate`` and
    the AAPM data name them.
    """
    low = _series_folders(ldct_dir)
    full = _series_folders(reference_dir)
    truth = _series_folders(truth_dir) if truth_dir is not None else {}
    cases: list[EvalCase] = []
    for key in sorted(low, key=lambda k: str(low[k][0])):
        low_dir = _pick(low[key], ("quarter_", "low_"))
        full_dir = _pick([f for f in full.get(key, []) if f != low_dir], ("full_",))
        if low_dir is None or full_dir is None:
            continue
        # The case folder relative to --ldct: unique even when subsets reuse case names.
        case_dir = low_dir.parent if low_dir.parent != ldct_dir.parent else low_dir
        try:
            case_id = case_dir.relative_to(ldct_dir).as_posix()
        except ValueError:
            case_id = case_dir.name
        case_id = case_id if case_id != "." else case_dir.name
        pair = load_case(PairedCase(case_id=case_id, full_dir=full_dir, low_dir=low_dir))
        case = EvalCase(
            case_id=case_id,
            ldct=pair.ldct,
            ndct=pair.ndct,
            pixel_spacing_mm=_pixel_spacing(full_dir),
        )
        candidates = [f for f in truth.get(key, []) if f not in (low_dir, full_dir)]
        truth_folder = _pick(candidates, ("truth_recon", "truth"))
        if truth_folder is not None:
            try:
                stack, _ = load_series_hu(truth_folder)
            except DataError as exc:
                logger.warning("%s: truth not used: %s", case_id, exc)
            else:
                if stack.shape == case.ndct.shape:
                    case.truth = stack
                    case.truth_kind = (
                        "truth_recon" if truth_folder.name.startswith("truth_recon") else "truth"
                    )
        case.regions = _regions_for(full_dir, len(case.ndct))
        cases.append(case)
    if not cases:
        raise DataError(
            f"no LDCT series under {ldct_dir} has an NDCT series with the same frame of "
            f"reference under {reference_dir}"
        )
    return cases


# ---------------------------------------------------------------------------- methods


def cascade_method(
    weights_dir: Path,
    *,
    blend: float = 0.0,
    hu_fidelity_mm: float = 0.0,
    batch_size: int = 4,
    cascade: Any | None = None,
    shared: dict[int, np.ndarray] | None = None,
) -> Method:
    """The network pipeline in ``weights_dir`` (any method its MANIFEST.json names),
    with an output profile's ``hu_fidelity_mm`` and ``blend``. Pass ``cascade`` (already
    loaded from there) and one ``shared`` dict to every profile of one folder: the
    networks then run once per case, as in the node, and each profile only post-processes.
    """
    from ldct_node.model.cascade import Cascade, blend_with_input
    from ldct_node.model.fidelity import restore_low_frequency

    if cascade is None:
        cascade = Cascade.load(weights_dir, batch_size=batch_size)
    outputs = shared if shared is not None else {}
    parts = [cascade.method]
    if hu_fidelity_mm > 0:
        parts.append(f"fidelity {hu_fidelity_mm:g} mm")
    if blend > 0:
        parts.append(f"blend {blend:g}")

    def run_case(case: EvalCase) -> np.ndarray:
        key = id(case.ldct)
        if key not in outputs:
            outputs.clear()  # cases come one at a time: keep only the current one
            outputs[key] = cascade.denoise(case.ldct)
        out = outputs[key]
        if hu_fidelity_mm > 0:
            out = restore_low_frequency(out, case.ldct, case.pixel_spacing_mm, hu_fidelity_mm)
        return blend_with_input(out, case.ldct, blend)

    return Method(
        name=", ".join(parts),
        run=lambda hu: cascade.denoise(hu, blend=blend),
        description=f"{weights_dir} ({cascade.model_version})",
        info={
            "weights": str(weights_dir),
            "model_version": cascade.model_version,
            "blend": blend,
            "hu_fidelity_mm": hu_fidelity_mm,
        },
        run_case=run_case,
    )


def distinguish_names(methods: Sequence[Method]) -> None:
    """Rename, in place, methods that share a name (several weights folders of one
    method) by the shortest tail of their weights folder's path that tells them apart:
    ``C [runs/C]`` and ``C [weights/C]``."""
    by_name: dict[str, list[Method]] = {}
    for meth in methods:
        by_name.setdefault(meth.name, []).append(meth)
    for group in by_name.values():
        if len(group) < 2 or any("weights" not in meth.info for meth in group):
            continue
        parts = [Path(str(meth.info["weights"])).resolve().parts for meth in group]
        for meth, mine in zip(group, parts, strict=True):
            others = [p for p in parts if p is not mine]
            k = 1  # the fewest trailing folders no other path of the group ends with
            while k < len(mine) and any(p[-k:] == mine[-k:] for p in others):
                k += 1
            meth.name = f"{meth.name} [{'/'.join(mine[-k:])}]"


def bm3d_method(sigma_hu: float | None = None) -> Method:
    """BM3D (the ``bm3d`` package) on each slice: the classical baseline.

    ``sigma_hu`` is the noise level BM3D assumes. None gives it the LDCT's true noise
    where the simulation knows it (std of LDCT minus the noiseless reconstruction in
    soft tissue: a tuned baseline, as a site would tune it), else an estimate from the
    image (:func:`estimate_noise_hu`).
    """
    try:
        import bm3d
    except ImportError:
        raise RuntimeError(
            "BM3D needs the bm3d package: pip install 'ldct-node[bm3d]' (or pip install bm3d)"
        ) from None

    def denoise(hu: np.ndarray, sigma: float) -> np.ndarray:
        stack = np.asarray(hu, np.float64)
        # BM3D works on any scale; HU/1000 keeps its internal thresholds well conditioned.
        out = [bm3d.bm3d(s / 1000.0, sigma / 1000.0) * 1000.0 for s in stack]
        return np.stack(out).astype(np.float32)

    def run_case(case: EvalCase) -> np.ndarray:
        sigma = sigma_hu
        if sigma is None and case.truth is not None and case.truth_kind == "truth_recon":
            sigma = m.noise_std(case.ldct, case.truth, _soft_tissue(case.truth))
        if sigma is None:
            sigma = estimate_noise_hu(case.ldct)
        logger.debug("%s: BM3D sigma %.1f HU", case.case_id, sigma)
        return denoise(case.ldct, sigma)

    return Method(
        name="BM3D",
        run=lambda hu: denoise(hu, sigma_hu if sigma_hu is not None else estimate_noise_hu(hu)),
        run_case=run_case,
        description=(
            "BM3D (bm3d package), sigma "
            + ("= the LDCT's noise" if sigma_hu is None else f"{sigma_hu:g} HU")
        ),
        info={"sigma_hu": sigma_hu},
    )


def estimate_noise_hu(stack: np.ndarray, size: int = 9) -> float:
    """Pixel noise std (HU) of CT images without a reference: the median local std
    (``size`` x ``size`` windows) over soft tissue (-150..150 HU).

    Local windows keep the noise's correlation (FBP noise is not white, so estimators
    built on neighbouring-pixel differences read it far too low); the median keeps
    edges and organ texture from dominating.
    """
    from scipy.ndimage import binary_erosion, uniform_filter

    x = np.asarray(stack, np.float64)
    if x.ndim == 2:
        x = x[None]
    window = (1, size, size)
    mean = uniform_filter(x, window)
    local_std = np.sqrt(np.maximum(uniform_filter(x * x, window) - mean * mean, 0.0))
    tissue = binary_erosion(np.abs(x) < 150, structure=np.ones(window, bool))
    values = local_std[tissue] if tissue.sum() >= 100 else local_std.ravel()
    return float(np.median(values))


# ---------------------------------------------------------------------------- metrics


def _soft_tissue(truth: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return binary_erosion(
        (truth > m.SOFT_TISSUE_HU[0]) & (truth < m.SOFT_TISSUE_HU[1]),
        structure=np.ones((1, 7, 7), bool),
    )


def image_metrics(image: np.ndarray, case: EvalCase) -> dict[str, float]:
    """RMSE, PSNR, SSIM vs the NDCT (and vs the truth), noise vs the truth."""
    window = m.SOFT_TISSUE_WINDOW
    data_range = window[1] - window[0]
    body = case.ndct > BODY_MIN_HU
    row: dict[str, float] = {"rmse_vs_ndct": m.rmse(image, case.ndct, body)}
    row["psnr_vs_ndct"] = m.psnr(
        m.in_window(image, window), m.in_window(case.ndct, window), data_range=data_range
    )
    row["ssim_vs_ndct"] = m.ssim(
        m.in_window(image, window), m.in_window(case.ndct, window), data_range=data_range
    )
    if case.truth is not None:
        inside = case.truth > BODY_MIN_HU
        row["rmse_vs_truth"] = m.rmse(image, case.truth, inside)
        row["ssim_vs_truth"] = m.ssim(
            m.in_window(image, window), m.in_window(case.truth, window), data_range=data_range
        )
        if case.truth_kind == "truth_recon" and not case.is_qa:
            row["noise_std"] = m.noise_std(image, case.truth, _soft_tissue(case.truth))
    return row


def _free_water(shape: tuple[int, int], regions: list[dict[str, Any]], margin: float) -> np.ndarray:
    """Water of the QA phantom away (by ``margin`` pixels) from every object and the wall."""
    free = np.zeros(shape, bool)
    for r in regions:
        if r["kind"] == "phantom":
            free |= m.disc_mask(shape, r["row"], r["col"], r["radius_px"] - 2 * margin)
    for r in regions:
        if r["kind"] in ("insert", "low_contrast", "edge"):
            free &= ~m.disc_mask(shape, r["row"], r["col"], r["radius_px"] + margin)
    return free


def _or_nan(measure: Callable[[], float]) -> float:
    """The measurement, or NaN where the image makes it undefined (e.g. a flat image
    has no noise for a CNR, no edge for an MTF): the report shows "-" there."""
    try:
        return float(measure())
    except ValueError as exc:
        logger.debug("metric undefined: %s", exc)
        return float("nan")


def qa_metrics(image: np.ndarray, case: EvalCase) -> dict[str, Any]:
    """Noise, CNR, insert bias and MTF50 on a QA-phantom case (all slices pooled)."""
    if not case.regions:
        raise ValueError(f"{case.case_id}: no QA regions")
    regions = case.regions[0]  # the QA phantom is the same in every slice
    shape = image.shape
    plane = shape[-2:]
    free = _free_water(plane, regions, margin=3.0)
    result: dict[str, Any] = {}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in regions:
        by_kind.setdefault(r["kind"], []).append(r)

    uniform = by_kind["uniform"][0]
    disc = m.disc_mask(plane, uniform["row"], uniform["col"], uniform["radius_px"]) & free
    # Per slice, then RMS over slices: the std of a stack would add slice-to-slice offsets.
    result["noise_std_uniform"] = float(
        math.sqrt(np.mean([m.roi_std(s, disc) ** 2 for s in image]))
    )

    cnrs: dict[str, float] = {}
    for r in by_kind.get("low_contrast", []):
        radius = r["radius_px"]
        signal = m.disc_mask(shape, r["row"], r["col"], max(0.7 * radius, 1.0))
        inner = radius + 3.0
        ring = m.annulus_mask(plane, r["row"], r["col"], inner, inner + max(radius, 5.0)) & free
        if ring.sum() < 20:
            continue
        background = np.broadcast_to(ring, shape)
        cnrs[r["name"]] = _or_nan(partial(m.cnr, image, signal, background))
    result["cnr"] = cnrs
    finite = [v for v in cnrs.values() if math.isfinite(v)]
    result["cnr_mean"] = float(np.mean(finite)) if finite else float("nan")

    biases: dict[str, float] = {}
    for r in by_kind.get("insert", []):
        roi = m.disc_mask(shape, r["row"], r["col"], 0.6 * r["radius_px"])
        biases[r["name"]] = m.hu_bias(image, roi, r["hu"])
    result["insert_bias"] = biases
    result["insert_max_abs_bias"] = max((abs(b) for b in biases.values()), default=float("nan"))

    edge = by_kind["edge"][0]
    result["mtf50"] = _or_nan(
        lambda: m.edge_mtf(image, edge["row"], edge["col"], edge["radius_px"]).mtf50_per_mm(
            case.pixel_spacing_mm
        )
    )
    # A non-linear denoiser can keep a 1000 HU edge and still blur low contrast: also
    # the MTF of the lowest-contrast insert above 100 HU (acrylic, +120 HU).
    low = [r for r in by_kind.get("insert", []) if abs(r["hu"] - r["background_hu"]) >= 100]
    if low:
        r = min(low, key=lambda r: abs(r["hu"] - r["background_hu"]))
        result["mtf50_low_contrast"] = _or_nan(
            lambda: m.edge_mtf(image, r["row"], r["col"], r["radius_px"]).mtf50_per_mm(
                case.pixel_spacing_mm
            )
        )
    return result


# ---------------------------------------------------------------------------- evaluation


def _mean_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every numeric key (and, recursively, of dicts of numbers) over rows."""
    out: dict[str, Any] = {}
    keys = sorted({k for row in rows for k in row})
    for key in keys:
        values = [row[key] for row in rows if key in row]
        if isinstance(values[0], dict):
            out[key] = _mean_rows(values)
        else:
            finite = [float(v) for v in values if math.isfinite(float(v))]
            out[key] = round(float(np.mean(finite)), 4) if finite else None
    return out


def evaluate(
    cases: list[EvalCase],
    methods: list[Method],
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every metric of LDCT, NDCT and each method, averaged over anatomy and QA cases.

    Returns a JSON-able dict: ``images`` (names in order), ``anatomy`` and ``qa``
    (image -> metric -> mean over cases), ``per_case``, ``goals`` (per method, the
    issue's checks against the NDCT) and ``outputs`` (not JSON: the denoised stacks of
    the first anatomy and first QA case, for the figure).
    """
    names = ["LDCT", "NDCT", *[meth.name for meth in methods]]
    if len(set(names)) != len(names):
        raise ValueError(f"methods: names must be unique, got {names}")
    per_case: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {"anatomy": {}, "qa": {}}
    figure_cases: dict[str, tuple[EvalCase, dict[str, np.ndarray]]] = {}
    for case in cases:
        outputs = {"LDCT": case.ldct, "NDCT": case.ndct}
        for meth in methods:
            if progress is not None:
                progress(f"{case.case_id}: {meth.name}")
            result = meth.run_case(case) if meth.run_case is not None else meth.run(case.ldct)
            outputs[meth.name] = np.asarray(result, np.float32)
        group = "qa" if case.is_qa else "anatomy"
        rows: dict[str, Any] = {}
        for name, image in outputs.items():
            row: dict[str, Any] = image_metrics(image, case) if name != "NDCT" else {}
            if name == "NDCT" and case.truth is not None:
                row = {k: v for k, v in image_metrics(image, case).items() if "ndct" not in k}
            if group == "qa":
                row.update(qa_metrics(image, case))
            rows[name] = row
            groups[group].setdefault(name, []).append(row)
        per_case[case.case_id] = {"kind": group, "n_slices": len(case.ndct), "metrics": rows}
        figure_cases.setdefault(group, (case, outputs))
    summary: dict[str, Any] = {
        "images": names,
        "methods": {meth.name: meth.description for meth in methods},
        "method_info": {meth.name: meth.info for meth in methods},
        "n_cases": {g: len(next(iter(v.values()), [])) for g, v in groups.items()},
        "n_slices": {
            g: sum(c["n_slices"] for c in per_case.values() if c["kind"] == g) for g in groups
        },
        "truth": sorted({c.truth_kind for c in cases if c.truth_kind}),
        "anatomy": {name: _mean_rows(rows) for name, rows in groups["anatomy"].items()},
        "qa": {name: _mean_rows(rows) for name, rows in groups["qa"].items()},
        "per_case": per_case,
    }
    summary["goals"] = {meth.name: goal_checks(summary, meth.name) for meth in methods}
    summary["outputs"] = figure_cases
    return summary


def goal_checks(summary: dict[str, Any], name: str) -> dict[str, bool | None]:
    """The issue's goals for one method, against the NDCT (None: not measured)."""
    anatomy, qa = summary["anatomy"], summary["qa"]

    def get(group: dict[str, Any], image: str, key: str) -> float | None:
        value = group.get(image, {}).get(key)
        return None if value is None else float(value)

    def compare(
        a: float | None, b: float | None, ok: Callable[[float, float], bool]
    ) -> bool | None:
        return None if a is None or b is None else bool(ok(a, b))

    noise_values = [
        compare(get(anatomy, name, "noise_std"), get(anatomy, "NDCT", "noise_std"), _le),
        compare(get(qa, name, "noise_std_uniform"), get(qa, "NDCT", "noise_std_uniform"), _le),
    ]
    measured = [v for v in noise_values if v is not None]
    worst_bias = get(qa, name, "insert_max_abs_bias")
    return {
        "noise_le_ndct": all(measured) if measured else None,
        "cnr_ge_ndct": compare(get(qa, name, "cnr_mean"), get(qa, "NDCT", "cnr_mean"), _ge),
        "inserts_within_5hu": None if worst_bias is None else worst_bias <= INSERT_TOLERANCE_HU,
        "mtf50_ge_0.9_ndct": compare(
            get(qa, name, "mtf50"), get(qa, "NDCT", "mtf50"), lambda a, b: a >= MTF_RATIO_GOAL * b
        ),
        "rmse_vs_truth_le_ndct": compare(
            get(anatomy, name, "rmse_vs_truth"), get(anatomy, "NDCT", "rmse_vs_truth"), _le
        ),
    }


def _le(a: float, b: float) -> bool:
    return a <= b


def _ge(a: float, b: float) -> bool:
    return a >= b


# ---------------------------------------------------------------------------- report


_ANATOMY_COLUMNS = (
    ("noise_std", "noise std", "{:.1f}"),
    ("rmse_vs_truth", "RMSE vs truth", "{:.1f}"),
    ("rmse_vs_ndct", "RMSE vs NDCT", "{:.1f}"),
    ("psnr_vs_ndct", "PSNR vs NDCT (dB)", "{:.2f}"),
    ("ssim_vs_ndct", "SSIM vs NDCT", "{:.3f}"),
)
_QA_COLUMNS = (
    ("noise_std_uniform", "noise std (uniform)", "{:.1f}"),
    ("cnr_mean", "CNR 1% discs", "{:.2f}"),
    ("insert_max_abs_bias", "worst insert bias", "{:.1f}"),
    ("mtf50", "MTF50 (lp/mm)", "{:.3f}"),
    ("mtf50_low_contrast", "MTF50 at 120 HU", "{:.3f}"),
    ("ssim_vs_ndct", "SSIM vs NDCT", "{:.3f}"),
)
_GOAL_TITLES = {
    "noise_le_ndct": "noise <= NDCT",
    "cnr_ge_ndct": "CNR >= NDCT",
    "inserts_within_5hu": "inserts within 5 HU",
    "mtf50_ge_0.9_ndct": "MTF50 >= 0.9 NDCT",
    "rmse_vs_truth_le_ndct": "RMSE vs truth <= NDCT",
}


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def markdown_report(summary: dict[str, Any], title: str = "Image quality") -> str:
    """The summary as Markdown tables (anatomy, QA phantom, inserts, goals)."""
    lines = [f"# {title}", ""]
    n_cases, n_slices = summary["n_cases"], summary["n_slices"]
    for group, columns, heading in (
        ("anatomy", _ANATOMY_COLUMNS, "Anatomy"),
        ("qa", _QA_COLUMNS, "QA phantom"),
    ):
        table = summary[group]
        if not table:
            continue
        lines += [
            f"## {heading} ({n_cases[group]} cases, {n_slices[group]} slices; HU unless noted)",
            "",
            "| image | " + " | ".join(c[1] for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for name in summary["images"]:
            row = table.get(name, {})
            cells = [_cell(row.get(key), fmt) for key, _, fmt in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary["qa"]:
        insert_names = sorted(
            {k for row in summary["qa"].values() for k in (row.get("insert_bias") or {})}
        )
        if insert_names:
            lines += [
                "## CT-number bias of the inserts (HU, measured minus nominal)",
                "",
                "| image | " + " | ".join(insert_names) + " |",
                "|---|" + "---|" * len(insert_names),
            ]
            for name in summary["images"]:
                biases = summary["qa"].get(name, {}).get("insert_bias") or {}
                lines.append(
                    f"| {name} | "
                    + " | ".join(_cell(biases.get(k), "{:+.1f}") for k in insert_names)
                    + " |"
                )
            lines.append("")
    if summary["goals"]:
        keys = list(_GOAL_TITLES)
        lines += [
            "## Goals (each method against the NDCT)",
            "",
            "| method | " + " | ".join(_GOAL_TITLES[k] for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for name, goals in summary["goals"].items():
            marks = ["-" if goals[k] is None else ("yes" if goals[k] else "**no**") for k in keys]
            lines.append(f"| {name} | " + " | ".join(marks) + " |")
        lines.append("")
    if summary["methods"]:
        lines += ["## Methods", ""]
        lines += [f"- {name}: {desc}" for name, desc in summary["methods"].items()]
        lines.append("")
    lines += [
        "Noise: std of the image minus the noiseless reconstruction in soft tissue (anatomy),",
        "std in the uniform region (QA). RMSE inside the body. PSNR and SSIM in the",
        "soft-tissue window (W 400, L 40). CNR: 1 % (10 HU) discs against a ring of water",
        "around each. MTF50 from the QA phantom's edge rod (+1000 HU) and from its acrylic",
        "insert (+120 HU), circular-edge method; goals use the edge rod.",
        "",
    ]
    return "\n".join(lines)


def _to_gray(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lower, upper = window
    scaled = (np.asarray(image, np.float64) - lower) / (upper - lower)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_figure(summary: dict[str, Any], path: Path, slice_index: int | None = None) -> Path:
    """PNG like the paper's figure 2: per case, a row of images (soft-tissue window)
    over a row of their differences to the NDCT (+-100 HU); NDCT's is NDCT - truth."""
    from PIL import Image, ImageDraw

    label_h = 16
    blocks: list[Image.Image] = []
    for _group, (case, outputs) in summary["outputs"].items():
        k = len(case.ndct) // 2 if slice_index is None else min(slice_index, len(case.ndct) - 1)
        h, w = case.ndct.shape[1:]
        names = list(outputs)
        block = Image.new("L", (w * len(names), 2 * (h + label_h)), 0)
        draw = ImageDraw.Draw(block)
        for i, name in enumerate(names):
            image = outputs[name][k]
            if name == "NDCT":
                diff = image - case.truth[k] if case.truth is not None else np.zeros_like(image)
                diff_label = "NDCT - truth" if case.truth is not None else ""
            else:
                diff = image - case.ndct[k]
                diff_label = f"{name} - NDCT"
            block.paste(Image.fromarray(_to_gray(image, m.SOFT_TISSUE_WINDOW)), (i * w, label_h))
            block.paste(
                Image.fromarray(_to_gray(diff, DIFFERENCE_WINDOW)), (i * w, 2 * label_h + h)
            )
            draw.text((i * w + 3, 2), f"{name} ({case.case_id})", fill=255)
            draw.text((i * w + 3, h + label_h + 2), diff_label, fill=255)
        blocks.append(block)
    if not blocks:
        raise ValueError("summary: no outputs to draw")
    width = max(b.width for b in blocks)
    canvas = Image.new("L", (width, sum(b.height for b in blocks)), 0)
    y = 0
    for b in blocks:
        canvas.paste(b, (0, y))
        y += b.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_report(
    summary: dict[str, Any], report_dir: Path, title: str = "Image quality"
) -> dict[str, Path]:
    """report.json, report.md and figure.png in ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in summary.items() if k != "outputs"}
    paths = {
        "json": report_dir / "report.json",
        "markdown": report_dir / "report.md",
        "figure": report_dir / "figure.png",
    }
    paths["json"].write_text(
        json.dumps(_finite(data), indent=2, allow_nan=False, default=_json_default) + "\n",
        encoding="utf-8",
    )
    paths["markdown"].write_text(markdown_report(summary, title), encoding="utf-8")
    write_figure(summary, paths["figure"])
    return paths


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities (not JSON) as None, recursively."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def record_in_manifest(
    summary: dict[str, Any], weights_dir: Path, *, held_out: str, key: str = "evaluation"
) -> dict[str, Any]:
    """Add the evaluation to ``weights_dir/MANIFEST.json`` under ``key`` (one entry per
    held-out set: ``evaluation`` and, say, ``evaluation_512``).

    Records every image's mean metrics (LDCT, NDCT and each method, so the weights'
    own rows sit next to what they were compared with), the goal checks, the held-out
    set and which method names are these weights. The weights files and their sha256
    are untouched, so the model version stays the same; an earlier evaluation under the
    same key is replaced.

    Returns
    -------
    dict
        The ``"evaluation"`` entry written.
    """
    manifest = read_raw(weights_dir)
    mine = [
        name
        for name, method in summary.get("method_info", {}).items()
        if Path(method.get("weights", "")) == weights_dir
    ]
    if not mine:
        raise ValueError(f"weights_dir: {weights_dir} is not one of the evaluated methods")
    entry = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "held_out": held_out,
        "these_weights": mine,
        **{
            name: summary[name]
            for name in ("images", "methods", "n_cases", "n_slices", "truth", "anatomy", "qa")
        },
        "goals": summary["goals"],
    }
    manifest[key] = _finite(entry)
    write_raw(weights_dir, manifest, allow_nan=False, default=_json_default)
    return dict(manifest[key])
