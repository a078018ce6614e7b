"""Helpers for tests of the whole node: DCMTK ``storescp`` as a PACS, ``ldct-node serve``
as a subprocess, config files and polling.

Everything listens on 127.0.0.1 only, every wait is bounded, and every process started
here is stopped by the context manager that started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
import tomli_w
from _net_util import DCMTK_ENV, LOOPBACK, dcmtk, dcmtk_tool, free_port, stop_process

from ldct_node.service.spool import Spool
from ldct_node.store import Database, ReceivedInstance

HAVE_STORESCP = all(dcmtk_tool(t) for t in ("storescp", "storescu", "echoscu"))
needs_storescp = pytest.mark.skipif(not HAVE_STORESCP, reason="DCMTK storescp/storescu missing")

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    details: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until it returns something truthy; fail the test after ``timeout`` s.

    ``details`` adds context (e.g. the node's log) to the failure message.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details is not None else ""
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def echo_ok(port: int, called_aet: str) -> bool:
    """True if a DICOM peer on 127.0.0.1:``port`` answers C-ECHO."""
    result = dcmtk("echoscu", "-aec", called_aet, "-to", "5", "-ta", "5", LOOPBACK, str(port))
    return result.returncode == 0


@dataclass
class Pacs:
    """A running DCMTK storescp."""

    port: int
    directory: Path
    ae_title: str
    process: subprocess.Popen[bytes]

    def datasets(self) -> list[pydicom.Dataset]:
        """Every instance received so far (headers and pixels)."""
        return [pydicom.dcmread(p) for p in sorted(self.directory.iterdir()) if p.is_file()]

    def of_series(self, series_uid: str) -> list[pydicom.Dataset]:
        return [ds for ds in self.datasets() if ds.SeriesInstanceUID == series_uid]


@contextmanager
def storescp(
    directory: Path,
    *,
    port: int | None = None,
    ae_title: str = "PACS",
    unique_names: bool = True,
    extra: Sequence[str] = (),
) -> Iterator[Pacs]:
    """Run ``storescp`` writing every received instance into ``directory``.

    With ``unique_names`` each reception becomes its own file (``+uf``), so a
    re-delivery of the same SOP instance is visible as a second file. ``extra``:
    more storescp options.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = (directory.parent / f"storescp-{port}.log").open("wb")
    args = [
        dcmtk_tool("storescp") or "storescp",
        "-aet",
        ae_title,
        "-od",
        str(directory),
        "+xa",
        "-ts",
        "30",
        "-ta",
        "30",
    ]
    if unique_names:
        args.append("+uf")
    args.extend(extra)
    args.append(str(port))
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        wait_for(
            lambda: process.poll() is not None or echo_ok(port, ae_title),
            timeout=20,
            interval=0.2,
            what="storescp to answer C-ECHO",
        )
        if process.poll() is not None:
            pytest.fail(f"storescp exited with {process.returncode}")
        yield Pacs(port=port, directory=directory, ae_title=ae_title, process=process)
    finally:
        stop_process(process)
        log.close()


def write_config(folder: Path, weights: Path, **sections: Any) -> Path:
    """A node config in ``folder/config.toml``: 127.0.0.1, a free port, stable_seconds 1.

    ``sections`` replace or (for dicts) update the defaults, e.g.
    ``destinations=[{...}]`` or ``forward={"backoff_seconds": [1]}``.
    """
    data: dict[str, Any] = {
        "node": {"host": LOOPBACK, "port": free_port(), "ae_title": "LDCT_NODE"},
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.db", "min_free_gb": 0},
        "series": {"stable_seconds": 1},
        "model": {"weights_dir": str(weights), "batch_size": 4, "device": "cpu"},
        "forward": {"max_attempts": 5, "backoff_seconds": [1]},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``ldct-node ARGS`` as a subprocess (the installed console entry point)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "ldct_node.cli", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=REPO,
    )


@dataclass
class Serve:
    """A running ``ldct-node serve`` subprocess."""

    config: Path
    port: int
    ae_title: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: Any = field(repr=False, default=None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ldct-node serve did not exit within {timeout:g} s:\n{self.log()[-3000:]}")


def start_serve(config: Path, port: int, *, ae_title: str = "LDCT_NODE", tag: str = "") -> Serve:
    """Start ``ldct-node serve --config CONFIG`` and wait until it answers C-ECHO."""
    log_path = config.parent / f"serve{tag}.log"
    log = log_path.open("ab")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "250"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ldct_node.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    node = Serve(config, port, ae_title, process, log_path, log)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"ldct-node serve exited with {process.returncode}:\n{node.log()[-3000:]}")
        return echo_ok(port, ae_title)

    try:
        wait_for(ready, timeout=120, interval=0.3, what="ldct-node serve to answer C-ECHO")
    except BaseException:
        stop_serve(node)
        raise
    return node


def stop_serve(node: Serve, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
    """Stop the process (``sig``, then SIGKILL if it lingers); returns its exit status."""
    if node.process.poll() is None:
        node.process.send_signal(sig)
        try:
            node.process.wait(timeout)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(10)
    if node._log is not None:
        node._log.close()
        node._log = None
    return node.process.returncode


@contextmanager
def serving(config: Path, port: int, **kwargs: Any) -> Iterator[Serve]:
    node = start_serve(config, port, **kwargs)
    try:
        yield node
    finally:
        stop_serve(node)


def storescu(
    port: int, *files: Path, called_aet: str = "LDCT_NODE"
) -> subprocess.CompletedProcess[str]:
    """Send files to 127.0.0.1:``port`` with DCMTK storescu (one association)."""
    return dcmtk(
        "storescu", "-aec", called_aet, "-to", "20", "-ta", "20", "-td", "30",
        LOOPBACK, str(port), *files,
    )  # fmt: skip


def spool_series(
    db: Database, spool: Spool, files: list[Path], profiles: tuple[str, ...] = ("denoised",)
) -> str:
    """Store and record files the way the receiver does; returns their SeriesInstanceUID."""
    series_uid = ""
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series_uid = str(ds.SeriesInstanceUID)
        stored = spool.store_bytes(
            path.read_bytes(), sop_instance_uid=ds.SOPInstanceUID, series_instance_uid=series_uid
        )
        db.record_instance(
            ReceivedInstance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=series_uid,
                study_instance_uid=str(ds.StudyInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=stored,
                modality="CT",
                instance_number=int(ds.InstanceNumber),
            ),
            list(profiles),
        )
    return series_uid
