"""What stands between the network and pynetdicom: connection admission, PDU bounds and
log hygiene for the receiver (:mod:`ldct_node.service.receive`).

pynetdicom offers no hook before an association request is complete, so the node uses
its own server class and adopts pynetdicom's per-connection objects at the narrowest
points::

    accept (listening thread)
      peer in security.allowed_hosts?            no -> socket closed, nothing read
      a pending slot (security.max_pending_connections)?
                                  full -> the oldest pending connection is closed
    pending (own thread; one deadline, security.association_request_timeout, for all):
      TLS handshake (when TLS is on)
      first PDU is an A-ASSOCIATE-RQ?            no -> A-ABORT, closed
      its length <= MAX_ASSOCIATE_RQ_BYTES?      no -> A-ABORT, closed (nothing buffered)
      complete before the deadline?              no -> closed
    association (pynetdicom, the request replayed from what was read):
      node.max_associations, AE titles, presentation contexts: pynetdicom's negotiation
      every PDU <= the node's maximum PDU length? no -> A-ABORT, closed (not buffered)
      a DIMSE message that cannot be decoded      -> A-ABORT (one log line)
      a C-STORE with an invalid Affected SOP Instance UID -> answered 0x0117

An established association's two threads wait instead of polling every millisecond
as pynetdicom's do. Its DUL thread, with nothing to read or send, waits in ``select``
for the peer's next PDU, a primitive its association queues or a stop
(:data:`DUL_IDLE_WAIT_S` at most). Its association thread (the reactor) waits on its
DIMSE message queue, woken by the DUL for each message and each primitive it queues
(release, abort); only its idle timer and a local kill wait for :data:`REACTOR_WAIT_S`.

So strangers only ever hold pending slots, which are bounded in number and in time,
and never the established associations' ``node.max_associations``.

Everything from the network that reaches the log goes through :func:`printable`, and
pynetdicom's own records pass :class:`OneLineLogFilter` (escaped, tracebacks folded
into the line), so one bad PDU is one log line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import re
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ldct_node.service import pdata

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Largest A-ASSOCIATE-RQ PDU accepted, header included (real ones are < 4 KiB).
MAX_ASSOCIATE_RQ_BYTES = 65_536
#: Cap on PDU lengths when the maximum PDU length is 0 ("unlimited" in PS3.8).
MAX_UNLIMITED_PDU_BYTES = 16 << 20
#: PDU header: type (1), reserved (1), length (4, big endian).
PDU_HEADER_BYTES = 6
A_ASSOCIATE_RQ_TYPE = 0x01
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))

# -- A-ABORT (source: service provider) reasons, PS3.8 9.3.8 -------------------------------
ABORT_SOURCE_PROVIDER = 0x02
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06
ABORT_REASON_NOT_SPECIFIED = 0x00

#: Seconds a PDU may take from its first byte to its last (inside an association); also
#: the socket timeout for what pynetdicom sends.
PDU_READ_TIMEOUT_S = 60.0
#: Listen backlog: a burst of connections must not push real senders into SYN retries.
LISTEN_BACKLOG = 128
#: How long the direct C-STORE path waits for the next PDU in its own thread before
#: handing back to pynetdicom's reactor: within a data set, and after a response.
NEXT_FRAGMENT_WAIT_S = 0.05
NEXT_REQUEST_WAIT_S = 0.002
#: How long an association's reactor waits for a DIMSE message (or a wake-up from its
#: DUL) before its other checks; pynetdicom sleeps 1 ms between them.
REACTOR_WAIT_S = 0.05
#: How long an idle established association's DUL thread waits for a PDU, a primitive
#: to send or a stop before it looks again (woken at once by each of them).
DUL_IDLE_WAIT_S = 0.05
#: Seconds an A-ABORT may take to leave before the socket is closed regardless.
ABORT_SEND_TIMEOUT_S = 1.0
#: At most one log line per kind of refusal in this many seconds (the rest are counted).
LOG_INTERVAL_S = 5.0
#: C-CANCEL requests kept per association (as pynetdicom does).
MAX_CANCEL_REQUESTS = 10
#: Longest text taken from the network into one log line.
MAX_LOGGED_CHARS = 128


# --------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------


def printable(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """``value`` as one line of printable ASCII: anything else escaped, at most ``limit``.

    Control characters, ESC, NUL, newlines, backslashes and non-ASCII become ``\\xNN`` /
    ``\\uNNNN`` escapes, so a peer cannot forge log lines or terminal sequences.
    """
    if limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    text = value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)
    out: list[str] = []
    size = 0
    for char in text:
        code = ord(char)
        if 0x20 <= code < 0x7F and char != "\\":
            piece = char
        elif char == "\\":
            piece = "\\\\"
        elif code < 0x100:
            piece = f"\\x{code:02x}"
        else:
            piece = f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
        size += len(piece)
        if size > limit:
            out.append("...")
            break
        out.append(piece)
    return "".join(out)


class OneLineLogFilter(logging.Filter):
    """Makes every record of a (pynetdicom) logger one escaped line.

    The message is rendered and escaped; a traceback is folded into the line as
    ``(ExceptionType: message)``; records that only repeat an exception logged by the
    line before (pynetdicom's ``LOGGER.exception(exc)`` after ``LOGGER.error(...)``)
    are dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_quiet_state, "active", False):
            return False  # the node logs this itself, in one line
        if isinstance(record.msg, BaseException) and record.exc_info:
            return False  # the error line before it already said what happened
        try:
            message = record.getMessage()
        except Exception:  # a malformed format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
        record.msg = printable(message, limit=4 * MAX_LOGGED_CHARS)
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


