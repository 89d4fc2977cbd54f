"""Shared rich helpers: a stderr console and a progress bar with items/s and ETA.

Stdout carries data only; everything here writes to stderr.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


def stderr_console():
    """A rich Console bound to stderr (progress, summaries, warnings)."""
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True, unit: str = "img") -> Iterator:
    """Yield ``advance(n)``: a rich progress bar on stderr with throughput and ETA.

    With ``enabled=False`` (or a non-interactive stderr) the bar is silent but ``advance`` still works.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = stderr_console()
    if not enabled:
        yield lambda n=1: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, rate="")

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            if speed:
                progress.update(task, rate=f"{speed:.1f} {unit}/s")

        yield advance


def print_errors(console, errors: list[tuple[str, str]], see: str, limit: int = 20) -> None:
    """Print the first ``limit`` (id, error) pairs in red on ``console``, then how many more and where."""
    for rid, err in errors[:limit]:
        console.print(f"error {rid}: {err}", style="red", markup=False, highlight=False)
    if len(errors) > limit:
        console.print(f"… and {len(errors) - limit} more errors (see {see})", style="red", markup=False)
