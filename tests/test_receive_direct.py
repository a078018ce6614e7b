"""The receiver's direct C-STORE path (netguard._GuardedDUL, issue 18): well-formed
requests are stored and answered in the DUL thread; everything else still goes through
pynetdicom. Real associations on 127.0.0.1: DCMTK storescu and raw PDUs."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from _dicom_util import make_ct_series
from _net_util import (
    HAVE_STORESCU,
    Node,
    dataset_bytes,
    node_settings,
    p_data_pdu,
    raw_association,
    read_pdu,
    running_receiver,
    storescu,
)
from _node_util import echo_ok

from ldct_node.service import pdata, receive

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
A_ASSOCIATE_AC, P_DATA_TF, A_ABORT = 0x02, 0x04, 0x07
COMMAND_LAST = pdata.COMMAND | pdata.LAST

needs_storescu = pytest.mark.skipif(not HAVE_STORESCU, reason="DCMTK storescu not installed")


@pytest.fixture
def pynetdicom_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The SOP instance UIDs that reached the pynetdicom C-STORE handler."""
    calls: list[str] = []
    real = receive.handle_store

    def counting(event: object, ctx: receive.ReceiverContext) -> int:
        calls.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[attr-defined]
        return real(event, ctx)  # type: ignore[arg-type]

    monkeypatch.setattr(receive, "handle_store", counting)
    yield calls


@contextmanager
def ct_association(tmp_path: Path) -> Iterator[tuple[Node, socket.socket]]:
    """A receiver, and a raw association to it accepted for CT Image Storage with
    Explicit VR Little Endian on presentation context 1."""
    with (
        running_receiver(node_settings(tmp_path / "node")) as node,
        raw_association(node.port, abstract_syntax=CT, transfer_syntax=EXPLICIT_LE) as (
            sock,
            answer,
        ),
    ):
        assert answer == A_ASSOCIATE_AC
        yield node, sock


def _response(sock: object) -> tuple[int, int, str] | None:
    pdu_type, body = read_pdu(sock)  # type: ignore[arg-type]
    assert pdu_type == P_DATA_TF, pdu_type
    (_, _, fragment), *_ = pdata.pdv_items(body)
    return pdata.decode_c_store_rsp(bytes(fragment))


