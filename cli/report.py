"""`guardalign report`: flag parsing only; the work is guardalign.reporting.collect.report()."""
from __future__ import annotations

from typing import List, Optional

import typer

from cli._common import call

HELP = """Turn scan, answer and probe records (and mask manifests) into one report: a self-contained HTML page, Markdown or JSON.

RECORDS are scan.jsonl / answers.jsonl / probe.jsonl files (or Parquet), or a mask run's manifest.jsonl; probe records give per-layer line charts (image vs text refusal rank, image–caption cosine, attention) with bootstrap intervals and a per-category table; which is which is told from the records. The HTML page inlines everything (CSS, JS, SVG plots, data-URI thumbnails with the patch heatmap) and makes no network request, so it can be mailed around and opened offline. Thumbnails are only drawn from bytes whose SHA-256 matches the record (never another image), are read only from inside the --image-root folders (relative sources are looked up under each), and are blurred for unsafe items until clicked (--no-blur). Answer rows show the image the model saw (purified), the prompt's own category and the answers file they came from. Malformed records are listed as errors in the report.

Examples:

  guardalign report scan.jsonl -o report.html

  guardalign report scan.jsonl answers.jsonl -o report.html --image-root photos/

  guardalign report scan.jsonl --format md >> "$GITHUB_STEP_SUMMARY"

  guardalign report scan.jsonl answers.jsonl --format json -o summary.json

  guardalign report probe.jsonl --format md

Exit codes: 0 done · 2 usage error or a missing records file, nothing written · 3 written, but some records were malformed (listed in the report).
"""


def report_command(
    records: List[str] = typer.Argument(..., help="Scan, answer and/or probe record files (.jsonl or .parquet)."),
    out: Optional[str] = typer.Option(
        None, "--out", "-o", help="Output file, '-' for stdout. Default: report.html for html, stdout for md/json."
    ),
    format: str = typer.Option("html", "--format", "-f", help="html, md (CI logs, PR comments) or json (dashboards)."),
    max_thumbnails: int = typer.Option(200, "--max-thumbnails", help="Thumbnails per scan (the most severe items)."),
    max_rows: int = typer.Option(1000, "--max-rows", help="Rows per flagged-items / responses table."),
    image_root: List[str] = typer.Option(
        [], "--image-root", help="Folder thumbnails may be read from and relative sources are looked up in (repeatable). Default: . and the records' folders."
    ),
    title: Optional[str] = typer.Option(None, "--title", help="Report title."),
    no_blur: bool = typer.Option(False, "--no-blur", help="Show unsafe thumbnails unblurred (default: blurred, click to reveal)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line on stderr."),
) -> None:
    from guardalign.commands.report import report

    summary = call(
        report, records=records, out=out, format=format, max_thumbnails=max_thumbnails, max_rows=max_rows,
        image_root=image_root, title=title, blur=not no_blur,
    )
    bad = summary["malformed"]["count"]
    if not quiet:
        where = out or ("report.html" if format == "html" else "stdout")
        n_scan = sum(r["records"] for r in summary["scan"])
        n_ans = summary["answers"]["records"] if summary["answers"] else 0
        n_mask = sum(r["records"] for r in summary.get("mask", []))
        masks = f", {n_mask:,} mask entries" if summary.get("mask") else ""
        n_probe = summary["probe"]["records"] if summary.get("probe") else 0
        probed = f", {n_probe:,} probe records" if n_probe else ""
        typer.echo(f"report: {n_scan:,} scan records, {n_ans:,} answers{masks}{probed}, {bad:,} malformed → {where}",
                   err=True)
    from guardalign.errors import EXIT_OK, EXIT_UNREADABLE

    raise typer.Exit(EXIT_UNREADABLE if bad else EXIT_OK)


report_command.__doc__ = HELP
