"""DICOM TLS to destinations: DCMTK ``storescp +tls`` and Orthanc with DicomTlsEnabled as
the PACS, certificates made by the test (openssl CLI), everything on 127.0.0.1.

Covered: a forward over TLS, a destination whose certificate does not verify (wrong CA,
wrong name) or that does not speak TLS is refused and nothing is sent, mutual TLS with
and without our client certificate, the Forwarder booking a TLS failure as an attempt
with backoff and succeeding on retry, ``ldct-node echo`` over TLS printing one line,
and the config rules of the TLS keys.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import tomli_w
from _dicom_util import make_ct_series
from _forward_util import forwarding_job
from _net_util import LOOPBACK, free_port, make_test_pki, node_settings
from _node_util import cli
from _orthanc_util import needs_orthanc, running_orthanc
from _tls_util import dcmtk_storescp, needs_dcmtk_tls

from ldct_node.config import ConfigError, Destination, load_settings, parse_settings
from ldct_node.service.forward import Forwarder, echo, send_series
from ldct_node.store import JobState

PYNETDICOM_NOISE = ("Association request failed", "TCP Initialisation Error", "Traceback")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The PACS's CA with a server certificate (127.0.0.1, localhost) and a client one."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second, unrelated CA (and certificates it signed)."""
    return make_test_pki(tmp_path_factory.mktemp("other-pki"))


def tls_dest(
    port: int, ca: Path, *, client: dict[str, Path] | None = None, **extra: Any
) -> Destination:
    keys: dict[str, Any] = {"tls": True, "tls_ca": str(ca), **extra}
    if client is not None:
        keys |= {"tls_cert": str(client["client_cert"]), "tls_key": str(client["client_key"])}
    return Destination(name="pacs", ae_title="PACS", host=LOOPBACK, port=port, **keys)


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# ------------------------------------------------------------------------ DCMTK storescp


