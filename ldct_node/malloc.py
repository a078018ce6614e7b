"""The C library's allocator, tuned for the node's large buffers (glibc on Linux).

Huge pages for the large activation buffers of inference (below), a fixed mmap
threshold for their memory budget (:mod:`ldct_node.model.cascade`), and freed receive
buffers kept for reuse (:func:`keep_receive_buffers_resident`).

Every convolution of a 512x512 slice writes a fresh 64 MB activation. glibc serves
such blocks with their own ``mmap`` and unmaps them when they are freed (always from the
threads' arenas, and under the memory budget's fixed 1 MiB threshold, see
:func:`ldct_node.model.cascade.return_large_allocations_to_the_system`), so each call
of the cascade faults in about a gigabyte of 4 KiB pages again: ~265,000 page faults
per 512x512 slice. glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) advises
transparent huge pages on those mappings: 2 MiB faults, ~6,000 per slice, the memory
still returned when freed (peak resident memory unchanged). Measured on a 2-core AMD
EPYC (AVX2): 1.15x the cascade's speed at 512x512, the median of 8 alternating pairs.

Tunables are read when the process starts, so the console script re-executes itself
once with the tunable added (same PID, same arguments); ``LDCT_NODE_HUGE_PAGES=0``
turns that off. A ``GLIBC_TUNABLES`` that already names ``glibc.malloc.hugetlb`` is left
as it is.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: The receiver's allocations below this come from the heap (its PDU bodies, at most
#: the node's 256 KiB PDU limit, and data sets of uncompressed slices up to 1024x1024).
RECEIVE_MMAP_THRESHOLD = 4 << 20
#: Free memory at the top of a heap is returned to the system only beyond this: more
#: than what one instance's receiving allocates and frees (~1.4 MB for 512x512).
RECEIVE_TRIM_THRESHOLD = 8 << 20

#: The tunable and the value this module sets.
HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
#: Environment switch: "0" keeps the process as started.
OPT_OUT_VARIABLE = "LDCT_NODE_HUGE_PAGES"
#: Where the kernel says whether transparent huge pages may be used.
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_MIN_GLIBC = (2, 35)


def _glibc_version(libc: tuple[str, str]) -> tuple[int, ...] | None:
    name, version = libc
    if name != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def huge_page_environment(
    environ: Mapping[str, str],
    *,
    libc: tuple[str, str] | None = None,
    thp_enabled: str | None = None,
    system: str | None = None,
) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to gain.

    Parameters
    ----------
    environ
        The current environment.
    libc, thp_enabled, system
        ``platform.libc_ver()``, the text of :data:`THP_ENABLED` and
        ``sys.platform``; read from this machine when None (tests pass them).

    Returns
    -------
    dict[str, str] | None
        ``environ`` with ``glibc.malloc.hugetlb=1`` appended to ``GLIBC_TUNABLES``; None
        when opted out, already set, not glibc >= 2.35 on Linux, or transparent huge
        pages are off (``[never]``).
    """
    if environ.get(OPT_OUT_VARIABLE, "").strip() == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _hugetlb_setting(tunables) is not None:
        return None
    if not (system if system is not None else sys.platform).startswith("linux"):
        return None
    version = _glibc_version(libc if libc is not None else platform.libc_ver())
    if version is None or version < _MIN_GLIBC:
        return None
    if thp_enabled is None:
        try:
            thp_enabled = THP_ENABLED.read_text(encoding="ascii")
        except OSError:
            return None
    if "[never]" in thp_enabled or "[" not in thp_enabled:
        return None
    setting = f"{HUGETLB_TUNABLE}=1"
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{setting}" if tunables else setting}


def reexec_with_huge_pages() -> None:
    """Replace this process by itself with the tunable set, if that helps (see above).

    Call it first thing in an entry point, before threads or heavy imports: nothing of
    this process survives but its PID and open files. Returns only when nothing is done.
    """
    env = huge_page_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # orig_argv: the interpreter's own options too (-X, -W, -m ...), not only sys.argv.
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # cannot re-execute (odd install): run as started


def _hugetlb_setting(tunables: str) -> str | None:
    """The value ``GLIBC_TUNABLES`` gives ``glibc.malloc.hugetlb``; None if it names none."""
    for item in tunables.split(":"):
        name, _, value = item.partition("=")
        if name == HUGETLB_TUNABLE:
            return value.strip()
    return None


def huge_pages_in_use(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process started with ``glibc.malloc.hugetlb`` set to a non-zero value."""
    tunables = (environ if environ is not None else os.environ).get("GLIBC_TUNABLES", "")
    return _hugetlb_setting(tunables) not in (None, "", "0")


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def mallopt(parameter: int, value: int) -> bool:
    """glibc's ``mallopt(parameter, value)`` for this whole process; whether it took.

    False where the C library has none (musl, macOS). Either threshold set this way
    also stops glibc's own sliding adjustment of both.
    """
    function = _mallopt()
    if function is None:
        logger.debug("mallopt is not available; the C library's defaults stay")
        return False
    return bool(function(parameter, value))


def keep_receive_buffers_resident() -> bool:
    """Let freed receive buffers be reused in place instead of returned to the system.

    Every C-STORE allocates and frees its PDU bodies and its data set (~1.4 MB for a
    512x512 slice) in the receiving thread. With glibc's sliding thresholds that memory
    went back to the system after each instance in some receiver processes and not in
    others (chance: the order of the first frees): those took ~350 fresh-page faults an
    instance, 0.5-1.1 ms more CPU, where the others took 2. Fixed thresholds
    (:data:`RECEIVE_MMAP_THRESHOLD`, :data:`RECEIVE_TRIM_THRESHOLD`) make every receiver
    the second kind. At most the trim threshold stays resident per arena; both values lie
    below where glibc's sliding thresholds may climb (32 MiB and twice that).

    Call it once at the start of a receiving process; the inference's memory budget may
    lower the mmap threshold afterwards (its activations are larger anyway). Returns
    whether both settings took.
    """
    mmap_set = mallopt(M_MMAP_THRESHOLD, RECEIVE_MMAP_THRESHOLD)
    trim_set = mallopt(M_TRIM_THRESHOLD, RECEIVE_TRIM_THRESHOLD)
    return mmap_set and trim_set
