"""Job database: schema, sessions and every job state transition.

Tables
    ``series`` (one row per source SeriesInstanceUID), ``instance`` (one row per received
    SOPInstanceUID, with its spool path), ``job`` (one per source series and output
    profile) and ``forward`` (one per job and destination).

Job states (DESIGN section 4)::

    receiving -> queued -> running -> forwarding -> done
                                   \\-> done (no destinations)
    running | forwarding -> failed            failed | cancelled -> queued (retry)
    receiving | queued | running | forwarding | failed -> cancelled
    running -> queued                          (worker gone: requeue_expired / requeue_owned_by)

Every transition is checked against :data:`ALLOWED_TRANSITIONS` (an illegal one raises
:class:`TransitionError`, a ``ValueError`` naming both states) and is committed in its
own transaction, so a restart resumes from the table alone.

Series that grow after processing
    Job rows (state ``receiving``) are created, one per output profile, when the first
    processable instance of a series arrives; skipped instances (localizers, derived
    images...) are stored and recorded but create no job. When another processable
    instance arrives for a series whose job is ``queued``, ``forwarding``, ``done`` or
    ``failed``, that job goes back to ``receiving`` (its forwards reset to pending): it
    is queued again once the series is stable and reprocessed as a whole; the derived
    UIDs are deterministic, so PACS deduplicates what it already has. A ``running`` job
    gets ``rerun_requested`` instead, and the worker's :meth:`Database.finish_processing`
    (or :meth:`Database.fail_job`) then puts it back to ``receiving``. ``cancelled``
    jobs stay cancelled. A series split over several associations is therefore simply
    one series. A duplicate SOPInstanceUID changes nothing.

Forwarding
    :meth:`Database.finish_processing` creates a ``pending`` forward per destination.
    The forward module sends the due ones (:meth:`Database.due_forwards`) and reports
    each attempt (:meth:`Database.record_forward_result`): the job is ``done`` when
    every destination is ``sent`` and ``failed`` as soon as one destination exhausts
    ``max_attempts``. A retry re-opens only the failed destinations; ``sent`` stays sent
    while the derived series (UID and instance count) is unchanged.

SQLite (the default) runs in WAL mode with ``synchronous=FULL`` (a C-STORE is
acknowledged only after its row is committed), a busy timeout and foreign keys on.
Write transactions start with ``BEGIN IMMEDIATE`` so that concurrent writers (several
associations, the scheduler, an admin CLI in another process) queue on the lock instead
of failing on a read-to-write upgrade; job claims are additionally guarded by
``UPDATE ... WHERE state = 'queued'`` and its row count, which is also what keeps them
exclusive on PostgreSQL (where the candidate is picked with ``FOR UPDATE SKIP LOCKED``).

Several processes on one database (scale-out)
    A claimed job is leased to its worker (``worker_id``, ``lease_expires_at``); the
    worker's heartbeat extends the lease, and :meth:`Database.requeue_expired`, which
    any process may run, re-queues jobs whose lease ran out (a dead worker's). A worker
    finishes or fails a job only while it still holds it. A due forward is sent by
    one process at a time: :meth:`Database.claim_forward` leases it to its sender.
    The schema itself is managed by Alembic (:mod:`ldct_node.migrate`).

Jobs that take their worker down
    Every re-queue of a running job whose worker died (startup, expired lease) counts
    in ``crashes``; at :data:`MAX_JOB_CRASHES` the job is ``failed`` ("quarantined")
    instead, so that one series cannot crash-loop the node. A worker handing a job back
    (shutdown, :meth:`Database.defer_job` for want of disk space) is no crash.

All timestamps are timezone-aware UTC; functions taking ``now`` reject naive values.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:
    from ldct_node.config import Settings

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
_CLAIM_TRIES = 20
#: How long a claimed job or forward belongs to its worker without a heartbeat.
DEFAULT_LEASE_SECONDS = 300.0
_READ_ONLY_OPTION = "ldct_read_only"
#: A job whose worker process died this many times while running it is failed
#: (quarantined) instead of re-queued, so that one poisonous series cannot crash-loop
#: the node; ``retry`` resets the count.
MAX_JOB_CRASHES = 2


class JobState(StrEnum):
    """The job states of DESIGN section 4 (values are what the table and CLI show)."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    RUNNING = "running"
    FORWARDING = "forwarding"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ForwardState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class SeriesState(StrEnum):
    RECEIVING = "receiving"  # processable instances arriving
    STABLE = "stable"  # no new instance for stable_seconds; jobs queued
    IGNORED = "ignored"  # only skipped instances so far; no jobs


_S = JobState
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _S.RECEIVING: frozenset({_S.QUEUED, _S.CANCELLED}),
    _S.QUEUED: frozenset({_S.RUNNING, _S.RECEIVING, _S.CANCELLED}),
    _S.RUNNING: frozenset(
        {_S.FORWARDING, _S.DONE, _S.FAILED, _S.QUEUED, _S.RECEIVING, _S.CANCELLED}
    ),
    _S.FORWARDING: frozenset({_S.DONE, _S.FAILED, _S.RECEIVING, _S.CANCELLED}),
    _S.DONE: frozenset({_S.RECEIVING}),
    _S.FAILED: frozenset({_S.QUEUED, _S.RECEIVING, _S.CANCELLED}),
    _S.CANCELLED: frozenset({_S.QUEUED}),
}
# States whose job is re-opened (-> receiving) when the series gets a new instance.
_REOPEN_ON_NEW_INSTANCE = (_S.QUEUED, _S.FORWARDING, _S.DONE, _S.FAILED)


