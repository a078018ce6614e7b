"""pdata.py: C-STORE requests written straight onto a plain TCP association (issue 18).

Every test runs real associations on 127.0.0.1: DCMTK ``storescp`` where a peer must
check the PDUs independently, pynetdicom SCPs where a test needs a misbehaving peer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from _dicom_util import make_ct_series
from _net_util import LOOPBACK
from _node_util import needs_storescp, storescp
from pydicom.filereader import read_dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from ldct_node.config import Destination
from ldct_node.service import forward, pdata
from ldct_node.service.forward import send_series

CT = "1.2.840.10008.5.1.4.1.1.2"


def dest(port: int) -> Destination:
    return Destination(name="pacs", ae_title="PACS", host=LOOPBACK, port=port)


@contextmanager
def scp(
    on_store: Callable[[evt.Event], int], *, maximum_pdu: int = 16382
) -> Iterator[tuple[int, list[bytes]]]:
    """A pynetdicom storage SCP running ``on_store``; yields its port and the dataset
    bytes it was given."""
    received: list[bytes] = []

    def handler(event: evt.Event) -> int:
        received.append(event.request.DataSet.getvalue())  # type: ignore[union-attr]
        return on_store(event)

    ae = AE(ae_title="PACS")
    ae.maximum_pdu_size = maximum_pdu
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server((LOOPBACK, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)])
    assert server is not None
    try:
        yield int(server.server_address[1]), received
    finally:
        server.shutdown()


def dataset_bytes(path: Path) -> bytes:
    stored = pdata.read_stored(path)
    assert stored is not None
    return path.read_bytes()[stored.offset :]


# ---------------------------------------------------------------------- the encoding


def test_the_command_set_reads_back_as_a_c_store_request() -> None:
    raw = pdata.encode_c_store_rq(65535, CT, "1.2.3.45")
    ds = read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.AffectedSOPClassUID == CT
    assert ds.AffectedSOPInstanceUID == "1.2.3.45"  # odd length: padded with NUL
    assert (ds.CommandField, ds.MessageID, ds.Priority) == (0x0001, 65535, 0)
    assert ds.CommandDataSetType != 0x0101  # a data set follows
    with pytest.raises(ValueError, match="message_id"):
        pdata.encode_c_store_rq(65536, CT, "1.2")


def test_a_c_store_response_is_decoded_and_other_commands_are_not() -> None:
    rsp = pydicom.Dataset()
    rsp.CommandGroupLength = 0  # value not checked by the decoder
    rsp.AffectedSOPClassUID = CT
    rsp.CommandField = 0x8001
    rsp.MessageIDBeingRespondedTo = 7
    rsp.CommandDataSetType = 0x0101
    rsp.Status = 0xA700
    rsp.ErrorComment = "disk full"
    raw = encode(rsp, True, True)
    assert raw is not None
    assert pdata.decode_c_store_rsp(raw) == (7, 0xA700, "disk full")
    rsp.CommandField = 0x8030  # C-ECHO-RSP
    assert pdata.decode_c_store_rsp(encode(rsp, True, True) or b"") is None
    with pytest.raises(ValueError, match=r"truncated|bad element"):
        pdata.decode_c_store_rsp(raw[:-3])


# ------------------------------------------------------------------- against peers


@needs_storescp
def test_fragments_fit_a_peer_with_the_smallest_maximum_pdu(tmp_path: Path) -> None:
    """DCMTK storescp with a 4096-byte maximum PDU aborts an association that sends a
    larger one; a 64x64 slice takes 3 fragments there."""
    files = make_ct_series(tmp_path, n=3, size=64)
    with storescp(tmp_path / "pacs", extra=["-pdu", "4096"]) as pacs:
        result = send_series(files, dest(pacs.port), calling_ae_title="LDCT_NODE")
        received = {ds.SOPInstanceUID: ds for ds in pacs.datasets()}
    assert result.ok, result.error
    for path in files:
        source = pydicom.dcmread(path)
        assert received[source.SOPInstanceUID].PixelData == source.PixelData


def test_a_peer_without_a_maximum_pdu_gets_the_file_byte_for_byte(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=2, size=64)
    with scp(lambda event: 0x0000, maximum_pdu=0) as (port, received):
        result = send_series(files, dest(port), calling_ae_title="LDCT_NODE")
    assert result.ok, result.error
    assert received == [dataset_bytes(path) for path in files]


def test_a_file_that_must_be_converted_goes_through_pynetdicom_in_the_same_series(
    tmp_path: Path,
) -> None:
    """A deflated file (not offered) is decoded and sent inflated; the others go as
    stored, over the same association."""
    files = make_ct_series(tmp_path, n=3, size=16)
    ds = pydicom.dcmread(files[1])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(files[1], enforce_file_format=True)
    with scp(lambda event: 0x0000) as (port, received):
        result = send_series(files, dest(port), calling_ae_title="LDCT_NODE")
    assert result.ok, result.error
    assert received[0] == dataset_bytes(files[0]) and received[2] == dataset_bytes(files[2])
    converted = read_dataset(BytesIO(received[1]), is_implicit_VR=False, is_little_endian=True)
    assert converted.SOPInstanceUID == ds.SOPInstanceUID
    assert converted.PixelData == ds.PixelData


def test_a_peer_that_aborts_mid_series_is_reported_at_once(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=4, size=16)
    calls = 0

    def abort_on_second(event: evt.Event) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            event.assoc.abort()
        return 0x0000

    with scp(abort_on_second) as (port, _):
        started = time.monotonic()
        result = send_series(files, dest(port), calling_ae_title="LDCT_NODE")
        elapsed = time.monotonic() - started
    assert not result.ok and result.n_sent == 1
    assert result.error is not None and "aborted" in result.error, result.error
    assert elapsed < forward.DIMSE_TIMEOUT_S / 4  # not left waiting for a response


def test_a_peer_that_never_answers_hits_the_dimse_timeout_and_is_aborted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forward, "DIMSE_TIMEOUT_S", 1.0)
    files = make_ct_series(tmp_path, n=2, size=16)
    release = threading.Event()

    def hang(event: evt.Event) -> int:
        release.wait(10)
        return 0x0000

    with scp(hang) as (port, received):
        result = send_series(files, dest(port), calling_ae_title="LDCT_NODE")
        release.set()
    assert not result.ok and result.n_sent == 0
    assert result.error is not None and "no C-STORE response" in result.error
    assert len(received) == 1


def test_a_long_series_keeps_pynetdicoms_network_timeout_at_bay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The responses are read here, not by pynetdicom's reactor, so its idle timer is
    restarted with each one: a series longer than the network timeout still goes."""
    monkeypatch.setattr(forward, "NETWORK_TIMEOUT_S", 1.0)
    files = make_ct_series(tmp_path, n=6, size=16)

    def slow(event: evt.Event) -> int:
        time.sleep(0.35)
        return 0x0000

    with scp(slow) as (port, received):
        result = send_series(files, dest(port), calling_ae_title="LDCT_NODE")
    assert result.ok, result.error
    assert len(received) == 6


