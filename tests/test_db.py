"""The job database: state machine, claims, forwarding, re-runs, retention (real SQLite)."""

from __future__ import annotations

import logging
import multiprocessing
import stat
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ldct_node.store import (
    ALLOWED_TRANSITIONS,
    DEFAULT_LEASE_SECONDS,
    Database,
    JobNotFoundError,
    JobState,
    ReceivedInstance,
    TransitionError,
    check_transition,
)

T0 = datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
EVLE = "1.2.840.10008.1.2.1"
PROFILES = ["denoised"]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def inst(
    series: str, i: int, *, skip: str | None = None, z: float | None = None, sop: str = ""
) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=sop or f"{series}.{i}",
        series_instance_uid=series,
        study_instance_uid="1.2.9",
        sop_class_uid=CT,
        transfer_syntax_uid=EVLE,
        path=Path(f"/spool/incoming/{series}/{series}.{i}.dcm"),
        calling_aet="CT1",
        modality="CT",
        instance_number=i,
        z_position=z if z is not None else float(i),
        skip_reason=skip,
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'state' / 'jobs.db'}")
    database.create_schema()
    yield database
    database.close()


def running_job(
    db: Database, series: str = "1.5", n: int = 2, profiles: list[str] = PROFILES
) -> int:
    """A series received, stable and claimed: returns the job id (state running)."""
    for i in range(1, n + 1):
        db.record_instance(inst(series, i), profiles, now=at(0))
    db.promote_stable_series(at(100), stable_seconds=30)
    job = db.claim_next_job("w1", now=at(101))
    assert job is not None
    return job.id


def test_database_file_is_private_and_sqlite_is_configured(tmp_path: Path, db: Database) -> None:
    path = tmp_path / "state" / "jobs.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert (conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000


def test_first_processable_instance_creates_one_job_per_profile(db: Database) -> None:
    assert db.record_instance(inst("1.5", 1), ["soft", "sharp"], now=at(0))
    assert not db.record_instance(inst("1.5", 1), ["soft", "sharp"], now=at(1))  # duplicate
    assert db.record_instance(inst("1.5", 2), ["soft", "sharp"], now=at(2))
    jobs = db.list_jobs()
    assert sorted(j.profile for j in jobs) == ["sharp", "soft"]
    assert all(j.state == JobState.RECEIVING and j.source_instances == 2 for j in jobs)


