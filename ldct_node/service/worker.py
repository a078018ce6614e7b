"""Runs the cascade over a series and writes the derived series.

:func:`denoise_series` is the one pipeline both the node's worker and the offline
``ldct-node denoise`` use: decode -> HU -> cascade -> one derived series per output
profile, written durably.

:class:`Worker` is the node's job loop around it: it claims queued jobs, runs the
cascade once per claim for the job's output profile, writes the derived series into
the spool and hands it on for forwarding to the profile's destinations. Jobs of
several profiles of one series share one cascade run. Between batches it checks for a shutdown
(the job goes back to ``queued``) and for a cancellation (noticed by the heartbeat).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ldct_node.config import DicomSettings, OutputProfile, Settings
from ldct_node.dicom.derive import derive_instance, derived_series_uid, write_derived
from ldct_node.dicom.enhanced import decode_frames_hu, is_multiframe
from ldct_node.dicom.io import (
    MAX_SLICE_PIXELS,
    InputError,
    decode_hu,
    pixel_spacing_mm,
    read_instance,
)
from ldct_node.model.cascade import Cascade, blend_with_input
from ldct_node.model.fidelity import restore_low_frequency
from ldct_node.service import monitoring
from ldct_node.service.routing import destinations_for
from ldct_node.service.spool import BYTES_PER_GB, Spool
from ldct_node.store import Database, JobInfo, JobState, TransitionError

logger = logging.getLogger(__name__)

#: errno values that mean the filesystem has no room (a quota counts as no room).
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Room a derived instance needs beyond its pixels (header, file meta).
_HEADER_BYTES = 64 * 1024


class DiskFullError(OSError):
    """No room to write a derived series (out of space, or below ``storage.min_free_gb``):
    a resource condition, not a fault of the job. An ``OSError`` with errno ENOSPC, so
    callers that handle I/O errors (``ldct-node denoise``) handle it too."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


