"""The CT quality-assurance phantom: exact truth, and metrics measurable on its scans."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldct_node.lab.evaluation import load_eval_cases, qa_metrics
from ldct_node.lab.metrics import disc_mask
from ldct_node.lab.simulation import (
    QA_INSERTS,
    QA_LOW_CONTRAST_HU,
    QA_LOW_CONTRAST_MM,
    SimulationParameters,
    make_phantom,
    simulate_dataset,
)


def test_qa_phantom_objects_have_their_nominal_hu() -> None:
    phantom = make_phantom(256, np.random.default_rng(5), kind="qa")
    image = phantom.image
    by_kind: dict[str, list] = {}
    for region in phantom.regions:
        by_kind.setdefault(region.kind, []).append(region)
    assert [(r.name, r.hu) for r in by_kind["insert"]] == list(QA_INSERTS)
    assert min(r.hu for r in by_kind["insert"]) == -1000.0
    assert max(r.hu for r in by_kind["insert"]) >= 950.0
    assert sorted(r.diameter_mm for r in by_kind["low_contrast"]) == sorted(QA_LOW_CONTRAST_MM)
    assert min(QA_LOW_CONTRAST_MM) == 3.0 and max(QA_LOW_CONTRAST_MM) == 15.0
    for region in phantom.regions:
        if region.kind == "phantom":
            continue
        # Inside each object (away from its anti-aliased edge) the truth is exact.
        core = disc_mask(image.shape, region.row, region.col, max(0.6 * region.radius_px, 0.8))
        assert core.sum() >= 1, region.name
        assert np.all(image[core] == region.hu), region.name
        assert region.radius_px == pytest.approx(region.diameter_mm / 2 / phantom.pixel_spacing_mm)
    for region in by_kind["low_contrast"]:
        assert region.hu - region.background_hu == QA_LOW_CONTRAST_HU
    # The objects do not overlap: every object's pixels carry its own label.
    assert phantom.masks["insert"].sum() > 0 and phantom.masks["low_contrast"].sum() > 0
    assert not np.any(phantom.masks["insert"] & phantom.masks["edge"])
    uniform = phantom.masks["uniform"]
    assert uniform.sum() > 300 and np.all(image[uniform] == 0.0)
    assert np.all(phantom.masks["water"][uniform])
    # Air outside, water cylinder 190-230 mm.
    assert 190.0 <= phantom.params["diameter_mm"] <= 230.0
    assert image[0, 0] == -1000.0
    # Same seed, same phantom at any z; another seed, another placement.
    again = make_phantom(256, np.random.default_rng(5), kind="qa", slice_z=30.0)
    assert np.array_equal(again.image, image)
    other = make_phantom(256, np.random.default_rng(6), kind="qa")
    assert not np.array_equal(other.image, image)


def test_simulated_qa_scans_give_measurable_quality(tmp_path: Path) -> None:
    data = tmp_path / "qa"
    parameters = SimulationParameters(
        n_cases=1,
        slices_per_case=2,
        size=256,  # clinical pixels (~1 mm): a 12 mm insert is 11 pixels across
        seed=4,
        phantom_kind="qa",
        write_truth_recon=True,
    )
    simulate_dataset(data, parameters, progress=False)
    record = json.loads((data / "simulation.json").read_text())["cases"][0]
    assert record["source"] == "phantom:qa" and len(record["slices"]) == 2
    kinds = {r["kind"] for r in record["slices"][0]["regions"]}
    assert kinds == {"phantom", "uniform", "insert", "low_contrast", "edge"}

    (case,) = load_eval_cases(data, data, data)
    assert case.is_qa and case.truth_kind == "truth_recon"
    assert case.ldct.shape == case.ndct.shape == case.truth.shape == (2, 256, 256)
    low, full, truth = (qa_metrics(img, case) for img in (case.ldct, case.ndct, case.truth))
    # A quarter of the dose: about twice the noise in the uniform region.
    assert 1.6 < low["noise_std_uniform"] / full["noise_std_uniform"] < 2.6
    assert truth["noise_std_uniform"] < 0.3 * full["noise_std_uniform"]
    # FBP is linear: the edge's MTF does not depend on the dose (noise only).
    for result in (low, full, truth):
        assert 0.05 < result["mtf50"] < 1.0 / (2 * case.pixel_spacing_mm)
    assert low["mtf50"] == pytest.approx(full["mtf50"], rel=0.1)
    # The noiseless reconstruction's inserts are at their nominal HU; the scans' within noise.
    assert truth["insert_max_abs_bias"] < 3.0
    assert full["insert_max_abs_bias"] < 12.0
    assert set(full["insert_bias"]) == {name for name, _ in QA_INSERTS}
    # The 1 % discs stand out more at full dose.
    assert truth["cnr_mean"] > full["cnr_mean"] > low["cnr_mean"]
