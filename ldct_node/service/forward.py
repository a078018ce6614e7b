"""Sending derived series to the configured ``[[destinations]]`` (C-STORE SCU).

One association per (job, destination) attempt, requesting CT Image Storage (and any
other accepted SOP class the files carry) with Explicit and Implicit VR Little Endian:
the derived files are uncompressed, so every storage SCP can take them. An attempt
succeeds when the peer answers success or a warning (0x0000, 0xB000, 0xB006, 0xB007)
for every instance. A failure status, a missing response or no association at all is
booked with :meth:`ldct_node.store.Database.record_forward_result` together with the
peer's status code and text, and the next attempt is scheduled after
``forward.backoff_seconds``; after ``forward.max_attempts`` failures the job is
``failed`` with that error. A retry resends the whole derived series: its UIDs are
deterministic, so the peer deduplicates what it already has.

With ``tls = true`` the association runs over DICOM TLS (TLS 1.2 or later): the
peer's certificate must verify against the destination's ``tls_ca`` and carry its
``tls_server_name`` (else ``host``, a DNS name or an IP address) as a subject
alternative name; ``tls_cert``/``tls_key`` are presented for mutual TLS. There is no
fallback to plain TCP: a failed handshake is a failed attempt like a refused connection,
booked with what went wrong (certificate not trusted, wrong name, no TLS on that port).

DICOMweb destinations (``type = "dicomweb"``) go through :mod:`ldct_node.service.dicomweb`
(STOW-RS) from the same :func:`send_series` and :class:`Forwarder`, with the same
attempts, backoff and bookkeeping.

:func:`echo` checks a destination with C-ECHO (``ldct-node echo``), over TLS when the
destination uses it; for DICOMweb with an authenticated QIDO-RS request.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from ldct_node.config import CT_IMAGE_STORAGE, Destination, Settings
from ldct_node.service import monitoring
from ldct_node.service.identity import default_worker_id
from ldct_node.service.netguard import set_nodelay
from ldct_node.service.pdata import DirectStoreSender, StoredInstance, StoreResponse, read_stored
from ldct_node.store import Database, ForwardInfo, JobState

logger = logging.getLogger(__name__)


class _ChunkedFileMode:
    """pynetdicom sends a file path's dataset bytes as they are, streamed from disk,
    only while its module-wide ``STORE_SEND_CHUNKED_DATASET`` is on (it reads it when a
    C-STORE starts). It is on while any of our sends runs and back to what it was as
    soon as none does, so that other users of pynetdicom in the process keep their
    setting (by default: decode the file, convert it if needed) between our sends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = False

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = _config.STORE_SEND_CHUNKED_DATASET
            self._users += 1
            _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    _config.STORE_SEND_CHUNKED_DATASET = self._saved


_chunked_file_mode = _ChunkedFileMode()

#: Transfer syntaxes offered for the (uncompressed) derived instances.
SEND_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
CONNECT_TIMEOUT_S = 10.0
ACSE_TIMEOUT_S = 30.0
DIMSE_TIMEOUT_S = 120.0
NETWORK_TIMEOUT_S = 60.0
#: pynetdicom's limit on presentation contexts in one association request.
_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class SendResult:
    """The outcome of one attempt to send a series to one destination.

    Attributes
    ----------
    ok
        Every instance was accepted (success or warning status).
    n_sent
        Instances the peer accepted.
    n_total
        Instances that were to be sent.
    error
        What went wrong (peer status code and meaning, rejection, no connection).
    interrupted
        The attempt was cut short by a shutdown; it does not count as an attempt.
    """

    ok: bool
    n_sent: int
    n_total: int
    error: str | None = None
    interrupted: bool = False


def describe_status(code: int) -> str:
    """``0xA700 (Failure: Refused: Out of Resources)`` for a C-STORE status code."""
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    return f"0x{code:04X} ({category}{': ' + meaning if meaning else ''})"


def _is_accepted(code: int) -> bool:
    return code_to_category(code) in ("Success", "Warning")


def _peer(dest: Destination) -> str:
    if dest.type == "dicomweb":
        return f"{dest.name} ({dest.url})"
    return f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{', TLS' if dest.tls else ''})"


