"""The job table shared by several processes, on a real PostgreSQL server (and SQLite
where the rule is backend-independent): exclusive claims under contention, leases,
take-over of a dead worker's job, exclusive forward claims."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ldct_node.service.identity import is_dead_local_worker
from ldct_node.store import Database, JobState, ReceivedInstance, TransitionError
from ldct_node.store.migrate import upgrade

T0 = datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def inst(series: str, i: int) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=f"{series}.{i}",
        series_instance_uid=series,
        study_instance_uid="1.2.9",
        sop_class_uid=CT,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=Path(f"/spool/incoming/{series}/{series}.{i}.dcm"),
        modality="CT",
        instance_number=i,
        z_position=float(i),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    upgrade(url)
    return url


@pytest.fixture
def db(url: str) -> Iterator[Database]:
    database = Database(url)
    yield database
    database.close()


def queue_jobs(db: Database, n: int, profiles: tuple[str, ...] = ("a",)) -> None:
    for s in range(n):
        db.record_instance(inst(f"1.{s + 10}", 1), list(profiles), now=at(0))
    db.promote_stable_series(at(100), stable_seconds=1)


def _claim_all(url: str, name: str) -> list[int]:
    database = Database(url)
    claimed = []
    try:
        while (job := database.claim_next_job(name)) is not None:
            claimed.append(job.id)
    finally:
        database.close()
    return claimed


def test_four_processes_claim_each_job_exactly_once(db: Database, url: str) -> None:
    queue_jobs(db, 20, ("a", "b"))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_claim_all, [(url, f"p{i}") for i in range(4)], chunksize=1)
    claimed = Counter(i for ids in results for i in ids)
    assert len(claimed) == 40
    assert set(claimed.values()) == {1}
    assert all(j.state == JobState.RUNNING and j.attempts == 1 for j in db.list_jobs())


def test_an_expired_lease_is_taken_over_and_the_old_holder_cannot_finish(db: Database) -> None:
    queue_jobs(db, 1)
    job = db.claim_next_job("dead:1", now=at(100), lease_seconds=30)
    assert job is not None
    assert db.requeue_expired(now=at(129)) == []  # lease still running
    assert db.heartbeat(job.id, "dead:1", now=at(125), lease_seconds=30)  # renewed to 155
    assert db.requeue_expired(now=at(150)) == []
    assert db.requeue_expired(now=at(156)) == [job.id]
    again = db.claim_next_job("alive:2", now=at(157), lease_seconds=30)
    assert again is not None and again.id == job.id and again.attempts == 2
    # The first holder wakes up: its heartbeat, result and failure are all refused.
    assert not db.heartbeat(job.id, "dead:1", now=at(158))
    with pytest.raises(TransitionError):
        db.finish_processing(job.id, "2.25.1", "/out", 1, ["pacs"], worker_id="dead:1")
    with pytest.raises(TransitionError):
        db.fail_job(job.id, "late failure", worker_id="dead:1")
    assert db.get_job(job.id).worker_id == "alive:2"
    state = db.finish_processing(job.id, "2.25.1", "/out", 1, ["pacs"], worker_id="alive:2")
    assert state == JobState.FORWARDING


def test_restart_takes_back_only_the_jobs_of_dead_workers(db: Database) -> None:
    queue_jobs(db, 3)
    live = db.claim_next_job("host-a:100", lease_seconds=300)
    dead = db.claim_next_job("host-b:200", lease_seconds=300)
    assert live is not None and dead is not None
    assert db.running_owners() == {"host-a:100", "host-b:200"}
    assert db.requeue_owned_by({"host-b:200"}) == [dead.id]
    assert db.requeue_expired() == []  # the live worker's lease holds
    assert db.get_job(live.id).state == JobState.RUNNING
    assert db.get_job(dead.id).state == JobState.QUEUED


def test_one_sender_per_forward(db: Database) -> None:
    queue_jobs(db, 1)
    job = db.claim_next_job("w:1")
    assert job is not None
    db.finish_processing(job.id, "2.25.1", "/out", 1, ["pacs"], now=at(-1))
    (fwd,) = db.due_forwards(now=at(0))
    assert db.claim_forward(fwd.id, "w:1", lease_seconds=60, now=at(0))
    assert not db.claim_forward(fwd.id, "w:2", lease_seconds=60, now=at(10))
    assert db.due_forwards(now=at(10)) == []  # claimed: nobody else lists it
    assert db.claim_forward(fwd.id, "w:1", lease_seconds=60, now=at(30))  # renewal
    assert not db.claim_forward(fwd.id, "w:2", lease_seconds=60, now=at(80))
    # The sender died: once its claim expires another process takes the forward over.
    assert [f.id for f in db.due_forwards(now=at(91))] == [fwd.id]
    assert db.claim_forward(fwd.id, "w:2", lease_seconds=60, now=at(91))
    state = db.record_forward_result(job.id, "pacs", ok=True, n_sent=1, max_attempts=3)
    assert state == JobState.DONE
    assert not db.claim_forward(fwd.id, "w:3")  # sent: nothing to claim


def _claim_forwards(url: str, name: str, ids: list[int]) -> list[int]:
    database = Database(url)
    try:
        return [i for i in ids if database.claim_forward(i, name)]
    finally:
        database.close()


def test_concurrent_forward_claims_are_exclusive(db: Database, url: str) -> None:
    queue_jobs(db, 10)
    while (job := db.claim_next_job("w")) is not None:
        db.finish_processing(job.id, "2.25.1", "/out", 1, ["pacs", "archive"])
    ids = [f.id for f in db.due_forwards()]
    assert len(ids) == 20
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(_claim_forwards, [(url, f"s{i}", ids) for i in range(3)])
    won = Counter(i for got in results for i in got)
    assert sorted(won) == sorted(ids) and set(won.values()) == {1}


def test_dead_local_workers_are_recognised() -> None:
    host = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not is_dead_local_worker(f"{host}:{alive.pid}")
    finally:
        alive.kill()
        alive.wait()
    assert is_dead_local_worker(f"{host}:{alive.pid}")  # reaped: gone
    assert not is_dead_local_worker(f"{host}:{os.getpid()}")  # ourselves
    assert not is_dead_local_worker(f"other-{host}:{alive.pid}")  # not ours to judge
    assert not is_dead_local_worker("no-pid-here")


def _series_rows(db: Database) -> dict[str, tuple[int, int, datetime, str]]:
    from sqlalchemy import select

    from ldct_node.store.models import Series

    with db.session(read_only=True) as sess:
        return {
            s.series_instance_uid: (s.n_instances, s.n_skipped, s.last_received_at, s.state)
            for s in sess.scalars(select(Series))
        }


def test_intake_counts_each_instance_once_and_keeps_the_latest_arrival(db: Database) -> None:
    """Intake runs as Core statements (the count is an UPDATE, the duplicate check is the
    INSERT's ON CONFLICT): the same rules on both backends."""
    assert db.record_instance(inst("1.5", 1), ["a"], now=at(10))
    assert db.record_instance(inst("1.5", 2), ["a"], now=at(5))  # a clock step back
    assert not db.record_instance(inst("1.5", 2), ["a"], now=at(20))  # re-sent
    skipped = replace(inst("1.5", 3), skip_reason="LOCALIZER")
    assert db.record_instance(skipped, ["a"], now=at(12))
    # The same SOP instance under another series: refused, and no row for that series.
    other = replace(inst("1.5", 1), series_instance_uid="1.6")
    assert not db.record_instance(other, ["a"], now=at(30))
    rows = _series_rows(db)
    assert set(rows) == {"1.5"}
    assert rows["1.5"] == (3, 1, at(12), "receiving")
    (job,) = db.list_jobs()
    assert job.state == JobState.RECEIVING and job.source_instances == 2

    # A series of skipped instances only is ignored; it opens a job once one counts.
    db.record_instance(replace(inst("1.7", 1), skip_reason="x"), ["a"])
    assert _series_rows(db)["1.7"][3] == "ignored" and len(db.list_jobs()) == 1

    # A new instance after the job is done re-opens it (the ORM on intake's connection).
    (job_id,) = db.promote_stable_series(at(100), stable_seconds=30)
    db.claim_next_job("w1", now=at(101))
    db.finish_processing(job_id, "2.25.1", "/out", 2, [], now=at(110))
    assert db.get_job(job_id).state == JobState.DONE
    assert db.record_instance(inst("1.5", 4), ["a", "b"], now=at(200))
    jobs = {j.profile: j for j in db.list_jobs() if j.series_instance_uid == "1.5"}
    assert jobs["a"].state == JobState.RECEIVING and jobs["a"].source_instances == 3
    assert jobs["b"].state == JobState.RECEIVING  # a profile added since: its job is made
    assert _series_rows(db)["1.5"][2] == at(200)


def _stored_instance_rows(db: Database) -> dict[str, tuple[object, ...]]:
    """The instance rows as the database holds them (the driver's values, no types)."""
    with db.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT sop_instance_uid, series_id, path, sop_class_uid, transfer_syntax_uid,"
            " instance_number, z_position, skip_reason, size_bytes, received_at FROM instance"
        ).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def _sqlalchemy_executions(db: Database) -> list[str]:
    """The statements SQLAlchemy executes from now on (the driver path runs none)."""
    from sqlalchemy import event

    seen: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    return seen