@needs_dcmtk_tls
def test_send_series_over_tls(
    tmp_path: Path, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ldct_node.service import pdata

    # An SSL socket must not be read by pynetdicom's reactor while another thread
    # writes it: TLS keeps pynetdicom's own C-STORE path.
    opened: list[object] = []
    real = pdata.DirectStoreSender.for_association
    monkeypatch.setattr(
        pdata.DirectStoreSender,
        "for_association",
        classmethod(lambda cls, assoc: opened.append(real(assoc)) or opened[-1]),
    )
    files = make_ct_series(tmp_path, n=3, size=16)
    with dcmtk_storescp(tmp_path / "pacs", pki=pki) as pacs:
        dest = tls_dest(pacs.port, pki["ca"])
        result = send_series(files, dest, calling_ae_title="LDCT_NODE")
        ok, message = echo(dest)
        received = pacs.datasets()
    assert result.ok, result.error
    assert result.n_sent == 3
    assert {str(ds.SOPInstanceUID) for ds in received} == uids(files)
    assert ok and "over TLS" in message and "TLS" in message
    assert opened == [None]


@needs_dcmtk_tls
def test_wrong_ca_is_refused_and_nothing_is_sent(
    tmp_path: Path, pki: dict[str, Path], other_pki: dict[str, Path]
) -> None:
    files = make_ct_series(tmp_path, n=2, size=16)
    with dcmtk_storescp(tmp_path / "pacs", pki=pki) as pacs:
        dest = tls_dest(pacs.port, other_pki["ca"])  # does not trust the PACS's CA
        result = send_series(files, dest, calling_ae_title="LDCT_NODE")
        ok, message = echo(dest)
        received = pacs.datasets()
    assert not result.ok and result.n_sent == 0
    assert result.error is not None
    assert "TLS handshake failed" in result.error and "not accepted" in result.error
    assert "tls_ca" in result.error
    assert not ok and "TLS handshake failed" in message
    assert received == []


@needs_dcmtk_tls
def test_certificate_name_is_checked(tmp_path: Path, pki: dict[str, Path]) -> None:
    files = make_ct_series(tmp_path, n=1, size=16)
    with dcmtk_storescp(tmp_path / "pacs", pki=pki) as pacs:
        wrong = tls_dest(pacs.port, pki["ca"], tls_server_name="pacs.example.org")
        result = send_series(files, wrong, calling_ae_title="LDCT_NODE")
        # The certificate carries DNS:localhost: that name verifies for a host given by IP.
        right = tls_dest(pacs.port, pki["ca"], tls_server_name="localhost")
        ok, message = echo(right)
        received = pacs.datasets()
    assert not result.ok and result.error is not None
    assert "pacs.example.org" in result.error and "tls_server_name" in result.error
    assert ok, message
    assert received == []


@needs_dcmtk_tls
def test_tls_destination_never_falls_back_to_plain(tmp_path: Path, pki: dict[str, Path]) -> None:
    files = make_ct_series(tmp_path, n=2, size=16)
    with dcmtk_storescp(tmp_path / "pacs", pki=None) as pacs:  # plain DICOM only
        dest = tls_dest(pacs.port, pki["ca"])
        result = send_series(files, dest, calling_ae_title="LDCT_NODE")
        received = pacs.datasets()
    assert not result.ok and result.n_sent == 0
    assert result.error is not None and "TLS handshake failed" in result.error
    assert received == []


@needs_dcmtk_tls
def test_mutual_tls(tmp_path: Path, pki: dict[str, Path], other_pki: dict[str, Path]) -> None:
    files = make_ct_series(tmp_path, n=2, size=16)
    with dcmtk_storescp(tmp_path / "pacs", pki=pki, require_client_cert=True) as pacs:
        without = send_series(files, tls_dest(pacs.port, pki["ca"]), calling_ae_title="LDCT_NODE")
        foreign = send_series(
            files, tls_dest(pacs.port, pki["ca"], client=other_pki), calling_ae_title="LDCT_NODE"
        )
        assert pacs.datasets() == []
        mutual = tls_dest(pacs.port, pki["ca"], client=pki)
        result = send_series(files, mutual, calling_ae_title="LDCT_NODE")
        ok, message = echo(mutual)
        received = pacs.datasets()
    for refused in (without, foreign):
        assert not refused.ok and refused.n_sent == 0
        assert refused.error is not None and "TLS" in refused.error, refused.error
    assert result.ok, result.error
    assert {str(ds.SOPInstanceUID) for ds in received} == uids(files)
    assert ok and "with our client certificate" in message


def test_unreadable_tls_files_are_a_clear_failed_attempt(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path, n=1, size=16)
    dest = tls_dest(free_port(), tmp_path / "missing-ca.pem")
    result = send_series(files, dest, calling_ae_title="LDCT_NODE")
    assert not result.ok and result.error is not None
    assert "tls_ca" in result.error and "missing-ca.pem" in result.error
    ok, message = echo(dest)
    assert not ok and "tls_ca" in message


@needs_dcmtk_tls
def test_forwarder_books_a_tls_failure_and_retries(
    tmp_path: Path, pki: dict[str, Path], other_pki: dict[str, Path]
) -> None:
    with dcmtk_storescp(tmp_path / "pacs", pki=pki) as pacs:

        def settings_with(ca: Path) -> Any:
            return node_settings(
                tmp_path,
                destinations=[
                    {
                        "name": "pacs",
                        "ae_title": "PACS",
                        "host": LOOPBACK,
                        "port": pacs.port,
                        "tls": True,
                        "tls_ca": str(ca),
                    }
                ],
                forward={"max_attempts": 3, "backoff_seconds": [30]},
            )

        wrong = settings_with(other_pki["ca"])
        db, job_id, files = forwarding_job(tmp_path, wrong, n=2)
        before = datetime.now(UTC)
        assert Forwarder(wrong, db).run_due() == 1
        (fwd,) = db.get_job(job_id).forwards
        assert fwd.state == "pending" and fwd.attempts == 1
        assert fwd.last_error is not None and "TLS handshake failed" in fwd.last_error
        assert fwd.next_attempt_at is not None
        assert fwd.next_attempt_at >= before + timedelta(seconds=29)
        assert pacs.datasets() == []
        # The operator fixes tls_ca; the next attempt (forced now) goes through.
        assert Forwarder(settings_with(pki["ca"]), db).forward(fwd) == JobState.DONE
        received = pacs.datasets()
    assert {str(ds.SOPInstanceUID) for ds in received} == uids(files)
    db.close()


def write_node_config(folder: Path, destination: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    data = {
        "node": {"host": LOOPBACK, "port": free_port()},
        "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.db"},
        "destinations": [destination],
    }
    config.write_text(tomli_w.dumps(data))
    return config


@needs_dcmtk_tls
@pytest.mark.slow
def test_cli_echo_over_tls_with_paths_relative_to_the_config(
    tmp_path: Path, pki: dict[str, Path], other_pki: dict[str, Path]
) -> None:
    node = tmp_path / "node"
    (node / "certs").mkdir(parents=True)
    (node / "certs" / "pacs-ca.pem").write_bytes(pki["ca"].read_bytes())
    (node / "certs" / "other-ca.pem").write_bytes(other_pki["ca"].read_bytes())
    with dcmtk_storescp(tmp_path / "pacs", pki=pki) as pacs:
        base = {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port}
        good = write_node_config(node, {**base, "tls": True, "tls_ca": "certs/pacs-ca.pem"})
        ok = cli("echo", "pacs", "--config", good)
        bad = write_node_config(node, {**base, "tls": True, "tls_ca": "certs/other-ca.pem"})
        refused = cli("echo", "pacs", "--config", bad)
    assert ok.returncode == 0, ok.stderr
    assert "succeeded over TLS" in ok.stdout
    assert refused.returncode == 1
    assert "TLS handshake failed" in refused.stderr
    # Only the command's own one-line message: none of pynetdicom's ERROR lines.
    assert not any(noise in refused.stderr for noise in PYNETDICOM_NOISE), refused.stderr
    assert len(refused.stderr.strip().splitlines()) <= 2, refused.stderr  # one (wrapped) line


def test_cli_echo_without_a_listener_prints_only_its_message(tmp_path: Path) -> None:
    config = write_node_config(
        tmp_path, {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": free_port()}
    )
    result = cli("echo", "pacs", "--config", config)
    assert result.returncode == 1
    assert "no association" in result.stderr
    assert not any(noise in result.stderr for noise in PYNETDICOM_NOISE), result.stderr


# --------------------------------------------------------------------------------- config


def dest_config(**keys: Any) -> dict[str, Any]:
    return {
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104, **keys}]
    }


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"tls": True}, "tls_ca is required with tls = true"),
        ({"tls_ca": "ca.pem"}, "tls = false"),
        ({"tls": True, "tls_ca": "ca.pem", "tls_cert": "c.pem"}, "tls_cert and tls_key"),
        ({"tls": "yes"}, "destinations[0].tls"),
        ({"tls": True, "tls_ca": "ca.pem", "tls_server_name": "a b"}, "tls_server_name"),
        ({"tls_verify": False}, "unknown key 'destinations[0].tls_verify'"),
        ({"url": "https://x/dicom-web"}, "'url' is only used with type = 'dicomweb'"),
    ],
)
def test_tls_config_errors_name_the_key(keys: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match="destinations") as info:
        parse_settings(dest_config(**keys), source="cfg.toml")
    assert expected in str(info.value) and "cfg.toml" in str(info.value)


