"""`ldct-node ...`: the command line (DESIGN section 2).

Exit status: 0 success, 1 failure, 2 bad usage or config. Errors are one line on
stderr; ``--debug`` (before the command) adds the traceback and DEBUG logging.
Only this module configures logging.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ldct_node import __version__
from ldct_node.config import ConfigError, Settings, load_settings

logger = logging.getLogger(__name__)
console = Console(stderr=True)
out = Console()

app = typer.Typer(
    name="ldct-node",
    help="Low-dose CT denoising DICOM node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

_state: dict[str, bool] = {"debug": False}

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


def _fail(message: str, code: int) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn exceptions into one clear line and the contract's exit status."""
    try:
        yield
    except typer.Exit:
        raise
    except (UsageError, ConfigError) as exc:
        if _state["debug"]:
            console.print_exception()
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 1)
    except Exception as exc:
        if _state["debug"]:
            console.print_exception()
        # Expected failures read as sentences; anything else names its type.
        expected = (CommandFailedError, ValueError, OSError, RuntimeError, LookupError)
        shown = str(exc) if isinstance(exc, expected) else f"{type(exc).__name__}: {exc}"
        _fail(shown, 1)


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
    for noisy in ("tensorflow", "absl", "h5py", "PIL", "matplotlib", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


def _quiet_backend() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Tracebacks and DEBUG logs.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    _state["debug"] = debug
    _setup_logging(debug)
    _quiet_backend()
    if version:
        out.print(f"ldct-node {__version__}")
        raise typer.Exit(0)


def _settings(config: Path | None) -> Settings:
    return load_settings(config)


def progress_bar(transient: bool = False) -> Progress:
    """The progress bar every long-running command uses."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def default_weights_dir(settings: Settings | None) -> Path:
    """The configured weights, else the bundled ones (installed copy or source tree)."""
    candidates: list[Path] = []
    if settings is not None:
        candidates.append(settings.weights_path)
    candidates.append(Path(sys.prefix) / "share" / "ldct-node" / "weights")
    candidates.append(Path(__file__).resolve().parents[1] / "weights")
    for path in candidates:
        if (path / "MANIFEST.json").is_file():
            return path
    raise UsageError(
        "no weights found (looked in " + ", ".join(str(p) for p in candidates) + "); pass --weights"
    )


# --------------------------------------------------------------------------- config


@config_app.command("check")
def config_check(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Validate the config and print the effective settings."""
    with _errors():
        settings = _settings(config)
        data = settings.model_dump(mode="json")
        data["resolved"] = {
            "spool_dir": str(settings.spool_path),
            "database_url": settings.database_url,
            "weights_dir": str(settings.weights_path),
        }
        if as_json:
            out.print_json(json.dumps(data))
            return
        import tomli_w

        out.print(tomli_w.dumps({k: v for k, v in data.items() if v not in ([], None)}), end="")
        out.print("[green]config OK[/]")


# --------------------------------------------------------------------------- denoise


@app.command()
def denoise(
    inputs: Annotated[
        list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")
    ],
    output: Annotated[Path, typer.Option("--output", help="Folder for the derived series.")],
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Weights folder with MANIFEST.json.")
    ] = None,
    blend: Annotated[
        float | None,
        typer.Option("--blend", min=0.0, max=1.0, help="Blend with the input (default: config)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Slices per batch (default: config).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Denoise DICOM series offline: one derived series per input series. No network, no DB."""
    with _errors():
        from ldct_node.denoise_files import run_denoise

        settings = _settings(config)
        weights_dir = weights if weights is not None else default_weights_dir(settings)
        summary = run_denoise(
            inputs,
            output,
            settings=settings,
            weights_dir=weights_dir,
            blend=blend,
            batch_size=batch_size,
            progress_factory=progress_bar,
        )
        for line in summary.lines():
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        if summary.failed:
            raise CommandFailedError(
                f"{summary.failed} of {summary.total} series failed; "
                f"{summary.total - summary.failed} written to {output}"
            )


# --------------------------------------------------------------------------- simulate


@app.command()
def simulate(
    output: Annotated[Path, typer.Option("--output", help="Folder for the paired series.")],
    cases: Annotated[int, typer.Option("--cases", min=1, help="Number of cases.")] = 4,
    slices: Annotated[int, typer.Option("--slices", min=1, help="Slices per case.")] = 8,
    size: Annotated[int, typer.Option("--size", min=32, help="Slice size in pixels.")] = 256,
    dose_fraction: Annotated[
        float, typer.Option("--dose-fraction", min=0.01, max=1.0, help="Low-dose fraction.")
    ] = 0.25,
    i0: Annotated[
        float | None, typer.Option("--i0", help="Full-dose incident photons per ray.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    source: Annotated[
        list[Path] | None,
        typer.Option("--source", help="NDCT DICOM series folders to use instead of phantoms."),
    ] = None,
) -> None:
    """Make paired LDCT/NDCT training series by projection-domain simulation."""
    with _errors():
        from ldct_node.model.simulate import simulate_dataset

        kwargs: dict[str, Any] = {}
        if i0 is not None:
            kwargs["i0"] = i0
        written = simulate_dataset(
            output,
            n_cases=cases,
            slices_per_case=slices,
            size=size,
            dose_fraction=dose_fraction,
            seed=seed,
            source_series=source or None,
            progress=True,
            **kwargs,
        )
        out.print(f"wrote {len(written)} cases to {output}")


# --------------------------------------------------------------------------- train


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Paired data (simulate output or AAPM).")],
    output: Annotated[Path, typer.Option("--output", help="Folder for weights + MANIFEST.json.")],
    epochs_perceptual: Annotated[int, typer.Option("--epochs-perceptual", min=0)] = 15,
    epochs_difference: Annotated[int, typer.Option("--epochs-difference", min=0)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    learning_rate: Annotated[float, typer.Option("--learning-rate", min=0.0)] = 1e-3,
    vgg_weights: Annotated[
        str, typer.Option("--vgg-weights", help="'imagenet' or a local .weights.h5 file.")
    ] = "imagenet",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from checkpoints.")] = False,
    max_patches: Annotated[
        int | None, typer.Option("--max-patches", min=1, help="Cap on training patches.")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", min=0.0, max=0.9, help="Cases held out.")
    ] = 0.1,
    patch_stride: Annotated[int, typer.Option("--patch-stride", min=1)] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Train both networks of the cascade and write weights + MANIFEST.json."""
    with _errors():
        from ldct_node.model.train import TrainOptions
        from ldct_node.model.train import train as run_training

        if vgg_weights != "imagenet" and not Path(vgg_weights).is_file():
            raise UsageError(f"--vgg-weights: {vgg_weights} is not a file (or use 'imagenet')")
        if not data.is_dir():
            raise UsageError(f"--data: {data} is not a directory")
        manifest = run_training(
            TrainOptions(
                data_dir=data,
                output_dir=output,
                epochs_perceptual=epochs_perceptual,
                epochs_difference=epochs_difference,
                batch_size=batch_size,
                learning_rate=learning_rate,
                vgg_weights=vgg_weights,
                resume=resume,
                max_patches=max_patches,
                val_fraction=val_fraction,
                stride=patch_stride,
                seed=seed,
            )
        )
        out.print(f"model {manifest['model_version']} written to {output}")
        out.print_json(json.dumps(manifest["metrics"]))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    command = typer.main.get_command(app)
    try:
        # Non-standalone click returns the exit code of typer.Exit instead of raising.
        rc = command.main(args=argv, prog_name="ldct-node", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except typer.Exit as exc:
        return int(exc.exit_code)
    except SystemExit as exc:  # pragma: no cover - click may still exit directly
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.Abort):
            console.print("[bold red]error:[/] aborted")
            return 1
        if isinstance(exc, click.ClickException):
            exc.show()
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
