"""C-STORE on the wire without pynetdicom's message path: P-DATA-TF PDUs and the
C-STORE command sets, encoded and decoded here, for both sides of the node.

Sending (:class:`DirectStoreSender`): pynetdicom handed each PDU of a C-STORE to its
reactor thread through two queues and its state machine, and its response back the
same way: the forwarder reached 0.21 x DCMTK ``storescu`` to ``storescp``. Once
pynetdicom has negotiated a plain TCP association, the sender writes the request itself
(the command set, Implicit VR Little Endian, PS3.7 section 9.3.1.1, then the stored
file's dataset bytes, fragmented to the peer's maximum PDU length, PS3.8 section 9.3.5)
and reads the response from the socket, with pynetdicom's reactor kept off it
meanwhile. Only for plain TCP: an ``ssl.SSLSocket`` must not be read by one thread
while another writes it, so TLS associations keep pynetdicom's path.

Receiving: :mod:`ldct_node.service.netguard` reads PDUs in the association's own
thread and uses :func:`pdv_items`, :func:`decode_c_store_rq`,
:func:`encode_c_store_rsp` and :func:`p_data_pdus` to serve C-STOREs there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset

logger = logging.getLogger(__name__)

#: PDU type of P-DATA-TF (PS3.8 table 9-22).
P_DATA_TF = 0x04
#: Message control header bits (PS3.8 annex E.2).
COMMAND = 0x01
LAST = 0x02
#: Fragment size when the peer sets no maximum PDU length (0 means unlimited).
_UNLIMITED_FRAGMENT = 1 << 20
#: The 6 bytes of a PDU header and the 6 of its PDV item header (length, context, flags).
_PDU_HEADER = struct.Struct(">BBIIBB")
#: C-STORE-RQ command field and "a data set follows" (PS3.7 table E.1-1).
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_DATA_SET_PRESENT = 0x0000
_NO_DATA_SET = 0x0101
_PRIORITY_MEDIUM = 0x0000
#: Data read from the file per system call; fragments are cut from it.
_READ_BLOCK = 4 << 20
#: How long a response may take where the association sets no DIMSE timeout.
DEFAULT_RESPONSE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class StoredInstance:
    """A Part 10 file as it can be sent without decoding it.

    Attributes
    ----------
    path
        The file.
    sop_class, sop_instance, transfer_syntax
        From its file meta information.
    offset
        Where its dataset starts (after the preamble and the file meta).
    """

    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    offset: int


def read_stored(path: Path) -> StoredInstance | None:
    """The file meta of ``path`` and where its dataset starts; None when the meta lacks
    the SOP class, instance or transfer syntax (such a file is decoded to be sent).

    Raises
    ------
    OSError, ValueError
        The file cannot be read or is not DICOM.
    """
    try:
        meta, offset = split_dataset(path)
    except (KeyError, TypeError, AttributeError, EOFError) as exc:
        raise ValueError(f"{path}: not a DICOM file ({exc})") from None
    try:
        return StoredInstance(
            path=path,
            sop_class=str(meta.MediaStorageSOPClassUID),
            sop_instance=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax=str(meta.TransferSyntaxUID),
            offset=offset,
        )
    except AttributeError:
        return None


def fragment_size(maximum_length: int | None) -> int:
    """The largest fragment one P-DATA-TF PDU can carry to a peer whose maximum PDU
    length is ``maximum_length`` (0 or None: no limit, fragments of 1 MiB)."""
    maximum = int(maximum_length or 0)
    # A PDV item is its 4-byte length, the context ID, the control byte and the
    # fragment; the peer's maximum counts the PDU's variable field, the PDV item.
    return maximum - 6 if maximum > 6 else _UNLIMITED_FRAGMENT


def p_data_pdus(
    context_id: int, flags: int, data: memoryview, fragment: int, *, last: bool
) -> Iterator[bytes]:
    """``data`` as P-DATA-TF PDUs of one PDV item each, at most ``fragment`` bytes of
    it per PDU; ``flags`` is :data:`COMMAND` or 0, and the last fragment is marked
    :data:`LAST` when ``last``."""
    n = len(data)
    for start in range(0, max(n, 1), fragment):
        chunk = data[start : start + fragment]
        control = flags | (LAST if last and start + fragment >= n else 0)
        yield (
            _PDU_HEADER.pack(P_DATA_TF, 0, len(chunk) + 6, len(chunk) + 2, context_id, control)
            + chunk
        )


def pdv_items(body: bytes | bytearray) -> list[tuple[int, int, memoryview]]:
    """The PDV items of a P-DATA-TF PDU's variable field: (context ID, message control
    header, fragment) each.

    Raises
    ------
    ValueError
        An item's length runs past the PDU or is below 2, or the PDU has no item.
    """
    view = memoryview(body)
    items = []
    pos = 0
    while pos < len(view):
        if pos + 6 > len(view):
            raise ValueError("truncated PDV item")
        (length,) = struct.unpack_from(">I", view, pos)
        if length < 2 or pos + 4 + length > len(view):
            raise ValueError("bad PDV item length")
        items.append((view[pos + 4], view[pos + 5], view[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    if not items:
        raise ValueError("no PDV item")
    return items


def _element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of group 0000."""
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _command_set(*elements: bytes) -> bytes:
    """Command elements behind their (0000,0000) Command Group Length."""
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def encode_c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """The command set of a C-STORE request, Implicit VR Little Endian.

    Raises
    ------
    ValueError
        ``message_id`` is not 0-65535, or a UID is not ASCII.
    """
    if not 0 <= message_id <= 0xFFFF:
        raise ValueError(f"message_id: {message_id} is not 0-65535")
    return _command_set(
        _element(0x0002, _uid(sop_class)),
        _element(0x0100, _us(_C_STORE_RQ)),
        _element(0x0110, _us(message_id)),
        _element(0x0700, _us(_PRIORITY_MEDIUM)),
        _element(0x0800, _us(_DATA_SET_PRESENT)),
        _element(0x1000, _uid(sop_instance)),
    )


