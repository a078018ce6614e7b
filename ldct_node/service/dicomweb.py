"""DICOMweb destinations (``[[destinations]] type = "dicomweb"``): STOW-RS over HTTP(S).

A derived series is POSTed to ``<url>/studies`` as ``multipart/related;
type="application/dicom"`` bodies of at most :data:`MAX_BATCH_INSTANCES` instances
(and about :data:`MAX_BATCH_BYTES`), so a shutdown can stop between requests and a
large series is never held in memory at once. A request succeeds when the server
answers 2xx and its response (a DICOM JSON dataset) lists no instance in
FailedSOPSequence (0008,1198) and, when it has a ReferencedSOPSequence (0008,1199),
confirms every instance sent. Anything else (an HTTP error, a partial failure, no
connection, a TLS or authentication failure) fails the whole attempt with one line
saying what went wrong; :class:`ldct_node.service.forward.Forwarder` books it and retries with
the normal backoff, exactly as for C-STORE destinations. A resend is harmless: the
derived UIDs are deterministic.

Credentials: HTTP basic authentication as ``username``, the password read at each
attempt from ``password_file`` (first line; a rotated password is picked up without a
restart) or the environment variable named by ``password_env``. It is sent with every
request (no challenge round trip) and appears in no log or error message; redirects
are not followed, so it cannot be carried to another host. https verifies the server's
certificate (``tls_ca``, else the system's trust store) and its host name; TLS 1.2+.

:func:`echo` checks reachability and credentials with a QIDO-RS query for one study.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import secrets
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread

from ldct_node.config import Destination
from ldct_node.service.forward import SendResult, client_tls_context, describe_status

logger = logging.getLogger(__name__)

#: Instances per STOW-RS request, at most.
MAX_BATCH_INSTANCES = 32
#: A request is closed once its files reach this many bytes (a larger file goes alone).
MAX_BATCH_BYTES = 64 * 1024 * 1024
HTTP_TIMEOUT_S = 120.0
ECHO_TIMEOUT_S = 30.0
#: Bytes of a response body read, at most.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"

_warned_plain_auth: set[str] = set()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: they would carry the Authorization header elsewhere."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


def _base(dest: Destination) -> str:
    return dest.url.rstrip("/")


def _peer(dest: Destination) -> str:
    return f"{dest.name} ({dest.url})"


def read_password(dest: Destination) -> str | None:
    """The password of ``dest`` (None without ``username``), read now.

    Raises
    ------
    ValueError
        Naming the destination and ``password_file`` / ``password_env`` when it cannot
        be read or is empty (the message never holds the password).
    """
    if not dest.username:
        return None
    where = f"destinations {dest.name!r}"
    if dest.password_file:
        try:
            text = Path(dest.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ValueError(
                f"{where}: password_file: cannot read {dest.password_file}: {why}"
            ) from None
        lines = text.splitlines()
        password = lines[0] if lines else ""
        if not password:
            raise ValueError(f"{where}: password_file: {dest.password_file} is empty")
        return password
    value = os.environ.get(dest.password_env)
    if not value:
        raise ValueError(
            f"{where}: password_env: environment variable {dest.password_env} is not set or empty"
        )
    return value


def _headers(dest: Destination) -> dict[str, str]:
    password = read_password(dest)
    if password is None:
        return {}
    if not dest.uses_tls and dest.name not in _warned_plain_auth:
        _warned_plain_auth.add(dest.name)
        logger.warning(
            "destination %s: sending HTTP basic credentials over plain http; use https",
            dest.name,
        )
    token = base64.b64encode(f"{dest.username}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def _opener(dest: Destination) -> urllib.request.OpenerDirector:
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if dest.uses_tls:
        handlers.append(urllib.request.HTTPSHandler(context=client_tls_context(dest)))
    return urllib.request.build_opener(*handlers)


def _printable(text: str, limit: int = 200) -> str:
    """``text`` on one line, control characters escaped, at most ``limit`` characters."""
    flat = " ".join(text.split())
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in flat)
    return shown[:limit] + ("..." if len(shown) > limit else "")


def _connection_error(dest: Destination, exc: BaseException) -> str:
    reason: Any = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        why = str(reason.verify_message or reason.reason or reason)
        return (
            f"cannot reach {_peer(dest)}: TLS: its certificate was not accepted ({why}); "
            "check tls_ca and the host name in url"
        )
    if isinstance(reason, ssl.SSLError):
        return f"cannot reach {_peer(dest)}: TLS handshake failed: {reason.reason or reason}"
    if isinstance(reason, TimeoutError):
        return f"cannot reach {_peer(dest)}: timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return f"cannot reach {_peer(dest)}: {reason.strerror}"
    return f"cannot reach {_peer(dest)}: {type(reason).__name__}: {_printable(str(reason))}"


def _request(
    dest: Destination,
    request: urllib.request.Request,
    timeout: float,
) -> tuple[int, str, bytes]:
    """(HTTP status, reason, body) of ``request``; HTTP errors are answers too.

    Raises
    ------
    urllib.error.URLError, OSError, http.client.HTTPException
        When there is no answer (no connection, TLS, timeout).
    """
    opener = _opener(dest)
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status), str(response.reason), response.read(MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(MAX_RESPONSE_BYTES)
        except (OSError, http.client.HTTPException):
            body = b""
        finally:
            exc.close()
        return int(exc.code), str(exc.reason), body


def _http_error(dest: Destination, what: str, status: int, reason: str, body: bytes) -> str:
    """One line for a non-2xx answer."""
    text = f"{_peer(dest)} answered {what} with HTTP {status} {reason}".rstrip()
    if status in (401, 403):
        if dest.username:
            return f"{text}: check username and the password in password_file / password_env"
        return f"{text}: it wants credentials (set username and password_file or password_env)"
    if status in (301, 302, 303, 307, 308):
        return f"{text}: redirects are not followed; set url to the final DICOMweb base URL"
    detail = _failed_sops_text(body) or _body_text(body)
    return f"{text}{': ' + detail if detail else ''}"


def _body_text(body: bytes) -> str:
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return _printable(body.decode("utf-8", errors="replace"))
    if isinstance(data, dict):
        parts = [str(data[k]) for k in ("Message", "Details", "error", "message") if k in data]
        if parts:
            return _printable("; ".join(parts))
    return ""


def _dataset(body: bytes) -> dict[str, Any] | None:
    """The DICOM JSON dataset of a STOW-RS response (None when there is none)."""
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    return data if isinstance(data, dict) else None


def _items(dataset: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _failures(dataset: dict[str, Any]) -> list[tuple[str, int | None]]:
    """(SOPInstanceUID, FailureReason) of each FailedSOPSequence item."""
    out = []
    for item in _items(dataset, FAILED_SOP_SEQUENCE):
        code = _first(item, FAILURE_REASON)
        out.append((str(_first(item, REFERENCED_SOP_INSTANCE_UID) or "?"), _int_or_none(code)))
    return out


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _failed_sops_text(body: bytes) -> str:
    dataset = _dataset(body)
    if dataset is None:
        return ""
    failures = _failures(dataset)
    if not failures:
        return ""
    uid, code = failures[0]
    reason = describe_status(code) if code is not None else "no reason given"
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"{len(failures)} instance(s) failed, e.g. {_printable(uid, 70)}: {reason}{more}"


def _batches(paths: Sequence[Path]) -> Iterator[list[Path]]:
    batch: list[Path] = []
    size = 0
    for path in paths:
        batch.append(path)
        size += path.stat().st_size
        if len(batch) >= MAX_BATCH_INSTANCES or size >= MAX_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _multipart(files: Sequence[bytes]) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/related request with one part per file."""
    while True:
        boundary = f"ldct-node-{secrets.token_hex(16)}"
        marker = boundary.encode("ascii")
        if not any(marker in data for data in files):
            break
    parts: list[bytes] = []
    for data in files:
        parts += [b"--" + marker + b"\r\nContent-Type: application/dicom\r\n\r\n", data, b"\r\n"]
    parts.append(b"--" + marker + b"--\r\n")
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(parts), content_type