class TransitionError(ValueError):
    """An illegal job state transition; the message names the job and both states."""

    def __init__(self, job_id: int, from_state: str, to_state: str, action: str = "") -> None:
        self.job_id = job_id
        self.from_state = from_state
        self.to_state = to_state
        what = f"cannot {action} job {job_id}" if action else f"job {job_id}"
        super().__init__(f"{what}: illegal transition {from_state} -> {to_state}")


class JobNotFoundError(LookupError):
    """No job with the given id."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id}")


def check_transition(from_state: str, to_state: str, job_id: int = 0, action: str = "") -> None:
    """Raise :class:`TransitionError` unless ``from_state -> to_state`` is allowed."""
    try:
        src, dst = JobState(from_state), JobState(to_state)
    except ValueError:
        raise TransitionError(job_id, from_state, to_state, action) from None
    if dst not in ALLOWED_TRANSITIONS[src]:
        raise TransitionError(job_id, from_state, to_state, action)


def _holds(job: Job, worker_id: str | None) -> bool:
    """True unless ``worker_id`` is given and the job is held by someone else."""
    return worker_id is None or job.worker_id == worker_id


def _now(now: datetime | None, name: str = "now") -> datetime:
    if now is None:
        return datetime.now(UTC)
    if not isinstance(now, datetime):
        raise TypeError(f"{name}: expected datetime, got {type(now).__name__}")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"{name}: must be timezone-aware (e.g. datetime.now(UTC))")
    return now.astimezone(UTC)


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, naive UTC in the database.

    Portable across SQLite (no time zone support) and PostgreSQL.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return _now(value, "datetime value").replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    state: Mapped[str] = mapped_column(String(16))
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", cascade="all, delete-orphan", passive_deletes=True
    )
    jobs: Mapped[list[Job]] = relationship(
        back_populates="series", cascade="all, delete-orphan", passive_deletes=True
    )


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    z_position: Mapped[float | None] = mapped_column(Float)
    skip_reason: Mapped[str | None] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("series_id", "profile", name="uq_job_series_profile"),
        Index("ix_job_state_updated", "state", "updated_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    profile: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Claims of this job that ended with their worker process gone (killed, crashed,
    # out of memory): at MAX_JOB_CRASHES the job is failed instead of re-queued.
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The running job belongs to worker_id until then; heartbeats extend it (scale-out).
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    derived_series_uid: Mapped[str | None] = mapped_column(String(64))
    output_dir: Mapped[str | None] = mapped_column(Text)
    n_instances: Mapped[int | None] = mapped_column(Integer)
    rerun_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(back_populates="jobs")
    forwards: Mapped[list[Forward]] = relationship(
        back_populates="job",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Forward.destination",
    )


class Forward(Base):
    __tablename__ = "forward"
    __table_args__ = (UniqueConstraint("job_id", "destination", name="uq_forward_job_dest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    n_sent: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The process sending it right now, until claim_expires_at (one sender at a time).
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    job: Mapped[Job] = relationship(back_populates="forwards")


# --------------------------------------------------------------------------------------
# Plain value objects handed to callers (no live ORM state escapes a session)
# --------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """What the receiver knows about one stored instance (UIDs and geometry, no PHI)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    calling_aet: str = ""
    modality: str | None = None
    instance_number: int | None = None
    z_position: float | None = None
    skip_reason: str | None = None
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ForwardInfo:
    """One destination of one job, with what the sender needs from the job."""

    id: int
    job_id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    n_sent: int
    updated_at: datetime
    sent_at: datetime | None
    output_dir: str | None
    derived_series_uid: str | None
    n_instances: int | None

    def as_dict(self) -> dict[str, Any]:
        return dict(_jsonable(asdict(self)))


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A snapshot of one job row with its series and forwards."""

    id: int
    series_id: int
    series_instance_uid: str
    study_instance_uid: str
    calling_aet: str
    profile: str
    state: str
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: str | None
    heartbeat_at: datetime | None
    derived_series_uid: str | None
    output_dir: str | None
    n_instances: int | None
    rerun_requested: bool
    source_instances: int
    purged_at: datetime | None
    forwards: tuple[ForwardInfo, ...] = ()
    #: Claims that ended with the worker process dying (see MAX_JOB_CRASHES).
    crashes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(_jsonable(asdict(self)))


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    job_id: int
    state: str
    at: datetime
    error: str


@dataclass(frozen=True, slots=True)
class StatusSummary:
    """What ``ldct-node status`` shows."""

    counts: dict[str, int]
    queue_depth: int
    oldest_queued_at: datetime | None
    done_last_hour: int
    failed_last_hour: int
    instances_last_hour: int
    pending_forwards: int
    last_errors: tuple[ErrorInfo, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return dict(_jsonable(asdict(self)))


@dataclass(frozen=True, slots=True)
class PurgeCandidate:
    """A series whose spooled source files and derived outputs may be deleted."""

    series_id: int
    series_instance_uid: str
    last_received_at: datetime
    instance_ids: tuple[int, ...]
    job_ids: tuple[int, ...]
    paths: tuple[Path, ...]


def _forward_info(fwd: Forward, job: Job) -> ForwardInfo:
    return ForwardInfo(
        id=fwd.id,
        job_id=fwd.job_id,
        destination=fwd.destination,
        state=fwd.state,
        attempts=fwd.attempts,
        next_attempt_at=fwd.next_attempt_at,
        last_error=fwd.last_error,
        n_sent=fwd.n_sent,
        updated_at=fwd.updated_at,
        sent_at=fwd.sent_at,
        output_dir=job.output_dir,
        derived_series_uid=job.derived_series_uid,
        n_instances=job.n_instances,
    )


def _job_info(job: Job) -> JobInfo:
    series = job.series
    return JobInfo(
        id=job.id,
        series_id=job.series_id,
        series_instance_uid=series.series_instance_uid,
        study_instance_uid=series.study_instance_uid,
        calling_aet=series.calling_aet,
        profile=job.profile,
        state=job.state,
        attempts=job.attempts,
        error=job.error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        worker_id=job.worker_id,
        heartbeat_at=job.heartbeat_at,
        derived_series_uid=job.derived_series_uid,
        output_dir=job.output_dir,
        n_instances=job.n_instances,
        rerun_requested=job.rerun_requested,
        crashes=job.crashes or 0,
        source_instances=series.n_instances - series.n_skipped,
        purged_at=job.purged_at,
        forwards=tuple(_forward_info(f, job) for f in job.forwards),
    )


# --------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------


def _is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _sqlite_file(url: URL) -> Path | None:
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).expanduser()


def _prepare_sqlite_file(path: Path) -> None:
    """Create the database's directory (0700) and file (0600) before SQLite does."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(parent, 0o700)
    if not path.exists():
        # SQLite would create it 0644 (minus umask); its -wal/-shm copy this mode.
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)