_FILTER = OneLineLogFilter()
_quiet_state = threading.local()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pynetdicom's records from this thread are dropped meanwhile (the caller logs)."""
    _quiet_state.active = True
    try:
        yield
    finally:
        _quiet_state.active = False


def install_log_filter(root: str = "pynetdicom") -> None:
    """Attach :class:`OneLineLogFilter` to ``root`` and every logger below it (idempotent).

    Logger filters apply only to records of the logger they are attached to, so each
    module logger of pynetdicom gets its own.
    """
    names = [root] + [
        name for name in logging.Logger.manager.loggerDict if name.startswith(root + ".")
    ]
    for name in names:
        target = logging.getLogger(name)
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)


class _Throttle:
    """At most one log line per key every ``interval`` s; the lines skipped are counted."""

    def __init__(self, interval: float = LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.interval) < self.interval:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return
            self._last[key] = now
            skipped = self._skipped.pop(key, 0)
        suffix = f" ({skipped} more like it in the last {self.interval:g} s)" if skipped else ""
        logger.log(level, message + suffix, *args)


_throttle = _Throttle()


# --------------------------------------------------------------------------------------
# Admission before pynetdicom
# --------------------------------------------------------------------------------------


def host_allowed(address: str, networks: tuple[Network, ...]) -> bool:
    """True if ``address`` is in one of ``networks`` (IPv4-mapped IPv6 seen as IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip.version == net.version and ip in net for net in networks)


@dataclass(frozen=True)
class GuardSettings:
    """Admission limits of :class:`GuardedAssociationServer`.

    Parameters
    ----------
    allowed_networks
        Peers allowed to connect; empty = any.
    request_timeout_s
        Deadline (s) for the TLS handshake and the whole A-ASSOCIATE-RQ, from accept.
    max_pending
        Connections that have not yet sent a complete A-ASSOCIATE-RQ, at most.
    max_request_bytes
        Largest A-ASSOCIATE-RQ PDU accepted (header included).
    reuse_port
        Listen with ``SO_REUSEPORT``: other processes of this user may listen on the
        same address, and the kernel spreads new connections across them.
    """

    allowed_networks: tuple[Network, ...] = ()
    request_timeout_s: float = 10.0
    max_pending: int = 64
    max_request_bytes: int = MAX_ASSOCIATE_RQ_BYTES
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s: must be > 0, got {self.request_timeout_s}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending: must be >= 1, got {self.max_pending}")
        if self.max_request_bytes <= PDU_HEADER_BYTES:
            raise ValueError(
                f"max_request_bytes: must be > {PDU_HEADER_BYTES}, got {self.max_request_bytes}"
            )


class _RefusedError(Exception):
    """A pending connection that is closed (the message says why, for the log)."""

    def __init__(self, key: str, reason: str, abort_reason: int | None = None) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason
        self.abort_reason = abort_reason


def _abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason``."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, ABORT_SOURCE_PROVIDER, reason)


def _interrupt(sock: socket.socket) -> None:
    """Wake whatever thread blocks on ``sock`` (it sees end of stream and closes it)."""
    # The plain socket's shutdown, also for an SSLSocket: its own would drop the SSL
    # object under the thread still using it.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _PendingSlots:
    """Connections between accept and a complete A-ASSOCIATE-RQ, oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._sockets: OrderedDict[int, socket.socket] = OrderedDict()
        self.evicted = 0

    def admit(self, sock: socket.socket) -> None:
        """Take a slot for ``sock``; when all are taken, close the oldest pending one."""
        with self._lock:
            while len(self._sockets) >= self.capacity:
                _, victim = self._sockets.popitem(last=False)
                self.evicted += 1
                _interrupt(victim)
            self._sockets[id(sock)] = sock

    def release(self, sock: socket.socket) -> bool:
        """Give the slot of ``sock`` back; False if it was taken away (closed) meanwhile."""
        with self._lock:
            return self._sockets.pop(id(sock), None) is not None

    def close_all(self) -> None:
        with self._lock:
            victims = list(self._sockets.values())
            self._sockets.clear()
        for victim in victims:
            _interrupt(victim)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sockets)


