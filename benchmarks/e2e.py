"""End-to-end benchmark: last C-STORE in -> last derived instance at the destination.

DCMTK ``storescu`` sends an ``--slices``-slice CT series (512x512) to ``ldct-node
serve``, whose only destination is a DCMTK ``storescp``. The clock starts when
storescu has its last C-STORE answered and stops when storescp holds every derived
instance. The node then waits ``stable_seconds`` on purpose, so that is subtracted:

    ratio = (end-to-end - stable_seconds) / model time alone

Model time alone is the cascade on the same slices in this process, same precision
and batch size, timed after the node run (never concurrently). The rest is broken
down by timing each stage in-process on the same files: read + decode, derive +
write, send to storescp; then what ``ldct-node denoise`` runs (``run_denoise``: load
the weights, read, denoise, write), whose slices/s over the engine's are printed with
and without the loading.

    .venv/bin/python benchmarks/e2e.py                        # 64 slices, float32
    .venv/bin/python benchmarks/e2e.py --precision bfloat16 --json e2e.json

Where DCMTK cannot be installed (the GPU machine, ``benchmarks/gpu/run.sh``), ``--peers
python`` sends with pynetdicom's own storescu and receives with its storescp; "auto"
(the default) takes DCMTK's when they are on PATH and says which it used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)

from _common import (  # noqa: E402
    BUNDLED_WEIGHTS,
    PEER_CHOICES,
    need_tools,
    node_process,
    report,
    storescp,
    storescu,
    use_peers,
    wait_until,
    write_series,
)


def stage_times(
    files: list[Path], work: Path, *, model: dict[str, Any], port: int
) -> dict[str, float]:
    """Seconds of each stage for the whole series, run one after the other in-process."""
    import numpy as np

    from ldct_node.config import Destination, DicomSettings, OutputProfile, Settings
    from ldct_node.dicom.derive import derive_instance, write_derived
    from ldct_node.dicom.io import decode_hu, read_instance
    from ldct_node.model.cascade import Cascade
    from ldct_node.offline import run_denoise
    from ldct_node.pipeline import denoise_series
    from ldct_node.service.forward import send_series

    loading = time.perf_counter()
    batch_size = int(model["batch_size"])
    # The engine alone, as inference.py runs it: no memory budget.
    cascade = Cascade.load(
        BUNDLED_WEIGHTS, batch_size=batch_size, precision=model["precision"], device=model["device"]
    )
    t0 = time.perf_counter()
    datasets = [read_instance(f) for f in files]
    hu = np.stack([decode_hu(ds) for ds in datasets])
    t1 = time.perf_counter()
    cascade.denoise(hu[:batch_size])  # warm-up (tracing), not timed
    t2 = time.perf_counter()
    denoised = cascade.denoise(hu)
    t3 = time.perf_counter()
    sequential = work / "sequential"
    sequential.mkdir()
    profile, dicom = OutputProfile(), DicomSettings()
    for ds, out in zip(datasets, denoised, strict=True):
        write_derived(
            derive_instance(ds, out, profile=profile, model_version="bench", dicom=dicom),
            sequential,
        )
    t4 = time.perf_counter()
    written = denoise_series(datasets, cascade, [profile], dicom, work / "pipelined")
    t5 = time.perf_counter()
    dest = Destination(name="bench", ae_title="PACS", host="127.0.0.1", port=port)
    result = send_series(written[0].paths, dest, calling_ae_title="LDCT_NODE")
    t6 = time.perf_counter()
    if not result.ok:
        raise RuntimeError(f"send failed: {result.error}")
    # What `ldct-node denoise FILES --output DIR` runs, whole: load the weights, read,
    # denoise (the first call traces the graph), write.
    settings = Settings.model_validate({"model": model})
    t6b = time.perf_counter()
    summary = run_denoise(files, work / "offline", settings=settings, weights_dir=BUNDLED_WEIGHTS)
    t7 = time.perf_counter()
    if summary.failed:
        raise RuntimeError(f"denoise failed: {summary.lines()}")
    return {
        "load weights": t0 - loading,
        "read+decode": t1 - t0,
        "model": t3 - t2,
        "derive+write": t4 - t3,
        "sum of the three": (t1 - t0) + (t3 - t2) + (t4 - t3),
        "denoise_series (pipelined, decode..write)": t5 - t4,
        "send": t6 - t5,
        "ldct-node denoise (run_denoise, load..write)": t7 - t6b,
        # Measured inside that run, so the ratio without loading subtracts its own load.
        "  of which loading the weights": summary.load_seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu"])
    parser.add_argument(
        "--memory-budget-mb", type=float, help="model.memory_budget_mb (default: the config's)"
    )
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument(
        "--peers", choices=PEER_CHOICES, default="auto", help="sender and destination"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    peers = use_peers(args.peers)
    model_config: dict[str, Any] = {
        "precision": args.precision,
        "batch_size": args.batch_size,
        "device": args.device,
    }
    if args.memory_budget_mb is not None:
        model_config["memory_budget_mb"] = args.memory_budget_mb
    need_tools("storescu", "storescp", "echoscu")

    work = Path(tempfile.mkdtemp(prefix="ldct-e2e-", dir=args.workdir))
    try:
        files = write_series(work / "source", args.slices, args.size)
        print(
            f"{args.slices} slices of {args.size}x{args.size}, precision {args.precision}, "
            f"batch {args.batch_size}, device {args.device}, "
            f"stable_seconds {args.stable_seconds:g}, {peers} storescu / storescp"
        )
        received = work / "pacs" / "in"
        with storescp(received) as pacs_port:
            destination = {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs_port,
            }
            with node_process(
                work / "node",
                stable_seconds=args.stable_seconds,
                model=model_config,
                destinations=[destination],
            ) as (port, log):
                storescu(port, "LDCT_NODE", files)
                last_store = time.perf_counter()
                wait_until(
                    lambda: sum(1 for p in received.iterdir() if p.is_file()) >= args.slices,
                    args.timeout,
                    f"{args.slices} derived instances at storescp (node log: {log})",
                )
                end_to_end = time.perf_counter() - last_store
            for p in received.iterdir():
                p.unlink()
            stages = stage_times(files, work, model=model_config, port=pacs_port)
        model = stages["model"]
        ratio = (end_to_end - args.stable_seconds) / model
        print(f"end to end (last C-STORE -> last derived at storescp): {end_to_end:.2f} s")
        print(f"model alone: {model:.2f} s ({args.slices / model:.2f} slices/s)")
        print(f"(end to end - stable_seconds) / model: {ratio:.3f}")
        # The node's throughput from the last C-STORE in, without the wait it makes on
        # purpose (what a GPU's ">= 0.5 x the engine's slices/s" compares).
        e2e_rate = args.slices / max(end_to_end - args.stable_seconds, 1e-9)
        print(f"end to end without stable_seconds: {e2e_rate:.2f} slices/s")
        denoise = stages["ldct-node denoise (run_denoise, load..write)"]
        denoise_ratios = {
            # slices/s of `denoise` over the engine's (model alone), same batch, precision
            "denoise_vs_engine": model / denoise,
            "denoise_vs_engine_without_loading": model
            / (denoise - stages["  of which loading the weights"]),
            "pipelined_series_vs_engine": model
            / stages["denoise_series (pipelined, decode..write)"],
        }
        for name, value in denoise_ratios.items():
            print(f"ratio {name:36s} {value:.3f}")
        print("stages in-process, one after the other (s):")
        for name, seconds in stages.items():
            print(f"  {name:44s} {seconds:7.2f}")
        result = {
            "slices": args.slices,
            "size": args.size,
            "precision": args.precision,
            "batch_size": args.batch_size,
            "device": args.device,
            "memory_budget_mb": args.memory_budget_mb,
            "stable_seconds": args.stable_seconds,
            "peers": peers,
            "end_to_end_s": end_to_end,
            "end_to_end_slices_per_s": e2e_rate,
            "model_s": model,
            "ratio": ratio,
            "denoise_ratios": denoise_ratios,
            "stages_s": stages,
        }
        report("e2e", result, args.json)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    # As the node's commands run (ldct_node.malloc); LDCT_NODE_HUGE_PAGES=0 for without.
    from ldct_node.malloc import reexec_with_huge_pages

    reexec_with_huge_pages()
    main()
