"""Ingest benchmark: C-STORE images/s into ldct-node against honest anchors.

Every receiver gets the same ``--images`` CT files (512x512, uncompressed) from DCMTK
``storescu`` over one association on loopback, in turn, ``--repeats`` times; the best
run of each counts. The anchors, measured in the same run: DCMTK ``storescp`` (writes
without fsync), ``storescp --ignore`` (receives and answers, writes nothing), Orthanc
(its own SQLite index), and this disk's durable limit (one file write + fsync + rename
and one SQLite WAL FULL commit per instance, the least the node must do before it
acknowledges).

Over one association the sender waits for each response before it sends the next
instance, so the receiver's work and the disk's add to the transfer's instead of
overlapping it: no receiver that must be durable before it answers can pass
``1 / (storescp --ignore's time per instance + the disk's durable time)``. That bound,
computed from those two figures, is printed as "one-association durable ceiling" with
the node's fraction of it. DCMTK's tools run with ``TCP_NODELAY=1``: without it
each message waits ~40 ms for a delayed ACK, and any ratio to them measures that.
ldct-node runs as ``ldct-node serve --role receiver``: the receiving service as the
whole node runs it, without loading the model (nothing would be processed: the series
never becomes stable during the run), with a fresh spool and SQLite database per run. It
is measured over one association, over ``--associations`` at once, and with
``--receivers`` processes on the port (``node.reuse_port``) for the same concurrent
senders. A last part times the steps of ldct-node's C-STORE handler in-process on the
same files, to show where the time goes, and the node's CPU use while
``--associations`` established associations have nothing to do.

    .venv/bin/python benchmarks/ingest.py                 # 200 images, 2 repeats
    .venv/bin/python benchmarks/ingest.py --images 50 --json ingest.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)

from _common import (  # noqa: E402
    LOOPBACK,
    ORTHANC_BIN,
    cpu_seconds,
    durable_write_ms,
    free_port,
    interleaved,
    machine_info,
    minor_faults,
    need_tools,
    node_process,
    orthanc_process,
    pid_with_argument,
    report,
    storescp,
    storescu,
    write_series,
)

if TYPE_CHECKING:
    from ldct_node.service.pdata import IncomingStore


def as_received(path: Path) -> tuple[bytes, IncomingStore]:
    """A stored file's bytes, and its C-STORE as the receiver gets it: the data set's
    bytes after the file meta, in the file's transfer syntax."""
    from ldct_node.service.pdata import IncomingStore, read_stored

    data = path.read_bytes()
    stored = read_stored(path)
    if stored is None:
        raise ValueError(f"{path}: its file meta lacks the SOP class, instance or syntax")
    incoming = IncomingStore(
        sop_class=stored.sop_class,
        sop_instance=stored.sop_instance,
        transfer_syntax=stored.transfer_syntax,
        dataset=data[stored.offset :],
    )
    return data, incoming


