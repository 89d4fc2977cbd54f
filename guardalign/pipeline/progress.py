"""Shared rich helpers: a stderr console and a progress bar with items/s and ETA.

Stdout carries data only; everything here writes to stderr.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


def stderr_console():
    """A rich Console bound to stderr (progress, summaries, warnings)."""
    from rich.console import Console

    return Console(stderr=True)


def _rate_eta_columns():
    """Columns for speed and ETA measured over this run's items only (resumed items are not 'fast')."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            rate = task.fields.get("rate")
            return Text(f"{rate:.2f} {task.fields.get('unit', 'it')}/s" if rate else "", style="cyan")

    class EtaColumn(ProgressColumn):
        def render(self, task) -> Text:
            rate, total = task.fields.get("rate"), task.total
            if not rate or total is None:
                return Text("ETA –", style="dim")
            left = max(0.0, (total - task.completed) / rate)
            h, rem = divmod(int(left + 0.5), 3600)
            return Text(f"ETA {h}:{rem // 60:02d}:{rem % 60:02d}", style="dim")

    return RateColumn(), EtaColumn()


@contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True, unit: str = "img",
                 completed: int = 0) -> Iterator:
    """Yield ``advance(n)``: a rich progress bar on stderr with throughput and ETA.

    ``completed`` items (done by an earlier, resumed run) are shown as done from the start; the speed and ETA
    count only this run's items, from the first ``advance`` on. With ``enabled=False`` (or a non-interactive
    stderr) the bar is silent but ``advance`` still works.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    if not enabled:
        yield lambda n=1: None
        return
    console = stderr_console()
    rate_col, eta_col = _rate_eta_columns()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               rate_col, TimeElapsedColumn(), eta_col]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, completed=completed, rate=None, unit=unit)
        start, done = time.perf_counter(), 0

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            elapsed = time.perf_counter() - start
            progress.update(task, advance=n, rate=done / elapsed if elapsed > 0 else None)

        yield advance


def print_errors(console, errors: list[tuple[str, str]], see: str, limit: int = 20) -> None:
    """Print the first ``limit`` (id, error) pairs in red on ``console``, then how many more and where."""
    for rid, err in errors[:limit]:
        console.print(f"error {rid}: {err}", style="red", markup=False, highlight=False)
    if len(errors) > limit:
        console.print(f"… and {len(errors) - limit} more errors (see {see})", style="red", markup=False)