def test_tls_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = write_node_config(
        tmp_path / "etc",
        {
            "name": "pacs",
            "ae_title": "PACS",
            "host": "pacs.example.org",
            "port": 2762,
            "tls": True,
            "tls_ca": "certs/ca.pem",
            "tls_cert": "/abs/node.pem",
            "tls_key": "certs/node.key",
        },
    )
    settings = load_settings(config)
    dest = settings.destination("pacs").with_paths_resolved(settings.base_dir)
    assert dest.tls_ca == str((tmp_path / "etc" / "certs" / "ca.pem").resolve())
    assert dest.tls_cert == "/abs/node.pem"
    assert dest.tls_key == str((tmp_path / "etc" / "certs" / "node.key").resolve())
    assert dest.type == "dimse" and dest.uses_tls


def test_shipped_config_still_loads_unchanged() -> None:
    settings = load_settings(Path(__file__).resolve().parents[1] / "config.toml")
    (dest,) = settings.destinations
    assert dest.type == "dimse" and not dest.tls and not dest.uses_tls


# -------------------------------------------------------------------------------- Orthanc


@needs_orthanc
@needs_dcmtk_tls
@pytest.mark.slow
def test_forward_to_orthanc_over_mutual_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    tls_options = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki["server_cert"]),
        "DicomTlsPrivateKey": str(pki["server_key"]),
        "DicomTlsTrustedCertificates": str(pki["ca"]),
        "DicomTlsRemoteCertificateRequired": True,
    }
    node_port = free_port()
    series_uid = "1.2.826.0.1.3680043.99.8.1"
    with running_orthanc(
        tmp_path / "orthanc", {"ldct": ("LDCT_NODE", node_port)}, extra=tls_options
    ) as orthanc:
        version = str(orthanc.get("/system").get("Version", "0"))
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (1, 9):
            pytest.skip(f"Orthanc {version} has no DICOM TLS (1.9.0+)")
        destination = {
            "name": "orthanc",
            "ae_title": orthanc.ae_title,
            "host": LOOPBACK,
            "port": orthanc.dicom_port,
            "tls": True,
            "tls_ca": str(pki["ca"]),
        }
        # Without our client certificate Orthanc refuses: nothing arrives.
        settings = node_settings(
            tmp_path, destinations=[destination], forward={"backoff_seconds": [30]}
        )
        db, job_id, files = forwarding_job(tmp_path, settings, n=3, series_uid=series_uid)
        assert Forwarder(settings, db).run_due() == 1
        (fwd,) = db.get_job(job_id).forwards
        assert fwd.state == "pending" and fwd.last_error is not None
        assert orthanc.series_by_uid(series_uid) is None
        # With it (mutual TLS) the series arrives.
        mutual = {
            **destination,
            "tls_cert": str(pki["client_cert"]),
            "tls_key": str(pki["client_key"]),
        }
        settings = node_settings(tmp_path, destinations=[mutual])
        ok, message = echo(settings.destination("orthanc"))
        assert ok, message
        assert Forwarder(settings, db).forward(fwd) == JobState.DONE, orthanc.log()[-3000:]
        series = orthanc.series_by_uid(series_uid)
        assert series is not None
        instances = orthanc.get(f"/series/{series['ID']}/instances")
        stored = {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in instances}
    assert stored == uids(files)
    db.close()


@needs_dcmtk_tls
def test_an_encrypted_client_key_is_a_clear_error_not_a_prompt(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    key = tmp_path / "encrypted.key"
    made = subprocess.run(
        ["openssl", "genrsa", "-aes256", "-passout", "pass:secret", "-out", str(key), "2048"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    dest = tls_dest(free_port(), pki["ca"], tls_cert=str(pki["client_cert"]), tls_key=str(key))
    ok, message = echo(dest)  # would block on a passphrase prompt if OpenSSL asked
    assert not ok and "tls_cert/tls_key" in message and "without passphrase" in message
