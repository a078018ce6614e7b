"""Forward benchmark: the node's C-STORE SCU against DCMTK ``storescu``.

The same ``--images`` CT files (512x512, uncompressed) go over one association on
loopback to DCMTK ``storescp`` (and to Orthanc where installed), in turn, ``--repeats``
times; the best run of each counts. Senders: DCMTK ``storescu`` with ``TCP_NODELAY=1``
(the anchor) and the node's forwarder, :func:`ldct_node.service.forward.send_series`,
exactly as a job's forward runs it, over one association and over ``--associations``
at once (a destination's ``associations``; DCMTK's storescp serves one at a time).

    .venv/bin/python benchmarks/forward.py                 # 200 images, 2 repeats
    .venv/bin/python benchmarks/forward.py --images 50 --json forward.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)

from _common import (  # noqa: E402
    LOOPBACK,
    ORTHANC_BIN,
    machine_info,
    need_tools,
    orthanc_process,
    report,
    storescp,
    storescu,
    write_series,
)


def node_send(port: int, ae_title: str, files: list[Path], associations: int = 1) -> float:
    """Send ``files`` with the node's forwarder over ``associations`` associations at
    once (the destination's ``associations``); its wall time."""
    from ldct_node.config import Destination
    from ldct_node.service.forward import send_series

    destination = Destination(
        name="bench", ae_title=ae_title, host=LOOPBACK, port=port, associations=associations
    )
    start = time.perf_counter()
    result = send_series(files, destination, calling_ae_title="BENCH")
    elapsed = time.perf_counter() - start
    if not result.ok:
        raise RuntimeError(f"send_series failed: {result.error}")
    return elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--associations",
        type=int,
        default=4,
        help="also send over this many associations at once (a destination's associations)",
    )
    parser.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc receiver")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    need_tools("storescu", "storescp", "echoscu")
    work = Path(tempfile.mkdtemp(prefix="ldct-forward-", dir=args.workdir))
    try:
        files = write_series(work / "source", args.images, args.size)
        mbytes = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"{len(files)} images of {args.size}x{args.size} ({mbytes:.0f} MB), "
            f"{args.repeats} repeats, DCMTK tools with TCP_NODELAY=1; {machine_info()['cpu']}"
        )
        receivers: dict[str, tuple[Callable[[Path], AbstractContextManager[int]], str]] = {
            "storescp": (lambda folder: storescp(folder / "in"), "PACS"),
        }
        if not args.no_orthanc and ORTHANC_BIN is not None:
            receivers["orthanc"] = (lambda folder: orthanc_process(folder), "ORTHANC")
        senders: dict[str, Callable[[int, str, list[Path]], float]] = {
            "storescu": storescu,
            "ldct-node": node_send,
        }
        many = args.associations
        if many > 1:
            senders[f"ldct-node x{many}"] = lambda port, aet, fs: node_send(port, aet, fs, many)
        best: dict[str, float] = {}
        for rep in range(args.repeats):  # interleaved: every pair once per repeat
            for receiver, (start, ae_title) in receivers.items():
                for sender, send in senders.items():
                    folder = work / f"{receiver}-{sender}-{rep}"
                    with start(folder) as port:
                        elapsed = send(port, ae_title, files)
                    key = f"{sender} -> {receiver}"
                    best[key] = min(best.get(key, float("inf")), elapsed)
                    # The folder stays until the end: deleting it would make the next
                    # receiver's file creations dearer (see ingest.py).
        rates = {name: len(files) / seconds for name, seconds in best.items()}
        for name, rate in rates.items():
            print(f"{name:26s} {rate:8.1f} images/s")
        ratios = {
            f"node_vs_storescu_to_{receiver}": rates[f"ldct-node -> {receiver}"]
            / rates[f"storescu -> {receiver}"]
            for receiver in receivers
        }
        if many > 1:
            for receiver in receivers:
                ratios[f"node_x{many}_vs_one_to_{receiver}"] = (
                    rates[f"ldct-node x{many} -> {receiver}"] / rates[f"ldct-node -> {receiver}"]
                )
        for name, value in ratios.items():
            print(f"ratio {name:30s} {value:.2f}")
        result = {
            "images": len(files),
            "size": args.size,
            "seconds": best,
            "images_per_s": rates,
            "ratios": ratios,
        }
        report("forward", result, args.json)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
