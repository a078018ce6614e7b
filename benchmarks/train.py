"""Training benchmark: patches/s of each stage of the two-stage trainer.

Stage 1 is the perceptual DRL (MSE + 0.1 x VGG16 perceptual loss, the expensive
one); stage 2 the difference DRL with MSE. Both are compiled exactly as
``ldct-node train`` compiles them and fed ``--batch-size`` random 64x64 patches;
the first ``--warmup`` steps (tracing) are not timed.

    .venv/bin/python benchmarks/train.py                       # VGG from ../shared
    .venv/bin/python benchmarks/train.py --vgg-weights imagenet --steps 20 --json train.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import numpy as np  # noqa: E402
from _common import REPO, report  # noqa: E402

SHARED_VGG = REPO.parent / "shared" / "vgg16" / "vgg16_imagenet_notop.weights.h5"


def time_stage(model: Any, x: np.ndarray, y: np.ndarray, steps: int, warmup: int) -> float:
    """Patches per second of ``model.train_on_batch`` over ``steps`` timed steps."""
    batch = len(x)
    for _ in range(warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--vgg-weights", default=str(SHARED_VGG), help="'imagenet' or a .weights.h5 file"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import keras

    from ldct_node.lab.losses import load_vgg_extractor, make_perceptual_mse_loss
    from ldct_node.model.networks import build_drl_difference, build_drl_perceptual

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.patch, args.patch, 1)
    ldct = rng.uniform(0.2, 0.35, shape).astype(np.float32)
    ndct = (ldct + rng.normal(0, 0.002, shape)).astype(np.float32)
    extractor = load_vgg_extractor(args.vgg_weights)
    net1 = build_drl_perceptual()
    net1.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=make_perceptual_mse_loss(extractor),
        metrics=["mse"],
    )
    net2 = build_drl_difference()
    net2.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    rates = {
        "stage1_perceptual": time_stage(net1, ldct, ndct, args.steps, args.warmup),
        "stage2_difference": time_stage(net2, ldct, ldct - ndct, args.steps, args.warmup),
    }
    print(
        f"backend {keras.backend.backend()}, batch {args.batch_size} of {args.patch}x{args.patch}"
    )
    for name, rate in rates.items():
        print(f"{name:18s} {rate:8.1f} patches/s")
    print(
        "stage1 / stage2 time per patch: "
        f"{rates['stage2_difference'] / rates['stage1_perceptual']:.2f}"
    )
    result = {"batch_size": args.batch_size, "patch": args.patch, "patches_per_s": rates}
    report("train", result, args.json)
    return result


if __name__ == "__main__":
    # As the node's commands run (ldct_node.malloc); LDCT_NODE_HUGE_PAGES=0 for without.
    from ldct_node.malloc import reexec_with_huge_pages

    reexec_with_huge_pages()
    main()
