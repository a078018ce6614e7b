"""Admin commands: status, jobs, retry, cancel, purge, echo (exit codes and output)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _dicom_util import make_ct_series
from _net_util import LOOPBACK, free_port
from _node_util import needs_storescp, spool_series, storescp, write_config

from ldct_node import cli
from ldct_node.config import load_settings
from ldct_node.service.spool import Spool
from ldct_node.store import Database, JobState, open_database


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def make_config(tmp_path: Path, pacs_port: int = 4242) -> Path:
    return write_config(
        tmp_path,
        tmp_path / "no-weights",
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs_port}],
        storage={"retention_days": 7},
    )


class Seeded:
    """A database with jobs in chosen states, made through the database API."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.settings = load_settings(config)
        self.db: Database = open_database(self.settings)
        self.spool = Spool(self.settings.spool_path)
        self.n = 0

    def job(self, state: str, *, forward_error: str | None = None) -> int:
        self.n += 1
        files = make_ct_series(self.spool.root.parent, n=2, size=16, subdir=f"src{self.n}")
        spool_series(self.db, self.spool, files)
        (job_id,) = self.db.promote_stable_series(stable_seconds=0)
        if state == JobState.QUEUED:
            return job_id
        claimed = self.db.claim_next_job("test")
        assert claimed is not None and claimed.id == job_id
        if state == JobState.FAILED:
            self.db.fail_job(job_id, f"instance 1.2.3.{job_id}: cannot decode pixel data")
            return job_id
        out = self.spool.derived_dir(f"job-{job_id}")
        derived = make_ct_series(out, n=2, size=16, subdir="derived")
        dests = ["pacs"] if state == JobState.FORWARDING else []
        self.db.finish_processing(job_id, f"1.2.9.{job_id}", derived[0].parent, 2, dests)
        if forward_error:
            self.db.record_forward_result(
                job_id,
                "pacs",
                ok=False,
                n_sent=0,
                max_attempts=10,
                error=forward_error,
                next_attempt_at=datetime.now(UTC) + timedelta(seconds=60),
            )
        assert self.db.get_job(job_id).state == state
        return job_id


@pytest.fixture
def seeded(tmp_path: Path) -> Any:
    seeded = Seeded(make_config(tmp_path))
    yield seeded
    seeded.db.close()


