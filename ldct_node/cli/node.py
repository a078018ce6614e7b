"""The node's commands: ``serve``, the admin commands (``status``, ``jobs``, ``retry``,
``cancel``, ``purge``, ``echo``), ``config check`` and ``db upgrade``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ldct_node import __version__
from ldct_node.choices import Role
from ldct_node.config import Settings

if TYPE_CHECKING:
    from ldct_node.store import Database

from ldct_node.cli.common import (
    STATE,
    CommandFailedError,
    ConfigOption,
    JsonOption,
    UsageError,
    app,
    choice_option,
    command_errors,
    config_app,
    db_app,
    out,
    settings_from,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config


@config_app.command("check")
def config_check(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Validate the config and check what `serve` needs: weights (sha256, parameter
    counts), spool and database writable, ports free. Prints the effective settings as
    TOML; exit 2 if anything is wrong."""
    with command_errors():
        from ldct_node.service.preflight import start_checks

        settings = settings_from(config)
        data = settings.model_dump(mode="json")
        data.pop("base_dir", None)
        data["resolved"] = {
            "config_file": _config_source(config),
            "spool_dir": str(settings.spool_path),
            "database_url": _shown_url(settings.database_url),
            "weights_dir": str(settings.weights_path),
        }
        data["storage"]["database_url"] = _shown_url(settings.storage.database_url)
        checks = start_checks(settings, load_weights=True)
        failed = [c for c in checks if not c.ok]
        if as_json:
            data["checks"] = [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]
            out.print_json(json.dumps(data))
        else:
            import tomli_w

            text = tomli_w.dumps({k: v for k, v in data.items() if v is not None})
            out.print(text, end="", markup=False, highlight=False, soft_wrap=True)
            out.print("\n# checks", markup=False, highlight=False)
            for c in checks:
                line = f"# {'ok    ' if c.ok else 'FAILED'} {c.name}: {c.detail}"
                out.print(line, markup=False, highlight=False, soft_wrap=True)
        if failed:
            raise UsageError("; ".join(f"{c.name}: {c.detail}" for c in failed))
        if not as_json:
            out.print("# config OK", markup=False, highlight=False)


def _config_source(config: Path | None) -> str:
    """The config file a command reads, or what it uses without one."""
    from ldct_node.config import ENV_VAR, default_config_path

    path = config if config is not None else default_config_path()
    if path.exists():
        return str(path.resolve())
    if config is None and ENV_VAR not in os.environ:
        return f"none ({path} not found: built-in defaults)"
    return str(path)


def _shown_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --------------------------------------------------------------------------- serve + admin


def _open_db(settings: Settings, config: Path | None) -> Database:
    """The node's existing job database; exit 2 if there is none.

    Admin commands never create one: a monitoring check run without ``--config``
    would otherwise make an empty database and report it healthy forever.
    """
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from ldct_node.store import Database

    url = make_url(settings.database_url)
    source = _config_source(config)
    shown = url.render_as_string(hide_password=True)
    hint = (
        "start the node with this config first, or pass --config (or set "
        "LDCT_NODE_CONFIG) to the node's config"
    )
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database).expanduser()
        if not path.is_file():
            raise UsageError(f"no job database at {path} (config: {source}): {hint}")
    db = Database(url)
    try:
        tables = set(inspect(db.engine).get_table_names())
    except SQLAlchemyError as exc:
        db.close()
        detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise CommandFailedError(f"cannot open database {shown}: {detail}") from None
    if "job" not in tables:
        db.close()
        raise UsageError(
            f"database {shown} (config: {source}) has no ldct-node tables: {hint}, or run "
            "`ldct-node db upgrade`"
        )
    return db


def _when(value: Any) -> str:
    """A timestamp for tables: local time, seconds."""
    if value is None:
        return "-"
    return str(value.astimezone().strftime("%Y-%m-%d %H:%M:%S"))


def _short(text: str | None, limit: int = 90) -> str:
    """``text`` on one line; on a terminal cut at ``limit`` characters."""
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit or not out.is_terminal else text[: limit - 1] + "…"