def is_out_of_space(exc: BaseException) -> bool:
    """True if ``exc`` or an exception it was raised from is a "no space left" error.

    pydicom re-raises a write error as ``type(exc)(message)``, which loses the errno:
    the chain (``__cause__`` / ``__context__``) still holds the original.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return True
        if isinstance(current, OSError) and current.errno in _NO_SPACE_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def derived_bytes(hu: np.ndarray) -> int:
    """Room one derived instance of ``hu`` takes on disk (16-bit pixels plus header)."""
    return int(hu.size) * 2 + _HEADER_BYTES


@dataclass(frozen=True)
class DerivedSeries:
    """One written derived series."""

    profile: str
    series_uid: str
    directory: Path
    paths: list[Path]


@dataclass(frozen=True)
class CascadeOutput:
    """Per source instance, the input HU and the cascade's output (before blending).

    Arrays are (Rows, Columns) for single-frame instances and (Frames, Rows, Columns)
    for multi-frame (Enhanced CT) ones. One output serves every profile: profiles
    differ only in the blend and the series identity.
    """

    hu: list[np.ndarray]
    denoised: list[np.ndarray]


def decode_instance_hu(ds: Dataset) -> np.ndarray:
    """HU of one instance: (Rows, Columns), or (Frames, Rows, Columns) if multi-frame."""
    return decode_frames_hu(ds) if is_multiframe(ds) else decode_hu(ds)


def run_cascade(
    datasets: Sequence[Dataset],
    cascade: Cascade,
    *,
    progress: Callable[[int], None] | None = None,
    on_instance: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> CascadeOutput:
    """Decode every instance (every frame) and run the cascade over all of them.

    A thread decodes ahead of the model, so decoding overlaps with compute (the model
    releases the GIL). ``on_instance(index, hu, denoised)`` is called as soon as every
    frame of an instance is denoised, so its derived file can be written while the next
    batch runs (see :class:`DerivedWriter`).

    Raises
    ------
    ldct_node.dicom.io.InputError
        When an instance cannot be decoded.
    """
    if not datasets:
        raise ValueError("datasets is empty: a series needs at least one instance")
    hu: list[np.ndarray] = [np.empty(0, np.float32)] * len(datasets)
    denoised: list[np.ndarray] = [np.empty(0, np.float32)] * len(datasets)

    def run(batch: list[tuple[int, int | None, np.ndarray]]) -> None:
        """Denoise frames of one size, as (instance, frame or None, image); an instance
        is complete once its last frame has gone through the model."""
        result = cascade.denoise(np.stack([image for _, _, image in batch]), progress=progress)
        for (owner, frame, _), image in zip(batch, result, strict=True):
            if frame is None:
                denoised[owner] = image
            else:
                denoised[owner][frame] = image
            done = frame is None or frame == len(hu[owner]) - 1
            if done and on_instance is not None:
                on_instance(owner, hu[owner], denoised[owner])

    with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder:
        decoded = [decoder.submit(decode_instance_hu, ds) for ds in datasets]
        try:
            # Batches follow the series order; the decoded size (not the header, which
            # may be garbage) decides where a batch must end.
            pending: list[tuple[int, int | None, np.ndarray]] = []
            for i, future in enumerate(decoded):
                volume = future.result()
                hu[i] = volume
                denoised[i] = np.empty_like(volume)
                frames = list(volume) if volume.ndim == 3 else [volume]
                for f, image in enumerate(frames):
                    if pending and pending[0][2].shape != image.shape:
                        run(pending)
                        pending = []
                    pending.append((i, f if volume.ndim == 3 else None, image))
                    if len(pending) == cascade.batch_size:
                        run(pending)
                        pending = []
            if pending:
                run(pending)
        except BaseException:
            for future in decoded:
                future.cancel()
            raise
    return CascadeOutput(hu=hu, denoised=denoised)


class DerivedWriter:
    """Derives and writes the instances of one series in a background thread, one
    derived series per profile, while the cascade goes on with the next batch.

    Use as a context manager: leaving it with an exception (a bad slice, a shutdown)
    removes every file it wrote, so nothing is left of a series that failed.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        profiles: Sequence[OutputProfile],
        dicom: DicomSettings,
        output_root: Path,
        model_version: str,
        space_check: Callable[[int], None] | None = None,
    ) -> None:
        if not datasets:
            raise ValueError("datasets is empty: a series needs at least one instance")
        if not profiles:
            raise ValueError("profiles is empty: at least one output profile is needed")
        #: Called with the bytes about to be written before each derived instance; raises
        #: :class:`DiskFullError` to stop (e.g. below ``storage.min_free_gb``).
        self.space_check = space_check
        self.datasets = datasets
        self.profiles = list(profiles)
        self.dicom = dicom
        self.model_version = model_version
        source_series = str(datasets[0].SeriesInstanceUID)
        self.directories: list[tuple[str, Path]] = []
        for profile in self.profiles:
            uid = derived_series_uid(source_series, model_version, profile.name, dicom.uid_root)
            self.directories.append((uid, output_root / uid))
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="write")
        self._writes: dict[int, Future[list[Path]]] = {}

    def __enter__(self) -> DerivedWriter:
        for _, directory in self.directories:
            # Private like the spool: the derived images carry the same patient data.
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._abort()
        self._executor.shutdown(wait=True)

    def submit(self, index: int, hu: np.ndarray, denoised: np.ndarray) -> None:
        """Queue instance ``index`` for writing; raises the error of an earlier write,
        so a series with an unwritable header stops at once, not after the model."""
        for future in self._writes.values():
            if future.done() and future.exception() is not None:
                future.result()
        self._writes[index] = self._executor.submit(self._write, index, hu, denoised)

    def finish(self) -> list[DerivedSeries]:
        """Wait for every write; the derived series, one per profile."""
        if len(self._writes) != len(self.datasets):
            missing = len(self.datasets) - len(self._writes)
            raise RuntimeError(f"{missing} instance(s) were never submitted for writing")
        per_instance = [self._writes[i].result() for i in range(len(self.datasets))]
        written: list[DerivedSeries] = []
        for k, (profile, (uid, directory)) in enumerate(
            zip(self.profiles, self.directories, strict=True)
        ):
            paths = [paths[k] for paths in per_instance]
            written.append(DerivedSeries(profile.name, uid, directory, paths))
            logger.info(
                "wrote derived series (%s, %d instances) to %s",
                profile.name,
                len(paths),
                directory,
            )
        return written

    def _write(self, index: int, hu: np.ndarray, denoised: np.ndarray) -> list[Path]:
        ds = self.datasets[index]
        if self.space_check is not None:
            self.space_check(derived_bytes(hu) * len(self.profiles))
        return [
            _write_one(
                ds,
                profile_image(ds, hu, denoised, profile),
                profile,
                self.model_version,
                self.dicom,
                directory,
            )
            for profile, (_, directory) in zip(self.profiles, self.directories, strict=True)
        ]

    def _abort(self) -> None:
        for future in self._writes.values():
            future.cancel()
        wait(list(self._writes.values()))
        for future in self._writes.values():
            if not future.cancelled() and future.exception() is None:
                for path in future.result():
                    path.unlink(missing_ok=True)
        for _, directory in self.directories:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: never someone else's files


def write_derived_series(
    datasets: Sequence[Dataset],
    output: CascadeOutput,
    profiles: Sequence[OutputProfile],
    dicom: DicomSettings,
    output_root: Path,
    model_version: str,
) -> list[DerivedSeries]:
    """Blend and write one derived series per profile from one cascade output."""
    with DerivedWriter(datasets, profiles, dicom, output_root, model_version) as writer:
        for i, (src, out) in enumerate(zip(output.hu, output.denoised, strict=True)):
            writer.submit(i, src, out)
        return writer.finish()


