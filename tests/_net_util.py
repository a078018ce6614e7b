"""Helpers for tests that talk DICOM over the loopback interface.

Everything binds to 127.0.0.1 and every blocking call has a timeout, so a broken
peer fails a test instead of hanging it.

- :func:`free_port`: a currently free TCP port on 127.0.0.1.
- :func:`node_settings`: Settings for a node living in ``tmp_path`` (port 0 = any).
- :func:`running_receiver`: the node's SCP with its spool and database, stopped on exit.
- :func:`dcmtk`: run a DCMTK tool (storescu, echoscu, ...) with a timeout.
- :func:`scu_association`: a pynetdicom SCU association, released/aborted on exit.
- :func:`dataset_bytes`: the bytes of a DICOM file after its file meta information.
- :func:`raw_part10`: a Part 10 file from file meta + arbitrary dataset bytes.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import DCMTK_ENV, dcmtk_tool
from _common import stop_process as stop_process

from ldct_node.config import Settings, parse_settings
from ldct_node.service.receive import start_receiver, stop_receiver
from ldct_node.service.spool import Spool
from ldct_node.store import Database

LOOPBACK = "127.0.0.1"
TOOL_TIMEOUT_S = 60
HAVE_STORESCU = all(dcmtk_tool(t) for t in ("storescu", "echoscu"))
needs_dcmtk_net = pytest.mark.skipif(not HAVE_STORESCU, reason="DCMTK storescu/echoscu missing")
HAVE_OPENSSL = shutil.which("openssl") is not None
needs_openssl = pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl CLI missing")


def tls_security(pki: dict[str, Path], *, mutual: bool) -> dict[str, str]:
    """The ``[security]`` section for DICOM TLS with the node's certificate from
    :func:`make_test_pki`; ``mutual`` also requires client certificates from its CA."""
    section = {"tls_cert": str(pki["server_cert"]), "tls_key": str(pki["server_key"])}
    if mutual:
        section["tls_ca"] = str(pki["ca"])
    return section


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for peers that need a number)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def node_settings(tmp_path: Path, **sections: dict[str, Any] | list[Any]) -> Settings:
    """Settings of a test node under ``tmp_path``: 127.0.0.1, any free port, no disk guard.

    ``sections`` override whole config sections, e.g. ``security={...}`` or
    ``outputs=[{"name": "a"}, {"name": "b"}]``; a dict given for ``node``/``storage``
    is merged over the test defaults.
    """
    data: dict[str, Any] = {
        "node": {"host": LOOPBACK, "port": 0},
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.db", "min_free_gb": 0},
    }
    for key, value in sections.items():
        if key in data and isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_settings(data, source="<test>", base_dir=str(tmp_path))


@dataclass
class Node:
    """A running receiver with its settings, database, spool and port."""

    settings: Settings
    db: Database
    spool: Spool
    server: ThreadedAssociationServer

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def ae_title(self) -> str:
        return self.settings.node.ae_title


@contextmanager
def running_receiver(settings: Settings) -> Iterator[Node]:
    """Start the SCP for ``settings`` (fresh schema) and stop it, and the DB, on exit."""
    db = Database(settings.database_url)
    db.create_schema()
    spool = Spool(settings.spool_path)
    server = start_receiver(settings, db, spool)
    try:
        yield Node(settings=settings, db=db, spool=spool, server=server)
    finally:
        stop_receiver(server, timeout=5.0)
        db.close()


def dcmtk(
    tool: str, *args: str | Path, timeout: float = TOOL_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK command line tool (DCMTK's, never a same-named script; with
    TCP_NODELAY=1); never raises on a non-zero exit (check ``returncode``)."""
    cmd = [dcmtk_tool(tool) or tool, *(str(a) for a in args)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, env=DCMTK_ENV
    )


