"""Who holds a job or a forward: ``host:pid`` names the process in the job table."""

from __future__ import annotations

import os
import socket


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