def test_status_of_an_empty_node_is_healthy(tmp_path: Path, capsys: Any) -> None:
    config = make_config(tmp_path)
    rc, _, err = run(capsys, "db", "upgrade", "--config", config)  # as `serve` does at start
    assert rc == 0, err
    rc, out, _ = run(capsys, "status", "--config", config, "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["healthy"] is True and data["problems"] == []
    assert data["queue_depth"] == 0 and set(data["counts"]) >= {"queued", "done", "failed"}
    rc, out, _ = run(capsys, "status", "--config", config)
    assert rc == 0 and "healthy" in out and "queue depth 0" in out


def test_status_reports_failures_and_forward_errors_with_exit_1(
    seeded: Seeded, capsys: Any
) -> None:
    seeded.job("done")
    failed = seeded.job("failed")
    retrying = seeded.job("forwarding", forward_error="pacs answered C-STORE with 0xA700")
    seeded.job("queued")  # last: a queued job would be claimed by the next seeding
    config = seeded.config

    rc, out, _ = run(capsys, "status", "--config", config, "--json")
    assert rc == 1
    data = json.loads(out)
    assert data["healthy"] is False and len(data["problems"]) == 2
    assert data["counts"]["done"] == 1 and data["counts"]["failed"] == 1
    assert data["queue_depth"] == 1 and data["pending_forwards"] == 1
    assert data["done_last_hour"] == 1 and data["instances_last_hour"] == 8
    (fwd,) = data["forward_errors"]
    assert fwd["job_id"] == retrying and fwd["destination"] == "pacs"
    assert "0xA700" in fwd["last_error"] and fwd["next_attempt_at"]
    assert [e["job_id"] for e in data["last_errors"]] == [failed]

    rc, out, _ = run(capsys, "status", "--config", config)
    assert rc == 1
    assert "needs attention" in out and "1 failed job(s)" in out and "0xA700" in out


def test_jobs_lists_and_filters(seeded: Seeded, capsys: Any) -> None:
    done = seeded.job("done")
    failed = seeded.job("failed")
    config = seeded.config

    rc, out, _ = run(capsys, "jobs", "--config", config, "--json")
    assert rc == 0
    rows = json.loads(out)
    assert [(r["id"], r["state"]) for r in rows] == [(done, "done"), (failed, "failed")]
    assert rows[0]["series_instance_uid"] and rows[0]["n_instances"] == 2

    rc, out, _ = run(capsys, "jobs", "--config", config, "--state", "failed", "--json")
    assert rc == 0 and [r["id"] for r in json.loads(out)] == [failed]

    rc, out, _ = run(capsys, "jobs", "--config", config)
    assert rc == 0 and "2 job(s)" in out and "failed" in out

    rc, _, err = run(capsys, "jobs", "--config", config, "--state", "bogus")
    assert rc == 2 and "--state" in err and "bogus" in err


def test_retry_and_cancel_exit_codes(seeded: Seeded, capsys: Any) -> None:
    done = seeded.job("done")
    failed = seeded.job("failed")
    queued = seeded.job("queued")
    config = seeded.config

    rc, out, _ = run(capsys, "retry", str(failed), "--config", config)
    assert rc == 0 and f"job {failed} is now queued" in out
    assert seeded.db.get_job(failed).state == JobState.QUEUED

    rc, _, err = run(capsys, "retry", str(done), "--config", config)
    assert rc == 2 and "done -> queued" in err and "failed or cancelled" in err
    assert seeded.db.get_job(done).state == JobState.DONE

    rc, _, err = run(capsys, "retry", "9999", "--config", config)
    assert rc == 1 and "no job with id 9999" in err and "Traceback" not in err

    rc, out, _ = run(capsys, "cancel", str(queued), "--config", config)
    assert rc == 0 and f"job {queued} is now cancelled" in out
    rc, _, err = run(capsys, "cancel", str(done), "--config", config)
    assert rc == 2 and "cannot cancel" in err
    rc, _, err = run(capsys, "cancel", "9999", "--config", config)
    assert rc == 1 and "no job with id 9999" in err

    # A cancelled job can be retried.
    rc, _, _ = run(capsys, "retry", str(queued), "--config", config)
    assert rc == 0 and seeded.db.get_job(queued).state == JobState.QUEUED


def test_purge_deletes_files_of_done_series_only(seeded: Seeded, capsys: Any) -> None:
    done = seeded.job("done")
    failed = seeded.job("failed")
    config = seeded.config
    done_dir = Path(seeded.db.get_job(done).output_dir or "")
    done_sources = seeded.db.job_instances(done)
    failed_sources = seeded.db.job_instances(failed)
    assert done_dir.is_dir() and all(p.exists() for p in done_sources + failed_sources)

    # retention_days is 7: nothing is old enough yet.
    rc, out, _ = run(capsys, "purge", "--config", config)
    assert rc == 0 and "purged 0 series" in out and done_dir.is_dir()

    rc, out, _ = run(capsys, "purge", "--config", config, "--older-than", "0")
    assert rc == 0 and "purged 1 series" in out
    assert not done_dir.exists() and not any(p.exists() for p in done_sources)
    assert all(p.exists() for p in failed_sources)  # failed jobs keep their input
    assert seeded.db.get_job(done).purged_at is not None

    rc, _, _ = run(capsys, "purge", "--config", config, "--older-than", "-1")
    assert rc == 2


@needs_storescp
def test_echo_a_destination(tmp_path: Path, capsys: Any) -> None:
    with storescp(tmp_path / "pacs") as pacs:
        config = make_config(tmp_path, pacs_port=pacs.port)
        rc, out, _ = run(capsys, "echo", "pacs", "--config", config)
    assert rc == 0 and "succeeded" in out


def test_echo_failures(tmp_path: Path, capsys: Any) -> None:
    config = make_config(tmp_path, pacs_port=free_port())
    rc, _, err = run(capsys, "echo", "pacs", "--config", config)
    assert rc == 1 and "no association" in err
    rc, _, err = run(capsys, "echo", "nowhere", "--config", config)
    assert rc == 2 and "no destination named 'nowhere'" in err


def test_bad_config_is_exit_2(tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 'x'\n")
    for command in (["status"], ["jobs"], ["retry", "1"], ["cancel", "1"], ["purge"]):
        rc, _, err = run(capsys, *command, "--config", bad)
        assert rc == 2 and "node.port" in err, command


def test_admin_commands_never_create_a_database(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: `status` without a config used to create ./var/ldct-node.db and report
    healthy, so a monitoring check set up without --config stayed green forever."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDCT_NODE_CONFIG", raising=False)
    for command in (["status"], ["status", "--json"], ["jobs"], ["retry", "1"], ["purge"]):
        rc, out, err = run(capsys, *command)
        assert rc == 2, (command, out, err)
        assert f"no job database at {tmp_path / 'var' / 'ldct-node.db'}" in err, err
        assert "config: none (config.toml not found: built-in defaults)" in err
    assert list(tmp_path.iterdir()) == []  # no var/, no database file

    config = make_config(tmp_path / "node")  # a config, but the node never ran
    rc, _, err = run(capsys, "status", "--config", config)
    assert rc == 2 and f"config: {config}" in err and "start the node" in err
    assert not (tmp_path / "node" / "node.db").exists()


def test_status_names_its_config_and_piped_tables_are_not_cut(seeded: Seeded, capsys: Any) -> None:
    failed = seeded.job("failed")
    long_error = "instance 1.2.3: " + "a reason that goes on and on " * 8 + "THE END"
    with seeded.db.session() as sess:  # a long error, as a real decoder message can be
        from ldct_node.store import Job

        sess.get(Job, failed).error = long_error  # type: ignore[union-attr]
    rc, out, _ = run(capsys, "status", "--config", seeded.config)
    assert rc == 1 and f"config {seeded.config}" in out
    assert "THE END" in out
    rc, out, _ = run(capsys, "status", "--config", seeded.config, "--json")
    assert json.loads(out)["config"] == str(seeded.config)
    rc, out, _ = run(capsys, "jobs", "--config", seeded.config)
    uid = seeded.db.get_job(failed).series_instance_uid
    assert uid in out and "THE END" in out  # whole UID and error: stdout is not a terminal
    assert max(len(line) for line in out.splitlines()) > 200