def test_same_sop_under_another_series_keeps_the_first(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    db.record_instance(inst("1.5", 1, sop="7.7"), PROFILES, now=at(0))
    with caplog.at_level(logging.WARNING, logger="ldct_node.store"):
        assert not db.record_instance(inst("1.6", 1, sop="7.7"), PROFILES, now=at(1))
    assert "7.7" in caplog.text
    (job,) = db.list_jobs()
    assert job.series_instance_uid == "1.5"
    assert db.instance_path("7.7") == inst("1.5", 1).path


def test_skipped_instances_create_no_job_until_a_processable_one_arrives(db: Database) -> None:
    db.record_instance(inst("1.5", 1, skip="image type LOCALIZER"), PROFILES, now=at(0))
    assert db.list_jobs() == []
    db.record_instance(inst("1.5", 2), PROFILES, now=at(1))
    (job,) = db.list_jobs()
    assert job.source_instances == 1
    assert db.job_instances(job.id) == [inst("1.5", 2).path]


def test_promotion_waits_for_stable_seconds(db: Database) -> None:
    db.record_instance(inst("1.5", 1), PROFILES, now=at(0))
    db.record_instance(inst("1.5", 2), PROFILES, now=at(20))
    assert db.promote_stable_series(at(40), stable_seconds=30) == []
    (queued,) = db.promote_stable_series(at(50), stable_seconds=30)
    assert db.get_job(queued).state == JobState.QUEUED
    assert db.promote_stable_series(at(500), stable_seconds=30) == []


def test_full_lifecycle_to_done(db: Database) -> None:
    job_id = running_job(db)
    job = db.get_job(job_id)
    assert (job.state, job.worker_id, job.attempts) == (JobState.RUNNING, "w1", 1)
    assert db.heartbeat(job_id, "w1", now=at(110))
    state = db.finish_processing(
        job_id, "2.25.1", "/spool/derived/job-1", 2, ["pacs", "archive"], now=at(120)
    )
    assert state == JobState.FORWARDING
    due = db.due_forwards(at(121))
    assert sorted(f.destination for f in due) == ["archive", "pacs"]
    assert {f.output_dir for f in due} == {"/spool/derived/job-1"}
    assert (
        db.record_forward_result(job_id, "pacs", ok=True, n_sent=2, max_attempts=3, now=at(122))
        == JobState.FORWARDING
    )
    assert (
        db.record_forward_result(job_id, "archive", ok=True, n_sent=2, max_attempts=3, now=at(123))
        == JobState.DONE
    )
    done = db.get_job(job_id)
    assert done.finished_at == at(123)
    assert {f.state for f in done.forwards} == {"sent"}
    assert db.due_forwards(at(1000)) == []


def test_no_destinations_means_done_after_processing(db: Database) -> None:
    job_id = running_job(db)
    assert db.finish_processing(job_id, "2.25.1", "/out", 2, [], now=at(120)) == JobState.DONE


def test_forward_failure_backs_off_then_fails_the_job_with_the_peer_status(db: Database) -> None:
    job_id = running_job(db)
    db.finish_processing(job_id, "2.25.1", "/out", 2, ["pacs"], now=at(120))
    state = db.record_forward_result(
        job_id, "pacs", ok=False, n_sent=0, max_attempts=2,
        error="C-STORE status 0xA700", next_attempt_at=at(150), now=at(121),
    )  # fmt: skip
    assert state == JobState.FORWARDING
    assert db.due_forwards(at(149)) == []
    (due,) = db.due_forwards(at(150))
    assert (due.attempts, due.last_error) == (1, "C-STORE status 0xA700")
    state = db.record_forward_result(
        job_id,
        "pacs",
        ok=False,
        n_sent=1,
        max_attempts=2,
        error="C-STORE status 0xA700",
        now=at(151),
    )
    assert state == JobState.FAILED
    failed = db.get_job(job_id)
    assert "pacs" in (failed.error or "") and "0xA700" in (failed.error or "")
    assert db.due_forwards(at(10_000)) == []


def test_retry_resends_only_the_failed_destination(db: Database) -> None:
    job_id = running_job(db)
    db.finish_processing(job_id, "2.25.1", "/out", 2, ["pacs", "archive"], now=at(120))
    db.record_forward_result(job_id, "pacs", ok=True, n_sent=2, max_attempts=1, now=at(121))
    db.record_forward_result(
        job_id, "archive", ok=False, n_sent=0, max_attempts=1, error="refused", now=at(122)
    )
    assert db.get_job(job_id).state == JobState.FAILED

    db.retry_job(job_id, now=at(200))
    retried = db.get_job(job_id)
    assert retried.state == JobState.QUEUED and retried.error is None
    claimed = db.claim_next_job("w2", now=at(201))
    assert claimed is not None and claimed.id == job_id and claimed.attempts == 2
    # Deterministic UIDs: the same derived series again.
    assert (
        db.finish_processing(job_id, "2.25.1", "/out", 2, ["pacs", "archive"], now=at(210))
        == JobState.FORWARDING
    )
    assert [f.destination for f in db.due_forwards(at(211))] == ["archive"]
    assert (
        db.record_forward_result(job_id, "archive", ok=True, n_sent=2, max_attempts=1, now=at(212))
        == JobState.DONE
    )


def test_a_changed_derived_series_is_sent_everywhere_again(db: Database) -> None:
    job_id = running_job(db)
    db.finish_processing(job_id, "2.25.1", "/out", 2, ["pacs", "archive"], now=at(120))
    db.record_forward_result(job_id, "pacs", ok=True, n_sent=2, max_attempts=1, now=at(121))
    db.record_forward_result(
        job_id, "archive", ok=False, n_sent=0, max_attempts=1, error="x", now=at(122)
    )
    db.retry_job(job_id, now=at(200))
    db.claim_next_job("w2", now=at(201))
    db.finish_processing(job_id, "2.25.2", "/out", 2, ["pacs", "archive"], now=at(210))  # new model
    assert sorted(f.destination for f in db.due_forwards(at(211))) == ["archive", "pacs"]


def test_illegal_transitions_raise_naming_both_states(db: Database) -> None:
    job_id = running_job(db)
    db.finish_processing(job_id, "2.25.1", "/out", 2, [], now=at(120))
    with pytest.raises(TransitionError, match=r"done -> queued"):
        db.retry_job(job_id)
    with pytest.raises(TransitionError, match=r"done -> cancelled"):
        db.cancel_job(job_id)
    with pytest.raises(TransitionError, match=r"done -> failed"):
        db.fail_job(job_id, "boom")
    with pytest.raises(TransitionError, match=r"done -> forwarding"):
        db.finish_processing(job_id, "2.25.1", "/out", 2, [])
    with pytest.raises(ValueError, match="receiving -> done"):
        check_transition("receiving", "done", 5)
    with pytest.raises(JobNotFoundError):
        db.cancel_job(99_999)
    assert db.get_job(job_id).state == JobState.DONE  # nothing changed


def test_transition_table_covers_every_state() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(JobState)
    assert ALLOWED_TRANSITIONS[JobState.DONE] == {JobState.RECEIVING}


def test_claims_are_exclusive_across_threads(db: Database) -> None:
    for s in range(12):
        db.record_instance(inst(f"1.{s + 10}", 1), ["a", "b"], now=at(0))
    assert len(db.promote_stable_series(at(100), stable_seconds=1)) == 24
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := db.claim_next_job(name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert sorted(claimed) == sorted(j.id for j in db.list_jobs())
    assert Counter(claimed).most_common(1)[0][1] == 1
    assert {j.state for j in db.list_jobs()} == {JobState.RUNNING}


def _claim_all(url: str, name: str) -> list[int]:
    database = Database(url)
    try:
        ids = []
        while (job := database.claim_next_job(name)) is not None:
            ids.append(job.id)
        return ids
    finally:
        database.close()


def test_claims_are_exclusive_across_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    database = Database(url)
    database.create_schema()
    for s in range(15):
        database.record_instance(inst(f"1.{s + 10}", 1), ["a", "b"], now=at(0))
    database.promote_stable_series(at(100), stable_seconds=1)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_claim_all, [(url, "p1"), (url, "p2")], chunksize=1)
    claimed = [i for ids in results for i in ids]
    assert len(claimed) == 30
    assert len(set(claimed)) == 30
    database.close()


def test_requeue_running_at_startup(db: Database) -> None:
    job_id = running_job(db)
    assert db.requeue_owned_by(db.running_owners(), now=at(200)) == [job_id]
    job = db.get_job(job_id)
    assert job.state == JobState.QUEUED and job.worker_id is None
    assert db.requeue_owned_by(db.running_owners()) == []
    # A run whose series grew meanwhile waits for the series to be stable again.
    other = running_job(db, "1.6")
    db.record_instance(inst("1.6", 3), PROFILES, now=at(250))
    assert db.requeue_owned_by(db.running_owners(), now=at(260)) == [other]
    assert db.get_job(other).state == JobState.RECEIVING


def test_requeue_expired_only_takes_silent_workers(db: Database) -> None:
    a = running_job(db, "1.5")  # claimed at 101, leased for DEFAULT_LEASE_SECONDS
    b = running_job(db, "1.6")
    db.heartbeat(b, "w1", now=at(390))
    assert db.requeue_expired(now=at(101 + DEFAULT_LEASE_SECONDS + 1)) == [a]
    assert db.get_job(b).state == JobState.RUNNING


def test_restart_resumes_from_the_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = Database(url)
    first.create_schema()
    job_id = running_job(first)
    first.close()
    second = Database(url)
    second.create_schema()  # idempotent on an existing database
    assert second.requeue_owned_by(second.running_owners()) == [job_id]
    again = second.claim_next_job("w9")
    assert again is not None and again.id == job_id and again.attempts == 2
    second.close()


def test_cancel_a_running_job_stops_its_worker(db: Database) -> None:
    job_id = running_job(db)
    db.cancel_job(job_id, now=at(150))
    assert not db.heartbeat(job_id, "w1")
    with pytest.raises(TransitionError, match="cancelled -> forwarding"):
        db.finish_processing(job_id, "2.25.1", "/out", 2, ["pacs"])
    db.record_instance(inst("1.5", 9), PROFILES, now=at(160))  # cancelled stays cancelled
    assert db.get_job(job_id).state == JobState.CANCELLED
    db.retry_job(job_id)
    assert db.get_job(job_id).state == JobState.QUEUED


def test_heartbeat_is_refused_for_another_worker(db: Database) -> None:
    job_id = running_job(db)
    assert not db.heartbeat(job_id, "someone-else")
    assert db.heartbeat(job_id)


@pytest.mark.parametrize("state", ["queued", "forwarding", "done", "failed"])
def test_new_instance_reopens_the_job(db: Database, state: str) -> None:
    for i in (1, 2):
        db.record_instance(inst("1.5", i), PROFILES, now=at(0))
    (job_id,) = db.promote_stable_series(at(100), stable_seconds=30)
    if state != "queued":
        db.claim_next_job("w1", now=at(101))
        db.finish_processing(job_id, "2.25.1", "/out", 2, ["pacs"], now=at(110))
        if state == "done":
            db.record_forward_result(job_id, "pacs", ok=True, n_sent=2, max_attempts=1, now=at(111))
        elif state == "failed":
            db.record_forward_result(
                job_id, "pacs", ok=False, n_sent=0, max_attempts=1, error="x", now=at(111)
            )
    assert db.get_job(job_id).state == state

    db.record_instance(inst("1.5", 3), PROFILES, now=at(500))
    job = db.get_job(job_id)
    assert job.state == JobState.RECEIVING and job.source_instances == 3
    assert all(f.state == "pending" and f.attempts == 0 for f in job.forwards)
    assert db.due_forwards(at(10_000)) == []  # nothing sent until it is reprocessed
    assert db.promote_stable_series(at(510), stable_seconds=30) == []
    assert db.promote_stable_series(at(530), stable_seconds=30) == [job_id]


def test_new_instance_while_running_requests_a_rerun(db: Database) -> None:
    job_id = running_job(db)
    db.record_instance(inst("1.5", 3), PROFILES, now=at(105))
    assert db.get_job(job_id).rerun_requested
    assert db.heartbeat(job_id, "w1")  # the worker may finish its run
    assert (
        db.finish_processing(job_id, "2.25.1", "/out", 2, ["pacs"], now=at(110))
        == JobState.RECEIVING
    )
    job = db.get_job(job_id)
    assert not job.rerun_requested
    assert db.due_forwards(at(10_000)) == []
    assert db.promote_stable_series(at(140), stable_seconds=30) == [job_id]
    assert len(db.job_instances(job_id)) == 3


def test_failure_of_a_stale_run_goes_back_to_receiving(db: Database) -> None:
    job_id = running_job(db)
    db.record_instance(inst("1.5", 3), PROFILES, now=at(105))
    assert db.fail_job(job_id, "decode error", now=at(110)) == JobState.RECEIVING
    other = running_job(db, "1.6")
    assert db.fail_job(other, "decode error") == JobState.FAILED
    assert db.get_job(other).error == "decode error"


def test_job_instances_are_in_slice_order_without_skipped(db: Database) -> None:
    db.record_instance(inst("1.5", 1, z=30.0), PROFILES, now=at(0))
    db.record_instance(inst("1.5", 2, z=-10.0), PROFILES, now=at(0))
    db.record_instance(inst("1.5", 3, z=10.0), PROFILES, now=at(0))
    db.record_instance(inst("1.5", 4, skip="image type LOCALIZER", z=0.0), PROFILES, now=at(0))
    (job,) = db.list_jobs()
    names = [p.name for p in db.job_instances(job.id)]
    assert names == ["1.5.2.dcm", "1.5.3.dcm", "1.5.1.dcm"]
    with pytest.raises(JobNotFoundError):
        db.job_instances(12345)


def test_list_jobs_and_status_summary(db: Database) -> None:
    done = running_job(db, "1.5")
    db.finish_processing(done, "2.25.1", "/out", 2, [], now=at(120))
    failed = running_job(db, "1.6")
    db.fail_job(failed, "weights missing", now=at(130))
    db.record_instance(inst("1.7", 1), PROFILES, now=at(140))
    assert [j.id for j in db.list_jobs(state="failed")] == [failed]
    assert len(db.list_jobs(limit=2)) == 2
    with pytest.raises(ValueError, match="state"):
        db.list_jobs(state="exploded")

    summary = db.status_summary(now=at(600))
    assert summary.counts["done"] == 1 and summary.counts["failed"] == 1
    assert summary.counts["receiving"] == 1 and summary.queue_depth == 0
    assert summary.done_last_hour == 1 and summary.failed_last_hour == 1
    assert summary.last_errors[0].job_id == failed
    assert summary.last_errors[0].error == "weights missing"
    as_json = summary.as_dict()
    assert as_json["counts"]["done"] == 1 and isinstance(as_json["last_errors"][0]["at"], str)
    assert db.get_job(done).as_dict()["state"] == "done"


def test_purge_candidates_and_mark_purged(db: Database) -> None:
    done = running_job(db, "1.5")
    db.finish_processing(done, "2.25.1", "/spool/derived/job-1", 2, [], now=at(120))
    failed = running_job(db, "1.6")
    db.fail_job(failed, "x", now=at(130))
    db.record_instance(inst("1.8", 1, skip="image type LOCALIZER"), PROFILES, now=at(100))

    assert db.purge_candidates(older_than=at(60)) == []  # too recent
    candidates = db.purge_candidates(older_than=at(3600))
    assert sorted(c.series_instance_uid for c in candidates) == ["1.5", "1.8"]
    five = next(c for c in candidates if c.series_instance_uid == "1.5")
    assert Path("/spool/derived/job-1") in five.paths
    assert inst("1.5", 1).path in five.paths and inst("1.5", 2).path in five.paths

    assert db.mark_purged(candidates, now=at(3700)) == 2
    assert db.instance_path("1.5.1") is None
    assert db.get_job(done).purged_at == at(3700)
    assert db.purge_candidates(older_than=at(7200)) == []  # already purged

    # The same series sent again later is received afresh and reprocessed.
    assert db.record_instance(inst("1.5", 1), PROFILES, now=at(8000))
    job = db.get_job(done)
    assert job.state == JobState.RECEIVING and job.source_instances == 1


def test_now_must_be_timezone_aware(db: Database) -> None:
    with pytest.raises(ValueError, match="now"):
        db.promote_stable_series(datetime(2024, 1, 1), stable_seconds=1)
    with pytest.raises(TypeError, match="instance"):
        db.record_instance("not an instance", PROFILES)  # type: ignore[arg-type]


def test_in_memory_database_works_for_quick_use() -> None:
    mem = Database("sqlite://")
    mem.create_schema()
    mem.record_instance(inst("1.5", 1), PROFILES, now=at(0))
    assert len(mem.list_jobs()) == 1
    mem.close()


def test_requeue_job_hands_back_only_the_workers_own_job(db: Database) -> None:
    first = running_job(db, "1.5")
    second_series = "1.6"
    for i in range(1, 3):
        db.record_instance(inst(second_series, i), PROFILES, now=at(0))
    db.promote_stable_series(at(100), stable_seconds=30)
    other = db.claim_next_job("w2", now=at(101))
    assert other is not None
    assert not db.requeue_job(first, "w2")  # not w2's job
    assert db.requeue_job(first, "w1")
    assert db.get_job(first).state == JobState.QUEUED
    assert db.get_job(other.id).state == JobState.RUNNING
    assert not db.requeue_job(first, "w1")  # no longer running


def test_before_commit_runs_inside_the_transaction_and_can_roll_it_back(
    tmp_path: Path, db: Database
) -> None:
    other = Database(f"sqlite:///{tmp_path / 'state' / 'jobs.db'}")
    seen: list[object] = []

    def look() -> None:  # from a second connection: the row is not committed yet
        seen.append(other.instance_path("1.7.1"))

    assert db.record_instance(inst("1.7", 1), PROFILES, now=at(0), before_commit=look)
    assert seen == [None]
    assert other.instance_path("1.7.1") == Path("/spool/incoming/1.7/1.7.1.dcm")

    def fail() -> None:
        raise OSError("the file's folder could not be synced")

    with pytest.raises(OSError, match="synced"):
        db.record_instance(inst("1.7", 2), PROFILES, now=at(1), before_commit=fail)
    assert other.instance_path("1.7.2") is None
    (job,) = db.list_jobs()
    assert job.source_instances == 1  # the series count was rolled back with the row

    # The same for an instance of the known series (the driver path, not SQLAlchemy's).
    seen.clear()
    assert db.record_instance(
        inst("1.7", 3),
        PROFILES,
        now=at(2),
        before_commit=lambda: seen.append(other.instance_path("1.7.3")),
    )
    assert seen == [None]
    assert other.instance_path("1.7.3") == Path("/spool/incoming/1.7/1.7.3.dcm")
    other.close()