def _make_engine(url: URL) -> Engine:
    if not _is_sqlite(url):
        return create_engine(url, pool_pre_ping=True, future=True)
    db_file = _sqlite_file(url)
    if db_file is not None:
        _prepare_sqlite_file(db_file)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=10,
            max_overflow=20,
        )
    else:
        # One shared in-memory database (tests); StaticPool gives every user the same one.
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so that BEGIN IMMEDIATE is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(_READ_ONLY_OPTION, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


# --------------------------------------------------------------------------------------
# The database API
# --------------------------------------------------------------------------------------


class Database:
    """The job database.

    Parameters
    ----------
    url
        A SQLAlchemy URL (``sqlite:////abs/path.db``, ``sqlite://`` for in-memory,
        ``postgresql+psycopg://...``).
    """

    def __init__(self, url: str | URL) -> None:
        if not isinstance(url, str | URL):
            raise TypeError(f"url: expected str or URL, got {type(url).__name__}")
        self.url = make_url(url)
        self.engine = _make_engine(self.url)
        self._writer = sessionmaker(self.engine, expire_on_commit=False)
        self._reader = sessionmaker(
            self.engine.execution_options(**{_READ_ONLY_OPTION: True}), expire_on_commit=False
        )

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"

    def create_schema(self) -> None:
        """Create missing tables and indexes (idempotent)."""
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    @contextmanager
    def session(self, read_only: bool = False) -> Iterator[Session]:
        """One transaction: committed on normal exit, rolled back on an exception."""
        maker = self._reader if read_only else self._writer
        with maker.begin() as sess:
            yield sess

    # -- internal helpers ---------------------------------------------------------------
    @staticmethod
    def _job_for_update(sess: Session, job_id: int) -> Job:
        job = sess.scalars(
            select(Job)
            .where(Job.id == job_id)
            .options(selectinload(Job.forwards))
            .with_for_update()
        ).first()
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    @staticmethod
    def _set_state(job: Job, to_state: JobState, now: datetime, action: str = "") -> None:
        check_transition(job.state, to_state, job.id, action)
        job.state = to_state
        job.updated_at = now

    @staticmethod
    def _reset_forward(fwd: Forward, now: datetime) -> None:
        fwd.state = ForwardState.PENDING
        fwd.attempts = 0
        fwd.n_sent = 0
        fwd.last_error = None
        fwd.next_attempt_at = now
        fwd.sent_at = None
        fwd.updated_at = now
        fwd.claimed_by = None
        fwd.claim_expires_at = None

    def _reset_forwards(self, job: Job, now: datetime, only_failed: bool = False) -> None:
        for fwd in job.forwards:
            if not only_failed or fwd.state == ForwardState.FAILED:
                self._reset_forward(fwd, now)

    def _reopen(self, job: Job, now: datetime) -> None:
        """Back to receiving because the series changed: the output must be redone."""
        self._set_state(job, JobState.RECEIVING, now)
        job.error = None
        job.finished_at = None
        job.worker_id = None
        job.rerun_requested = False
        self._reset_forwards(job, now)

    # -- receiving ----------------------------------------------------------------------
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
    ) -> bool:
        """Record a stored instance; create or re-open the series' jobs.

        Parameters
        ----------
        instance
            The stored instance. With ``skip_reason`` set it is recorded but creates or
            re-opens no job.
        profiles
            Names of the configured output profiles: one job per profile.

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
        try:
            return self._record_instance(instance, tuple(profiles), now)
        except IntegrityError:
            # A concurrent writer inserted the same series or SOP instance first (only
            # possible without BEGIN IMMEDIATE, i.e. on server databases): redo once.
            return self._record_instance(instance, tuple(profiles), now)

    def _record_instance(
        self, inst: ReceivedInstance, profiles: tuple[str, ...], now: datetime
    ) -> bool:
        with self.session() as sess:
            known = sess.execute(
                select(Series.series_instance_uid)
                .join(Instance, Instance.series_id == Series.id)
                .where(Instance.sop_instance_uid == inst.sop_instance_uid)
            ).first()
            if known is not None:
                if known[0] != inst.series_instance_uid:
                    logger.warning(
                        "SOP instance %s arrived again under series %s; keeping it in %s",
                        inst.sop_instance_uid,
                        inst.series_instance_uid,
                        known[0],
                    )
                return False

            series = sess.scalars(
                select(Series)
                .where(Series.series_instance_uid == inst.series_instance_uid)
                .with_for_update()
            ).first()
            if series is None:
                series = Series(
                    series_instance_uid=inst.series_instance_uid,
                    study_instance_uid=inst.study_instance_uid,
                    calling_aet=inst.calling_aet,
                    modality=inst.modality,
                    n_instances=0,
                    n_skipped=0,
                    first_received_at=now,
                    last_received_at=now,
                    state=SeriesState.IGNORED,
                )
                sess.add(series)
                sess.flush()
            sess.add(
                Instance(
                    sop_instance_uid=inst.sop_instance_uid,
                    series_id=series.id,
                    path=str(inst.path),
                    sop_class_uid=inst.sop_class_uid,
                    transfer_syntax_uid=inst.transfer_syntax_uid,
                    instance_number=inst.instance_number,
                    z_position=inst.z_position,
                    skip_reason=inst.skip_reason,
                    size_bytes=inst.size_bytes,
                    received_at=now,
                )
            )
            series.n_instances += 1
            series.last_received_at = max(series.last_received_at, now)
            series.purged_at = None
            if inst.skip_reason is not None:
                series.n_skipped += 1
                return True

            series.state = SeriesState.RECEIVING
            jobs = sess.scalars(
                select(Job)
                .where(Job.series_id == series.id)
                .options(selectinload(Job.forwards))
                .with_for_update()
            ).all()
            have = {job.profile for job in jobs}
            for profile in profiles:
                if profile not in have:
                    sess.add(
                        Job(
                            series_id=series.id,
                            profile=profile,
                            state=JobState.RECEIVING,
                            attempts=0,
                            created_at=now,
                            updated_at=now,
                            rerun_requested=False,
                        )
                    )
            for job in jobs:
                if job.state in _REOPEN_ON_NEW_INSTANCE:
                    logger.info("job %d: series got a new instance; back to receiving", job.id)
                    self._reopen(job, now)
                elif job.state == JobState.RUNNING and not job.rerun_requested:
                    logger.info("job %d: series got a new instance while running", job.id)
                    job.rerun_requested = True
                    job.updated_at = now
        return True

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

    # -- processing ---------------------------------------------------------------------
    def claim_next_job(
        self,
        worker_id: str,
        now: datetime | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> JobInfo | None:
        """Atomically take the longest-queued job: ``queued -> running``.

        Safe across threads and processes: on PostgreSQL the candidate row is locked
        with ``FOR UPDATE SKIP LOCKED`` (concurrent workers take different jobs without
        waiting); on every backend the row is updated only if it is still ``queued``
        and the update's row count decides who got it. The job is leased to
        ``worker_id`` for ``lease_seconds`` (heartbeats extend it).
        """
        if not worker_id:
            raise ValueError("worker_id: must not be empty")
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds: must be > 0, got {lease_seconds}")
        now = _now(now)
        for _ in range(_CLAIM_TRIES):
            with self.session() as sess:
                candidate = sess.scalar(
                    select(Job.id)
                    .where(Job.state == JobState.QUEUED)
                    .order_by(Job.updated_at, Job.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)  # SQLite: no-op, BEGIN IMMEDIATE
                )
                if candidate is None:
                    return None
                result = sess.execute(
                    update(Job)
                    .where(Job.id == candidate, Job.state == JobState.QUEUED)
                    .values(
                        state=JobState.RUNNING,
                        worker_id=worker_id,
                        started_at=now,
                        heartbeat_at=now,
                        lease_expires_at=now + timedelta(seconds=lease_seconds),
                        updated_at=now,
                        finished_at=None,
                        attempts=Job.attempts + 1,
                    )
                    .execution_options(synchronize_session=False)
                )
                if getattr(result, "rowcount", 0) == 1:
                    job = sess.scalars(
                        select(Job)
                        .where(Job.id == candidate)
                        .options(selectinload(Job.forwards), selectinload(Job.series))
                        .execution_options(populate_existing=True)
                    ).one()
                    info = _job_info(job)
                    logger.info("job %d claimed by %s", candidate, worker_id)
                    return info
            # Someone else claimed that one between our read and our update: next.
        return None

    def heartbeat(
        self,
        job_id: int,
        worker_id: str | None = None,
        now: datetime | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> bool:
        """Refresh a running job's heartbeat and extend its lease by ``lease_seconds``.

        Returns
        -------
        bool
            False if the job is no longer running (for this worker, when given): it
            was cancelled or taken away, and the worker should stop working on it.
        """
        now = _now(now)
        with self.session() as sess:
            stmt = update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING)
            if worker_id is not None:
                stmt = stmt.where(Job.worker_id == worker_id)
            result = sess.execute(
                stmt.values(
                    heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds)
                ).execution_options(synchronize_session=False)
            )
            return getattr(result, "rowcount", 0) == 1

    def finish_processing(
        self,
        job_id: int,
        derived_series_uid: str,
        output_dir: Path | str,
        n_instances: int,
        destinations: Sequence[str],
        now: datetime | None = None,
        worker_id: str | None = None,
    ) -> JobState:
        """The worker wrote the derived series: ``running -> forwarding`` (or ``done``).

        A pending forward is created per destination; destinations already ``sent``
        the same derived series (same UID and instance count) are not sent again.
        If the series got new instances meanwhile (``rerun_requested``) the job goes
        back to ``receiving`` instead.

        Returns
        -------
        JobState
            The job's new state.

        Raises
        ------
        TransitionError
            If the job is not running (e.g. cancelled meanwhile), or, with
            ``worker_id``, no longer runs for that worker (its lease expired and
            another worker took it over).
        """
        if not derived_series_uid:
            raise ValueError("derived_series_uid: must not be empty")
        if n_instances < 0:
            raise ValueError(f"n_instances: must be >= 0, got {n_instances}")
        if isinstance(destinations, str):
            raise TypeError("destinations: expected a sequence of names, got a str")
        now = _now(now)
        with self.session() as sess:
            job = self._job_for_update(sess, job_id)
            if job.state != JobState.RUNNING or not _holds(job, worker_id):
                raise TransitionError(job_id, job.state, JobState.FORWARDING, "finish")
            same_output = (
                job.derived_series_uid == derived_series_uid and job.n_instances == n_instances
            )
            job.derived_series_uid = derived_series_uid
            job.output_dir = str(output_dir)
            job.n_instances = n_instances
            job.purged_at = None
            if job.rerun_requested:
                self._reopen(job, now)
                logger.info("job %d: series changed while running; back to receiving", job_id)
                return JobState.RECEIVING

            wanted = list(dict.fromkeys(destinations))
            by_dest = {f.destination: f for f in job.forwards}
            for name, old in by_dest.items():
                if name not in wanted:  # destination no longer configured
                    job.forwards.remove(old)
            for name in wanted:
                fwd = by_dest.get(name)
                if fwd is None:
                    job.forwards.append(
                        Forward(
                            destination=name,
                            state=ForwardState.PENDING,
                            attempts=0,
                            n_sent=0,
                            next_attempt_at=now,
                            updated_at=now,
                        )
                    )
                elif not same_output or fwd.state == ForwardState.FAILED:
                    self._reset_forward(fwd, now)
                elif fwd.state == ForwardState.PENDING:
                    fwd.next_attempt_at = now
                    fwd.updated_at = now
            if all(f.state == ForwardState.SENT for f in job.forwards):
                self._set_state(job, JobState.DONE, now, "finish")
                job.finished_at = now
                job.error = None
            else:
                self._set_state(job, JobState.FORWARDING, now, "finish")
                job.error = None
            state = JobState(job.state)
        logger.info("job %d: processed %d instance(s); %s", job_id, n_instances, state)
        return state

    def fail_job(
        self, job_id: int, error: str, now: datetime | None = None, worker_id: str | None = None
    ) -> JobState:
        """``running | forwarding -> failed`` with a reason a person can act on.

        With ``worker_id``, a running job is failed only while that worker holds it.

        A running job whose series changed meanwhile (``rerun_requested``) goes back
        to ``receiving`` instead, keeping the error: the next run uses the new input.

        Returns
        -------
        JobState
            The job's new state.
        """
        if not error:
            raise ValueError("error: must say why the job failed")
        now = _now(now)
        with self.session() as sess:
            job = self._job_for_update(sess, job_id)
            if job.state == JobState.RUNNING and not _holds(job, worker_id):
                raise TransitionError(job_id, job.state, JobState.FAILED, "fail")
            if job.state == JobState.RUNNING and job.rerun_requested:
                self._reopen(job, now)
                job.error = error
                return JobState.RECEIVING
            self._set_state(job, JobState.FAILED, now, "fail")
            job.error = error
            job.finished_at = now
        logger.warning("job %d failed: %s", job_id, error)
        return JobState.FAILED

    def retry_job(self, job_id: int, now: datetime | None = None) -> None:
        """``failed | cancelled -> queued``; only failed forwards are re-opened."""
        now = _now(now)
        with self.session() as sess:
            job = self._job_for_update(sess, job_id)
            self._set_state(job, JobState.QUEUED, now, "retry")
            job.error = None
            job.finished_at = None
            job.worker_id = None
            job.rerun_requested = False
            job.crashes = 0
            self._reset_forwards(job, now, only_failed=True)
        logger.info("job %d: retry requested; queued", job_id)

    def cancel_job(self, job_id: int, now: datetime | None = None) -> None:
        """Cancel a job that is not done; a running worker sees it at its next heartbeat."""
        now = _now(now)
        with self.session() as sess:
            job = self._job_for_update(sess, job_id)
            self._set_state(job, JobState.CANCELLED, now, "cancel")
            job.finished_at = now
            job.rerun_requested = False
        logger.info("job %d cancelled", job_id)

    def requeue_running(self, now: datetime | None = None) -> list[int]:
        """At startup: every ``running`` job goes back to ``queued``.

        (A running job whose series changed meanwhile goes to ``receiving`` so that it
        waits for the series to be stable again.)
        """
        stmt = select(Job).where(Job.state == JobState.RUNNING)
        return self._requeue(stmt, _now(now), crashed=True)

    def requeue_job(self, job_id: int, worker_id: str, now: datetime | None = None) -> bool:
        """``running -> queued`` for one job this worker holds (a worker shutting down).

        Returns False when the job is no longer running under ``worker_id`` (cancelled,
        or taken over after a stale heartbeat). A job whose series changed meanwhile
        goes to ``receiving`` instead.
        """
        stmt = select(Job).where(
            Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == worker_id
        )
        return bool(self._requeue(stmt, _now(now), crashed=False))

    def defer_job(
        self, job_id: int, worker_id: str, reason: str, now: datetime | None = None
    ) -> bool:
        """``running -> queued`` for a job its worker cannot finish for want of a resource
        (disk space): it runs again by itself later; ``reason`` (shown by ``status``) says
        what it waits for until the job is finished.

        Returns False when the job is no longer running under ``worker_id``.
        """
        if not reason:
            raise ValueError("reason: must say what the job waits for")
        stmt = select(Job).where(
            Job.id == job_id, Job.state == JobState.RUNNING, Job.worker_id == worker_id
        )
        return bool(self._requeue(stmt, _now(now), crashed=False, error=reason))

    def requeue_stale(self, older_than_seconds: float, now: datetime | None = None) -> list[int]:
        """``running -> queued`` for jobs whose heartbeat is older than the given age.

        For several worker processes sharing a database: a worker that died leaves its
        job running with an ageing heartbeat.
        """
        if older_than_seconds <= 0:
            raise ValueError(f"older_than_seconds: must be > 0, got {older_than_seconds}")
        now = _now(now)
        cutoff = now - timedelta(seconds=older_than_seconds)
        stmt = select(Job).where(
            Job.state == JobState.RUNNING,
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
        )
        return self._requeue(stmt, now, crashed=True)

    def requeue_expired(self, now: datetime | None = None) -> list[int]:
        """``running -> queued`` for jobs whose lease expired (their worker died).

        Any process sharing the database may call this: a live worker renews its
        lease with every heartbeat, so only abandoned jobs are taken. Rows without a
        lease (written by a version without leases) fall back to the heartbeat age.
        """
        now = _now(now)
        legacy_cutoff = now - timedelta(seconds=DEFAULT_LEASE_SECONDS)
        stmt = select(Job).where(
            Job.state == JobState.RUNNING,
            or_(
                Job.lease_expires_at < now,
                Job.lease_expires_at.is_(None)
                & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < legacy_cutoff),
            ),
        )
        return self._requeue(stmt, now, crashed=True)

    def requeue_owned_by(self, worker_ids: Iterable[str], now: datetime | None = None) -> list[int]:
        """``running -> queued`` for the jobs held by the given (dead) workers."""
        if isinstance(worker_ids, str):
            raise TypeError("worker_ids: expected a collection of worker ids, got a str")
        owners = sorted(set(worker_ids))
        if not owners:
            return []
        stmt = select(Job).where(Job.state == JobState.RUNNING, Job.worker_id.in_(owners))
        return self._requeue(stmt, _now(now), crashed=True)

    def running_owners(self) -> set[str]:
        """The worker ids holding running jobs."""
        with self.session(read_only=True) as sess:
            rows = sess.scalars(
                select(Job.worker_id)
                .where(Job.state == JobState.RUNNING, Job.worker_id.is_not(None))
                .distinct()
            ).all()
        return {str(r) for r in rows}

    def forward_claim_owners(self) -> set[str]:
        """The senders holding claims on pending forwards (live or expired)."""
        with self.session(read_only=True) as sess:
            rows = sess.scalars(
                select(Forward.claimed_by)
                .where(Forward.state == ForwardState.PENDING, Forward.claimed_by.is_not(None))
                .distinct()
            ).all()
        return {str(r) for r in rows}

    def release_forward_claims(self, owners: Iterable[str]) -> int:
        """Drop the forward claims of the given (dead) senders, so a send cut by a crash
        is retried at once instead of after the claim's lease. Returns how many."""
        if isinstance(owners, str):
            raise TypeError("owners: expected a collection of sender ids, got a str")
        names = sorted(set(owners))
        if not names:
            return 0
        with self.session() as sess:
            result = sess.execute(
                update(Forward)
                .where(Forward.claimed_by.in_(names))
                .values(claimed_by=None, claim_expires_at=None)
                .execution_options(synchronize_session=False)
            )
            released = int(getattr(result, "rowcount", 0) or 0)
        if released:
            logger.info("released %d forward claim(s) of stopped process(es)", released)
        return released

    def _requeue(
        self, stmt: Any, now: datetime, *, crashed: bool, error: str | None = None
    ) -> list[int]:
        """Hand running jobs back; ``crashed``: their worker died, which counts towards
        MAX_JOB_CRASHES (such jobs are failed, and not among the ids returned);
        ``error``: recorded on the jobs handed back."""
        quarantined: list[int] = []
        with self.session() as sess:
            jobs = sess.scalars(
                stmt.options(selectinload(Job.forwards))
                .with_for_update(skip_locked=True)  # another process is requeuing those
                .order_by(Job.id)
            ).all()
            ids = []
            for job in jobs:
                if crashed:
                    job.crashes = (job.crashes or 0) + 1
                if crashed and job.crashes >= MAX_JOB_CRASHES:
                    self._set_state(job, JobState.FAILED, now, "quarantine")
                    job.error = (
                        f"quarantined: the worker process running job {job.id} ended "
                        f"{job.crashes} times before finishing it (killed, out of memory "
                        "or crashed), so it is not run again; the other jobs go on. Check "
                        "the series (image size, encoding) and the node's log, then "
                        f"`ldct-node retry {job.id}` or `ldct-node cancel {job.id}`"
                    )
                    job.finished_at = now
                    job.rerun_requested = False
                    quarantined.append(job.id)
                elif job.rerun_requested:
                    self._reopen(job, now)
                    ids.append(job.id)
                else:
                    self._set_state(job, JobState.QUEUED, now)
                    ids.append(job.id)
                if error is not None and job.id in ids:
                    job.error = error
                job.worker_id = None
                job.heartbeat_at = None
                job.lease_expires_at = None
        if ids:
            logger.info("re-queued %d interrupted job(s): %s", len(ids), ids)
        for job_id in quarantined:
            logger.warning(
                "job %d failed: quarantined after its worker died %d times running it",
                job_id,
                MAX_JOB_CRASHES,
            )
        return ids

    def job_instances(self, job_id: int) -> list[Path]:
        """Spool paths of the job's processable instances, in slice order.

        Sorted by slice position along the normal, then InstanceNumber, then UID;
        skipped instances (localizers, derived...) are left out.
        """
        with self.session(read_only=True) as sess:
            series_id = sess.scalar(select(Job.series_id).where(Job.id == job_id))
            if series_id is None:
                raise JobNotFoundError(job_id)
            rows = sess.execute(
                select(Instance.path, Instance.z_position, Instance.instance_number)
                .where(Instance.series_id == series_id, Instance.skip_reason.is_(None))
                .order_by(Instance.sop_instance_uid)
            ).all()

        def key(row: Any) -> tuple[bool, float, bool, int]:
            return (
                row.z_position is None,
                row.z_position if row.z_position is not None else 0.0,
                row.instance_number is None,
                row.instance_number if row.instance_number is not None else 0,
            )

        return [Path(row.path) for row in sorted(rows, key=key)]

    # -- forwarding ---------------------------------------------------------------------
    def due_forwards(self, now: datetime | None = None) -> list[ForwardInfo]:
        """Pending forwards of ``forwarding`` jobs whose next attempt is due."""
        now = _now(now)
        with self.session(read_only=True) as sess:
            rows = sess.execute(
                select(Forward, Job)
                .join(Job, Forward.job_id == Job.id)
                .where(
                    Job.state == JobState.FORWARDING,
                    Forward.state == ForwardState.PENDING,
                    or_(Forward.next_attempt_at.is_(None), Forward.next_attempt_at <= now),
                    or_(Forward.claim_expires_at.is_(None), Forward.claim_expires_at < now),
                )
                .order_by(Forward.next_attempt_at, Forward.id)
            ).all()
            return [_forward_info(fwd, job) for fwd, job in rows]

    def claim_forward(
        self,
        forward_id: int,
        owner: str,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        now: datetime | None = None,
    ) -> bool:
        """Take a due forward for sending (one sender at a time across processes).

        Also renews a claim ``owner`` already holds. Returns False when the forward is
        not pending, its job is not ``forwarding``, or another sender holds a live
        claim; :meth:`record_forward_result` releases the claim.
        """
        if not owner:
            raise ValueError("owner: must not be empty")
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds: must be > 0, got {lease_seconds}")
        now = _now(now)
        forwarding = select(Job.id).where(
            Job.id == Forward.job_id, Job.state == JobState.FORWARDING
        )
        with self.session() as sess:
            result = sess.execute(
                update(Forward)
                .where(
                    Forward.id == forward_id,
                    Forward.state == ForwardState.PENDING,
                    forwarding.exists(),
                    or_(
                        Forward.claimed_by.is_(None),
                        Forward.claimed_by == owner,
                        Forward.claim_expires_at < now,
                    ),
                )
                .values(claimed_by=owner, claim_expires_at=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            return getattr(result, "rowcount", 0) == 1

    def release_forward(self, forward_id: int, owner: str) -> None:
        """Give up a claim without booking an attempt (e.g. a send cut by shutdown)."""
        with self.session() as sess:
            sess.execute(
                update(Forward)
                .where(Forward.id == forward_id, Forward.claimed_by == owner)
                .values(claimed_by=None, claim_expires_at=None)
                .execution_options(synchronize_session=False)
            )

    def record_forward_result(
        self,
        job_id: int,
        destination: str,
        *,
        ok: bool,
        n_sent: int,
        max_attempts: int,
        error: str | None = None,
        next_attempt_at: datetime | None = None,
        now: datetime | None = None,
    ) -> JobState:
        """Book one attempt to send a job's derived series to one destination.

        Parameters
        ----------
        ok
            True if every instance was accepted by the destination.
        n_sent
            Instances the destination accepted in this attempt.
        max_attempts
            After this many failed attempts the destination (and the job) is failed.
        error
            On failure: what went wrong, including the peer's DIMSE status.
        next_attempt_at
            On failure: when to try again (default: now).

        Returns
        -------
        JobState
            The job's state afterwards (``done`` once every destination is sent,
            ``failed`` once one has exhausted its attempts). A job that is no longer
            ``forwarding`` (cancelled, re-opened) keeps its state.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1, got {max_attempts}")
        if n_sent < 0:
            raise ValueError(f"n_sent: must be >= 0, got {n_sent}")
        now = _now(now)
        retry_at = _now(next_attempt_at, "next_attempt_at") if next_attempt_at else now
        with self.session() as sess:
            job = self._job_for_update(sess, job_id)
            fwd = next((f for f in job.forwards if f.destination == destination), None)
            if fwd is None:
                raise LookupError(f"job {job_id} has no forward to destination {destination!r}")
            fwd.attempts += 1
            fwd.n_sent = n_sent
            fwd.updated_at = now
            fwd.claimed_by = None
            fwd.claim_expires_at = None
            if ok:
                fwd.state = ForwardState.SENT
                fwd.sent_at = now
                fwd.last_error = None
                fwd.next_attempt_at = None
            else:
                fwd.last_error = error or "unknown error"
                if fwd.attempts >= max_attempts:
                    fwd.state = ForwardState.FAILED
                    fwd.next_attempt_at = None
                else:
                    fwd.next_attempt_at = retry_at
            if job.state == JobState.FORWARDING:
                failed = [f for f in job.forwards if f.state == ForwardState.FAILED]
                if failed:
                    self._set_state(job, JobState.FAILED, now)
                    job.finished_at = now
                    job.error = "; ".join(
                        f"forward to {f.destination} failed after {f.attempts} attempt(s): "
                        f"{f.last_error}"
                        for f in failed
                    )
                    logger.warning("job %d failed: forwarding exhausted its attempts", job_id)
                elif all(f.state == ForwardState.SENT for f in job.forwards):
                    self._set_state(job, JobState.DONE, now)
                    job.finished_at = now
                    logger.info("job %d done", job_id)
            return JobState(job.state)

    # -- queries for the admin CLI --------------------------------------------------------
    def get_job(self, job_id: int) -> JobInfo:
        with self.session(read_only=True) as sess:
            job = sess.scalars(
                select(Job)
                .where(Job.id == job_id)
                .options(selectinload(Job.forwards), selectinload(Job.series))
            ).first()
            if job is None:
                raise JobNotFoundError(job_id)
            return _job_info(job)

    def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[JobInfo]:
        """Jobs in id order, optionally only those in ``state``; ``limit``: the newest N."""
        stmt = select(Job).options(selectinload(Job.forwards), selectinload(Job.series))
        if state is not None:
            try:
                stmt = stmt.where(Job.state == JobState(state))
            except ValueError:
                valid = ", ".join(s.value for s in JobState)
                raise ValueError(f"state: {state!r} is not one of {valid}") from None
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit: must be >= 1, got {limit}")
            stmt = stmt.order_by(Job.id.desc()).limit(limit)
        with self.session(read_only=True) as sess:
            jobs = [_job_info(job) for job in sess.scalars(stmt).all()]
        return sorted(jobs, key=lambda j: j.id)

    def status_summary(self, now: datetime | None = None, n_errors: int = 5) -> StatusSummary:
        """Queue depth, jobs by state, recent throughput and the latest errors."""
        now = _now(now)
        hour_ago = now - timedelta(hours=1)
        with self.session(read_only=True) as sess:
            counts = {s.value: 0 for s in JobState}
            for state, count in sess.execute(
                select(Job.state, func.count()).group_by(Job.state)
            ).all():
                counts[state] = count
            oldest = sess.scalar(
                select(func.min(Job.updated_at)).where(Job.state == JobState.QUEUED)
            )
            done_hour = sess.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.state == JobState.DONE, Job.finished_at >= hour_ago)
            )
            failed_hour = sess.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.state == JobState.FAILED, Job.finished_at >= hour_ago)
            )
            instances_hour = sess.scalar(
                select(func.count()).select_from(Instance).where(Instance.received_at >= hour_ago)
            )
            pending = sess.scalar(
                select(func.count())
                .select_from(Forward)
                .join(Job, Forward.job_id == Job.id)
                .where(Forward.state == ForwardState.PENDING, Job.state == JobState.FORWARDING)
            )
            errors = sess.execute(
                select(Job.id, Job.state, Job.updated_at, Job.error)
                .where(Job.error.is_not(None))
                .order_by(Job.updated_at.desc())
                .limit(n_errors)
            ).all()
        return StatusSummary(
            counts=counts,
            queue_depth=counts[JobState.QUEUED],
            oldest_queued_at=oldest,
            done_last_hour=int(done_hour or 0),
            failed_last_hour=int(failed_hour or 0),
            instances_last_hour=int(instances_hour or 0),
            pending_forwards=int(pending or 0),
            last_errors=tuple(
                ErrorInfo(job_id=r.id, state=r.state, at=r.updated_at, error=r.error or "")
                for r in errors
            ),
        )

    # -- retention ----------------------------------------------------------------------
    def purge_candidates(self, older_than: datetime) -> list[PurgeCandidate]:
        """Series whose files may be deleted: nothing received since ``older_than`` and
        every job ``done`` or ``cancelled`` (finished before ``older_than``).

        Series with only skipped instances (no jobs) qualify by age alone. Failed jobs
        keep their series until a person retries or cancels them.
        """
        cutoff = _now(older_than, "older_than")
        with self.session(read_only=True) as sess:
            series_rows = sess.scalars(
                select(Series)
                .where(Series.last_received_at < cutoff, Series.purged_at.is_(None))
                .options(selectinload(Series.jobs), selectinload(Series.instances))
                .order_by(Series.id)
            ).all()
            candidates: list[PurgeCandidate] = []
            for series in series_rows:
                terminal = all(
                    j.state in (JobState.DONE, JobState.CANCELLED)
                    and (j.finished_at or j.updated_at) < cutoff
                    for j in series.jobs
                )
                if not terminal:
                    continue
                paths = [Path(i.path) for i in series.instances]
                paths += [Path(j.output_dir) for j in series.jobs if j.output_dir]
                candidates.append(
                    PurgeCandidate(
                        series_id=series.id,
                        series_instance_uid=series.series_instance_uid,
                        last_received_at=series.last_received_at,
                        instance_ids=tuple(i.id for i in series.instances),
                        job_ids=tuple(j.id for j in series.jobs),
                        paths=tuple(paths),
                    )
                )
        return candidates

    def mark_purged(self, candidates: Iterable[PurgeCandidate], now: datetime | None = None) -> int:
        """Record that the candidates' files were deleted.

        Their instance rows are removed (so a later re-send is stored afresh); series
        and job rows stay, marked ``purged_at``, as history. A series that received a
        new instance since the candidate was listed keeps that instance.

        Returns
        -------
        int
            The number of series marked.
        """
        now = _now(now)
        marked = 0
        with self.session() as sess:
            for cand in candidates:
                series = sess.get(Series, cand.series_id, with_for_update=True)
                if series is None:
                    continue
                if cand.instance_ids:
                    sess.execute(
                        delete(Instance)
                        .where(Instance.id.in_(cand.instance_ids))
                        .execution_options(synchronize_session=False)
                    )
                remaining = sess.scalar(
                    select(func.count())
                    .select_from(Instance)
                    .where(Instance.series_id == series.id)
                )
                skipped = sess.scalar(
                    select(func.count())
                    .select_from(Instance)
                    .where(Instance.series_id == series.id, Instance.skip_reason.is_not(None))
                )
                series.n_instances = int(remaining or 0)
                series.n_skipped = int(skipped or 0)
                if series.last_received_at <= cand.last_received_at:
                    series.purged_at = now
                    sess.execute(
                        update(Job)
                        .where(Job.id.in_(cand.job_ids))
                        .values(purged_at=now)
                        .execution_options(synchronize_session=False)
                    )
                marked += 1
        return marked


def open_database(settings: Settings, create: bool = True) -> Database:
    """The database configured in ``settings`` (``storage.database_url``, resolved).

    Parameters
    ----------
    create
        Create missing tables (the default; idempotent).
    """
    db = Database(settings.database_url)
    if create:
        db.create_schema()
    return db
