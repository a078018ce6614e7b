"""The durable spool: atomic writes, permissions, idempotence, cleanup."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ldct_node import fsutil
from ldct_node.service.spool import BYTES_PER_GB, Spool, safe_name

SERIES = "1.2.826.0.1.3680043.8.498.1"
SOP = "1.2.826.0.1.3680043.8.498.1.7"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_is_created_private(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    for area in (spool.root, spool.incoming, spool.derived, spool.tmp):
        assert area.is_dir()
        assert _mode(area) == 0o700


def test_store_bytes_lands_complete_and_private(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = os.urandom(5000)
    path = spool.store_bytes(data, sop_instance_uid=SOP, series_instance_uid=SERIES)
    assert path == spool.incoming / SERIES / f"{SOP}.dcm"
    assert path.read_bytes() == data
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert list(spool.tmp.iterdir()) == []


def test_store_bytes_is_idempotent_and_keeps_the_first_copy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.store_bytes(b"first", sop_instance_uid=SOP, series_instance_uid=SERIES)
    inode = first.stat().st_ino
    again = spool.store_bytes(b"first", sop_instance_uid=SOP, series_instance_uid=SERIES)
    assert again == first and first.stat().st_ino == inode
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="ldct_node.service.spool"):
        other = spool.store_bytes(b"second", sop_instance_uid=SOP, series_instance_uid=SERIES)
    assert other == first
    assert first.read_bytes() == b"first"
    assert any("different content" in r.getMessage() for r in caplog.records)
    assert list(spool.tmp.iterdir()) == []  # the re-sent copy, staged first, is dropped


def test_writer_callback_and_failure_leave_nothing_half_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    def writer(fh: BinaryIO) -> None:
        fh.write(b"abc")
        fh.write(b"def")

    path = spool.write_atomic(spool.derived_dir("job-1") / "a.dcm", writer)
    assert path.read_bytes() == b"abcdef"

    def broken(fh: BinaryIO) -> None:
        fh.write(b"half")
        raise RuntimeError("disk on fire")

    target = spool.derived_dir("job-1") / "b.dcm"
    with pytest.raises(RuntimeError, match="disk on fire"):
        spool.write_atomic(target, broken)
    assert not target.exists()
    assert list(spool.tmp.iterdir()) == []


def test_a_crash_mid_write_never_leaves_a_final_file(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    child = textwrap.dedent(
        f"""
        import os
        from ldct_node.service.spool import Spool
        spool = Spool({str(root)!r})
        def writer(fh):
            fh.write(b"x" * 4096)
            fh.flush()
            os._exit(3)  # the process dies mid-file
        spool.store_bytes(writer, sop_instance_uid={SOP!r}, series_instance_uid={SERIES!r})
        """
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", child], cwd=repo, timeout=60, check=False)
    assert result.returncode == 3
    spool = Spool(root)
    assert not spool.instance_path(SOP, SERIES).exists()
    assert len(list(spool.tmp.iterdir())) == 1  # the orphaned temporary file
    assert spool.clean_tmp() == 1
    assert list(spool.tmp.iterdir()) == []


def test_write_atomic_refuses_paths_outside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ValueError, match="outside the spool"):
        spool.write_atomic(tmp_path / "elsewhere.dcm", b"x")
    with pytest.raises(ValueError, match="outside the spool"):
        spool.write_atomic(spool.root / ".." / "escape.dcm", b"x")
    with pytest.raises(TypeError, match="data"):
        spool.write_atomic(spool.derived / "x.dcm", "text")  # type: ignore[arg-type]
    assert not (tmp_path / "elsewhere.dcm").exists()


def test_hostile_uids_cannot_escape(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.store_bytes(b"x", sop_instance_uid="../../evil", series_instance_uid="/etc")
    assert path.is_relative_to(spool.incoming)
    assert path.parent.parent == spool.incoming
    assert safe_name(" 1.2.3\x00") == "1.2.3"
    with pytest.raises(ValueError, match="uid"):
        safe_name("  ")


@given(st.text(min_size=1, max_size=200).filter(lambda s: s.strip(" \x00")))
def test_safe_name_is_always_one_harmless_component(uid: str) -> None:
    name = safe_name(uid)
    assert 1 <= len(name) <= 64
    assert "/" not in name and "\x00" not in name
    assert not name.startswith(".")
    assert safe_name(uid) == name  # deterministic


def test_space_checks(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    free = spool.free_bytes()
    assert free > 0
    assert spool.has_space(0)
    assert not spool.has_space(1e9)  # a petabyte
    assert not spool.has_space(0, needed_bytes=free + BYTES_PER_GB)
    with pytest.raises(ValueError, match="min_free_gb"):
        spool.has_space(-1)


def test_purge_paths_deletes_files_and_empty_parents_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    a = spool.store_bytes(b"a", sop_instance_uid="1.1", series_instance_uid="9.1")
    b = spool.store_bytes(b"b", sop_instance_uid="1.2", series_instance_uid="9.1")
    c = spool.store_bytes(b"c", sop_instance_uid="1.3", series_instance_uid="9.2")
    out = spool.derived_dir("job-7")
    spool.write_atomic(out / "d.dcm", b"d")

    assert spool.purge_paths([a, out, spool.incoming / "9.9" / "missing.dcm"]) == 2
    assert not a.exists() and b.exists() and not out.exists()
    assert a.parent.is_dir()  # still holds b
    assert spool.purge_paths([b]) == 1
    assert not b.parent.exists()  # emptied series folder pruned
    assert spool.incoming.is_dir() and spool.derived.is_dir()  # areas stay

    outside = tmp_path / "keep.txt"
    outside.write_text("keep")
    with pytest.raises(ValueError, match="outside the spool"):
        spool.purge_paths([c, outside])
    assert c.exists() and outside.exists()  # nothing deleted when one path is bad
    with pytest.raises(ValueError, match="spool area"):
        spool.purge_paths([spool.incoming])


def test_a_staged_instance_gets_its_final_name_only_when_committed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = os.urandom(70_000)
    final = spool.instance_path(SOP, SERIES)
    with spool.stage(data) as staged:
        (tmp,) = spool.tmp.iterdir()
        assert tmp.read_bytes() == data and _mode(tmp) == 0o600
        assert not final.exists()
        path = staged.file_as(sop_instance_uid=SOP, series_instance_uid=SERIES)
        staged.wait_durable()
    assert path == final and final.read_bytes() == data and _mode(final) == 0o600
    assert list(spool.tmp.iterdir()) == []
    with pytest.raises(RuntimeError, match="already filed"):
        staged.commit(sop_instance_uid=SOP, series_instance_uid=SERIES)


def test_a_staged_instance_left_uncommitted_is_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ZeroDivisionError), spool.stage(b"refused later"):
        _ = 1 / 0  # e.g. the header turned out unparseable
    assert list(spool.tmp.iterdir()) == []
    assert list(spool.incoming.iterdir()) == []
    with pytest.raises(TypeError, match="data"):
        spool.stage("text")  # type: ignore[arg-type]


def test_start_fsync_returns_while_the_fsync_runs_and_closes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    entered = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"data")
    synced = fsutil.start_fsync(fd)
    assert entered.is_set()  # the helper is inside the fsync when the call returns
    assert not synced.done()
    release.set()
    synced.result(timeout=30)
    with pytest.raises(OSError):
        os.fstat(fd)  # the helper closed it


def test_start_fsync_reports_the_fsync_error(tmp_path: Path) -> None:
    not_open = 1_000_000 - 7  # far above any descriptor this process has
    with pytest.raises(OSError):
        fsutil.start_fsync(not_open).result(timeout=30)
    assert fsutil.start_fsync_dir(tmp_path / "missing").result(timeout=30) is None


def test_start_fsync_works_in_a_forked_child(tmp_path: Path) -> None:
    fsutil.start_fsync(os.open(tmp_path / "parent", os.O_CREAT | os.O_WRONLY, 0o600)).result(30)
    pid = os.fork()
    if pid == 0:  # the child: the parent's helper threads are not here
        try:
            fd = os.open(tmp_path / "child", os.O_CREAT | os.O_WRONLY, 0o600)
            fsutil.start_fsync(fd).result(timeout=10)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
