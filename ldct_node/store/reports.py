"""Reports and retention: jobs and status for the admin CLI, purgeable series."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import (
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import (
    selectinload,
)

from ldct_node.store.engine import Store
from ldct_node.store.models import (
    ErrorInfo,
    Forward,
    ForwardState,
    Instance,
    Job,
    JobInfo,
    JobNotFoundError,
    JobState,
    PurgeCandidate,
    Series,
    StatusSummary,
    _job_info,
    _now,
)

logger = logging.getLogger(__name__)


class Reports(Store):
    """Reports and retention: jobs and status for the admin CLI, purgeable series."""

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
