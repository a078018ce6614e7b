"""DICOMweb destinations (STOW-RS): Orthanc with its DICOMweb plugin (Debian package
``orthanc-dicomweb``) and HTTP basic authentication as the PACS, on 127.0.0.1.

Covered: a derived series stored and checked over Orthanc's REST API, credentials from
a file (relative to the config) and from the environment, a wrong password booked as a
failed attempt with backoff and succeeding on retry once fixed, a partial failure
(Orthanc refusing one instance) failing the attempt, https with the destination's own
CA (and a CA that does not match refused), ``ldct-node echo`` on a DICOMweb destination,
the password absent from errors, logs and ``config check``, and the config rules.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import tomli_w
from _dicom_util import make_ct_series
from _forward_util import forwarding_job
from _net_util import LOOPBACK, free_port, make_test_pki, needs_openssl, node_settings
from _node_util import cli
from _orthanc_util import Orthanc, needs_orthanc, running_orthanc
from _tls_util import https_front

from ldct_node.config import ConfigError, Destination, parse_settings
from ldct_node.service.dicomweb import read_password
from ldct_node.service.forward import Forwarder, echo, send_series
from ldct_node.store import JobState

PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7",
)
DICOMWEB_PLUGIN = next((p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)
needs_dicomweb = pytest.mark.skipif(
    DICOMWEB_PLUGIN is None, reason="Orthanc DICOMweb plugin (apt: orthanc-dicomweb) missing"
)


def orthanc_test(test: Any) -> Any:
    """Marks a test that runs Orthanc with the DICOMweb plugin (slow: seconds each)."""
    return needs_orthanc(needs_dicomweb(pytest.mark.slow(test)))


USER = "ldct"
PASSWORD = "s3cret-Pa55"
# Makes Orthanc fail to store the instance with InstanceNumber 2 (a Lua error while
# receiving it). Returning false instead would not do: Orthanc 1.10's DICOMweb plugin
# reports filtered-out instances as stored.
REFUSE_SECOND = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.InstanceNumber == '2' then
    error('refused by the test')
  end
  return true
end
"""


