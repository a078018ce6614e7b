"""The C-ECHO/C-STORE SCP against real peers (DCMTK and pynetdicom) on 127.0.0.1."""

from __future__ import annotations

import logging
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from _dicom_util import HAVE_DCMTK, compress, make_ct_series
from _net_util import (
    DCMTK_ENV,
    LOOPBACK,
    dataset_bytes,
    dcmtk,
    dcmtk_tool,
    make_test_pki,
    needs_dcmtk_net,
    needs_openssl,
    node_settings,
    raw_part10,
    running_receiver,
    scu_association,
    storescu,
    tls_security,
)
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from ldct_node.service import receive
from ldct_node.store import JobState

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
RLE = "1.2.840.10008.1.2.5"


def _spool_files(node_root: Path) -> list[Path]:
    return sorted(p for p in node_root.rglob("*") if p.is_file())


def _is_failure(status: int) -> bool:
    return status in (0xA900,) or 0xC000 <= status <= 0xCFFF


@needs_dcmtk_net
def test_storescu_series_is_spooled_byte_identical_and_recorded(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=3, size=16, start_z_mm=-10.0)
    settings = node_settings(tmp_path, outputs=[{"name": "soft"}, {"name": "sharp"}])
    with running_receiver(settings) as node:
        result = storescu(node, *files)
        assert result.returncode == 0, result.stderr

        jobs = node.db.list_jobs()
        assert sorted(j.profile for j in jobs) == ["sharp", "soft"]
        assert {j.state for j in jobs} == {JobState.RECEIVING}
        assert {j.source_instances for j in jobs} == {3}
        assert {j.calling_aet for j in jobs} == {"STORESCU"}

        for sent in files:
            ds = pydicom.dcmread(sent, stop_before_pixels=True)
            stored = node.db.instance_path(ds.SOPInstanceUID)
            assert stored is not None and stored.is_file()
            assert node.spool.contains(stored)
            assert dataset_bytes(stored) == dataset_bytes(sent)
            assert stat.S_IMODE(stored.stat().st_mode) == 0o600
            assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
            meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
            assert meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        # Slice order comes from the recorded geometry.
        assert node.db.job_instances(jobs[0].id) == [
            node.db.instance_path(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in files
        ]
        assert list(node.spool.tmp.iterdir()) == []


@needs_dcmtk_net
def test_echoscu_verification_succeeds(tmp_path: Path) -> None:
    with running_receiver(node_settings(tmp_path)) as node:
        result = dcmtk("echoscu", "-aec", node.ae_title, "-to", "20", LOOPBACK, str(node.port))
        assert result.returncode == 0, result.stderr


@needs_dcmtk_net
@pytest.mark.skipif(not HAVE_DCMTK, reason="dcmcrle missing")
def test_compressed_instance_is_stored_as_received(tmp_path: Path) -> None:
    (source,) = make_ct_series(tmp_path, n=1, size=16)
    rle = compress(source, "rle")
    with running_receiver(node_settings(tmp_path)) as node:
        result = storescu(node, rle, extra=["-xr"])
        assert result.returncode == 0, result.stderr
        uid = pydicom.dcmread(rle, stop_before_pixels=True).SOPInstanceUID
        stored = node.db.instance_path(uid)
        assert stored is not None
        assert dataset_bytes(stored) == dataset_bytes(rle)
        assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLE


def test_duplicate_instance_is_idempotent(tmp_path: Path) -> None:
    (path,) = make_ct_series(tmp_path, n=1, size=16)
    with running_receiver(node_settings(tmp_path)) as node:
        for _ in range(2):  # two associations, the same instance
            with scu_association(node.port, [CT]) as assoc:
                assert assoc.is_established
                assert assoc.send_c_store(path).Status == receive.SUCCESS
        (job,) = node.db.list_jobs()
        assert job.source_instances == 1
        assert len(_spool_files(node.spool.incoming)) == 1


def test_series_split_over_two_associations_is_one_series(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=4, size=16)
    settings = node_settings(tmp_path, outputs=[{"name": "a"}, {"name": "b"}])
    with running_receiver(settings) as node:
        for part in (files[:2], files[2:]):
            with scu_association(node.port, [CT], calling_aet="MODALITY") as assoc:
                for path in part:
                    assert assoc.send_c_store(path).Status == receive.SUCCESS
        jobs = node.db.list_jobs()
        assert sorted(j.profile for j in jobs) == ["a", "b"]
        assert {j.series_id for j in jobs} == {jobs[0].series_id}
        assert {j.source_instances for j in jobs} == {4}
        assert len(node.db.job_instances(jobs[0].id)) == 4


def test_unaccepted_sop_class_context_is_rejected(tmp_path: Path) -> None:
    (path,) = make_ct_series(tmp_path, n=1, size=16)
    with running_receiver(node_settings(tmp_path)) as node:
        with scu_association(node.port, [CT, MR]) as assoc:
            assert assoc.is_established
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
            assert accepted == {CT}
            assert rejected == {MR}
            mr = pydicom.dcmread(path)
            mr.SOPClassUID = UID(MR)
            mr.file_meta.MediaStorageSOPClassUID = UID(MR)
            with pytest.raises(ValueError):  # no accepted context to send it on
                assoc.send_c_store(mr)
        assert node.db.list_jobs() == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the garbage values
def test_bad_datasets_are_refused_and_the_association_keeps_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make pynetdicom send the files' dataset bytes as they are, not re-encoded.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    (good,) = make_ct_series(tmp_path, n=1, size=16)
    garbage = raw_part10(
        tmp_path / "garbage.dcm",
        b"\x08\x00\x18\x00UI\xf0\xff1.2.3" + bytes(range(256)),
        sop_class_uid=CT,
        sop_instance_uid="1.2.3",
    )
    wrong_class = pydicom.dcmread(good)
    wrong_class.SOPClassUID = UID(MR)
    wrong_class.SOPInstanceUID = generate_uid()
    wrong_class.save_as(tmp_path / "wrong-class.dcm", enforce_file_format=True)
    mismatch = raw_part10(
        tmp_path / "mismatch.dcm",
        dataset_bytes(tmp_path / "wrong-class.dcm"),
        sop_class_uid=CT,
        sop_instance_uid=wrong_class.SOPInstanceUID,
    )
    no_series = pydicom.dcmread(good)
    no_series.SOPInstanceUID = generate_uid()
    del no_series.SeriesInstanceUID
    no_series.file_meta.MediaStorageSOPInstanceUID = no_series.SOPInstanceUID
    no_series.save_as(tmp_path / "no-series.dcm", enforce_file_format=True)

    with running_receiver(node_settings(tmp_path)) as node:
        with scu_association(node.port, [CT]) as assoc:
            status = assoc.send_c_store(garbage).Status
            assert _is_failure(status), hex(status)
            status = assoc.send_c_store(mismatch).Status
            assert status == receive.DATASET_DOES_NOT_MATCH_SOP_CLASS
            status = assoc.send_c_store(tmp_path / "no-series.dcm").Status
            assert status == receive.MISSING_UIDS
            assert assoc.send_c_store(good).Status == receive.SUCCESS
        assert len(_spool_files(node.spool.incoming)) == 1
        assert list(node.spool.tmp.iterdir()) == []
        assert len(node.db.list_jobs()) == 1


def test_disk_guard_answers_out_of_resources_and_writes_nothing(tmp_path: Path) -> None:
    (path,) = make_ct_series(tmp_path, n=1, size=16)
    settings = node_settings(tmp_path, storage={"min_free_gb": 1e9})
    with running_receiver(settings) as node:
        with scu_association(node.port, [CT]) as assoc:
            assert assoc.send_c_store(path).Status == receive.OUT_OF_RESOURCES
        assert _spool_files(node.spool.root) == []
        assert node.db.list_jobs() == []
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert node.db.instance_path(uid) is None


def test_localizer_is_stored_but_creates_no_job(tmp_path: Path) -> None:
    (scout,) = make_ct_series(
        tmp_path, n=1, size=16, extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
    )
    with running_receiver(node_settings(tmp_path)) as node:
        with scu_association(node.port, [CT]) as assoc:
            assert assoc.send_c_store(scout).Status == receive.SUCCESS
        uid = pydicom.dcmread(scout, stop_before_pixels=True).SOPInstanceUID
        stored = node.db.instance_path(uid)
        assert stored is not None and stored.is_file()
        assert node.db.list_jobs() == []


def test_no_patient_data_in_info_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = make_ct_series(tmp_path, n=2, size=16)
    caplog.set_level(logging.INFO, logger="ldct_node")
    with (
        running_receiver(node_settings(tmp_path)) as node,
        scu_association(node.port, [CT]) as assoc,
    ):
        for path in files:
            assert assoc.send_c_store(path).Status == receive.SUCCESS
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("ldct_node"))
    assert "closed: 2 stored" in text  # the per-association summary line
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(ds.PatientName) not in text
    assert str(ds.PatientID) not in text


