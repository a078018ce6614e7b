"""Intake: instances as they arrive, series and their jobs, stable series queued."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (
    select,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import (
    selectinload,
)

if TYPE_CHECKING:
    pass


from ldct_node.store.engine import Store
from ldct_node.store.models import (
    _REOPEN_ON_NEW_INSTANCE,
    Instance,
    Job,
    JobState,
    ReceivedInstance,
    Series,
    SeriesState,
    _now,
)

logger = logging.getLogger(__name__)

#: SQLSTATEs after which a transaction may simply run again: deadlock detected,
#: serialization failure (PostgreSQL).
_TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
_MAX_TRANSIENT_RETRIES = 5


def _sqlstate(exc: OperationalError) -> str | None:
    """The SQLSTATE of the driver's error (psycopg: ``sqlstate``, psycopg2: ``pgcode``)."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


class Intake(Store):
    """Intake: instances as they arrive, series and their jobs, stable series queued."""

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
        for attempt in range(1, _MAX_TRANSIENT_RETRIES + 1):
            try:
                return self._record_instance(instance, tuple(profiles), now)
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