def _recv_exactly(sock: socket.socket, size: int, deadline: float, what: str) -> bytearray:
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(what)
        sock.settimeout(remaining)
        chunk = sock.recv(min(size - len(data), 65_536))
        if not chunk:
            raise ConnectionResetError(what)
        data += chunk
    return data


def read_association_request(
    sock: socket.socket, deadline: float, max_bytes: int = MAX_ASSOCIATE_RQ_BYTES
) -> bytes:
    """TLS handshake (for an SSLSocket) and the whole A-ASSOCIATE-RQ PDU by ``deadline``.

    Raises
    ------
    _RefusedError
        The peer was too slow, closed, or sent something else or something too long;
        nothing beyond the 6-byte header of a wrong or too long PDU is read.
    """
    received = 0
    try:
        if isinstance(sock, ssl.SSLSocket):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TLS handshake")
            sock.settimeout(remaining)  # CPython applies it to the whole handshake call
            sock.do_handshake()
        header = _recv_exactly(sock, PDU_HEADER_BYTES, deadline, "A-ASSOCIATE-RQ header")
        received = len(header)
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            reason = ABORT_UNEXPECTED_PDU if pdu_type in KNOWN_PDU_TYPES else ABORT_UNRECOGNIZED_PDU
            raise _RefusedError(
                "wrong-pdu",
                f"first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                reason,
            )
        if PDU_HEADER_BYTES + length > max_bytes:
            raise _RefusedError(
                "long-request",
                f"A-ASSOCIATE-RQ of {PDU_HEADER_BYTES + length} bytes exceeds {max_bytes}",
                ABORT_INVALID_PARAMETER,
            )
        body = _recv_exactly(sock, length, deadline, "A-ASSOCIATE-RQ")
        received += len(body)
        try:
            # Decoded here so that pynetdicom's association thread never waits for a
            # request that will not come (its ACSE timeout, holding an association slot).
            with _quiet():  # our line below says it, once
                A_ASSOCIATE_RQ().decode(bytes(header + body))
        except Exception as exc:
            raise _RefusedError(
                "bad-request",
                f"A-ASSOCIATE-RQ of {received} bytes cannot be decoded "
                f"({type(exc).__name__}: {printable(exc, 2 * MAX_LOGGED_CHARS)})",
                ABORT_INVALID_PARAMETER,
            ) from None
    except TimeoutError as exc:
        raise _RefusedError("deadline", f"no complete {exc} in time") from None
    except ssl.SSLError as exc:
        why = exc.reason or type(exc).__name__
        raise _RefusedError("tls", f"TLS handshake failed ({why})") from None
    except OSError as exc:
        done = f" after {received} bytes" if received else ""
        raise _RefusedError("closed", f"connection closed{done} ({type(exc).__name__})") from None
    return bytes(header + body)


