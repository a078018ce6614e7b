"""DCMTK ``storescp`` as a DICOM TLS (or plain) PACS for tests of the node's sending side.

In an activated virtual environment pynetdicom's own ``storescp`` / ``echoscu`` scripts
shadow DCMTK's, so the tools are resolved explicitly: the first candidate whose
``--version`` says DCMTK. Every peer listens on 127.0.0.1 only, every wait is bounded,
and the process is stopped by the context manager that started it. ``TCP_NODELAY=1``
is set for DCMTK, as its tools want.
"""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from _net_util import DCMTK_ENV, LOOPBACK, dcmtk_tool, free_port, stop_process
from _node_util import wait_for

STORESCP = dcmtk_tool("storescp")
ECHOSCU = dcmtk_tool("echoscu")
needs_dcmtk_tls = pytest.mark.skipif(
    STORESCP is None or ECHOSCU is None or shutil.which("openssl") is None,
    reason="DCMTK storescp/echoscu (apt: dcmtk) or the openssl CLI missing",
)


@dataclass
class TlsPacs:
    """A running DCMTK storescp (TLS or plain)."""

    port: int
    directory: Path
    ae_title: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def datasets(self) -> list[pydicom.Dataset]:
        """Every instance received so far."""
        return [pydicom.dcmread(p) for p in sorted(self.directory.iterdir()) if p.is_file()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _echo_ok(port: int, ae_title: str, tls_args: list[str]) -> bool:
    assert ECHOSCU is not None
    result = subprocess.run(
        [ECHOSCU, *tls_args, "-aec", ae_title, "-to", "5", "-ta", "5", LOOPBACK, str(port)],
        capture_output=True,
        timeout=30,
        check=False,
        env=DCMTK_ENV,
    )
    return result.returncode == 0


@contextmanager
def dcmtk_storescp(
    directory: Path,
    *,
    pki: dict[str, Path] | None,
    require_client_cert: bool = False,
    ae_title: str = "PACS",
) -> Iterator[TlsPacs]:
    """Run DCMTK storescp on 127.0.0.1 writing received instances into ``directory``.

    ``pki`` (from :func:`_net_util.make_test_pki`): DICOM TLS with its server
    certificate; ``require_client_cert``: only clients with a certificate from its CA
    get in (mutual TLS), else client certificates are not asked for. ``pki`` None:
    plain DICOM.
    """
    if STORESCP is None or ECHOSCU is None:
        pytest.skip("DCMTK storescp/echoscu missing")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tls: list[str] = []
    probe_tls: list[str] = []
    if pki is not None:
        tls = ["+tls", str(pki["server_key"]), str(pki["server_cert"]), "+cf", str(pki["ca"])]
        tls.append("-rc" if require_client_cert else "-ic")
        probe_tls = ["+tls", str(pki["client_key"]), str(pki["client_cert"]), "+cf", str(pki["ca"])]
    log_path = directory.parent / f"storescp-{port}.log"
    log = log_path.open("wb")
    args = [STORESCP, *tls, "-aet", ae_title, "-od", str(directory), "+xa", "-ts", "30"]
    args += ["-ta", "30", "+uf", str(port)]
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    pacs = TlsPacs(port, directory, ae_title, process, log_path)
    try:
        wait_for(
            lambda: process.poll() is not None or _echo_ok(port, ae_title, probe_tls),
            timeout=20,
            interval=0.2,
            what="storescp to answer C-ECHO",
        )
        if process.poll() is not None:
            pytest.fail(f"storescp exited with {process.returncode}:\n{pacs.log()[-2000:]}")
        yield pacs
    finally:
        stop_process(process)
        log.close()


@contextmanager
def https_front(target_port: int, cert: Path, key: Path) -> Iterator[int]:
    """An https server on 127.0.0.1 (Python's ssl, TLS 1.2+) passing every request on to
    the plain HTTP server at ``target_port`` and its answer back; yields its port.

    Orthanc 1.10's own https (``SslEnabled``) crashes on the first connection with this
    system's OpenSSL, so TLS is terminated here in front of the real Orthanc.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))

    class Forward(BaseHTTPRequestHandler):
        timeout = 30

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
            }
            upstream = http.client.HTTPConnection(LOOPBACK, target_port, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            self.send_response(answer.status, answer.reason)
            skip = ("transfer-encoding", "connection", "content-length", "content-encoding")
            for name, value in answer.getheaders():
                if name.lower() not in skip:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._forward()

        def do_POST(self) -> None:
            self._forward()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Forward)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
