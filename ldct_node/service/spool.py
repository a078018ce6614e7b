"""Durable instance store on the local filesystem.

Layout under the spool root (directories 0700, files 0600)::

    incoming/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received instances, bytes as sent
    derived/<name>/...                                   derived series written by the worker
    tmp/                                                 temporary files being written

Names are built from UIDs only (never patient data). A UID that is not a plain
``[0-9A-Za-z._-]`` token (a sloppy modality may send anything) is replaced by a hash of
it, so a name can never escape its directory.

Every file lands at its final path by the same steps: write a temporary file in
``tmp/`` (same filesystem), flush and fsync it, ``os.replace`` it into place and fsync
the directory. A crash at any point leaves either no file or the complete file under
the final name; what remains in ``tmp/`` is removed by :meth:`Spool.clean_tmp` at
startup.

A received instance takes the same steps in two calls (:meth:`Spool.stage`, then
:meth:`StagedInstance.commit`), so that the fsync of its data runs in a helper thread
while the receiver parses the header it needs for the final name: the disk's wait and
the parsing overlap instead of adding up.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType

from ldct_node.fsutil import (
    Content,
    fsync_dir,
    rename_into,
    start_fsync,
    start_fsync_dir,
    write_atomic,
)

logger = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
BYTES_PER_GB = 1_000_000_000  # min_free_gb is in decimal gigabytes, as disks are sold

_SAFE_NAME = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z._-]{0,63}$")

#: Either the complete bytes of a file or a callback that writes them to a binary file.


def safe_name(uid: str) -> str:
    """A file name component for a UID: the UID itself when harmless, else a hash of it.

    Parameters
    ----------
    uid
        Normally a DICOM UID (digits and dots); surrounding blanks and NULs are ignored.
    """
    if not isinstance(uid, str):
        raise TypeError(f"uid: expected str, got {type(uid).__name__}")
    cleaned = uid.strip(" \x00")
    if not cleaned:
        raise ValueError("uid: must not be empty")
    if _SAFE_NAME.match(cleaned):
        return cleaned
    return "x" + hashlib.sha256(cleaned.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _same_content(path: Path, data: bytes | bytearray | memoryview) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == bytes(data)
    except OSError:
        return False


class StagedInstance:
    """A received instance written to the spool's ``tmp/``, its fsync under way
    (:meth:`Spool.stage`): :meth:`commit` (or :meth:`file_as`, then
    :meth:`wait_durable`) files it under its final name; leaving the ``with`` block
    before that removes it."""

    def __init__(
        self, spool: Spool, data: bytes | bytearray | memoryview, tmp: Path, synced: Future[None]
    ) -> None:
        self._spool = spool
        self._data = data
        self._tmp: Path | None = tmp
        self._synced = synced
        self._folder_synced: Future[None] | None = None

    def __enter__(self) -> StagedInstance:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()

    def commit(self, *, sop_instance_uid: str, series_instance_uid: str) -> Path:
        """:meth:`file_as`, then :meth:`wait_durable`: the final path, on the disk."""
        final = self.file_as(
            sop_instance_uid=sop_instance_uid, series_instance_uid=series_instance_uid
        )
        self.wait_durable()
        return final

    def file_as(self, *, sop_instance_uid: str, series_instance_uid: str) -> Path:
        """Wait for the data to be on the disk, rename the file into place and start the
        fsync of its folder; the final path. The rename is durable only once
        :meth:`wait_durable` returns. As :meth:`Spool.store_bytes`: an instance already
        stored is kept (the staged copy is dropped; different content is logged)."""
        tmp = self._tmp
        if tmp is None:
            raise RuntimeError("staged instance already filed or discarded")
        final = self._spool.instance_path(sop_instance_uid, series_instance_uid)
        try:
            if final.exists():
                if not _same_content(final, self._data):
                    logger.warning(
                        "SOP instance %s re-sent with different content; keeping the first copy",
                        safe_name(sop_instance_uid),
                    )
                return final
            self._synced.result()
            self._spool._make_dir(final.parent)
            rename_into(tmp, final, self._spool._make_dir)
            self._tmp = None
            self._folder_synced = start_fsync_dir(final.parent)
        finally:
            self.discard()
        return final

    def wait_durable(self) -> None:
        """Block until the rename of :meth:`file_as` is on the disk (at once when it kept
        an existing file). Errors of the folder's fsync are ignored, as
        :func:`ldct_node.fsutil.fsync_dir` ignores them."""
        folder_synced = self._folder_synced
        if folder_synced is not None:
            with contextlib.suppress(OSError):
                folder_synced.result()

    def discard(self) -> None:
        """Remove the staged file, unless committed (no-op then, and when called again)."""
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


class Spool:
    """The durable store for received and derived DICOM files.

    Parameters
    ----------
    root
        The spool directory; created (0700) with its ``incoming``, ``derived`` and
        ``tmp`` subdirectories if missing.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.incoming = self.root / "incoming"
        self.derived = self.root / "derived"
        self.tmp = self.root / "tmp"
        for directory in (self.root, self.incoming, self.derived, self.tmp):
            self._make_dir(directory)

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"

    # -- paths --------------------------------------------------------------------------
    def instance_path(self, sop_instance_uid: str, series_instance_uid: str) -> Path:
        """Final path of a received instance (does not create anything)."""
        series = safe_name(series_instance_uid)
        return self.incoming / series / f"{safe_name(sop_instance_uid)}.dcm"

    def derived_dir(self, name: str) -> Path:
        """Directory for one derived series (e.g. ``job-12``), created 0700 if missing."""
        path = self.derived / safe_name(name)
        self._make_dir(path)
        return path

    def contains(self, path: Path | str) -> bool:
        """True if ``path`` lies inside the spool root (after resolving symlinks)."""
        resolved = Path(path).expanduser().resolve()
        return resolved != self.root and resolved.is_relative_to(self.root)

    # -- writing ------------------------------------------------------------------------
    def store_bytes(
        self,
        data: Content,
        *,
        sop_instance_uid: str,
        series_instance_uid: str,
    ) -> Path:
        """Store one received instance durably and return its final path.

        Idempotent: when the instance is already stored the existing file is kept (a
        different content under the same SOPInstanceUID is logged, the first one wins,
        as the database keeps the first one too).

        Parameters
        ----------
        data
            The file's bytes (preamble, file meta and dataset as received), or a
            callback that writes them to the binary file it is given.
        """
        if isinstance(data, bytes | bytearray | memoryview):
            with self.stage(data) as staged:
                return staged.commit(
                    sop_instance_uid=sop_instance_uid, series_instance_uid=series_instance_uid
                )
        final = self.instance_path(sop_instance_uid, series_instance_uid)
        if final.exists():
            return final
        return self.write_atomic(final, data)

    def stage(self, data: bytes | bytearray | memoryview) -> StagedInstance:
        """Write a received instance's bytes to a temporary file and start its fsync in
        a helper thread; :meth:`StagedInstance.commit` gives it its final name.

        Use it as a context manager: leaving it uncommitted removes the file.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data: expected bytes, got {type(data).__name__}")
        fd, name = tempfile.mkstemp(prefix="r-", suffix=".part", dir=self.tmp)
        try:
            os.fchmod(fd, FILE_MODE)
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return StagedInstance(self, data, Path(name), start_fsync(fd))

    def write_atomic(self, final: Path | str, data: Content) -> Path:
        """Write a file inside the spool so that it appears complete or not at all.

        Parameters
        ----------
        final
            Destination path; must lie inside the spool root. Missing parent
            directories are created 0700. An existing file is replaced atomically.
        data
            Bytes, or a callback writing them to the binary file it is given.
        """
        final = Path(final)
        if not final.is_absolute():
            final = self.root / final
        if not self.contains(final):
            raise ValueError(f"final: {final} is outside the spool {self.root}")
        return write_atomic(
            final,
            data,
            tmp_dir=self.tmp,
            prefix="w-",
            suffix=".part",
            mode=FILE_MODE,
            make_dir=self._make_dir,
        )

    def _make_dir(self, path: Path) -> None:
        """mkdir -p with mode 0700, fsyncing each parent that got a new entry."""
        if path.is_dir():
            return
        missing: list[Path] = []
        probe = path
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=DIR_MODE)
            except FileExistsError:
                continue  # a concurrent writer made it
            os.chmod(directory, DIR_MODE)  # mkdir's mode is filtered by the umask
            fsync_dir(directory.parent)

    # -- space --------------------------------------------------------------------------
    def free_bytes(self) -> int:
        """Bytes available to this (unprivileged) process on the spool's filesystem."""
        return shutil.disk_usage(self.root).free

    def total_bytes(self) -> int:
        """Size of the spool's filesystem."""
        return shutil.disk_usage(self.root).total

    def has_space(self, min_free_gb: float, needed_bytes: int = 0) -> bool:
        """True if writing ``needed_bytes`` still leaves at least ``min_free_gb`` free."""
        if min_free_gb < 0:
            raise ValueError(f"min_free_gb: must be >= 0, got {min_free_gb}")
        if needed_bytes < 0:
            raise ValueError(f"needed_bytes: must be >= 0, got {needed_bytes}")
        return self.free_bytes() - needed_bytes >= min_free_gb * BYTES_PER_GB

    # -- cleanup ------------------------------------------------------------------------
    def clean_tmp(self, older_than_seconds: float = 0.0) -> int:
        """Delete every leftover temporary file (call at startup, before receiving).

        Parameters
        ----------
        older_than_seconds
            Only entries last modified longer ago than this: when other processes
            share the spool, younger ones may still be being written.

        Returns
        -------
        int
            The number of entries removed.
        """
        if older_than_seconds < 0:
            raise ValueError(f"older_than_seconds: must be >= 0, got {older_than_seconds}")
        cutoff = time.time() - older_than_seconds
        removed = 0
        for entry in self.tmp.iterdir():
            try:
                if older_than_seconds and entry.lstat().st_mtime > cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        if removed:
            logger.info("removed %d stale temporary file(s) from %s", removed, self.tmp)
        return removed

    def purge_paths(self, paths: Iterable[Path | str]) -> int:
        """Delete files or directory trees inside the spool and prune emptied parents.

        Missing paths are skipped. Parents are removed while empty, up to (not
        including) ``incoming/``, ``derived/`` and ``tmp/``.

        Raises
        ------
        ValueError
            If a path lies outside the spool root (nothing is deleted then).

        Returns
        -------
        int
            The number of paths that existed and were deleted.
        """
        targets = [Path(p).expanduser() for p in paths]
        for target in targets:
            if not self.contains(target):
                raise ValueError(f"paths: {target} is outside the spool {self.root}")
        stops = {self.root, self.incoming, self.derived, self.tmp}
        removed = 0
        parents: set[Path] = set()
        for target in targets:
            resolved = target.resolve()
            if resolved in stops:
                raise ValueError(f"paths: refusing to delete spool area {resolved}")
            try:
                if resolved.is_dir():
                    shutil.rmtree(resolved)
                else:
                    resolved.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            parents.add(resolved.parent)
        # Deepest first so that a child's removal can empty its parent.
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            probe = parent
            while probe not in stops and self.contains(probe):
                try:
                    probe.rmdir()
                except OSError:
                    break  # not empty (or gone): stop climbing
                probe = probe.parent
        return removed
