"""``make demo``: weightlab's main job, step by step, on the trained toy family shipped in the package (nothing is
downloaded).

Run:
    make demo                      # or: python -m weightlab.demo
    WEIGHTLAB_HOME=/tmp/wl make demo

The toy family (:mod:`weightlab.toy.family`) is AnimateLCM at toy scale, trained by weightlab's own trainers: a teacher
UNet, an image LCM-LoRA, a distilled motion module and an "outlined" style LoRA. The demo registers them, merges
Eq. 2 by registry names, samples a 16-frame clip of :data:`PROMPT` in 4 steps, asks the toy classifier what it sees,
exports to ONNX and samples the same clip with ONNX Runtime. Files go under ``$WEIGHTLAB_HOME`` (default
``~/.weightlab``), the clips under ``$WEIGHTLAB_HOME/demo``. Each step is a small function of the shared
:class:`Demo` state.
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
PROMPT = "a red circle moving right"
SCALE = 8  # the toy clips are 32×32 pixels: the GIF shows each pixel as an 8×8 block, the strip as 4×4


@dataclass
class Demo:
    """What the steps share: where files go, and what earlier steps produced."""

    home: Path
    family: "ToyFamily | None" = None  # noqa: F821
    recipe: "Recipe | None" = None  # noqa: F821
    onnx_dir: Path | None = None
    pipe: "VideoPipeline | None" = None  # noqa: F821  (the merged model's PyTorch pipeline, once sampled)
    refs: dict = field(default_factory=dict)  # kind -> registry reference
    merged: Path | None = None
    results: dict = field(default_factory=dict)  # table rows for the summary


def load_family(demo: Demo) -> None:
    """The trained toy family shipped in the package, and what its reproduction measured."""
    from weightlab.toy.family import toy_family

    demo.family = toy_family()
    info = demo.family.info()
    console.print(f"toy family in {demo.family.root} ({info['bytes'] / 2**20:.1f} MB), made by `{info['command']}`")
    for claim in info.get("claims", []):
        console.print(f"  measured: {claim}")


def inspect_files(demo: Demo) -> None:
    """``weightlab inspect`` on every file: family, kind, representation, ranks, hashes."""
    from weightlab.inspect import inspect_path, inspect_table

    paths = [demo.family.teacher, *demo.family.residuals().values()]
    console.print(inspect_table([inspect_path(p) for p in paths]))


NAMES = {"base": "toy/teacher", "style": "toy/outlined-style", "image_accel": "toy/lcm-lora",
         "motion": "toy/motion-lcm"}


def register_family(demo: Demo) -> None:
    """Register the base and the residuals; re-running finds the same versions (content-addressed)."""
    from weightlab.registry.service import Registry

    with Registry(home=demo.home) as reg:
        for kind, path in {"base": demo.family.teacher, **demo.family.residuals()}.items():
            v = reg.add(path, name=NAMES[kind], kind=kind, tags=["demo"])
            reg.alias(v.ref, "prod")
            demo.refs[kind] = f"{NAMES[kind]}:prod"
            console.print(f"{v.ref:<32} {kind:<12} tensor hash {v.tensor_hash[:16]}")


def merge_by_name(demo: Demo) -> None:
    """Eq. 2 by registry names: teacher + 1.0·style + 1.0·LCM-LoRA + 1.0·motion, streamed to a diffusers folder."""
    from weightlab.merge import merge_to_folder
    from weightlab.recipe import Recipe, Term
    from weightlab.registry.resolve import LocalResolver
    from weightlab.registry.schemas import Derivation
    from weightlab.registry.service import Registry

    recipe = Recipe(base=demo.refs["base"], terms=[Term(source=demo.refs[kind], kind=kind, scale=1.0)
                                                   for kind in ("style", "image_accel", "motion")])
    demo.recipe = recipe
    demo.merged = demo.home / "demo" / "merged_unet"
    with LocalResolver(home=demo.home) as resolve:  # the merge engine reads paths; the registry resolves names
        summary = merge_to_folder(recipe, demo.merged, progress=False, resolve=resolve)
        derivation = Derivation.from_merged_file(demo.merged, resolve=resolve)  # + the components each term changed
    with Registry(home=demo.home) as reg:
        version = reg.register_output(demo.merged, name="toy/video-lcm", kind="base", derivation=derivation,
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
        console.print(lineage_tree(reg.lineage("toy/video-lcm")))


def _write(clip, name: str, demo: Demo) -> dict[str, Path]:
    """The clip as MP4 (its own pixels), and as a GIF and a PNG strip of every frame for people (upscaled)."""
    from weightlab.video import frame_strip, write_video

    out = demo.home / "demo"
    big = clip.frames.repeat(SCALE, axis=1).repeat(SCALE, axis=2)
    paths = {"mp4": write_video(clip.frames, out / f"{name}.mp4"), "gif": write_video(big, out / f"{name}.gif"),
             "png": out / f"{name}_strip.png"}
    frame_strip(clip.frames, scale=SCALE // 2).save(paths["png"])
    return paths


def _sample(demo: Demo, name: str, noise=None):
    """:data:`PROMPT`, 16 frames, 4 LCM steps, no CFG, seed 0, from the merged folder with the PyTorch pipeline (built
    once; its recipe names the base pipeline, whose text encoder and VAE it uses, by registry reference): the clip
    written as ``name``, and what the toy classifier reads in it."""
    from weightlab.registry.resolve import LocalResolver
    from weightlab.toy.evaluate import Evaluator
    from weightlab.video import VideoPipeline

    if demo.pipe is None:
        with LocalResolver(home=demo.home) as resolve:
            demo.pipe = VideoPipeline.from_source(demo.merged, resolve=resolve)
    clip = demo.pipe(PROMPT, frames=16, steps=4, guidance=1.0, seed=0, progress=False, noise=noise)
    paths = _write(clip, name, demo)
    for kind, path in paths.items():
        console.print(f"  {kind:<4} {path}")
    read = Evaluator.load(demo.family.evaluator).describe(clip.frames)
    console.print(f"the toy classifier reads: {read}")
    return clip, paths, read


def sample_pytorch(demo: Demo) -> None:
    """16 frames of :data:`PROMPT` with i.i.d. noise (:func:`_sample`)."""
    clip, paths, demo.results["read"] = _sample(demo, "clip_torch")
    demo.results["torch"] = (clip, paths)
    console.print(f"{PROMPT!r}: {clip.frames.shape[0]} frames {clip.frames.shape[1:3]}, "
                  f"denoise {clip.seconds['denoise']:.2f} s")


def sample_moving_noise(demo: Demo) -> None:
    """The same prompt and seed with moving noise: 90% of each frame's noise shared, and moved the way a toy clip
    with the prompt's direction moves (``weightlab generate --shared-noise 0.9 --noise-motion DX,DY``). The toy motion
    module does not follow the prompt's direction (README); the noise can carry it instead."""
    from weightlab.noise_prior import NoisePrior
    from weightlab.toy.data import noise_motion

    prior = NoisePrior(shared=0.9, motion=noise_motion(PROMPT))
    console.print(f"--shared-noise {prior.shared} --noise-motion {prior.motion[0]},{prior.motion[1]}")
    clip, paths, demo.results["read_moving"] = _sample(demo, "clip_moving_noise", prior)
    demo.results["moving"] = (clip, paths)


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
    ref, ref_paths = demo.results["torch"]
    table = Table(title="toy video LCM: PyTorch vs ONNX Runtime (16 frames, 4 steps, guidance 1.0)")
    table.add_column("what")
    table.add_column("value")
    table.add_row("merge (Eq. 2, streamed)", f"{demo.results['merge']:.2f} s")
    table.add_row("denoise, PyTorch eager", f"{ref.seconds['denoise']:.3f} s")
    table.add_row("export to ONNX (+ verification)", f"{demo.results['export']:.2f} s")
    table.add_row(f"denoise, ONNX Runtime ({pipe.provider})", f"{clip.seconds['denoise']:.3f} s")
    table.add_row("max |difference| of the clips (0..1)", f"{float(np.abs(ref.video - clip.video).max()):.2e}")
    table.add_row("merged UNet", str(demo.merged))
    table.add_row("ONNX export", str(demo.onnx_dir))
    table.add_row("clips", f"{ref_paths['mp4']}\n{path['mp4']}")
    table.add_row("GIF and frame strip", f"{ref_paths['gif']}\n{ref_paths['png']}")
    table.add_row("the toy classifier reads", demo.results["read"])
    table.add_row("with moving noise", f"{demo.results['read_moving']}\n{demo.results['moving'][1]['png']}")
    console.print(table)


STEPS = [
    ("The trained toy family", load_family),
    ("Inspect every file", inspect_files),
    ("Register the residuals", register_family),
    ("Merge by registry names (Eq. 2)", merge_by_name),
    ("Lineage of the merge", show_lineage),
    ("Sample 16 frames with PyTorch", sample_pytorch),
    ("The same clip with moving noise", sample_moving_noise),
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
