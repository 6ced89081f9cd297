"""``weightlab merge``: compose base + residuals (Eq. 2) into a diffusers folder or a streamed .safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weightlab.cli.common import console, fail_on_error


def parse_term(spec: str, kind: str) -> dict:
    """``PATH[:scale]`` -> a term's fields (a trailing ``:number`` is the scale; ``ns/name:alias`` stays a reference)."""
    source, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            scale = float(tail)
            source = head
        except ValueError:
            pass
    return {"source": source, "kind": kind, "scale": scale}


def merge_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="A folder (diffusers model folder) or a file ending in .safetensors (streamed)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe YAML/JSON (instead of --base/--style/...)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base UNet: diffusers folder, single file, or registry ref."),
    style: list[str] = typer.Option([], "--style", help="Style residual PATH[:α] (LoRA or dense fine-tune). Repeatable."),
    accel: list[str] = typer.Option([], "--accel", help="Image-acceleration LoRA PATH[:β]. Repeatable."),
    motion: Optional[str] = typer.Option(None, "--motion", help="Motion module PATH[:γ] (folder or AnimateDiff file)."),
    motion_lora: list[str] = typer.Option([], "--motion-lora", help="Motion LoRA PATH[:s]. Repeatable."),
    method: str = typer.Option("linear", "--method", help="linear (Eq. 2) | ties | dare | svd (combine several style "
                               "terms), or another registered method."),
    dtype: str = typer.Option("float32", "--dtype", help="float16 | bfloat16 | float32"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (CUDA uses the fused Triton kernel)."),
    save_recipe: Optional[Path] = typer.Option(None, "--save-recipe", help="Also write the recipe used to this YAML file."),
    register: Optional[str] = typer.Option(None, "--register", help="Store the output in the registry as NS/NAME with a merged_from lineage edge."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder for a single-file base whose "
                                             "text encoder or VAE a term changes (folder output); the family's from "
                                             "the Hugging Face cache when omitted."),
) -> None:
    """Merge w' = w0 + α·style + β·accel + γ·motion exactly (fp32 accumulation, one rounding)."""
    from weightlab.merge import merge_to_file, merge_to_folder
    from weightlab.recipe import Recipe
    from weightlab.registry.resolve import LocalResolver

    with fail_on_error(), LocalResolver() as resolve:
        if recipe is not None:
            if base or style or accel or motion or motion_lora:
                raise typer.BadParameter("give either --recipe or --base/--style/--accel/--motion, not both")
            r = Recipe.from_file(recipe)
        else:
            if base is None:
                raise typer.BadParameter("--base is required without --recipe")
            terms = ([parse_term(s, "style") for s in style] + [parse_term(s, "image_accel") for s in accel]
                     + ([parse_term(motion, "motion")] if motion else []) + [parse_term(s, "motion_lora") for s in motion_lora])
            r = Recipe.from_dict(dict(base=base, terms=terms, method=method, dtype=dtype, device=device))
        if save_recipe:
            r.save(save_recipe)
        if out.suffix == ".safetensors":  # the UNet alone: no other component, so no tokenizer
            summary = merge_to_file(r, out, resolve=resolve)
        else:
            summary = merge_to_folder(r, out, resolve=resolve, tokenizer=tokenizer)
        if register:
            version = register_output(r, out, register, resolve)
    console.print(f"merged {summary['tensors']} tensors ({summary['bytes'] / 1e6:.1f} MB, {r.dtype}) in {summary['seconds']:.2f} s")
    console.print(f"output: {summary['path']}")
    console.print(f"output hash: {summary['output_hash']}")
    console.print(f"recipe hash: {r.hash}")
    if register:
        console.print(f"registered: {version.ref}")


def register_output(recipe, out: Path, name: str, resolve):
    """Add a merge output to the registry with a ``merged_from`` edge naming the base and every term with its scale
    and the components it changed (``resolve`` reads the terms' files)."""
    from weightlab.registry.service import Registry
    from weightlab.registry.schemas import Derivation

    with Registry() as reg:
        return reg.register_output(out, name=name, kind="base", metadata={"recipe_hash": recipe.hash},
                                   derivation=Derivation.from_merged_file(out, resolve=resolve))


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_cmd)
