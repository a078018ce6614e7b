"""Reliability of the running node: a disk that fills and frees up again, a PACS that
routes everything back (loop guard), four modalities sending at once, and a PACS that
is down for a while (backoff as configured).

Real peers over 127.0.0.1: ``ldct-node serve`` as a subprocess (or the receiver alone
where no model is needed), DCMTK ``storescu`` and pynetdicom as senders, a recording
pynetdicom SCP as PACS. The load figures are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from _dicom_util import make_ct_series
from _net_util import (
    DCMTK_ENV,
    LOOPBACK,
    dcmtk_tool,
    free_port,
    node_settings,
    running_receiver,
    scu_association,
)
from _node_util import Serve, cli, needs_storescp, serving, wait_for, write_config
from _pacs_util import recording_pacs
from pydicom.uid import UID

from ldct_node.config import Settings, load_settings
from ldct_node.service import receive
from ldct_node.service.spool import BYTES_PER_GB
from ldct_node.store import Database, JobInfo, JobState

CT = UID("1.2.840.10008.5.1.4.1.1.2")
GB = BYTES_PER_GB  # storage.min_free_gb counts decimal gigabytes
JOB_TIMEOUT_S = 180


def series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@dataclass
class Running:
    serve: Serve
    settings: Settings
    config: Path
    db: Database

    @property
    def port(self) -> int:
        return self.settings.node.port

    def jobs_of(self, uid: str) -> list[JobInfo]:
        return [j for j in self.db.list_jobs() if j.series_instance_uid == uid]

    def wait_done(self, uid: str, n_instances: int | None = None) -> JobInfo:
        def probe() -> JobInfo | None:
            jobs = self.jobs_of(uid)
            assert len(jobs) <= 1, jobs
            done = jobs and jobs[0].state == JobState.DONE
            if done and (n_instances is None or jobs[0].n_instances == n_instances):
                return jobs[0]
            return None

        return wait_for(
            probe,
            timeout=JOB_TIMEOUT_S,
            interval=0.1,
            what=f"job of series {uid} to be done",
            details=lambda: f"jobs: {self.jobs_of(uid)}\n{self.serve.log()[-4000:]}",
        )


NodeFactory = Callable[..., Running]


@pytest.fixture
def node_factory(tmp_path: Path, untrained_weights: Path) -> Iterator[NodeFactory]:
    """Start ``ldct-node serve`` with given config sections; stopped at teardown."""
    stack: list[tuple[Any, Database]] = []

    def start(name: str = "node", **sections: object) -> Running:
        config = write_config(tmp_path / name, untrained_weights, **sections)
        settings = load_settings(config)
        cm = serving(config, settings.node.port)
        serve = cm.__enter__()
        db = Database(settings.database_url)
        stack.append((cm, db))
        return Running(serve, settings, config, db)

    yield start
    for cm, db in reversed(stack):
        db.close()
        cm.__exit__(None, None, None)


# ------------------------------------------------------------------------- disk guard


def test_disk_guard_refuses_while_space_is_short_and_accepts_when_it_returns(
    tmp_path: Path,
) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free < 3 * GB:
        pytest.skip(f"needs 3 GB free on {tmp_path}'s filesystem, has {free / GB:.1f}")
    # The guard sits 0.5 GB below what is free now; 1 GB of ballast takes us under it.
    min_free_gb = (free - GB // 2) / GB
    files = make_ct_series(tmp_path, n=3, size=16)
    settings = node_settings(tmp_path, storage={"min_free_gb": min_free_gb})
    ballast = tmp_path / "ballast.bin"
    with running_receiver(settings) as node, scu_association(node.port, [CT]) as assoc:
        assert assoc.send_c_store(files[0]).Status == receive.SUCCESS

        fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, GB)  # real blocks: free space drops by 1 GB
        finally:
            os.close(fd)
        try:
            assert shutil.disk_usage(tmp_path).free < min_free_gb * GB
            # Same association: the guard reads free space per C-STORE.
            assert assoc.send_c_store(files[1]).Status == receive.OUT_OF_RESOURCES
            assert node.db.instance_path(sop_uid(files[1])) is None
            spooled = {p.name for p in node.spool.incoming.rglob("*") if p.is_file()}
            assert len(spooled) == 1 and not any(sop_uid(files[1]) in n for n in spooled)
            assert list(node.spool.tmp.iterdir()) == []  # nothing half-written
        finally:
            ballast.unlink()

        # Space is back: the refused instance (as the modality retries) and the next land.
        assert assoc.send_c_store(files[1]).Status == receive.SUCCESS
        assert assoc.send_c_store(files[2]).Status == receive.SUCCESS
    (job,) = node.db.list_jobs()
    assert job.source_instances == 3


# ------------------------------------------------------------------------- loop guard


@needs_storescp
@pytest.mark.slow
def test_derived_output_routed_back_is_never_processed_again(
    tmp_path: Path, node_factory: NodeFactory
) -> None:
    with recording_pacs(keep_datasets=True) as pacs:
        port = free_port()
        # The node forwards to PACS *and to itself*, as a PACS that routes all CT back
        # would; ignore_derived is off, so only the own-output guard stands in the way.
        node = node_factory(
            node={"host": LOOPBACK, "port": port, "ae_title": "LDCT_NODE"},
            series={"stable_seconds": 0.5, "ignore_derived": False},
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port},
                {"name": "self", "ae_title": "LDCT_NODE", "host": LOOPBACK, "port": port},
            ],
        )
        files = make_ct_series(tmp_path, n=4, size=32, subdir="src")
        with scu_association(node.port, [CT]) as assoc:
            assert all(assoc.send_c_store(f).Status == 0 for f in files)
        job = node.wait_done(series_uid(files[0]))
        assert [(f.destination, f.state) for f in job.forwards] == [
            ("pacs", "sent"),
            ("self", "sent"),
        ]
        derived_uid = job.derived_series_uid or ""
        derived = [ds for ds in pacs.datasets.values() if ds.SeriesInstanceUID == derived_uid]
        assert len(derived) == 4
        # The node stored its own output (success to the sender) and made no job of it,
        # even after the series was stable for a while.
        for ds in derived:
            assert node.db.instance_path(str(ds.SOPInstanceUID)) is not None
        wait_for(
            lambda: "closed: 4 stored (4 not for processing)" in node.serve.log(),
            timeout=30,
            what="the node's own output to be stored and ignored",
        )
        assert node.jobs_of(derived_uid) == []

        # A foreign DERIVED series (another vendor's post-processing) IS processed here,
        # since ignore_derived is off; its own output comes back and is ignored again.
        foreign = make_ct_series(
            tmp_path, n=2, size=32, subdir="foreign",
            extra={"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]},
        )  # fmt: skip
        with scu_association(node.port, [CT]) as assoc:
            assert all(assoc.send_c_store(f).Status == 0 for f in foreign)
        second = node.wait_done(series_uid(foreign[0]))
        wait_for(
            lambda: "closed: 2 stored (2 not for processing)" in node.serve.log(),
            timeout=30,
            what="the second derived series to come back",
        )
        # Many stability sweeps later, still exactly the two source jobs.
        assert (
            node.jobs_of(derived_uid) == [] and node.jobs_of(second.derived_series_uid or "") == []
        )
        assert len(node.db.list_jobs()) == 2

    # With ignore_derived on (the default), any DERIVED input, ours or not, is stored
    # and ignored: success status, no job.
    settings = node_settings(tmp_path / "strict")
    assert settings.series.ignore_derived
    ours = tmp_path / "ours"
    ours.mkdir()
    for ds in derived:
        ds.save_as(ours / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    with running_receiver(settings) as strict, scu_association(strict.port, [CT]) as assoc:
        for path in [*sorted(ours.iterdir()), *foreign]:
            assert assoc.send_c_store(path).Status == receive.SUCCESS
            assert strict.db.instance_path(sop_uid(path)) is not None
        assert strict.db.promote_stable_series(stable_seconds=0) == []
        assert strict.db.list_jobs() == []


# ------------------------------------------------------------------------------- load


@needs_storescp
@pytest.mark.slow
def test_four_senders_at_once_each_100_slices_all_processed_and_delivered(
    tmp_path: Path, node_factory: NodeFactory
) -> None:
    n_senders, n_slices = 4, 100
    series = [
        make_ct_series(tmp_path, n=n_slices, size=64, subdir=f"s{k}", seed=k, series_number=k)
        for k in range(n_senders)
    ]
    with recording_pacs() as pacs:
        node = node_factory(
            series={"stable_seconds": 1},
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port}
            ],
        )
        senders = [
            subprocess.Popen(
                [
                    dcmtk_tool("storescu") or "storescu",
                    "-aet",
                    f"MODALITY{k}",
                    "-aec",
                    "LDCT_NODE",
                    "-to",
                    "30",
                    "-ta",
                    "30",
                    "-td",
                    "60",
                    LOOPBACK,
                    str(node.port),
                    *map(str, files),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=DCMTK_ENV,
            )
            for k, files in enumerate(series)
        ]
        for proc in senders:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
        figures = []
        for k, files in enumerate(series):
            job = node.wait_done(series_uid(files[0]), n_instances=n_slices)
            assert job.calling_aet == f"MODALITY{k}"
            delivered = pacs.sop_uids(job.derived_series_uid or "")
            assert len(delivered) == n_slices
            sources = {
                r.source_sop_instance_uid for r in pacs.of_series(job.derived_series_uid or "")
            }
            assert sources == {sop_uid(f) for f in files}
            figures.append((k, len(delivered), len(pacs.of_series(job.derived_series_uid or ""))))
        assert node.serve.alive()
    print(
        f"\nload: {n_senders} concurrent senders x {n_slices} slices (64x64): "
        + ", ".join(f"sender {k}: {d} delivered ({r} receipts)" for k, d, r in figures)
    )


# --------------------------------------------------------------------- destination outage


@pytest.mark.slow
def test_pacs_down_then_up_backs_off_as_configured_and_delivers(
    tmp_path: Path, node_factory: NodeFactory
) -> None:
    pacs_port = free_port()  # nothing listens there yet
    node = node_factory(
        series={"stable_seconds": 0.5},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs_port}],
        forward={"max_attempts": 100, "backoff_seconds": [1, 2]},
    )
    files = make_ct_series(tmp_path, n=3, size=32)
    uid = series_uid(files[0])
    with scu_association(node.port, [CT]) as assoc:
        assert all(assoc.send_c_store(f).Status == 0 for f in files)

    # Watch three failed attempts: each books next try = attempt time + the configured
    # backoff for that attempt (1 s, 2 s, then the last value repeats).
    delays: dict[int, float] = {}

    def three_attempts() -> bool:
        jobs = node.jobs_of(uid)
        if jobs and jobs[0].forwards:
            fwd = jobs[0].forwards[0]
            if fwd.attempts and fwd.next_attempt_at is not None:
                delays[fwd.attempts] = (fwd.next_attempt_at - fwd.updated_at).total_seconds()
        return len(delays) >= 3

    wait_for(three_attempts, timeout=60, interval=0.05, what="three failed forward attempts")
    expected = {a: node.settings.forward.delay_for(a) for a in delays}
    assert delays == pytest.approx(expected, abs=0.01)
    assert expected[1] == 1 and expected[2] == 2 and expected[3] == 2

    # Meanwhile `status` says what is wrong (exit 1), and the job waits in forwarding.
    result = cli("status", "--config", node.config, "--json")
    status = json.loads(result.stdout)
    assert result.returncode == 1 and status["pending_forwards"] == 1
    (error,) = status["forward_errors"]
    assert error["destination"] == "pacs" and "no association" in error["last_error"]
    assert node.jobs_of(uid)[0].state == JobState.FORWARDING

    with recording_pacs(port=pacs_port) as pacs:
        job = node.wait_done(uid)
        assert len(pacs.sop_uids(job.derived_series_uid or "")) == 3
    (fwd,) = job.forwards
    assert fwd.attempts >= 4 and fwd.last_error is None
    assert cli("status", "--config", node.config).returncode == 0


# ------------------------------------------------------- disk full while deriving


def _jobs_summary(db: Database) -> list[tuple[int, str, str]]:
    return [(j.id, j.state, (j.error or "")[:60]) for j in db.list_jobs()]


@pytest.mark.slow
def test_derivation_below_min_free_gb_waits_and_every_job_completes_once_space_is_back(
    tmp_path: Path, node_factory: NodeFactory
) -> None:
    """storage.min_free_gb guards derived writes too: received, then the disk fills
    (1 GB of real blocks): the jobs wait, ``status`` says why, none fails; space back:
    all complete, no ``retry``."""
    free = shutil.disk_usage(tmp_path).free
    if free < 3 * GB:
        pytest.skip(f"needs 3 GB free on {tmp_path}'s filesystem, has {free / GB:.1f}")
    min_free_gb = (free - GB // 2) / GB
    node = node_factory(storage={"min_free_gb": min_free_gb}, series={"stable_seconds": 3})
    series = [
        make_ct_series(tmp_path, n=2, size=32, seed=k, subdir=f"s{k}", series_number=k + 1)
        for k in range(5)
    ]
    with scu_association(node.port, [CT]) as assoc:
        for files in series:
            for path in files:
                assert assoc.send_c_store(path).Status == receive.SUCCESS
    ballast = tmp_path / "ballast.bin"
    fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, GB)  # real blocks: free space drops by 1 GB
    finally:
        os.close(fd)
    try:
        assert shutil.disk_usage(tmp_path).free < min_free_gb * GB

        def waiting() -> list[JobInfo] | None:
            jobs = node.db.list_jobs()
            held = [j for j in jobs if (j.error or "").startswith("waiting for disk space")]
            return held if len(jobs) == 5 and held else None

        wait_for(
            waiting,
            timeout=JOB_TIMEOUT_S,
            what="a job waiting for disk space",
            details=lambda: f"{_jobs_summary(node.db)}\n{node.serve.log()[-3000:]}",
        )
        status = cli("status", "--config", node.config, "--json")
        assert "waiting for disk space" in status.stdout, status.stdout
        assert "storage.min_free_gb" in status.stdout
        time.sleep(3)  # a while without space: nothing fails, nothing is written
        jobs = node.db.list_jobs()
        assert all(j.state in (JobState.QUEUED, JobState.RUNNING) for j in jobs), jobs
        derived = Path(node.settings.spool_path) / "derived"
        assert list(derived.rglob("*.dcm")) == []
    finally:
        ballast.unlink()
    freed = time.monotonic()
    done = [node.wait_done(series_uid(files[0]), n_instances=2) for files in series]
    assert all(job.error is None for job in done)
    # The first job, tried while space was short, ran again by itself; the worker
    # waited with the others instead of trying (and failing) each of them.
    assert done[0].attempts == 2 and all(job.attempts == 1 for job in done[1:])
    print(f"5 jobs done {time.monotonic() - freed:.1f} s after space came back")


@pytest.mark.slow
def test_a_header_claiming_an_absurd_size_fails_its_job_and_never_holds_the_worker(
    tmp_path: Path, node_factory: NodeFactory
) -> None:
    """Found by the fuzz test: a slice whose header says NumberOfFrames = 999999999 made
    the worker's space estimate 2 TB; the job was deferred "waiting for disk space" and
    the worker claimed nothing after it. Now the frame count is capped by the pixel data
    (that job fails on decoding, as it should), and a series larger than the spool's
    filesystem could ever hold fails at once with that reason. Either way the next
    series is processed."""
    node = node_factory(series={"stable_seconds": 0.5})
    (frames,) = make_ct_series(tmp_path, n=1, size=32, seed=1, subdir="frames")
    ds = pydicom.dcmread(frames)
    ds.NumberOfFrames = 999999999
    ds.save_as(frames)
    (huge,) = make_ct_series(tmp_path, n=1, size=32, seed=2, subdir="huge")
    ds = pydicom.dcmread(huge)
    # 4096x4096 is the largest slice taken; 1 MB of pixel data caps the frame count at
    # 2**20: 16.7 Mpixel x 2 bytes x 2**20 frames is 35 TB, beyond any test filesystem.
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = 999999999
    ds.PixelData = bytes(2**20)
    ds.save_as(huge)
    capacity = shutil.disk_usage(tmp_path).total
    assert capacity < 4096 * 4096 * 2 * 2**20
    good = make_ct_series(tmp_path, n=2, size=32, seed=3, subdir="good")
    with scu_association(node.port, [CT]) as assoc:
        for path in [frames, huge, *good]:
            assert assoc.send_c_store(path).Status == receive.SUCCESS, path

    node.wait_done(series_uid(good[0]), n_instances=2)

    def failed(path: Path) -> JobInfo:
        uid = series_uid(path)
        return wait_for(
            lambda: next((j for j in node.jobs_of(uid) if j.state == JobState.FAILED), None),
            timeout=JOB_TIMEOUT_S,
            what=f"the job of {path.parent.name} to fail",
            details=lambda: f"{_jobs_summary(node.db)}\n{node.serve.log()[-3000:]}",
        )

    frames_job, huge_job = failed(frames), failed(huge)
    assert "999999999 frames" in (frames_job.error or ""), frames_job.error
    assert "more than the spool's filesystem can ever hold" in (huge_job.error or "")
    assert not any("waiting for disk space" in (j.error or "") for j in node.db.list_jobs())


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return res.returncode == 0


def test_real_enospc_while_writing_derived_defers_the_jobs_and_they_resume(
    tmp_path: Path, untrained_weights: Path
) -> None:
    """The derived folder on a full filesystem: writes fail with errno 28 (inside
    pydicom's writer, which loses the errno). The jobs go back to the queue with the
    reason and finish by themselves once there is room."""
    from ldct_node.model.cascade import Cascade
    from ldct_node.service.worker import Worker

    settings = node_settings(tmp_path, series={"stable_seconds": 0})
    derived = Path(settings.spool_path) / "derived"
    if not _mount_tmpfs(derived, "512k"):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        with running_receiver(settings) as node:
            filler = derived / "filler.bin"
            with filler.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
                while True:  # until the filesystem is full (ENOSPC)
                    fh.write(b"\0" * 4096)
            assert shutil.disk_usage(derived).free < 64 * 1024
            uids = []
            with scu_association(node.port, [CT]) as assoc:
                for k in range(3):
                    files = make_ct_series(tmp_path, n=2, size=64, seed=k, subdir=f"s{k}")
                    uids.append(series_uid(files[0]))
                    for path in files:
                        assert assoc.send_c_store(path).Status == receive.SUCCESS
            assert len(node.db.promote_stable_series(stable_seconds=0)) == 3
            cascade = Cascade.load(untrained_weights, batch_size=2, device="cpu")
            worker = Worker(settings, node.db, node.spool, cascade, space_backoff_seconds=0.05)
            tried: list[JobState | None] = []
            deadline = time.monotonic() + 60
            while tried.count(JobState.QUEUED) < 2 and time.monotonic() < deadline:
                tried.append(worker.run_once())  # None while it waits (backoff, space)
                time.sleep(0.05)
            assert tried.count(JobState.QUEUED) == 2, tried  # two tried: both deferred
            jobs = node.db.list_jobs()
            assert [j.state for j in jobs] == [JobState.QUEUED] * 3
            deferred = [j for j in jobs if j.error]
            assert len(deferred) == 2
            assert all("waiting for disk space" in (j.error or "") for j in deferred)
            assert all("no space left on the device" in (j.error or "") for j in deferred), deferred
            assert [p.name for p in derived.iterdir()] == ["filler.bin"]  # nothing half-written
            assert node.db.status_summary().last_errors[0].error.startswith("waiting")

            filler.unlink()
            thread = threading.Thread(target=worker.run_forever, args=(0.1,), daemon=True)
            freed = time.monotonic()
            thread.start()
            try:
                wait_for(
                    lambda: all(j.state == JobState.DONE for j in node.db.list_jobs()),
                    timeout=120,
                    what="every job done",
                    details=lambda: str(_jobs_summary(node.db)),
                )
            finally:
                worker.stop()
                thread.join(timeout=60)
            print(f"3 jobs done {time.monotonic() - freed:.1f} s after space came back")
            assert all(j.error is None and j.n_instances == 2 for j in node.db.list_jobs())
    finally:
        subprocess.run(["umount", "-l", str(derived)], check=False, capture_output=True)
