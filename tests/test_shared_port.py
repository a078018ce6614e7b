"""``node.reuse_port``: several receivers of one host listen on one port (SO_REUSEPORT)
and the kernel spreads associations across them; they share the job table and spool.

Real parts: two receiver nodes (``Node(role="receiver")``, each with its own server
socket, database engine and spool object), DCMTK ``storescu`` as the senders, a real
SQLite file. Everything listens on 127.0.0.1 and is stopped by the test.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from _dicom_util import make_ct_series
from _net_util import free_port, node_settings
from _node_util import echo_ok, needs_storescp, storescu

from ldct_node.config import Settings
from ldct_node.service.netguard import GuardedAssociationServer
from ldct_node.service.node import Node, NodeStartError
from ldct_node.store import Database, JobState
from ldct_node.store.migrate import upgrade

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT on this system"
)


def _settings(tmp_path: Path, port: int, *, reuse_port: bool = True) -> Settings:
    # A receiver loads no model: the weights are never looked at.
    return node_settings(
        tmp_path,
        node={"port": port, "reuse_port": reuse_port},
        model={"weights_dir": "no-such-weights"},
    )


@contextmanager
def _receiver(settings: Settings) -> Iterator[Node]:
    node = Node(settings, role="receiver")
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _accepted(node: Node) -> int:
    return cast(GuardedAssociationServer, node.server).accepted


@needs_storescp
def test_two_receivers_share_one_port_and_one_job_table(tmp_path: Path) -> None:
    port = free_port()
    settings = _settings(tmp_path, port)
    upgrade(settings.database_url)
    series = [make_ct_series(tmp_path, n=4, size=16, subdir=f"s{k}", seed=k) for k in range(4)]
    with _receiver(settings) as first, _receiver(settings) as second:
        assert first.server is not None and second.server is not None
        # New connections land on either listener (the kernel hashes each one): of 24,
        # all on one would happen once in 2**23 runs.
        for _ in range(20):
            assert echo_ok(port, "LDCT_NODE")
        with ThreadPoolExecutor(4) as pool:
            results: list[Any] = list(pool.map(lambda files: storescu(port, *files), series))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        counts = (_accepted(first), _accepted(second))
        assert sum(counts) == 24 and min(counts) > 0, counts
    db = Database(settings.database_url)
    try:
        jobs = db.list_jobs()
        assert len(jobs) == 4
        assert all(j.state == JobState.RECEIVING and j.source_instances == 4 for j in jobs)
    finally:
        db.close()


def test_a_receiver_without_reuse_port_cannot_take_a_shared_port(tmp_path: Path) -> None:
    """Both sides must set it: a node without ``node.reuse_port`` refuses to start on a
    port shared ones hold (and the other way round), naming the port as in use."""
    port = free_port()
    shared = _settings(tmp_path, port)
    upgrade(shared.database_url)
    alone = _settings(tmp_path, port, reuse_port=False)
    with _receiver(shared), pytest.raises(NodeStartError, match="in use"):
        Node(alone, role="receiver").start()  # fails before it creates anything
    with _receiver(alone), pytest.raises(NodeStartError, match="in use"):
        Node(shared, role="receiver").start()