@app.command()
def serve(
    config: ConfigOption = None,
    role: Annotated[
        Role,
        choice_option(
            Role,
            "--role",
            help="all: everything in one process; receiver: DICOM receiver + series "
            "stability; worker: denoise + forward. Any number of each may share one "
            "database and spool.",
        ),
    ] = Role.ALL,
) -> None:
    """Run the node: DICOM receiver, scheduler, worker and forwarder in one process.

    Stops cleanly on SIGTERM or SIGINT (a running job goes back to the queue).
    """
    with command_errors():
        from ldct_node.malloc import keep_receive_buffers_resident
        from ldct_node.model.manifest import WeightsError
        from ldct_node.service.node import Node, NodeStartError

        # APScheduler logs every run of every duty at INFO: far too chatty for operators.
        logging.getLogger("apscheduler").setLevel(
            logging.DEBUG if STATE["debug"] else logging.WARNING
        )
        settings = settings_from(config)
        if role is not Role.WORKER:
            keep_receive_buffers_resident()  # process-wide: here, where the process starts
        node = Node(settings, role=role)

        def ready(running: Node) -> None:
            db_url = _shown_url(settings.database_url)
            if running.server is not None:
                host, port = running.address
                what = (
                    f"{settings.node.ae_title} listening on {host}:{port}"
                    f"{' (TLS)' if settings.security.tls_enabled else ''}"
                )
            else:
                what = f"worker {running.worker_id} ready"
            role_note = "" if role is Role.ALL else f" (role {role})"
            out.print(
                f"ldct-node {__version__}: {what}{role_note}; "
                f"spool {settings.spool_path}; database {db_url}",
                highlight=False,
                soft_wrap=True,
            )

        try:
            node.serve_forever(on_ready=ready)
        except WeightsError as exc:
            raise UsageError(f"model.weights_dir: {exc}") from None
        except NodeStartError as exc:
            if exc.config_problem:
                raise UsageError(str(exc)) from None
            raise
        out.print("ldct-node stopped", highlight=False)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or upgrade the job database schema (Alembic); `serve` also does this at start."""
    with command_errors():
        from sqlalchemy.exc import SQLAlchemyError

        from ldct_node.store.migrate import upgrade

        settings = settings_from(config)
        db_url = _shown_url(settings.database_url)
        try:
            result = upgrade(settings.database_url)
        except SQLAlchemyError as exc:
            detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
            raise CommandFailedError(f"cannot upgrade database {db_url}: {detail}") from None
        out.print(f"database {db_url}: {result.describe()}", highlight=False, soft_wrap=True)


def _health(summary: Any, forwarding: list[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Forward errors of jobs still forwarding, and the problems that make status exit 1."""
    forward_errors = [
        {
            "job_id": f.job_id,
            "destination": f.destination,
            "attempts": f.attempts,
            "next_attempt_at": f.next_attempt_at.isoformat() if f.next_attempt_at else None,
            "last_error": f.last_error,
        }
        for job in forwarding
        for f in job.forwards
        if f.state == "pending" and f.last_error
    ]
    problems: list[str] = []
    failed = summary.counts.get("failed", 0)
    if failed:
        problems.append(
            f"{failed} failed job(s): see `ldct-node jobs --state failed`, then retry or cancel"
        )
    if forward_errors:
        dests = sorted({e["destination"] for e in forward_errors})
        problems.append(
            f"{len(forward_errors)} forward(s) retrying after errors "
            f"(destination {', '.join(dests)})"
        )
    return forward_errors, problems


