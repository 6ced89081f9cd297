"""``make demo``: weightlab's main job, step by step, on the tiny model family (nothing is downloaded).

Run:
    make demo                      # or: python -m weightlab.demo
    WEIGHTLAB_HOME=/tmp/wl make demo

Files go under ``$WEIGHTLAB_HOME`` (default ``~/.weightlab``); the tiny family lives in ``$WEIGHTLAB_HOME/tiny``
and is rebuilt only if missing. Each step is a small function of the shared :class:`Demo` state; later steps
(merge, sample, export, registry) are appended to ``STEPS``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never needs the hub; fail fast if something tries
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep optional-dependency notices out of the output
# Wide and fixed, so tables stay readable in CI logs (which are not terminals and would default to 80 columns).
console = Console(width=200)


@dataclass
class Demo:
    """What the steps share: where files go, and what earlier steps produced."""

    home: Path
    recipe: "Recipe | None" = None  # noqa: F821
    onnx_dir: Path | None = None
    tiny: "TinyFamily | None" = None  # noqa: F821
    inspections: dict = field(default_factory=dict)  # name -> weightlab.inspect.Inspection
    refs: dict = field(default_factory=dict)  # tiny-family file name -> registry reference
    merged: Path | None = None
    results: dict = field(default_factory=dict)  # table rows for the summary


def build_tiny(demo: Demo) -> None:
    """Write the tiny SD1.5-shaped family in its real on-disk layouts."""
    from weightlab.testing import build_tiny_family

    demo.tiny = build_tiny_family(demo.home / "tiny")
    console.print(f"tiny family in {demo.tiny.root}")


def inspect_files(demo: Demo) -> None:
    """``weightlab inspect`` on every file: family, kind, representation, ranks, hashes."""
    from weightlab.inspect import inspect_path, inspect_table

    demo.inspections = {name: inspect_path(path) for name, path in demo.tiny.files().items()}
    console.print(inspect_table(list(demo.inspections.values())))


REGISTERED = {"base_dir": ("base", "tiny/sd15-base"), "style_lora_kohya": ("style", "tiny/style"),
              "accel_lora": ("image_accel", "tiny/lcm-lora"), "motion_animatelcm": ("motion", "tiny/animatelcm-motion")}


def register_family(demo: Demo) -> None:
    """Register the residuals the recipe uses; re-running finds the same versions (content-addressed)."""
    from weightlab.registry.service import Registry

    with Registry(home=demo.home) as reg:
        for attr, (kind, name) in REGISTERED.items():
            v = reg.add(getattr(demo.tiny, attr), name=name, kind=kind, tags=["demo"])
            reg.alias(v.ref, "prod")
            demo.refs[attr] = f"{name}:prod"
            console.print(f"{v.ref:<32} {kind:<12} tensor hash {v.tensor_hash[:16]}")


def merge_by_name(demo: Demo) -> None:
    """Eq. 2 by registry names: base + 0.8·style + 1.0·LCM-LoRA + 1.0·motion, streamed to a diffusers folder."""
    from weightlab.merge import merge_to_folder
    from weightlab.recipe import Recipe, Term
    from weightlab.registry.resolve import LocalResolver
    from weightlab.registry.schemas import Derivation
    from weightlab.registry.service import Registry

    recipe = Recipe(base=demo.refs["base_dir"], terms=[
        Term(source=demo.refs["style_lora_kohya"], kind="style", scale=0.8),
        Term(source=demo.refs["accel_lora"], kind="image_accel", scale=1.0),
        Term(source=demo.refs["motion_animatelcm"], kind="motion", scale=1.0)])
    demo.recipe = recipe
    demo.merged = demo.home / "demo" / "merged_unet"
    with LocalResolver(home=demo.home) as resolve:  # the merge engine reads paths; the registry resolves names
        summary = merge_to_folder(recipe, demo.merged, progress=False, resolve=resolve)
    with Registry(home=demo.home) as reg:
        version = reg.register_output(demo.merged, name="tiny/video-lcm", kind="base",
                                      derivation=Derivation.from_merged_file(demo.merged),
                                      metadata={"recipe_hash": recipe.hash})
    demo.results["merge"] = summary["seconds"]
    console.print(recipe.to_yaml())
    console.print(f"merged {summary['tensors']} tensors in {summary['seconds']:.2f} s -> {demo.merged}")
    console.print(f"output hash {summary['output_hash']}, registered as {version.ref}")


def show_lineage(demo: Demo) -> None:
    """The merged version's lineage names its base and every term with its scale."""
    from weightlab.registry.render import lineage_tree
    from weightlab.registry.service import Registry

    with Registry(home=demo.home) as reg:
        console.print(lineage_tree(reg.lineage("tiny/video-lcm")))


