"""worker.py (the job loop: claim, denoise once, write derived, hand on) and the
scheduler's duties."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _dicom_util import hu_of, make_ct_series
from _net_util import LOOPBACK, Node, node_settings, running_receiver, scu_association
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from ldct_node.config import Settings
from ldct_node.dicom.io import InputError, decode_hu
from ldct_node.model.cascade import Cascade
from ldct_node.pipeline import profile_image, run_cascade
from ldct_node.service.forward import Forwarder
from ldct_node.service.scheduler import (
    NodeScheduler,
    forward_interval,
    purge_expired,
    stability_interval,
)
from ldct_node.service.spool import Spool
from ldct_node.service.worker import Worker
from ldct_node.store import Database, JobState, ReceivedInstance

PACS = {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": 4242}


@pytest.fixture(scope="module")
def cascade(untrained_weights: Path) -> Cascade:
    return Cascade.load(untrained_weights, batch_size=2, device="cpu")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with running_receiver(node_settings(tmp_path, destinations=[PACS])) as running:
        yield running


def send(node: Node, files: list[Path]) -> None:
    with scu_association(node.port, [CTImageStorage]) as assoc:
        assert assoc.is_established
        for path in files:
            assert assoc.send_c_store(path).Status == 0x0000


def queue_all(node: Node) -> list[int]:
    return node.db.promote_stable_series(stable_seconds=0)


def worker_for(
    node: Node, cascade: Cascade, settings: Settings | None = None, **kw: object
) -> Worker:
    return Worker(settings or node.settings, node.db, node.spool, cascade, **kw)  # type: ignore[arg-type]


def test_job_is_denoised_written_and_handed_to_forwarding(
    tmp_path: Path, node: Node, cascade: Cascade
) -> None:
    files = make_ct_series(tmp_path, n=4, size=32, series_number=7)
    send(node, files)
    (job_id,) = queue_all(node)
    woken: list[bool] = []
    worker = worker_for(node, cascade, on_forwarding=lambda: woken.append(True))

    assert worker.run_once() == JobState.FORWARDING
    assert woken == [True]
    assert worker.run_once() is None  # nothing else queued

    job = node.db.get_job(job_id)
    assert job.state == JobState.FORWARDING and job.attempts == 1 and job.n_instances == 4
    assert [(f.destination, f.state) for f in job.forwards] == [("pacs", "pending")]
    out_dir = Path(job.output_dir or "")
    assert out_dir.is_relative_to(node.spool.derived / f"job-{job_id}")
    derived = [pydicom.dcmread(p) for p in sorted(out_dir.glob("*.dcm"))]
    assert len(derived) == 4
    assert {ds.SeriesInstanceUID for ds in derived} == {job.derived_series_uid}
    assert {int(ds.SeriesNumber) for ds in derived} == {1007}
    assert all(list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] for ds in derived)

    # The pixels are the cascade's output for the source slices (in slice order).
    source = np.stack([hu_of(f) for f in files])
    expected = cascade.denoise(source)
    by_source = {
        ds.SourceImageSequence[0].ReferencedSOPInstanceUID: decode_hu(ds) for ds in derived
    }
    profile = node.settings.outputs[0]  # after its CT-number fidelity step
    for path, hu, out in zip(files, source, expected, strict=True):
        src = pydicom.dcmread(path)
        want = profile_image(src, hu, out, profile)
        got = by_source[src.SOPInstanceUID]
        assert np.max(np.abs(got - np.rint(want))) <= 1.0


def test_without_destinations_the_job_is_done(tmp_path: Path, cascade: Cascade) -> None:
    with running_receiver(node_settings(tmp_path)) as node:
        send(node, make_ct_series(tmp_path, n=2, size=16))
        (job_id,) = queue_all(node)
        assert worker_for(node, cascade).run_once() == JobState.DONE
        assert node.db.get_job(job_id).forwards == ()


def test_undecodable_instance_fails_the_job_and_the_next_job_runs(
    tmp_path: Path, node: Node, cascade: Cascade
) -> None:
    bad_series = make_ct_series(tmp_path, n=3, size=16, subdir="bad")
    broken = pydicom.dcmread(bad_series[1])
    broken.PixelData = broken.PixelData[:100]  # the header parses, the pixels do not
    broken.save_as(bad_series[1], enforce_file_format=True)
    send(node, bad_series)
    (bad_job,) = queue_all(node)
    send(node, make_ct_series(tmp_path, n=2, size=16, subdir="good"))
    (good_job,) = queue_all(node)

    worker = worker_for(node, cascade)
    assert worker.run_once() == JobState.FAILED
    job = node.db.get_job(bad_job)
    assert job.state == JobState.FAILED
    assert job.error is not None
    assert str(broken.SOPInstanceUID) in job.error  # which instance
    assert "pixel data" in job.error  # what is wrong with it
    assert "Re-send the series" in job.error  # what to do
    assert job.forwards == ()

    assert worker.run_once() == JobState.FORWARDING
    assert node.db.get_job(good_job).state == JobState.FORWARDING


def test_stop_hands_the_running_job_back_to_the_queue(
    tmp_path: Path, node: Node, cascade: Cascade
) -> None:
    send(node, make_ct_series(tmp_path, n=2, size=16))
    (job_id,) = queue_all(node)
    worker = worker_for(node, cascade)
    job = node.db.claim_next_job(worker.worker_id)
    assert job is not None and job.id == job_id
    worker.stop()
    assert worker.process(job) == JobState.QUEUED
    after = node.db.get_job(job_id)
    assert after.state == JobState.QUEUED and after.worker_id is None
    assert after.derived_series_uid is None
    # A stopped worker claims nothing more; a fresh one picks the job up again.
    assert worker.run_once() is None
    assert worker_for(node, cascade).run_once() == JobState.FORWARDING
    assert node.db.get_job(job_id).attempts == 2


def test_hand_back_leaves_a_job_taken_over_by_another_worker_alone(
    tmp_path: Path, node: Node, cascade: Cascade
) -> None:
    send(node, make_ct_series(tmp_path, n=1, size=16))
    queue_all(node)
    worker = worker_for(node, cascade, worker_id="me")
    job = node.db.claim_next_job("someone-else")
    assert job is not None
    worker.stop()
    worker.process(job)  # "me" never owned it: the row must stay as it is
    assert node.db.get_job(job.id).state == JobState.RUNNING
    assert node.db.get_job(job.id).worker_id == "someone-else"


def test_cancel_while_running_discards_the_output(
    tmp_path: Path, node: Node, cascade: Cascade
) -> None:
    send(node, make_ct_series(tmp_path, n=4, size=16))
    (job_id,) = queue_all(node)
    worker = worker_for(node, cascade, heartbeat_seconds=0.02)
    job = node.db.claim_next_job(worker.worker_id)
    assert job is not None
    node.db.cancel_job(job_id)
    assert worker.process(job) == JobState.CANCELLED
    after = node.db.get_job(job_id)
    assert after.state == JobState.CANCELLED and after.forwards == ()
    assert not (node.spool.derived / f"job-{job_id}").exists()


def test_series_growing_while_running_is_reprocessed_as_a_whole(
    tmp_path: Path, node: Node, cascade: Cascade
) -> None:
    files = make_ct_series(tmp_path, n=5, size=16)
    send(node, files[:3])
    (job_id,) = queue_all(node)
    worker = worker_for(node, cascade)
    job = node.db.claim_next_job(worker.worker_id)
    assert job is not None
    send(node, files[3:])  # arrives while the job runs
    assert worker.process(job) == JobState.RECEIVING
    first_uid = node.db.get_job(job_id).derived_series_uid

    assert queue_all(node) == [job_id]
    assert worker.run_once() == JobState.FORWARDING
    job_after = node.db.get_job(job_id)
    assert job_after.n_instances == 5 and job_after.attempts == 2
    assert job_after.derived_series_uid == first_uid  # deterministic: PACS deduplicates
    assert len(list(Path(job_after.output_dir or "").glob("*.dcm"))) == 5


def test_profile_missing_from_config_fails_with_a_hint(
    tmp_path: Path, node: Node, cascade: Cascade
) -> None:
    send(node, make_ct_series(tmp_path, n=1, size=16))
    (job_id,) = queue_all(node)
    other = node_settings(tmp_path, outputs=[{"name": "other"}])
    assert worker_for(node, cascade, settings=other).run_once() == JobState.FAILED
    error = node.db.get_job(job_id).error or ""
    assert "'denoised' is no longer configured" in error and "[[outputs]]" in error


def test_run_forever_processes_and_stops(tmp_path: Path, node: Node, cascade: Cascade) -> None:
    worker = worker_for(node, cascade)
    thread = threading.Thread(target=worker.run_forever, kwargs={"poll_seconds": 0.05})
    thread.start()
    try:
        send(node, make_ct_series(tmp_path, n=2, size=16))
        (job_id,) = queue_all(node)
        worker.wake()
        deadline = threading.Event()
        for _ in range(600):
            if node.db.get_job(job_id).state == JobState.FORWARDING:
                break
            deadline.wait(0.05)
        assert node.db.get_job(job_id).state == JobState.FORWARDING
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_worker_argument_checks(node: Node, cascade: Cascade) -> None:
    with pytest.raises(ValueError, match="heartbeat_seconds"):
        worker_for(node, cascade, heartbeat_seconds=0)
    with pytest.raises(ValueError, match="poll_seconds"):
        worker_for(node, cascade).run_forever(poll_seconds=0)


# ------------------------------------------------------------------------------ scheduler


def test_sweep_intervals() -> None:
    assert stability_interval(30) == 1.0
    assert stability_interval(1) == 0.25
    assert stability_interval(0) == 0.2
    assert forward_interval([10, 30]) == 1.0
    assert forward_interval([0.5, 10]) == 0.5
    assert forward_interval([0]) == 0.2


def test_scheduler_queues_stable_series_and_wakes_the_worker(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, series={"stable_seconds": 0.3})
    with running_receiver(settings) as node:
        woken = threading.Event()
        scheduler = NodeScheduler(
            settings, node.db, node.spool, Forwarder(settings, node.db), on_queued=woken.set
        )
        scheduler.start()
        try:
            send(node, make_ct_series(tmp_path, n=2, size=16))
            assert woken.wait(20)
        finally:
            scheduler.shutdown()
        (job,) = node.db.list_jobs()
        assert job.state == JobState.QUEUED
        scheduler.shutdown()  # idempotent


def test_purge_never_deletes_outside_the_spool(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    db = Database(settings.database_url)
    db.create_schema()
    spool = Spool(settings.spool_path)
    # A series recorded from files that are not in the (current) spool.
    outside = make_ct_series(tmp_path, n=1, size=16, subdir="elsewhere")
    ds = pydicom.dcmread(outside[0], stop_before_pixels=True)
    db.record_instance(
        ReceivedInstance(
            sop_instance_uid=ds.SOPInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            study_instance_uid=ds.StudyInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            path=outside[0],
            modality="CT",
        ),
        ["denoised"],
    )
    (job_id,) = db.promote_stable_series(stable_seconds=0)
    assert db.claim_next_job("test") is not None
    db.finish_processing(job_id, "1.2.3", tmp_path / "elsewhere", 1, [])
    report = purge_expired(db, spool, 0)
    assert (report.series, report.skipped) == (0, 1)
    assert outside[0].exists()
    assert db.get_job(job_id).purged_at is None
    with pytest.raises(ValueError, match="older_than_days"):
        purge_expired(db, spool, -1)
    db.close()


def test_run_cascade_batches_by_decoded_size_in_series_order(
    tmp_path: Path, cascade: Cascade
) -> None:
    small = make_ct_series(tmp_path / "a", n=3, size=32)
    large = make_ct_series(tmp_path / "b", n=2, size=48, seed=1)
    # Sizes alternate: each batch must hold one size only, and the output keep the order.
    datasets = [pydicom.dcmread(p) for p in (small[0], large[0], small[1], small[2], large[1])]
    finished: list[int] = []
    out = run_cascade(datasets, cascade, on_instance=lambda i, _h, _d: finished.append(i))
    assert sorted(finished) == list(range(5))
    for ds, src, den in zip(datasets, out.hu, out.denoised, strict=True):
        np.testing.assert_array_equal(src, decode_hu(ds))
        assert den.shape == src.shape
        np.testing.assert_allclose(den, cascade.denoise(src[None])[0], atol=0.5)


def test_run_cascade_garbage_geometry_header_is_an_input_error(
    tmp_path: Path, cascade: Cascade
) -> None:
    # Found by the fuzz test: Rows sent with VR SQ once reached the batching as a
    # Sequence and the job ended as an "internal error" instead of a clear reason.
    path = make_ct_series(tmp_path, n=1, size=32)[0]
    ds = pydicom.dcmread(path)
    ds["Rows"] = pydicom.DataElement(0x00280010, "SQ", pydicom.Sequence([]))
    with pytest.raises(InputError):
        run_cascade([ds], cascade)


def test_a_corrupt_pixel_element_vr_is_sized_by_its_file_then_refused_clearly(
    tmp_path: Path,
) -> None:
    """The receiver reads the header up to the pixel data, so an instance whose pixel
    element's VR is corrupt is stored; sizing the derived series falls back to the file's
    size (it raised NotImplementedError, which failed the job as an internal error), and
    decoding refuses the instance with an InputError that names it."""
    from ldct_node.service.worker import _series_bytes

    (path,) = make_ct_series(tmp_path, n=1, size=32)
    data = path.read_bytes()
    at = data.rfind(b"\xe0\x7f\x10\x00")
    path.write_bytes(data[: at + 4] + b"O\xbc" + data[at + 6 :])
    ds = pydicom.dcmread(path)
    assert _series_bytes([ds], [path]) == path.stat().st_size
    with pytest.raises(InputError, match="pixel data element cannot be read"):
        decode_hu(ds)