@needs_storescu
def test_storescu_instances_take_the_direct_path_and_land_as_sent(
    tmp_path: Path, pynetdicom_calls: list[str]
) -> None:
    files = make_ct_series(tmp_path, n=3, size=32)
    with running_receiver(node_settings(tmp_path / "node")) as node:
        result = storescu(node, *files)
        assert result.returncode == 0, result.stderr
        stored = {uid: node.db.instance_path(uid) for uid in map(_sop_uid, files)}
    assert pynetdicom_calls == []
    for path in files:
        kept = stored[_sop_uid(path)]
        assert kept is not None and dataset_bytes(kept) == dataset_bytes(path)
        meta = pydicom.dcmread(kept, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == _sop_uid(path)
        assert meta.TransferSyntaxUID in (EXPLICIT_LE, "1.2.840.10008.1.2")


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _raw_store_pdus(path: Path, message_id: int = 1) -> tuple[bytes, bytes]:
    command = pdata.encode_c_store_rq(message_id, CT, _sop_uid(path))
    return command, dataset_bytes(path)


def test_a_command_split_over_two_pdus_is_served_by_pynetdicom(
    tmp_path: Path, pynetdicom_calls: list[str]
) -> None:
    (path,) = make_ct_series(tmp_path, n=1, size=16)
    command, data = _raw_store_pdus(path)
    with ct_association(tmp_path) as (node, sock):
        sock.sendall(p_data_pdu((1, pdata.COMMAND, command[:20])))
        sock.sendall(p_data_pdu((1, COMMAND_LAST, command[20:])))
        sock.sendall(p_data_pdu((1, pdata.LAST, data)))
        assert _response(sock) == (1, receive.SUCCESS, "")
        assert node.db.instance_path(_sop_uid(path)) is not None
    assert pynetdicom_calls == [_sop_uid(path)]


def test_command_and_data_in_one_pdu_are_served_by_pynetdicom(
    tmp_path: Path, pynetdicom_calls: list[str]
) -> None:
    (path,) = make_ct_series(tmp_path, n=1, size=16)
    command, data = _raw_store_pdus(path, message_id=9)
    with ct_association(tmp_path) as (_, sock):
        sock.sendall(p_data_pdu((1, COMMAND_LAST, command), (1, pdata.LAST, data)))
        assert _response(sock) == (9, receive.SUCCESS, "")
    assert pynetdicom_calls == [_sop_uid(path)]


def test_a_data_set_in_many_fragments_is_stored_whole_on_the_direct_path(
    tmp_path: Path, pynetdicom_calls: list[str]
) -> None:
    (path,) = make_ct_series(tmp_path, n=1, size=64)
    command, data = _raw_store_pdus(path, message_id=65535)
    with ct_association(tmp_path) as (node, sock):
        sock.sendall(p_data_pdu((1, COMMAND_LAST, command)))
        pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
        # Two fragments per PDU, then one per PDU.
        sock.sendall(p_data_pdu((1, 0, pieces[0]), (1, 0, pieces[1])))
        for piece in pieces[2:-1]:
            sock.sendall(p_data_pdu((1, 0, piece)))
        sock.sendall(p_data_pdu((1, pdata.LAST, pieces[-1])))
        assert _response(sock) == (65535, receive.SUCCESS, "")
        kept = node.db.instance_path(_sop_uid(path))
    assert pynetdicom_calls == []
    assert kept is not None and dataset_bytes(kept) == data


def test_a_bad_data_set_on_the_direct_path_gets_its_status(
    tmp_path: Path, pynetdicom_calls: list[str]
) -> None:
    """The same checks as through pynetdicom: here, a data set whose SOP class is not
    the request's is refused 0xA900, and the association goes on."""
    (path,) = make_ct_series(tmp_path, n=1, size=16)
    data = dataset_bytes(path)
    command = pdata.encode_c_store_rq(3, "1.2.840.10008.5.1.4.1.1.2.1", _sop_uid(path))
    with ct_association(tmp_path) as (_, sock):
        sock.sendall(p_data_pdu((1, COMMAND_LAST, command)))
        sock.sendall(p_data_pdu((1, pdata.LAST, data)))
        assert _response(sock) == (3, receive.DATASET_DOES_NOT_MATCH_SOP_CLASS, "")
        command, _ = _raw_store_pdus(path, message_id=4)
        sock.sendall(p_data_pdu((1, COMMAND_LAST, command)))
        sock.sendall(p_data_pdu((1, pdata.LAST, data)))
        assert _response(sock) == (4, receive.SUCCESS, "")
    assert pynetdicom_calls == []


def test_a_data_set_interrupted_by_a_command_aborts_and_the_node_keeps_serving(
    tmp_path: Path,
) -> None:
    (path,) = make_ct_series(tmp_path, n=1, size=16)
    command, data = _raw_store_pdus(path)
    with ct_association(tmp_path) as (node, sock):
        sock.sendall(p_data_pdu((1, COMMAND_LAST, command)))
        sock.sendall(p_data_pdu((1, 0, data[:100])))
        sock.sendall(p_data_pdu((1, COMMAND_LAST, command)))
        pdu_type, _ = read_pdu(sock, timeout=5)
        assert pdu_type == A_ABORT
        assert node.db.instance_path(_sop_uid(path)) is None
        assert echo_ok(node.port, "LDCT_NODE")


def test_a_response_is_fragmented_to_the_senders_maximum_pdu() -> None:
    """The smallest maximum PDU a peer may ask for still carries the whole response."""
    response = pdata.encode_c_store_rsp(1, CT, "1.2.3." + "4" * 56, 0)
    pdus = list(pdata.p_data_pdus(1, pdata.COMMAND, memoryview(response), 64, last=True))
    assert len(pdus) > 1
    parts = []
    for i, pdu in enumerate(pdus):
        (length,) = struct.unpack(">I", pdu[2:6])
        assert length <= 64 + 6 and length == len(pdu) - 6
        ((_, control, fragment),) = pdata.pdv_items(pdu[6:])
        assert control == (COMMAND_LAST if i == len(pdus) - 1 else pdata.COMMAND)
        parts.append(bytes(fragment))
    assert pdata.decode_c_store_rsp(b"".join(parts)) == (1, 0, "")
