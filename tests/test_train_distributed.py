"""`ldct-node train --distributed`: MirroredStrategy smoke test on two logical CPU devices.

TensorFlow's CPU can be split into logical devices only before TensorFlow starts, so the
CLI runs in a fresh interpreter that splits it first; MirroredStrategy then trains with
one replica per logical CPU, as it would with one per GPU.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from conftest import SHARED_VGG, run_cli, run_python

pytestmark = pytest.mark.skipif(not SHARED_VGG.is_file(), reason="VGG16 weights not in ../shared")

_TWO_CPUS = textwrap.dedent(
    """
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    from ldct_node.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_distributed_training_on_two_logical_cpus(tmp_path: Path) -> None:
    data = tmp_path / "sim"
    res = run_cli("simulate", "--output", data, "--cases", "2", "--slices", "1", "--size", "96")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "w"
    args = ["train", "--data", data, "--output", out, "--distributed"]
    args += ["--epochs-perceptual", "1", "--epochs-difference", "1", "--batch-size", "4"]
    args += ["--vgg-weights", SHARED_VGG, "--patch-stride", "16", "--val-fraction", "0.5"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
    res = run_python(_TWO_CPUS, *args, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in res.stderr, res.stderr[-3000:]
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["recipe"]["distributed"] is True
    assert all(len(epochs) == 1 for epochs in manifest["history"].values())
    assert all(
        v == v and abs(v) != float("inf")  # finite losses: the replicas' gradients combined
        for epoch in manifest["history"]["stage1"]
        for v in epoch.values()
    )
    # The weights trained on two replicas load and denoise like any others.
    res = run_cli(
        "denoise", data / "sim0002" / "quarter_dose", "--output", tmp_path / "o", "--weights", out
    )
    assert res.returncode == 0, res.stderr


def test_distributed_refuses_a_batch_smaller_than_the_replicas(tmp_path: Path) -> None:
    # Refused before any data is read: an empty folder will do.
    args = ["train", "--data", tmp_path, "--output", tmp_path / "w", "--distributed"]
    args += ["--batch-size", "1", "--vgg-weights", SHARED_VGG]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
    res = run_python(_TWO_CPUS, *args, env=env, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "batch_size: 1 is smaller than the 2 replicas" in res.stderr