def storescu(
    node: Node, *files: Path, calling_aet: str = "STORESCU", extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Send files (or folders, recursively) to ``node`` with DCMTK storescu."""
    return dcmtk(
        "storescu",
        "-aet",
        calling_aet,
        "-aec",
        node.ae_title,
        "-to",
        "20",
        "-ta",
        "20",
        "-td",
        "20",
        "+sd",
        "+r",
        *extra,
        LOOPBACK,
        str(node.port),
        *files,
    )


@contextmanager
def scu_association(
    port: int,
    contexts: Sequence[str | tuple[str, Sequence[str]]],
    *,
    called_aet: str = "LDCT_NODE",
    calling_aet: str = "PYSCU",
    tls_args: Any = None,
) -> Iterator[Association]:
    """A pynetdicom association to 127.0.0.1:``port`` (not necessarily established).

    ``contexts``: abstract syntax UIDs (default transfer syntaxes) or
    ``(uid, [transfer syntaxes])`` pairs.
    """
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = 10
    ae.dimse_timeout = 20
    ae.network_timeout = 20
    ae.connection_timeout = 10
    for item in contexts:
        if isinstance(item, str):
            ae.add_requested_context(item)
        else:
            ae.add_requested_context(item[0], list(item[1]))
    assoc = ae.associate(LOOPBACK, port, ae_title=called_aet, tls_args=tls_args)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        elif assoc.is_alive():
            assoc.abort()
        ae.shutdown()


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta group (the dataset as encoded)."""
    raw = Path(path).read_bytes()
    if raw[128:132] != b"DICM":
        raise ValueError(f"path: {path} is not a DICOM Part 10 file")
    # (0002,0000) UL, explicit VR LE: tag 4 + VR 2 + length 2 + value 4 bytes.
    if raw[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError(f"path: {path} has no File Meta Information Group Length")
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


def raw_part10(
    path: Path,
    dataset: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str = "1.2.840.10008.1.2.1",
) -> Path:
    """Write a Part 10 file with valid file meta and whatever ``dataset`` bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    encoded = DicomBytesIO()
    write_file_meta_info(encoded, meta)
    Path(path).write_bytes(b"\x00" * 128 + b"DICM" + encoded.getvalue() + dataset)
    return Path(path)


def make_test_pki(folder: Path) -> dict[str, Path]:
    """A throw-away CA with a server and a client certificate (openssl CLI, RSA 2048).

    Returns paths keyed ``ca``, ``server_cert``, ``server_key``, ``client_cert``,
    ``client_key``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    out = {
        "ca": folder / "ca.pem",
        "ca_key": folder / "ca.key",
        "server_cert": folder / "server.pem",
        "server_key": folder / "server.key",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
    }

    def openssl(*args: str | Path) -> None:
        result = subprocess.run(
            ["openssl", *(str(a) for a in args)],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
        "-keyout", out["ca_key"], "-out", out["ca"],
    )  # fmt: skip
    for who in ("server", "client"):
        csr = folder / f"{who}.csr"
        ext = folder / f"{who}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
            "-keyout", out[f"{who}_key"], "-out", csr,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", csr, "-CA", out["ca"], "-CAkey", out["ca_key"],
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", out[f"{who}_cert"],
        )  # fmt: skip
    return out


# ------------------------------------------------------------------ raw DICOM upper layer
# Hand-made PDUs for peers that misbehave (what pynetdicom as an SCU refuses to send).

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq_pdu(
    *,
    called: bytes = b"LDCT_NODE",
    calling: bytes = b"RAWSCU",
    abstract_syntax: str = "1.2.840.10008.1.1",
    transfer_syntax: str = IMPLICIT_VR_LE,
    max_pdu: int = 16_384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU with one presentation context (ID 1); AE titles as given
    (padded to 16 bytes, not validated: control characters go through)."""
    context = (
        bytes([1, 0, 0, 0])
        + _item(0x30, abstract_syntax.encode())
        + _item(0x40, transfer_syntax.encode())
    )
    user_info = _item(0x51, struct.pack(">L", max_pdu))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16, b" ")[:16]
        + calling.ljust(16, b" ")[:16]
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + _item(0x20, context)
        + _item(0x50, user_info)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def p_data_pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of ``(context_id, control header, value)`` PDV items (control:
    bit 0 command, bit 1 last fragment)."""
    items = b"".join(
        struct.pack(">LBB", len(value) + 2, context_id, control) + value
        for context_id, control, value in pdvs
    )
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """(type, body) of the next PDU from ``sock``; (0, b"") when the peer closed."""
    sock.settimeout(timeout)
    header = _read_exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


@contextmanager
def raw_association(
    port: int, *, timeout: float = 10.0, **rq: Any
) -> Iterator[tuple[socket.socket, int]]:
    """A plain TCP connection that has sent :func:`associate_rq_pdu` (``rq``) and read the
    answer: yields the socket and the answer's PDU type (0x02 accepted)."""
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        sock.sendall(associate_rq_pdu(**rq))
        pdu_type, _ = read_pdu(sock, timeout)
        yield sock, pdu_type
    finally:
        sock.close()
