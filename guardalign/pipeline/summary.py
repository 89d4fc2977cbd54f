"""The end-of-run summary on stderr, shared by every command that runs on the runner."""
from __future__ import annotations

from typing import Iterable

from guardalign.pipeline.runner import RunSummary


def print_summary(summary: RunSummary, *, title: str | None = None, unit: str = "img",
                  extra_rows: Iterable[tuple[str, str]] = (), verdicts: bool = True) -> None:
    """A rich table: records, verdicts by category, stage-specific rows, errors, resumed, throughput, gate."""
    from rich.table import Table

    from guardalign.pipeline.progress import print_errors, stderr_console

    console = stderr_console()
    table = Table(title=title or f"guardalign {summary.name}", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("records", str(summary.total))
    if verdicts:
        table.add_row("safe", str(summary.ok - summary.unsafe))
        table.add_row("unsafe", f"{summary.unsafe} ({summary.unsafe_rate:.1%} of readable)")
        for cat, n in summary.by_category.most_common():
            table.add_row(f"  unsafe · {cat}", str(n))
    for name, value in extra_rows:
        table.add_row(name, value)
    table.add_row("errors", str(summary.errors))
    if summary.resumed:
        table.add_row("resumed (already done)", str(summary.resumed))
    for reason, n in (summary.not_inputs.by_reason.most_common() if summary.not_inputs else ()):
        table.add_row(f"skipped · {reason}", str(n))
    table.add_row("throughput", f"{summary.throughput:.1f} {unit}/s over {summary.seconds:.1f} s")
    console.print(table)
    print_errors(console, summary.error_list, see="the records")
    if summary.gate_failed:
        console.print(f"GATE FAILED: {summary.gate_reason}", style="bold red", markup=False)
    elif summary.empty_under_gate:
        console.print(f"GATE NOT MET: {summary.gate_reason}", style="bold red", markup=False)


def say_columns(plans: dict) -> None:
    """One stderr line per Parquet input: which image column is read, and why (auto-detection explains itself)."""
    from guardalign.pipeline.progress import stderr_console

    console = stderr_console()
    for plan in plans.values():
        if plan.column and not plan.error:
            console.print(f"{plan.path}: image column {plan.column!r} ({plan.why})"
                          + (f"; other image columns not scanned: {', '.join(plan.others)}" if plan.others else ""),
                          markup=False, highlight=False, style="dim")