def _store_batch(dest: Destination, batch: Sequence[Path], headers: dict[str, str]) -> str | None:
    """POST one batch; None when every instance was stored, else why not."""
    files = [path.read_bytes() for path in batch]
    uids = [
        str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for path in batch
    ]
    body, content_type = _multipart(files)
    request = urllib.request.Request(
        f"{_base(dest)}/studies",
        data=body,
        method="POST",
        headers={**headers, "Content-Type": content_type, "Accept": "application/dicom+json"},
    )
    status, reason, answer = _request(dest, request, HTTP_TIMEOUT_S)
    if not 200 <= status < 300:
        return _http_error(dest, "STOW-RS", status, reason, answer)
    dataset = _dataset(answer)
    if dataset is None:
        return None  # 2xx without a response dataset: nothing says anything failed
    failed = _failed_sops_text(answer)
    if failed:
        return f"{_peer(dest)} answered STOW-RS with HTTP {status}: {failed}"
    if REFERENCED_SOP_SEQUENCE in dataset:
        confirmed = {
            str(_first(item, REFERENCED_SOP_INSTANCE_UID))
            for item in _items(dataset, REFERENCED_SOP_SEQUENCE)
        }
        missing = [uid for uid in uids if uid not in confirmed]
        if missing:
            return (
                f"{_peer(dest)} answered STOW-RS with HTTP {status} but did not confirm "
                f"{len(missing)} of {len(uids)} instance(s), e.g. {_printable(missing[0], 70)}"
            )
    return None


