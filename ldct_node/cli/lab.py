"""The lab's commands: ``simulate``, ``train`` and ``evaluate`` (they import the lab only
when they run).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from ldct_node.choices import Geometry, LrSchedule, Method, PerceptualNorm, PhantomKind
from ldct_node.cli.common import (
    ConfigOption,
    UsageError,
    app,
    choice_option,
    command_errors,
    default_weights_dir,
    out,
    progress_bar,
    settings_from,
)

logger = logging.getLogger(__name__)


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
        Geometry,
        choice_option(
            Geometry, "--geometry", listing="or", help="Scanner geometry: parallel or fan."
        ),
    ] = Geometry.PARALLEL,
    electronic_noise: Annotated[
        float | None,
        typer.Option("--electronic-noise", min=0.0, help="Electronic noise std in counts."),
    ] = None,
    phantom: Annotated[
        PhantomKind,
        choice_option(
            PhantomKind, "--phantom", listing="or", help="Procedural phantom: body, water or qa."
        ),
    ] = PhantomKind.BODY,
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
    with command_errors():
        from ldct_node.lab.simulation import SimulationParameters, simulate_dataset

        if not source and (pixel_size is not None or slice_range is not None or slice_step > 1):
            raise UsageError("--pixel-size, --slice-range, --slice-step: only with --source")
        parameters = SimulationParameters(
            n_cases=cases,
            slices_per_case=slices,
            size=size,
            dose_fraction=dose_fraction,
            i0=i0,
            electronic_noise=electronic_noise,
            seed=seed,
            geometry=geometry,
            phantom_kind=phantom,
            source_series=tuple(source or ()),
            pixel_size_mm=pixel_size,
            slice_range=None if slice_range is None else _parse_slice_range(slice_range),
            slice_step=slice_step,
            write_truth_recon=truth_recon,
        )
        written = simulate_dataset(output, parameters, workers=workers, progress=True)
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
        Method,
        choice_option(
            Method,
            "--method",
            help="C (the cascade), or a comparison method: A, B, D, C-cnn10, D-cnn10.",
        ),
    ] = Method.C,
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
        PerceptualNorm,
        choice_option(
            PerceptualNorm,
            "--perceptual-norm",
            help="none (the literal VGG term) or calibrated (in MSE units of the pairs).",
        ),
    ] = PerceptualNorm.NONE,
    lr_schedule: Annotated[
        LrSchedule,
        choice_option(
            LrSchedule,
            "--lr-schedule",
            help="constant (the paper's) or cosine (decays to 1% over each stage).",
        ),
    ] = LrSchedule.CONSTANT,
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
    with command_errors():
        from ldct_node.lab.train import TrainOptions
        from ldct_node.lab.train import train as run_training

        if vgg_weights != "imagenet" and not Path(vgg_weights).is_file():
            raise UsageError(f"--vgg-weights: {vgg_weights} is not a file (or use 'imagenet')")
        if not data.is_dir():
            raise UsageError(f"--data: {data} is not a directory")
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
    with command_errors():
        from ldct_node.lab import evaluation as ev

        for name, folder in (("--ldct", ldct), ("--reference", reference), ("--truth", truth)):
            if folder is not None and not folder.is_dir():
                raise UsageError(f"{name}: {folder} is not a directory")
        if not weights:
            settings = settings_from(config) if config is not None else None
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