@app.command()
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Queue depth, jobs by state, throughput and last errors.

    Exit status 0 when healthy, 1 when there are failed jobs or forwards retrying after
    errors (for monitoring), 2 on a config problem.
    """
    with command_errors():
        from rich.table import Table

        settings = settings_from(config)
        db = _open_db(settings, config)
        try:
            summary = db.status_summary()
            forwarding = db.list_jobs(state="forwarding")
        finally:
            db.close()
        forward_errors, problems = _health(summary, forwarding)
        healthy = not problems
        if as_json:
            data = summary.as_dict()
            data.update(healthy=healthy, problems=problems, forward_errors=forward_errors)
            data.update(config=_config_source(config), database=_shown_url(settings.database_url))
            out.print_json(json.dumps(data))
        else:
            verdict = "[green]healthy[/]" if healthy else "[bold red]needs attention[/]"
            out.print(f"ldct-node status: {verdict}")
            out.print(
                f"config {_config_source(config)}; database {_shown_url(settings.database_url)}",
                markup=False,
                highlight=False,
            )
            for line in problems:
                out.print(f"  [red]•[/] {line}", highlight=False)
            table = Table(title="Jobs by state", title_justify="left")
            table.add_column("state")
            table.add_column("jobs", justify="right")
            for state_name, count in summary.counts.items():
                table.add_row(state_name, str(count))
            out.print(table)
            out.print(
                f"queue depth {summary.queue_depth} "
                f"(oldest queued {_when(summary.oldest_queued_at)}); "
                f"pending forwards {summary.pending_forwards}",
                highlight=False,
            )
            out.print(
                f"last hour: {summary.done_last_hour} job(s) done, "
                f"{summary.failed_last_hour} failed, {summary.instances_last_hour} instance(s) "
                "received",
                highlight=False,
            )
            if forward_errors:
                ftable = Table(title="Forwards retrying", title_justify="left")
                for col in ("job", "destination", "attempts", "next try", "last error"):
                    ftable.add_column(col)
                for fwd in forward_errors:
                    ftable.add_row(
                        str(fwd["job_id"]),
                        fwd["destination"],
                        str(fwd["attempts"]),
                        fwd["next_attempt_at"] or "-",
                        _short(fwd["last_error"]),
                    )
                out.print(ftable)
            if summary.last_errors:
                etable = Table(title="Last errors", title_justify="left")
                for col in ("job", "state", "at", "error"):
                    etable.add_column(col)
                for err in summary.last_errors:
                    etable.add_row(str(err.job_id), err.state, _when(err.at), _short(err.error))
                out.print(etable)
        if not healthy:
            raise typer.Exit(1)


def _tail(uid: str, keep: int = 10) -> str:
    """On a terminal the distinguishing end of a UID (they share long prefixes); piped,
    and with --json, the whole UID."""
    return uid if len(uid) <= keep + 1 or not out.is_terminal else "…" + uid[-keep:]


def _forwards_text(job: Any) -> str:
    parts = []
    for f in job.forwards:
        total = job.n_instances if job.n_instances is not None else "?"
        parts.append(f"{f.destination}: {f.state} {f.n_sent}/{total}")
    return ", ".join(parts) or "-"


@app.command()
def jobs(
    config: ConfigOption = None,
    state: Annotated[
        str | None,
        typer.Option(
            "--state",
            help="Only jobs in this state: receiving, queued, running, forwarding, done, "
            "failed, cancelled.",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the newest N jobs.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs (oldest first)."""
    with command_errors():
        from rich.table import Table

        from ldct_node.store import JobState

        if limit is not None and limit < 1:
            raise UsageError(f"--limit: must be >= 1, got {limit}")
        settings = settings_from(config)
        if state is not None and state not in {s.value for s in JobState}:
            valid = ", ".join(s.value for s in JobState)
            raise UsageError(f"--state: {state!r} is not one of {valid}")
        db = _open_db(settings, config)
        try:
            rows = db.list_jobs(state=state, limit=limit)
        finally:
            db.close()
        if as_json:
            out.print_json(json.dumps([job.as_dict() for job in rows]))
            return
        table = Table()
        table.add_column("id", justify="right", no_wrap=True)
        table.add_column("state", no_wrap=True)
        table.add_column("profile")
        table.add_column("series", no_wrap=True)
        table.add_column("n", justify="right", no_wrap=True)
        table.add_column("try", justify="right", no_wrap=True)
        table.add_column("updated", no_wrap=True)
        table.add_column("forwards", min_width=10)
        with_errors = any(job.error for job in rows)
        if with_errors:
            table.add_column("error", overflow="fold")
        for job in rows:
            cells = [
                str(job.id),
                job.state,
                job.profile,
                _tail(job.series_instance_uid),
                str(job.source_instances),
                str(job.attempts),
                _when(job.updated_at)[5:],  # the year is noise here
                _forwards_text(job),
            ]
            table.add_row(*cells, *([_short(job.error, 200)] if with_errors else []))
        out.print(table)
        out.print(f"{len(rows)} job(s)", highlight=False)


