"""The one rich Console (stderr) and progress-bar helpers shared by every command."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Shows task.fields['rate_text'] (e.g. '1.2M rows/s  85 MB/s'), updated by the caller."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("rate_text", "")), style="cyan")


def make_progress(quiet: bool = False) -> Progress:
    """A progress bar with count, rate text and ETA; disabled when quiet or not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet or not sys.stderr.isatty(),
        transient=False,
    )


def human_rate(n: float, unit: str) -> str:
    """1234567 -> '1.23M rows/s'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix} {unit}"
    return f"{n:.0f} {unit}"
