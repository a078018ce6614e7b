"""A throwaway PostgreSQL server for tests (the Debian ``postgresql`` package's binaries).

``initdb`` into a temporary folder, ``postgres`` on 127.0.0.1 at a free port with its
unix socket in that folder, fsync off (test data), trust authentication for the local
test user. PostgreSQL refuses to run as root, so under root (CI) the server runs as the
``postgres`` system user the package creates, in a folder that user owns. The server
is stopped (fast shutdown) and the folder deleted by the fixture that started it.

Without the binaries the tests that need them are skipped, unless
``LDCT_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _net_util import LOOPBACK, free_port

PG_USER = "ldct"
INITDB_OPTS = ("-E", "UTF8", "--no-sync", "--no-instructions")
# Test data only: no fsync; enough connections for several node processes' pools.
SERVER_OPTS = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
SERVER_OPTS += ("-c", "max_connections=300", "-c", "shared_buffers=32MB")


def pg_bindir() -> Path | None:
    """The folder with ``initdb`` and ``postgres`` (newest Debian version first)."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


def require_postgres() -> Path:
    """The binaries' folder, or skip (fail under ``LDCT_REQUIRE_POSTGRES=1``)."""
    bindir = pg_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries not installed (Debian package postgresql)"
        if os.environ.get("LDCT_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return bindir


@dataclass
class PgServer:
    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}@{LOOPBACK}:{self.port}/{database}"

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(
            host=LOOPBACK, port=self.port, user=PG_USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _server_user() -> dict[str, Any]:
    """Popen arguments that run PostgreSQL unprivileged when we are root (CI)."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root and there is no 'postgres' user to run PostgreSQL as")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _ready(port: int) -> bool:
    import psycopg

    try:
        with psycopg.connect(
            host=LOOPBACK, port=port, user=PG_USER, dbname="postgres", connect_timeout=2
        ):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def postgres_server() -> Iterator[PgServer]:
    """Start a PostgreSQL server for the duration of the block."""
    bindir = require_postgres()
    as_user = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="ldct-pg-"))
    if as_user:
        os.chown(folder, as_user["user"], as_user["group"])
    os.chmod(folder, 0o700)
    data = folder / "data"
    init = subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust", *INITDB_OPTS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=folder,
        **as_user,
    )
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"initdb failed: {init.stderr[-2000:]}")
    port = free_port()
    log = (folder / "server.log").open("wb")
    where = ("-c", f"listen_addresses={LOOPBACK}", "-c", f"unix_socket_directories={folder}")
    process = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(data), "-p", str(port), *SERVER_OPTS, *where],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
        **as_user,
    )
    server = PgServer(port=port, folder=folder, process=process)
    try:
        deadline = time.monotonic() + 60
        while not _ready(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not start:\n{server.log()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        # SIGINT: PostgreSQL's "fast" shutdown (ends every session, then exits).
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
