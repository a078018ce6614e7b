"""Orthanc (Debian package ``orthanc``) as a real PACS in tests.

:func:`running_orthanc` starts ``Orthanc <config.json>`` with its own storage folder, free
ports and one DICOM modality entry per peer, waits until its REST API answers and stops
it on exit. Orthanc 1.10 has no option to bind to one address, so the config shuts
everything else out instead: the REST API only answers local clients
(``RemoteAccessAllowed`` false), and C-ECHO / C-STORE are only accepted from the
configured modalities at their host (``DicomAlwaysAllow*`` false,
``DicomCheckModalityHost`` true). :class:`Orthanc` wraps the few REST calls the tests use
(urllib only, every call with a timeout).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _net_util import LOOPBACK, free_port, stop_process
from _node_util import wait_for

ORTHANC_BIN = shutil.which("Orthanc") or (
    "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None
)
needs_orthanc = pytest.mark.skipif(ORTHANC_BIN is None, reason="Orthanc (apt: orthanc) missing")
HTTP_TIMEOUT_S = 60


class OrthancError(RuntimeError):
    """A REST call answered with an HTTP error; the message has Orthanc's details."""


@dataclass
class Orthanc:
    """A running Orthanc: its ports, AE title, folder and REST helpers."""

    http_port: int
    dicom_port: int
    ae_title: str
    folder: Path
    process: subprocess.Popen[bytes]
    #: (user, password) for HTTP basic authentication, when the instance requires it.
    auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.auth is not None:
            token = base64.b64encode(":".join(self.auth).encode()).decode("ascii")
            req.add_header("Authorization", f"Basic {token}")
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from None

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        answer = self.request("POST", path, raw)
        return json.loads(answer) if answer.strip() else None

    def upload(self, path: Path) -> dict[str, Any]:
        """POST a DICOM file to /instances; returns Orthanc's answer (IDs, Status)."""
        answer = self.post("/instances", Path(path).read_bytes())
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload of {path} answered {answer}")
        return dict(answer)

    def series_by_uid(self, series_uid: str) -> dict[str, Any] | None:
        """The /series/{id} resource with this SeriesInstanceUID, or None."""
        found = self.post(
            "/tools/lookup", series_uid.encode()
        )  # [{"ID":..., "Type": "Series", ...}]
        for item in found or []:
            if item.get("Type") == "Series":
                return dict(self.get(f"/series/{item['ID']}"))
        return None

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{study_id}/series"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        """Simplified tags of an instance (keyword -> value; sequences as lists)."""
        return dict(self.get(f"/instances/{instance_id}/tags?simplify"))

    def download(self, instance_id: str, target: Path) -> Path:
        target.write_bytes(self.request("GET", f"/instances/{instance_id}/file"))
        return target

    def log(self) -> str:
        log = self.folder / "orthanc.log"
        return log.read_text(errors="replace") if log.exists() else ""


@contextmanager
def running_orthanc(
    folder: Path,
    modalities: dict[str, tuple[str, int]],
    *,
    ae_title: str = "ORTHANC",
    extra: dict[str, Any] | None = None,
    users: dict[str, str] | None = None,
) -> Iterator[Orthanc]:
    """Start Orthanc in ``folder`` knowing ``modalities`` (name -> (AE title, port) on
    127.0.0.1); stop it (and wait for it) on exit.

    ``extra`` is merged over the generated configuration (e.g. DICOM TLS options or
    ``Plugins``); ``users`` (name -> password) turns HTTP authentication on, and the
    yielded object's REST calls use the first user.
    """
    if ORTHANC_BIN is None:
        pytest.skip("Orthanc is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config: dict[str, Any] = {
        "Name": "ldct-node-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "LuaScripts": [],
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "DicomScuTimeout": 30,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {
            name: {"AET": aet, "Host": LOOPBACK, "Port": port}
            for name, (aet, port) in modalities.items()
        },
    }
    if users:
        config["AuthenticationEnabled"] = True
        config["RegisteredUsers"] = dict(users)
    config.update(extra or {})
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = (folder / "orthanc.log").open("wb")
    process = subprocess.Popen(
        [str(ORTHANC_BIN), str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=folder
    )
    auth = next(iter(users.items())) if users else None
    server = Orthanc(http_port, dicom_port, ae_title, folder, process, auth)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited with {process.returncode}:\n{server.log()[-3000:]}")
        try:
            return bool(server.get("/system").get("DicomPort") == dicom_port)
        except (OSError, OrthancError, ValueError):
            return False

    try:
        wait_for(ready, timeout=60, interval=0.2, what="Orthanc's REST API")
        yield server
    finally:
        stop_process(process, grace=30)
        log.close()
