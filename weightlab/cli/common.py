"""Shared CLI helpers: one console, and turning WeightlabErrors into a clean message + exit code 2."""

from __future__ import annotations

import contextlib

import typer
from rich.console import Console
from rich.markup import escape

from weightlab.errors import WeightlabError

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def fail_on_error():
    """Print a WeightlabError as ``error: ...`` and exit 2 (no traceback: the message says what to do)."""
    try:
        yield
    except WeightlabError as e:
        # escape: messages quote keys from the file, which may look like rich markup; soft_wrap: one line
        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
