"""The receiving DICOM service: C-ECHO and C-STORE SCP (pynetdicom).

Each C-STORE is answered only after the instance is durably in the spool and recorded
in the job database, so a success status means nothing can be lost::

    Affected SOP Instance UID a valid UID?  no -> 0x0117 (invalid object instance)
    free space >= storage.min_free_gb?      no -> 0xA700 (nothing written)
    spool.stage(bytes as received)          tmp/ file written, its fsync under way
    header parses (no pixel decoding)?      no -> 0xC210  \
    SOP/Series/Study UIDs present?          no -> 0xC212   | a refusal removes
    SOP class/instance match the request?   no -> 0xA900 / 0xC213  / the tmp/ file
    staged.file_as (fsync done, renamed)    (an existing file is kept, the copy dropped)
    db.record_instance                      already recorded (same SOP UID)? -> 0x0000
      (commits once the folder's fsync,     (idempotent) else recorded -> 0x0000
       started by file_as, is done)

The bytes are stored exactly as received (file meta built from the negotiated
presentation context + the dataset bytes), whatever the transfer syntax; decoding
happens in the worker. Instances that are not to be processed (localizers, derived or
our own output, see :func:`ldct_node.dicom.io.processing_skip_reason`) are stored with
their skip reason and create no job; so are those of a series that no ``[[outputs]]``
profile applies to (:mod:`ldct_node.service.routing`: calling AE, SeriesDescription and
ConvolutionKernel filters), logged once per series by UID and sender. Jobs are created
only for the profiles that apply. SOP classes not in ``series.accept_sop_classes``
are not negotiated, so the association rejects their presentation contexts.

Access control: ``security.allowed_hosts`` (checked at accept: a peer outside it is
disconnected before a byte is read), ``security.allowed_calling_aets`` (A-ASSOCIATE-RJ
permanent, service user, "calling AE title not recognised", 0x03),
``security.require_called_aet`` (the called AE title must be ``node.ae_title``, else
A-ASSOCIATE-RJ reason 0x07) and DICOM TLS with ``security.tls_cert``/``tls_key``
(``tls_ca``: client certificates required). Connections that have not yet sent a
complete association request are bounded in number and time, apart from the
established associations (:mod:`ldct_node.service.netguard`), and so are PDU lengths.

A C-STORE request whose Affected SOP Instance UID is empty or breaks the UID rules
(``.``, ``..``, empty components, other than digits and dots, over 64 characters) is
answered 0x0117 (invalid object instance); everything from the network that is logged
goes through :func:`ldct_node.service.netguard.printable`.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from ldct_node.config import SecuritySettings, Settings
from ldct_node.dicom.header import VRS_THAT_ALWAYS_DECODE, header_tags, read_header
from ldct_node.dicom.io import (
    POSITION_KEYWORDS,
    SKIP_CHECK_KEYWORDS,
    processing_skip_reason,
    slice_position,
)
from ldct_node.service.monitoring import INSTANCES_RECEIVED
from ldct_node.service.netguard import (
    INVALID_OBJECT_INSTANCE as INVALID_OBJECT_INSTANCE,
)
from ldct_node.service.netguard import (
    GuardedAssociationServer,
    GuardSettings,
    install_log_filter,
    peer_label,
    printable,
    valid_uid,
)
from ldct_node.service.pdata import IncomingStore
from ldct_node.service.routing import ROUTING_KEYWORDS, matching_profiles
from ldct_node.service.spool import Spool
from ldct_node.store import Database, ReceivedInstance

logger = logging.getLogger(__name__)

# -- DIMSE statuses returned by the C-STORE handler --------------------------------------
SUCCESS = 0x0000
#: Refused: out of resources (spool below ``storage.min_free_gb``); the sender retries.
OUT_OF_RESOURCES = 0xA700
#: Error: the dataset's SOPClassUID differs from the request's Affected SOP Class UID.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Error: cannot understand, the dataset could not be parsed.
CANNOT_UNDERSTAND = 0xC210
#: Error: an unexpected failure on our side (logged); the instance was not accepted.
INTERNAL_ERROR = 0xC211
#: Error: SOPInstanceUID, SeriesInstanceUID or StudyInstanceUID missing or invalid.
MISSING_UIDS = 0xC212
#: Error: the dataset's SOPInstanceUID differs from the request's Affected SOP Instance UID.
SOP_INSTANCE_MISMATCH = 0xC213
# INVALID_OBJECT_INSTANCE (0x0117, imported from netguard, which answers it before the
# handler when it can): the request's Affected SOP Instance UID is empty or not a UID.

#: Skip reason of instances whose series no ``[[outputs]]`` profile applies to.
NO_MATCHING_PROFILE = "no output profile applies (routing filters)"


#: Transfer syntaxes accepted for storage, stored as received (never transcoded here).
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old devices)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, non-hierarchical (process 14)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (lossless only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
VERIFICATION_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")

ACSE_TIMEOUT_S = 30.0
DIMSE_TIMEOUT_S = 60.0
NETWORK_TIMEOUT_S = 60.0
#: Largest P-DATA PDU we accept; bigger PDUs mean fewer round trips per instance.
MAX_PDU_BYTES = 262_144


@dataclass
class AssociationStats:
    """Counters of one association, logged when it closes."""

    stored: int = 0
    duplicates: int = 0
    skipped: int = 0
    refused: int = 0
    failed: int = 0


@dataclass
class ReceiverContext:
    """What the DIMSE handlers need; bound to them at registration."""

    settings: Settings
    db: Database
    spool: Spool
    _stats: dict[int, AssociationStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _unrouted: dict[str, None] = field(default_factory=dict)

    @property
    def profiles(self) -> list[str]:
        return [profile.name for profile in self.settings.outputs]

    def first_unrouted(self, series_uid: str) -> bool:
        """True the first time (in a while) ``series_uid`` matched no output profile."""
        with self._lock:
            if series_uid in self._unrouted:
                return False
            self._unrouted[series_uid] = None
            while len(self._unrouted) > 1000:  # bounded: forget the oldest
                del self._unrouted[next(iter(self._unrouted))]
            return True

    def stats(self, assoc: Any) -> AssociationStats:
        with self._lock:
            return self._stats.setdefault(id(assoc), AssociationStats())

    def pop_stats(self, assoc: Any) -> AssociationStats | None:
        with self._lock:
            return self._stats.pop(id(assoc), None)


# --------------------------------------------------------------------------------------
# Header parsing (no pixel data, no PHI leaves this module)
# --------------------------------------------------------------------------------------


class _RefusedError(Exception):
    """A C-STORE refused with a specific status (internal control flow)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _uid(ds: Dataset, keyword: str) -> str:
    raw = ds.get(keyword, "")
    value = raw.strip(" \x00") if isinstance(raw, str) else ""
    if not valid_uid(value):
        raise _RefusedError(
            MISSING_UIDS, f"{keyword} missing, not a UID or longer than 64 characters"
        )
    return value


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _value_may_fail(elem: DataElement | RawDataElement) -> bool:
    vr = elem.VR
    if vr is None:  # implicit VR: the dictionary's
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:  # private or unknown: UN, kept as bytes
            return False
    return vr not in VRS_THAT_ALWAYS_DECODE


