"""Security: who may talk to the node (DICOM TLS, mutual TLS with a CA of our own,
plain connections when TLS is required) and what it leaves behind (no patient data in
its logs at INFO, private spool and database files, retention purge).

Certificates are made by the test (openssl CLI); every peer is on 127.0.0.1. The
calling-AE and host allow-lists (A-ASSOCIATE-RJ result/source/reason) are tested in
test_receive.py.
"""

from __future__ import annotations

import json
import ssl
import stat
from pathlib import Path

import pydicom
import pytest
from _dicom_util import make_ct_series
from _net_util import (
    LOOPBACK,
    dcmtk,
    make_test_pki,
    needs_dcmtk_net,
    needs_openssl,
    node_settings,
    running_receiver,
    scu_association,
    tls_security,
)
from _node_util import cli, needs_storescp, serving, wait_for, write_config
from _pacs_util import recording_pacs
from pydicom.uid import UID

from ldct_node.config import load_settings
from ldct_node.service import receive
from ldct_node.store import Database, JobState

VERIFICATION = UID("1.2.840.10008.1.1")
CT = UID("1.2.840.10008.5.1.4.1.1.2")


def client_tls(pki: dict[str, Path], *, cert_from: dict[str, Path] | None) -> ssl.SSLContext:
    """A client context trusting the node's CA, presenting ``cert_from``'s client cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if cert_from is not None:
        context.load_cert_chain(str(cert_from["client_cert"]), str(cert_from["client_key"]))
    return context


def echo_over(port: int, tls: ssl.SSLContext | None) -> bool:
    """True if an association (TLS when given) is established and C-ECHO succeeds."""
    tls_args = (tls, "localhost") if tls is not None else None
    with scu_association(port, [VERIFICATION], tls_args=tls_args) as assoc:
        return bool(assoc.is_established and assoc.send_c_echo().Status == receive.SUCCESS)


# --------------------------------------------------------------------------------- TLS


@needs_openssl
def test_tls_server_certificate_and_plain_connections_refused(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    settings = node_settings(
        tmp_path,
        security=tls_security(pki, mutual=False),
    )
    with running_receiver(settings) as node:
        # Server-only TLS: any client that verifies the node's certificate gets in.
        assert echo_over(node.port, client_tls(pki, cert_from=None))
        # A client that does not trust the node's CA refuses the node, not vice versa.
        other = make_test_pki(tmp_path / "other")
        assert not echo_over(node.port, client_tls(other, cert_from=None))
        # Plain DICOM to a TLS port never gets an association.
        assert not echo_over(node.port, None)
        # ...and the node keeps serving TLS clients after all that.
        assert echo_over(node.port, client_tls(pki, cert_from=None))


@needs_openssl
def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    other = make_test_pki(tmp_path / "other-ca")  # a CA the node does not trust
    settings = node_settings(
        tmp_path,
        security=tls_security(pki, mutual=True),
    )
    with running_receiver(settings) as node:
        assert echo_over(node.port, client_tls(pki, cert_from=pki))
        assert not echo_over(node.port, client_tls(pki, cert_from=None))  # no certificate
        assert not echo_over(node.port, client_tls(pki, cert_from=other))  # foreign CA
        assert not echo_over(node.port, None)  # plain
        # Refusals happened at the TLS layer: nothing reached the DICOM service.
        assert node.db.list_jobs() == []
        assert echo_over(node.port, client_tls(pki, cert_from=pki))


@needs_openssl
@needs_dcmtk_net
def test_mutual_tls_refuses_dcmtk_with_a_certificate_from_another_ca(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    other = make_test_pki(tmp_path / "other-ca")
    settings = node_settings(
        tmp_path,
        security=tls_security(pki, mutual=True),
    )
    with running_receiver(settings) as node:

        def echoscu(who: dict[str, Path]) -> int:
            tls = ("+tls", who["client_key"], who["client_cert"], "+cf", pki["ca"])
            return dcmtk(
                "echoscu", *tls, "-aec", node.ae_title, "-to", "10", "-ta", "10",
                LOOPBACK, str(node.port), timeout=30,
            ).returncode  # fmt: skip

        assert echoscu(other) != 0
        assert echoscu(pki) == 0


# ------------------------------------------------------------------- PHI, files, purge

PATIENT_NAME = "Qzxwvyk^Jorunnfrid"
PATIENT_ID = "PHI-7731-XQ"
BIRTH_DATE = "19230417"
# Too long for PN (64 per component group): pydicom warns about it.
LONG_NAME = "Plwmbrqtx" * 8 + "^Vexillo"


def _private(path: Path) -> list[str]:
    """Entries under ``path`` (itself included) that are not 0700 dirs / 0600 files."""
    bad = []
    for entry in [path, *path.rglob("*")]:
        mode = stat.S_IMODE(entry.lstat().st_mode)
        want = 0o700 if entry.is_dir() else 0o600
        if mode != want:
            bad.append(f"{entry} is {oct(mode)}, expected {oct(want)}")
    return bad


@needs_storescp
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_no_phi_in_logs_private_files_and_retention_purge(
    tmp_path: Path, untrained_weights: Path
) -> None:
    phi = {
        "PatientName": PATIENT_NAME,
        "PatientID": PATIENT_ID,
        "PatientBirthDate": BIRTH_DATE,
        "OtherPatientIDs": "PHI-OTHER-5521",
    }
    good = make_ct_series(tmp_path, n=3, size=32, subdir="good", extra=phi)
    broken = make_ct_series(tmp_path, n=2, size=32, subdir="broken", extra=phi)
    ds = pydicom.dcmread(broken[1])
    ds.PixelData = ds.PixelData[:100]  # the job fails, and says why
    ds.save_as(broken[1], enforce_file_format=True)
    odd = make_ct_series(tmp_path, n=2, size=32, subdir="odd", extra={**phi})
    for path in odd:  # values pydicom warns about (for some VRs quoting the value)
        ds = pydicom.dcmread(path)
        ds.PatientName = LONG_NAME
        ds.PatientBirthDate = BIRTH_DATE + "X"  # pydicom's warning would quote it
        ds.save_as(path, enforce_file_format=True)
    uids = {k: str(pydicom.dcmread(v[0]).SeriesInstanceUID) for k, v in
            (("good", good), ("broken", broken), ("odd", odd))}  # fmt: skip

    with recording_pacs() as pacs:
        config = write_config(
            tmp_path / "node",
            untrained_weights,
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port}
            ],
            storage={"retention_days": 7},
        )
        settings = load_settings(config)
        db = Database(settings.database_url)
        try:
            with serving(config, settings.node.port) as serve:
                for files in (good, broken, odd):
                    with scu_association(serve.port, [CT]) as assoc:
                        assert all(assoc.send_c_store(f).Status == 0 for f in files)

                def finished() -> bool:
                    jobs = db.list_jobs()
                    states = {j.series_instance_uid: j.state for j in jobs}
                    return states == {
                        uids["good"]: JobState.DONE,
                        uids["broken"]: JobState.FAILED,
                        uids["odd"]: JobState.DONE,
                    }

                wait_for(finished, timeout=120, what="the three jobs to finish",
                         details=lambda: f"{db.list_jobs()}\n{serve.log()[-3000:]}")  # fmt: skip
                admin = [
                    cli("status", "--config", config),
                    cli("jobs", "--config", config, "--json"),
                    cli("status", "--config", config, "--json"),
                ]

                # Private files: spool, derived series and database (with WAL/SHM).
                assert _private(settings.spool_path) == []
                db_path = Path(settings.database_url.removeprefix("sqlite:///"))
                db_files = [p for p in db_path.parent.iterdir() if p.name.startswith("node.db")]
                assert len(db_files) >= 2, db_files  # the database and its WAL at least
                for path in db_files:
                    assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

                # Retention purge: source and derived files of done jobs go, failed stay.
                jobs = {j.series_instance_uid: j for j in db.list_jobs()}
                sources = {k: db.job_instances(jobs[uid].id) for k, uid in uids.items()}
                derived_dirs = {k: Path(jobs[uid].output_dir or "") for k, uid in uids.items()
                                if jobs[uid].output_dir}  # fmt: skip
                assert all(p.is_file() for paths in sources.values() for p in paths)
                assert all(d.is_dir() for d in derived_dirs.values())
                result = cli("purge", "--config", config)  # retention_days = 7: too young
                assert result.returncode == 0 and "purged 0 series" in result.stdout
                result = cli("purge", "--config", config, "--older-than", "0")
                assert result.returncode == 0 and "purged 2 series" in result.stdout
                for kind in ("good", "odd"):
                    assert not any(p.exists() for p in sources[kind]), kind
                    assert not derived_dirs[kind].exists(), kind
                assert all(p.is_file() for p in sources["broken"])
                assert db.get_job(jobs[uids["good"]].id).purged_at is not None
                assert db.get_job(jobs[uids["broken"]].id).purged_at is None
                admin.append(result)
            log = serve.log()
        finally:
            db.close()

    # The derived series reached PACS with the patient module intact...
    assert len(pacs.sop_uids(jobs[uids["good"]].derived_series_uid or "")) == 3
    # ...but neither the node's log (INFO) nor the admin commands show patient data.
    outputs = [log, *(r.stdout + r.stderr for r in admin)]
    assert "INFO" in log and "job" in log and "closed: 3 stored" in log
    for text in outputs:
        flat = "".join(text.split())  # also catches a value the console wrapped
        for value in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "PHI-OTHER-5521", LONG_NAME):
            for needle in {value, value.replace("^", " "), *value.split("^")}:
                assert needle not in text and needle not in flat, f"{needle!r} in output"
    assert json.loads(admin[1].stdout)  # the jobs listing itself worked
