"""Shared plumbing for the Typer commands: turn library errors into a message and an exit code."""
from __future__ import annotations

import sys
from typing import Any, Callable

import typer


def call(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Call a library entry point; a GuardalignError becomes 'error: …' on stderr and its exit code (2).

    KeyboardInterrupt exits 130 without a traceback; anything else is a bug and keeps its traceback.
    """
    from guardalign.errors import GuardalignError

    try:
        return fn(**kwargs)
    except GuardalignError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def stdin_if_dash(paths: list[str]):
    """The process stdin when '-' is among the inputs, else None."""
    return sys.stdin if "-" in paths else None
