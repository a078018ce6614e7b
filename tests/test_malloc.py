"""The allocator settings: when the node re-executes itself with huge pages for inference's
large buffers, and the receiver's buffers kept for reuse."""

from __future__ import annotations

import os
import platform
import sys

import pytest
from conftest import run_python

from ldct_node.cli.common import NETWORK_COMMANDS, _command_name
from ldct_node.malloc import (
    HUGETLB_TUNABLE,
    OPT_OUT_VARIABLE,
    huge_page_environment,
    huge_pages_in_use,
)

GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin", **extra}


def test_the_tunable_is_added_on_linux_glibc_with_transparent_huge_pages() -> None:
    env = huge_page_environment(_env(), libc=GLIBC, thp_enabled=MADVISE, system="linux")
    assert env == {"PATH": "/usr/bin", "GLIBC_TUNABLES": f"{HUGETLB_TUNABLE}=1"}
    # Other tunables are kept, and the new one appended.
    kept = huge_page_environment(
        _env(GLIBC_TUNABLES="glibc.malloc.arena_max=2"),
        libc=GLIBC,
        thp_enabled="[always] madvise never",
        system="linux",
    )
    assert kept is not None
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB_TUNABLE}=1"


@pytest.mark.parametrize(
    ("environ", "libc", "thp", "system"),
    [
        (_env(**{OPT_OUT_VARIABLE: "0"}), GLIBC, MADVISE, "linux"),  # opted out
        (_env(GLIBC_TUNABLES=f"{HUGETLB_TUNABLE}=0"), GLIBC, MADVISE, "linux"),  # user's own
        (_env(), ("glibc", "2.31"), MADVISE, "linux"),  # no such tunable before 2.35
        (_env(), ("", ""), MADVISE, "linux"),  # musl
        (_env(), GLIBC, "always madvise [never]", "linux"),  # THP off
        (_env(), GLIBC, "", "linux"),  # no THP file content
        (_env(), GLIBC, MADVISE, "darwin"),
    ],
    ids=["opted-out", "already-set", "old-glibc", "not-glibc", "thp-never", "no-thp", "macos"],
)
def test_nothing_is_done_where_it_cannot_help_or_is_not_wanted(
    environ: dict[str, str], libc: tuple[str, str], thp: str, system: str
) -> None:
    assert huge_page_environment(environ, libc=libc, thp_enabled=thp, system=system) is None


def test_in_use_reads_the_tunable_value() -> None:
    assert huge_pages_in_use({"GLIBC_TUNABLES": f"a=1:{HUGETLB_TUNABLE}=1"})
    assert not huge_pages_in_use({"GLIBC_TUNABLES": f"{HUGETLB_TUNABLE}=0"})
    assert not huge_pages_in_use({})


def _clean_environ() -> dict[str, str]:
    """This process's environment without the tunables and the opt-out."""
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT_VARIABLE)}


def _machine_supports() -> bool:
    return huge_page_environment(_clean_environ()) is not None


def test_the_process_re_executes_itself_once_keeping_its_pid() -> None:
    code = (
        "import os\n"
        "from ldct_node.malloc import reexec_with_huge_pages\n"
        "print('start', os.getpid(), flush=True)\n"
        "reexec_with_huge_pages()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES', ''))\n"
    )
    base = _clean_environ()
    runs = {
        "default": base,
        "opted out": {**base, OPT_OUT_VARIABLE: "0"},
    }
    for name, env in runs.items():
        res = run_python(code, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        starts = [line for line in lines if line.startswith("start ")]
        if name == "default" and _machine_supports():
            # Started twice, in one process: the second start found the tunable set.
            assert len(starts) == 2 and starts[0] == starts[1], lines
            assert lines[-1] == f"tunables {HUGETLB_TUNABLE}=1"
        else:
            assert len(starts) == 1 and lines[-1] == "tunables ", lines


def test_only_the_commands_that_run_the_networks_re_execute() -> None:
    assert _command_name(["--debug", "serve", "--config", "x.toml"]) == "serve"
    assert _command_name(["jobs", "list"]) == "jobs"
    assert _command_name(["--version"]) is None
    assert {"serve", "denoise", "evaluate", "train"} == NETWORK_COMMANDS


_RECEIVE_LOOP = """
import resource, sys, threading
from ldct_node.malloc import M_MMAP_THRESHOLD, keep_receive_buffers_resident, mallopt

if sys.argv[1] == "kept":
    took = keep_receive_buffers_resident()
else:  # glibc's starting mmap threshold, fixed: every PDU body is mapped anew
    took = mallopt(M_MMAP_THRESHOLD, 128 * 1024)

def receive(instances):
    # What the receiving thread does for a 512x512 slice: two PDU bodies of the
    # node's 256 KiB limit, joined into the data set, then all freed.
    for _ in range(instances):
        bodies = [bytearray(262_144), bytearray(262_144)]
        dataset = b"".join(bodies)
        del bodies, dataset

def thread():
    receive(5)  # the first instances take the memory
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    receive(200)
    after = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    print(took, (after - before) / 200)

worker = threading.Thread(target=thread)
worker.start()
worker.join()
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)
def test_kept_receive_buffers_are_reused_without_fresh_page_faults() -> None:
    faults = {}
    for mode in ("kept", "mapped anew"):
        res = run_python(_RECEIVE_LOOP, mode, env=_clean_environ(), timeout=60)
        assert res.returncode == 0, res.stderr
        took, per_instance = res.stdout.split()
        assert took == "True", res.stdout
        faults[mode] = float(per_instance)
    # Mapped anew, every 4 KiB page of ~1 MB faults on each instance (~256); kept in the
    # heap, the same pages serve every instance.
    assert faults["mapped anew"] > 100, faults
    assert faults["kept"] < 1, faults