def handler_breakdown(files: list[Path], work: Path) -> dict[str, float]:
    """Milliseconds per instance of each step of the C-STORE handler, in-process, in the
    handler's order: the file's fsync runs under the parse, its folder's under the
    row's statements."""
    from ldct_node.config import Settings
    from ldct_node.dicom.io import processing_skip_reason
    from ldct_node.service.receive import _read_header, slice_position
    from ldct_node.service.spool import Spool
    from ldct_node.store import Database, ReceivedInstance

    settings = Settings()
    spool = Spool(work / "spool")
    db = Database(f"sqlite:///{work / 'breakdown.db'}")
    db.create_schema()
    blobs = [as_received(f) for f in files]
    names = (
        "space check",
        "spool write, fsync started",
        "parse header",
        "fsync wait + rename",
        "db statements + folder fsync + commit",
    )
    steps = dict.fromkeys(names, 0.0)
    for data, incoming in blobs:
        t0 = time.perf_counter()
        spool.has_space(0, len(data))
        t1 = time.perf_counter()
        with spool.stage(data) as staged:
            t2 = time.perf_counter()
            ds = _read_header(data, incoming)
            sop, series = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
            skip = processing_skip_reason(ds, settings.series)
            z_position = slice_position(ds)
            t3 = time.perf_counter()
            path = staged.file_as(sop_instance_uid=sop, series_instance_uid=series)
        t4 = time.perf_counter()
        db.record_instance(
            ReceivedInstance(
                sop_instance_uid=sop,
                series_instance_uid=series,
                study_instance_uid=str(ds.StudyInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=incoming.transfer_syntax,
                path=path,
                calling_aet="BENCH",
                modality="CT",
                instance_number=int(ds.InstanceNumber),
                z_position=z_position,
                skip_reason=skip,
                size_bytes=len(data),
            ),
            ["denoised"],
            before_commit=staged.wait_durable,
        )
        t5 = time.perf_counter()
        for name, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            steps[name] += dt
    db.close()
    return {name: 1000.0 * total / len(blobs) for name, total in steps.items()}


def header_read_ms(files: list[Path], repeats: int) -> dict[str, float]:
    """Milliseconds per instance of the receiver's header read, the fast read
    (:mod:`ldct_node.dicom.header`) and pydicom's full read, on the same bytes, run in
    turn; each followed by what the handler reads from it (UIDs, the skip check, the
    routing and the slice position)."""
    from ldct_node.config import Settings
    from ldct_node.dicom.io import processing_skip_reason
    from ldct_node.service.receive import _read_header, _uid, slice_position
    from ldct_node.service.routing import matching_profiles

    settings = Settings()
    blobs = [as_received(f) for f in files]

    def read_all(fast: bool) -> None:
        for data, incoming in blobs:
            ds = _read_header(data, incoming if fast else None)
            for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                _uid(ds, keyword)
            processing_skip_reason(ds, settings.series)
            matching_profiles(ds, "BENCH", settings.outputs)
            slice_position(ds)

    best = interleaved(
        {"fast read": lambda: read_all(True), "pydicom": lambda: read_all(False)}, repeats
    )
    return {name: 1000.0 * t / len(blobs) for name, t in best.items()}


def intake_ms(folder: Path, instances: int, repeats: int) -> dict[str, float]:
    """Milliseconds of CPU per instance of the intake's commit of one instance into a
    known series (a real SQLite file, ``synchronous=FULL``), by its two paths in turn:
    intake's compiled statements on the driver's cursor (what the receiver runs) and the
    same statements through SQLAlchemy (what it runs for the other cases)."""
    from datetime import UTC, datetime

    from ldct_node.store import Database, ReceivedInstance

    db = Database(f"sqlite:///{folder / 'intake.db'}")
    db.create_schema()
    paths = {
        "driver": lambda inst: db.record_instance(inst, ["denoised"]),
        # The intake's own fallback, private, called as it is.
        "sqlalchemy": lambda inst: db._record_any_case(
            inst, ("denoised",), datetime.now(UTC), None
        ),
    }
    best = dict.fromkeys(paths, float("inf"))
    runs = 0
    for _ in range(max(1, repeats)):
        for name, record in paths.items():
            runs += 1
            series = f"2.25.{runs}"
            rows = [
                ReceivedInstance(
                    sop_instance_uid=f"{series}.{i}",
                    series_instance_uid=series,
                    study_instance_uid="2.25.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=folder / f"{series}.{i}.dcm",
                    modality="CT",
                    instance_number=i,
                    z_position=float(i),
                    size_bytes=524_288,
                )
                for i in range(instances + 1)
            ]
            db.record_instance(rows[0], ["denoised"])  # makes the series: not timed
            start = time.thread_time()
            for inst in rows[1:]:
                record(inst)
            best[name] = min(best[name], time.thread_time() - start)
    db.close()
    return {name: 1000.0 * t / instances for name, t in best.items()}


def idle_cpu_percent(folder: Path, associations: int, seconds: float) -> float:
    """The receiver's CPU use (% of one core) while ``associations`` established
    associations (pynetdicom, C-ECHO negotiated) stay open with nothing to send."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    with node_process(folder, role="receiver") as (port, _log):
        pid = pid_with_argument(str(folder / "config.toml"))
        ae = AE(ae_title="IDLE")
        ae.add_requested_context(Verification)
        peers = [ae.associate("127.0.0.1", port, ae_title="LDCT_NODE") for _ in range(associations)]
        try:
            if not all(assoc.is_established for assoc in peers):
                raise RuntimeError("an idle association was not accepted")
            time.sleep(0.5)
            before = cpu_seconds(pid)
            time.sleep(seconds)
            used = cpu_seconds(pid) - before
        finally:
            for assoc in peers:
                assoc.release()
            ae.shutdown()
    return 100.0 * used / seconds


def intake_commits(metrics_port: int) -> tuple[float, float]:
    """The receiver's intake commits so far and the instances they recorded (from its
    Prometheus endpoint): more instances than commits where associations were
    committed together."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{LOOPBACK}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return (
        values.get("ldct_node_intake_commits_total", 0.0),
        values.get("ldct_node_intake_committed_instances_total", 0.0),
    )


