"""The node's job loop: :class:`Worker` claims queued jobs and runs the pipeline
(:mod:`ldct_node.pipeline`) over each.

It runs the cascade once per claim for the job's output profile, writes the derived
series into the spool and hands it on for forwarding to the profile's destinations.
Jobs of several profiles of one series share one cascade run. Between batches it checks
for a shutdown (the job goes back to ``queued``) and for a cancellation (noticed by the
heartbeat); a job short of disk space is deferred, not failed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from ldct_node.config import OutputProfile, Settings
from ldct_node.dicom.io import read_instance
from ldct_node.dicom.pixels import MAX_SLICE_PIXELS
from ldct_node.dicom.values import InputError
from ldct_node.model.cascade import Cascade
from ldct_node.pipeline import (
    HEADER_BYTES,
    CascadeOutput,
    DerivedSeries,
    DiskFullError,
    is_out_of_space,
    run_pipeline,
)
from ldct_node.service import monitoring
from ldct_node.service.identity import default_worker_id
from ldct_node.service.routing import destinations_for
from ldct_node.service.spool import BYTES_PER_GB, Spool
from ldct_node.store import Database, JobInfo, JobState, TransitionError

logger = logging.getLogger(__name__)


#: Seconds between heartbeats of a running job (from a thread of its own, so that a
#: long batch or a slow read never makes the job look dead).
HEARTBEAT_SECONDS = 10.0
#: Pause after an unexpected error of the loop itself (database down...).
ERROR_PAUSE_SECONDS = 5.0
#: After a job was deferred for want of disk space, the worker claims nothing until there
#: is room again and at least this long has passed (doubling per deferral, up to the max).
SPACE_BACKOFF_SECONDS = 2.0
SPACE_BACKOFF_MAX_SECONDS = 60.0


class _ShutdownRequestedError(Exception):
    """The node is shutting down: hand the job back to the queue."""


class _JobLostError(Exception):
    """The job is no longer ours (cancelled, or re-queued by someone else)."""


class _Heartbeat:
    """Refreshes a running job's heartbeat in a background thread until closed.

    ``lost`` is set when the database says the job is no longer running for us.
    """

    def __init__(
        self, db: Database, job_id: int, worker_id: str, interval: float, lease_seconds: float
    ) -> None:
        self.db = db
        self.job_id = job_id
        self.worker_id = worker_id
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-job-{job_id}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                if not self.db.heartbeat(
                    self.job_id, self.worker_id, lease_seconds=self.lease_seconds
                ):
                    self.lost.set()
                    return
            except Exception as exc:  # a busy database must not end the job
                logger.debug("job %d: heartbeat failed: %s", self.job_id, exc)


class Worker:
    """Claims queued jobs and turns each into a derived series handed on for forwarding.

    One job at a time: claim (``queued -> running``), read the series' instances from
    the spool, run the cascade once for the job's output profile, write the derived
    series below ``<spool>/derived/job-<id>/``, then
    :meth:`~ldct_node.store.Database.finish_processing` (``forwarding``, or ``done``
    without destinations). Instances that cannot be read or decoded fail the job with
    a reason a person can act on; the loop goes on with the next job.

    Parameters
    ----------
    settings
        The node's settings (outputs, destinations, dicom).
    db, spool
        The job table and the instance store.
    cascade
        The loaded networks (loaded once per process).
    worker_id
        Recorded in the job row while running; default ``host:pid``.
    on_forwarding
        Called after a job reached ``forwarding`` (e.g. to start sending at once).
    heartbeat_seconds
        Interval of the running job's heartbeat (default: 10 s, or a quarter of the
        lease when that is shorter).
    lease_seconds
        How long a claimed job stays ours without a heartbeat (default
        ``worker.lease_seconds``).
    space_backoff_seconds
        After a job was deferred for want of disk space, the first pause before the next
        claim (doubling per deferral up to ``SPACE_BACKOFF_MAX_SECONDS``).
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        spool: Spool,
        cascade: Cascade,
        *,
        worker_id: str | None = None,
        on_forwarding: Callable[[], None] | None = None,
        heartbeat_seconds: float | None = None,
        lease_seconds: float | None = None,
        space_backoff_seconds: float = SPACE_BACKOFF_SECONDS,
    ) -> None:
        if not space_backoff_seconds > 0:
            raise ValueError(f"space_backoff_seconds: must be > 0, got {space_backoff_seconds}")
        if lease_seconds is None:
            lease_seconds = settings.worker.lease_seconds
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds: must be > 0, got {lease_seconds}")
        if heartbeat_seconds is None:
            heartbeat_seconds = min(HEARTBEAT_SECONDS, lease_seconds / 4)
        if heartbeat_seconds <= 0:
            raise ValueError(f"heartbeat_seconds: must be > 0, got {heartbeat_seconds}")
        self.lease_seconds = lease_seconds
        self.settings = settings
        self.db = db
        self.spool = spool
        self.cascade = cascade
        self.worker_id = worker_id or default_worker_id()
        self.on_forwarding = on_forwarding
        self.heartbeat_seconds = heartbeat_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        #: How many times this worker ran the cascade (reused outputs do not count).
        self.cascade_runs = 0
        self._last_output: tuple[tuple[str, tuple[str, ...]], CascadeOutput] | None = None
        #: While waiting for disk space: (bytes needed, monotonic time of the next try).
        self._space_wait: tuple[int, float] | None = None
        self.space_backoff_seconds = space_backoff_seconds
        self._space_backoff = space_backoff_seconds

    # -- control ------------------------------------------------------------------------
    def wake(self) -> None:
        """Look for queued jobs now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the current batch; a running job goes back to ``queued``."""
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_forever(self, poll_seconds: float = 1.0) -> None:
        """Process jobs until :meth:`stop`; waits ``poll_seconds`` (or a wake) when idle."""
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds: must be > 0, got {poll_seconds}")
        logger.debug("worker %s started", self.worker_id)
        while not self._stop.is_set():
            try:
                worked = self.run_once() is not None
            except Exception:
                logger.exception("worker loop error; pausing %g s", ERROR_PAUSE_SECONDS)
                self._stop.wait(ERROR_PAUSE_SECONDS)
                continue
            if not worked:
                self._wake.wait(poll_seconds)
                self._wake.clear()
        logger.debug("worker %s stopped", self.worker_id)

    def run_once(self) -> JobState | None:
        """Claim and process one queued job.

        Returns
        -------
        JobState | None
            The job's state afterwards, or None when nothing was queued (or stopping).
        """
        if self._stop.is_set() or self.waiting_for_space():
            return None
        job = self.db.claim_next_job(self.worker_id, lease_seconds=self.lease_seconds)
        if job is None:
            return None
        return self.process(job)

    def waiting_for_space(self) -> bool:
        """True while a job was deferred for want of disk space and there is still no
        room for it (``storage.min_free_gb`` plus what it needs), or its backoff runs."""
        if self._space_wait is None:
            return False
        needed, not_before = self._space_wait
        if time.monotonic() < not_before or not self.spool.has_space(
            self.settings.storage.min_free_gb, needed
        ):
            return True
        logger.info(
            "disk space is back (%.2f GB free): resuming jobs", self.spool.free_bytes() / 1e9
        )
        self._space_wait = None
        return False

    # -- one job ------------------------------------------------------------------------
    def process(self, job: JobInfo) -> JobState:
        """Process a job this worker has claimed (state ``running``)."""
        profile = next((p for p in self.settings.outputs if p.name == job.profile), None)
        if profile is None:
            return self._fail(
                job.id,
                f"output profile {job.profile!r} is no longer configured: add it back to "
                f"[[outputs]] and retry, or cancel job {job.id}",
            )
        logger.info(
            "job %d running: series %s, profile %s, %d instance(s)",
            job.id,
            job.series_instance_uid,
            job.profile,
            job.source_instances,
        )
        started = time.monotonic()
        output_root = self.spool.derived / f"job-{job.id}"
        with _Heartbeat(
            self.db, job.id, self.worker_id, self.heartbeat_seconds, self.lease_seconds
        ) as beat:

            def checkpoint(_done: int = 0) -> None:
                if self._stop.is_set():
                    raise _ShutdownRequestedError
                if beat.lost.is_set():
                    raise _JobLostError

            needed = 0
            try:
                paths, datasets = self._load(job, checkpoint)
                checkpoint()
                # A previous run's output (interrupted, or an older model) must not mix in.
                if output_root.exists():
                    self.spool.purge_paths([output_root])
                needed = _series_bytes(datasets, paths)
                self._check_space(needed, "the derived series")
                output_root = self.spool.derived_dir(f"job-{job.id}")
                written = self._denoise(job, paths, datasets, profile, output_root, checkpoint)
            except _ShutdownRequestedError:
                return self._hand_back(job.id)
            except _JobLostError:
                return self._abandoned(job.id, output_root)
            except DiskFullError as exc:
                return self._defer(job.id, exc, needed, output_root)
            except _JobInputError as exc:
                return self._fail(job.id, str(exc))
            except InputError as exc:
                return self._fail(
                    job.id,
                    f"{exc}. Re-send the series from its source, or cancel job {job.id}",
                )
            except Exception as exc:
                if is_out_of_space(exc):
                    return self._defer(job.id, exc, needed, output_root)
                logger.exception("job %d: unexpected error", job.id)
                return self._fail(
                    job.id,
                    f"internal error {type(exc).__name__}: {exc}. See the node's log; "
                    f"retry job {job.id} once the cause is fixed",
                )
        derived = written[0]
        self._space_backoff = self.space_backoff_seconds
        monitoring.JOBS_PROCESSED.labels(profile.name).inc()
        elapsed = time.monotonic() - started
        monitoring.JOB_PROCESSING_SECONDS.labels(profile.name).observe(elapsed)
        logger.info(
            "job %d: derived series %s written (%d instance(s))",
            job.id,
            derived.series_uid,
            len(derived.paths),
        )
        try:
            state = self.db.finish_processing(
                job.id,
                derived.series_uid,
                derived.directory,
                len(derived.paths),
                destinations_for(profile, self.settings),
                worker_id=self.worker_id,
            )
        except TransitionError:
            return self._abandoned(job.id, output_root)
        if state == JobState.DONE:  # no destinations: done once written
            monitoring.JOB_LATENCY_SECONDS.labels(profile.name).observe(elapsed)
        if state == JobState.FORWARDING and self.on_forwarding is not None:
            self.on_forwarding()
        return state

    def _denoise(
        self,
        job: JobInfo,
        paths: list[Path],
        datasets: list[Dataset],
        profile: OutputProfile,
        output_root: Path,
        checkpoint: Callable[[int], None],
    ) -> list[DerivedSeries]:
        """Run the cascade and write the derived series behind it, or reuse the cascade
        output of another profile of the same input.

        Jobs of one series (one per profile) are queued together and claimed one after
        the other; the network output is the same for all of them, only the blend
        differs. The last output is kept only while more than one profile is configured,
        and only for exactly the same instances.
        """
        key = (job.series_instance_uid, tuple(str(p) for p in paths))
        reuse = self._last_output if self._last_output and self._last_output[0] == key else None
        self._last_output = None  # free the memory before the next run
        if reuse is not None:
            logger.info(
                "job %d: reusing the cascade output of series %s (profile %s)",
                job.id,
                job.series_instance_uid,
                job.profile,
            )
        else:
            self.cascade_runs += 1
        written, output = run_pipeline(
            datasets,
            self.cascade,
            [profile],
            self.settings.dicom,
            output_root,
            progress=checkpoint,
            space_check=self._check_space,
            reuse=None if reuse is None else reuse[1],
        )
        if len(self.settings.outputs) > 1:  # a later profile may reuse it
            self._last_output = (key, output)
        return written

    def _load(
        self, job: JobInfo, checkpoint: Callable[[], None]
    ) -> tuple[list[Path], list[Dataset]]:
        paths = self.db.job_instances(job.id)
        if not paths:
            raise _JobInputError(
                f"series {job.series_instance_uid} has no instances to process (all "
                f"skipped, or purged): re-send it, or cancel job {job.id}"
            )
        datasets: list[Dataset] = []
        for path in paths:
            checkpoint()
            try:
                datasets.append(read_instance(path))
            except FileNotFoundError:
                raise _JobInputError(
                    f"spooled instance {path} is missing (spool moved or files deleted): "
                    f"re-send the series, or cancel job {job.id}"
                ) from None
        return paths, datasets

    def _check_space(self, needed: int, what: str = "a derived instance") -> None:
        """Raise :class:`DiskFullError` unless writing ``needed`` bytes into the spool
        leaves ``storage.min_free_gb`` free (the receiver's guard, for derived writes)."""
        min_free_gb = self.settings.storage.min_free_gb
        capacity = self.spool.total_bytes()
        if needed > capacity - min_free_gb * BYTES_PER_GB:
            # Waiting would never help, and a deferred job holds the worker back.
            raise _JobInputError(
                f"{what} needs {needed / BYTES_PER_GB:.2f} GB, more than the spool's "
                f"filesystem can ever hold ({capacity / BYTES_PER_GB:.2f} GB, "
                f"storage.min_free_gb = {min_free_gb:g}): move storage.spool_dir to a "
                "larger volume, or cancel the job"
            )
        if not self.spool.has_space(min_free_gb, needed):
            raise DiskFullError(
                f"{self.spool.free_bytes() / BYTES_PER_GB:.2f} GB free in the spool, "
                f"{what} needs {needed / 1e6:.1f} MB above storage.min_free_gb = "
                f"{min_free_gb:g}"
            )

    def _defer(self, job_id: int, exc: BaseException, needed: int, output_root: Path) -> JobState:
        """Out of disk space: what the job wrote is removed, the job goes back to the
        queue with the reason, and this worker claims nothing until there is room (and
        its backoff has passed)."""
        if output_root.exists():
            with contextlib.suppress(OSError):
                self.spool.purge_paths([output_root])
        min_free_gb = self.settings.storage.min_free_gb
        reason = (
            f"waiting for disk space ({exc}); the job resumes by itself once the spool has "
            f"{needed / 1e6:.1f} MB free above storage.min_free_gb = {min_free_gb:g}"
            " (free space on it, or purge finished series sooner with "
            "storage.retention_days)"
        )
        backoff = self._space_backoff
        self._space_backoff = min(backoff * 2, SPACE_BACKOFF_MAX_SECONDS)
        self._space_wait = (needed, time.monotonic() + backoff)
        if self.db.defer_job(job_id, self.worker_id, reason):
            logger.warning("job %d: deferred, %s", job_id, reason)
        return JobState(self.db.get_job(job_id).state)

    def _fail(self, job_id: int, reason: str) -> JobState:
        try:
            state = self.db.fail_job(job_id, reason, worker_id=self.worker_id)
        except TransitionError:  # cancelled (or taken away) meanwhile: not ours to fail
            state = JobState(self.db.get_job(job_id).state)
            logger.info(
                "job %d: not failed, it is %s now (would have been: %s)", job_id, state, reason
            )
            return state
        if state == JobState.FAILED:
            monitoring.JOBS_FAILED.labels("processing").inc()  # the store logs it
        else:
            logger.info(
                "job %d: failed (%s) but its series changed; back to %s", job_id, reason, state
            )
        return state

    def _hand_back(self, job_id: int) -> JobState:
        """Shutdown during a job: ``running -> queued`` (only if it is still ours)."""
        if self.db.requeue_job(job_id, self.worker_id):
            logger.info("job %d: interrupted by shutdown; queued again", job_id)
        return JobState(self.db.get_job(job_id).state)

    def _abandoned(self, job_id: int, output_root: Path) -> JobState:
        state = JobState(self.db.get_job(job_id).state)
        logger.info("job %d: no longer ours (now %s); output discarded", job_id, state)
        if state == JobState.CANCELLED and output_root.exists():
            self.spool.purge_paths([output_root])
        return state


