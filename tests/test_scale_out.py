"""Scale-out on a real PostgreSQL: two ``serve --role receiver`` and three
``serve --role worker`` processes share one job database and one spool.

DCMTK ``storescu`` processes are the scanners, a DCMTK ``storescp`` that keeps every
reception as its own file (``+uf``) is the PACS, so a series delivered twice shows up
as duplicate SOP instances. Checked:

- a worker killed (SIGKILL) while it holds a job: its lease runs out, another worker
  re-runs the job, and the series is delivered once;
- 20 series sent at once, half to each receiver: every one is claimed exactly once
  (job attempts and the workers' "claimed" log lines), processed by the workers
  between them, and delivered completely with no duplicate instance.

Everything listens on 127.0.0.1; every process is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import pydicom
import pytest
from _dicom_util import make_ct_series
from _net_util import LOOPBACK
from _node_util import REPO, echo_ok, needs_storescp, storescp, storescu, wait_for, write_config

from ldct_node.config import load_settings
from ldct_node.store import Database, JobInfo, JobState

pytestmark = [needs_storescp, pytest.mark.slow]

LEASE_S = 8
N_SERIES = 20
N_WORKERS = 3
START_TIMEOUT_S = 240
JOBS_TIMEOUT_S = 300


@dataclass
class Proc:
    """One ``ldct-node serve --role ...`` subprocess."""

    role: str
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}:{self.process.pid}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        if self.role == "receiver":
            return echo_ok(self.port, "LDCT_NODE")
        return f"ready (role {self.role}" in self.log()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


class Cluster:
    """Starts role processes on one database and spool; stops them all at the end."""

    def __init__(self, root: Path, weights: Path, db_url: str, pacs_port: int) -> None:
        self.root = root
        self.weights = weights
        self.db_url = db_url
        self.pacs_port = pacs_port
        self.spool = root / "spool"
        self.procs: list[Proc] = []

    def start(self, role: str, name: str) -> Proc:
        config = write_config(
            self.root / name,
            self.weights,
            storage={"spool_dir": str(self.spool), "database_url": self.db_url, "min_free_gb": 0},
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": self.pacs_port}
            ],
            worker={"lease_seconds": LEASE_S},
        )
        port = load_settings(config).node.port
        log_path = config.parent / "serve.log"
        log = log_path.open("ab")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ldct_node.cli",
                "serve",
                "--config",
                str(config),
                "--role",
                role,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        proc = Proc(role, name, port, process, log_path, log)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.role})\n{p.log()[-2500:]}" for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def cluster_parts(tmp_path: Path, pg_url: str, untrained_weights: Path) -> Iterator[Any]:
    with storescp(tmp_path / "pacs") as pacs:
        cluster = Cluster(tmp_path, untrained_weights, pg_url, pacs.port)
        db = Database(pg_url)
        try:
            yield cluster, pacs, db
        finally:
            cluster.stop()
            db.close()


def jobs_of(db: Database, series_uid: str) -> list[JobInfo]:
    return [j for j in db.list_jobs() if j.series_instance_uid == series_uid]


def received_sop_uids(pacs_dir: Path) -> Counter[str]:
    """How often the PACS received each SOP instance (one file per reception)."""
    return Counter(
        str(
            pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get(
                "SOPInstanceUID"
            )
        )
        for p in pacs_dir.iterdir()
        if p.is_file()
    )


def test_two_receivers_three_workers_share_one_postgresql(
    tmp_path: Path, cluster_parts: Any
) -> None:
    cluster, pacs, db = cluster_parts
    receivers = [cluster.start("receiver", f"r{i}") for i in range(2)]
    workers = [cluster.start("worker", f"w{i}") for i in range(N_WORKERS)]
    for proc in receivers + workers:
        wait_for(
            proc.ready,
            timeout=START_TIMEOUT_S,
            interval=0.3,
            what=f"{proc.name} to be ready",
            details=cluster.logs,
        )

    # -- a worker dies mid-job ------------------------------------------------------
    victim_files = make_ct_series(tmp_path, n=12, size=128, subdir="victim", seed=99)
    victim_uid = str(pydicom.dcmread(victim_files[0]).SeriesInstanceUID)
    res = storescu(receivers[0].port, *victim_files)
    assert res.returncode == 0, res.stderr

    def running_victim() -> JobInfo | None:
        jobs = jobs_of(db, victim_uid)
        return jobs[0] if jobs and jobs[0].state == JobState.RUNNING else None

    job = wait_for(
        running_victim,
        timeout=120,
        interval=0.02,
        what="a worker to run the job",
        details=cluster.logs,
    )
    holder = next(w for w in workers if w.worker_id == job.worker_id)
    holder.process.kill()
    holder.process.wait(10)
    killed_at = time.monotonic()
    after_kill = db.get_job(job.id)
    if after_kill.state != JobState.RUNNING or after_kill.worker_id != holder.worker_id:
        pytest.fail(f"the job left its worker before the kill (too fast?): {after_kill}")

    def victim_done() -> JobInfo | None:
        current = db.get_job(job.id)
        return current if current.state == JobState.DONE else None

    done = wait_for(
        victim_done, timeout=JOBS_TIMEOUT_S, what="the killed worker's job", details=cluster.logs
    )
    taken_over_after = time.monotonic() - killed_at
    assert done.attempts == 2
    assert done.worker_id != holder.worker_id and done.worker_id in {w.worker_id for w in workers}
    # Nobody took it before the lease ran out: the second claim came at least LEASE_S
    # after the dead worker's last heartbeat (the database's own times; the wall-clock
    # figure above also counts how long before the kill that heartbeat came).
    assert after_kill.heartbeat_at is not None and done.started_at is not None
    assert done.started_at >= after_kill.heartbeat_at + timedelta(seconds=LEASE_S), (
        after_kill.heartbeat_at,
        done.started_at,
    )

    # The dead worker's host restarts it: three live workers again.
    workers.append(cluster.start("worker", "w3"))
    wait_for(
        workers[-1].ready, timeout=START_TIMEOUT_S, interval=0.3, what="w3", details=cluster.logs
    )

    # -- 20 series at once -----------------------------------------------------------
    sources = [
        make_ct_series(tmp_path, n=3, size=32, subdir=f"s{i:02d}", seed=i) for i in range(N_SERIES)
    ]
    series_uids = [str(pydicom.dcmread(files[0]).SeriesInstanceUID) for files in sources]
    with ThreadPoolExecutor(N_SERIES) as pool:
        results = list(
            pool.map(lambda i: storescu(receivers[i % 2].port, *sources[i]), range(N_SERIES))
        )
    assert [r.returncode for r in results] == [0] * N_SERIES, [r.stderr for r in results]

    def all_done() -> list[JobInfo] | None:
        jobs = [j for uid in series_uids for j in jobs_of(db, uid)]
        if len(jobs) == N_SERIES and all(j.state == JobState.DONE for j in jobs):
            return jobs
        return None

    jobs = wait_for(
        all_done, timeout=JOBS_TIMEOUT_S, interval=0.5, what="20 jobs done", details=cluster.logs
    )

    # Exactly once: one claim per job in the table and in the workers' logs ...
    assert all(j.attempts == 1 for j in jobs), [(j.id, j.attempts) for j in jobs if j.attempts != 1]
    claims = Counter(
        int(m.group(1)) for w in workers for m in re.finditer(r"job (\d+) claimed by", w.log())
    )
    assert all(claims[j.id] == 1 for j in jobs), {j.id: claims[j.id] for j in jobs}
    assert claims[job.id] == 2  # the victim: once by the killed worker, once by the heir
    processed_by = Counter(j.worker_id for j in jobs)
    assert len(processed_by) >= 2, processed_by  # the workers shared the load

    # ... and at the PACS: every derived instance of the 21 series, none twice.
    received = received_sop_uids(pacs.directory)
    duplicates = sum(n - 1 for n in received.values())
    expected = {j.derived_series_uid: j.n_instances for j in [*jobs, done]}
    by_series = Counter(
        str(ds.SeriesInstanceUID)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.directory.iterdir())
    )
    assert dict(by_series) == expected
    assert sum(received.values()) == 3 * N_SERIES + 12
    print(
        f"\nscale-out: {N_SERIES + 1} series ({N_SERIES} at once + 1 whose worker was killed), "
        f"{len(receivers)} receivers, {N_WORKERS} live workers (+1 killed); jobs per worker "
        f"{sorted(processed_by.values(), reverse=True)}; {sum(received.values())} instances "
        f"delivered; duplicates found: {duplicates}; killed job taken over after "
        f"{taken_over_after:.1f} s (lease {LEASE_S} s)"
    )
    assert duplicates == 0
    # Every process that was not killed is still up.
    assert all(p.process.poll() is None for p in cluster.procs if p is not holder)