def set_nodelay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off: a DIMSE response is one small write, and with the
    peer's delayed ACK it would otherwise wait up to ~40 ms before it leaves."""
    with contextlib.suppress(OSError):  # not TCP (e.g. a Unix socket in tests)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def reuse_port_option() -> int:
    """``socket.SO_REUSEPORT``; OSError naming ``node.reuse_port`` where there is none."""
    option = getattr(socket, "SO_REUSEPORT", None)
    if option is None:
        raise OSError("node.reuse_port: this system has no SO_REUSEPORT")
    return int(option)


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission in front (see the module docstring).

    Made by :meth:`pynetdicom.ae.ApplicationEntity.make_server` with ``guard=`` as the
    extra keyword.
    """

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True

    def __init__(
        self,
        *args: Any,
        guard: GuardSettings,
        direct_store: DirectStore | None = None,
        **kwargs: Any,
    ) -> None:
        self.guard = guard
        #: Handles C-STORE requests read by the association's DUL thread itself.
        self.direct_store = direct_store
        self.pending = _PendingSlots(guard.max_pending)
        #: Connections closed at accept because their host is not allowed.
        self.refused_hosts = 0
        #: Connections accepted (whatever came of them).
        self.accepted = 0
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.guard.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, reuse_port_option(), 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept; close a disallowed peer at once; take a pending slot; wrap for TLS."""
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        self.accepted += 1
        if self.guard.allowed_networks and not host_allowed(
            str(address[0]), self.guard.allowed_networks
        ):
            self.refused_hosts += 1
            client.close()
            _throttle.log(
                logging.WARNING,
                "host",
                "connection from %s closed: host not in security.allowed_hosts",
                printable(address[0]),
            )
            raise ConnectionRefusedError("host not allowed")  # socketserver skips it
        set_nodelay(client)
        if self.ssl_context is not None:
            try:
                # Deferred handshake (receive._DeferredHandshakeContext): no I/O here.
                client = self.ssl_context.wrap_socket(client, server_side=True)
            except (OSError, ValueError):
                client.close()
                raise ConnectionAbortedError("TLS wrap failed") from None
        self.pending.admit(client)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the pending phase, then pynetdicom's."""
        sock = cast(socket.socket, request)
        deadline = time.monotonic() + self.guard.request_timeout_s
        refused: _RefusedError | None = None
        try:
            replay = read_association_request(sock, deadline, self.guard.max_request_bytes)
        except _RefusedError as exc:
            refused = exc
        except Exception as exc:  # whatever it is, the slot comes back and one line says it
            refused = _RefusedError("error", f"failed ({type(exc).__name__})")
        if not self.pending.release(sock):
            refused = _RefusedError(
                "evicted", "closed to make room (all security.max_pending_connections taken)"
            )
        if refused is not None:
            self._refuse(sock, client_address, refused)
            return
        try:
            sock.settimeout(PDU_READ_TIMEOUT_S)  # pynetdicom sends; _GuardedDUL reads by deadline
            _GuardedRequestHandler(sock, client_address, self, replay=replay)
        except Exception as exc:
            logger.error(
                "connection from %s failed (%s)", _address(client_address), type(exc).__name__
            )
            logger.debug("connection failure details", exc_info=True)
            self.shutdown_request(sock)

    def _refuse(self, sock: socket.socket, client_address: Any, exc: _RefusedError) -> None:
        if exc.abort_reason is not None:
            try:
                sock.settimeout(ABORT_SEND_TIMEOUT_S)
                sock.sendall(_abort_pdu(exc.abort_reason))
            except OSError:
                pass
        self.shutdown_request(sock)
        _throttle.log(
            logging.WARNING,
            exc.key,
            "connection from %s closed before association: %s",
            _address(client_address),
            exc.reason,
        )

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line instead of socketserver's traceback on stderr; the slot comes back."""
        self.pending.release(cast(socket.socket, request))
        exc = sys.exc_info()[1]
        logger.error("connection from %s failed (%s)", _address(client_address), type(exc).__name__)
        logger.debug("connection failure details", exc_info=True)

    def server_close(self) -> None:
        self.pending.close_all()
        super().server_close()


def _address(client_address: Any) -> str:
    try:
        return f"{printable(client_address[0])}:{int(client_address[1])}"
    except (TypeError, ValueError, IndexError):
        return printable(client_address)


# --------------------------------------------------------------------------------------
# pynetdicom's per-connection objects, adopted
# --------------------------------------------------------------------------------------


