"""Intake: instances as they arrive, series and their jobs, stable series queued."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import bindparam, case, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable

from ldct_node.store.engine import Store
from ldct_node.store.models import (
    _REOPEN_ON_NEW_INSTANCE,
    Instance,
    Job,
    JobState,
    ReceivedInstance,
    Series,
    SeriesState,
    UTCDateTime,
    _now,
)

logger = logging.getLogger(__name__)

#: SQLSTATEs after which a transaction may simply run again: deadlock detected,
#: serialization failure (PostgreSQL).
_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
_MAX_TRANSIENT_RETRIES = 5


@dataclass(frozen=True)
class _Statements:
    """Intake's statements, built once per dialect with bound parameters: building and
    hashing a statement per instance cost more than running it (1 ms of 3.4)."""

    count: dict[bool, Executable]  # skipped? -> UPDATE series (RETURNING id if it can)
    lock_series: Executable | None  # without UPDATE ... RETURNING: SELECT ... FOR UPDATE
    insert_instance: Executable
    insert_ignores_duplicates: bool
    returns_inserted: bool
    find_instance: Executable
    jobs: Executable


@functools.cache
def _statements(dialect: str, update_returning: bool, insert_returning: bool) -> _Statements:
    now = bindparam("now", type_=UTCDateTime())
    by_uid = Series.series_instance_uid == bindparam("series_uid")
    count: dict[bool, Executable] = {}
    for skipped in (False, True):
        changes: dict[str, Any] = {
            "n_instances": Series.n_instances + 1,
            "last_received_at": case(
                (Series.last_received_at < now, now), else_=Series.last_received_at
            ),
            "purged_at": None,
        }
        if skipped:
            changes["n_skipped"] = Series.n_skipped + 1
        else:
            changes["state"] = SeriesState.RECEIVING
        statement = update(Series).where(by_uid).values(changes)
        count[skipped] = statement.returning(Series.id) if update_returning else statement
    insert_instance: Any = insert(Instance)
    ignores = dialect in ("sqlite", "postgresql")
    if ignores:
        upsert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        insert_instance = upsert(Instance).on_conflict_do_nothing(
            index_elements=[Instance.sop_instance_uid]
        )
        if insert_returning:  # psycopg reports no rowcount for ON CONFLICT DO NOTHING
            insert_instance = insert_instance.returning(Instance.id)
    return _Statements(
        count=count,
        lock_series=None if update_returning else select(Series.id).where(by_uid).with_for_update(),
        insert_instance=insert_instance,
        insert_ignores_duplicates=ignores,
        returns_inserted=ignores and insert_returning,
        find_instance=select(Instance.id).where(Instance.sop_instance_uid == bindparam("sop_uid")),
        jobs=select(Job.id, Job.profile, Job.state, Job.rerun_requested)
        .where(Job.series_id == bindparam("series_id"))
        .with_for_update(),
    )


def _statements_for(conn: Connection) -> _Statements:
    dialect = conn.dialect
    return _statements(dialect.name, dialect.update_returning, dialect.insert_returning)


@dataclass(frozen=True)
class _DriverStatement:
    """One of intake's statements compiled once for the dialect, run on the driver's own
    cursor. SQLAlchemy's work around each execution (cache lookup, execution context,
    result, events) was most of an instance's intake: 1.0-1.3 ms of CPU for its three
    statements and commit, against 0.11-0.14 ms on the driver (2-core Xeon)."""

    sql: str
    compiled: SQLCompiler
    order: tuple[str, ...] | None  # a positional paramstyle's order of the parameters
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]  # the types' bind conversions

    def parameters(self, values: Mapping[str, Any]) -> Any:
        """The driver's parameters: the statement's own constants, ``values``, converted
        by their column types as SQLAlchemy would (aware UTC datetimes to naive...)."""
        params = self.compiled.construct_params(dict(values))
        for name, process in self.processors:
            params[name] = process(params[name])
        if self.order is None:
            return params
        return tuple(params[name] for name in self.order)


def _driver_statement(
    statement: Executable, dialect: Dialect, keys: Sequence[str] = ()
) -> _DriverStatement | None:
    """``statement`` for the driver, or None where running it needs SQLAlchemy (Python
    side defaults, expanding or escaped parameters)."""
    compiled = cast(ClauseElement, statement).compile(
        dialect=dialect, column_keys=list(keys) or None
    )
    if not isinstance(compiled, SQLCompiler):  # pragma: no cover - always for these
        return None
    sql = str(compiled)
    if (
        compiled.escaped_bind_names
        or compiled.insert_prefetch
        or compiled.update_prefetch
        or "POSTCOMPILE" in sql
    ):
        return None
    processors = {}
    for bind, name in compiled.bind_names.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors[name] = process
    order = tuple(compiled.positiontup or ()) if dialect.positional else None
    return _DriverStatement(sql, compiled, order, tuple(processors.items()))


@dataclass(frozen=True)
class _DriverStatements:
    """The statements of an instance's common case (its series and jobs exist, nothing
    to change in them), for the driver."""

    count: dict[bool, _DriverStatement]
    insert_instance: _DriverStatement
    jobs: _DriverStatement


#: The instance row's columns, in the order intake fills them.
_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "series_id",
    "path",
    "sop_class_uid",
    "transfer_syntax_uid",
    "instance_number",
    "z_position",
    "skip_reason",
    "size_bytes",
    "received_at",
)


def _driver_statements(dialect: Dialect) -> _DriverStatements | None:
    """None where the common case cannot run on the driver: without UPDATE ... RETURNING
    or an insert that reports an ignored duplicate."""
    statements = _statements(dialect.name, dialect.update_returning, dialect.insert_returning)
    if statements.lock_series is not None or not statements.returns_inserted:
        return None
    count = {k: _driver_statement(v, dialect) for k, v in statements.count.items()}
    insert_instance = _driver_statement(statements.insert_instance, dialect, _INSTANCE_COLUMNS)
    jobs = _driver_statement(statements.jobs, dialect)
    if insert_instance is None or jobs is None or None in count.values():
        return None
    return _DriverStatements(
        count={k: v for k, v in count.items() if v is not None},
        insert_instance=insert_instance,
        jobs=jobs,
    )


def _jobs_to_change(jobs: Sequence[Any], profiles: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """Of a series' jobs (rows of id, profile, state, rerun_requested): the profiles that
    have none yet, and the ids of those a new instance moves on (re-opens or flags)."""
    have = {job[1] for job in jobs}
    missing = [profile for profile in dict.fromkeys(profiles) if profile not in have]
    moving = [
        job[0]
        for job in jobs
        if job[2] in _REOPEN_ON_NEW_INSTANCE or (job[2] == JobState.RUNNING and not job[3])
    ]
    return missing, moving


def _count_into_series(
    conn: Connection, series_uid: str, skipped: bool, now: datetime
) -> int | None:
    """Count one more instance into the series (locking its row); its id, or None."""
    statements = _statements_for(conn)
    params = {"series_uid": series_uid, "now": now}
    if statements.lock_series is None:
        return conn.execute(statements.count[skipped], params).scalar()
    series_id = conn.execute(statements.lock_series, params).scalar()
    if series_id is not None:
        conn.execute(statements.count[skipped], params)
    return series_id


def _instance_values(inst: ReceivedInstance, series_id: int, now: datetime) -> dict[str, Any]:
    row = (
        inst.sop_instance_uid,
        series_id,
        str(inst.path),
        inst.sop_class_uid,
        inst.transfer_syntax_uid,
        inst.instance_number,
        inst.z_position,
        inst.skip_reason,
        inst.size_bytes,
        now,
    )
    return dict(zip(_INSTANCE_COLUMNS, row, strict=True))


def _insert_instance(
    conn: Connection, inst: ReceivedInstance, series_id: int, now: datetime
) -> bool:
    """Insert the instance's row; False where its SOPInstanceUID is already recorded."""
    statements = _statements_for(conn)
    values = _instance_values(inst, series_id, now)
    if statements.returns_inserted:
        return conn.execute(statements.insert_instance, values).first() is not None
    if statements.insert_ignores_duplicates:
        return conn.execute(statements.insert_instance, values).rowcount == 1
    # Elsewhere: look first; a concurrent insert of the same UID raises IntegrityError,
    # and record_instance runs the transaction again, which then finds it.
    known = conn.execute(statements.find_instance, {"sop_uid": inst.sop_instance_uid}).first()
    if known is not None:
        return False
    conn.execute(statements.insert_instance, values)
    return True


