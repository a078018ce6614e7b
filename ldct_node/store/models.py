"""The job store's vocabulary: job, forward and series states and their allowed
transitions, the tables (SQLAlchemy models) and the plain value objects handed to
callers (no live ORM state escapes a session).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
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
    text,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
)

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)


class JobState(StrEnum):
    """The states of a job (values are what the table and CLI show)."""

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