#: Every header element :func:`_store` reads, itself or through the skip check, the
#: routing and the slice position: what the fast header read hands over.
_HEADER_TAGS = header_tags(
    (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "InstanceNumber",
        *SKIP_CHECK_KEYWORDS,
        *ROUTING_KEYWORDS,
        *POSITION_KEYWORDS,
    )
)


def _read_header(data: bytes, incoming: IncomingStore | None = None) -> Dataset:
    """The header of a received instance (``data``: preamble, file meta, data set).

    With ``incoming``, its data set is read by :func:`ldct_node.dicom.header.read_header`
    (the elements :data:`_HEADER_TAGS`, every element checked): 1.05 -> 0.3 ms of CPU
    an instance. A data set that reader does not take is read by pydicom, which
    decides whether it can be decoded.
    """
    if incoming is not None:
        fast = read_header(incoming.dataset, incoming.transfer_syntax, _HEADER_TAGS)
        if fast is not None:
            return fast
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
        # pydicom decodes lazily: decode now whatever can fail to, so that a corrupt
        # value is refused here (0xC210) and not met later by the routing or the
        # worker. Skipping text and bytes, which always decode, halves the time (1.98
        # -> 0.99 ms for a CT header on the 2-core EPYC).
        for elem in ds.elements():
            if _value_may_fail(elem):
                _ = ds[elem.tag].value
    except Exception as exc:
        raise _RefusedError(
            CANNOT_UNDERSTAND, f"unparseable dataset ({type(exc).__name__})"
        ) from exc
    return ds


