"""The job store: schema, sessions and every job state transition.

Where things are
    :mod:`~ldct_node.store.models` (states, allowed transitions, tables, value objects),
    :mod:`~ldct_node.store.engine` (engines, sessions, the :class:`Store` base),
    :mod:`~ldct_node.store.intake` (instances, series, stable series queued),
    :mod:`~ldct_node.store.jobs` (claims, leases, finishing, failing, re-queues),
    :mod:`~ldct_node.store.forwards` (sends per destination and their results),
    :mod:`~ldct_node.store.reports` (status, job lists, retention),
    :mod:`~ldct_node.store.database` (:class:`Database`, all of them in one object) and
    :mod:`~ldct_node.store.migrate` with ``migrations/`` (the Alembic schema history).

Tables
    ``series`` (one row per source SeriesInstanceUID), ``instance`` (one row per received
    SOPInstanceUID, with its spool path), ``job`` (one per source series and output
    profile) and ``forward`` (one per job and destination).

Job states (the values ``ldct-node jobs`` and ``status`` show)::

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
Instances that threads of one process record at the same time (several associations)
are committed together, each under a savepoint of its own: one transaction and one
commit for all that arrived while the one before was committing (group commit).

Several processes on one database (scale-out)
    A claimed job is leased to its worker (``worker_id``, ``lease_expires_at``); the
    worker's heartbeat extends the lease, and :meth:`Database.requeue_expired`, which
    any process may run, re-queues jobs whose lease ran out (a dead worker's). A worker
    finishes or fails a job only while it still holds it. A due forward is sent by
    one process at a time: :meth:`Database.claim_forward` leases it to its sender.
    The schema itself is managed by Alembic (:mod:`ldct_node.store.migrate`).

Jobs that take their worker down
    Every re-queue of a running job whose worker died (startup, expired lease) counts
    in ``crashes``; at :data:`MAX_JOB_CRASHES` the job is ``failed`` ("quarantined")
    instead, so that one series cannot crash-loop the node. A worker handing a job back
    (shutdown, :meth:`Database.defer_job` for want of disk space) is no crash.

All timestamps are timezone-aware UTC; functions taking ``now`` reject naive values.
"""

from ldct_node.store.database import Database, open_database
from ldct_node.store.engine import SQLITE_BUSY_TIMEOUT_MS, Store
from ldct_node.store.jobs import DEFAULT_LEASE_SECONDS, MAX_JOB_CRASHES
from ldct_node.store.models import (
    ALLOWED_TRANSITIONS,
    Base,
    ErrorInfo,
    Forward,
    ForwardInfo,
    ForwardState,
    Instance,
    Job,
    JobInfo,
    JobNotFoundError,
    JobState,
    PurgeCandidate,
    ReceivedInstance,
    Series,
    SeriesState,
    StatusSummary,
    TransitionError,
    check_transition,
)

__all__ = [
    "ALLOWED_TRANSITIONS",
    "DEFAULT_LEASE_SECONDS",
    "MAX_JOB_CRASHES",
    "SQLITE_BUSY_TIMEOUT_MS",
    "Base",
    "Database",
    "ErrorInfo",
    "Forward",
    "ForwardInfo",
    "ForwardState",
    "Instance",
    "Job",
    "JobInfo",
    "JobNotFoundError",
    "JobState",
    "PurgeCandidate",
    "ReceivedInstance",
    "Series",
    "SeriesState",
    "StatusSummary",
    "Store",
    "TransitionError",
    "check_transition",
    "open_database",
]
