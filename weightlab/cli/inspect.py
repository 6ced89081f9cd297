"""``weightlab inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from weightlab.cli.common import console, fail_on_error


def inspect_cmd(
    paths: list[Path] = typer.Argument(..., help="Weight files (.safetensors) or diffusers folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read .ckpt/.pt/.bin (weights only, in a child process). Only for files you trust."),
) -> None:
    """Show family, kind, representation, ranks (and where a LoRA's alphas come from), dtypes, parameter count
    and hashes of weight files."""
    from weightlab.inspect import inspect_path, inspect_table

    with fail_on_error():
        infos = [inspect_path(p, allow_pickle=allow_pickle) for p in paths]
    if as_json:
        typer.echo(json.dumps([i.model_dump() for i in infos] if len(infos) > 1 else infos[0].model_dump(), indent=2))
        return
    console.print(inspect_table(infos))
    for i in infos:
        if i.alpha_source:
            console.print(f"{Path(i.path).name}: LoRA alphas from {i.alpha_source}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