class _JobInputError(Exception):
    """The job's input cannot be processed; the message says what to do."""


def _series_bytes(datasets: Sequence[Dataset], paths: Sequence[Path]) -> int:
    """Room the derived series of these instances takes (16-bit pixels plus headers);
    the source file's size where its header gives no usable size."""
    total = 0
    for ds, path in zip(datasets, paths, strict=True):
        try:
            total += _instance_bytes(ds)
        except (AttributeError, TypeError, ValueError, OverflowError):
            # No usable geometry: decoding will refuse the instance; until then the
            # source's size is the best guess.
            with contextlib.suppress(OSError):
                total += path.stat().st_size
    return total


def _instance_bytes(ds: Dataset) -> int:
    """Room one derived instance of ``ds`` takes, from a header that may lie.

    A header the decoder will refuse (a slice beyond ``MAX_SLICE_PIXELS``) raises
    ValueError; a frame count is capped at the bytes of pixel data (every frame takes at
    least one in any encoding), so a header claiming 999999999 frames of a 2 KB image
    does not ask for terabytes and hold the worker waiting for space forever.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < 1 or cols < 1 or rows * cols > MAX_SLICE_PIXELS:
        raise ValueError(f"{rows}x{cols} pixels is not a slice the node takes")
    frames = max(int(ds.get("NumberOfFrames") or 1), 1)
    try:
        pixel_bytes = len(ds.PixelData) if "PixelData" in ds and ds.PixelData else 0
    except (NotImplementedError, KeyError) as exc:  # e.g. a corrupt VR: decoding refuses it
        raise ValueError("the pixel data element cannot be read") from exc
    frames = min(frames, max(pixel_bytes, 1))
    return rows * cols * frames * 2 + HEADER_BYTES