def test_calling_ae_allow_list(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, security={"allowed_calling_aets": ["MODALITY1"]})
    with running_receiver(settings) as node:
        with scu_association(node.port, [VERIFICATION], calling_aet="INTRUDER") as assoc:
            assert assoc.is_rejected
            rj = assoc.acceptor.primitive
            assert rj is not None
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        with scu_association(node.port, [VERIFICATION], calling_aet="MODALITY1") as assoc:
            assert assoc.is_established
            assert assoc.send_c_echo().Status == receive.SUCCESS


def test_host_allow_list(tmp_path: Path) -> None:
    # Outside the list: disconnected at accept, no A-ASSOCIATE-RJ (nothing is read; see
    # test_hostile_network.py for the bytes and timing).
    outside = node_settings(tmp_path / "a", security={"allowed_hosts": ["10.0.0.0/8"]})
    with running_receiver(outside) as node, scu_association(node.port, [VERIFICATION]) as assoc:
        assert not assoc.is_established and not assoc.is_rejected
        assert node.server.refused_hosts == 1
    inside = node_settings(tmp_path / "b", security={"allowed_hosts": ["10.0.0.0/8", "127.0.0.1"]})
    with running_receiver(inside) as node, scu_association(node.port, [VERIFICATION]) as assoc:
        assert assoc.is_established