def dicomweb_options(tmp: Path, *, lua: str | None = None, https: Path | None = None) -> dict:
    options: dict[str, Any] = {
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    if lua is not None:
        script = tmp / "filter.lua"
        script.write_text(lua)
        options["LuaScripts"] = [str(script)]
    if https is not None:
        options |= {"SslEnabled": True, "SslCertificate": str(https)}
    return options


@dataclass
class Web:
    orthanc: Orthanc
    url: str


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    folder = tmp_path_factory.mktemp("orthanc-web")
    with running_orthanc(
        folder / "orthanc",
        {},
        extra=dicomweb_options(folder, lua=REFUSE_SECOND),
        users={USER: PASSWORD},
    ) as orthanc:
        yield Web(orthanc, f"{orthanc.url}/dicom-web")


def web_dest(url: str, **keys: Any) -> dict[str, Any]:
    return {"name": "web", "type": "dicomweb", "url": url, **keys}


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def stored_uids(orthanc: Orthanc, series_uid: str) -> set[str]:
    series = orthanc.series_by_uid(series_uid)
    if series is None:
        return set()
    instances = orthanc.get(f"/series/{series['ID']}/instances")
    return {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in instances}


def only_first(tmp_path: Path, n: int, series_uid: str) -> list[Path]:
    """A series whose instances all pass the Lua filter (InstanceNumber 2 left out)."""
    files = make_ct_series(tmp_path, n=n + 1, size=16, series_uid=series_uid, subdir="web")
    second = next(f for f in files if int(pydicom.dcmread(f).InstanceNumber) == 2)
    second.unlink()
    return [f for f in files if f != second]


@orthanc_test
def test_stow_with_password_file_and_retry_after_a_wrong_password(
    tmp_path: Path, web: Web, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    (tmp_path / "secrets").mkdir()
    password_file = tmp_path / "secrets" / "pacs.pw"
    password_file.write_text("wrong-password\n")
    settings = node_settings(
        tmp_path,
        destinations=[web_dest(web.url, username=USER, password_file="secrets/pacs.pw")],
        forward={"max_attempts": 3, "backoff_seconds": [30]},
    )
    series_uid = "1.2.826.0.1.3680043.99.9.1"
    db, job_id, _ = forwarding_job(tmp_path, settings, n=1, series_uid=series_uid)
    # forwarding_job's stand-in files include InstanceNumber 1 only: all pass the filter.
    before = datetime.now(UTC)
    assert Forwarder(settings, db).run_due() == 1
    (fwd,) = db.get_job(job_id).forwards
    assert fwd.state == "pending" and fwd.attempts == 1
    assert fwd.last_error is not None
    assert "HTTP 401" in fwd.last_error and "password_file" in fwd.last_error
    assert fwd.next_attempt_at is not None
    assert fwd.next_attempt_at >= before + timedelta(seconds=29)
    assert stored_uids(web.orthanc, series_uid) == set()
    summary = db.status_summary()
    assert summary.pending_forwards == 1

    # Fixed in the file: read again at the next attempt, no restart needed.
    password_file.write_text(PASSWORD + "\n")
    assert Forwarder(settings, db).forward(fwd) == JobState.DONE
    job = db.get_job(job_id)
    assert [(f.state, f.n_sent) for f in job.forwards] == [("sent", 1)]
    output_dir = job.output_dir
    assert output_dir is not None
    sent = sorted(Path(output_dir).glob("*.dcm"))
    assert stored_uids(web.orthanc, series_uid) == uids(sent)
    db.close()
    assert PASSWORD not in caplog.text and "wrong-password" not in caplog.text


@orthanc_test
def test_stow_a_series_in_several_requests(tmp_path: Path, web: Web, monkeypatch: Any) -> None:
    from ldct_node.service import dicomweb

    monkeypatch.setattr(dicomweb, "MAX_BATCH_INSTANCES", 2)
    series_uid = "1.2.826.0.1.3680043.99.9.2"
    files = only_first(tmp_path, 5, series_uid)
    monkeypatch.setenv("LDCT_TEST_PACS_PASSWORD", PASSWORD)
    dest = Destination.model_validate(
        web_dest(web.url, username=USER, password_env="LDCT_TEST_PACS_PASSWORD")
    )
    result = send_series(files, dest, calling_ae_title="LDCT_NODE")
    assert result.ok, result.error
    assert result.n_sent == 5
    assert stored_uids(web.orthanc, series_uid) == uids(files)


@orthanc_test
def test_partial_failure_fails_the_attempt(tmp_path: Path, web: Web) -> None:
    series_uid = "1.2.826.0.1.3680043.99.9.3"
    files = make_ct_series(tmp_path, n=3, size=16, series_uid=series_uid)
    (tmp_path / "pw").write_text(PASSWORD)
    dest = Destination.model_validate(
        web_dest(web.url, username=USER, password_file=str(tmp_path / "pw"))
    )
    result = send_series(files, dest, calling_ae_title="LDCT_NODE")
    assert not result.ok and result.n_sent == 0
    assert result.error is not None
    assert "STOW-RS" in result.error and "HTTP 200" in result.error
    assert "did not confirm" in result.error or "failed" in result.error, result.error
    # Orthanc kept some: the attempt still failed as a whole (and will be resent).
    stored = stored_uids(web.orthanc, series_uid)
    assert stored and stored < uids(files)


@orthanc_test
def test_missing_or_wrong_credentials(tmp_path: Path, web: Web, monkeypatch: Any) -> None:
    files = make_ct_series(tmp_path, n=1, size=16, series_uid="1.2.826.0.1.3680043.99.9.4")
    anonymous = Destination.model_validate(web_dest(web.url))
    result = send_series(files, anonymous, calling_ae_title="LDCT_NODE")
    assert not result.ok and result.error is not None
    assert "HTTP 401" in result.error and "set username" in result.error
    monkeypatch.delenv("LDCT_TEST_UNSET_PW", raising=False)
    unset = Destination.model_validate(
        web_dest(web.url, username=USER, password_env="LDCT_TEST_UNSET_PW")
    )
    result = send_series(files, unset, calling_ae_title="LDCT_NODE")
    assert not result.ok and result.error is not None
    assert "password_env" in result.error and "LDCT_TEST_UNSET_PW" in result.error
    missing = Destination.model_validate(
        web_dest(web.url, username=USER, password_file=str(tmp_path / "nope"))
    )
    ok, message = echo(missing)
    assert not ok and "password_file" in message and "nope" in message


@orthanc_test
def test_cli_echo_and_config_check_never_show_the_password(tmp_path: Path, web: Web) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    config = tmp_path / "config.toml"

    def write(url: str, password_file: str = "pw") -> None:
        data = {
            "node": {"host": LOOPBACK, "port": free_port()},
            "storage": {"spool_dir": "spool", "database_url": "sqlite:///node.db"},
            "destinations": [web_dest(url, username=USER, password_file=password_file)],
        }
        config.write_text(tomli_w.dumps(data))

    write(web.url)
    ok = cli("echo", "web", "--config", config)
    checked = cli("config", "check", "--config", config)
    checked_json = cli("config", "check", "--json", "--config", config)
    write(web.url.replace("/dicom-web", "/no-such-root"))
    not_found = cli("echo", "web", "--config", config)
    (tmp_path / "bad").write_text("not-it\n")
    write(web.url, password_file="bad")
    refused = cli("echo", "web", "--config", config)
    assert ok.returncode == 0, ok.stderr
    assert "QIDO-RS" in ok.stdout and "HTTP 200" in ok.stdout and USER in ok.stdout
    assert not_found.returncode == 1 and "HTTP 404" in not_found.stderr
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    assert checked.returncode == 0 and checked_json.returncode == 0, checked.stderr
    assert "dicomweb" in checked.stdout and "password_file" in checked.stdout
    for run in (ok, checked, checked_json, not_found, refused):
        assert PASSWORD not in run.stdout + run.stderr
        assert "not-it" not in run.stdout + run.stderr


@orthanc_test
@needs_openssl
def test_https_with_the_destinations_own_ca(tmp_path: Path, web: Web) -> None:
    pki = make_test_pki(tmp_path / "pki")
    other = make_test_pki(tmp_path / "other")
    series_uid = "1.2.826.0.1.3680043.99.9.5"
    files = only_first(tmp_path, 2, series_uid)
    (tmp_path / "pw").write_text(PASSWORD)
    creds = {"username": USER, "password_file": str(tmp_path / "pw")}
    with https_front(web.orthanc.http_port, pki["server_cert"], pki["server_key"]) as port:
        url = f"https://{LOOPBACK}:{port}/dicom-web"
        wrong = Destination.model_validate(web_dest(url, tls_ca=str(other["ca"]), **creds))
        refused = send_series(files, wrong, calling_ae_title="LDCT_NODE")
        nothing = stored_uids(web.orthanc, series_uid)
        right = Destination.model_validate(web_dest(url, tls_ca=str(pki["ca"]), **creds))
        ok, message = echo(right)
        result = send_series(files, right, calling_ae_title="LDCT_NODE")
    assert not refused.ok and refused.error is not None
    assert "certificate was not accepted" in refused.error and "tls_ca" in refused.error
    assert nothing == set()
    assert ok and "over TLS" in message, message
    assert result.ok and result.n_sent == 2, result.error
    assert stored_uids(web.orthanc, series_uid) == uids(files)


# --------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, "url is required"),
        ({"url": "ftp://h/x"}, "url must be http"),
        ({"url": "https://u:p@h/x"}, "must not hold credentials"),
        ({"url": "https://h/x?a=1"}, "without ?query"),
        ({"url": "https://h/x", "host": "h"}, "'host' is not used with type = 'dicomweb'"),
        ({"url": "https://h/x", "username": "u"}, "username needs password_file or password_env"),
        ({"url": "https://h/x", "password_env": "P"}, "need username"),
        (
            {"url": "https://h/x", "username": "u", "password_env": "P", "password_file": "f"},
            "not both",
        ),
        ({"url": "https://h/x", "username": "u", "password_env": "A-B"}, "password_env"),
        ({"url": "http://h/x", "tls_ca": "ca.pem"}, "need an https url"),
        ({"url": "https://h/x", "password": "x"}, "unknown key 'destinations[0].password'"),
    ],
)
def test_dicomweb_config_errors_name_the_key(keys: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"destinations": [{"name": "w", "type": "dicomweb", **keys}]}, source="c")
    assert expected in str(info.value)


def test_dicomweb_config_defaults_and_paths(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "destinations": [
                web_dest("https://pacs.example/dicom-web/", username="u", password_file="pw"),
                {"name": "plain", "ae_title": "PACS", "host": "h", "port": 104},
            ]
        },
        base_dir=str(tmp_path),
    )
    web, plain = settings.destinations
    assert (web.type, web.host, web.port, web.uses_tls) == ("dicomweb", "pacs.example", 443, True)
    assert plain.type == "dimse"
    resolved = web.with_paths_resolved(settings.base_dir)
    assert resolved.password_file == str(tmp_path / "pw")
    (tmp_path / "pw").write_text("line one\nignored\n")
    assert read_password(resolved) == "line one"
