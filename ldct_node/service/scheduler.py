"""Periodic duties of the node (APScheduler 3, background threads).

=================  ==========================================  ==============================
job                what                                        when
=================  ==========================================  ==============================
``stability``      queue the jobs of series that got no new    every min(1 s, stable/4),
                   instance for ``series.stable_seconds``      at least 0.2 s
``forward``        send due forwards (first attempts and       every :func:`forward_interval`
                   retries after ``forward.backoff_seconds``)  and on :meth:`wake_forward`
``purge``          delete spooled source + derived files of    at start, then daily
                   done jobs older than ``retention_days``
``stale``          re-queue running jobs whose lease expired   every min(1 min, lease/2)
                   (``worker.lease_seconds`` without a
                   heartbeat: a worker process that died)
=================  ==========================================  ==============================

Every duty runs in the scheduler's thread pool, guarded by a non-blocking lock: a
duty that is still busy when it is due again (a slow forward, say) is skipped quietly
instead of piling up. Errors are logged and the duty runs again at its next time.

With several processes on one database (``serve --role``) each runs a subset of the
duties, and any duty may run in several processes at once: the stability sweep and the
stale re-queue lock the rows they change (``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
the write lock on SQLite), a forward is claimed by one sender at a time, and a purge
deletes only files of finished series and tolerates files already gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from ldct_node.config import Settings
from ldct_node.service.forward import Forwarder
from ldct_node.service.spool import Spool
from ldct_node.store import Database

logger = logging.getLogger(__name__)

PURGE_INTERVAL_S = 24 * 3600.0
#: Every periodic duty, in start order.
DUTIES = ("stability", "forward", "purge", "stale")
STALE_CHECK_INTERVAL_S = 60.0
MIN_INTERVAL_S = 0.2


def stability_interval(stable_seconds: float) -> float:
    """How often to look for stable series: min(1 s, stable_seconds / 4), >= 0.2 s."""
    return max(MIN_INTERVAL_S, min(1.0, stable_seconds / 4.0))


def forward_interval(backoff_seconds: list[float]) -> float:
    """How often to look for due forwards: 1 s, or the shortest backoff if shorter (>= 0.2 s)."""
    return max(MIN_INTERVAL_S, min([1.0, *backoff_seconds]))


@dataclass(frozen=True)
class PurgeReport:
    """What a retention purge did."""

    series: int
    paths: int
    skipped: int


def purge_expired(
    db: Database, spool: Spool, older_than_days: float, now: datetime | None = None
) -> PurgeReport:
    """Delete the spooled source and derived files of finished series older than given.

    A series qualifies when nothing arrived for it for ``older_than_days`` and all its
    jobs are ``done`` or ``cancelled`` since then (failed jobs keep their files until a
    person retries or cancels them). Its rows stay as history, marked purged.

    Parameters
    ----------
    older_than_days
        Age in days; 0 purges every finished series.
    """
    if older_than_days < 0:
        raise ValueError(f"older_than_days: must be >= 0, got {older_than_days}")
    now = now or datetime.now(UTC)
    candidates = db.purge_candidates(now - timedelta(days=older_than_days))
    done = []
    removed = 0
    skipped = 0
    for cand in candidates:
        try:
            removed += spool.purge_paths(cand.paths)
        except (ValueError, OSError) as exc:
            # E.g. files from before spool_dir was changed: never delete outside the spool.
            skipped += 1
            logger.warning("not purging series %s: %s", cand.series_instance_uid, exc)
            continue
        done.append(cand)
    if done:
        db.mark_purged(done, now=now)
    if done or skipped:
        logger.info(
            "purged %d series (%d files or folders) older than %g day(s)%s",
            len(done),
            removed,
            older_than_days,
            f"; {skipped} skipped" if skipped else "",
        )
    return PurgeReport(series=len(done), paths=removed, skipped=skipped)


class NodeScheduler:
    """The node's periodic duties (see the module docstring).

    Parameters
    ----------
    settings, db, spool
        The node's settings, job table and instance store.
    forwarder
        Sends due forwards.
    on_queued
        Called after the stability sweep queued jobs (e.g. to wake the worker).
    duties
        The duties this process runs (default: all of :data:`DUTIES`). Every duty is
        safe to run in several processes sharing one database at once.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        spool: Spool,
        forwarder: Forwarder,
        *,
        on_queued: Callable[[], None] | None = None,
        duties: tuple[str, ...] = DUTIES,
    ) -> None:
        unknown = sorted(set(duties) - set(DUTIES))
        if unknown:
            raise ValueError(f"duties: unknown {', '.join(unknown)} (known: {', '.join(DUTIES)})")
        self.duties = duties
        self.settings = settings
        self.db = db
        self.spool = spool
        self.forwarder = forwarder
        self.on_queued = on_queued
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 2, "misfire_grace_time": None},
        )
        self._locks: dict[str, threading.Lock] = {}

    def _add(self, name: str, func: Callable[[], object], seconds: float) -> None:
        lock = self._locks.setdefault(name, threading.Lock())

        def run() -> None:
            if not lock.acquire(blocking=False):
                return  # still busy from its last run
            try:
                func()
            except Exception:
                logger.exception("scheduled duty %r failed; it runs again later", name)
            finally:
                lock.release()

        self._scheduler.add_job(
            run, "interval", seconds=seconds, id=name, name=name, next_run_time=datetime.now(UTC)
        )

    def start(self) -> None:
        """Start the background threads; every duty runs once right away."""
        lease = self.settings.worker.lease_seconds
        every = {
            "stability": (self.sweep_stable, stability_interval(self._stable_seconds)),
            "forward": (self.forwarder.run_due, forward_interval(self._backoff)),
            "purge": (self.purge, PURGE_INTERVAL_S),
            "stale": (self.requeue_expired, min(STALE_CHECK_INTERVAL_S, max(lease / 2, 0.5))),
        }
        for name in self.duties:
            self._add(name, *every[name])
        self._scheduler.start()
        logger.debug("scheduler started")

    def shutdown(self, wait: bool = True) -> None:
        """Stop scheduling; with ``wait`` also wait for running duties to end."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)
            logger.debug("scheduler stopped")

    def wake_forward(self) -> None:
        """Run the forward duty now (e.g. a job just reached ``forwarding``)."""
        if self._scheduler.running and "forward" in self.duties:
            self._scheduler.modify_job("forward", next_run_time=datetime.now(UTC))

    @property
    def _stable_seconds(self) -> float:
        return self.settings.series.stable_seconds

    @property
    def _backoff(self) -> list[float]:
        return self.settings.forward.backoff_seconds

    # -- the duties ---------------------------------------------------------------------
    def sweep_stable(self) -> list[int]:
        """Queue the jobs of series without a new instance for ``stable_seconds``."""
        ids = self.db.promote_stable_series(stable_seconds=self._stable_seconds)
        for job_id in ids:
            job = self.db.get_job(job_id)
            logger.info(
                "job %d queued: series %s complete (%d instance(s), no new one for %g s)",
                job_id,
                job.series_instance_uid,
                job.source_instances,
                self._stable_seconds,
            )
        if ids and self.on_queued is not None:
            self.on_queued()
        return ids

    def purge(self) -> PurgeReport:
        """Retention purge with ``storage.retention_days``."""
        return purge_expired(self.db, self.spool, self.settings.storage.retention_days)

    def requeue_expired(self) -> list[int]:
        """``running -> queued`` for jobs whose worker's lease expired (it died)."""
        ids = self.db.requeue_expired()
        for job_id in ids:
            logger.warning(
                "job %d: its worker's lease expired (no heartbeat for %g s: the worker "
                "died?); queued again",
                job_id,
                self.settings.worker.lease_seconds,
            )
        return ids
