"""The denoising pipeline both the node's worker and ``ldct-node denoise`` run.

Decode ahead (a thread turns each instance into HU while the model works), run the
cascade in batches of one slice size (:func:`run_cascade`), and write behind (a thread
derives and writes each instance as soon as its frames are denoised,
:class:`DerivedWriter`): one derived series per output profile, written durably, and
nothing left behind when a slice fails. :func:`run_pipeline` is the one path through
it; :func:`denoise_series` is its offline form.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ldct_node.config import DicomSettings, OutputProfile
from ldct_node.dicom.derive import derive_instance, derived_series_uid, write_derived
from ldct_node.dicom.enhanced import decode_frames_hu, is_multiframe
from ldct_node.dicom.io import decode_hu, pixel_spacing_mm
from ldct_node.dicom.values import InputError
from ldct_node.model.cascade import Cascade, blend_with_input
from ldct_node.model.fidelity import restore_low_frequency

logger = logging.getLogger(__name__)

#: errno values that mean the filesystem has no room (a quota counts as no room).
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Room a derived instance needs beyond its pixels (header, file meta).
HEADER_BYTES = 64 * 1024


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
    return int(hu.size) * 2 + HEADER_BYTES


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
    ldct_node.dicom.values.InputError
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


def run_pipeline(
    datasets: Sequence[Dataset],
    cascade: Cascade,
    profiles: Sequence[OutputProfile],
    dicom: DicomSettings,
    output_root: Path,
    *,
    progress: Callable[[int], None] | None = None,
    space_check: Callable[[int], None] | None = None,
    reuse: CascadeOutput | None = None,
) -> tuple[list[DerivedSeries], CascadeOutput]:
    """Denoise one source series (or take ``reuse``, the cascade's output for exactly
    these instances) and write one derived series per profile behind it.

    ``space_check(n_bytes)`` is called before each derived instance is written and may
    raise to stop (the node's disk-space guard). Returns the written series and the
    cascade output, which another profile of the same input may reuse.
    """
    with DerivedWriter(
        datasets, profiles, dicom, output_root, cascade.model_version, space_check=space_check
    ) as writer:
        if reuse is not None:
            output = reuse
            for i, (src, out) in enumerate(zip(output.hu, output.denoised, strict=True)):
                writer.submit(i, src, out)
        else:
            output = run_cascade(datasets, cascade, progress=progress, on_instance=writer.submit)
        return writer.finish(), output


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
    ldct_node.dicom.values.InputError
        When a slice cannot be decoded; nothing is written for the series then.
    """
    written, _ = run_pipeline(datasets, cascade, profiles, dicom, output_root, progress=progress)
    return written


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
