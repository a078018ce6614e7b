"""What ``serve`` needs before anything listens, checked without creating anything.

``ldct-node config check`` runs every check (loading the networks too) and prints one
line per check (destinations: their TLS files and passwords load; the peers themselves
are for ``ldct-node echo``); ``serve`` runs the cheap ones (paths, ports) before it loads the
networks, so a port in use or an unwritable spool is reported at once, and a failed
start leaves no spool folder or database file behind.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from ldct_node.config import Destination, Settings
from ldct_node.service.netguard import reuse_port_option


@dataclass(frozen=True)
class Check:
    """One thing ``serve`` needs: ``name`` (e.g. "spool"), whether it holds, and what was
    found (a path, a model version, or what is wrong and which key to change)."""

    name: str
    ok: bool
    detail: str


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_dir(path: Path, key: str) -> str | None:
    """None if ``path`` is (or can be created as) a writable folder, else the problem."""
    if path.exists():
        if not path.is_dir():
            return f"{path} is not a folder ({key})"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable by this user ({key})"
        return None
    parent = _nearest_existing(path.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {parent} is not writable by this user ({key})"
    return None


def check_spool(settings: Settings) -> Check:
    path = settings.spool_path
    problem = _writable_dir(path, "storage.spool_dir")
    if problem:
        return Check("spool", False, problem)
    return Check("spool", True, f"{path} ({'exists' if path.exists() else 'will be created'})")


def check_database(settings: Settings) -> Check:
    """SQLite: the file (or its folder) is writable. Other servers: a connection works."""
    url = make_url(settings.database_url)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return Check("database", True, f"{shown} (in memory: jobs are lost at exit)")
        path = Path(url.database).expanduser()
        if path.exists():
            if not os.access(path, os.R_OK | os.W_OK):
                return Check("database", False, f"{path} is not writable by this user")
            problem = _writable_dir(path.parent, "storage.database_url")  # -wal / -shm
            if problem:
                return Check("database", False, problem)
            return Check("database", True, f"{shown} (exists)")
        problem = _writable_dir(path.parent, "storage.database_url")
        if problem:
            return Check("database", False, problem)
        return Check("database", True, f"{shown} (will be created)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(url, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
        return Check("database", False, f"cannot connect to {shown}: {detail}")
    finally:
        engine.dispose()
    return Check("database", True, f"{shown} (reachable)")


def check_port(name: str, host: str, port: int, key: str, *, reuse_port: bool = False) -> Check:
    """Whether ``host:port`` can be bound now (port 0: any free port, always).

    With ``reuse_port`` the probe binds as a receiver with ``node.reuse_port`` does, so
    it succeeds beside other such receivers (and fails beside anything else).
    """
    where = f"{host}:{port}"
    if port == 0:
        return Check(name, True, f"{host}: a free port is picked at start")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return Check(name, False, f"{host}: not an address of this machine ({exc}; {key})")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As the servers do: a port left in TIME_WAIT by the last run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, reuse_port_option(), 1)
            sock.bind(address)
        except OSError as exc:
            why = (
                "in use (another node, or another program?)"
                if exc.errno == errno.EADDRINUSE
                else (exc.strerror or str(exc))
            )
            return Check(name, False, f"cannot listen on {where}: {why} ({key})")
    if reuse_port:
        return Check(name, True, f"{where} can be listened on (shared: node.reuse_port)")
    return Check(name, True, f"{where} is free")


def check_weights(settings: Settings, *, load: bool) -> Check:
    """The manifest and its files; with ``load`` the networks are built and loaded too
    (sha256 and parameter counts checked, as ``serve`` does)."""
    from ldct_node.model.cascade import Cascade
    from ldct_node.model.manifest import Manifest, WeightsError, sha256_file

    path = settings.weights_path
    where = "bundled" if not settings.model.weights_dir else "model.weights_dir"
    try:
        if load:
            cascade = Cascade.load(path, device="cpu")
            return Check("weights", True, f"{path} ({where}): {cascade.model_version}, loaded")
        manifest = Manifest.read(path)
        for entry in manifest.networks.values():
            file = path / entry.file
            if not file.is_file():
                raise WeightsError(f"{file}: weights file named in the manifest is missing")
            if sha256_file(file) != entry.sha256:
                raise WeightsError(f"{file}: sha256 does not match MANIFEST.json")
    except WeightsError as exc:
        return Check("weights", False, f"{exc} ({where})")
    return Check("weights", True, f"{path} ({where}): {manifest.model_version}")


def check_destination(settings: Settings, dest: Destination) -> Check:
    """What sending to ``dest`` needs from this machine: its TLS files load, its password
    can be read (the password itself is never shown). The peer is not contacted: that
    is ``ldct-node echo``."""
    from ldct_node.service.dicomweb import read_password
    from ldct_node.service.forward import client_tls_context

    name = f"destination {dest.name}"
    resolved = dest.with_paths_resolved(settings.base_dir)
    try:
        if resolved.type == "dicomweb":
            if resolved.url.startswith("https:") or resolved.tls_cert:
                client_tls_context(resolved)
            read_password(resolved)
            what = resolved.url
        else:
            if resolved.tls:
                client_tls_context(resolved)
            what = f"{resolved.ae_title}@{resolved.host}:{resolved.port}"
            what += " (DICOM TLS)" if resolved.tls else ""
            if resolved.associations > 1:
                what += f", {resolved.associations} associations at once"
    except ValueError as exc:
        return Check(name, False, str(exc))
    return Check(name, True, what)


def start_checks(
    settings: Settings, *, receives: bool = True, works: bool = True, load_weights: bool = False
) -> list[Check]:
    """Every check for a node of this role, in the order ``serve`` needs them."""
    checks = [check_spool(settings), check_database(settings)]
    if receives:
        checks.append(
            check_port(
                "dicom port",
                settings.node.host,
                settings.node.port,
                "node.host / node.port",
                reuse_port=settings.node.reuse_port,
            )
        )
    if settings.metrics.enabled:
        checks.append(
            check_port(
                "metrics port",
                settings.metrics.host,
                settings.metrics.port,
                "metrics.host / metrics.port",
            )
        )
    if works:
        checks.append(check_weights(settings, load=load_weights))
        checks.extend(check_destination(settings, dest) for dest in settings.destinations)
    return checks
