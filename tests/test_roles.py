"""``serve --role``: what a restarting node takes back, and what each role starts."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from _net_util import node_settings
from _node_util import cli

from ldct_node.service.node import Node
from ldct_node.store import Database, JobState, ReceivedInstance
from ldct_node.store.migrate import upgrade


def _queue_and_claim(db: Database, owners: list[str]) -> dict[str, int]:
    for i, _ in enumerate(owners):
        uid = f"1.2.{i + 1}"
        db.record_instance(
            ReceivedInstance(
                sop_instance_uid=f"{uid}.1",
                series_instance_uid=uid,
                study_instance_uid="1.2",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=Path(f"/spool/{uid}.dcm"),
            ),
            ["denoised"],
        )
    db.promote_stable_series(stable_seconds=0)
    held = {}
    for owner in owners:
        job = db.claim_next_job(owner, lease_seconds=600)
        assert job is not None
        held[owner] = job.id
    return held


def test_a_restarting_node_takes_back_only_jobs_of_dead_workers(tmp_path: Path) -> None:
    # Weights are not needed: a receiver loads no model.
    settings = node_settings(tmp_path, model={"weights_dir": "no-such-weights"})
    host = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    try:
        held = _queue_and_claim(db, [f"{host}:{alive.pid}", f"{host}:{gone.pid}", "other-host:1"])
        node = Node(settings, role="receiver")
        node.start()
        try:
            assert node.server is not None and node.worker is None
            assert node.cascade is None  # no model in a receiver
        finally:
            node.stop()
        states = {owner: db.get_job(job_id).state for owner, job_id in held.items()}
        assert states == {
            f"{host}:{alive.pid}": JobState.RUNNING,  # a live worker on this host
            f"{host}:{gone.pid}": JobState.QUEUED,  # the previous, dead process
            "other-host:1": JobState.RUNNING,  # elsewhere, lease still valid
        }
    finally:
        alive.kill()
        alive.wait()
        db.close()


def test_serve_refuses_an_unknown_role(tmp_path: Path) -> None:
    res = cli("serve", "--role", "scheduler", "--config", tmp_path / "missing.toml")
    assert res.returncode == 2
    assert "--role: expected one of all, receiver, worker, got 'scheduler'" in res.stderr
