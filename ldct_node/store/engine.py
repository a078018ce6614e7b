"""Engines and sessions: SQLite (WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``, private
file) or PostgreSQL, and :class:`Store`, the base every unit of the store builds on
(sessions, locked job reads, checked state changes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import (
    Session,
    selectinload,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

from ldct_node.store.models import (
    Base,
    Forward,
    ForwardState,
    Job,
    JobNotFoundError,
    JobState,
    check_transition,
)

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: How a writing transaction begins on SQLite, whose driver leaves transaction control
#: to us (see ``_on_connect``): the write lock at once, not at the first write.
SQLITE_BEGIN_WRITE = "BEGIN IMMEDIATE"
_READ_ONLY_OPTION = "ldct_read_only"


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
        conn.exec_driver_sql("BEGIN" if read_only else SQLITE_BEGIN_WRITE)

    return engine


# --------------------------------------------------------------------------------------


class Store:
    """Engine and sessions of the job database; the base of every unit of the store.

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

    @property
    def driver_begin(self) -> str | None:
        """What a writing transaction on a raw driver connection must run first (SQLite's
        driver runs without transaction control); None where the driver begins one."""
        return SQLITE_BEGIN_WRITE if _is_sqlite(self.url) else None

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