def denoise_series(
    datasets: Sequence[Dataset],
    cascade: Cascade,
    profiles: Sequence[OutputProfile],
    dicom: DicomSettings,
    output_root: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[DerivedSeries]:
    """Denoise the instances of one source series and write its derived series.

    The cascade runs once; each profile gets its own blend and derived series. Decoding,
    the model and writing overlap (a three-stage pipeline).

    Parameters
    ----------
    datasets
        Full datasets (with pixel data) of one series, in slice order. Multi-frame
        (Enhanced CT) instances are denoised frame by frame and written back as one
        Enhanced CT instance each (see :mod:`ldct_node.dicom.enhanced`).
    cascade
        The loaded networks.
    profiles
        One derived series is written per profile (blend, description, number).
    dicom
        UID root and image comments for the derived instances.
    output_root
        Each derived series goes to ``output_root/<derived SeriesInstanceUID>/``.
    progress
        Called with the number of slices (frames) denoised after each batch.

    Raises
    ------
    ldct_node.dicom.io.InputError
        When a slice cannot be decoded; nothing is written for the series then.
    """
    with DerivedWriter(datasets, profiles, dicom, output_root, cascade.model_version) as writer:
        run_cascade(datasets, cascade, progress=progress, on_instance=writer.submit)
        return writer.finish()


def profile_image(
    source: Dataset, hu: np.ndarray, denoised: np.ndarray, profile: OutputProfile
) -> np.ndarray:
    """The HU image one output profile derives: the cascade's output, its CT numbers
    kept on the input's at scales above ``hu_fidelity_mm``, then blended."""
    image = denoised
    if profile.hu_fidelity_mm > 0:
        spacing = pixel_spacing_mm(source)
        if spacing is None:
            raise InputError(
                f"instance {source.get('SOPInstanceUID', '?')}: no usable PixelSpacing, "
                f"needed by output profile {profile.name!r} (hu_fidelity_mm "
                f"{profile.hu_fidelity_mm:g})"
            )
        image = restore_low_frequency(denoised, hu, spacing, profile.hu_fidelity_mm)
    return blend_with_input(image, hu, profile.blend)


def _write_one(
    source: Dataset,
    image_hu: np.ndarray,
    profile: OutputProfile,
    model_version: str,
    dicom: DicomSettings,
    directory: Path,
) -> Path:
    """Derive and write one instance; a source header that cannot be carried over (an
    element with a wrong VR or garbage value) is an :class:`InputError` naming it."""
    try:
        derived = derive_instance(
            source, image_hu, profile=profile, model_version=model_version, dicom=dicom
        )
        return write_derived(derived, directory)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, OSError) as exc:
        if is_out_of_space(exc):
            raise DiskFullError(
                f"no space left on the device of {directory} while writing a derived instance"
            ) from exc
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a real I/O error (disk full...), not the header; pydicom's have no errno
        uid = source.get("SOPInstanceUID", "?")
        # First line only: pydicom appends the offending element with its value, which
        # could be patient data.
        what = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(
            f"instance {uid}: its header cannot be carried into the derived instance "
            f"({type(exc).__name__}: {what})"
        ) from exc


# --------------------------------------------------------------------------------------
# The node's job loop
# --------------------------------------------------------------------------------------

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


def default_worker_id() -> str:
    """``host:pid``: names the process holding a job in the table."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_dead_local_worker(worker_id: str) -> bool:
    """True if ``worker_id`` (``host:pid``) names a process of this host that is gone.

    Lets a restarting node take back at once what a crashed process on the same host
    held, without touching jobs of live workers elsewhere (those wait for their lease).
    """
    host, _, pid_text = worker_id.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


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
        with DerivedWriter(
            datasets,
            [profile],
            self.settings.dicom,
            output_root,
            self.cascade.model_version,
            space_check=self._check_space,
        ) as writer:
            if reuse is not None:
                logger.info(
                    "job %d: reusing the cascade output of series %s (profile %s)",
                    job.id,
                    job.series_instance_uid,
                    job.profile,
                )
                output = reuse[1]
                for i, (src, out) in enumerate(zip(output.hu, output.denoised, strict=True)):
                    writer.submit(i, src, out)
            else:
                output = run_cascade(
                    datasets, self.cascade, progress=checkpoint, on_instance=writer.submit
                )
                self.cascade_runs += 1
            written = writer.finish()
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
            monitoring.JOBS_FAILED.labels("processing").inc()
            logger.warning("job %d failed: %s", job_id, reason)
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
    pixel_bytes = len(ds.PixelData) if "PixelData" in ds and ds.PixelData else 0
    frames = min(frames, max(pixel_bytes, 1))
    return rows * cols * frames * 2 + _HEADER_BYTES
