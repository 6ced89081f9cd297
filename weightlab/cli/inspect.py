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
    from weightlab.inspect import inspect_path

    with fail_on_error():
        infos = [inspect_path(p, allow_pickle=allow_pickle) for p in paths]
    if as_json:
        typer.echo(json.dumps([i.model_dump() for i in infos] if len(infos) > 1 else infos[0].model_dump(), indent=2))
        return
    console.print(inspect_table(infos))
    for i in infos:
        if i.alpha_source:
            console.print(f"{Path(i.path).name}: LoRA alphas from {i.alpha_source}")


def inspect_table(infos) -> "Table":  # noqa: F821
    """A readable table of :class:`~weightlab.inspect.Inspection` rows."""
    from rich.table import Table

    table = Table(title="weightlab inspect")
    for col in ("file", "family", "kind", "repr", "ranks (alpha)", "targets", "dtypes", "params", "sha256", "tensor hash", "skipped",
                "finite"):
        table.add_column(col, overflow="fold")
    for i in infos:
        ranks = ", ".join(f"{r}" for r in i.ranks) + (f" ({', '.join(f'{a:g}' for a in i.alphas)})" if i.alphas else "")
        algebras = f" ({', '.join(i.algebras)})" if i.algebras and i.algebras != ["lora"] else ""
        table.add_row(Path(i.path).name, i.family, i.kind_guess, i.representation + algebras, ranks or "-", str(i.n_targets),
                      ",".join(i.dtypes), f"{i.n_params:,}", i.file_sha256[:12], (i.tensor_hash or "-")[:12],
                      str(len(i.skipped)), "yes" if i.finite else "NO (NaN/Inf)")
    return table


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