def encode_c_store_rsp(message_id: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    """The command set of a C-STORE response, Implicit VR Little Endian (PS3.7 9.3.1.2)."""
    return _command_set(
        _element(0x0002, _uid(sop_class)),
        _element(0x0100, _us(_C_STORE_RSP)),
        _element(0x0120, _us(message_id)),
        _element(0x0800, _us(_NO_DATA_SET)),
        _element(0x0900, _us(status)),
        _element(0x1000, _uid(sop_instance)),
    )


@dataclass(frozen=True)
class StoreRequest:
    """What a C-STORE request's command set says (the UIDs without padding)."""

    message_id: int
    sop_class: str
    sop_instance: str


def decode_c_store_rq(command: bytes) -> StoreRequest | None:
    """The C-STORE request in ``command``; None when it is another command, has no data
    set, or lacks a message ID, SOP class or SOP instance UID.

    Raises
    ------
    ValueError
        The command set is malformed.
    """
    values = _command_values(command)
    field, message_id = _us_value(values, 0x0100), _us_value(values, 0x0110)
    data_set_type = _us_value(values, 0x0800)
    sop_class, sop_instance = values.get(0x0002), values.get(0x1000)
    if field != _C_STORE_RQ or message_id is None or data_set_type in (None, _NO_DATA_SET):
        return None
    if sop_class is None or sop_instance is None:
        return None
    try:
        return StoreRequest(
            message_id=message_id,
            sop_class=sop_class.decode("ascii").strip(" \0"),
            sop_instance=sop_instance.decode("ascii").strip(" \0"),
        )
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class IncomingStore:
    """A C-STORE request as it came off the wire, for the storage SCP's handler.

    Attributes
    ----------
    sop_class, sop_instance
        The request's Affected SOP Class and Instance UIDs (padding stripped).
    transfer_syntax
        Of the presentation context it came on.
    dataset
        The data set bytes as received.
    """

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset: bytes


@dataclass(frozen=True)
class StoreResponse:
    """The peer's C-STORE response: its status code and error comment (may be empty)."""

    status: int
    comment: str


def _plain_socket(assoc: Association) -> socket.socket | None:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if type(sock) is socket.socket:
        return sock
    return None


def _command_values(command: bytes) -> dict[int, bytes]:
    """The elements of an Implicit VR Little Endian group-0000 command set, by element.

    Raises
    ------
    ValueError
        An element runs past the end, or is not in group 0000.
    """
    values: dict[int, bytes] = {}
    pos = 0
    while pos < len(command):
        if pos + 8 > len(command):
            raise ValueError("command set: truncated element header")
        group, element, length = struct.unpack_from("<HHI", command, pos)
        pos += 8
        if group != 0x0000 or pos + length > len(command):
            raise ValueError(f"command set: bad element ({group:04X},{element:04X})")
        values[element] = command[pos : pos + length]
        pos += length
    return values


def _us_value(values: dict[int, bytes], element: int) -> int | None:
    """An US element's value; None when it is absent or not 2 bytes long."""
    raw = values.get(element)
    return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None


def decode_c_store_rsp(command: bytes) -> tuple[int, int, str] | None:
    """(message ID responded to, status, error comment) of a C-STORE response command
    set; None when it is another command or lacks those elements."""
    values = _command_values(command)
    responded_to, status = _us_value(values, 0x0120), _us_value(values, 0x0900)
    if _us_value(values, 0x0100) != _C_STORE_RSP or responded_to is None or status is None:
        return None
    comment = values.get(0x0902, b"").decode("ascii", "replace").strip(" \0")
    return responded_to, status, comment


class _NotPDataError(Exception):
    """The next PDU from the peer is not P-DATA-TF (an abort or a release): it is left
    on the socket for pynetdicom. The argument is its type, None: the peer closed."""


#: What an unexpected PDU means, by PDU type (PS3.8 table 9-11).
_PDU_MEANING = {0x05: "the peer asked to release the association", 0x07: "the peer aborted"}


class DirectStoreSender:
    """Sends stored files over an established plain TCP association, one C-STORE at a
    time, and reads the responses itself.

    While it is open, pynetdicom's reactor does not read the socket (it would take the
    responses, through two threads that poll every millisecond: 3.9 ms per response
    here against ~1 ms for the peer to answer); a PDU that is not P-DATA, such as the
    peer's A-ABORT, is left to it. :meth:`close` gives reading back before the
    association is released. Use :meth:`for_association`, which gives None where this
    cannot be used (TLS). The association's DIMSE messages must reach blocking
    ``get_msg`` calls only (``forward._keep_responses_for_the_sender``).
    """

    def __init__(self, assoc: Association, sock: socket.socket) -> None:
        self._assoc = assoc
        self._sock = sock
        self._fragment = fragment_size(assoc.acceptor.maximum_length)
        self._message_id = 0
        self._timeout = float(assoc.dimse_timeout or DEFAULT_RESPONSE_TIMEOUT_S)
        self._owned = False
        self._lock = threading.Lock()
        #: Why the last :meth:`send` got no response, in words.
        self.failure: str | None = None
        dul = assoc.dul
        reactor_check = dul._is_transport_event
        reactor_read = dul._read_pdu_data

        def transport_event() -> bool:
            return False if self._owned else reactor_check()

        def read_pdu() -> None:
            # The reactor may have entered its own check before it was replaced, and
            # find our response readable: the read itself is refused while we own it.
            with self._lock:
                if not self._owned:
                    reactor_read()

        dul._is_transport_event = transport_event  # type: ignore[method-assign]
        dul._read_pdu_data = read_pdu  # type: ignore[method-assign]
        self._restart_idle_timer = dul._idle_timer.restart
        with self._lock:  # a read the reactor had begun ends before this returns
            self._owned = True

    @classmethod
    def for_association(cls, assoc: Association) -> DirectStoreSender | None:
        sock = _plain_socket(assoc)
        return cls(assoc, sock) if sock is not None else None

    def close(self) -> None:
        """Give the socket back to pynetdicom's reactor (to release or abort)."""
        with self._lock:
            self._owned = False

    @contextlib.contextmanager
    def lent_to_pynetdicom(self) -> Iterator[None]:
        """Let pynetdicom read the socket for a message it sends itself."""
        owned = self._owned
        self.close()
        try:
            yield
        finally:
            with self._lock:
                self._owned = owned

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _send_fragments(self, context_id: int, flags: int, data: memoryview, last: bool) -> None:
        for pdu in p_data_pdus(context_id, flags, data, self._fragment, last=last):
            self._sock.sendall(pdu)

    def send(self, instance: StoredInstance, context_id: int) -> StoreResponse | None:
        """C-STORE ``instance``'s dataset bytes with presentation context ``context_id``.

        Returns
        -------
        StoreResponse | None
            The response, or None when none came (aborted, closed or timed out: the
            association is no longer usable).

        Raises
        ------
        OSError
            Reading the file or the socket failed, or the peer sent what is not a
            C-STORE response.
        """
        if not self._owned:
            raise RuntimeError("the sender is closed")
        message_id = self._next_message_id()
        command = encode_c_store_rq(message_id, instance.sop_class, instance.sop_instance)
        self._send_fragments(context_id, COMMAND, memoryview(command), last=True)
        with open(instance.path, "rb", buffering=0) as fp:
            size = os.fstat(fp.fileno()).st_size - instance.offset
            if size <= 0:
                raise OSError(f"{instance.path}: no dataset after the file meta")
            fp.seek(instance.offset)
            # Whole fragments per block, so that only the file's end is a short one.
            block = max(_READ_BLOCK // self._fragment, 1) * self._fragment
            buffer = bytearray(min(block, size))
            sent = 0
            while sent < size:
                n = fp.readinto(buffer)
                if not n:
                    raise OSError(f"{instance.path}: file shrank while being sent")
                n = min(n, size - sent)
                sent += n
                self._send_fragments(context_id, 0, memoryview(buffer)[:n], last=sent >= size)
        try:
            return self._response(message_id)
        except _NotPDataError as exc:
            (pdu_type,) = exc.args
            # pynetdicom reads it: an abort puts (None, None) on the DIMSE queue.
            self.close()
            _, rsp = self._assoc.dimse.get_msg(block=True)
            if rsp is not None:
                return self._pynetdicom_response(rsp, message_id)
            if pdu_type is None:
                self.failure = "the peer closed the connection"
            else:
                self.failure = _PDU_MEANING.get(pdu_type, f"the peer sent a PDU of type {pdu_type}")
            return None

    @staticmethod
    def _pynetdicom_response(rsp: Any, message_id: int) -> StoreResponse | None:
        status = getattr(rsp, "Status", None)
        if getattr(rsp, "MessageIDBeingRespondedTo", None) != message_id or status is None:
            return None
        return StoreResponse(int(status), str(getattr(rsp, "ErrorComment", "") or "").strip())

    def _recv_exact(self, n: int) -> bytes:
        data = bytearray(n)
        view = memoryview(data)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if not k:
                raise ConnectionResetError("the peer closed the connection")
            got += k
        return bytes(data)

    def _next_pdu_header(self) -> bytes:
        """The next PDU's 6-byte header, peeked (left on the socket) until it is known
        to be P-DATA-TF, then read."""
        deadline = time.monotonic() + self._timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no response within the DIMSE timeout ({self._timeout:g} s)")
            readable, _, _ = select.select([self._sock], [], [], left)
            if not readable:
                continue
            head = self._sock.recv(6, socket.MSG_PEEK)
            if not head or head[0] != P_DATA_TF:
                raise _NotPDataError(head[0] if head else None)
            if len(head) == 6:
                return self._recv_exact(6)
            time.sleep(0.0005)  # the rest of the 6 bytes is on its way

    def _read_command(self) -> bytes:
        """The fragments of the next command set from the peer, joined."""
        parts: list[bytes] = []
        while True:
            _, _, length = struct.unpack(">BBI", self._next_pdu_header())
            try:
                items = pdv_items(self._recv_exact(length))
            except ValueError as exc:
                raise OSError(f"malformed P-DATA-TF from the peer: {exc}") from None
            for i, (_, control, fragment) in enumerate(items):
                if not control & COMMAND:
                    raise OSError("the peer sent a data set where a C-STORE response was due")
                parts.append(bytes(fragment))
                if control & LAST:
                    if i != len(items) - 1:
                        raise OSError("malformed P-DATA-TF from the peer: data after the end")
                    return b"".join(parts)

    def _response(self, message_id: int) -> StoreResponse | None:
        while True:
            try:
                command = self._read_command()
            except TimeoutError as exc:
                logger.error("%s; aborting the association", exc)
                self.failure = f"{exc}; the association was aborted"
                self.close()
                self._assoc.abort()
                return None
            self._restart_idle_timer()  # the peer is alive: pynetdicom's network timeout
            try:
                decoded = decode_c_store_rsp(command)
            except ValueError as exc:
                raise OSError(f"malformed response from the peer: {exc}") from None
            if decoded is None or decoded[0] != message_id:
                logger.warning(
                    "ignored a DIMSE message from the peer while waiting for the C-STORE "
                    "response to message %d",
                    message_id,
                )
                continue
            _, status, comment = decoded
            return StoreResponse(status, comment)
