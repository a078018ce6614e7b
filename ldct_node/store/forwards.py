"""Forwards: one per job and destination; due sends, their claims and results."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import (
    or_,
    select,
    update,
)

from ldct_node.store.engine import Store
from ldct_node.store.jobs import DEFAULT_LEASE_SECONDS
from ldct_node.store.models import (
    Forward,
    ForwardInfo,
    ForwardState,
    Job,
    JobState,
    _forward_info,
    _now,
)

logger = logging.getLogger(__name__)


class Forwards(Store):
    """Forwards: one per job and destination; due sends, their claims and results."""

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
