"""Shared fixtures: weights folders for inference tests, the VGG file, quiet TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
SHARED_VGG = REPO.parent / "shared" / "vgg16" / "vgg16_imagenet_notop.weights.h5"
BUNDLED_WEIGHTS = REPO / "weights"


def run_cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``ldct-node ARGS...`` in a fresh interpreter, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "ldct_node.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_python(
    code: str,
    *args: str | Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``ARGS...`` (``sys.argv[1:]``) in a fresh interpreter: what a
    test must see from a process start, such as TensorFlow's first import or the
    allocator's state. ``env`` replaces the environment (default: this one's)."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def write_weights_dir(
    folder: Path, *, seed: int = 0, model_version: str = "test-untrained"
) -> Path:
    """Save freshly initialised (untrained) cascade networks with a valid MANIFEST.json.

    For tests of plumbing (shapes, tags, files), not of image quality: the output
    differs from the input by up to a few hundred HU.
    """
    import keras

    from ldct_node.model.manifest import MANIFEST_FORMAT, sha256_file
    from ldct_node.model.networks import build_drl_difference, build_drl_perceptual

    keras.utils.set_random_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    networks = {}
    for role, builder, name in (
        ("perceptual", build_drl_perceptual, "drl_perceptual"),
        ("difference", build_drl_difference, "drl_difference"),
    ):
        net = builder()
        # The output conv starts at zero (an untrained cascade would be the identity);
        # random head weights make the test cascade change pixels, so tests can tell
        # "denoised" from "copied".
        rng = np.random.default_rng(seed)
        head = net.get_layer("conv7")
        kernel, bias = head.get_weights()
        head.set_weights([rng.uniform(-0.07, 0.07, kernel.shape).astype(np.float32), bias])
        file = folder / f"{name}.weights.h5"
        net.save_weights(str(file))
        networks[role] = {
            "builder": name,
            "file": file.name,
            "sha256": sha256_file(file),
            "parameters": net.count_params(),
        }
    manifest = {"format": MANIFEST_FORMAT, "model_version": model_version, "networks": networks}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.fixture(scope="session")
def untrained_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_weights_dir(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A throwaway PostgreSQL server for the session (skipped where not installed)."""
    from _pg_util import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """The SQLAlchemy URL of a new, empty PostgreSQL database."""
    return str(pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}"))
