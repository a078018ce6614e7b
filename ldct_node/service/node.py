"""The node process: receiver + scheduler + worker + forwarder (``ldct-node serve``).

Roles (``serve --role``): ``all`` runs everything in one process; ``receiver`` runs the
C-STORE/C-ECHO receiver with the stability sweep and the retention purge; ``worker``
runs the job loop (claim, denoise, forward) with forward retries. Any number of each
may share one database (PostgreSQL for several hosts) and one spool; every role also
re-queues jobs whose worker's lease expired.

Start-up order (each step is safe to repeat after a crash, and while other processes
use the same database):

1. check, creating nothing, that the spool and the database can be written, the
   ports bound and the weights found (:mod:`ldct_node.service.preflight`);
2. worker roles: load the cascade once (``model.*``, weights from ``model.weights_dir``,
   by default the bundled ones);
3. bring the schema up to date (Alembic, :func:`ldct_node.store.migrate.upgrade`);
4. re-queue jobs whose worker is gone: leases that expired, and jobs held by a
   process of this host that no longer exists (the previous run of this node);
5. remove half-written temporary files from the spool (``clean_tmp``; when the spool
   may be shared, only files older than an hour, so as not to cut others' writes);
6. start the C-STORE/C-ECHO receiver, the metrics endpoint (``[metrics] enabled``),
   the scheduler and the worker thread, per role.

Shutdown (SIGTERM or SIGINT, or :meth:`Node.request_stop`): stop accepting
associations (running ones get a few seconds to finish), tell the worker to stop (a
running job goes back to ``queued`` at its next batch boundary), interrupt a forward in
progress (it stays pending), stop the scheduler and close the database. Nothing lives
only in memory, so even a SIGKILL loses no accepted instance: the next start
re-queues what was running.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from pynetdicom.transport import ThreadedAssociationServer

from ldct_node.choices import Role
from ldct_node.config import Settings
from ldct_node.model.cascade import Cascade
from ldct_node.service.forward import Forwarder
from ldct_node.service.identity import default_worker_id, is_dead_local_worker
from ldct_node.service.monitoring import MetricsServer, start_metrics_server
from ldct_node.service.preflight import start_checks
from ldct_node.service.receive import start_receiver, stop_receiver
from ldct_node.service.scheduler import DUTIES, NodeScheduler
from ldct_node.service.spool import Spool
from ldct_node.service.worker import Worker
from ldct_node.store import Database, open_database
from ldct_node.store.migrate import UpgradeResult, upgrade

logger = logging.getLogger(__name__)

#: Seconds running associations get to finish at shutdown before they are aborted.
RECEIVER_STOP_TIMEOUT_S = 10.0
#: Seconds to wait for the worker to reach a batch boundary at shutdown.
WORKER_STOP_TIMEOUT_S = 120.0
#: What each ``serve --role`` runs: (receiver, worker, scheduler duties).
ROLES: dict[Role, tuple[bool, bool, tuple[str, ...]]] = {
    Role.ALL: (True, True, DUTIES),
    Role.RECEIVER: (True, False, ("stability", "purge", "stale")),
    Role.WORKER: (False, True, ("forward", "stale")),
}
#: Temporary spool files younger than this may belong to another live process.
SHARED_TMP_GRACE_S = 3600.0


class NodeStartError(RuntimeError):
    """The node cannot start (e.g. its port is taken); the message says why.

    ``config_problem``: fixing it takes a change to the config or the machine (a path
    that cannot be written, missing weights), not a later retry.
    """

    def __init__(self, message: str, *, config_problem: bool = False) -> None:
        super().__init__(message)
        self.config_problem = config_problem


class Node:
    """One node process.

    Parameters
    ----------
    settings
        The validated configuration.
    cascade
        Already loaded networks (tests); default: loaded from ``settings.model`` at
        :meth:`start` (worker roles only).
    role
        ``all``, ``receiver`` or ``worker`` (a :class:`~ldct_node.choices.Role`; see
        :data:`ROLES`).
    """

    def __init__(
        self, settings: Settings, *, cascade: Cascade | None = None, role: str = "all"
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
        self.settings = settings
        self.role = Role(role)
        self.worker_id = default_worker_id()
        self.migration: UpgradeResult | None = None
        self.cascade = cascade
        self.db: Database | None = None
        self.spool: Spool | None = None
        self.worker: Worker | None = None
        self.forwarder: Forwarder | None = None
        self.scheduler: NodeScheduler | None = None
        self.server: ThreadedAssociationServer | None = None
        self.metrics: MetricsServer | None = None
        self._worker_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopped = False

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the receiver listens on (the real port when configured as 0)."""
        if self.server is None:
            raise RuntimeError("the node is not started")
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Prepare storage, load the model and start every component.

        Raises
        ------
        ldct_node.model.manifest.WeightsError
            When the weights cannot be loaded (nothing is listening then).
        NodeStartError
            When the port cannot be bound.
        """
        settings = self.settings
        receives, works, duties = ROLES[self.role]
        # Before anything is created or loaded: a failed start leaves nothing behind.
        failed = [c for c in start_checks(settings, receives=receives, works=works) if not c.ok]
        if failed:
            raise NodeStartError(
                "; ".join(f"{c.name}: {c.detail}" for c in failed),
                config_problem=any(not c.name.endswith("port") for c in failed),
            )
        if self.cascade is None and works:
            self.cascade = Cascade.load(
                settings.weights_path,
                batch_size=settings.model.batch_size,
                device=settings.model.device,
                precision=settings.model.precision,
                memory_budget_mb=settings.model.memory_budget_mb,
            )
            self.cascade.warm_up()
        self.db = open_database(settings, create=False)
        self.migration = upgrade(self.db)
        self.spool = Spool(settings.spool_path)
        # Jobs and forward claims of dead processes (logged); live ones keep theirs.
        owners = self.db.running_owners() | self.db.forward_claim_owners()
        dead = {w for w in owners if is_dead_local_worker(w)}
        self.db.requeue_owned_by(dead)
        self.db.release_forward_claims(dead)
        self.db.requeue_expired()
        alone = self.role == "all" and self.db.engine.dialect.name == "sqlite"
        self.spool.clean_tmp(older_than_seconds=0.0 if alone else SHARED_TMP_GRACE_S)
        self.forwarder = Forwarder(settings, self.db, owner=self.worker_id)
        if works and self.cascade is not None:
            self.worker = Worker(
                settings, self.db, self.spool, self.cascade, worker_id=self.worker_id
            )
        self.scheduler = NodeScheduler(
            settings,
            self.db,
            self.spool,
            self.forwarder,
            on_queued=self.worker.wake if self.worker is not None else None,
            duties=duties,
        )
        if self.worker is not None:
            self.worker.on_forwarding = self.scheduler.wake_forward
        try:
            if receives:
                try:
                    self.server = start_receiver(settings, self.db, self.spool)
                except OSError as exc:
                    where = f"{settings.node.host}:{settings.node.port}"
                    raise NodeStartError(
                        f"cannot listen on {where}: {exc.strerror or exc} (node.host / node.port)"
                    ) from exc
            if settings.metrics.enabled:
                try:
                    self.metrics = start_metrics_server(settings, self.db)
                except OSError as exc:
                    where = f"{settings.metrics.host}:{settings.metrics.port}"
                    raise NodeStartError(
                        f"cannot serve metrics on {where}: {exc.strerror or exc} "
                        "(metrics.host / metrics.port)"
                    ) from exc
            self.scheduler.start()
            if self.worker is not None:
                self._worker_thread = threading.Thread(
                    target=self.worker.run_forever, name="worker", daemon=True
                )
                self._worker_thread.start()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "node %s ready (role %s, worker id %s): model %s, %d output profile(s), "
            "%d destination(s)",
            settings.node.ae_title,
            self.role,
            self.worker_id,
            self.cascade.model_version if self.cascade is not None else "not loaded",
            len(settings.outputs),
            len(settings.destinations),
        )

    def request_stop(self) -> None:
        """Ask :meth:`wait` to return (safe from signal handlers and other threads)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested; True if it was (False on timeout)."""
        return self._stop.wait(timeout)

    def stop(self) -> None:
        """Shut every component down in order (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        logger.info("shutting down")
        if self.worker is not None:
            self.worker.stop()  # early: the running job checks this between batches
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.server is not None:
            stop_receiver(self.server, timeout=RECEIVER_STOP_TIMEOUT_S)
        if self._worker_thread is not None:
            self._worker_thread.join(WORKER_STOP_TIMEOUT_S)
            if self._worker_thread.is_alive():
                logger.warning(
                    "worker still busy after %g s; its job is re-queued at the next start",
                    WORKER_STOP_TIMEOUT_S,
                )
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.metrics is not None:
            self.metrics.stop()
        if self.db is not None:
            self.db.close()
        logger.info("stopped")

    def serve_forever(self, on_ready: Callable[[Node], None] | None = None) -> None:
        """Start, run until SIGTERM/SIGINT, shut down cleanly. Call from the main thread.

        Parameters
        ----------
        on_ready
            Called once everything is started (e.g. to print the address).
        """
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self.start()
            if on_ready is not None:
                on_ready(self)
            while not self.wait(1.0):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            logger.info("%s received; already shutting down", name)
            return
        logger.info("%s received; shutting down", name)
        self.request_stop()