def test_an_instance_of_a_known_series_is_recorded_on_the_driver_as_sqlalchemy_would(
    db: Database,
) -> None:
    """The common case (series and jobs exist, nothing to change) runs intake's compiled
    statements on the driver's cursor; the rows it writes are the rows the SQLAlchemy path
    writes for the same instance, to the stored datetime; every other case still goes
    through SQLAlchemy."""
    from sqlalchemy import select

    from ldct_node.store.models import Series

    seen = _sqlalchemy_executions(db)
    assert db.record_instance(inst("1.5", 1), ["a"], now=at(10))  # a new series
    assert db.record_instance(inst("1.8", 1), ["a"], now=at(10))
    assert seen, "a new series is recorded through SQLAlchemy"
    seen.clear()
    fast = replace(inst("1.5", 2), size_bytes=524_288)
    assert db.record_instance(fast, ["a"], now=at(20))
    fast_skipped = replace(inst("1.5", 3), skip_reason="LOCALIZER", z_position=None)
    assert db.record_instance(fast_skipped, ["a"], now=at(21))
    assert seen == [], "the common case ran through SQLAlchemy"
    # The same instances into the other series, through the SQLAlchemy path itself.
    for source, now in ((fast, at(20)), (fast_skipped, at(21))):
        twin = replace(
            source,
            sop_instance_uid=source.sop_instance_uid.replace("1.5.", "1.8.", 1),
            series_instance_uid="1.8",
        )
        assert db._record_any_case(twin, ("a",), now, None)  # type: ignore[attr-defined]
    stored = _stored_instance_rows(db)
    with db.session(read_only=True) as sess:
        ids = {s.series_instance_uid: s.id for s in sess.scalars(select(Series))}
    for n in (2, 3):
        fast_row, twin_row = stored[f"1.5.{n}"], stored[f"1.8.{n}"]
        assert fast_row[0] == ids["1.5"] and twin_row[0] == ids["1.8"]
        assert fast_row[2:] == twin_row[2:]  # all but the series and the path
    assert stored["1.5.2"][-2:] == (524_288, stored["1.8.2"][-1])
    rows = _series_rows(db)
    assert rows["1.5"] == rows["1.8"] == (3, 1, at(21), "receiving")

    # A duplicate, and a job that moves on, leave the driver path for SQLAlchemy's.
    seen.clear()
    assert not db.record_instance(inst("1.5", 2), ["a"], now=at(30))
    assert seen, "a duplicate is handled by the SQLAlchemy path"
    assert _series_rows(db)["1.5"][0] == 3
    seen.clear()
    assert db.record_instance(inst("1.5", 4), ["a", "b"], now=at(31))  # a new profile
    assert seen and {j.profile for j in db.list_jobs() if j.series_instance_uid == "1.5"} == {
        "a",
        "b",
    }


