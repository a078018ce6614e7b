"""Jobs: claims and leases, heartbeats, finishing, failing, retries and re-queues."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    or_,
    select,
    update,
)
from sqlalchemy.orm import (
    selectinload,
)

from ldct_node.store.engine import Store
from ldct_node.store.models import (
    Forward,
    ForwardState,
    Instance,
    Job,
    JobInfo,
    JobNotFoundError,
    JobState,
    TransitionError,
    _holds,
    _job_info,
    _now,
)

_CLAIM_TRIES = 20
#: How long a claimed job or forward belongs to its worker without a heartbeat.
DEFAULT_LEASE_SECONDS = 300.0
#: A job whose worker process died this many times while running it is failed
#: (quarantined) instead of re-queued, so that one poisonous series cannot crash-loop
#: the node; ``retry`` resets the count.
MAX_JOB_CRASHES = 2

logger = logging.getLogger(__name__)


class Jobs(Store):
    """Jobs: claims and leases, heartbeats, finishing, failing, retries and re-queues."""

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
