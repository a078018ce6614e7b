"""Prometheus metrics of the node (``[metrics]``, off by default).

The counters and histograms below live in this module's own registry and are updated
by the receiver, the worker and the forwarder whether or not the endpoint is enabled
(an increment costs nanoseconds). :func:`start_metrics_server` serves them, with job
counts by state read from the job table at each scrape, on ``metrics.host:metrics.port``
at ``/metrics``. Labels carry profile and destination names from the config, never
patient data or UIDs.

=============================================  =============================================
metric                                         meaning
=============================================  =============================================
``ldct_node_instances_received_total``         C-STORE requests answered, by ``outcome``:
                                               stored, not_processed, duplicate, refused,
                                               error
``ldct_node_jobs_processed_total``             derived series written, by ``profile``
``ldct_node_jobs_failed_total``                jobs that ended ``failed``, by ``stage``
                                               (processing, forwarding)
``ldct_node_series_forwarded_total``           derived series delivered, by ``destination``
``ldct_node_instances_forwarded_total``        derived instances delivered, by destination
``ldct_node_forward_errors_total``             failed forward attempts, by destination
``ldct_node_job_processing_seconds``           histogram: claim -> derived series written
``ldct_node_job_latency_seconds``              histogram: claim -> delivered everywhere
``ldct_node_jobs``                             gauge: jobs by ``state`` (from the database)
``ldct_node_intake_commits_total``             the receiver's transactions that recorded
                                               instances of known series (one commit can
                                               hold several associations' instances)
``ldct_node_intake_committed_instances_total`` the instances those transactions recorded
=============================================  =============================================
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ldct_node.config import Settings
from ldct_node.store import Database

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()

#: Seconds; from a fraction of a second (small series on a GPU) to an hour.
_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)

INSTANCES_RECEIVED = Counter(
    "ldct_node_instances_received",
    "C-STORE requests answered, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
JOBS_PROCESSED = Counter(
    "ldct_node_jobs_processed",
    "Jobs whose derived series was written, by output profile",
    ["profile"],
    registry=REGISTRY,
)
JOBS_FAILED = Counter(
    "ldct_node_jobs_failed",
    "Jobs that ended failed, by stage (processing or forwarding)",
    ["stage"],
    registry=REGISTRY,
)
SERIES_FORWARDED = Counter(
    "ldct_node_series_forwarded",
    "Derived series delivered to a destination",
    ["destination"],
    registry=REGISTRY,
)
INSTANCES_FORWARDED = Counter(
    "ldct_node_instances_forwarded",
    "Derived instances delivered to a destination",
    ["destination"],
    registry=REGISTRY,
)
FORWARD_ERRORS = Counter(
    "ldct_node_forward_errors",
    "Failed attempts to send a derived series, by destination",
    ["destination"],
    registry=REGISTRY,
)
JOB_PROCESSING_SECONDS = Histogram(
    "ldct_node_job_processing_seconds",
    "Seconds from a worker claiming a job to its derived series written",
    ["profile"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
JOB_LATENCY_SECONDS = Histogram(
    "ldct_node_job_latency_seconds",
    "Seconds from a worker claiming a job to the job done (delivered everywhere)",
    ["profile"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)


class _JobStateCollector(Collector):
    """``ldct_node_jobs{state=...}`` read from the job table at scrape time."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("ldct_node_jobs", "Jobs by state", labels=["state"])
        try:
            counts = self.db.status_summary().counts
        except Exception as exc:  # a busy or closed database must not break the scrape
            logger.debug("metrics: cannot read job counts: %s", exc)
            return
        for state, count in counts.items():
            family.add_metric([state], float(count))
        yield family


class _IntakeCommitCollector(Collector):
    """The intake's group commit counts (:meth:`ldct_node.store.Database.intake_commits`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        commits, instances = self.db.intake_commits()
        yield CounterMetricFamily(
            "ldct_node_intake_commits",
            "Receiver transactions that recorded instances of known series",
            value=commits,
        )
        yield CounterMetricFamily(
            "ldct_node_intake_committed_instances",
            "Instances recorded by those transactions",
            value=instances,
        )


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`stop` it at shutdown."""

    server: WSGIServer
    thread: threading.Thread
    registry: CollectorRegistry

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


def start_metrics_server(settings: Settings, db: Database) -> MetricsServer:
    """Serve the metrics on ``metrics.host:metrics.port`` (port 0: any free port).

    Raises
    ------
    OSError
        When the address cannot be bound.
    """
    # One registry per server: the shared counters plus this node's job table.
    registry = CollectorRegistry()
    registry.register(_Shared())
    registry.register(_JobStateCollector(db))
    registry.register(_IntakeCommitCollector(db))
    server, thread = start_http_server(
        settings.metrics.port, addr=settings.metrics.host, registry=registry
    )
    running = MetricsServer(server=server, thread=thread, registry=registry)
    host, port = running.address
    logger.info("metrics on http://%s:%d/metrics", host, port)
    return running


class _Shared(Collector):
    """Re-exports the module's counters and histograms into a server's registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
