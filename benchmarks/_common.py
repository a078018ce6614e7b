"""Helpers shared by the benchmark scripts (timing, reporting, synthetic CT, DICOM peers).

Benchmarks print figures, they assert nothing. Absolute times depend on the machine
and on whatever else runs on it; every script therefore measures the things it
compares in the same run, interleaved (A, B, A, B, ...), and keeps the best time of
each: noise from other processes only ever adds time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
    # As the CLI does: TensorFlow's start-up INFO lines (oneDNN's notice, on AVX-512
    # CPUs) reach stderr past TF_CPP_MIN_LOG_LEVEL; TF_CPP_MIN_LOG_LEVEL=0 shows them.
    # Not under JAX: the GPU kit's machine has no TensorFlow and not the CLI's packages.
    from ldct_node.cli.startup_chatter import hold_tensorflow_startup_chatter

    hold_tensorflow_startup_chatter()

REPO = Path(__file__).resolve().parents[1]
BUNDLED_WEIGHTS = REPO / "weights"
LOOPBACK = "127.0.0.1"


def cpu_isa(flags: set[str]) -> str:
    """The extensions among /proc/cpuinfo's ``flags`` that set the inference speed: the
    widest vector set, then bfloat16 in vectors and in AMX tiles (a VM's model name
    often says only "Intel(R) Xeon(R) Processor")."""
    vector = next((f for f in ("avx512f", "avx2") if f in flags), "no AVX2")
    return "+".join([vector, *(f for f in ("avx512_bf16", "amx_bf16") if f in flags)])


def cpuinfo(key: str) -> str | None:
    """The first ``key`` line's value in /proc/cpuinfo (None where it has none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    return set((cpuinfo("flags") or "").split())


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = cpuinfo("model name") or platform.processor() or platform.machine()
    flags = cpu_flags()
    if flags:
        cpu = f"{cpu} [{cpu_isa(flags)}]"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` (seconds)."""
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each case, the cases run in turn ``repeats`` times (A B C A B C...)."""
    best = {name: float("inf") for name in cases}
    for _ in range(max(1, repeats)):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def report(title: str, result: dict[str, Any], json_path: str | None) -> None:
    """Print the machine line and write ``result`` as JSON when asked."""
    result = {"benchmark": title, "machine": machine_info(), **result}
    info = result["machine"]
    print(f"# {title} on {info['cpu']} ({info['cpus']} CPUs, load {info['load_average']})")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {json_path}")


def ct_volume(n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """``(n, size, size)`` float32 HU: air, a body ellipse with organs and bone, noise.

    Only the timing matters here; the content is plausible CT so that compression
    and value ranges are realistic.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    body = (xx / 0.45) ** 2 + (yy / 0.35) ** 2 <= 1.0
    organ = ((xx + 0.12) / 0.12) ** 2 + (yy / 0.15) ** 2 <= 1.0
    spine = (xx / 0.05) ** 2 + ((yy - 0.22) / 0.05) ** 2 <= 1.0
    base = np.full((size, size), -1000.0, np.float32)
    base[body] = 40.0
    base[organ] = 60.0
    base[spine] = 700.0
    volume = np.repeat(base[None], n, axis=0)
    volume += rng.normal(0.0, 25.0, volume.shape).astype(np.float32) * body
    return volume


def write_series(folder: Path, n: int, size: int, *, seed: int = 0) -> list[Path]:
    """Write an ``n``-slice CT series (uncompressed, explicit VR LE) and return its files."""
    from pydicom.uid import generate_uid

    from ldct_node.dicom.io import write_ct_series

    return write_ct_series(
        ct_volume(n, size, seed=seed),
        folder,
        pixel_spacing_mm=0.7,
        slice_thickness_mm=1.0,
        series_description="benchmark",
        series_number=2,
        study_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        patient_name="Bench^Mark",
        patient_id="BENCH0001",
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def dcmtk_tool(name: str) -> str | None:
    """The path of DCMTK's ``name`` (``storescu``, ``storescp``, ``echoscu``, ...) on PATH.

    Programs of the same name that are scripts are skipped: in an activated venv
    pynetdicom's own ``storescu`` / ``echoscu`` / ``storescp`` come first on PATH and
    take other options. DCMTK's are native executables. None if there is none.
    """
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = Path(folder or ".") / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            with candidate.open("rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    return str(candidate)
        except OSError:
            continue
    return None


#: For DCMTK's tools: without it they leave Nagle's algorithm on, and with the peer's
#: delayed ACK each DIMSE message waits ~40 ms (storescp 22 images/s instead of ~740).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk_cmd(name: str, *args: str) -> list[str]:
    """A DCMTK command line (the tool resolved by :func:`dcmtk_tool`)."""
    path = dcmtk_tool(name)
    if path is None:
        raise FileNotFoundError(f"DCMTK's {name} not found on PATH (apt-get install dcmtk)")
    return [path, *args]


def need_tools(*tools: str) -> None:
    """Exit with a clear error unless DCMTK's ``tools`` are on PATH (pynetdicom's own
    apps are used instead where :func:`use_peers` chose them)."""
    if _python_peers():
        return
    missing = [t for t in tools if dcmtk_tool(t) is None]
    if missing:
        sys.exit(
            f"error: DCMTK's {', '.join(missing)} not found (apt-get install dcmtk, "
            "or --peers python for pynetdicom's own storescu / storescp)"
        )


#: ``--peers`` of the benchmarks that start DICOM peers: DCMTK's native tools (the
#: honest anchors), or pynetdicom's own storescu / storescp apps where DCMTK cannot be
#: installed (the GPU machine: no package registry there). "auto": DCMTK when found.
PEER_CHOICES = ("auto", "dcmtk", "python")
DCMTK_PEERS, PYTHON_PEERS = "dcmtk", "python"
_PEERS = {"kind": DCMTK_PEERS}


def use_peers(choice: str) -> str:
    """Choose the DICOM peers the helpers below start (``--peers``); the kind in use."""
    if choice not in PEER_CHOICES:
        raise ValueError(f"choice: one of {', '.join(PEER_CHOICES)}, not {choice!r}")
    if choice == "auto":
        found = all(dcmtk_tool(t) for t in ("storescu", "storescp", "echoscu"))
        choice = DCMTK_PEERS if found else PYTHON_PEERS
    _PEERS["kind"] = choice
    return choice


def _python_peers() -> bool:
    return _PEERS["kind"] == PYTHON_PEERS


def _pynetdicom_app(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pynetdicom", name, *args]


def stop_process(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the process either way."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def echo_ok(port: int, ae_title: str) -> bool:
    """Whether ``ae_title`` on loopback ``port`` answers a C-ECHO."""
    if _python_peers():
        return _python_echo_ok(port, ae_title)
    result = subprocess.run(
        dcmtk_cmd("echoscu", "-aec", ae_title, "-to", "5", LOOPBACK, str(port)),
        capture_output=True,
        check=False,
        env=DCMTK_ENV,
    )
    return result.returncode == 0


def _python_echo_ok(port: int, ae_title: str) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    try:
        assoc = ae.associate(LOOPBACK, port, ae_title=ae_title)
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and int(status.Status) == 0
    finally:
        ae.shutdown()


@contextmanager
def dicom_peer(
    cmd: list[str], folder: Path, port: int, ae_title: str, timeout: float, **popen: Any
) -> Iterator[int]:
    """Run a DICOM peer (``cmd``, output to ``folder/<name>-<port>.log``) until it
    answers C-ECHO as ``ae_title`` on ``port``; yields the port, stops it on exit."""
    name = Path(cmd[0]).name
    log = (folder / f"{name}-{port}.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)
    try:
        wait_until(
            lambda: proc.poll() is not None or echo_ok(port, ae_title), timeout, f"{name} to start"
        )
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log.name}")
        yield port
    finally:
        stop_process(proc, grace=30)
        log.close()


@contextmanager
def storescp(directory: Path, ae_title: str = "PACS", *, ignore: bool = False) -> Iterator[int]:
    """DCMTK storescp (or pynetdicom's, :func:`use_peers`) on a free loopback port
    writing into ``directory``; yields the port. ``ignore``: it receives each data set
    and answers success without writing it (both tools' ``--ignore``)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ignoring = ("--ignore",) if ignore else ()
    if _python_peers():
        where = ("-aet", ae_title, "-od", str(directory), "-pdu", "0", "-ba", LOOPBACK)
        cmd = _pynetdicom_app("storescp", *where, *ignoring, str(port))
    else:
        options = ("-aet", ae_title, "-od", str(directory), "+xa")
        cmd = dcmtk_cmd("storescp", *options, *ignoring, str(port))
    with dicom_peer(cmd, directory.parent, port, ae_title, 30, env=DCMTK_ENV) as ready:
        yield ready


def storescu(port: int, ae_title: str, files: list[Path]) -> float:
    """Send ``files`` over one association with DCMTK storescu (or pynetdicom's,
    :func:`use_peers`); returns its wall time."""
    args = ("-aec", ae_title, "-aet", "BENCH", LOOPBACK, str(port), *map(str, files))
    start = time.perf_counter()
    result = subprocess.run(
        _pynetdicom_app("storescu", *args) if _python_peers() else dcmtk_cmd("storescu", *args),
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed


@contextmanager
def node_process(
    folder: Path,
    *,
    weights: Path = BUNDLED_WEIGHTS,
    stable_seconds: float = 3600.0,
    model: dict[str, Any] | None = None,
    destinations: list[dict[str, Any]] | None = None,
    receivers: int = 1,
    role: str = "all",
    metrics_port: int | None = None,
) -> Iterator[tuple[int, Path]]:
    """``ldct-node serve`` in a subprocess on a free port; yields (port, log file).

    ``role`` is the first process's (``receiver``: no model is loaded). With
    ``receivers`` > 1, that many processes listen on the port (``node.reuse_port``), the
    others as ``serve --role receiver``. ``metrics_port``: the first process serves its
    Prometheus metrics there.
    """
    import tomli_w

    if receivers < 1:
        raise ValueError(f"receivers: must be >= 1, got {receivers}")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    node: dict[str, Any] = {"host": LOOPBACK, "port": port, "ae_title": "LDCT_NODE"}
    if receivers > 1:
        node["reuse_port"] = True
    config: dict[str, Any] = {
        "node": node,
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.db", "min_free_gb": 0},
        "series": {"stable_seconds": stable_seconds},
        "model": {"weights_dir": str(weights), "device": "cpu", **(model or {})},
        "forward": {"backoff_seconds": [1]},
    }
    if destinations:
        config["destinations"] = destinations
    if metrics_port is not None:
        config["metrics"] = {"enabled": True, "host": LOOPBACK, "port": metrics_port}
    path = folder / "config.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
    command = [sys.executable, "-m", "ldct_node.cli", "serve", "--config", str(path)]
    procs: list[tuple[subprocess.Popen[bytes], Any, Path]] = []
    try:
        for index in range(receivers):
            log_path = folder / ("node.log" if index == 0 else f"receiver-{index}.log")
            log = log_path.open("wb")
            role_args = ["--role", role if index == 0 else "receiver"]
            proc = subprocess.Popen(
                [*command, *role_args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
            procs.append((proc, log, log_path))

            # One at a time: the first creates the database, the next must find it. An
            # echo may reach an earlier process: each one says in its log when it serves.
            def up(proc: subprocess.Popen[bytes] = proc, log_path: Path = log_path) -> bool:
                ready = " ready (role " in log_path.read_text(errors="replace")
                return proc.poll() is not None or (ready and echo_ok(port, "LDCT_NODE"))

            wait_until(up, 180, "ldct-node serve")
            if proc.poll() is not None:
                raise RuntimeError(f"ldct-node serve exited with {proc.returncode}; see {log_path}")
        yield port, procs[0][2]
    finally:
        for proc, log, _ in reversed(procs):
            stop_process(proc, grace=60)
            log.close()


def pid_with_argument(argument: str) -> int:
    """The pid of the one process whose command line has ``argument`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # ended meanwhile
            if argument.encode() in args:
                found.append(int(entry.name))
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} processes with {argument!r} in their command line")
    return found[0]


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces), from field 3 on."""
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults(pid: int) -> int:
    """Page faults served without I/O a process has taken so far (Linux /proc): mostly
    fresh pages of memory the C library took from the system."""
    return int(_stat_fields(pid)[7])


ORTHANC_BIN = shutil.which("Orthanc") or (
    "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None
)


@contextmanager
def orthanc_process(folder: Path, sender_aet: str = "BENCH") -> Iterator[int]:
    """Orthanc as a second receiver, storing what ``sender_aet`` sends from 127.0.0.1;
    yields its DICOM port. Orthanc 1.10 cannot bind to one address: its REST API only
    answers local clients and C-STORE only the one modality, at 127.0.0.1."""
    if ORTHANC_BIN is None:
        raise FileNotFoundError("Orthanc not found (apt-get install orthanc)")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = {
        "Name": "ldct-node-bench",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "SaveJobs": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {"bench": {"AET": sender_aet, "Host": LOOPBACK, "Port": 104}},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    # Orthanc is built on DCMTK, which reads TCP_NODELAY too.
    peer = dicom_peer(
        [ORTHANC_BIN, str(path)], folder, dicom_port, "ORTHANC", 60, cwd=folder, env=DCMTK_ENV
    )
    with peer:
        yield dicom_port


def durable_write_ms(files: list[Path], folder: Path) -> dict[str, float]:
    """This disk's cost of keeping one instance durably, as the node must before it
    acknowledges: write the file to a temporary name, fsync, rename, fsync the folder,
    then one SQLite WAL commit (synchronous FULL) of one row. Milliseconds per
    instance, each part and in all (medians over the files)."""
    import sqlite3

    folder.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(folder / "limit.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (uid TEXT PRIMARY KEY, path TEXT, size INTEGER)")
    dir_fd = os.open(folder, os.O_RDONLY)
    file_ms: list[float] = []
    commit_ms: list[float] = []
    try:
        for i, src in enumerate(files):
            data = src.read_bytes()
            t0 = time.perf_counter()
            tmp, final = folder / f".{i}.tmp", folder / f"{i}.dcm"
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            os.fsync(dir_fd)
            t1 = time.perf_counter()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES (?, ?, ?)", (str(i), str(final), len(data)))
            conn.execute("COMMIT")
            t2 = time.perf_counter()
            file_ms.append(1000 * (t1 - t0))
            commit_ms.append(1000 * (t2 - t1))
    finally:
        os.close(dir_fd)
        conn.close()
    total_ms = [a + b for a, b in zip(file_ms, commit_ms, strict=True)]
    return {
        "file_write_fsync_rename_ms": statistics.median(file_ms),
        "wal_commit_ms": statistics.median(commit_ms),
        "total_ms": statistics.median(total_ms),
    }