def test_message_ids_count_up_and_wrap(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=3, size=16)
    ids: list[int] = []

    def record(event: evt.Event) -> int:
        ids.append(int(event.request.MessageID))  # type: ignore[union-attr]
        return 0x0000

    with scp(record) as (port, _):
        assert send_series(files, dest(port), calling_ae_title="LDCT_NODE").ok
    assert ids == [1, 2, 3]
    sender = object.__new__(pdata.DirectStoreSender)
    sender._message_id = 0xFFFF
    assert sender._next_message_id() == 1


def test_a_reactor_check_begun_before_the_handover_never_takes_a_response(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's reactor may be inside its own socket check when the sender takes
    the socket over, and get the GIL back only once our response is readable (seen
    with three senders to one storescp: a response eaten, the series stalled 30 s).
    Here a thread keeps calling that original check all through a series."""
    from pynetdicom.dul import DULServiceProvider

    files = make_ct_series(tmp_path, n=20, size=16)
    real = pdata.DirectStoreSender.for_association
    stop = threading.Event()
    hammers: list[threading.Thread] = []
    errors: list[BaseException] = []

    def for_association(
        cls: type[pdata.DirectStoreSender], assoc: object
    ) -> pdata.DirectStoreSender | None:
        sender = real(assoc)  # type: ignore[arg-type]

        def hammer() -> None:
            while not stop.is_set():
                try:
                    DULServiceProvider._is_transport_event(assoc.dul)  # type: ignore[attr-defined]
                except (AttributeError, OSError) as exc:  # the socket is gone once released
                    if assoc.is_established:  # type: ignore[attr-defined]
                        errors.append(exc)
                    return

        hammers.append(threading.Thread(target=hammer, daemon=True))
        hammers[-1].start()
        return sender

    monkeypatch.setattr(pdata.DirectStoreSender, "for_association", classmethod(for_association))
    monkeypatch.setattr(forward, "DIMSE_TIMEOUT_S", 5.0)
    try:
        with scp(lambda event: 0x0000) as (port, received):
            result = send_series(files, dest(port), calling_ae_title="LDCT_NODE")
    finally:
        stop.set()
        for thread in hammers:
            thread.join(5)
    assert result.ok, result.error
    assert len(received) == 20
    assert not errors, errors