# --------------------------------------------------------------------------------------
# DIMSE handlers
# --------------------------------------------------------------------------------------


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always success."""
    return SUCCESS


def handle_store(event: evt.Event, ctx: ReceiverContext) -> int:
    """C-STORE through pynetdicom (what the direct path leaves to it): as
    :func:`store_instance`."""
    request = cast(C_STORE, event.request)
    incoming = IncomingStore(
        sop_class=str(request.AffectedSOPClassUID or "").strip(" \x00"),
        sop_instance=str(request.AffectedSOPInstanceUID or "").strip(" \x00"),
        transfer_syntax=str(event.context.transfer_syntax),
        dataset=cast(BytesIO, request.DataSet).getvalue(),
    )
    return store_instance(ctx, event.assoc, incoming)


def store_instance(ctx: ReceiverContext, assoc: Any, incoming: IncomingStore) -> int:
    """C-STORE: spool durably, record, then answer (see the module docstring).

    Called in the association's DUL thread for the requests it reads itself
    (:class:`ldct_node.service.netguard.GuardedAssociationServer`'s ``direct_store``),
    else by :func:`handle_store`. Never raises: a failure is answered 0xC211.
    """
    stats = ctx.stats(assoc)
    try:
        status, outcome = _store(ctx, assoc, incoming)
    except _RefusedError as exc:
        stats.refused += 1
        INSTANCES_RECEIVED.labels("refused").inc()
        logger.warning(
            "C-STORE from %s refused with 0x%04X: %s",
            _peer(assoc),
            exc.status,
            exc.reason,
        )
        return exc.status
    except Exception as exc:  # never let a handler failure take the server down
        stats.failed += 1
        INSTANCES_RECEIVED.labels("error").inc()
        logger.error(
            "C-STORE from %s failed (%s); answered 0x%04X",
            _peer(assoc),
            type(exc).__name__,
            INTERNAL_ERROR,
        )
        logger.debug("C-STORE failure details", exc_info=True)
        return INTERNAL_ERROR
    if outcome == "duplicate":
        stats.duplicates += 1
    else:
        stats.stored += 1
        if outcome == "skipped":
            stats.skipped += 1
    INSTANCES_RECEIVED.labels(_OUTCOME_LABELS[outcome]).inc()
    return status


_OUTCOME_LABELS = {"stored": "stored", "skipped": "not_processed", "duplicate": "duplicate"}


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, tag, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def part10_header(incoming: IncomingStore) -> bytes:
    """Preamble, ``DICM`` and the file meta of a received instance, as pynetdicom wrote
    them before the node encoded them itself (1.15 -> ~0.05 ms per instance)."""
    elements = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _padded(incoming.sop_class, b"\x00")),
            _element(0x0003, b"UI", _padded(incoming.sop_instance, b"\x00")),
            _element(0x0010, b"UI", _padded(incoming.transfer_syntax, b"\x00")),
            _element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _store(ctx: ReceiverContext, assoc: Any, incoming: IncomingStore) -> tuple[int, str]:
    requested_uid = incoming.sop_instance
    if not valid_uid(requested_uid):
        raise _RefusedError(
            INVALID_OBJECT_INSTANCE,
            f"Affected SOP Instance UID {printable(requested_uid, 70)!r} is not a valid UID",
        )
    # preamble + file meta + dataset bytes as received
    data = part10_header(incoming) + incoming.dataset
    if not ctx.spool.has_space(ctx.settings.storage.min_free_gb, len(data)):
        raise _RefusedError(OUT_OF_RESOURCES, "spool below storage.min_free_gb")

    # The bytes go to the spool's tmp/ first and their fsync runs while the header is
    # parsed and checked (it names the final file); with the folder's fsync under the
    # row's statements (below): 89 -> 116 images/s of 512x512 over one association.
    with ctx.spool.stage(data) as staged:
        ds = _read_header(data, incoming)
        sop_uid = _uid(ds, "SOPInstanceUID")
        series_uid = _uid(ds, "SeriesInstanceUID")
        study_uid = _uid(ds, "StudyInstanceUID")
        sop_class = _uid(ds, "SOPClassUID") if "SOPClassUID" in ds else ""
        requested_class = incoming.sop_class
        if sop_class != requested_class:
            raise _RefusedError(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"dataset SOP class {sop_class or '(none)'} != negotiated "
                f"{printable(requested_class, 70)}",
            )
        if sop_uid != requested_uid:
            raise _RefusedError(SOP_INSTANCE_MISMATCH, "dataset SOPInstanceUID != request's")

        skip_reason = processing_skip_reason(ds, ctx.settings.series)
        calling_aet = str(assoc.requestor.ae_title).strip()
        profiles = ctx.profiles
        if skip_reason is None:
            profiles = [p.name for p in matching_profiles(ds, calling_aet, ctx.settings.outputs)]
            if not profiles:
                skip_reason = NO_MATCHING_PROFILE
                if ctx.first_unrouted(series_uid):
                    logger.info(
                        "series %s from %s matches no output profile (calling AE, "
                        "SeriesDescription or ConvolutionKernel filters): stored, not processed",
                        series_uid,
                        printable(calling_aet) or "?",
                    )
        modality = str(ds.get("Modality", "") or "").strip() or None
        instance_number = _optional_int(ds, "InstanceNumber")
        z_position = slice_position(ds)
        path = staged.file_as(sop_instance_uid=sop_uid, series_instance_uid=series_uid)
    record = ReceivedInstance(
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=incoming.transfer_syntax,
        path=path,
        calling_aet=calling_aet,
        modality=modality,
        instance_number=instance_number,
        z_position=z_position,
        skip_reason=skip_reason,
        size_bytes=len(data),
    )
    # The row's statements run while the rename's folder fsync does; the commit waits.
    if not ctx.db.record_instance(record, profiles, before_commit=staged.wait_durable):
        # Already recorded (a re-send, or a concurrent copy that won): the first one is
        # kept, and a copy filed under another series must not linger unreferenced.
        # There is no lookup before the write: the insert is the duplicate check, and
        # the spool keeps an existing file (nothing written for a same-series re-send).
        known = ctx.db.instance_path(sop_uid)
        if known is not None and known != path:
            ctx.spool.purge_paths([path])
        logger.debug("duplicate SOP instance %s (series %s)", sop_uid, series_uid)
        return SUCCESS, "duplicate"
    logger.debug(
        "stored SOP instance %s series %s%s",
        sop_uid,
        series_uid,
        f" (not processed: {skip_reason})" if skip_reason else "",
    )
    return SUCCESS, ("skipped" if skip_reason else "stored")


def _peer(assoc: Any) -> str:
    return peer_label(assoc)


def handle_rejected(event: evt.Event) -> None:
    primitive = event.assoc.acceptor.primitive
    diagnostic = getattr(primitive, "diagnostic", None)
    logger.info(
        "association from %s rejected (diagnostic %s)",
        _peer(event.assoc),
        "?" if diagnostic is None else f"0x{int(diagnostic):02X}",
    )


def handle_established(event: evt.Event, ctx: ReceiverContext) -> None:
    ctx.stats(event.assoc)
    logger.debug("association from %s established", _peer(event.assoc))


def handle_closed(event: evt.Event, ctx: ReceiverContext) -> None:
    stats = ctx.pop_stats(event.assoc)
    if stats is None:
        return  # never established (rejected or aborted early)
    logger.info(
        "association from %s closed: %d stored (%d not for processing), %d duplicate, "
        "%d refused, %d failed",
        _peer(event.assoc),
        stats.stored,
        stats.skipped,
        stats.duplicates,
        stats.refused,
        stats.failed,
    )


# --------------------------------------------------------------------------------------
# AE, TLS and server
# --------------------------------------------------------------------------------------


def build_ae(settings: Settings) -> AE:
    """The AE: title, association limit, calling-AE allow-list and presentation contexts."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_associations = settings.node.max_associations
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.acse_timeout = ACSE_TIMEOUT_S
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    ae.network_timeout = NETWORK_TIMEOUT_S
    if settings.security.allowed_calling_aets:
        ae.require_calling_aet = [a.strip() for a in settings.security.allowed_calling_aets]
    ae.require_called_aet = settings.security.require_called_aet
    ae.add_supported_context(Verification, list(VERIFICATION_TRANSFER_SYNTAXES))
    for sop_class in dict.fromkeys(settings.series.accept_sop_classes):
        ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
    return ae


class _DeferredHandshakeContext(ssl.SSLContext):
    """Server TLS context whose handshake runs in the association's thread.

    pynetdicom wraps accepted sockets in its accept loop; with the default eager
    handshake a client that connects and stays silent would stall every other
    connection. Deferred, OpenSSL performs the handshake on the first read, inside the
    association's own thread, bounded by the socket timeout.
    """

    socket_timeout: float = NETWORK_TIMEOUT_S

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(self.socket_timeout)
            do_handshake_on_connect = False
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def build_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context from ``[security]``, or None when TLS is off.

    Raises
    ------
    ValueError
        Naming the ``security.tls_*`` key whose file cannot be loaded.
    """
    sec: SecuritySettings = settings.security
    if not sec.tls_enabled:
        return None
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = settings.resolve(sec.tls_cert), settings.resolve(sec.tls_key)
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"security.tls_cert/tls_key: cannot load {cert} / {key}: {exc}") from None
    if sec.tls_ca:
        ca = settings.resolve(sec.tls_ca)
        try:
            context.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"security.tls_ca: cannot load {ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def make_context(settings: Settings, db: Database, spool: Spool) -> ReceiverContext:
    return ReceiverContext(settings=settings, db=db, spool=spool)


def guard_settings(settings: Settings) -> GuardSettings:
    """Admission limits from ``[security]`` (see :mod:`ldct_node.service.netguard`)."""
    sec = settings.security
    return GuardSettings(
        allowed_networks=tuple(ipaddress.ip_network(h, strict=False) for h in sec.allowed_hosts),
        request_timeout_s=sec.association_request_timeout,
        max_pending=sec.max_pending_connections,
        reuse_port=settings.node.reuse_port,
    )


def start_receiver(
    settings: Settings, db: Database, spool: Spool, *, ae: AE | None = None
) -> GuardedAssociationServer:
    """Start the SCP on ``node.host:node.port`` in background threads and return it.

    ``node.port = 0`` binds a free port; read it from ``server.server_address[1]``.
    Stop it with :func:`stop_receiver`.
    """
    install_log_filter("pynetdicom")
    install_log_filter("pydicom")  # quoted element values (silenced by the CLI anyway)
    ae = ae or build_ae(settings)
    ctx = make_context(settings, db, spool)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_ESTABLISHED, handle_established, [ctx]),
        (evt.EVT_CONN_CLOSE, handle_closed, [ctx]),
    ]
    # ae.start_server(block=False) with our server class: make_server, then its thread.
    server = cast(
        GuardedAssociationServer,
        ae.make_server(
            (settings.node.host, settings.node.port),
            ssl_context=build_ssl_context(settings),
            evt_handlers=handlers,
            server_class=GuardedAssociationServer,
            guard=guard_settings(settings),
            direct_store=functools.partial(store_instance, ctx),
        ),
    )
    thread = threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{settings.node.port}", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # where pynetdicom's shutdown() removes it from
    host, port = server.server_address[:2]
    logger.info(
        "listening as %s on %s:%d%s",
        settings.node.ae_title,
        host,
        port,
        " (TLS)" if settings.security.tls_enabled else "",
    )
    return server


def stop_receiver(server: ThreadedAssociationServer, timeout: float = 10.0) -> None:
    """Stop accepting, let running associations finish for ``timeout`` s, abort the rest."""
    server.shutdown()
    associations = list(server.active_associations)
    deadline = time.monotonic() + max(timeout, 0.0)
    for assoc in associations:
        assoc.join(max(deadline - time.monotonic(), 0.0))
    for assoc in associations:
        if assoc.is_alive():
            logger.warning("aborting association from %s at shutdown", _peer(assoc))
            assoc.abort()
    logger.info("receiver stopped")
