"""`ldct-node evaluate`: methods measured on simulated anatomy and QA-phantom cases."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _dicom_util import make_ct_series
from conftest import run_cli
from PIL import Image
from pydicom.uid import generate_uid

from ldct_node.lab.evaluation import (
    Method,
    distinguish_names,
    estimate_noise_hu,
    evaluate,
    goal_checks,
    load_eval_cases,
)
from ldct_node.lab.simulation import SimulationParameters, simulate_dataset
from ldct_node.model.cascade import Cascade

HAVE_BM3D = importlib.util.find_spec("bm3d") is not None


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A held-out set: one anatomy case (64 px) and one QA-phantom case (256 px)."""
    root = tmp_path_factory.mktemp("heldout")
    common = SimulationParameters(n_cases=1, seed=21, write_truth_recon=True)
    body = replace(common, slices_per_case=2, size=64)
    qa = replace(common, slices_per_case=1, size=256, phantom_kind="qa")
    simulate_dataset(root / "body", body, progress=False)
    simulate_dataset(root / "qa", qa, progress=False)
    return root


def test_evaluate_command_reports_every_method(
    heldout: Path, untrained_weights: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    weights = tmp_path / "weights"
    shutil.copytree(untrained_weights, weights)
    args = ["evaluate", "--ldct", heldout, "--reference", heldout, "--truth", heldout]
    args += ["--weights", weights, "--blend", "0", "--blend", "0.3", "--record-in", weights]
    args += ["--hu-fidelity-mm", "0", "--hu-fidelity-mm", "2", "--record-key", "evaluation_sim"]
    args += ["--report", report] + (["--bm3d"] if HAVE_BM3D else [])
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    data = json.loads((report / "report.json").read_text())
    # --record-in: the same table and goals in the weights' manifest, which still loads.
    recorded = json.loads((weights / "MANIFEST.json").read_text())["evaluation_sim"]
    assert recorded["these_weights"] == [
        "C",
        "C, blend 0.3",
        "C, fidelity 2 mm",
        "C, fidelity 2 mm, blend 0.3",
    ]
    assert data["method_info"]["C, fidelity 2 mm"]["hu_fidelity_mm"] == 2.0
    assert recorded["anatomy"] == data["anatomy"] and recorded["goals"] == data["goals"]
    assert recorded["held_out"] == str(heldout)
    assert (
        Cascade.load(weights).model_version
        == json.loads((untrained_weights / "MANIFEST.json").read_text())["model_version"]
    )
    methods = ["C", "C, blend 0.3", "C, fidelity 2 mm", "C, fidelity 2 mm, blend 0.3"]
    methods += ["BM3D"] if HAVE_BM3D else []
    assert data["images"] == ["LDCT", "NDCT", *methods]
    assert data["n_cases"] == {"anatomy": 1, "qa": 1}
    assert set(data["per_case"]) == {"body/sim0001", "qa/sim0001"}
    anatomy, qa = data["anatomy"], data["qa"]
    # Quarter dose: about twice the full-dose noise, whatever the region.
    assert 1.5 < anatomy["LDCT"]["noise_std"] / anatomy["NDCT"]["noise_std"] < 2.7
    assert 1.5 < qa["LDCT"]["noise_std_uniform"] / qa["NDCT"]["noise_std_uniform"] < 2.7
    assert anatomy["LDCT"]["rmse_vs_truth"] > anatomy["NDCT"]["rmse_vs_truth"]
    assert qa["NDCT"]["cnr_mean"] > qa["LDCT"]["cnr_mean"]
    assert qa["NDCT"]["insert_max_abs_bias"] < 12.0
    # Blending 30 % of the input moves every metric from the method toward the LDCT.
    for key in ("rmse_vs_ndct", "ssim_vs_ndct"):
        lo, hi = sorted((anatomy["C"][key], anatomy["LDCT"][key]))
        assert lo - 1e-6 <= anatomy["C, blend 0.3"][key] <= hi + 1e-6, key
    if HAVE_BM3D:
        assert qa["BM3D"]["noise_std_uniform"] < 0.8 * qa["LDCT"]["noise_std_uniform"]
    assert set(data["goals"]) == set(methods)
    for goals in data["goals"].values():
        assert set(goals) == {
            "noise_le_ndct",
            "cnr_ge_ndct",
            "inserts_within_5hu",
            "mtf50_ge_0.9_ndct",
            "rmse_vs_truth_le_ndct",
        }
    markdown = (report / "report.md").read_text()
    assert "| NDCT |" in markdown and "## QA phantom" in markdown and "teflon" in markdown
    # Figure: LDCT | NDCT | methods, images over differences, one block per case kind.
    with Image.open(report / "figure.png") as figure:
        assert figure.size == (256 * len(data["images"]), 2 * (64 + 16) + 2 * (256 + 16))
        pixels = np.asarray(figure)
    assert pixels.std() > 10  # not blank


def test_evaluate_usage_errors(heldout: Path, untrained_weights: Path, tmp_path: Path) -> None:
    res = run_cli("evaluate", "--ldct", tmp_path / "nope", "--reference", heldout)
    assert res.returncode == 2 and "--ldct" in res.stderr
    res = run_cli("evaluate", "--ldct", heldout, "--reference", heldout, "--weights", tmp_path)
    assert res.returncode == 2 and "MANIFEST.json" in res.stderr
    # Paths in errors are shown as they are, [brackets] included.
    odd = tmp_path / "[run 2]"
    res = run_cli("evaluate", "--ldct", heldout, "--reference", heldout, "--weights", odd)
    assert res.returncode == 2 and f"{odd} has no MANIFEST.json" in res.stderr.replace("\n", "")
    args = ["evaluate", "--ldct", heldout, "--reference", heldout]
    res = run_cli(*args, "--weights", untrained_weights, "--record-in", tmp_path)
    assert res.returncode == 2 and "--record-in" in res.stderr
    # LDCT series with no NDCT of the same frame of reference: a clear failure.
    qa_low = heldout / "qa" / "sim0001" / "quarter_dose"
    body_full = heldout / "body" / "sim0001" / "full_dose"
    args = ["evaluate", "--ldct", qa_low, "--reference", body_full]
    res = run_cli(*args, "--weights", untrained_weights, "--report", tmp_path / "r")
    assert res.returncode == 1 and "same frame of reference" in res.stderr


def test_cases_pair_across_separate_folders(heldout: Path) -> None:
    case_dir = heldout / "qa" / "sim0001"
    (case,) = load_eval_cases(case_dir / "quarter_dose", case_dir / "full_dose")
    assert case.truth is None and case.is_qa  # regions from ../simulation.json
    assert case.pixel_spacing_mm == pytest.approx(
        json.loads((heldout / "qa" / "simulation.json").read_text())["cases"][0]["pixel_spacing_mm"]
    )
    # An identity "method" measures exactly the LDCT.
    summary = evaluate([case], [Method("copy", lambda hu: hu)])
    assert summary["qa"]["copy"] == summary["qa"]["LDCT"]
    with pytest.raises(ValueError, match="unique"):
        evaluate([case], [Method("LDCT", lambda hu: hu)])


def test_noise_and_rmse_of_known_noise_levels(tmp_path: Path) -> None:
    """Series with Gaussian noise of known sigma: the report measures those sigmas."""
    rng = np.random.default_rng(0)
    truth = np.zeros((2, 48, 48), np.float32)
    truth[:, :4] = -1000.0
    uids = {"study_uid": generate_uid(), "frame_of_reference_uid": generate_uid()}
    # Noise is measured against a noiseless reconstruction, as `simulate --truth-recon`
    # names it.
    for name, sigma in (("truth_recon", 0.0), ("full_dose", 10.0), ("quarter_dose", 20.0)):
        vol = truth + rng.normal(0, sigma, truth.shape).astype(np.float32)
        make_ct_series(tmp_path / "c1", n=2, size=48, subdir=name, volume_hu=vol, **uids)
    cases = load_eval_cases(tmp_path, tmp_path, tmp_path)
    summary = evaluate(cases, [])
    assert summary["n_cases"]["anatomy"] == 1 and summary["n_slices"]["anatomy"] == 2
    anatomy = summary["anatomy"]
    # Stored values are integers, so the measured noise is within rounding of sigma.
    assert anatomy["NDCT"]["noise_std"] == pytest.approx(10.0, abs=1.0)
    assert anatomy["LDCT"]["noise_std"] == pytest.approx(20.0, abs=1.5)
    assert anatomy["LDCT"]["rmse_vs_ndct"] == pytest.approx(np.sqrt(10**2 + 20**2), abs=2.0)


def test_methods_of_one_name_are_told_apart_by_their_folders() -> None:
    def cascade(folder: str, blend: float = 0.0) -> Method:
        name = "C" if blend == 0 else f"C, blend {blend:g}"
        return Method(name, lambda hu: hu, info={"weights": folder, "blend": blend})

    methods = [
        cascade("/w/runs/C"),
        cascade("/w/runs/C", 0.3),
        cascade("/w/old/C"),
        cascade("/w/old/C", 0.3),
        cascade("/w/init"),
        Method("BM3D", lambda hu: hu),
    ]
    distinguish_names(methods)
    assert [m.name for m in methods] == [
        "C [runs/C]",
        "C, blend 0.3 [runs/C]",
        "C [old/C]",
        "C, blend 0.3 [old/C]",
        "C [init]",
        "BM3D",
    ]


def test_goal_checks_compare_with_the_ndct() -> None:
    summary = {
        "anatomy": {
            "NDCT": {"noise_std": 13.0, "rmse_vs_truth": 13.0},
            "good": {"noise_std": 12.0, "rmse_vs_truth": 11.0},
            "smooth": {"noise_std": 8.0, "rmse_vs_truth": 14.0},
        },
        "qa": {
            "NDCT": {"noise_std_uniform": 11.0, "cnr_mean": 1.0, "mtf50": 0.40},
            "good": {
                "noise_std_uniform": 10.0,
                "cnr_mean": 1.1,
                "mtf50": 0.37,
                "insert_max_abs_bias": 4.0,
            },
            "smooth": {
                "noise_std_uniform": 6.0,
                "cnr_mean": 1.5,
                "mtf50": 0.35,
                "insert_max_abs_bias": 7.0,
            },
        },
    }
    assert all(goal_checks(summary, "good").values())
    smooth = goal_checks(summary, "smooth")
    assert smooth["noise_le_ndct"] and smooth["cnr_ge_ndct"]
    assert smooth["inserts_within_5hu"] is False
    assert smooth["mtf50_ge_0.9_ndct"] is False  # 0.35 < 0.9 x 0.40
    assert smooth["rmse_vs_truth_le_ndct"] is False
    summary["qa"] = {}
    assert goal_checks(summary, "good")["cnr_ge_ndct"] is None  # not measured


def test_noise_estimate_of_white_noise() -> None:
    rng = np.random.default_rng(4)
    assert estimate_noise_hu(rng.normal(40.0, 20.0, (2, 128, 128))) == pytest.approx(20.0, rel=0.05)