def send_series(
    paths: Sequence[Path],
    destination: Destination,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> SendResult:
    """STOW-RS ``paths`` to ``destination`` (``type = "dicomweb"``).

    Stops at the first request that fails and reports why.

    Parameters
    ----------
    paths
        Part 10 files of one derived series.
    destination
        The DICOMweb destination, its paths absolute.
    should_stop
        Checked before each request; when it returns True the result is ``interrupted``.
    """
    if isinstance(paths, str | Path):
        raise TypeError("paths: expected a sequence of paths, not a single path")
    if not paths:
        raise ValueError("paths: nothing to send")
    if destination.type != "dicomweb":
        raise ValueError(f"destination: {destination.name!r} is not a DICOMweb destination")
    total = len(paths)
    sent = 0
    try:
        headers = _headers(destination)
        for batch in _batches(paths):
            if should_stop is not None and should_stop():
                return SendResult(False, sent, total, "interrupted by shutdown", interrupted=True)
            error = _store_batch(destination, batch, headers)
            if error is not None:
                return SendResult(False, sent, total, f"{error} (after {sent}/{total} stored)")
            sent += len(batch)
    except ValueError as exc:  # credentials or TLS files that cannot be loaded
        return SendResult(False, sent, total, str(exc))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:
            return SendResult(False, sent, total, f"cannot read derived files: {exc}")
        return SendResult(
            False, sent, total, f"{_connection_error(destination, exc)} (after {sent}/{total})"
        )
    return SendResult(True, sent, total)


def echo(destination: Destination) -> tuple[bool, str]:
    """Check that ``destination`` answers an (authenticated) QIDO-RS query.

    GETs ``<url>/studies?limit=1`` and discards the answer.

    Returns
    -------
    tuple[bool, str]
        Whether it answered 2xx, and a one-line message saying what happened.
    """
    if destination.type != "dicomweb":
        raise ValueError(f"destination: {destination.name!r} is not a DICOMweb destination")
    started = time.monotonic()
    try:
        headers = _headers(destination)
        request = urllib.request.Request(
            f"{_base(destination)}/studies?limit=1",
            method="GET",
            headers={**headers, "Accept": "application/dicom+json"},
        )
        status, reason, body = _request(destination, request, ECHO_TIMEOUT_S)
    except ValueError as exc:
        return False, str(exc)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        return False, _connection_error(destination, exc)
    elapsed_ms = (time.monotonic() - started) * 1000.0
    if not 200 <= status < 300:
        return False, _http_error(destination, "QIDO-RS", status, reason, body)
    who = f" as {destination.username!r}" if destination.username else " (no credentials)"
    tls = " over TLS" if destination.uses_tls else ""
    return True, (
        f"DICOMweb {_peer(destination)} answered QIDO-RS with HTTP {status}{tls}{who} "
        f"in {elapsed_ms:.0f} ms"
    )
