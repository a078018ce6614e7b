"""The whole node as operators run it: ``ldct-node serve`` as a subprocess, DCMTK
``storescu`` as the scanner, DCMTK ``storescp`` as the PACS, the admin CLI on the side.

Everything is on 127.0.0.1 with free ports; every wait is bounded; every process is
stopped by the fixture or context manager that started it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pynetdicom
import pytest
from _dicom_util import hu_of, make_ct_series
from _net_util import LOOPBACK, free_port, raw_part10, scu_association
from _node_util import (
    Pacs,
    Serve,
    cli,
    echo_ok,
    needs_storescp,
    serving,
    start_serve,
    stop_serve,
    storescp,
    storescu,
    wait_for,
    write_config,
)
from pydicom.uid import UID, generate_uid

from ldct_node.config import Settings, load_settings
from ldct_node.dicom.io import decode_hu
from ldct_node.model.cascade import Cascade
from ldct_node.pipeline import profile_image
from ldct_node.store import Database, JobInfo, JobState

pytestmark = [needs_storescp, pytest.mark.slow]

CT = UID("1.2.840.10008.5.1.4.1.1.2")
MR = UID("1.2.840.10008.5.1.4.1.1.4")
JOB_TIMEOUT_S = 120


@dataclass
class RunningNode:
    serve: Serve
    settings: Settings
    config: Path
    db: Database

    @property
    def port(self) -> int:
        return self.settings.node.port

    def job(self, series_uid: str) -> JobInfo | None:
        jobs = [j for j in self.db.list_jobs() if j.series_instance_uid == series_uid]
        assert len(jobs) <= 1, f"more than one job for series {series_uid}: {jobs}"
        return jobs[0] if jobs else None

    def wait_job(self, series_uid: str, *states: str, n_instances: int | None = None) -> JobInfo:
        def probe() -> JobInfo | None:
            job = self.job(series_uid)
            if job is None or job.state not in states:
                return None
            if n_instances is not None and job.n_instances != n_instances:
                return None
            return job

        return wait_for(
            probe,
            timeout=JOB_TIMEOUT_S,
            interval=0.05,
            what=f"job of series {series_uid} to be {'/'.join(states)}",
            details=lambda: f"job: {self.job(series_uid)}\nnode log:\n{self.serve.log()[-4000:]}",
        )


def send_ok(node: RunningNode, *files: Path) -> None:
    result = storescu(node.port, *files)
    assert result.returncode == 0, result.stdout + result.stderr


def series_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    with storescp(tmp_path_factory.mktemp("pacs") / "received") as running:
        yield running


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, untrained_weights: Path, pacs: Pacs
) -> Iterator[RunningNode]:
    folder = tmp_path_factory.mktemp("node")
    config = write_config(
        folder,
        untrained_weights,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port}],
    )
    settings = load_settings(config)
    with serving(config, settings.node.port) as serve:
        db = Database(settings.database_url)
        try:
            yield RunningNode(serve, settings, config, db)
        finally:
            db.close()


def test_series_in_derived_series_out(
    tmp_path: Path, node: RunningNode, pacs: Pacs, untrained_weights: Path
) -> None:
    assert echo_ok(node.port, "LDCT_NODE")  # DCMTK echoscu -> the node
    files = make_ct_series(tmp_path, n=6, size=64, series_number=3)
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f) for f in files)}
    source_series = series_uid_of(files[0])
    send_ok(node, *files)

    job = node.wait_job(source_series, JobState.DONE)
    assert job.n_instances == 6 and job.attempts == 1
    derived = pacs.of_series(job.derived_series_uid or "")
    assert len(derived) == 6
    assert len({ds.SOPInstanceUID for ds in derived}) == 6
    assert not {ds.SOPInstanceUID for ds in derived} & set(sources)
    assert job.derived_series_uid != source_series

    first = next(iter(sources.values()))
    for ds in derived:  # the derived-series rules
        src = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        purpose = ds.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]
        assert purpose.CodeValue == "121322"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert int(ds.SeriesNumber) == 1003
        assert ds.SeriesDescription == "LDCT test [LDCT denoised]"
        assert ds.StudyInstanceUID == first.StudyInstanceUID
        assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert ds.PatientID == first.PatientID
        assert ds.ImagePositionPatient == src.ImagePositionPatient
        assert ds.InstanceNumber == src.InstanceNumber
        assert "test-untrained" in ds.DerivationDescription
        assert ds.DerivationCodeSequence[0].CodeValue
        assert ds.ContributingEquipmentSequence[0].Manufacturer
        assert ds.ImageComments == node.settings.dicom.image_comments
        assert ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")

    # The pixels are the cascade's output for the source (same weights, same batches).
    cascade = Cascade.load(untrained_weights, batch_size=node.settings.model.batch_size)
    hus = np.stack([hu_of(f) for f in files])
    expected = cascade.denoise(hus)
    profile = node.settings.outputs[0]  # and its CT-number fidelity step
    want = {
        ds.SOPInstanceUID: profile_image(ds, hus[i], expected[i], profile)
        for i, ds in enumerate(pydicom.dcmread(f) for f in files)
    }
    for ds in derived:
        got = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept
        )
        target = want[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert np.max(np.abs(got - target)) <= 1.0
    # ...and not a copy of the source pixels.
    source_hu = {pydicom.dcmread(f).SOPInstanceUID: hu_of(f) for f in files}
    changed = []
    for ds in derived:
        source = source_hu[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        changed.append(float(np.mean(np.abs(decode_hu(ds) - source))))
    assert min(changed) > 1.0, changed

    # The admin CLI sees the same.
    result = cli("status", "--config", node.config, "--json")
    status = json.loads(result.stdout)
    assert result.returncode == (0 if status["healthy"] else 1), result.stderr
    assert status["counts"]["done"] >= 1 and status["done_last_hour"] >= 1
    result = cli("jobs", "--config", node.config, "--json")
    assert result.returncode == 0, result.stderr
    (row,) = [r for r in json.loads(result.stdout) if r["id"] == job.id]
    assert row["state"] == "done"
    assert [(f["destination"], f["state"], f["n_sent"]) for f in row["forwards"]] == [
        ("pacs", "sent", 6)
    ]
    result = cli("echo", "pacs", "--config", node.config)
    assert result.returncode == 0 and "succeeded" in result.stdout


def test_duplicate_send_changes_nothing(tmp_path: Path, node: RunningNode, pacs: Pacs) -> None:
    files = make_ct_series(tmp_path, n=3, size=32, subdir="dup")
    uid = series_uid_of(files[0])
    send_ok(node, *files)
    job = node.wait_job(uid, JobState.DONE)

    send_ok(node, *files)  # the very same instances again
    again = node.job(uid)
    assert again is not None
    assert (again.state, again.attempts, again.source_instances) == ("done", 1, 3)

    # Let the node go through another series; the duplicate still triggered nothing.
    other = make_ct_series(tmp_path, n=2, size=32, subdir="other")
    send_ok(node, *other)
    node.wait_job(series_uid_of(other[0]), JobState.DONE)
    final = node.job(uid)
    assert final is not None and (final.state, final.attempts) == ("done", 1)
    delivered = pacs.of_series(job.derived_series_uid or "")
    assert len(delivered) == 3 and len({ds.SOPInstanceUID for ds in delivered}) == 3


def test_series_split_over_two_associations_is_one_job(
    tmp_path: Path, node: RunningNode, pacs: Pacs
) -> None:
    files = make_ct_series(tmp_path, n=6, size=32, subdir="split")
    uid = series_uid_of(files[0])
    send_ok(node, *files[:3])
    send_ok(node, *files[3:])
    job = node.wait_job(uid, JobState.DONE, n_instances=6)  # one job (checked by .job())
    delivered = {ds.SOPInstanceUID for ds in pacs.of_series(job.derived_series_uid or "")}
    assert len(delivered) == 6


def test_instances_arriving_after_the_job_ran_reprocess_the_series(
    tmp_path: Path, node: RunningNode, pacs: Pacs
) -> None:
    files = make_ct_series(tmp_path, n=5, size=32, subdir="late")
    uid = series_uid_of(files[0])
    send_ok(node, *files[:3])
    first = node.wait_job(uid, JobState.DONE, n_instances=3)
    assert len(pacs.of_series(first.derived_series_uid or "")) == 3

    send_ok(node, *files[3:])
    reopened = node.job(uid)
    assert reopened is not None and reopened.state == JobState.RECEIVING  # at once

    second = node.wait_job(uid, JobState.DONE, n_instances=5)
    assert second.attempts == 2
    assert second.derived_series_uid == first.derived_series_uid  # same derived series
    delivered = pacs.of_series(second.derived_series_uid or "")
    # Re-delivered as a whole: PACS deduplicates by SOPInstanceUID.
    assert len(delivered) == 3 + 5
    assert len({ds.SOPInstanceUID for ds in delivered}) == 5


def test_unsupported_sop_class_is_rejected_and_the_node_keeps_serving(
    tmp_path: Path, node: RunningNode
) -> None:
    (ct,) = make_ct_series(tmp_path, n=1, size=16, subdir="mr")
    mr = pydicom.dcmread(ct)
    mr.SOPClassUID = MR
    mr.Modality = "MR"
    mr.SeriesInstanceUID = generate_uid()
    mr.SOPInstanceUID = generate_uid()
    mr.file_meta.MediaStorageSOPClassUID = MR
    mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
    mr_path = tmp_path / "mr.dcm"
    mr.save_as(mr_path, enforce_file_format=True)

    result = storescu(node.port, mr_path)
    assert result.returncode != 0  # no presentation context for MR
    assert node.job(str(mr.SeriesInstanceUID)) is None
    assert node.serve.alive() and echo_ok(node.port, "LDCT_NODE")


def test_corrupt_data_fails_cleanly_and_the_node_keeps_serving(
    tmp_path: Path, node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1. A dataset that cannot be parsed: refused with a failure status.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    garbage = raw_part10(
        tmp_path / "garbage.dcm",
        b"\x08\x00\x18\x00UI\xf0\xff1.2.3" + bytes(range(256)),
        sop_class_uid=CT,
        sop_instance_uid="1.2.3.999",
    )
    with scu_association(node.port, [CT]) as assoc:
        assert assoc.is_established
        status = assoc.send_c_store(garbage).Status
    assert (status >> 12) in (0xA, 0xC), hex(status)

    # 2. A series whose pixel data is broken: accepted, then the job fails with a reason.
    broken_files = make_ct_series(tmp_path, n=3, size=32, subdir="broken")
    broken = pydicom.dcmread(broken_files[1])
    broken.PixelData = broken.PixelData[:100]
    broken.save_as(broken_files[1], enforce_file_format=True)
    send_ok(node, *broken_files)
    failed = node.wait_job(series_uid_of(broken_files[0]), JobState.FAILED)
    assert failed.error is not None
    assert str(broken.SOPInstanceUID) in failed.error and "Re-send" in failed.error

    # 3. The node goes on: a valid series afterwards completes.
    good = make_ct_series(tmp_path, n=2, size=32, subdir="good")
    send_ok(node, *good)
    node.wait_job(series_uid_of(good[0]), JobState.DONE)
    assert node.serve.alive()

    result = cli("status", "--config", node.config, "--json")
    status = json.loads(result.stdout)
    assert result.returncode == 1 and status["healthy"] is False
    assert any(e["job_id"] == failed.id for e in status["last_errors"])


# --------------------------------------------------------------------- own node per test


def test_destination_down_then_up(tmp_path: Path, untrained_weights: Path) -> None:
    pacs_port = free_port()
    config = write_config(
        tmp_path / "node",
        untrained_weights,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs_port}],
        forward={"max_attempts": 50, "backoff_seconds": [1]},
    )
    settings = load_settings(config)
    files = make_ct_series(tmp_path, n=2, size=32)
    uid = series_uid_of(files[0])
    with serving(config, settings.node.port) as serve:
        db = Database(settings.database_url)
        running = RunningNode(serve, settings, config, db)
        try:
            send_ok(running, *files)

            def failing_forward() -> JobInfo | None:
                job = running.job(uid)
                if job and job.state == JobState.FORWARDING and job.forwards[0].last_error:
                    return job
                return None

            wait_for(failing_forward, timeout=JOB_TIMEOUT_S, what="a failed forward attempt")
            result = cli("status", "--config", config, "--json")
            status = json.loads(result.stdout)
            assert result.returncode == 1 and status["pending_forwards"] == 1
            (fwd,) = status["forward_errors"]
            assert fwd["destination"] == "pacs" and "no association" in fwd["last_error"]

            with storescp(tmp_path / "pacs", port=pacs_port) as pacs:
                job = running.wait_job(uid, JobState.DONE)
                assert len(pacs.of_series(job.derived_series_uid or "")) == 2
            assert job.forwards[0].attempts >= 2 and job.forwards[0].last_error is None
        finally:
            db.close()
        assert cli("status", "--config", config).returncode == 0


def test_restart_resumes_and_sigterm_is_clean(tmp_path: Path, untrained_weights: Path) -> None:
    with storescp(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path / "node",
            untrained_weights,
            model={"batch_size": 1},  # many small batches: time to catch the job running
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port}
            ],
        )
        settings = load_settings(config)
        port = settings.node.port
        files = make_ct_series(tmp_path, n=20, size=128)
        uid = series_uid_of(files[0])
        db = Database(settings.database_url)
        try:

            def running_with(attempts: int) -> JobInfo | None:
                jobs = [j for j in db.list_jobs() if j.series_instance_uid == uid]
                if jobs and jobs[0].state == JobState.RUNNING and jobs[0].attempts == attempts:
                    return jobs[0]
                return None

            # 1. SIGKILL while the job runs: the row stays 'running'.
            first = start_serve(config, port, tag="-1")
            try:
                result = storescu(port, *files)
                assert result.returncode == 0, result.stderr
                wait_for(lambda: running_with(1), timeout=JOB_TIMEOUT_S, interval=0.05,
                         what="the job to run", details=first.log)  # fmt: skip
                first.signal(signal.SIGKILL)
                assert first.wait(30) == -signal.SIGKILL
            finally:
                stop_serve(first)
            killed = db.list_jobs()[0]
            assert killed.state == JobState.RUNNING

            # 2. Restart: the job is re-queued and runs again; SIGTERM now exits 0 and
            # hands the job back (or lets it finish).
            second = start_serve(config, port, tag="-2")
            try:
                wait_for(lambda: running_with(2), timeout=JOB_TIMEOUT_S, interval=0.05,
                         what="the job to run again", details=second.log)  # fmt: skip
                second.signal(signal.SIGTERM)
                assert second.wait(120) == 0, second.log()[-3000:]
            finally:
                stop_serve(second)
            after_term = db.list_jobs()[0]
            assert after_term.state in (JobState.QUEUED, JobState.FORWARDING, JobState.DONE)
            if after_term.state == JobState.QUEUED:
                assert "interrupted by shutdown; queued again" in second.log()
            assert "Traceback" not in second.log()

            # 3. Next start delivers the whole series.
            with serving(config, port, tag="-3") as third:
                running = RunningNode(third, settings, config, db)
                done = running.wait_job(uid, JobState.DONE, n_instances=20)
                delivered = pacs.of_series(done.derived_series_uid or "")
                assert len({ds.SOPInstanceUID for ds in delivered}) == 20
            assert third.process.returncode == 0
        finally:
            db.close()