def concurrent_storescu(port: int, ae_title: str, files: list[Path], n: int) -> float:
    """Send ``files`` split over ``n`` storescu processes at once; wall time of all."""
    chunks = [files[i::n] for i in range(n)]
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda chunk: storescu(port, ae_title, chunk), chunks))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--associations", type=int, default=4, help="for the concurrent run")
    parser.add_argument(
        "--receivers",
        type=int,
        default=2,
        help="receiver processes sharing the port (node.reuse_port) for a second concurrent run",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=10.0, help="how long idle CPU use is measured"
    )
    parser.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc anchor")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    need_tools("storescu", "storescp", "echoscu")
    with_orthanc = not args.no_orthanc and ORTHANC_BIN is not None

    work = Path(tempfile.mkdtemp(prefix="ldct-ingest-", dir=args.workdir))
    try:
        files = write_series(work / "source", args.images, args.size)
        mbytes = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"{len(files)} images of {args.size}x{args.size} ({mbytes:.0f} MB), "
            f"{args.repeats} repeats, DCMTK tools with TCP_NODELAY=1; {machine_info()['cpu']}"
        )
        many = f"ldct-node x{args.associations}"
        shared = f"ldct-node x{args.associations}, {args.receivers} receiver processes"
        best = {
            "ldct-node": float("inf"),
            many: float("inf"),
            "storescp": float("inf"),
            "storescp --ignore": float("inf"),
        }
        if args.receivers > 1:
            best[shared] = float("inf")
        if with_orthanc:
            best["orthanc"] = float("inf")
        limits: list[dict[str, float]] = []
        receiver: list[tuple[float, float]] = []  # (CPU ms, minor faults) an instance
        per_commit: list[float] = []  # instances per intake commit, concurrent associations
        for rep in range(args.repeats):  # interleaved: A, B, C, A, B, C, ...
            folder = work / f"node-{rep}"
            with node_process(folder, role="receiver") as (port, _log):
                pid = pid_with_argument(str(folder / "config.toml"))
                cpu0, faults0 = cpu_seconds(pid), minor_faults(pid)
                best["ldct-node"] = min(best["ldct-node"], storescu(port, "LDCT_NODE", files))
                receiver.append(
                    (
                        1000 * (cpu_seconds(pid) - cpu0) / len(files),
                        (minor_faults(pid) - faults0) / len(files),
                    )
                )
            metrics = free_port()
            with node_process(work / f"many-{rep}", role="receiver", metrics_port=metrics) as (
                port,
                _log,
            ):
                elapsed = concurrent_storescu(port, "LDCT_NODE", files, args.associations)
                best[many] = min(best[many], elapsed)
                commits, committed = intake_commits(metrics)
                per_commit.append(committed / commits if commits else float("nan"))
            if args.receivers > 1:
                with node_process(
                    work / f"shared-{rep}", receivers=args.receivers, role="receiver"
                ) as (port, _):
                    elapsed = concurrent_storescu(port, "LDCT_NODE", files, args.associations)
                    best[shared] = min(best[shared], elapsed)
            with storescp(work / f"scp-{rep}" / "in") as port:
                best["storescp"] = min(best["storescp"], storescu(port, "PACS", files))
            with storescp(work / f"scp-{rep}" / "in", ignore=True) as port:
                elapsed = storescu(port, "PACS", files)
                best["storescp --ignore"] = min(best["storescp --ignore"], elapsed)
            if with_orthanc:
                with orthanc_process(work / f"orthanc-{rep}") as port:
                    best["orthanc"] = min(best["orthanc"], storescu(port, "ORTHANC", files))
            limits.append(durable_write_ms(files, work / f"disk-{rep}"))
            # Every run's files stay until the end (--repeats x ~6 x the series on disk):
            # where ext4 runs without a journal, creating a file scans past the inodes
            # deleted in the last minute or so, and a clean-up between runs made each
            # next run's file creations up to ~1 ms dearer (0.01 -> 0.9 ms measured).
        rates = {name: len(files) / t for name, t in best.items()}
        limit = min(limits, key=lambda x: x["total_ms"])
        rates["disk durable limit"] = 1000.0 / limit["total_ms"]
        transfer_ms = 1000.0 * best["storescp --ignore"] / len(files)
        ceiling = 1000.0 / (transfer_ms + limit["total_ms"])
        rates["one-association durable ceiling"] = ceiling
        ceiling_vs_disk = ceiling / rates["disk durable limit"]
        for name, rate in rates.items():
            print(f"{name:34s} {rate:8.1f} images/s")
        print(
            f"disk: write+fsync+rename {limit['file_write_fsync_rename_ms']:.2f} ms, "
            f"WAL FULL commit {limit['wal_commit_ms']:.2f} ms per instance"
        )
        print(
            f"one-association durable ceiling: 1 / (storescp --ignore {transfer_ms:.2f} ms "
            f"+ durable {limit['total_ms']:.2f} ms) = {ceiling:.1f} images/s, "
            f"{ceiling_vs_disk:.2f} x the disk's limit"
        )
        ratios = {
            "node_vs_storescp": rates["ldct-node"] / rates["storescp"],
            "node_vs_disk_limit": rates["ldct-node"] / rates["disk durable limit"],
            "node_vs_one_association_ceiling": rates["ldct-node"] / ceiling,
            "ceiling_vs_disk_limit": ceiling_vs_disk,
            "concurrent_vs_one": rates[many] / rates["ldct-node"],
        }
        if args.receivers > 1:
            ratios["concurrent_shared_port_vs_one"] = rates[shared] / rates["ldct-node"]
        if with_orthanc:
            ratios["node_vs_orthanc"] = rates["ldct-node"] / rates["orthanc"]
        for name, value in ratios.items():
            print(f"ratio {name:31s} {value:5.2f}")
        steps = handler_breakdown(files, work / "breakdown")
        total = sum(steps.values())
        print(f"C-STORE handler steps (ms per instance, in-process; total {total:.2f} ms):")
        for name, ms in steps.items():
            print(f"  {name:38s} {ms:7.2f}")
        header = header_read_ms(files, max(3, args.repeats))
        print(
            f"header read + what the handler reads from it: fast {header['fast read']:.2f} ms, "
            f"pydicom {header['pydicom']:.2f} ms per instance "
            f"({header['pydicom'] / header['fast read']:.2f} x)"
        )
        intake = intake_ms(work, len(files), max(3, args.repeats))
        print(
            f"intake of an instance, CPU: on the driver {intake['driver']:.2f} ms, through "
            f"SQLAlchemy {intake['sqlalchemy']:.2f} ms "
            f"({intake['sqlalchemy'] / intake['driver']:.2f} x)"
        )
        per_instance = 1000 * best["ldct-node"] / len(files)
        print(f"  over the network: {per_instance:.2f} ms per instance in all")
        receiver_cpu = statistics.median(cpu for cpu, _ in receiver)
        receiver_faults = statistics.median(faults for _, faults in receiver)
        print(
            f"  the receiver, one association: {receiver_cpu:.2f} ms of CPU and "
            f"{receiver_faults:.0f} minor page faults per instance (medians of the repeats)"
        )
        grouped = statistics.median(per_commit)
        print(
            f"  the receiver, {args.associations} associations in one process: "
            f"{grouped:.2f} instances per intake commit (group commit; median of the repeats)"
        )
        idle = idle_cpu_percent(work / "idle", args.associations, args.idle_seconds)
        print(
            f"receiver CPU with {args.associations} idle associations: {idle:.1f} % of a core "
            f"(over {args.idle_seconds:g} s)"
        )
        result = {
            "images": len(files),
            "size": args.size,
            "seconds": best,
            "images_per_s": rates,
            "ratios": ratios,
            "ratio_node_vs_storescp": ratios["node_vs_storescp"],
            "disk_limit_ms": limit,
            "handler_ms_per_instance": steps,
            "header_read_ms": header,
            "intake_cpu_ms": intake,
            "receiver_cpu_ms_per_instance": receiver_cpu,
            "receiver_minor_faults_per_instance": receiver_faults,
            "instances_per_intake_commit_concurrent": grouped,
            "idle_cpu_percent": idle,
        }
        report("ingest", result, args.json)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
