"""The two-stage trainer on a tiny real dataset: it lowers the loss, checkpoints, resumes."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _dicom_util import make_ct_series, make_ct_volume
from _vgg_util import random_vgg_like_extractor

from ldct_node.lab.data import DataError, extract_patches, find_cases, load_case
from ldct_node.lab.train import TrainOptions, train
from ldct_node.model.cascade import Cascade


def _paired_data(root: Path, cases: int = 3, size: int = 64, n: int = 2) -> Path:
    for c in range(cases):
        truth = make_ct_volume(n, size, seed=c, noise_hu=0.0)
        rng = np.random.default_rng(100 + c)
        make_ct_series(
            root / f"case{c}",
            n,
            size,
            subdir="full_dose",
            volume_hu=truth + rng.normal(0, 5, truth.shape).astype(np.float32),
            seed=c,
        )
        make_ct_series(
            root / f"case{c}",
            n,
            size,
            subdir="quarter_dose",
            volume_hu=truth + rng.normal(0, 150, truth.shape).astype(np.float32),
            seed=c,
        )
    return root


def _losses(csv_path: Path) -> list[float]:
    with csv_path.open() as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_patches_exclude_air() -> None:
    vol = np.full((1, 128, 128), -1000.0, np.float32)
    vol[0, :64, :64] = 40.0
    low, full = extract_patches(vol, vol, patch_size=64, stride=32)
    # Patches at (0,0), (0,32), (32,0) are 0%, 50%, 50% air: kept; (32,32) is 75% air.
    assert low.shape[1:] == (64, 64, 1) and len(low) == 3
    assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0
    with pytest.raises(ValueError, match="patch_size"):
        extract_patches(vol[:, :32, :32], vol[:, :32, :32], patch_size=64)


def test_find_cases_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no <case>"):
        find_cases(tmp_path)
    (tmp_path / "p1" / "full_1mm").mkdir(parents=True)
    with pytest.raises(DataError, match="one full_"):
        find_cases(tmp_path)


def test_tiny_training_run_lowers_loss_and_resumes(tmp_path: Path) -> None:
    data = _paired_data(tmp_path / "data")
    cases = find_cases(data)
    assert [c.case_id for c in cases] == ["case0", "case1", "case2"]
    pair = load_case(cases[0])
    assert pair.ldct.shape == pair.ndct.shape == (2, 64, 64)

    out = tmp_path / "run"
    extractor = random_vgg_like_extractor(seed=0)
    opts = TrainOptions(
        data_dir=data,
        output_dir=out,
        epochs_perceptual=6,
        epochs_difference=6,
        batch_size=4,
        # Small: the output convs start at zero, and Adam's first steps move every weight
        # by about lr whatever its gradient; a few dozen steps must not be spent undoing that.
        learning_rate=2e-5,
        stride=16,
        val_fraction=0.34,
        verbose=0,
    )
    manifest = train(opts, vgg_extractor=extractor)

    stage1, stage2 = _losses(out / "logs" / "stage1.csv"), _losses(out / "logs" / "stage2.csv")
    assert len(stage1) == 6 and len(stage2) == 6
    assert stage1[-1] < stage1[0], stage1
    assert stage2[-1] < stage2[0], stage2

    written = json.loads((out / "MANIFEST.json").read_text())
    assert written == manifest
    assert written["recipe"]["epochs_perceptual"] == 6
    assert written["data"]["validation_cases"] and written["data"]["train_cases"]
    assert written["metrics"]["patches_validation"]["n_patches"] > 0
    # Only the networks' own weights: no optimizer state, no VGG extractor from the loss.
    import h5py

    for name in ("drl_perceptual", "drl_difference"):
        with h5py.File(out / f"{name}.weights.h5") as h5:
            assert sorted(h5.keys()) == ["layers", "vars"]
    # What the trainer writes is what inference loads.
    cascade = Cascade.load(out)
    assert cascade.model_version == manifest["model_version"]
    assert cascade.denoise(pair.ldct).shape == (2, 64, 64)

    # A second run into the same folder must be explicit.
    with pytest.raises(FileExistsError, match="--resume"):
        train(opts, vgg_extractor=extractor)

    # Resume with more epochs: continues from the checkpoints, appends to the logs.
    opts.resume = True
    opts.epochs_difference = 8
    train(opts, vgg_extractor=extractor)
    assert len(_losses(out / "logs" / "stage1.csv")) == 6
    assert len(_losses(out / "logs" / "stage2.csv")) == 8


def test_case_ids_are_relative_paths(tmp_path: Path) -> None:
    # Two simulations side by side both number their cases from case0: still distinct.
    _paired_data(tmp_path / "body", cases=2)
    _paired_data(tmp_path / "qa", cases=2)
    ids = [c.case_id for c in find_cases(tmp_path)]
    assert ids == ["body/case0", "body/case1", "qa/case0", "qa/case1"]


def test_simulation_provenance_of_side_by_side_simulations(tmp_path: Path) -> None:
    from ldct_node.lab.simulation import SimulationParameters, simulate_dataset
    from ldct_node.lab.train import simulation_provenance

    assert simulation_provenance(tmp_path) is None
    common = SimulationParameters(n_cases=1, slices_per_case=1, size=64)
    simulate_dataset(tmp_path / "body", replace(common, seed=1), progress=False)
    simulate_dataset(tmp_path / "qa", replace(common, seed=2, phantom_kind="qa"), progress=False)
    both = simulation_provenance(tmp_path)
    assert both is not None and sorted(both) == ["body", "qa"]
    assert both["qa"]["phantom_kind"] == "qa" and both["body"]["seed"] == 1
    # Per-slice object lists stay out of the manifest; the case records stay in.
    assert both["qa"]["cases"][0]["case_id"] == "sim0001"
    assert "slices" not in both["qa"]["cases"][0]
    one = simulation_provenance(tmp_path / "qa")
    assert one is not None and one["phantom_kind"] == "qa"


def test_calibrated_perceptual_norm_is_recorded(tmp_path: Path) -> None:
    data = _paired_data(tmp_path / "data")
    opts = TrainOptions(
        data_dir=data,
        output_dir=tmp_path / "run",
        epochs_perceptual=1,
        epochs_difference=0,
        batch_size=4,
        learning_rate=2e-5,
        stride=16,
        val_fraction=0.34,
        perceptual_norm="calibrated",
        verbose=0,
    )
    manifest = train(opts, vgg_extractor=random_vgg_like_extractor(seed=0))
    assert manifest["recipe"]["perceptual_norm"] == "calibrated"
    scale = manifest["data"]["perceptual_scale"]["stage1"]
    assert scale > 0
    # The loss logged in epoch 1 is the MSE plus a term of MSE size (0.1 x MSE at the
    # LDCT's distance from the target), not one a million times larger.
    with (tmp_path / "run" / "logs" / "stage1.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert float(row["mse"]) < float(row["loss"]) < 3 * float(row["mse"])
    with pytest.raises(ValueError, match="perceptual_norm"):
        TrainOptions(data_dir=data, output_dir=tmp_path / "x", perceptual_norm="l2").validate()
