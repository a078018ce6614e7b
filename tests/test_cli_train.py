"""`ldct-node simulate` then `ldct-node train` through the real CLI (a tiny smoke run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_VGG, run_cli


@pytest.mark.skipif(not SHARED_VGG.is_file(), reason="VGG16 weights not in ../shared")
def test_simulate_then_train_writes_loadable_weights(tmp_path: Path) -> None:
    data = tmp_path / "sim"
    res = run_cli("simulate", "--output", data, "--cases", "2", "--slices", "1", "--size", "96")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (data / "sim0001").iterdir()) == [
        "full_dose",
        "quarter_dose",
        "truth",
    ]
    out = tmp_path / "w"
    args = ["train", "--data", data, "--output", out, "--epochs-perceptual", "1"]
    args += ["--epochs-difference", "1", "--batch-size", "4", "--vgg-weights", SHARED_VGG]
    res = run_cli(*args, "--patch-stride", "16", "--val-fraction", "0.5")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["data"]["simulation"]["dose_fraction"] == 0.25
    assert manifest["recipe"]["perceptual_weight"] == 0.1
    assert manifest["networks"]["perceptual"]["parameters"] == 225601

    # The new weights drive `denoise` on the simulated low-dose series.
    res = run_cli(
        "denoise", data / "sim0002" / "quarter_dose", "--output", tmp_path / "o", "--weights", out
    )
    assert res.returncode == 0, res.stderr


def test_train_usage_errors(tmp_path: Path) -> None:
    res = run_cli(
        "train",
        "--data",
        tmp_path / "nope",
        "--output",
        tmp_path / "o",
        "--vgg-weights",
        tmp_path / "missing.h5",
    )
    assert res.returncode == 2 and "--vgg-weights" in res.stderr
    res = run_cli("train", "--data", tmp_path / "nope", "--output", tmp_path / "o")
    assert res.returncode == 2 and "--data" in res.stderr
    res = run_cli("simulate", "--output", tmp_path / "s", "--geometry", "cone")
    assert res.returncode == 2 and "--geometry" in res.stderr
