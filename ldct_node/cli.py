"""`ldct-node ...`: the command line (README, "Commands").

Exit status: 0 success, 1 failure, 2 bad usage or config. Errors are one line on
stderr; ``--debug`` (before the command) adds the traceback and DEBUG logging.
Only this module configures logging.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import Progress

from ldct_node import __version__
from ldct_node.config import ConfigError, Settings, load_settings
from ldct_node.progress import make_progress

if TYPE_CHECKING:
    from ldct_node.store import Database

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
    # Messages quote paths and names, which may hold [brackets]: never read them as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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


# --------------------------------------------------------------------------- config


@config_app.command("check")
def config_check(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Validate the config and check what `serve` needs: weights (sha256, parameter
    counts), spool and database writable, ports free. Prints the effective settings as
    TOML; exit 2 if anything is wrong."""
    with _errors():
        from ldct_node.service.preflight import start_checks

        settings = _settings(config)
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
        from ldct_node.offline import run_denoise

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


def _parse_slice_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        if not sep:
            raise ValueError
        bounds = (int(first), int(last))
    except ValueError:
        raise UsageError(f"--slice-range: expected FIRST:LAST (e.g. 1:60), got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise UsageError(f"--slice-range: need 1 <= FIRST <= LAST, got {text!r}")
    return bounds


@app.command()
def simulate(
    output: Annotated[Path, typer.Option("--output", help="Folder for the paired series.")],
    cases: Annotated[int, typer.Option("--cases", min=1, help="Number of cases.")] = 4,
    slices: Annotated[
        int | None,
        typer.Option(
            "--slices",
            min=1,
            help="Slices per case (default 8; with --slice-range, the whole range).",
        ),
    ] = None,
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
    geometry: Annotated[
        str, typer.Option("--geometry", help="Scanner geometry: parallel or fan.")
    ] = "parallel",
    electronic_noise: Annotated[
        float | None,
        typer.Option("--electronic-noise", min=0.0, help="Electronic noise std in counts."),
    ] = None,
    phantom: Annotated[
        str, typer.Option("--phantom", help="Procedural phantom: body, water or qa.")
    ] = "body",
    truth_recon: Annotated[
        bool,
        typer.Option("--truth-recon", help="Also write the noiseless reconstruction."),
    ] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel processes.")] = 1,
    pixel_size: Annotated[
        float | None,
        typer.Option(
            "--pixel-size",
            min=0.05,
            help="--source: resample to this pixel size (mm) on a --size canvas.",
        ),
    ] = None,
    slice_range: Annotated[
        str | None,
        typer.Option(
            "--slice-range",
            help="--source: FIRST:LAST (1-based, inclusive, in position order) of each series.",
        ),
    ] = None,
    slice_step: Annotated[
        int, typer.Option("--slice-step", min=1, help="--source: every Nth slice.")
    ] = 1,
) -> None:
    """Make paired LDCT/NDCT training series by projection-domain simulation."""
    with _errors():
        from ldct_node.lab.simulate import simulate_dataset

        if geometry not in ("parallel", "fan"):
            raise UsageError(f"--geometry: expected parallel or fan, got {geometry!r}")
        if phantom not in ("body", "water", "qa"):
            raise UsageError(f"--phantom: expected body, water or qa, got {phantom!r}")
        if not source and (pixel_size is not None or slice_range is not None or slice_step > 1):
            raise UsageError("--pixel-size, --slice-range, --slice-step: only with --source")
        kwargs: dict[str, Any] = {}
        if slice_range is not None:
            kwargs["slice_range"] = _parse_slice_range(slice_range)
        if i0 is not None:
            kwargs["i0"] = i0
        if electronic_noise is not None:
            kwargs["electronic_noise"] = electronic_noise
        written = simulate_dataset(
            output,
            n_cases=cases,
            slices_per_case=slices,
            size=size,
            dose_fraction=dose_fraction,
            seed=seed,
            source_series=source or None,
            progress=True,
            geometry=geometry,
            phantom_kind=phantom,
            write_truth_recon=truth_recon,
            workers=workers,
            pixel_size_mm=pixel_size,
            slice_step=slice_step,
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
    perceptual_weight: Annotated[
        float,
        typer.Option("--perceptual-weight", min=0.0, help="Weight of the VGG16 term (paper: 0.1)."),
    ] = 0.1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="C (the cascade), or a comparison method: A, B, D, C-cnn10, D-cnn10.",
        ),
    ] = "C",
    reuse_from: Annotated[
        Path | None,
        typer.Option(
            "--reuse-from",
            help="Weights of an earlier run (same data and recipe) whose leading stages to reuse.",
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start each network from this weights folder's network of the same role "
            "(fine-tuning, e.g. from the bundled weights).",
        ),
    ] = None,
    perceptual_norm: Annotated[
        str,
        typer.Option(
            "--perceptual-norm",
            help="none (the literal VGG term) or calibrated (in MSE units of the pairs).",
        ),
    ] = "none",
    lr_schedule: Annotated[
        str,
        typer.Option(
            "--lr-schedule",
            help="constant (the paper's) or cosine (decays to 1% over each stage).",
        ),
    ] = "constant",
    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed",
            help="Train on every GPU of this machine (tf.distribute.MirroredStrategy); "
            "--batch-size is the global batch, split across the GPUs.",
        ),
    ] = False,
) -> None:
    """Train both networks of the cascade (or a comparison method) and write weights."""
    with _errors():
        from ldct_node.lab.losses import PERCEPTUAL_NORMS
        from ldct_node.lab.train import LR_SCHEDULES, METHODS, TrainOptions
        from ldct_node.lab.train import train as run_training

        if vgg_weights != "imagenet" and not Path(vgg_weights).is_file():
            raise UsageError(f"--vgg-weights: {vgg_weights} is not a file (or use 'imagenet')")
        if not data.is_dir():
            raise UsageError(f"--data: {data} is not a directory")
        if method not in METHODS:
            raise UsageError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise UsageError(
                f"--lr-schedule: expected one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}"
            )
        if perceptual_norm not in PERCEPTUAL_NORMS:
            raise UsageError(
                f"--perceptual-norm: expected one of {', '.join(PERCEPTUAL_NORMS)}, "
                f"got {perceptual_norm!r}"
            )
        if init_from is not None and not (init_from / "MANIFEST.json").is_file():
            raise UsageError(f"--init-from: {init_from} has no MANIFEST.json")
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
                perceptual_weight=perceptual_weight,
                seed=seed,
                method=method,
                reuse_from=reuse_from,
                init_from=init_from,
                lr_schedule=lr_schedule,
                perceptual_norm=perceptual_norm,
                distributed=distributed,
            )
        )
        out.print(f"model {manifest['model_version']} written to {output}")
        out.print_json(json.dumps(manifest["metrics"]))