def test_a_driver_error_in_the_common_case_is_sqlalchemys_and_rolls_everything_back(
    db: Database,
) -> None:
    from sqlalchemy.exc import IntegrityError

    assert db.record_instance(inst("1.5", 1), ["a"], now=at(10))
    seen = _sqlalchemy_executions(db)
    broken = replace(inst("1.5", 2), sop_class_uid=None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        db.record_instance(broken, ["a"], now=at(20))
    assert seen == [], "the error came from the driver path"
    assert _series_rows(db)["1.5"][:3] == (1, 0, at(10)), "the count was not rolled back"
    # The connection went back to the pool without a transaction (on SQLite an open one
    # would hold the write lock): the next instances are recorded, by every path.
    assert db.record_instance(inst("1.5", 2), ["a"], now=at(30))
    assert db.record_instance(inst("1.9", 1), ["a"], now=at(30))
    assert _series_rows(db)["1.5"][:3] == (2, 0, at(30))
    (job,) = [j for j in db.list_jobs() if j.series_instance_uid == "1.5"]
    assert job.source_instances == 2


def test_the_driver_path_reconnects_after_the_server_dropped_its_connections(
    pg_url: str,
) -> None:
    """PostgreSQL ends every session (a restart, a failover, an admin): the pooled
    connections the driver path takes are checked before use, and the next instance is
    recorded on a new one."""
    from sqlalchemy import create_engine, text

    upgrade(pg_url)
    db = Database(pg_url)
    admin = create_engine(pg_url)
    try:
        assert db.record_instance(inst("1.5", 1), ["a"], now=at(10))
        assert db.record_instance(inst("1.5", 2), ["a"], now=at(11))  # the driver path
        with admin.connect() as conn:
            ended = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar()
        assert ended and ended >= 1
        assert db.record_instance(inst("1.5", 3), ["a"], now=at(12))
        assert _series_rows(db)["1.5"][:3] == (3, 0, at(12))
    finally:
        admin.dispose()
        db.close()


def test_a_connection_lost_inside_the_driver_path_is_sqlalchemys_error_and_replaced(
    pg_url: str,
) -> None:
    """The session ends between the statements and the commit (here: ended by the
    server from ``before_commit``): OperationalError, as through SQLAlchemy; nothing
    recorded; the connection is invalidated and the next instance gets a new one."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    upgrade(pg_url)
    db = Database(pg_url)
    admin = create_engine(pg_url)

    def end_every_session() -> None:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )

    try:
        assert db.record_instance(inst("1.5", 1), ["a"], now=at(10))
        with pytest.raises(OperationalError) as raised:
            db.record_instance(inst("1.5", 2), ["a"], now=at(11), before_commit=end_every_session)
        assert raised.value.connection_invalidated
        assert db.record_instance(inst("1.5", 3), ["a"], now=at(12))
        assert _series_rows(db)["1.5"][:3] == (2, 0, at(12))  # 1.5.2 was not recorded
        assert db.instance_path("1.5.2") is None
    finally:
        admin.dispose()
        db.close()


def _held_batch(
    db: Database,
    followers: list[ReceivedInstance],
    fail_before_commit: frozenset[str] = frozenset(),
    leader_number: int = 100,
) -> tuple[dict[str, object], dict[str, int], int]:
    """Record instance ``leader_number`` of series 1.5, whose ``before_commit`` holds its
    transaction until ``followers``, each recorded in a thread of its own, are all waiting
    for the group commit; then let them go. Returns each follower's result (what
    ``record_instance`` returned or raised), the thread each follower's ``before_commit``
    ran in, and how many threads the followers ran in."""
    import threading
    import time

    holding = threading.Event()
    ran_in: dict[str, int] = {}
    results: dict[str, object] = {}
    idents: dict[str, int] = {}

    def hold() -> None:
        holding.set()
        deadline = time.monotonic() + 30
        while len(db._group._queue) < len(followers):  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise TimeoutError("the followers did not queue up")
            time.sleep(0.002)

    def noted(uid: str) -> Callable[[], None]:
        def before_commit() -> None:
            ran_in[uid] = threading.get_ident()
            if uid in fail_before_commit:
                raise OSError(f"{uid}: the disk refused")

        return before_commit

    def follow(follower: ReceivedInstance) -> None:
        uid = follower.sop_instance_uid
        idents[uid] = threading.get_ident()
        try:
            results[uid] = db.record_instance(follower, ["a"], now=at(20), before_commit=noted(uid))
        except Exception as exc:
            results[uid] = exc

    leader = threading.Thread(
        target=db.record_instance, args=(inst("1.5", leader_number), ["a"], at(15), hold)
    )
    leader.start()
    assert holding.wait(30)
    threads = [threading.Thread(target=follow, args=(f,)) for f in followers]
    for thread in threads:
        thread.start()
    for thread in (leader, *threads):
        thread.join(60)
    return results, ran_in, len(set(idents.values()))


def test_concurrent_instances_are_committed_together_in_one_transaction(db: Database) -> None:
    """Instances that arrive while another's transaction is under way wait for it, then
    are recorded in one transaction by one of their threads (group commit): each
    ``before_commit`` runs there, each gets its own result, the rows are as one by one."""
    assert db.record_instance(inst("1.5", 1), ["a"], now=at(10))
    assert db.record_instance(inst("1.6", 1), ["a"], now=at(10))
    followers = [inst("1.5", i) for i in range(2, 6)] + [inst("1.6", 2), inst("1.6", 3)]
    results, ran_in, n_threads = _held_batch(db, followers)
    assert n_threads == len(followers)
    assert results == {f.sop_instance_uid: True for f in followers}
    # All six before_commit callbacks ran in one thread: one transaction, one commit.
    assert len(set(ran_in.values())) == 1 and set(ran_in) == {f.sop_instance_uid for f in followers}
    rows = _series_rows(db)
    assert rows["1.5"][:3] == (6, 0, at(20)) and rows["1.6"][:3] == (3, 0, at(20))
    stored = _stored_instance_rows(db)
    assert {f"1.5.{i}" for i in (1, 2, 3, 4, 5, 100)} | {"1.6.1", "1.6.2", "1.6.3"} == set(stored)
    jobs = {j.series_instance_uid: j.source_instances for j in db.list_jobs()}
    assert jobs == {"1.5": 6, "1.6": 3}


def test_in_a_batch_an_instance_that_is_not_the_common_case_goes_its_own_way(
    db: Database,
) -> None:
    """A duplicate, a new series, a job that moves on, a row the database refuses, a
    ``before_commit`` that raises: each is rolled back to its own savepoint (or the batch
    as a whole, for ``before_commit``) and recorded, refused or raised on its own path,
    with the result it would have had alone; the others are recorded."""
    from sqlalchemy.exc import IntegrityError

    assert db.record_instance(inst("1.5", 1), ["a"], now=at(10))
    assert db.record_instance(inst("1.5", 2), ["a"], now=at(10))
    followers = [
        inst("1.5", 3),
        inst("1.5", 2),  # a duplicate
        inst("1.7", 1),  # a new series
        replace(inst("1.5", 4), sop_class_uid=None),  # type: ignore[arg-type]  # NOT NULL
        inst("1.5", 5),
    ]
    results, ran_in, _ = _held_batch(db, followers)
    assert results["1.5.3"] is True and results["1.5.5"] is True
    assert results["1.5.2"] is False
    assert results["1.7.1"] is True
    assert isinstance(results["1.5.4"], IntegrityError)
    assert ran_in["1.5.3"] == ran_in["1.5.5"]  # committed together
    assert _series_rows(db)["1.5"][:2] == (5, 0)  # 1, 2, 3, 5 and the leader's 100
    assert _series_rows(db)["1.7"][0] == 1
    assert db.instance_path("1.5.4") is None

    # before_commit raising in a batch: nothing of the batch is committed by it; the
    # others are recorded on their own, the one whose disk refused raises its error.
    results, _, _ = _held_batch(
        db, [inst("1.5", 6), inst("1.5", 7)], frozenset({"1.5.7"}), leader_number=101
    )
    assert results["1.5.6"] is True
    assert isinstance(results["1.5.7"], OSError)
    assert db.instance_path("1.5.6") is not None and db.instance_path("1.5.7") is None