def _change_job(config: Path | None, job_id: int, action: str) -> None:
    from ldct_node.store import JobNotFoundError, TransitionError

    hints = {
        "retry": "retry applies to failed or cancelled jobs",
        "cancel": "cancel applies to jobs that are not done or cancelled",
    }
    settings = settings_from(config)
    db = _open_db(settings, config)
    try:
        if action == "retry":
            db.retry_job(job_id)
        else:
            db.cancel_job(job_id)
        new_state = db.get_job(job_id).state
    except JobNotFoundError as exc:
        raise CommandFailedError(str(exc)) from None
    except TransitionError as exc:
        raise UsageError(f"{exc} ({hints[action]})") from None
    finally:
        db.close()
    out.print(f"job {job_id} is now {new_state}", highlight=False)


@app.command()
def retry(
    job_id: Annotated[int, typer.Argument(help="The job's id (see `ldct-node jobs`).")],
    config: ConfigOption = None,
) -> None:
    """Queue a failed or cancelled job again (it is reprocessed; only failed forwards are
    resent)."""
    with command_errors():
        _change_job(config, job_id, "retry")


@app.command()
def cancel(
    job_id: Annotated[int, typer.Argument(help="The job's id (see `ldct-node jobs`).")],
    config: ConfigOption = None,
) -> None:
    """Cancel a job that is not done (a running one stops at its next heartbeat)."""
    with command_errors():
        _change_job(config, job_id, "cancel")


@app.command()
def purge(
    config: ConfigOption = None,
    older_than: Annotated[
        float | None,
        typer.Option(
            "--older-than",
            help="Age in days (default: storage.retention_days); 0 = every finished series.",
        ),
    ] = None,
) -> None:
    """Delete spooled source and derived files of finished (done or cancelled) series."""
    with command_errors():
        if older_than is not None and not older_than >= 0:
            raise UsageError(f"--older-than: must be a number of days >= 0, got {older_than}")
        from ldct_node.service.scheduler import purge_expired
        from ldct_node.service.spool import Spool

        settings = settings_from(config)
        days = settings.storage.retention_days if older_than is None else older_than
        db = _open_db(settings, config)
        try:
            report = purge_expired(db, Spool(settings.spool_path), days)
        finally:
            db.close()
        out.print(
            f"purged {report.series} series ({report.paths} files or folders) older than "
            f"{days:g} day(s)"
            + (f"; {report.skipped} skipped (see log)" if report.skipped else ""),
            highlight=False,
        )


@contextmanager
def _silenced(name: str) -> Iterator[None]:
    """Mute logger ``name`` in the block (unless ``--debug``): the command says it itself."""
    target = logging.getLogger(name)
    before = target.level
    if not STATE["debug"]:
        target.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        target.setLevel(before)


@app.command()
def echo(
    destination: Annotated[str, typer.Argument(help="A [[destinations]] name.")],
    config: ConfigOption = None,
) -> None:
    """C-ECHO a configured destination, over TLS if it uses TLS; for a DICOMweb destination
    an authenticated QIDO-RS query (exit 1 if it does not answer success)."""
    with command_errors():
        from ldct_node.service.forward import echo as send_echo

        settings = settings_from(config)
        try:
            dest = settings.destination(destination).with_paths_resolved(settings.base_dir)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
        # pynetdicom logs a failed connection as ERROR lines of its own: the one-line
        # message below says the same with the reason.
        with _silenced("pynetdicom"):
            ok, message = send_echo(dest, calling_ae_title=settings.node.ae_title)
        if not ok:
            raise CommandFailedError(message)
        out.print(message, highlight=False)