# --------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    ldct: Annotated[Path, typer.Option("--ldct", help="Low-dose series (folder tree).")],
    reference: Annotated[
        Path, typer.Option("--reference", help="Normal-dose series of the same slices.")
    ],
    truth: Annotated[
        Path | None, typer.Option("--truth", help="Noiseless truth series (simulated data).")
    ] = None,
    weights: Annotated[
        list[Path] | None,
        typer.Option("--weights", help="Weights folder to evaluate; repeat for several methods."),
    ] = None,
    blend: Annotated[
        list[float] | None,
        typer.Option("--blend", min=0.0, max=1.0, help="Blend(s) with the input; repeatable."),
    ] = None,
    hu_fidelity: Annotated[
        list[float] | None,
        typer.Option(
            "--hu-fidelity-mm",
            min=0.0,
            max=20.0,
            help="Output profile hu_fidelity_mm value(s) to evaluate; repeatable.",
        ),
    ] = None,
    bm3d: Annotated[bool, typer.Option("--bm3d", help="Add BM3D as a baseline.")] = False,
    bm3d_sigma: Annotated[
        float | None,
        typer.Option("--bm3d-sigma", min=0.0, help="BM3D noise level in HU (default: measured)."),
    ] = None,
    report: Annotated[
        Path, typer.Option("--report", help="Folder for report.md, report.json, figure.png.")
    ] = Path("evaluation"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    record_in: Annotated[
        Path | None,
        typer.Option(
            "--record-in",
            help="A --weights folder whose MANIFEST.json gets this evaluation "
            "(the table and the goal checks).",
        ),
    ] = None,
    record_key: Annotated[
        str,
        typer.Option(
            "--record-key",
            help="MANIFEST.json key for --record-in (e.g. evaluation_512 beside evaluation).",
        ),
    ] = "evaluation",
    config: ConfigOption = None,
) -> None:
    """Measure image quality (PSNR, SSIM, RMSE, noise, CNR, HU bias, MTF50) of methods."""
    with _errors():
        from ldct_node.lab import evaluation as ev

        for name, folder in (("--ldct", ldct), ("--reference", reference), ("--truth", truth)):
            if folder is not None and not folder.is_dir():
                raise UsageError(f"{name}: {folder} is not a directory")
        if not weights:
            settings = _settings(config) if config is not None else None
            weights = [default_weights_dir(settings)]
        for folder in weights:
            if not (folder / "MANIFEST.json").is_file():
                raise UsageError(f"--weights: {folder} has no MANIFEST.json")
        if not re.fullmatch(r"evaluation[A-Za-z0-9_]*", record_key):
            raise UsageError(
                f"--record-key: must start with 'evaluation' (letters, digits, _), "
                f"got {record_key!r}"
            )
        if record_in is not None and record_in not in weights:
            raise UsageError(f"--record-in: {record_in} must be one of the --weights folders")
        from ldct_node.model.cascade import Cascade

        loaded = {folder: Cascade.load(folder, batch_size=batch_size) for folder in weights}
        shared: dict[Path, dict[int, Any]] = {folder: {} for folder in weights}
        methods = [
            ev.cascade_method(
                folder, blend=b, hu_fidelity_mm=f, cascade=loaded[folder], shared=shared[folder]
            )
            for folder in weights
            for f in (hu_fidelity or [0.0])
            for b in (blend or [0.0])
        ]
        ev.distinguish_names(methods)
        if bm3d:
            methods.append(ev.bm3d_method(bm3d_sigma))
        cases = ev.load_eval_cases(ldct, reference, truth)
        with progress_bar() as bar:
            task = bar.add_task("evaluating", total=len(cases) * len(methods))
            summary = ev.evaluate(
                cases, methods, progress=lambda label: bar.update(task, advance=1 if label else 0)
            )
        paths = ev.write_report(summary, report)
        out.print(ev.markdown_report(summary), highlight=False, markup=False, soft_wrap=True)
        out.print(f"report written to {paths['markdown']}, {paths['json']}, {paths['figure']}")
        if record_in is not None:
            ev.record_in_manifest(summary, record_in, held_out=str(ldct), key=record_key)
            out.print(f"evaluation recorded in {record_in / 'MANIFEST.json'}")


