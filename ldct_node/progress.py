"""The one progress bar of every long-running command (simulate, denoise, train data)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(console: Console | None = None, *, transient: bool = False) -> Progress:
    """A rich progress bar: description, bar, done/total, elapsed, remaining.

    Progress goes to stderr by default so that command output on stdout stays clean.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console if console is not None else Console(stderr=True),
        transient=transient,
    )
