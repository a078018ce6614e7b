"""What every command shares: the typer app, the error contract (one line, exit 0/1/2),
logging setup, the config and weights every command resolves, the progress bar."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import Progress

from ldct_node import __version__
from ldct_node.config import ConfigError, Settings, load_settings
from ldct_node.malloc import reexec_with_huge_pages
from ldct_node.progress import make_progress

logger = logging.getLogger(__name__)
console = Console(stderr=True)
# Piped or redirected (monitoring, grep): no 80-column cut, nothing shortened.
out = Console() if sys.stdout.isatty() else Console(width=100_000)

app = typer.Typer(
    name="ldct-node",
    help="Low-dose CT denoising DICOM node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
db_app = typer.Typer(help="Manage the job database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

STATE: dict[str, bool] = {"debug": False}

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Config file (default: $LDCT_NODE_CONFIG, then ./config.toml).",
        show_default=False,
    ),
]


class UsageError(Exception):
    """Bad usage or configuration: exit status 2."""


class CommandFailedError(Exception):
    """The command ran and failed: exit status 1."""


def fail(message: str, code: int) -> NoReturn:
    # Messages quote paths and names, which may hold [brackets]: never read them as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


ChoiceT = TypeVar("ChoiceT", bound=StrEnum)


def choice(
    enum_type: type[ChoiceT], option: str, *, listing: Literal["one of", "or"] = "one of"
) -> Callable[[str], ChoiceT]:
    """A typer ``parser`` that reads ``option``'s value into a member of ``enum_type``.

    ``--help`` lists the members. A value that is none of them is bad usage: one line
    (``--role: expected one of all, receiver, worker, got 'x'``, or with ``listing="or"``
    ``--geometry: expected parallel or fan, got 'x'``) and exit status 2, where typer's
    own check would print a box.
    """
    values = [member.value for member in enum_type]
    if listing == "or" and len(values) > 1:
        expected = f"{', '.join(values[:-1])} or {values[-1]}"
    else:
        expected = f"one of {', '.join(values)}"

    def parse(value: str) -> ChoiceT:
        try:
            return enum_type(value)
        except ValueError:
            fail(f"{option}: expected {expected}, got {value!r}", 2)

    return parse


def choice_option(
    enum_type: type[StrEnum],
    option: str,
    *,
    help: str,
    listing: Literal["one of", "or"] = "one of",
) -> Any:
    """The typer option ``option`` whose values are the members of ``enum_type``: annotate
    the parameter with the enum and this (see :func:`choice`)."""
    return typer.Option(option, parser=choice(enum_type, option, listing=listing), help=help)


@contextmanager
def command_errors() -> Iterator[None]:
    """Turn exceptions into one clear line and the contract's exit status."""
    try:
        yield
    except typer.Exit:
        raise
    except (UsageError, ConfigError) as exc:
        if STATE["debug"]:
            console.print_exception()
        fail(str(exc), 2)
    except KeyboardInterrupt:
        fail("interrupted", 1)
    except Exception as exc:
        if STATE["debug"]:
            console.print_exception()
        # Expected failures read as sentences; anything else names its type.
        expected = (CommandFailedError, ValueError, OSError, RuntimeError, LookupError)
        shown = str(exc) if isinstance(exc, expected) else f"{type(exc).__name__}: {exc}"
        fail(shown, 1)


def _setup_logging(debug: bool) -> None:
    handler = RichHandler(console=console, show_path=debug, rich_tracebacks=debug)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[handler],
        force=True,
    )
    # TensorFlow / absl chatter is not for operators.
    for noisy in ("tensorflow", "absl", "h5py", "PIL", "matplotlib", "pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        # pydicom logs and warns about invalid element values verbatim (they can be
        # patient names), and logs every image it cannot decode as an ERROR with a
        # traceback. The node says the same in its own words (job errors name the
        # instance), so pydicom's own output is for --debug only. (Imported first: its
        # import resets the "pydicom" logger's level.)
        import pydicom.config  # noqa: F401

        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def _quiet_backend(debug: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not debug:
        from ldct_node.cli.startup_chatter import hold_tensorflow_startup_chatter

        hold_tensorflow_startup_chatter()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Tracebacks and DEBUG logs.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    STATE["debug"] = debug
    _setup_logging(debug)
    _quiet_backend(debug)
    if version:
        out.print(f"ldct-node {__version__}")
        raise typer.Exit(0)


def settings_from(config: Path | None) -> Settings:
    return load_settings(config)


def progress_bar(transient: bool = False) -> Progress:
    """The progress bar every long-running command uses, on stderr."""
    return make_progress(console, transient=transient)


def default_weights_dir(settings: Settings | None) -> Path:
    """The configured weights (``model.weights_dir``), by default the bundled ones."""
    from ldct_node.config import bundled_weights_candidates, bundled_weights_dir

    if settings is not None and settings.model.weights_dir:
        path = settings.weights_path
        if not (path / "MANIFEST.json").is_file():
            raise UsageError(f"model.weights_dir: no MANIFEST.json in {path}; or pass --weights")
        return path
    path = bundled_weights_dir()
    if not (path / "MANIFEST.json").is_file():
        looked = ", ".join(str(p) for p in bundled_weights_candidates())
        raise UsageError(f"no bundled weights found (looked in {looked}); pass --weights")
    return path


#: Commands that run the networks (inference or training), as named on the command line.
NETWORK_COMMANDS = frozenset({"serve", "denoise", "evaluate", "train"})


def _command_name(args: list[str]) -> str | None:
    """The command of a command line: its first word after the global options (flags)."""
    return next((arg for arg in args if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status.

    Started as a program (``argv`` None) for a command that runs the networks, it first
    re-executes itself once with huge pages for their large buffers
    (:mod:`ldct_node.malloc`; ~0.4 s, which the admin commands do not pay).
    """
    if argv is None and _command_name(sys.argv[1:]) in NETWORK_COMMANDS:
        reexec_with_huge_pages()
    command = typer.main.get_command(app)
    try:
        # Non-standalone click returns the exit code of typer.Exit instead of raising.
        rc = command.main(args=argv, prog_name="ldct-node", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except typer.Exit as exc:
        return int(exc.exit_code)
    except SystemExit as exc:  # pragma: no cover - click may still exit directly
        return int(exc.code or 0)
    except Exception as exc:
        # Click's usage errors (typer bundles its own click): they can show themselves.
        show = getattr(exc, "show", None)
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            show()
            return 2
        if type(exc).__name__ == "Abort":
            console.print("[bold red]error:[/] aborted")
            return 1
        raise
