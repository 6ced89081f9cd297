"""``weightlab export onnx`` and ``weightlab export reweight``: ONNX export of merged video models, and new scales
written into an existing export without re-exporting."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from weightlab.cli.common import console, fail_on_error

if TYPE_CHECKING:
    from weightlab.onnx_manifest import OnnxManifest

export_app = typer.Typer(help="Export merged video models to ONNX; re-weight an export in place.", no_args_is_help=True)


def _summary(manifest: OnnxManifest, folder: Path, title: str) -> None:
    from rich.table import Table

    from weightlab.onnx_manifest import MANIFEST

    table = Table(title=title)
    for col in ("model", "export s", "graph MB", "data MB", "max abs err", "max rel err", "dynamic"):
        table.add_column(col, overflow="fold")
    for name, entry in manifest.models.items():
        check = entry.verification
        errors = (f"{check.max_abs_err:.2e}", f"{check.max_rel_err:.2e}") if check else ("not verified",) * 2
        dynamic = "; ".join(f"{k}[{','.join(v)}]" for k, v in entry.dynamic.items())
        table.add_row(name, f"{entry.export_seconds:.1f}", f"{entry.bytes.graph / 1e6:.2f}",
                      f"{entry.bytes.data / 1e6:.2f}", *errors, dynamic)
    console.print(table)
    console.print(f"dtype {manifest.dtype}, opset {manifest.opset}, recipe {manifest.recipe_hash}")
    console.print(f"manifest: {folder / MANIFEST}")


@export_app.command("onnx")
def onnx_cmd(
    recipe: str = typer.Option(..., "--recipe", help="Recipe YAML/JSON or merged model folder (with a motion term)."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder (created)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16"),
    device: Optional[str] = typer.Option(None, "--device", help="Where to export and verify (cpu, cuda); the recipe's when omitted."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset; the exporter's default when omitted."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare each graph with PyTorch (recorded in the manifest)."),
) -> None:
    """Export the merged UNetMotionModel, text encoder and VAE decoder (external data, verified, manifest.json)."""
    from weightlab.onnx_export import export_onnx
    from weightlab.registry.resolve import LocalResolver

    with fail_on_error(), LocalResolver() as resolve:
        manifest = export_onnx(recipe, out, dtype=dtype, device=device, opset=opset, verify=verify, resolve=resolve)
    _summary(manifest, out, "weightlab export onnx")


@export_app.command("reweight")
def reweight_cmd(
    onnx: Path = typer.Option(..., "--onnx", help="A `weightlab export onnx` folder."),
    recipe: str = typer.Option(..., "--recipe", help="The recipe with the new scales (same base and residuals)."),
    device: Optional[str] = typer.Option(None, "--device", help="Where to merge and verify."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare the re-weighted graphs with PyTorch."),
) -> None:
    """Re-merge new α/β/γ and rewrite only unet/model.onnx.data (and text_encoder/'s when the recipe's text encoder
    changed); the graph files stay byte-identical."""
    from weightlab.onnx_export import reweight_onnx
    from weightlab.registry.resolve import LocalResolver

    with fail_on_error(), LocalResolver() as resolve:
        manifest = reweight_onnx(onnx, recipe, device=device, verify=verify, resolve=resolve)
    _summary(manifest, onnx, "weightlab export reweight")


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