def _sqlstate(exc: OperationalError) -> str | None:
    """The SQLSTATE of the driver's error (psycopg: ``sqlstate``, psycopg2: ``pgcode``)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def _give_back(
    raw: Any, cursor: Any, dbapi_error: type[Exception], *, committed: bool, invalidated: bool
) -> None:
    """Return a driver connection to the pool: rolled back unless committed, its cursor
    closed (neither where the connection was invalidated: the pool replaces it)."""
    try:
        if not committed and not invalidated:
            with contextlib.suppress(dbapi_error):
                raw.rollback()
    finally:
        if cursor is not None and not invalidated:
            with contextlib.suppress(dbapi_error):
                cursor.close()
        raw.close()


@dataclass(eq=False)
class _Waiting:
    """An instance's common case, queued for the group commit (:class:`_GroupCommit`)."""

    inst: ReceivedInstance
    profiles: tuple[str, ...]
    now: datetime
    before_commit: Callable[[], None] | None
    done: threading.Event = field(default_factory=threading.Event)
    recorded: bool = False  # committed by the batch it was in
    lead: bool = False  # woken to record the next batch


class _GroupCommit:
    """Concurrent intakes on one database, recorded one batch at a time.

    The first request finds no batch under way and records itself at once (one
    association: a batch of one, what it ran before). Requests that arrive while a batch
    is in its transaction (waiting for the write lock, a folder's fsync, the commit's)
    queue up, and the next batch records them all in one transaction with one commit:
    one write lock and one WAL fsync for several instances, and the threads of one
    process no longer wait for each other in SQLite's busy sleeps (1, 2, 5 ms...).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Waiting] = []
        self._leading = False
        self.commits = 0  # transactions that recorded instances
        self.committed = 0  # the instances they recorded

    def submit(self, request: _Waiting, record: Callable[[list[_Waiting]], None]) -> None:
        """Return once ``request`` was in a batch given to ``record`` (maybe by another
        thread); ``request.recorded`` then says whether it was committed. What ``record``
        raises is raised in the thread that called it, only for a batch of its own request
        alone (a larger batch leaves any request it could not record to its own thread)."""
        with self._lock:
            self._queue.append(request)
            leading = not self._leading
            self._leading = True
        if not leading:
            request.done.wait()
            if not request.lead:
                return
        with self._lock:
            batch, self._queue = self._queue, []
        successor: _Waiting | None = None
        try:
            record(batch)
        finally:
            recorded = sum(waiting.recorded for waiting in batch)
            with self._lock:
                if recorded:
                    self.commits += 1
                    self.committed += recorded
                if self._queue:
                    successor = self._queue[0]
                    successor.lead = True
                else:
                    self._leading = False
            for waiting in batch:
                if waiting is not request:
                    waiting.done.set()
            if successor is not None:
                successor.done.set()


class Intake(Store):
    """Intake: instances as they arrive, series and their jobs, stable series queued."""

    def __init__(self, url: str | URL) -> None:
        super().__init__(url)
        self._group = _GroupCommit()

    # -- receiving ----------------------------------------------------------------------
    def intake_commits(self) -> tuple[int, int]:
        """Transactions of this process's intake that recorded instances of known series
        (the common case), and how many instances they recorded: more instances than
        transactions where concurrent associations were committed together."""
        return self._group.commits, self._group.committed

    def instance_path(self, sop_instance_uid: str) -> Path | None:
        """The spool path of an already recorded SOP instance, or None."""
        with self.session(read_only=True) as sess:
            path = sess.scalar(
                select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
            )
        return None if path is None else Path(path)

    def record_instance(
        self,
        instance: ReceivedInstance,
        profiles: Sequence[str],
        now: datetime | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> bool:
        """Record a stored instance; create or re-open the series' jobs.

        Parameters
        ----------
        instance
            The stored instance. With ``skip_reason`` set it is recorded but creates or
            re-opens no job.
        profiles
            Names of the configured output profiles: one job per profile.
        before_commit
            Called after the statements, before the commit of a new instance (again
            if the transaction runs again); what it raises rolls it back. The
            receiver waits there for its file's rename to be on the disk, so that the
            statements run while the disk works, and the row is still never durable
            before its file. It may run in another thread: instances recorded at once
            by several threads are committed together (:class:`_GroupCommit`).

        Returns
        -------
        bool
            True if the SOPInstanceUID was new; False for a duplicate, which changes
            nothing (the same UID under another series is logged, the first one kept).
        """
        if not isinstance(instance, ReceivedInstance):
            raise TypeError(f"instance: expected ReceivedInstance, got {type(instance).__name__}")
        if isinstance(profiles, str):
            raise TypeError("profiles: expected a sequence of profile names, got a str")
        for name, uid in (
            ("sop_instance_uid", instance.sop_instance_uid),
            ("series_instance_uid", instance.series_instance_uid),
            ("study_instance_uid", instance.study_instance_uid),
        ):
            if not uid:
                raise ValueError(f"instance.{name}: must not be empty")
        now = _now(now)
        for attempt in range(1, _MAX_TRANSIENT_RETRIES + 1):
            try:
                return self._record_instance(instance, tuple(profiles), now, before_commit)
            except IntegrityError:
                # A concurrent writer inserted the same series or SOP instance first
                # (only possible without BEGIN IMMEDIATE, i.e. on server databases).
                if attempt >= 2:
                    raise
            except OperationalError as exc:
                # PostgreSQL ends one side of a deadlock (this intake locks the series,
                # then its jobs; the stability sweep or a worker the other way round)
                # or a serialization failure: the transaction was rolled back whole,
                # so running it again is safe, and the sender is answered success.
                if _sqlstate(exc) not in _TRANSIENT_SQLSTATES or attempt >= _MAX_TRANSIENT_RETRIES:
                    raise
                logger.info(
                    "recording instance %s: %s, retrying (%d)",
                    instance.sop_instance_uid,
                    "deadlock" if _sqlstate(exc) == "40P01" else "serialization failure",
                    attempt,
                )
                time.sleep(0.01 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    @functools.cached_property
    def _driver(self) -> _DriverStatements | None:
        return _driver_statements(self.engine.dialect)

    def _record_instance(
        self,
        inst: ReceivedInstance,
        profiles: tuple[str, ...],
        now: datetime,
        before_commit: Callable[[], None] | None,
    ) -> bool:
        driver = self._driver
        if driver is not None:
            request = _Waiting(inst, profiles, now, before_commit)
            self._group.submit(request, functools.partial(self._record_batch, driver))
            if request.recorded:
                return True
        return self._record_any_case(inst, profiles, now, before_commit)

    def _record_batch(self, driver: _DriverStatements, batch: list[_Waiting]) -> None:
        """Record a batch of the group commit; a batch of one as before, raising."""
        if len(batch) == 1:
            request = batch[0]
            request.recorded = self._record_common_case(
                driver, request.inst, request.profiles, request.now, request.before_commit
            )
            return
        for request in self._record_common_cases(driver, batch):
            request.recorded = True

    def _common_statements(
        self,
        driver: _DriverStatements,
        run: Callable[[_DriverStatement, Mapping[str, Any]], Any],
        inst: ReceivedInstance,
        profiles: tuple[str, ...],
        now: datetime,
    ) -> bool:
        """The common case's statements through ``run``; False where the instance is not
        the common case (what they did must then be rolled back)."""
        skipped = inst.skip_reason is not None
        params = {"series_uid": inst.series_instance_uid, "now": now}
        row = run(driver.count[skipped], params).fetchone()
        if row is None:
            return False
        series_id = int(row[0])
        values = _instance_values(inst, series_id, now)
        if run(driver.insert_instance, values).fetchone() is None:
            return False  # a duplicate: the other path logs where the first one is
        if not skipped:
            jobs = run(driver.jobs, {"series_id": series_id}).fetchall()
            if any(_jobs_to_change(jobs, profiles)):
                return False
        return True

    def _record_common_cases(
        self, driver: _DriverStatements, batch: list[_Waiting]
    ) -> list[_Waiting]:
        """Record the common cases of ``batch`` in one transaction, each under a
        savepoint of its own, in the order of their series (rows locked in one order by
        every batch: no deadlock between two batches on PostgreSQL); the requests
        committed. One that is not the common case, or whose statements fail, is rolled
        back to its savepoint and left to its own thread; if the transaction fails as a
        whole (the commit, the connection, a ``before_commit``), none is committed and
        each goes its own way, which reports its own error."""
        dialect = self.engine.dialect
        dbapi_error = dialect.loaded_dbapi.Error
        try:
            raw = self.engine.raw_connection()
        except dbapi_error:
            return []
        cursor: Any = None
        recorded: list[_Waiting] = []
        committed = invalidated = False

        def run(statement: _DriverStatement, values: Mapping[str, Any]) -> Any:
            cursor.execute(statement.sql, statement.parameters(values))
            return cursor

        try:
            cursor = raw.cursor()
            if self.driver_begin is not None:
                cursor.execute(self.driver_begin)
            ordered = sorted(batch, key=lambda request: request.inst.series_instance_uid)
            for index, request in enumerate(ordered):
                savepoint = f"intake_{index}"
                cursor.execute(f"SAVEPOINT {savepoint}")
                try:
                    common = self._common_statements(
                        driver, run, request.inst, request.profiles, request.now
                    )
                except dbapi_error as exc:
                    if dialect.is_disconnect(exc, raw.dbapi_connection, cursor):
                        raise
                    common = False
                if not common:
                    cursor.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
                cursor.execute(f"RELEASE SAVEPOINT {savepoint}")
                if common:
                    recorded.append(request)
            if recorded:
                for request in recorded:
                    if request.before_commit is not None:
                        request.before_commit()
                raw.commit()
                committed = True
        except Exception as exc:
            if isinstance(exc, dbapi_error):
                invalidated = dialect.is_disconnect(exc, raw.dbapi_connection, cursor)
                if invalidated:
                    raw.invalidate(exc)
            logger.debug("a batch of %d instances fell back to one by one", len(batch))
            return []
        finally:
            _give_back(raw, cursor, dbapi_error, committed=committed, invalidated=invalidated)
        return recorded

    def _record_common_case(
        self,
        driver: _DriverStatements,
        inst: ReceivedInstance,
        profiles: tuple[str, ...],
        now: datetime,
        before_commit: Callable[[], None] | None,
    ) -> bool:
        """Record an instance of a known series whose jobs stay as they are, with the same
        statements as :meth:`_record_any_case` on the driver's connection; False (all
        rolled back) for any other case: a new series, a duplicate, jobs to create or
        move on. The driver's errors are raised as SQLAlchemy's."""
        dialect = self.engine.dialect
        dbapi_error = dialect.loaded_dbapi.Error
        statement: _DriverStatement | None = None
        params: Any = None

        def as_sqlalchemy(exc: Exception, invalidated: bool = False) -> BaseException:
            return DBAPIError.instance(
                None if statement is None else statement.sql,
                None if statement is None else params,
                exc,
                dbapi_error,
                hide_parameters=self.engine.hide_parameters,
                connection_invalidated=invalidated,
                dialect=dialect,
            )

        try:
            raw = self.engine.raw_connection()
        except dbapi_error as exc:  # the pool's connect: not wrapped by SQLAlchemy
            raise as_sqlalchemy(exc) from exc
        cursor: Any = None
        committed = invalidated = False

        def run(this: _DriverStatement, values: Mapping[str, Any]) -> Any:
            nonlocal statement, params
            statement, params = this, this.parameters(values)
            cursor.execute(this.sql, params)
            return cursor

        try:
            cursor = raw.cursor()
            if self.driver_begin is not None:
                cursor.execute(self.driver_begin)
            if not self._common_statements(driver, run, inst, profiles, now):
                return False
            statement = None
            if before_commit is not None:
                before_commit()
            raw.commit()
            committed = True
            return True
        except dbapi_error as exc:
            invalidated = dialect.is_disconnect(exc, raw.dbapi_connection, cursor)
            if invalidated:  # the pool replaces the connection; nothing to roll back
                raw.invalidate(exc)
            raise as_sqlalchemy(exc, invalidated) from exc
        finally:
            _give_back(raw, cursor, dbapi_error, committed=committed, invalidated=invalidated)

    def _record_any_case(
        self,
        inst: ReceivedInstance,
        profiles: tuple[str, ...],
        now: datetime,
        before_commit: Callable[[], None] | None,
    ) -> bool:
        # Core statements, locking in the order the ORM version did (series, then its
        # jobs). The ORM took 8.5 ms an instance here, most of it Python around five
        # statements and a flush. Now: count the instance into its series (an UPDATE
        # that also locks the row and returns its id), insert the instance with the
        # duplicate check folded in (ON CONFLICT DO NOTHING; a duplicate rolls the
        # count back), look at the jobs, commit.
        skipped = inst.skip_reason is not None
        with self.engine.connect() as conn, conn.begin() as trans:
            series_id = _count_into_series(conn, inst.series_instance_uid, skipped, now)
            if series_id is None:
                key = conn.execute(
                    insert(Series).values(
                        series_instance_uid=inst.series_instance_uid,
                        study_instance_uid=inst.study_instance_uid,
                        calling_aet=inst.calling_aet,
                        modality=inst.modality,
                        n_instances=1,
                        n_skipped=int(skipped),
                        first_received_at=now,
                        last_received_at=now,
                        state=SeriesState.IGNORED if skipped else SeriesState.RECEIVING,
                    )
                ).inserted_primary_key
                if key is None:  # pragma: no cover - every supported dialect returns it
                    raise RuntimeError("the new series row has no id")
                series_id = int(key[0])
            if not _insert_instance(conn, inst, series_id, now):
                self._log_duplicate(conn, inst)
                trans.rollback()  # the count, and the series row if this made it
                return False
            if not skipped:
                self._open_jobs(conn, series_id, profiles, now)
            if before_commit is not None:
                before_commit()
        return True

    @staticmethod
    def _log_duplicate(conn: Connection, inst: ReceivedInstance) -> None:
        known = conn.execute(
            select(Series.series_instance_uid)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_instance_uid == inst.sop_instance_uid)
        ).scalar()
        if known is not None and known != inst.series_instance_uid:
            logger.warning(
                "SOP instance %s arrived again under series %s; keeping it in %s",
                inst.sop_instance_uid,
                inst.series_instance_uid,
                known,
            )

    def _open_jobs(
        self, conn: Connection, series_id: int, profiles: tuple[str, ...], now: datetime
    ) -> None:
        """Create the series' missing jobs; re-open or flag those that move on.

        While a series arrives its jobs are all ``receiving`` and this is one query;
        the ORM (with the jobs' forwards) is loaded only for a job whose state changes.
        """
        jobs = conn.execute(_statements_for(conn).jobs, {"series_id": series_id}).all()
        missing, moving = _jobs_to_change(jobs, profiles)
        if missing:
            conn.execute(
                insert(Job),
                [
                    {
                        "series_id": series_id,
                        "profile": profile,
                        "state": JobState.RECEIVING,
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                        "rerun_requested": False,
                    }
                    for profile in missing
                ],
            )
        if not moving:
            return
        # An ORM session on this connection joins its transaction (commits with it).
        with Session(bind=conn) as sess:
            for job in sess.scalars(
                select(Job).where(Job.id.in_(moving)).options(selectinload(Job.forwards))
            ):
                if job.state in _REOPEN_ON_NEW_INSTANCE:
                    logger.info("job %d: series got a new instance; back to receiving", job.id)
                    self._reopen(job, now)
                else:
                    logger.info("job %d: series got a new instance while running", job.id)
                    job.rerun_requested = True
                    job.updated_at = now
            sess.flush()

    def promote_stable_series(
        self, now: datetime | None = None, stable_seconds: float = 30.0
    ) -> list[int]:
        """Queue the receiving jobs of series without a new instance for ``stable_seconds``.

        Returns
        -------
        list[int]
            The ids of the jobs now ``queued``.
        """
        if stable_seconds < 0:
            raise ValueError(f"stable_seconds: must be >= 0, got {stable_seconds}")
        now = _now(now)
        cutoff = now - timedelta(seconds=stable_seconds)
        with self.session() as sess:
            jobs = sess.scalars(
                select(Job)
                .join(Series, Job.series_id == Series.id)
                .where(Job.state == JobState.RECEIVING, Series.last_received_at <= cutoff)
                .order_by(Series.last_received_at, Job.id)
                .with_for_update(of=Job, skip_locked=True)  # a concurrent sweep has those
            ).all()
            for job in jobs:
                self._set_state(job, JobState.QUEUED, now)
                job.series.state = SeriesState.STABLE
            ids = [job.id for job in jobs]
        if ids:
            logger.info("queued %d job(s) of stable series: %s", len(ids), ids)
        return ids
