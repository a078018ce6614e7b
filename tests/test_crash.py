"""Crash safety: ``ldct-node serve`` is SIGKILLed mid-receive, mid-denoise and
mid-forward, restarted, and every instance that got a success status must end up
processed and delivered, each derived SOP instance exactly once in the destination's
final set (deterministic UIDs make re-deliveries idempotent), nothing missing.

The scanner is a pynetdicom SCU in this process (it counts the success statuses it
got); the PACS is a recording pynetdicom SCP (it counts every receipt, re-deliveries
included). The figures of each phase are printed (``pytest -s``) for the release note.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from _dicom_util import make_ct_series
from _net_util import LOOPBACK, scu_association
from _node_util import Serve, start_serve, stop_serve, wait_for, write_config
from _pacs_util import RecordingPacs, recording_pacs
from pydicom.uid import UID

from ldct_node.config import Settings, load_settings
from ldct_node.store import Database, JobInfo, JobState

pytestmark = pytest.mark.slow

CT = UID("1.2.840.10008.5.1.4.1.1.2")
JOB_TIMEOUT_S = 180


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def send_each(
    port: int, files: list[Path], on_ack: Callable[[int], None] | None = None
) -> set[str]:
    """C-STORE ``files`` one by one over one association; the SOP UIDs acknowledged 0x0000.

    Stops at the first C-STORE without a response (the node died): that instance and
    the rest count as not acknowledged, as a modality would see it.
    """
    acked: set[str] = set()
    with scu_association(port, [CT], calling_aet="MODALITY") as assoc:
        if not assoc.is_established:
            return acked
        for path in files:
            try:
                status = assoc.send_c_store(path)
            except RuntimeError:  # association gone (aborted by the peer's death)
                break
            if "Status" not in status:
                break  # no response
            if int(status.Status) == 0x0000:
                acked.add(sop_uid(path))
                if on_ack is not None:
                    on_ack(len(acked))
    return acked


@dataclass
class CrashRig:
    settings: Settings
    config: Path
    db: Database
    pacs: RecordingPacs
    starts: int = 0

    @property
    def port(self) -> int:
        return self.settings.node.port

    def start(self) -> Serve:
        self.starts += 1
        return start_serve(self.config, self.port, tag=f"-{self.starts}")

    def job(self, uid: str) -> JobInfo | None:
        jobs = [j for j in self.db.list_jobs() if j.series_instance_uid == uid]
        assert len(jobs) <= 1, f"more than one job for series {uid}: {jobs}"
        return jobs[0] if jobs else None

    def wait_job(self, serve: Serve, uid: str, predicate: Callable[[JobInfo], bool]) -> JobInfo:
        def probe() -> JobInfo | None:
            job = self.job(uid)
            return job if job is not None and predicate(job) else None

        return wait_for(
            probe,
            timeout=JOB_TIMEOUT_S,
            interval=0.05,
            what=f"job of series {uid}",
            details=lambda: f"job: {self.job(uid)}\nnode log:\n{serve.log()[-4000:]}",
        )

    def kill(self, serve: Serve) -> None:
        serve.signal(signal.SIGKILL)
        assert serve.wait(30) == -signal.SIGKILL
        stop_serve(serve)  # closes the log file

    def check_delivered(self, job: JobInfo, expected_sources: set[str]) -> dict[str, int]:
        """Every expected source instance delivered, each derived UID once in the final set."""
        derived = job.derived_series_uid or ""
        receipts = self.pacs.of_series(derived)
        final = self.pacs.sop_uids(derived)
        # A source maps to exactly one derived SOP instance, however often it was redone.
        by_source: dict[str, set[str]] = {}
        for receipt in receipts:
            by_source.setdefault(receipt.source_sop_instance_uid, set()).add(
                receipt.sop_instance_uid
            )
        assert all(len(uids) == 1 for uids in by_source.values()), by_source
        assert set(by_source) == expected_sources, "delivered sources != accepted sources"
        assert len(final) == len(expected_sources)
        return {"delivered": len(final), "receipts": len(receipts)}


@pytest.fixture
def rig(tmp_path: Path, untrained_weights: Path) -> Iterator[CrashRig]:
    with recording_pacs() as pacs:
        config = write_config(
            tmp_path / "node",
            untrained_weights,
            model={"batch_size": 1},  # many small batches: time to catch the job running
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port}
            ],
            forward={"max_attempts": 50, "backoff_seconds": [1]},
        )
        settings = load_settings(config)
        db = Database(settings.database_url)
        try:
            yield CrashRig(settings, config, db, pacs)
        finally:
            db.close()


def test_sigkill_mid_receive_mid_denoise_mid_forward_loses_nothing(
    tmp_path: Path, rig: CrashRig
) -> None:
    figures: dict[str, dict[str, int]] = {}
    spool_tmp = rig.settings.spool_path / "tmp"

    # -- 1. mid-receive: killed while the modality is still sending -------------------
    files_a = make_ct_series(tmp_path, n=16, size=32, subdir="a", seed=1)
    uid_a = series_uid(files_a[0])
    node = rig.start()
    try:
        got_some = threading.Event()
        killer = threading.Thread(target=lambda: got_some.wait(60) and rig.kill(node))
        killer.start()
        acked_a = send_each(rig.port, files_a, on_ack=lambda n: n == 6 and got_some.set())
        killer.join(60)
    finally:
        stop_serve(node)
    assert node.process.returncode == -signal.SIGKILL
    assert 6 <= len(acked_a) < len(files_a), "the kill did not land mid-association"

    node = rig.start()  # restart: what was acknowledged is processed and delivered
    try:
        job = rig.wait_job(node, uid_a, lambda j: j.state == JobState.DONE)
        stored = {sop_uid(p) for p in rig.db.job_instances(job.id)}
        # Acknowledged => stored. (One more may be stored: durable, not yet answered.)
        assert acked_a <= stored and len(stored) <= len(acked_a) + 1
        first = rig.check_delivered(job, stored)
        # The modality re-sends what it got no success for: now the whole series.
        rest = [p for p in files_a if sop_uid(p) not in acked_a]
        assert send_each(rig.port, rest) == {sop_uid(p) for p in rest}
        job = rig.wait_job(
            node, uid_a, lambda j: j.state == JobState.DONE and j.n_instances == len(files_a)
        )
        figures["mid-receive"] = {
            "sent": len(files_a),
            "acknowledged_before_kill": len(acked_a),
            "delivered_after_restart": first["delivered"],
            **rig.check_delivered(job, {sop_uid(p) for p in files_a}),
        }

        # -- 2. mid-denoise: killed while the job runs --------------------------------
        files_b = make_ct_series(tmp_path, n=20, size=128, subdir="b", seed=2)
        uid_b = series_uid(files_b[0])
        acked_b = send_each(rig.port, files_b)
        assert len(acked_b) == len(files_b)
        rig.wait_job(node, uid_b, lambda j: j.state == JobState.RUNNING)
        rig.kill(node)
    finally:
        stop_serve(node)
    job_b = rig.job(uid_b)
    assert job_b is not None and job_b.state == JobState.RUNNING

    node = rig.start()
    try:
        job_b = rig.wait_job(node, uid_b, lambda j: j.state == JobState.DONE)
        assert job_b.attempts == 2
        figures["mid-denoise"] = {
            "acknowledged": len(acked_b),
            **rig.check_delivered(job_b, acked_b),
        }

        # -- 3. mid-forward: killed while a slow PACS takes the derived series --------
        rig.pacs.delay_s = 0.2
        files_c = make_ct_series(tmp_path, n=16, size=32, subdir="c", seed=3)
        uid_c = series_uid(files_c[0])
        acked_c = send_each(rig.port, files_c)
        assert len(acked_c) == len(files_c)
        job_c = rig.wait_job(node, uid_c, lambda j: j.derived_series_uid is not None)
        derived_c = job_c.derived_series_uid or ""
        wait_for(
            lambda: len(rig.pacs.of_series(derived_c)) >= 4,
            timeout=JOB_TIMEOUT_S,
            what="the forward to be under way",
        )
        rig.kill(node)
    finally:
        stop_serve(node)
    partial = len(rig.pacs.sop_uids(derived_c))
    assert 4 <= partial < len(files_c), "the kill did not land mid-forward"
    job_c = rig.job(uid_c)
    assert job_c is not None and job_c.state == JobState.FORWARDING

    rig.pacs.delay_s = 0.0
    node = rig.start()
    try:
        job_c = rig.wait_job(node, uid_c, lambda j: j.state == JobState.DONE)
        figures["mid-forward"] = {
            "acknowledged": len(acked_c),
            "delivered_before_kill": partial,
            **rig.check_delivered(job_c, acked_c),
        }
        # Earlier series were not sent again by the restarts.
        for uid, n in ((uid_a, len(files_a)), (uid_b, len(files_b))):
            job = rig.job(uid)
            assert job is not None and job.state == JobState.DONE and job.n_instances == n
        assert list(spool_tmp.iterdir()) == []  # half-written files were cleaned at start
        assert "Traceback" not in node.log()
    finally:
        returncode = stop_serve(node)
    assert returncode == 0, node.log()[-3000:]

    for phase, numbers in figures.items():
        print(f"crash {phase}: " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    # Re-deliveries happened where the kill interrupted a forward, and PACS deduplicated.
    assert figures["mid-forward"]["receipts"] > figures["mid-forward"]["delivered"]