PROMPT = "the cat and a dog on the street"


def _write(clip, name: str, demo: Demo) -> str:
    from weightlab.video import write_video

    mp4 = write_video(clip.frames, demo.home / "demo" / f"{name}.mp4")
    write_video(clip.frames, demo.home / "demo" / f"{name}.gif")
    return str(mp4)


def sample_pytorch(demo: Demo) -> None:
    """16 frames, 4 LCM steps, no CFG, from the merged folder with the PyTorch pipeline (its recipe names the base
    pipeline, whose text encoder and VAE it uses, by registry reference)."""
    from weightlab.registry.resolve import LocalResolver
    from weightlab.video import VideoPipeline

    with LocalResolver(home=demo.home) as resolve:
        pipe = VideoPipeline.from_source(demo.merged, resolve=resolve)
    clip = pipe(PROMPT, frames=16, steps=4, guidance=1.0, seed=0, progress=False)
    demo.results["torch"] = (clip, _write(clip, "clip_torch", demo))
    console.print(f"{clip.frames.shape[0]} frames {clip.frames.shape[1:3]}, denoise {clip.seconds['denoise']:.2f} s -> {demo.results['torch'][1]} (+ .gif)")


def export_onnx(demo: Demo) -> None:
    """UNetMotionModel, text encoder and VAE decoder to ONNX, each verified against PyTorch."""
    from weightlab.onnx_export import export_onnx as export
    from weightlab.registry.resolve import LocalResolver

    demo.onnx_dir = demo.home / "demo" / "onnx"
    t = time.perf_counter()
    with LocalResolver(home=demo.home) as resolve:
        manifest = export(demo.merged, demo.onnx_dir, progress=False, resolve=resolve)
    demo.results["export"] = time.perf_counter() - t
    for name, part in manifest.models.items():
        v = part.verification
        console.print(f"{name:<14} verified vs PyTorch: max abs err {v.max_abs_err:.2e}, max rel err {v.max_rel_err:.2e}")


def sample_onnx(demo: Demo) -> None:
    """The same clip (same seed) from ONNX Runtime, then timings and the difference between the two clips."""
    import numpy as np
    from rich.table import Table

    from weightlab.onnx_runtime import OnnxVideoPipeline

    pipe = OnnxVideoPipeline(demo.onnx_dir)
    clip = pipe(PROMPT, frames=16, steps=4, guidance=1.0, seed=0, progress=False)
    path = _write(clip, "clip_onnx", demo)
    ref, ref_path = demo.results["torch"]
    table = Table(title="tiny video LCM: PyTorch vs ONNX Runtime (16 frames, 4 steps, guidance 1.0)")
    table.add_column("what")
    table.add_column("value")
    table.add_row("merge (Eq. 2, streamed)", f"{demo.results['merge']:.2f} s")
    table.add_row("denoise, PyTorch eager", f"{ref.seconds['denoise']:.3f} s")
    table.add_row("export to ONNX (+ verification)", f"{demo.results['export']:.2f} s")
    table.add_row(f"denoise, ONNX Runtime ({pipe.provider})", f"{clip.seconds['denoise']:.3f} s")
    table.add_row("max |difference| of the clips (0..1)", f"{float(np.abs(ref.video - clip.video).max()):.2e}")
    table.add_row("merged UNet", str(demo.merged))
    table.add_row("ONNX export", str(demo.onnx_dir))
    table.add_row("clips", f"{ref_path}\n{path}")
    console.print(table)


STEPS = [
    ("Build the tiny model family", build_tiny),
    ("Inspect every file", inspect_files),
    ("Register the residuals", register_family),
    ("Merge by registry names (Eq. 2)", merge_by_name),
    ("Lineage of the merge", show_lineage),
    ("Sample 16 frames with PyTorch", sample_pytorch),
    ("Export to ONNX", export_onnx),
    ("Sample with ONNX Runtime", sample_onnx),
]


def main() -> int:
    demo = Demo(home=Path(os.environ.get("WEIGHTLAB_HOME") or "~/.weightlab").expanduser())
    start = time.perf_counter()
    for i, (title, step) in enumerate(STEPS, 1):
        console.rule(f"[bold]{i}. {title}")
        t = time.perf_counter()
        step(demo)
        console.print(f"[dim]{title}: {time.perf_counter() - t:.1f} s[/]")
    console.rule(f"[bold green]demo done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
