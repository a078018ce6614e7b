"""forward.py: C-STORE SCU to destinations, per-destination bookkeeping, C-ECHO."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from _dicom_util import make_ct_series
from _forward_util import forwarding_job
from _net_util import DCMTK_ENV, LOOPBACK, dcmtk_tool, free_port, node_settings
from _node_util import echo_ok, needs_storescp, storescp, wait_for
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from ldct_node.config import Destination
from ldct_node.service.forward import Forwarder, describe_status, echo, send_series
from ldct_node.store import JobState

OUT_OF_RESOURCES = 0xA700


@contextmanager
def status_scp(
    status: int, *, ae_title: str = "STATUS_SCP", strict_called_aet: bool = False
) -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom storage SCP answering every C-STORE with ``status``.

    Yields its port and the SOPInstanceUIDs it was offered.
    """
    seen: list[str] = []

    def on_store(event: evt.Event) -> int:
        seen.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
        return status

    ae = AE(ae_title=ae_title)
    ae.require_called_aet = strict_called_aet
    ae.add_supported_context(Verification)
    with serving_stores(ae, on_store) as port:
        yield port, seen


@contextmanager
def serving_stores(ae: AE, on_store: Callable[[evt.Event], int]) -> Iterator[int]:
    """``ae`` as a CT storage SCP on loopback, ``on_store`` answering; yields its port."""
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server((LOOPBACK, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if server is None:  # only a blocking server returns None
        raise RuntimeError("pynetdicom did not return a server")
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def dest(port: int, ae_title: str = "PACS", name: str = "pacs") -> Destination:
    return Destination(name=name, ae_title=ae_title, host=LOOPBACK, port=port)


@needs_storescp
def test_send_series_delivers_every_instance(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=3, size=16)
    with storescp(tmp_path / "pacs") as pacs:
        result = send_series(files, dest(pacs.port), calling_ae_title="LDCT_NODE")
        received = pacs.datasets()
    assert result.ok and result.n_sent == 3 and result.n_total == 3 and result.error is None
    sent = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert {ds.SOPInstanceUID for ds in received} == sent


def test_files_go_out_as_stored_without_being_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the peer accepts a file's own transfer syntax its dataset bytes are streamed
    from disk: the peer gets them byte for byte and nothing decodes the pixel data."""
    import ldct_node.service.forward as forward

    files = make_ct_series(tmp_path, n=3, size=16)
    full_reads: list[Path] = []
    real_dcmread = forward.dcmread

    def counting_dcmread(path: Path, **kwargs: object) -> pydicom.Dataset:
        if not kwargs.get("stop_before_pixels"):
            full_reads.append(path)
        return real_dcmread(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(forward, "dcmread", counting_dcmread)
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        request = event.request
        received[str(request.AffectedSOPInstanceUID)] = request.DataSet.getvalue()  # type: ignore[union-attr]
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, "1.2.840.10008.1.2.1")
    server = ae.start_server((LOOPBACK, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        result = send_series(files, dest(int(server.server_address[1])), calling_ae_title="LDCT")
    finally:
        server.shutdown()
    assert result.ok, result.error
    assert full_reads == []
    # pynetdicom's module-wide setting is back to its default for everyone else.
    from pynetdicom import _config

    assert _config.STORE_SEND_CHUNKED_DATASET is False
    for path in files:
        raw = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert raw.endswith(received[str(ds.SOPInstanceUID)])  # the file's dataset bytes
        assert len(received[str(ds.SOPInstanceUID)]) > 16 * 16 * 2


@needs_storescp
def test_send_series_to_a_peer_that_only_takes_implicit_vr(tmp_path: Path) -> None:
    # The derived files are explicit VR; offering implicit VR too lets any SCP take them.
    files = make_ct_series(tmp_path, n=2, size=16)
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            dcmtk_tool("storescp") or "storescp",
            "-aet",
            "PACS",
            "-od",
            str(pacs_dir),
            "+xi",
            str(port),
        ],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: echo_ok(port, "PACS"), timeout=20, what="storescp")
        result = send_series(files, dest(port), calling_ae_title="LDCT_NODE")
    finally:
        proc.terminate()
        proc.wait(10)
    assert result.ok, result.error
    received = [pydicom.dcmread(p) for p in pacs_dir.iterdir()]
    assert len(received) == 2
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in received} == {"1.2.840.10008.1.2"}


def test_peer_failure_status_is_reported_with_code_and_meaning(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=3, size=16)
    with status_scp(OUT_OF_RESOURCES) as (port, seen):
        result = send_series(files, dest(port), calling_ae_title="LDCT_NODE")
    assert not result.ok and result.n_sent == 0 and result.n_total == 3
    assert result.error is not None
    assert "0xA700" in result.error and "Out of Resources" in result.error
    assert len(seen) == 1  # stops at the first refusal


def test_warning_status_counts_as_delivered(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=2, size=16)
    with status_scp(0xB000) as (port, seen):
        result = send_series(files, dest(port), calling_ae_title="LDCT_NODE")
    assert result.ok and result.n_sent == 2 and len(seen) == 2


def test_no_listener_means_no_association(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=1, size=16)
    result = send_series(files, dest(free_port()), calling_ae_title="LDCT_NODE")
    assert not result.ok and result.n_sent == 0
    assert result.error is not None and "no association" in result.error


def test_rejected_association_names_the_rejection(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=1, size=16)
    with status_scp(0, ae_title="RIGHT_AE", strict_called_aet=True) as (port, seen):
        result = send_series(files, dest(port, ae_title="WRONG_AE"), calling_ae_title="X")
        ok, message = echo(dest(port, ae_title="WRONG_AE"))
    assert not result.ok and seen == []
    assert result.error is not None and "rejected" in result.error
    assert not ok and "rejected" in message


def test_stop_request_interrupts_between_instances(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=3, size=16)
    with status_scp(0) as (port, seen):
        result = send_series(
            files, dest(port), calling_ae_title="LDCT_NODE", should_stop=lambda: len(seen) >= 1
        )
    assert result.interrupted and not result.ok and result.n_sent == 1


def test_send_series_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="paths"):
        send_series([], dest(1), calling_ae_title="X")
    with pytest.raises(TypeError, match="paths"):
        send_series(tmp_path, dest(1), calling_ae_title="X")  # type: ignore[arg-type]


def test_echo_success_and_failure() -> None:
    with status_scp(0) as (port, _seen):
        ok, message = echo(dest(port), calling_ae_title="LDCT_NODE")
    assert ok and "succeeded" in message and str(port) in message
    ok, message = echo(dest(free_port()))
    assert not ok and "no association" in message


def test_describe_status() -> None:
    assert describe_status(0xA700) == "0xA700 (Failure: Refused: Out of Resources)"
    assert describe_status(0xC210).startswith("0xC210 (Failure: Cannot Understand")


# -------------------------------------------------------------------- Forwarder + database


def test_forwarder_books_a_refusal_with_backoff_and_fails_after_max_attempts(
    tmp_path: Path,
) -> None:
    with status_scp(OUT_OF_RESOURCES) as (port, _seen):
        settings = node_settings(
            tmp_path,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": port}],
            forward={"max_attempts": 2, "backoff_seconds": [30]},
        )
        db, job_id, _ = forwarding_job(tmp_path, settings)
        forwarder = Forwarder(settings, db)
        before = datetime.now(UTC)
        assert forwarder.run_due() == 1
        job = db.get_job(job_id)
        assert job.state == JobState.FORWARDING
        (fwd,) = job.forwards
        assert fwd.state == "pending" and fwd.attempts == 1
        assert fwd.last_error is not None and "0xA700" in fwd.last_error
        assert fwd.next_attempt_at is not None
        assert fwd.next_attempt_at >= before + timedelta(seconds=29)
        assert forwarder.run_due() == 0  # not due before the backoff has passed
        assert db.status_summary().pending_forwards == 1

        # The second (last) attempt: forced now instead of waiting 30 s.
        assert forwarder.forward(fwd) == JobState.FAILED
    job = db.get_job(job_id)
    assert job.state == JobState.FAILED
    assert job.error is not None and "0xA700" in job.error and "pacs" in job.error
    db.close()


@needs_storescp
def test_forwarder_delivers_and_finishes_the_job(tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as pacs:
        settings = node_settings(
            tmp_path,
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port}
            ],
        )
        db, job_id, _ = forwarding_job(tmp_path, settings, n=3)
        assert Forwarder(settings, db).run_due() == 1
        assert len(pacs.datasets()) == 3
    job = db.get_job(job_id)
    assert job.state == JobState.DONE
    assert [(f.state, f.n_sent) for f in job.forwards] == [("sent", 3)]
    db.close()


def test_forwarder_fails_at_once_when_derived_files_are_gone(tmp_path: Path) -> None:
    settings = node_settings(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": 1}],
    )
    db, job_id, _ = forwarding_job(tmp_path, settings)
    output_dir = db.get_job(job_id).output_dir
    assert output_dir is not None
    for path in Path(output_dir).iterdir():
        path.unlink()
    Forwarder(settings, db).run_due()
    job = db.get_job(job_id)
    assert job.state == JobState.FAILED
    assert job.error is not None and "derived files missing" in job.error
    db.close()


def test_forwarder_stopped_does_nothing(tmp_path: Path) -> None:
    settings = node_settings(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": 1}],
    )
    db, job_id, _ = forwarding_job(tmp_path, settings)
    forwarder = Forwarder(settings, db)
    forwarder.stop()
    assert forwarder.run_due() == 0
    assert db.get_job(job_id).forwards[0].attempts == 0
    db.close()


def test_the_forwarders_connections_have_nagle_off_and_keep_their_responses(tmp_path: Path) -> None:
    """Issue 18: with Nagle on, each C-STORE request after the first waits for the peer's
    delayed ACK (~40 ms); the forwarder's sockets set TCP_NODELAY."""
    import socket

    from ldct_node.service import forward

    scp = AE(ae_title="PACS")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server((LOOPBACK, port), block=False)
    try:
        dest = Destination(name="pacs", ae_title="PACS", host=LOOPBACK, port=port)
        ae = forward._make_ae("LDCT_NODE")
        ae.add_requested_context(Verification)
        attempt = forward._associate(ae, dest, None)
        try:
            assert attempt.assoc.is_established
            sock = attempt.assoc.dul.socket.socket  # type: ignore[union-attr]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            # The reactor's non-blocking polls never take a response meant for the
            # sender (pynetdicom's pause flag races under load: the series was resent).
            dimse = attempt.assoc.dimse
            dimse.msg_queue.put((1, "a C-STORE response"))
            assert dimse.get_msg(block=False) == (None, None)
            assert dimse.get_msg(block=True) == (1, "a C-STORE response")
            assert attempt.assoc.send_c_echo().Status == 0  # and sending still works
        finally:
            attempt.assoc.release()
    finally:
        server.shutdown()


# ----------------------------------------------------- several associations per destination


@contextmanager
def counting_scp(*, max_associations: int = 10) -> Iterator[tuple[int, dict[str, Any]]]:
    """A pynetdicom storage SCP that serves associations in parallel, each C-STORE
    taking 30 ms; yields its port and what it saw: the SOPInstanceUIDs with the
    association each came over, and the most C-STOREs it had in hand at once."""
    seen: dict[str, Any] = {"uids": [], "associations": set(), "most_at_once": 0}
    lock = threading.Lock()
    busy = [0]

    def on_store(event: evt.Event) -> int:
        with lock:
            busy[0] += 1
            seen["most_at_once"] = max(seen["most_at_once"], busy[0])
            seen["uids"].append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
            seen["associations"].add(id(event.assoc))
        time.sleep(0.03)
        with lock:
            busy[0] -= 1
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.maximum_associations = max_associations
    with serving_stores(ae, on_store) as port:
        yield port, seen


def test_a_series_goes_over_several_associations_at_once(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=9, size=16)
    with counting_scp() as (port, seen):
        destination = dest(port).model_copy(update={"associations": 3})
        result = send_series(files, destination, calling_ae_title="LDCT_NODE")
    assert result.ok and result.n_sent == 9 and result.n_total == 9, result.error
    assert sorted(seen["uids"]) == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    assert len(seen["associations"]) == 3
    assert seen["most_at_once"] >= 2  # in parallel, not one after another


def test_associations_the_peer_refuses_are_done_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = make_ct_series(tmp_path, n=6, size=16)
    with counting_scp(max_associations=1) as (port, seen), caplog.at_level(logging.INFO):
        destination = dest(port).model_copy(update={"associations": 3})
        result = send_series(files, destination, calling_ae_title="LDCT_NODE")
    assert result.ok and result.n_sent == 6, result.error
    assert len(seen["uids"]) == 6
    # The first was up before the others were requested: the peer's limit turned
    # those away, and the first sent the whole series.
    assert len(seen["associations"]) == 1
    assert "accepted 1 of 3 associations: sent over fewer" in caplog.text, caplog.text[-2000:]


def test_a_refusal_on_one_association_stops_the_others(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=8, size=16)
    with status_scp(OUT_OF_RESOURCES) as (port, seen):
        destination = dest(port).model_copy(update={"associations": 2})
        result = send_series(files, destination, calling_ae_title="LDCT_NODE")
    assert not result.ok and result.n_sent == 0 and result.n_total == 8
    assert result.error is not None and "0xA700" in result.error
    assert 1 <= len(seen) <= 2  # each association stopped at its first refusal


def test_no_association_at_all_is_reported_as_with_one(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=3, size=16)
    destination = dest(free_port()).model_copy(update={"associations": 2})
    result = send_series(files, destination, calling_ae_title="LDCT_NODE")
    assert not result.ok and result.n_sent == 0
    assert result.error is not None and "no association with" in result.error


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"associations": 0}, "associations"),
        ({"associations": 17}, "associations"),
        ({"type": "dicomweb", "url": "https://h/x", "associations": 2}, "'associations' is not"),
    ],
)
def test_associations_config_errors_name_the_key(keys: dict[str, Any], expected: str) -> None:
    from ldct_node.config import ConfigError, parse_settings

    base = {"name": "p", "ae_title": "PACS", "host": "h", "port": 104}
    if keys.get("type") == "dicomweb":
        base = {"name": "p"}
    with pytest.raises(ConfigError) as info:
        parse_settings({"destinations": [{**base, **keys}]}, source="c")
    assert expected in str(info.value)