# --------------------------------------------------------------------------- serve + admin

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


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
        str,
        typer.Option(
            "--role",
            help="all: everything in one process; receiver: DICOM receiver + series "
            "stability; worker: denoise + forward. Any number of each may share one "
            "database and spool.",
        ),
    ] = "all",
) -> None:
    """Run the node: DICOM receiver, scheduler, worker and forwarder in one process.

    Stops cleanly on SIGTERM or SIGINT (a running job goes back to the queue).
    """
    with _errors():
        from sqlalchemy.engine import make_url

        from ldct_node.model.manifest import WeightsError
        from ldct_node.service.node import ROLES, Node, NodeStartError

        if role not in ROLES:
            raise UsageError(f"--role: expected one of {', '.join(ROLES)}, got {role!r}")

        # APScheduler logs every run of every duty at INFO: far too chatty for operators.
        logging.getLogger("apscheduler").setLevel(
            logging.DEBUG if _state["debug"] else logging.WARNING
        )
        settings = _settings(config)
        node = Node(settings, role=role)

        def ready(running: Node) -> None:
            db_url = make_url(settings.database_url).render_as_string(hide_password=True)
            if running.server is not None:
                host, port = running.address
                what = (
                    f"{settings.node.ae_title} listening on {host}:{port}"
                    f"{' (TLS)' if settings.security.tls_enabled else ''}"
                )
            else:
                what = f"worker {running.worker_id} ready"
            role_note = "" if role == "all" else f" (role {role})"
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
    with _errors():
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import SQLAlchemyError

        from ldct_node.store.migrate import upgrade

        settings = _settings(config)
        db_url = make_url(settings.database_url).render_as_string(hide_password=True)
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
    with _errors():
        from rich.table import Table

        settings = _settings(config)
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
    with _errors():
        from rich.table import Table

        from ldct_node.store import JobState

        if limit is not None and limit < 1:
            raise UsageError(f"--limit: must be >= 1, got {limit}")
        settings = _settings(config)
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
    settings = _settings(config)
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
    with _errors():
        _change_job(config, job_id, "retry")


@app.command()
def cancel(
    job_id: Annotated[int, typer.Argument(help="The job's id (see `ldct-node jobs`).")],
    config: ConfigOption = None,
) -> None:
    """Cancel a job that is not done (a running one stops at its next heartbeat)."""
    with _errors():
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
    with _errors():
        if older_than is not None and not older_than >= 0:
            raise UsageError(f"--older-than: must be a number of days >= 0, got {older_than}")
        from ldct_node.service.scheduler import purge_expired
        from ldct_node.service.spool import Spool

        settings = _settings(config)
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
    if not _state["debug"]:
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
    with _errors():
        from ldct_node.service.forward import echo as send_echo

        settings = _settings(config)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