class _GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, given the A-ASSOCIATE-RQ already read."""

    def __init__(
        self, request: socket.socket, client_address: Any, server: Any, *, replay: bytes
    ) -> None:
        self._replay = replay
        super().__init__(request, client_address, server)

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom builds these inside Association() and _create_association()
        # without a hook; they are adopted as the subclasses below before the
        # association's threads start (the subclasses add behaviour, no state layout).
        cast(Any, assoc.dul).__class__ = _GuardedDUL
        cast(_GuardedDUL, assoc.dul).direct_store = getattr(self.server, "direct_store", None)
        cast(Any, assoc.dimse).__class__ = _GuardedDIMSE
        cast(_GuardedDUL, assoc.dul).adopt(cast(_GuardedDIMSE, assoc.dimse).wake_reactor)
        dul_socket = cast(AssociationSocket, assoc.dul.socket)
        dul_socket.__class__ = _ReplaySocket
        cast(_ReplaySocket, dul_socket).replay = bytearray(self._replay)
        return assoc


class _ReplaySocket(AssociationSocket):
    """Serves the pre-read A-ASSOCIATE-RQ before reading from the socket."""

    replay: bytearray

    @property
    def ready(self) -> bool:
        if getattr(self, "replay", None):
            return True
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        return self.recv_by(nr_bytes, time.monotonic() + PDU_READ_TIMEOUT_S)

    def recv_by(self, nr_bytes: int, deadline: float) -> bytearray:
        """``nr_bytes`` (fewer if the peer closed) by ``deadline``, else TimeoutError.

        The bytes are received into one buffer of the PDU's size (``nr_bytes`` is
        bounded by the PDU limit before a body is read), not appended chunk by chunk.
        """
        replay = getattr(self, "replay", None)
        data = bytearray(nr_bytes)
        got = 0
        if replay:
            got = min(len(replay), nr_bytes)
            data[:got] = replay[:got]
            del replay[:got]
        sock = self.socket
        if sock is not None:
            view = memoryview(data)
            try:
                while got < nr_bytes:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("PDU")
                    sock.settimeout(remaining)
                    n = sock.recv_into(view[got:])
                    if not n:
                        break
                    got += n
            finally:
                view.release()  # before the buffer may be shortened below
                with contextlib.suppress(OSError):  # closed meanwhile: the read's error counts
                    sock.settimeout(PDU_READ_TIMEOUT_S)  # also bounds pynetdicom's sends
        if got < nr_bytes:
            del data[got:]
        return data


#: Stores one C-STORE request read on the direct path; returns the response status.
#: Must not raise (it answers an internal error itself).
DirectStore = Callable[[Association, pdata.IncomingStore], int]


@dataclass
class _Incoming:
    """A C-STORE request on the direct path whose data set is still arriving."""

    context_id: int
    transfer_syntax: str
    request: pdata.StoreRequest
    fragments: list[memoryview] = field(default_factory=list)


def peer_label(assoc: Association) -> str:
    """``AE@address:port`` of the requestor, escaped for the log."""
    requestor = assoc.requestor
    title = printable(str(requestor.ae_title or "").strip()) or "?"
    return f"{title}@{printable(requestor.address)}:{requestor.port}"


class _GuardedDUL(DULServiceProvider):
    """Reads a PDU only if it fits the node's maximum PDU length; one log line per bad PDU.

    With a :data:`DirectStore` bound, a well-formed C-STORE request (its command set in
    one PDU of its own, then the data set's fragments) is handled in this, the DUL's
    thread: the handler runs as soon as the last fragment is read and the response is
    written straight to the socket, which only this thread reads and writes. Through
    pynetdicom's state machine, queues and its association thread, which polls every
    millisecond, the same request took ~6 ms more per 512x512 slice. Everything else
    (C-ECHO, a command split over PDUs, an invalid Affected SOP Instance UID, release
    and abort) goes through pynetdicom as before.
    """

    direct_store: DirectStore | None = None
    _incoming: _Incoming | None = None
    #: Wakes this thread's idle wait: (read end, write end), from adopt() until it ends.
    _waker: tuple[socket.socket, socket.socket] | None = None

    def adopt(self, wake_reactor: Callable[[], None]) -> None:
        """Set up the idle waits, before the threads start (see the module docstring):
        each primitive this DUL queues for its association wakes the association's
        reactor; each one the association queues for the peer wakes this thread."""
        self.to_user_queue = _WakingQueue(wake_reactor)
        self.to_provider_queue = _WakingQueue(self._wake)
        read_end, write_end = socket.socketpair()
        read_end.setblocking(False)
        write_end.setblocking(False)
        self._waker = (read_end, write_end)

    def run(self) -> None:
        try:
            super().run()
        finally:
            waker, self._waker = self._waker, None
            for end in waker or ():
                end.close()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
                waker[1].send(b"\0")

    def _is_transport_event(self) -> bool:
        self._wait_while_idle()
        return bool(super()._is_transport_event())

    def _wait_while_idle(self) -> None:
        """Block until the peer sends, the association queues a primitive or this thread
        is stopped (at most DUL_IDLE_WAIT_S): only on an established association with
        nothing under way, where pynetdicom would sleep 1 ms and look again."""
        if (
            self._waker is None
            or self._kill_thread
            or self._incoming is not None
            or self.state_machine.current_state != "Sta6"
            or not self.to_provider_queue.empty()
            or not self.event_queue.empty()
        ):
            return
        self._readable_within(DUL_IDLE_WAIT_S)

    def _readable_within(self, wait: float) -> bool:
        """Whether the socket has data now or within ``wait`` s; a wake-up (a primitive
        queued, a stop) ends the wait early. A closed socket is left to pynetdicom's
        own check, which reports it."""
        sock = cast(_ReplaySocket, self.socket)
        if sock.ready:
            return True
        raw = sock.socket
        if raw is None:
            return False
        waker = self._waker
        watched = [raw] if waker is None else [raw, waker[0]]
        try:
            readable, _, _ = select.select(watched, [], [], wait)
        except (OSError, ValueError):
            return False
        if waker is not None and waker[0] in readable:
            with contextlib.suppress(OSError):
                while waker[0].recv(4096):
                    pass
        return raw in readable

    def _take_p_data(self, body: bytearray) -> bool:
        """Handle a P-DATA-TF PDU on the direct path; False: leave it to pynetdicom."""
        try:
            items = pdata.pdv_items(body)
        except ValueError:
            if self._incoming is None:
                return False  # pynetdicom's decoding refuses it (A-ABORT)
            return self._abort_direct("malformed P-DATA-TF in a C-STORE data set")
        incoming = self._incoming
        if incoming is None:
            return self._start(items)
        for i, (context_id, control, fragment) in enumerate(items):
            if control & pdata.COMMAND or context_id != incoming.context_id:
                return self._abort_direct("a C-STORE data set was interrupted by another message")
            incoming.fragments.append(fragment)
            if control & pdata.LAST:
                if i != len(items) - 1:
                    return self._abort_direct("data after the end of a C-STORE data set")
                self._incoming = None
                self._complete(incoming)
        return True

    def _start(self, items: list[tuple[int, int, memoryview]]) -> bool:
        """Take a C-STORE request's command set, when it is one whole PDV we can serve."""
        if len(items) != 1 or self.assoc.dimse.message is not None:
            return False
        context_id, control, fragment = items[0]
        if control != pdata.COMMAND | pdata.LAST:
            return False
        try:
            request = pdata.decode_c_store_rq(bytes(fragment))
        except ValueError:
            return False
        context = self.assoc._accepted_cx.get(context_id)
        if request is None or context is None or not valid_uid(request.sop_instance):
            return False  # pynetdicom answers or refuses it (0x0117 for a bad UID)
        self._incoming = _Incoming(context_id, str(context.transfer_syntax[0]), request)
        return True

    def _complete(self, incoming: _Incoming) -> None:
        request = incoming.request
        store = pdata.IncomingStore(
            sop_class=request.sop_class,
            sop_instance=request.sop_instance,
            transfer_syntax=incoming.transfer_syntax,
            dataset=b"".join(incoming.fragments),
        )
        incoming.fragments.clear()
        handler = cast(DirectStore, self.direct_store)
        status = handler(self.assoc, store)
        response = pdata.encode_c_store_rsp(
            request.message_id, request.sop_class, request.sop_instance, status
        )
        fragment = pdata.fragment_size(self.assoc.requestor.maximum_length)
        sock = cast(AssociationSocket, self.socket)
        for pdu in pdata.p_data_pdus(
            incoming.context_id, pdata.COMMAND, memoryview(response), fragment, last=True
        ):
            sock.send(pdu)  # a failure puts Evt17: the connection is closed

    def _abort_direct(self, why: str) -> bool:
        self._incoming = None
        logger.warning("association from %s aborted: %s", peer_label(self.assoc), why)
        self.event_queue.put("Evt19")  # invalid PDU: A-ABORT, then closed
        return True

    def _pdu_limit(self) -> int:
        if self.state_machine.current_state in ("Sta1", "Sta2"):
            return MAX_ASSOCIATE_RQ_BYTES - PDU_HEADER_BYTES
        return int(self.assoc.acceptor.maximum_length or MAX_UNLIMITED_PDU_BYTES)

    def _abort_and_close(self, reason: int) -> None:
        sock = cast(AssociationSocket, self.socket)
        if sock.socket is not None:
            try:
                sock.socket.settimeout(ABORT_SEND_TIMEOUT_S)
                sock.socket.sendall(_abort_pdu(reason))
            except OSError:
                pass
        sock.close()  # Evt17: the state machine aborts the association and closes

    def _too_slow(self) -> None:
        logger.warning(
            "association from %s aborted: no complete PDU within %g s",
            peer_label(self.assoc),
            PDU_READ_TIMEOUT_S,
        )
        self._abort_and_close(ABORT_REASON_NOT_SPECIFIED)

    def _receive(self, sock: _ReplaySocket, n_bytes: int, deadline: float) -> bytearray | None:
        """Up to ``n_bytes`` by ``deadline``; None when the read failed and the association
        is already being ended (too slow: aborted; a socket error: closed)."""
        try:
            data = sock.recv_by(n_bytes, deadline)
        except TimeoutError:
            self._too_slow()
            return None
        except OSError:
            self.event_queue.put("Evt17")
            return None
        return data

    def _read_pdu_data(self) -> None:
        # pynetdicom's reactor sleeps 1 ms after a read that queued no event, as the
        # direct path's do: while its C-STORE goes on, the next PDU is read here.
        while self._read_one_pdu() and self._next_pdu_is_near():
            pass

    def _next_pdu_is_near(self) -> bool:
        """Whether the next PDU is readable soon: within 50 ms in the middle of a data
        set, 2 ms after a response (the sender's turnaround); not when the reactor has
        something to send or is told to stop."""
        if self._kill_thread or not self.to_provider_queue.empty():
            return False
        wait = NEXT_FRAGMENT_WAIT_S if self._incoming is not None else NEXT_REQUEST_WAIT_S
        return self._readable_within(wait)

    def _read_one_pdu(self) -> bool:
        """Read one PDU; True when the direct path consumed it."""
        sock = cast(_ReplaySocket, self.socket)
        if self.state_machine.current_state == "Sta13":
            sock.close()  # we have aborted: nothing the peer still sends matters
            return False
        # One deadline for the whole PDU (a trickling peer cannot stretch it per read).
        deadline = time.monotonic() + PDU_READ_TIMEOUT_S
        header = self._receive(sock, PDU_HEADER_BYTES, deadline)
        if header is None:
            return False
        if len(header) < PDU_HEADER_BYTES:
            self.event_queue.put("Evt17")  # closed by the peer
            return False
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in KNOWN_PDU_TYPES:
            logger.warning(
                "association from %s aborted: unknown PDU type 0x%02X",
                peer_label(self.assoc),
                pdu_type,
            )
            self._abort_and_close(ABORT_UNRECOGNIZED_PDU)
            return False
        limit = self._pdu_limit()
        if length > limit:
            logger.warning(
                "association from %s aborted: PDU of type 0x%02X claims %d bytes, "
                "more than the maximum %d",
                peer_label(self.assoc),
                pdu_type,
                length,
                limit,
            )
            self._abort_and_close(ABORT_INVALID_PARAMETER)
            return False
        body = self._receive(sock, length, deadline)
        if body is None:
            return False
        if len(body) != length:
            self.event_queue.put("Evt17")
            return False
        if (
            pdu_type == pdata.P_DATA_TF
            and self.direct_store is not None
            and self.state_machine.current_state == "Sta6"
            and self._take_p_data(body)
        ):
            return True
        self._incoming = None  # a release or abort ends a data set still arriving
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            logger.warning(
                "association from %s aborted: PDU of type 0x%02X cannot be decoded (%s)",
                peer_label(self.assoc),
                pdu_type,
                type(exc).__name__,
            )
            self.event_queue.put("Evt19")  # invalid PDU: A-ABORT
            return False
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)
        return False