@needs_dcmtk_net
@needs_openssl
def test_tls_with_client_certificates(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    settings = node_settings(
        tmp_path,
        security=tls_security(pki, mutual=True),
    )
    with running_receiver(settings) as node:
        # A client that connects and never speaks must not block anyone else.
        with socket.create_connection((LOOPBACK, node.port), timeout=10):
            tls = ("+tls", pki["client_key"], pki["client_cert"], "+cf", pki["ca"])
            ok = dcmtk(
                "echoscu",
                *tls,
                "-aec",
                node.ae_title,
                "-to",
                "20",
                LOOPBACK,
                str(node.port),
                timeout=30,
            )
            assert ok.returncode == 0, ok.stderr
        plain = dcmtk(
            "echoscu", "-aec", node.ae_title, "-to", "10", "-ta", "10", LOOPBACK, str(node.port)
        )
        assert plain.returncode != 0

        # pynetdicom without a client certificate is refused by the TLS layer.
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        with scu_association(node.port, [VERIFICATION], tls_args=(client, "localhost")) as assoc:
            assert not assoc.is_established


def test_internal_failure_becomes_a_status_not_a_dead_server(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    with running_receiver(settings) as node:
        node.db.close()
        # Break the database under the running server: the store must answer an error.
        (path,) = make_ct_series(tmp_path, n=1, size=16)
        (tmp_path / "node.db").unlink()
        (tmp_path / "node.db").mkdir()
        with scu_association(node.port, [CT, VERIFICATION]) as assoc:
            status = assoc.send_c_store(path).Status
            assert status == receive.INTERNAL_ERROR
            assert assoc.send_c_echo().Status == receive.SUCCESS


def test_slice_position_projects_on_the_normal() -> None:
    ds = Dataset()
    ds.ImagePositionPatient = [10.0, 20.0, -35.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert receive.slice_position(ds) == pytest.approx(-35.5)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: normal is -x
    assert receive.slice_position(ds) == pytest.approx(-10.0)
    del ds.ImageOrientationPatient
    assert receive.slice_position(ds) == pytest.approx(-35.5)
    assert receive.slice_position(Dataset()) is None


@needs_dcmtk_net
def test_concurrent_associations_all_land(tmp_path: Path) -> None:
    series = [make_ct_series(tmp_path, n=4, size=16, subdir=f"s{k}", seed=k) for k in range(3)]
    with running_receiver(node_settings(tmp_path)) as node:
        procs = [
            subprocess.Popen(
                [
                    dcmtk_tool("storescu") or "storescu",
                    "-aec",
                    node.ae_title,
                    "-to",
                    "20",
                    LOOPBACK,
                    str(node.port),
                    *map(str, files),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=DCMTK_ENV,
            )
            for files in series
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        jobs = node.db.list_jobs()
        assert len(jobs) == 3
        assert {j.source_instances for j in jobs} == {4}
        assert len(_spool_files(node.spool.incoming)) == 12


def test_every_listed_transfer_syntax_is_negotiated_for_ct(tmp_path: Path) -> None:
    contexts = [(CT, [ts]) for ts in receive.STORAGE_TRANSFER_SYNTAXES]
    with (
        running_receiver(node_settings(tmp_path)) as node,
        scu_association(node.port, contexts) as assoc,
    ):
        assert assoc.is_established
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assert accepted == set(receive.STORAGE_TRANSFER_SYNTAXES)
    # Lossy baseline JPEG is not on the list: that context is refused.
    lossy: list[str | tuple[str, list[str]]] = [(CT, ["1.2.840.10008.1.2.4.50"]), VERIFICATION]
    with (
        running_receiver(node_settings(tmp_path / "b")) as node,
        scu_association(node.port, lossy) as assoc,
    ):
        assert {cx.abstract_syntax for cx in assoc.accepted_contexts} == {VERIFICATION}


def test_unloadable_tls_files_name_the_key(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    settings = node_settings(tmp_path, security={"tls_cert": missing, "tls_key": missing})
    with pytest.raises(ValueError, match=r"security\.tls_cert"):
        receive.build_ssl_context(settings)
    assert receive.build_ssl_context(node_settings(tmp_path)) is None


def _explicit_part10(extra: bytes) -> bytes:
    """A small explicit VR little endian Part 10 file with raw elements appended."""
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue() + extra


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    import struct

    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


@pytest.mark.parametrize(
    ("name", "extra", "refused"),
    [
        ("Rows (US) of 3 bytes", _element(0x0028, 0x0010, b"US", b"\x01\x02\x03"), True),
        ("SliceThickness as FD of 3 bytes", _element(0x0018, 0x0050, b"FD", b"\x01\x02\x03"), True),
        ("an unknown VR", _element(0x0020, 0x0052, b"UF", b"\x01\x02"), True),
        ("InstanceNumber (IS) 'abc'", _element(0x0020, 0x0013, b"IS", b"abc "), False),
        (
            "PatientName with bytes no charset has",
            _element(0x0010, 0x0010, b"PN", b"\xff\xfe"),
            False,
        ),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_header_value_that_cannot_be_decoded_is_refused_before_anything_reads_it(
    name: str, extra: bytes, refused: bool
) -> None:
    """Only text and bytes are left to decode later (they always decode); whatever else
    fails to decode is answered 0xC210 at once."""
    data = _explicit_part10(extra)
    if refused:
        with pytest.raises(receive._RefusedError) as info:
            receive._read_header(data)
        assert info.value.status == receive.CANNOT_UNDERSTAND, name
    else:
        ds = receive._read_header(data)
        assert ds.SOPInstanceUID == "1.2.3.4"
        for elem in ds:  # and decoding everything later does not fail either
            _ = elem.value