class _RecordingSSLSocket(ssl.SSLSocket):
    """An SSL socket that tells its :class:`_ClientTlsContext` why ``connect`` failed
    (pynetdicom only logs it), and whether the TCP connection itself was made."""

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            context = self.context
            if isinstance(context, _ClientTlsContext):
                context.failure = exc
                # A reset or an SSL error come from a peer we reached (a refused TCP
                # connection is ECONNREFUSED); after a reset getpeername() fails.
                context.tcp_connected = isinstance(exc, _AFTER_CONNECT) or _has_peer(self)
            raise


_AFTER_CONNECT = (ssl.SSLError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def _has_peer(sock: ssl.SSLSocket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class _ClientTlsContext(ssl.SSLContext):
    """The client side of DICOM TLS to one destination, for one attempt."""

    sslsocket_class = _RecordingSSLSocket
    failure: OSError | None = None
    tcp_connected: bool = False


def client_tls_context(dest: Destination) -> ssl.SSLContext:
    """The TLS client context for ``dest`` (DICOM TLS or https): TLS 1.2 or later,
    certificate and host name verified, ``tls_cert``/``tls_key`` loaded when set.

    ``dest``'s paths should be absolute (:meth:`Destination.with_paths_resolved`).
    Without ``tls_ca`` (only allowed for https) the system's trust store is used.

    Raises
    ------
    ValueError
        Naming the destination and the ``tls_*`` key whose file cannot be loaded.
    """
    return _client_tls(dest)


def _client_tls(dest: Destination) -> _ClientTlsContext:
    context = _ClientTlsContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    where = f"destinations {dest.name!r}"
    if dest.tls_ca:
        try:
            context.load_verify_locations(cafile=dest.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{where}: tls_ca: cannot load {dest.tls_ca}: {exc}") from None
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if dest.tls_cert:
        try:
            # An empty passphrase: an encrypted key fails here instead of OpenSSL
            # prompting on a terminal that a service does not have.
            context.load_cert_chain(dest.tls_cert, dest.tls_key, password=b"")
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"{where}: tls_cert/tls_key: cannot load {dest.tls_cert} / {dest.tls_key} "
                f"(PEM, key without passphrase): {exc}"
            ) from None
    return context


def _tls_for(dest: Destination) -> _ClientTlsContext | None:
    """The TLS context of a DIMSE destination (None: plain); ValueError naming the key."""
    return _client_tls(dest) if dest.tls else None


def _make_ae(calling_ae_title: str) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = CONNECT_TIMEOUT_S
    ae.acse_timeout = ACSE_TIMEOUT_S
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    ae.network_timeout = NETWORK_TIMEOUT_S
    return ae


@dataclass
class _Attempt:
    """An association request and what is known about how its connection went."""

    assoc: Association
    connected: threading.Event
    tls: _ClientTlsContext | None


def _connection_opened(event: evt.Event, connected: threading.Event) -> None:
    """TCP is up: Nagle off (each C-STORE request would otherwise wait for the peer's
    delayed ACK of the previous one, up to ~40 ms), the reactor kept off our responses,
    and say so."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        set_nodelay(sock)
    _keep_responses_for_the_sender(event.assoc)
    connected.set()


def _keep_responses_for_the_sender(assoc: Association) -> None:
    """Stop the association's reactor thread from taking DIMSE messages off the queue.

    pynetdicom pauses its reactor around each ``send_c_store`` with a flag that can be
    stale for a moment after the previous send resumed it; under load the reactor then
    takes the C-STORE response itself ("Received unexpected C-STORE service message"),
    the sender waits until the peer drops the association, and the whole series is
    sent again. Only the reactor polls without blocking, and an association of ours
    only sends requests (the peer sends none to serve), so its polls get nothing; the
    senders' blocking reads get every response.
    """
    dimse = assoc.dimse
    get_msg = dimse.get_msg

    def senders_only(block: bool = False) -> Any:
        return get_msg(block=True) if block else (None, None)

    dimse.get_msg = senders_only  # type: ignore[method-assign]


def _associate(ae: AE, dest: Destination, tls: _ClientTlsContext | None) -> _Attempt:
    """Request an association (over TLS when ``tls`` is given; never plain instead)."""
    connected = threading.Event()
    server_name = dest.tls_server_name or dest.host
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: _connection_opened(event, connected))],
        tls_args=(tls, server_name) if tls is not None else None,
    )
    return _Attempt(assoc, connected, tls)


def _tls_failure(dest: Destination, tls: _ClientTlsContext) -> str | None:
    """Why the TLS connection to ``dest`` failed, or None if it was not TLS's fault."""
    exc = tls.failure
    if exc is None or not (tls.tcp_connected or isinstance(exc, ssl.SSLError)):
        return None
    head = f"no association with {_peer(dest)}: TLS handshake failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = str(exc.verify_message or exc.reason or exc).rstrip(".")
        if "hostname" in why.lower() or "ip address" in why.lower():
            hint = f"its certificate is not issued for {dest.tls_server_name or dest.host!r}"
            return f"{head}: {why}; {hint} (set tls_server_name to the name it carries)"
        return f"{head}: its certificate was not accepted ({why}); check tls_ca"
    if isinstance(exc, ssl.SSLError):
        why = str(exc.reason or exc)
        if "ALERT" in why.upper() and "CERTIFICATE" in why.upper():
            return f"{head}: the peer refused our certificate ({why}); check tls_cert/tls_key"
        if "WRONG_VERSION" in why.upper() or "RECORD" in why.upper():
            return f"{head} ({why}): is the destination listening for DICOM TLS on that port?"
        return f"{head}: {why}"
    return (
        f"{head}: {type(exc).__name__}: {exc or 'connection closed'} (the peer closed the "
        "connection: no DICOM TLS on that port, or it refused our certificate)"
    )


def _no_association(attempt: _Attempt, dest: Destination) -> str:
    """Why an association to ``dest`` was not established, in one line."""
    assoc = attempt.assoc
    if not attempt.connected.is_set():
        if attempt.tls is not None:
            tls_reason = _tls_failure(dest, attempt.tls)
            if tls_reason is not None:
                return tls_reason
        return (
            f"no association with {_peer(dest)}: connection refused, unreachable "
            f"or timed out after {CONNECT_TIMEOUT_S:.0f} s"
        )
    if assoc.is_rejected:
        primitive: Any = assoc.acceptor.primitive
        parts = []
        for label, attr in (("result", "result_str"), ("source", "source_str")):
            value = getattr(primitive, attr, None)
            if value:
                parts.append(f"{label} {value}")
        reason = getattr(primitive, "reason_str", None)
        if reason:
            parts.append(f"reason {reason!r}")
        detail = f" ({', '.join(parts)})" if parts else ""
        return f"association rejected by {_peer(dest)}{detail}; check its AE title configuration"
    # With TLS 1.3 the server checks our certificate after the client has finished its
    # handshake: a refusal then shows up as the connection closing during negotiation.
    tls_hint = ""
    if dest.tls and dest.tls_cert:
        tls_hint = " (over TLS: did it refuse our client certificate? check tls_cert/tls_key)"
    elif dest.tls:
        tls_hint = " (over TLS: does it require a client certificate? set tls_cert/tls_key)"
    if assoc.is_aborted:
        return f"no association with {_peer(dest)}: it aborted during negotiation{tls_hint}"
    return f"no association with {_peer(dest)}: no answer to the association request{tls_hint}"


@dataclass(frozen=True)
class _Outgoing:
    """One file to send: its SOP class, and how it is stored when its file meta says."""

    path: Path
    sop_class: str
    stored: StoredInstance | None

    @property
    def encoding(self) -> tuple[str, str] | None:
        if self.stored is None:
            return None
        return (self.stored.sop_class, self.stored.transfer_syntax)


def _outgoing(path: Path) -> _Outgoing:
    """What is known of ``path`` from its file meta (its header where the meta lacks it)."""
    stored = read_stored(path)
    if stored is not None:
        return _Outgoing(path, stored.sop_class, stored)
    header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return _Outgoing(path, str(header.get("SOPClassUID", "") or CT_IMAGE_STORAGE), None)


def _send_one(
    assoc: Association,
    direct: DirectStoreSender | None,
    item: _Outgoing,
    as_stored: dict[tuple[str, str], int],
) -> StoreResponse | None:
    """C-STORE one file; None when no response came.

    Its bytes go as stored where the association has a context for its SOP class and
    transfer syntax (no decoding and encoding again), written straight onto a plain
    TCP socket by :mod:`ldct_node.service.pdata`; else pynetdicom decodes the file and
    encodes it for an accepted context.
    """
    context_id = as_stored.get(item.encoding) if item.encoding is not None else None
    if context_id is not None and item.stored is not None and direct is not None:
        return direct.send(item.stored, context_id)
    with direct.lent_to_pynetdicom() if direct is not None else contextlib.nullcontext():
        if context_id is not None:
            with _chunked_file_mode.on():
                status = assoc.send_c_store(item.path)
        else:
            status = assoc.send_c_store(dcmread(item.path))
    code = status.get("Status") if status else None
    if code is None:
        return None
    return StoreResponse(int(code), str(status.get("ErrorComment", "") or "").strip())


def send_series(
    paths: Sequence[Path],
    destination: Destination,
    *,
    calling_ae_title: str,
    should_stop: Callable[[], bool] | None = None,
) -> SendResult:
    """C-STORE ``paths`` to ``destination`` over ``destination.associations``
    associations at once (one by default), each taking the next file in turn.

    Stops at the first instance the peer refuses (the rest would most likely be
    refused too, e.g. when it is out of space) and reports its status. An association
    beyond the first that the peer does not accept (its limit reached) is done without:
    the others send its share.

    Parameters
    ----------
    paths
        Part 10 files of one derived series.
    destination
        The peer.
    calling_ae_title
        Our AE title (``node.ae_title``).
    should_stop
        Checked before each instance; when it returns True the associations are released
        and the result is ``interrupted``.
    """
    if isinstance(paths, str | Path):
        raise TypeError("paths: expected a sequence of paths, not a single path")
    if not paths:
        raise ValueError("paths: nothing to send")
    if destination.type == "dicomweb":
        from ldct_node.service.dicomweb import send_series as stow_series

        return stow_series(paths, destination, should_stop=should_stop)
    total = len(paths)
    try:
        outgoing = [_outgoing(path) for path in paths]
        classes = list(dict.fromkeys(item.sop_class for item in outgoing))
    except (OSError, ValueError) as exc:
        return SendResult(False, 0, total, f"cannot read derived files: {exc}")
    if len(classes) > _MAX_CONTEXTS:
        return SendResult(False, 0, total, f"{len(classes)} SOP classes in one series")
    try:
        tls = _tls_for(destination)
    except ValueError as exc:
        return SendResult(False, 0, total, str(exc))
    run = _SeriesSend(outgoing, classes, destination, calling_ae_title, tls, should_stop)
    count = min(destination.associations, total)
    if count == 1:
        return run.result([run.over_one_association()])
    first = threading.Thread(target=run.collect, args=(0,), name="send-0", daemon=True)
    first.start()
    # The others are requested once the first is up: a peer whose association limit
    # they would pass then refuses only them, and a peer that refuses the first is
    # answered as with one association.
    run.first_attempted.wait()
    others = [
        threading.Thread(target=run.collect, args=(i,), name=f"send-{i}", daemon=True)
        for i in range(1, count if run.established.is_set() else 1)
    ]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join()
    outcomes = [run.outcomes[i] for i in range(1 + len(others))]
    return run.result(outcomes)


@dataclass(frozen=True)
class _Outcome:
    """How one association of a series' send ended."""

    established: bool
    error: str | None = None
    interrupted: bool = False


class _SeriesSend:
    """One series on its way to one destination: the files left, shared by its
    associations, and what each association's end was."""

    def __init__(
        self,
        outgoing: list[_Outgoing],
        classes: list[str],
        destination: Destination,
        calling_ae_title: str,
        tls: _ClientTlsContext | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.destination = destination
        self.total = len(outgoing)
        self.sent = 0
        self.outcomes: dict[int, _Outcome] = {}
        self._left = list(reversed(outgoing))
        self._classes = classes
        self._calling = calling_ae_title
        self._tls = tls
        self._should_stop = should_stop
        self._lock = threading.Lock()
        self._failed = threading.Event()  # one association failed: the others stop
        #: Set once the first association request has been answered (or has failed).
        self.first_attempted = threading.Event()
        #: Set once an association is established.
        self.established = threading.Event()

    def _next(self) -> _Outgoing | None:
        with self._lock:
            return self._left.pop() if self._left and not self._failed.is_set() else None

    def _done_one(self) -> None:
        with self._lock:
            self.sent += 1

    def collect(self, index: int) -> None:
        """Run :meth:`over_one_association` and keep its outcome (a thread's target)."""
        try:
            outcome = self.over_one_association()
        except Exception as exc:  # a thread must not die silently; report it as a failure
            logger.debug("sending association %d failed", index, exc_info=True)
            outcome = _Outcome(True, f"sending failed: {type(exc).__name__}: {exc}")
        finally:
            self.first_attempted.set()
        self.outcomes[index] = outcome

    def over_one_association(self) -> _Outcome:
        """Open an association and send files from the shared list until none is left,
        one is refused, another association failed, or ``should_stop``."""
        dest = self.destination
        ae = _make_ae(self._calling)
        for sop_class in self._classes:
            ae.add_requested_context(sop_class, list(SEND_TRANSFER_SYNTAXES))
        try:
            attempt = _associate(ae, dest, self._tls)
        except BaseException:
            ae.shutdown()
            raise
        assoc = attempt.assoc
        direct: DirectStoreSender | None = None
        try:
            if assoc.is_established:
                self.established.set()
            self.first_attempted.set()
            if not assoc.is_established:
                return _Outcome(False, _no_association(attempt, dest))
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            as_stored = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id or 0)
                for cx in assoc.accepted_contexts
            }
            missing = [c for c in self._classes if c not in accepted]
            if missing:
                return self._failure(
                    f"{_peer(dest)} does not accept SOP class {missing[0]} "
                    "with an uncompressed little endian transfer syntax"
                )
            direct_tried = False  # None over TLS: pynetdicom's path stays
            while (item := self._next()) is not None:
                if self._should_stop is not None and self._should_stop():
                    return _Outcome(True, "interrupted by shutdown", interrupted=True)
                if not direct_tried and item.encoding in as_stored:
                    direct, direct_tried = DirectStoreSender.for_association(assoc), True
                try:
                    response = _send_one(assoc, direct, item, as_stored)
                except (OSError, ValueError, RuntimeError) as exc:
                    return self._failure(
                        f"cannot send {item.path.name} to {_peer(dest)}: "
                        f"{type(exc).__name__}: {exc}"
                    )
                if response is None:
                    state = "aborted" if assoc.is_aborted else "timed out or was released"
                    why = (direct.failure if direct is not None else None) or (
                        f"the association {state}"
                    )
                    return self._failure(
                        f"no C-STORE response from {_peer(dest)} after {self.sent}/"
                        f"{self.total} instance(s): {why}"
                    )
                if not _is_accepted(response.status):
                    comment = f" {response.comment!r}" if response.comment else ""
                    return self._failure(
                        f"{_peer(dest)} answered C-STORE with "
                        f"{describe_status(response.status)}{comment} after {self.sent}/"
                        f"{self.total} instance(s)"
                    )
                self._done_one()
            return _Outcome(True)
        finally:
            if direct is not None:
                direct.close()
            _close(assoc, ae)

    def _failure(self, error: str) -> _Outcome:
        self._failed.set()
        return _Outcome(True, error)

    def result(self, outcomes: list[_Outcome]) -> SendResult:
        """The series' result from its associations' outcomes (the first one's first)."""
        sent, total = self.sent, self.total
        failures = [o.error for o in outcomes if o.established and o.error and not o.interrupted]
        if failures:
            return SendResult(False, sent, total, failures[0])
        if any(o.interrupted for o in outcomes):
            return SendResult(False, sent, total, "interrupted by shutdown", interrupted=True)
        if not any(o.established for o in outcomes):
            return SendResult(False, sent, total, outcomes[0].error)
        refused = [o for o in outcomes if not o.established]
        if refused:
            logger.info(
                "%s accepted %d of %d associations: sent over fewer (%s)",
                _peer(self.destination),
                len(outcomes) - len(refused),
                len(outcomes),
                refused[0].error,
            )
        if sent != total:  # pragma: no cover - every file is taken until one fails
            return SendResult(False, sent, total, f"{total - sent} instance(s) not sent")
        return SendResult(True, sent, total)


def _close(assoc: Association, ae: AE) -> None:
    """Release an established association (abort a half-open one), then stop the AE."""
    if assoc.is_established:
        assoc.release()
    elif assoc.is_alive():
        assoc.abort()
    ae.shutdown()


def echo(destination: Destination, *, calling_ae_title: str = "LDCT_NODE") -> tuple[bool, str]:
    """C-ECHO ``destination`` (over TLS when it has ``tls = true``); for a DICOMweb
    destination an authenticated QIDO-RS request (:func:`ldct_node.service.dicomweb.echo`).

    Returns
    -------
    tuple[bool, str]
        Whether it answered success, and a one-line message saying what happened.
    """
    if destination.type == "dicomweb":
        from ldct_node.service.dicomweb import echo as qido_echo

        return qido_echo(destination)
    try:
        tls = _tls_for(destination)
    except ValueError as exc:
        return False, str(exc)
    ae = _make_ae(calling_ae_title)
    ae.add_requested_context(Verification, list(SEND_TRANSFER_SYNTAXES))
    started = time.monotonic()
    attempt = _associate(ae, destination, tls)
    assoc = attempt.assoc
    try:
        if not assoc.is_established:
            return False, _no_association(attempt, destination)
        status = assoc.send_c_echo()
        code = status.get("Status") if status else None
        elapsed_ms = (time.monotonic() - started) * 1000.0
        if code is None:
            return False, f"no C-ECHO response from {_peer(destination)}"
        if int(code) != 0:
            return False, f"{_peer(destination)} answered C-ECHO with 0x{int(code):04X}"
        over = ""
        if tls is not None:
            over = " over TLS" + (" with our client certificate" if destination.tls_cert else "")
        return True, f"C-ECHO to {_peer(destination)} succeeded{over} in {elapsed_ms:.0f} ms"
    finally:
        _close(assoc, ae)


def derived_files(output_dir: str | Path) -> list[Path]:
    """The instances of a derived series directory, in name order."""
    return sorted(p for p in Path(output_dir).glob("*.dcm") if p.is_file())


class Forwarder:
    """Sends the due forwards of the job table; one instance per node process.

    :meth:`run_due` is called by the scheduler (periodically and when the worker has
    finished a job); concurrent calls return at once while one is sending. Several
    processes may share the job table: each forward is claimed
    (:meth:`~ldct_node.store.Database.claim_forward`) before it is sent, and the claim is
    renewed while sending, so a series is never sent by two processes at once.

    Parameters
    ----------
    owner
        Names this process in the forward's claim (default ``host:pid``).
    """

    def __init__(self, settings: Settings, db: Database, *, owner: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.owner = owner or default_worker_id()
        self.lease_seconds = settings.worker.lease_seconds
        self._busy = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Make a running :meth:`run_due` stop before its next instance."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_due(self) -> int:
        """Attempt every forward that is due now (each at most once per call).

        Returns
        -------
        int
            The number of attempts made (0 when another call is already sending).
        """
        if not self._busy.acquire(blocking=False):
            return 0
        try:
            tried: set[int] = set()
            while not self._stop.is_set():
                due = [f for f in self.db.due_forwards() if f.id not in tried]
                if not due:
                    break
                for fwd in due:
                    if self._stop.is_set():
                        break
                    tried.add(fwd.id)
                    if not self.db.claim_forward(fwd.id, self.owner, self.lease_seconds):
                        continue  # another process is sending it
                    self.forward(fwd)
            return len(tried)
        finally:
            self._busy.release()

    def forward(self, fwd: ForwardInfo) -> JobState | None:
        """One attempt to send ``fwd``'s derived series; books the result.

        Returns
        -------
        JobState | None
            The job's state afterwards, or None when a shutdown interrupted the attempt
            (nothing booked: the forward stays due).
        """
        max_attempts = self.settings.forward.max_attempts
        try:
            dest = self.settings.destination(fwd.destination)
            dest = dest.with_paths_resolved(self.settings.base_dir)
        except KeyError:
            return self._book(
                fwd,
                SendResult(
                    False,
                    0,
                    fwd.n_instances or 0,
                    f"destination {fwd.destination!r} is no longer configured "
                    "(add it back to [[destinations]], or retry the job to reprocess it "
                    "for the current destinations)",
                ),
                max_attempts=fwd.attempts + 1,
            )
        paths = derived_files(fwd.output_dir) if fwd.output_dir else []
        if not paths or (fwd.n_instances is not None and len(paths) != fwd.n_instances):
            return self._book(
                fwd,
                SendResult(
                    False,
                    0,
                    fwd.n_instances or 0,
                    f"derived files missing in {fwd.output_dir} ({len(paths)} of "
                    f"{fwd.n_instances} found; purged or deleted?): retry the job to "
                    "reprocess the series",
                ),
                max_attempts=fwd.attempts + 1,
            )
        lost = threading.Event()
        renew_every = self.lease_seconds / 4
        last_renewal = time.monotonic()

        def should_stop() -> bool:
            # Keep the claim while sending a long series; stop if it was taken away.
            nonlocal last_renewal
            if time.monotonic() - last_renewal >= renew_every:
                last_renewal = time.monotonic()
                if not self.db.claim_forward(fwd.id, self.owner, self.lease_seconds):
                    lost.set()
            return self._stop.is_set() or lost.is_set()

        result = send_series(
            paths,
            dest,
            calling_ae_title=self.settings.node.ae_title,
            should_stop=should_stop,
        )
        if result.interrupted:
            why = "its claim was lost" if lost.is_set() else "shutdown"
            logger.info(
                "job %d: forward to %s interrupted by %s; it stays pending",
                fwd.job_id,
                fwd.destination,
                why,
            )
            self.db.release_forward(fwd.id, self.owner)
            return None
        return self._book(fwd, result, max_attempts=max_attempts)

    def _book(self, fwd: ForwardInfo, result: SendResult, *, max_attempts: int) -> JobState:
        now = datetime.now(UTC)
        attempt = fwd.attempts + 1
        delay = self.settings.forward.delay_for(attempt)
        if result.ok:
            logger.info(
                "job %d: forwarded derived series %s (%d instance(s)) to %s",
                fwd.job_id,
                fwd.derived_series_uid,
                result.n_sent,
                fwd.destination,
            )
        elif attempt >= max_attempts:
            logger.warning(
                "job %d: forward to %s failed for good (attempt %d/%d): %s",
                fwd.job_id,
                fwd.destination,
                attempt,
                max_attempts,
                result.error,
            )
        else:
            logger.warning(
                "job %d: forward to %s failed (attempt %d/%d), next try in %g s: %s",
                fwd.job_id,
                fwd.destination,
                attempt,
                max_attempts,
                delay,
                result.error,
            )
        state = self.db.record_forward_result(
            fwd.job_id,
            fwd.destination,
            ok=result.ok,
            n_sent=result.n_sent,
            max_attempts=max_attempts,
            error=None if result.ok else result.error,
            next_attempt_at=None if result.ok else now + timedelta(seconds=delay),
            now=now,
        )
        _count(fwd, result, state, self.db, now)
        return state


def _count(
    fwd: ForwardInfo, result: SendResult, state: JobState, db: Database, now: datetime
) -> None:
    """Update the Prometheus metrics after one booked forward attempt."""
    if result.ok:
        monitoring.SERIES_FORWARDED.labels(fwd.destination).inc()
        monitoring.INSTANCES_FORWARDED.labels(fwd.destination).inc(result.n_sent)
    else:
        monitoring.FORWARD_ERRORS.labels(fwd.destination).inc()
    if state == JobState.FAILED:
        monitoring.JOBS_FAILED.labels("forwarding").inc()
    elif state == JobState.DONE:
        job = db.get_job(fwd.job_id)
        if job.started_at is not None:
            seconds = max((now - job.started_at).total_seconds(), 0.0)
            monitoring.JOB_LATENCY_SECONDS.labels(job.profile).observe(seconds)
