"""Alembic migrations on real SQLite files and a real PostgreSQL server.

- the migrated schema equals the models (Alembic's autogenerate comparison is empty);
- ``ldct-node db upgrade`` creates, upgrades and is idempotent;
- a database made by ldct-node 0.1 (``create_all``, no ``alembic_version``; its DDL is
  kept in tests/data) is adopted and upgraded with its rows intact;
- several processes upgrading one database at once all succeed.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tomli_w
from _node_util import REPO, cli
from sqlalchemy import inspect, text

from ldct_node.store import Database, JobState
from ldct_node.store.migrate import (
    BASELINE_REVISION,
    current_revision,
    head_revision,
    schema_differences,
    upgrade,
)

DATA = Path(__file__).resolve().parent / "data"


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'jobs.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return str(request.getfixturevalue("pg_url"))


def state_of(url: str) -> tuple[str | None, list[object]]:
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            return current_revision(conn), schema_differences(conn)
    finally:
        db.close()


def config_for(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps({"storage": {"database_url": url, "spool_dir": "spool"}}))
    return path


def load_legacy_schema(url: str) -> None:
    """Create the tables exactly as ldct-node 0.1 did, with one running job in them."""
    db = Database(url)
    ddl = (DATA / f"schema_v0_1.{db.engine.dialect.name}.sql").read_text()
    statements = [s.strip() for s in ddl.split(";") if s.strip().strip("-\n ")]
    statements = [
        "\n".join(line for line in s.splitlines() if not line.startswith("--")) for s in statements
    ]
    now = datetime(2024, 5, 1, 8, 0, 0)
    try:
        with db.engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
            conn.execute(
                text(
                    "INSERT INTO series (id, series_instance_uid, study_instance_uid, "
                    "calling_aet, n_instances, n_skipped, first_received_at, "
                    "last_received_at, state) VALUES (1, '1.2.3', '1.2', 'CT1', 2, 0, :t, :t, "
                    "'stable')"
                ),
                {"t": now},
            )
            conn.execute(
                text(
                    "INSERT INTO job (id, series_id, profile, state, attempts, created_at, "
                    "updated_at, started_at, worker_id, heartbeat_at, rerun_requested) "
                    "VALUES (1, 1, 'denoised', 'running', 1, :t, :t, :t, 'old-host:1', :t, "
                    ":f)"
                ),
                {"t": now, "f": False},
            )
    finally:
        db.close()


def test_migrated_schema_equals_the_models(url: str) -> None:
    result = upgrade(url)
    assert result.before is None and not result.adopted
    assert result.after == head_revision()
    revision, diff = state_of(url)
    assert revision == head_revision()
    assert diff == []
    again = upgrade(url)
    assert not again.changed and again.before == head_revision()


def test_a_version_0_1_database_is_adopted_and_upgraded(url: str) -> None:
    load_legacy_schema(url)
    revision, diff = state_of(url)
    assert revision is None
    assert diff, "the legacy schema should lack the lease columns"
    result = upgrade(url)
    assert result.adopted and result.before is None and result.after == head_revision()
    revision, diff = state_of(url)
    assert (revision, diff) == (head_revision(), [])
    # The old rows are there and the new code works on them: the running job from
    # before leases had no lease and a long-gone heartbeat, so it is re-queued.
    db = Database(url)
    try:
        job = db.get_job(1)
        assert job.state == JobState.RUNNING and job.worker_id == "old-host:1"
        assert db.requeue_expired(now=datetime(2024, 5, 1, 9, 0, tzinfo=UTC)) == [1]
        claimed = db.claim_next_job("new-host:2")
        assert claimed is not None and claimed.id == 1 and claimed.attempts == 2
    finally:
        db.close()


def test_a_database_made_by_create_all_is_stamped_not_altered(url: str) -> None:
    # E.g. first touched by `ldct-node status` (which creates missing tables).
    db = Database(url)
    db.create_schema()
    db.close()
    result = upgrade(url)
    assert result.adopted and result.after == head_revision()
    assert state_of(url) == (head_revision(), [])


def test_db_upgrade_command(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    config = config_for(tmp_path, url)
    res = cli("db", "upgrade", "--config", config)
    assert res.returncode == 0, res.stderr
    assert f"empty database -> revision {head_revision()}" in res.stdout
    res = cli("db", "upgrade", "--config", config)
    assert res.returncode == 0, res.stderr
    assert f"up to date (revision {head_revision()})" in res.stdout
    tables = inspect(Database(url).engine).get_table_names()
    assert {"series", "instance", "job", "forward", "alembic_version"} <= set(tables)


def test_db_upgrade_of_a_legacy_sqlite_database_via_the_cli(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    load_legacy_schema(url)
    res = cli("db", "upgrade", "--config", config_for(tmp_path, url))
    assert res.returncode == 0, res.stderr
    assert "adopted a database created before migrations" in res.stdout
    assert state_of(url) == (head_revision(), [])


def test_db_upgrade_reports_an_unreachable_database(tmp_path: Path) -> None:
    from _net_util import free_port

    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/nothing"
    res = cli("db", "upgrade", "--config", config_for(tmp_path, url))
    assert res.returncode == 1
    assert res.stderr.startswith("error: cannot upgrade database postgresql+psycopg://")
    assert "Traceback" not in res.stderr


def test_concurrent_upgrades_of_one_postgresql_database(tmp_path: Path, pg_url: str) -> None:
    config = config_for(tmp_path, pg_url)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ldct_node.cli", "db", "upgrade", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    created = [out for out, _err in outputs if "empty database" in out]
    assert len(created) == 1, outputs  # the others waited on the lock, then found it done
    assert state_of(pg_url) == (head_revision(), [])


def test_the_baseline_revision_is_the_legacy_schema(tmp_path: Path) -> None:
    # Stamping 0.1 databases with BASELINE_REVISION is right only if that revision
    # builds the same tables: compare both SQLite schemas column by column.
    legacy = sqlite_url(tmp_path / "a")
    load_legacy_schema(legacy)
    migrated = sqlite_url(tmp_path / "b")
    db = Database(migrated)
    try:
        from alembic import command

        from ldct_node.store.migrate import alembic_config

        with db.engine.begin() as conn:
            command.upgrade(alembic_config(conn), BASELINE_REVISION)
    finally:
        db.close()

    def columns(url: str) -> dict[str, list[tuple[str, str, bool]]]:
        engine = Database(url).engine
        insp = inspect(engine)
        out = {
            t: [(c["name"], str(c["type"]), bool(c["nullable"])) for c in insp.get_columns(t)]
            for t in ("series", "instance", "job", "forward")
        }
        engine.dispose()
        return out

    assert columns(legacy) == columns(migrated)
