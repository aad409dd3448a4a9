"""Progress output: a rich bar on a terminal, one plain line per epoch otherwise, or nothing."""
from __future__ import annotations

import sys
from typing import TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_metrics(metrics: dict[str, float]) -> str:
    """`epoch 3/10  train_loss 0.1234  ...` with numbers rounded for reading."""
    parts = []
    for key, value in metrics.items():
        if key in ("epoch", "stage") or value is None:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


class PlainProgress:
    """One line per epoch, for logs and pipes."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def start_epoch(self, epoch: int, total: int, steps: int) -> None:
        self.label = f"epoch {epoch}/{total}"

    def advance(self) -> None: ...

    def end_epoch(self, metrics: dict[str, float]) -> None:
        print(f"{self.label}  {format_metrics(metrics)}", file=self.stream, flush=True)

    def close(self) -> None: ...


class QuietProgress(PlainProgress):
    """Prints nothing (`--quiet`)."""

    def end_epoch(self, metrics: dict[str, float]) -> None: ...


class RichProgress(PlainProgress):
    """A live bar per epoch, then the epoch's line kept above it."""

    def __init__(self) -> None:
        super().__init__()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), transient=True)
        self.bar.start()
        self.task = None

    def start_epoch(self, epoch: int, total: int, steps: int) -> None:
        super().start_epoch(epoch, total, steps)
        self.task = self.bar.add_task(self.label, total=steps)

    def advance(self) -> None:
        self.bar.advance(self.task)

    def end_epoch(self, metrics: dict[str, float]) -> None:
        self.bar.remove_task(self.task)
        self.bar.console.print(f"{self.label}  {format_metrics(metrics)}", highlight=False)

    def close(self) -> None:
        self.bar.stop()


def make_progress(quiet: bool = False) -> PlainProgress:
    """Quiet, rich on a terminal, else plain lines."""
    if quiet:
        return QuietProgress()
    return RichProgress() if sys.stdout.isatty() else PlainProgress()