#: C-STORE status: the Affected SOP Instance UID is empty or breaks the UID rules.
INVALID_OBJECT_INSTANCE = 0x0117
C_STORE_RQ_COMMAND = 0x0001
MAX_UID_CHARS = 64
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def valid_uid(value: str) -> bool:
    """True if ``value`` is a UID: digits in dot-separated non-empty components, <= 64
    characters. Lenient on leading zeros (old devices write them), strict on the rest:
    no ``.``, ``..``, empty or non-numeric components."""
    return len(value) <= MAX_UID_CHARS and _UID_RE.fullmatch(value) is not None


class _WakingQueue(queue.Queue[Any]):
    """The DUL's queue of primitives for its association; each one put wakes the
    association's reactor (an A-RELEASE-RQ is answered without waiting for a poll)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


#: Put on the DIMSE message queue to wake the reactor; never a message.
_WAKE: tuple[None, None] = (None, None)


class _GuardedDIMSE(DIMSEServiceProvider):
    """Turns complete DIMSE messages into requests, as pynetdicom does, except that

    - a message that cannot be decoded aborts the association with one log line
      (pynetdicom's would end the DUL thread with a traceback, or log several lines);
    - a C-STORE request whose Affected SOP Instance UID is empty or invalid is answered
      :data:`INVALID_OBJECT_INSTANCE` (pynetdicom drops it unanswered, or aborts).
    """

    def wake_reactor(self) -> None:
        """Make the reactor's wait for a message return now (see :meth:`get_msg`)."""
        self.msg_queue.put(_WAKE)

    def get_msg(self, block: bool = False) -> Any:
        """The next message; the reactor's non-blocking call waits up to
        :data:`REACTOR_WAIT_S` (or a wake-up, which returns no message)."""
        if not block:
            try:
                return self.msg_queue.get(timeout=REACTOR_WAIT_S)
            except queue.Empty:
                return None, None
        while True:  # an acceptor never blocks here; skip wake-ups if one ever does
            item = super().get_msg(block=True)
            if item is not _WAKE:
                return item

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
        message = self.message
        try:
            with _quiet():
                complete = message.decode_msg(primitive, self.assoc)
        except Exception as exc:
            self._abort(f"undecodable DIMSE message ({type(exc).__name__})")
            return
        if not complete:
            return
        self.message = None
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        context_id = cast(int, message.context_id)
        command = message.command_set
        if command.get("CommandField") == C_STORE_RQ_COMMAND and not valid_uid(
            str(command.get("AffectedSOPInstanceUID", "") or "").strip(" \x00")
        ):
            self._refuse_store(command, context_id)
            return
        try:
            with _quiet():
                request = message.message_to_primitive()
        except Exception as exc:
            self._abort(f"invalid DIMSE message ({type(exc).__name__})")
            return
        if isinstance(request, C_CANCEL) and len(self.cancel_req) < MAX_CANCEL_REQUESTS:
            self.cancel_req[cast(int, request.MessageIDBeingRespondedTo)] = request
        else:
            self.msg_queue.put((context_id, cast(Any, request)))

    def _abort(self, why: str) -> None:
        logger.warning("association from %s aborted: %s", peer_label(self.assoc), why)
        self.dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT, then closed

    def _refuse_store(self, command: Any, context_id: int) -> None:
        message_id = command.get("MessageID")
        if message_id is None or context_id not in self.assoc._accepted_cx:
            self._abort("C-STORE request without a message ID or accepted context")
            return
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = int(message_id)
        sop_class = str(command.get("AffectedSOPClassUID", "") or "").strip(" \x00")
        if valid_uid(sop_class):
            rsp.AffectedSOPClassUID = sop_class
        rsp.Status = INVALID_OBJECT_INSTANCE
        logger.warning(
            "C-STORE from %s refused with 0x%04X: Affected SOP Instance UID %r is not a UID",
            peer_label(self.assoc),
            INVALID_OBJECT_INSTANCE,
            printable(command.get("AffectedSOPInstanceUID", ""), 70),
        )
        self.send_msg(rsp, context_id)
