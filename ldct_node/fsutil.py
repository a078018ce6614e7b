"""Durable file writes: a file appears complete under its final name or not at all, and
survives a power loss once the call returns.

Every write goes to a temporary file (same filesystem), is flushed and fsynced, renamed
over the final name with ``os.replace`` and the folder is fsynced so that the rename
itself is durable. The spool, the derived series, the weights and their manifest, the
trainer's state and the simulator's dataset manifest all write through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

#: What to write: bytes, or a callback writing them to the binary file it is given.
Content = bytes | bytearray | memoryview | Callable[[BinaryIO], None]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (where the filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: Helper threads that run background fsyncs (:func:`start_fsync`), shared process-wide.
BACKGROUND_SYNC_THREADS = 8
#: How long :func:`start_fsync` waits for a helper thread to take the fsync up.
_SYNC_START_WAIT_S = 0.05
_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None:
            _sync_pool = ThreadPoolExecutor(BACKGROUND_SYNC_THREADS, "fsync")
        return _sync_pool


def _forget_pool() -> None:
    # A forked child has none of the parent's threads: the inherited pool would count
    # them as idle and never run what it is given.
    global _sync_pool, _sync_pool_lock
    _sync_pool = None
    _sync_pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _done(exc: OSError | None = None) -> Future[None]:
    """A future that is already done: ``exc`` raised by its ``result()``, or None."""
    done: Future[None] = Future()
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)
    return done


def start_fsync(fd: int) -> Future[None]:
    """fsync ``fd`` in a helper thread, which then closes it; the caller may go on
    with Python work meanwhile and must not use or close ``fd`` itself.

    Returns once the helper has entered the fsync (or after a short wait when every
    helper is busy): a helper thread that is only queued needs the GIL to start, and
    would not get it before the caller blocks, so the fsync would not overlap anything.

    Returns
    -------
    Future
        Done when the data is on the disk; its ``result()`` raises the fsync's OSError.
    """
    started = threading.Event()

    def sync() -> None:
        started.set()
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    try:
        future = _pool().submit(sync)
    except RuntimeError:  # interpreter shutting down: no new threads, sync here
        try:
            sync()
        except OSError as exc:
            return _done(exc)
        return _done()
    started.wait(_SYNC_START_WAIT_S)
    return future


def start_fsync_dir(path: Path) -> Future[None]:
    """:func:`fsync_dir` in a helper thread (:func:`start_fsync`); a folder that cannot
    be opened gives a future that is already done, as :func:`fsync_dir` ignores it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return _done()
    return start_fsync(fd)


def fsync_file(path: Path) -> None:
    """Flush a closed file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_into(tmp: Path, final: Path, make_dir: Callable[[Path], None] | None) -> None:
    """``os.replace(tmp, final)``; where ``final``'s folder is gone (a concurrent
    clean-up removed it, empty) and ``make_dir`` is given, make it again and try once
    more."""
    try:
        os.replace(tmp, final)
    except FileNotFoundError:
        if make_dir is None:
            raise
        make_dir(final.parent)
        os.replace(tmp, final)


def replace_durably(tmp: Path, final: Path) -> Path:
    """Rename a written temporary file over ``final``: fsync, ``os.replace``, fsync the
    folder. For files written by a library that wants a path (Keras weights)."""
    try:
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)
    return final


def write_atomic(
    final: Path,
    data: Content,
    *,
    tmp_dir: Path | None = None,
    prefix: str = ".tmp-",
    suffix: str = ".part",
    mode: int | None = None,
    make_dir: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``data`` to ``final`` durably and atomically.

    Parameters
    ----------
    final
        The file to write; an existing one is replaced atomically.
    data
        Bytes, or a callback writing them to the binary file it is given.
    tmp_dir
        Where the temporary file goes (same filesystem as ``final``); its folder by
        default.
    prefix, suffix
        Of the temporary file's name.
    mode
        Permission bits of the file (``mkstemp`` makes it 0600).
    make_dir
        Creates ``final.parent`` (called with it) before writing, and again when the
        rename finds that folder gone (a concurrent clean-up removed it) before one more
        try; without it the folder must exist.
    """
    if not (callable(data) or isinstance(data, bytes | bytearray | memoryview)):
        raise TypeError(f"data: expected bytes or a callable, got {type(data).__name__}")
    if make_dir is not None:
        make_dir(final.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=tmp_dir or final.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp_name, mode)
        rename_into(Path(tmp_name), final, make_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(final.parent)
    return final


def write_text_atomic(final: Path, text: str) -> Path:
    """:func:`write_atomic` for UTF-8 text."""
    return write_atomic(final, text.encode("utf-8"))
