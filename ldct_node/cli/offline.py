"""``ldct-node denoise``: the node's pipeline over files, no network, no database."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ldct_node.cli.common import (
    CommandFailedError,
    ConfigOption,
    app,
    command_errors,
    default_weights_dir,
    out,
    progress_bar,
    settings_from,
)

logger = logging.getLogger(__name__)


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
    with command_errors():
        from ldct_node.offline import run_denoise

        settings = settings_from(config)
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
