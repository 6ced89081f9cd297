"""Reproduce AnimateLCM's experiments at toy scale, from seeds, with weightlab's own trainers.

    python -m weightlab.toy.reproduce --out runs/toy            # the full run (planned ≤ 90 min on 2 CPU cores)
    python -m weightlab.toy.reproduce --quick --out /tmp/toy    # smaller models, fewer steps (≈ 3 min)
    python -m weightlab.toy.reproduce --out runs/toy --stop-after teacher   # the first stages only
    python -m weightlab.toy.reproduce --plan --out /tmp/toy-plan  # time every stage briefly, project the full run

Stages (each skipped when its output exists, so an interrupted run continues; the trainers resume from their
checkpoints): the toy base (a VAE fitted to the toy frames, :mod:`weightlab.toy.base`), image folders, the
evaluator (:mod:`weightlab.toy.evaluate`), then ``weightlab.train``'s ``teacher`` (a UNet from scratch),
``motion-module`` (the AnimateDiff stage), ``image-lcm``, ``motion-lcm`` decoupled and coupled (at equal compute),
and ``style-lora`` (outlined shapes, a style the base never saw). Then:

- Table 1: toy FVD and prompt accuracy at 1/2/4/8 steps of DDIM + CFG and DPM-Solver++ + CFG (the teacher) and LCM
  without CFG (base + image LCM-LoRA + distilled motion module), plus the teacher under the LCM sampler (the
  untrained student);
- the decoupling ablation: the coupled model (spatial LoRA and motion module distilled together on video) at the
  same steps;
- Eq. 2: base + style + LCM-LoRA + motion module merged, 4 steps without CFG, vs the styled teacher at 50 DDIM steps
  with CFG, against real outlined clips;
- ``fd_vs_steps.png``, ``frames_grid.png``, ``results.json`` and ``results.md`` in ``--out``.

Every generated clip of a table uses the prompts of a held-out real set (balanced over shape × colour ×
direction) with seeds ``0..n−1``, the same for every method: differences are the models', not the noise's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightlab.errors import WeightlabError
from weightlab.toy.family import SHIPPED, ship

log = logging.getLogger("weightlab.toy.reproduce")
STAGES = ("base", "data", "evaluator", "teacher", "motion_module", "image_lcm", "motion_lcm", "coupled", "style",
          "evaluate")


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the run's cost. Steps are optimizer steps; ``*_batch`` samples per step."""

    vae_steps: int
    evaluator_steps: int
    evaluator_samples: int
    images: int  # captioned frames in the teacher's / image-lcm's and the style LoRA's image folders
    videos: int  # synthetic clips for the video stages
    frames: int
    teacher_steps: int
    teacher_batch: int
    teacher_unet: dict
    motion_steps: int
    motion_batch: int
    image_lcm_steps: int
    image_lcm_batch: int
    motion_lcm_steps: int
    motion_lcm_batch: int
    lora_rank: int
    style_steps: int
    style_batch: int
    eval_samples: int  # clips per Table 1 cell (a multiple of 32: balanced prompts)
    eq2_samples: int
    steps: tuple[int, ...] = (1, 2, 4, 8)
    eq2_teacher_steps: int = 50
    guidance: float = 7.5  # CFG of the DDIM / DPM-Solver++ baselines (the paper's)


# Sized from step times measured on this 2-core machine (see README "Reproducing AnimateLCM at toy scale").
FULL = Sizes(vae_steps=1500, evaluator_steps=800, evaluator_samples=1024, images=4096, videos=1024, frames=16,
             teacher_steps=3500, teacher_batch=32, teacher_unet={}, motion_steps=800, motion_batch=2,
             image_lcm_steps=800, image_lcm_batch=16, motion_lcm_steps=400, motion_lcm_batch=1, lora_rank=16,
             style_steps=300, style_batch=16, eval_samples=64, eq2_samples=32)
QUICK = Sizes(vae_steps=250, evaluator_steps=300, evaluator_samples=256, images=512, videos=128, frames=8,
              teacher_steps=200, teacher_batch=16, teacher_unet={"block_out_channels": (32, 32, 32)},
              motion_steps=50, motion_batch=2, image_lcm_steps=40, image_lcm_batch=8, motion_lcm_steps=30,
              motion_lcm_batch=1, lora_rank=8, style_steps=40, style_batch=8, eval_samples=32, eq2_samples=8,
              steps=(4,), eq2_teacher_steps=8)
STYLE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")  # a tiny UNet restyles through its convs too


@dataclass(frozen=True)
class Paths:
    """Where each stage writes, under ``--out``."""

    out: Path
    base: Path
    images: Path
    style_images: Path
    evaluator: Path
    teacher: Path
    motion_module: Path
    image_lcm: Path
    motion_lcm: Path
    coupled: Path
    style: Path

    @classmethod
    def under(cls, out: Path) -> "Paths":
        runs = ("teacher", "motion_module", "image_lcm", "motion_lcm", "coupled", "style")
        return cls(out=out, base=out / "base", images=out / "data" / "images",
                   style_images=out / "data" / "style_images", evaluator=out / "evaluator.safetensors",
                   **{r: out / "runs" / r for r in runs})


def _common(sizes: Sizes, seed: int, output_dir: Path, steps: int, batch: int) -> dict:
    """Config fields every trainer run shares: no validation samples, one checkpoint at the end."""
    return dict(output_dir=output_dir, seed=seed, max_steps=steps, batch_size=batch, checkpoint_every=steps,
                checkpoints_keep=1, validation_prompts=())


def _trained(stage: str, result, t0: float, timings: dict) -> list[Path]:
    timings[stage] = {"seconds": time.perf_counter() - t0, "steps": result.step,
                      "steps_per_second": result.steps_per_second}
    log.info("%s: %d steps, %.2f steps/s, %.0f s", stage, result.step, result.steps_per_second,
             timings[stage]["seconds"])
    return result.outputs


def train_models(paths: Paths, sizes: Sizes, seed: int, stop_after: str | None, timings: dict) -> dict[str, Path]:
    """Every training stage in order; returns the artifacts the evaluation merges (stops early at ``stop_after``)."""
    from weightlab.toy.base import build_toy_base
    from weightlab.toy.data import write_image_folder
    from weightlab.train import (DataConfig, ImageLCMConfig, MotionLCMConfig, MotionModuleConfig, StyleLoRAConfig,
                                 TeacherConfig, train_image_lcm, train_motion_lcm, train_motion_module,
                                 train_style_lora, train_teacher)

    art: dict[str, Path] = {}
    images = DataConfig(format="image_folder", path=paths.images, resolution=32)
    videos = DataConfig(format="synthetic_videos", resolution=32, num_frames=sizes.frames,
                        synthetic_samples=sizes.videos)

    def stage(name: str, done: Path, run) -> bool:
        """Run ``run`` unless ``done`` exists; False once ``stop_after`` has been reached."""
        if not done.exists():
            t0 = time.perf_counter()
            run(t0)
            timings.setdefault(name, {"seconds": time.perf_counter() - t0})
        return name != stop_after

    if not stage("base", paths.base / "toy_base.json",
                 lambda t0: build_toy_base(paths.base, seed=seed, vae_steps=sizes.vae_steps)):
        return art
    if not stage("data", paths.style_images / "metadata.jsonl", lambda t0: (
            write_image_folder(paths.images, sizes.images, style="filled", num_frames=sizes.frames),
            write_image_folder(paths.style_images, sizes.images, style="outlined", num_frames=sizes.frames))):
        return art
    if not stage("evaluator", paths.evaluator, lambda t0: _train_evaluator(paths, sizes, seed)):
        return art

    art["teacher"] = paths.teacher / "pipeline"
    if not stage("teacher", art["teacher"], lambda t0: _trained("teacher", train_teacher(TeacherConfig(
            base=paths.base, data=images, unet_config=sizes.teacher_unet, lr_scheduler="cosine",
            lr_warmup_steps=sizes.teacher_steps // 20,
            **_common(sizes, seed, paths.teacher, sizes.teacher_steps, sizes.teacher_batch))), t0, timings)):
        return art
    art["motion"] = paths.motion_module / "motion_module"
    if not stage("motion_module", art["motion"], lambda t0: _trained("motion_module", train_motion_module(
            MotionModuleConfig(base=art["teacher"], data=videos, learning_rate=5e-4, lr_scheduler="cosine",
                               **_common(sizes, seed, paths.motion_module, sizes.motion_steps, sizes.motion_batch))),
            t0, timings)):
        return art
    art["lcm_lora"] = paths.image_lcm / "lcm_lora.safetensors"
    if not stage("image_lcm", art["lcm_lora"], lambda t0: _trained("image_lcm", train_image_lcm(ImageLCMConfig(
            base=art["teacher"], data=images, rank=sizes.lora_rank, learning_rate=5e-4,
            **_common(sizes, seed, paths.image_lcm, sizes.image_lcm_steps, sizes.image_lcm_batch))), t0, timings)):
        return art
    distill = dict(base=art["teacher"], teacher_motion=art["motion"], data=videos, learning_rate=5e-4)
    art["lcm_motion"] = paths.motion_lcm / "motion_module"
    if not stage("motion_lcm", art["lcm_motion"], lambda t0: _trained("motion_lcm", train_motion_lcm(MotionLCMConfig(
            image_lora=art["lcm_lora"],
            **distill, **_common(sizes, seed, paths.motion_lcm, sizes.motion_lcm_steps, sizes.motion_lcm_batch))),
            t0, timings)):
        return art
    coupled_steps = equal_compute_steps(sizes)
    art["coupled_motion"], art["coupled_lora"] = paths.coupled / "motion_module", paths.coupled / "lcm_lora.safetensors"
    if not stage("coupled", art["coupled_lora"], lambda t0: _trained("coupled", train_motion_lcm(MotionLCMConfig(
            coupled=True, rank=sizes.lora_rank,
            **distill, **_common(sizes, seed, paths.coupled, coupled_steps, sizes.motion_lcm_batch))), t0, timings)):
        return art
    art["style_lora"] = paths.style / "style_lora.safetensors"
    stage("style", art["style_lora"], lambda t0: _trained("style", train_style_lora(StyleLoRAConfig(
        base=art["teacher"], data=images.model_copy(update={"path": paths.style_images}), rank=sizes.lora_rank,
        target_modules=STYLE_TARGETS, learning_rate=1e-3,
        **_common(sizes, seed, paths.style, sizes.style_steps, sizes.style_batch))), t0, timings))
    return art


def equal_compute_steps(sizes: Sizes) -> int:
    """Steps of the coupled run that pass as many frames through the UNets as image-lcm + motion-lcm together.

    Per step each distillation runs the teacher (with CFG), the online and the target network over its batch, so
    the cost per frame is about the same in both stages; the motion modules' temporal layers are not counted.
    """
    frames_decoupled = (sizes.image_lcm_steps * sizes.image_lcm_batch
                        + sizes.motion_lcm_steps * sizes.motion_lcm_batch * sizes.frames)
    return math.ceil(frames_decoupled / (sizes.motion_lcm_batch * sizes.frames))


def _train_evaluator(paths: Paths, sizes: Sizes, seed: int) -> None:
    from weightlab.toy.evaluate import Evaluator

    Evaluator.train(seed=seed, samples=sizes.evaluator_samples, steps=sizes.evaluator_steps,
                    num_frames=sizes.frames).save(paths.evaluator)


# ---------------------------------------------------------------------------------------------------------- evaluation

def sample_clips(pipe, prompts: list[str], *, sampler: str, steps: int, guidance: float, frames: int) -> np.ndarray:
    """One clip per prompt through :class:`weightlab.video.VideoPipeline`, seed ``i`` for prompt ``i``: uint8
    ``[N, F, H, W, 3]``."""
    return np.stack([pipe(p, frames=frames, steps=steps, guidance=guidance, seed=i, progress=False,
                          sampler=sampler).frames for i, p in enumerate(prompts)])


def _pipe(base: Path, *terms: tuple[Path, str, float]):
    from weightlab.recipe import Recipe, Term
    from weightlab.video import VideoPipeline

    recipe = Recipe(base=str(base), terms=[Term(source=str(s), kind=k, scale=a) for s, k, a in terms])
    return VideoPipeline.from_source(recipe)


def _score(evaluator, clips: np.ndarray, real: np.ndarray, prompts: list[str], style: str | None = None) -> dict:
    return {"fvd": evaluator.fvd(real, clips), **evaluator.prompt_accuracy(clips, prompts, style=style)}


def evaluate(paths: Paths, art: dict[str, Path], sizes: Sizes, timings: dict) -> dict:
    """Table 1, the decoupling ablation and the Eq. 2 comparison; the samples the grid shows are kept too."""
    from weightlab.toy.data import HELD_OUT, toy_set
    from weightlab.toy.evaluate import Evaluator

    t0 = time.perf_counter()
    ev = Evaluator.load(paths.evaluator)
    n, f = sizes.eval_samples, sizes.frames
    real = toy_set(n, start=HELD_OUT, num_frames=f)
    real2 = toy_set(n, start=HELD_OUT + 500_000, num_frames=f)
    prompts = real.captions
    teacher = _pipe(art["teacher"], (art["motion"], "motion", 1.0))
    lcm = _pipe(art["teacher"], (art["lcm_lora"], "image_accel", 1.0), (art["lcm_motion"], "motion", 1.0))
    coupled = _pipe(art["teacher"], (art["coupled_lora"], "image_accel", 1.0), (art["coupled_motion"], "motion", 1.0))
    methods = {  # name -> (pipeline, sampler, guidance)
        "DDIM + CFG": (teacher, "ddim", sizes.guidance),
        "DPM-Solver++ + CFG": (teacher, "dpmpp", sizes.guidance),
        "LCM (ours, decoupled)": (lcm, "lcm", 1.0),
        "LCM, coupled (ablation)": (coupled, "lcm", 1.0),
        "teacher + LCM sampler (untrained student)": (teacher, "lcm", 1.0),
    }
    table, samples = {}, {}
    for name, (pipe, sampler, guidance) in methods.items():
        for steps in sizes.steps:
            clips = sample_clips(pipe, prompts, sampler=sampler, steps=steps, guidance=guidance, frames=f)
            table.setdefault(name, {})[steps] = _score(ev, clips, real.frames, prompts)
            samples[(name, steps)] = clips
            log.info("%s, %d steps: %s", name, steps, table[name][steps])
    floor = {"fvd": ev.fvd(real.frames, real2.frames), **ev.prompt_accuracy(real2.frames, real2.captions)}

    m = sizes.eq2_samples
    styled_real = toy_set(m, start=HELD_OUT, num_frames=f, style="outlined")
    styled_real2 = toy_set(m, start=HELD_OUT + 500_000, num_frames=f, style="outlined")
    eq2_prompts = styled_real.captions
    merged = _pipe(art["teacher"], (art["style_lora"], "style", 1.0), (art["lcm_lora"], "image_accel", 1.0),
                   (art["lcm_motion"], "motion", 1.0))
    styled_teacher = _pipe(art["teacher"], (art["style_lora"], "style", 1.0), (art["motion"], "motion", 1.0))
    eq2_runs = {
        "style + LCM + motion merged, 4 LCM steps": (merged, "lcm", 4, 1.0),
        f"styled teacher, {sizes.eq2_teacher_steps} DDIM steps + CFG": (styled_teacher, "ddim", sizes.eq2_teacher_steps,
                                                                         sizes.guidance),
        "unstyled LCM, 4 LCM steps (reference)": (lcm, "lcm", 4, 1.0),
    }
    eq2 = {}
    for name, (pipe, sampler, steps, guidance) in eq2_runs.items():
        clips = sample_clips(pipe, eq2_prompts, sampler=sampler, steps=steps, guidance=guidance, frames=f)
        eq2[name] = _score(ev, clips, styled_real.frames, eq2_prompts, style="outlined")
        samples[(name, steps)] = clips
        log.info("%s: %s", name, eq2[name])
    eq2_floor = {"fvd": ev.fvd(styled_real.frames, styled_real2.frames),
                 **ev.prompt_accuracy(styled_real2.frames, styled_real2.captions, style="outlined")}
    timings["evaluate"] = {"seconds": time.perf_counter() - t0}
    return {"table1": table, "floor": floor, "eq2": eq2, "eq2_floor": eq2_floor, "prompts": prompts,
            "eq2_prompts": eq2_prompts, "samples": samples, "real": real.frames, "styled_real": styled_real.frames}


# ---------------------------------------------------------------------------------------------------------------- plan

def _clip_seconds(pipe, *, sampler: str, guidance: float, frames: int) -> tuple[float, float]:
    """(seconds per clip besides the steps, seconds per step) of one sampler, from a 1-step and an 8-step clip."""
    times = []
    for steps in (1, 8):
        t0 = time.perf_counter()
        sample_clips(pipe, ["a red circle moving right"], sampler=sampler, steps=steps, guidance=guidance,
                     frames=frames)
        times.append(time.perf_counter() - t0)
    per_step = max(times[1] - times[0], 0.0) / 7
    return max(times[0] - per_step, 0.0), per_step


def plan(out: Path, seed: int, sizes: Sizes = FULL, *, steps: int = 10) -> dict:
    """Project the run's duration on this machine from short runs of every stage at its model and batch sizes.

    Trainers run ``steps`` steps (VAE and evaluator 5×): a stage's projection is its setup time plus ``sizes``' steps
    at the measured steps/s (base and evaluator: scaled linearly, setup included — an overestimate); the evaluation
    is its number of clips and sampler steps, each sampler timed on one clip of 1 and of 8 steps.
    """
    short = dataclasses.replace(sizes, vae_steps=5 * steps, evaluator_steps=5 * steps, teacher_steps=steps,
                                motion_steps=steps, image_lcm_steps=steps, motion_lcm_steps=steps, style_steps=steps)
    timings: dict = {}
    art = train_models(Paths.under(out), short, seed, None, timings)
    full_steps = {"base": (short.vae_steps, sizes.vae_steps),
                  "evaluator": (short.evaluator_steps, sizes.evaluator_steps),
                  "teacher": (steps, sizes.teacher_steps), "motion_module": (steps, sizes.motion_steps),
                  "image_lcm": (steps, sizes.image_lcm_steps), "motion_lcm": (steps, sizes.motion_lcm_steps),
                  "coupled": (equal_compute_steps(short), equal_compute_steps(sizes)),
                  "style": (steps, sizes.style_steps)}
    projected = {}
    for stage, t in timings.items():
        have, want = full_steps.get(stage, (1, 1))
        if t.get("steps_per_second"):
            projected[stage] = t["seconds"] - have / t["steps_per_second"] + want / t["steps_per_second"]
        else:
            projected[stage] = t["seconds"] * want / have
    teacher = _pipe(art["teacher"], (art["motion"], "motion", 1.0))
    cfg_clip, cfg_step = _clip_seconds(teacher, sampler="ddim", guidance=sizes.guidance, frames=sizes.frames)
    lcm_clip, lcm_step = _clip_seconds(teacher, sampler="lcm", guidance=1.0, frames=sizes.frames)
    n, m, all_steps = sizes.eval_samples, sizes.eq2_samples, sum(sizes.steps)
    projected["evaluate"] = (n * len(sizes.steps) * (2 * cfg_clip + 3 * lcm_clip)
                             + n * all_steps * (2 * cfg_step + 3 * lcm_step)
                             + m * (cfg_clip + 2 * lcm_clip) + m * (sizes.eq2_teacher_steps * cfg_step + 8 * lcm_step))
    return {"measured": timings, "projected_seconds": projected, "total_minutes": sum(projected.values()) / 60,
            "sampling": {"cfg_clip_s": cfg_clip, "cfg_step_s": cfg_step, "lcm_clip_s": lcm_clip,
                         "lcm_step_s": lcm_step}}


# ------------------------------------------------------------------------------------------------------------- reports

def plot_fd(results: dict, path: Path) -> Path:
    """FD vs steps per method (log-2 steps axis), with the real-vs-real′ floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for name, row in results["table1"].items():
        steps = sorted(row)
        ax.plot(steps, [row[s]["fvd"] for s in steps], marker="o", label=name)
    ax.axhline(results["floor"]["fvd"], color="grey", ls="--", label="real vs real′ (floor)")
    ax.set(xscale="log", xlabel="sampling steps", ylabel="toy FVD (lower is better)", title="Table 1 at toy scale")
    ticks = sorted(next(iter(results["table1"].values())))
    ax.set_xticks(ticks, labels=[str(s) for s in ticks])
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def frame_grid(results: dict, sizes: Sizes, path: Path, *, prompt_ids: tuple[int, ...] = (0, 13, 22, 27)) -> Path:
    """Rows of sampled frames (every other frame): per prompt, the real clip and each method at 4 steps (or the
    largest step count below it); then the Eq. 2 rows. Pixels are upscaled ×2, labels on the left."""
    from PIL import Image, ImageDraw

    from weightlab.video import frame_strip

    at = max(s for s in sizes.steps if s <= 4)
    rows: list[tuple[str, np.ndarray]] = []
    for i in (i for i in prompt_ids if i < len(results["prompts"])):
        rows.append((f"real: {results['prompts'][i]}", results["real"][i]))
        rows += [(f"{name}, {at} steps", results["samples"][(name, at)][i]) for name in results["table1"]]
    for i in (i for i in prompt_ids[:2] if i < len(results["eq2_prompts"])):
        rows.append((f"real outlined: {results['eq2_prompts'][i]}", results["styled_real"][i]))
        for name in results["eq2"]:
            key = next(k for k in results["samples"] if k[0] == name)
            rows.append((name, results["samples"][key][i]))
    label_w, scale = 330, 2
    h, w = rows[0][1].shape[1:3]
    cols = rows[0][1][::2].shape[0]
    grid = Image.new("RGB", (label_w + cols * w * scale, len(rows) * h * scale), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, clip) in enumerate(rows):
        grid.paste(frame_strip(clip, every=2, scale=scale), (label_w, r * h * scale))
        draw.text((4, r * h * scale + h * scale // 2 - 6), label[:55], fill="black")
    grid.save(path)
    return path


def _acc(cell: dict) -> str:
    return " / ".join(f"{cell[a]:.2f}" for a in ("shape", "colour", "direction") if a in cell)


def write_markdown(results: dict, sizes: Sizes, timings: dict, argv: list[str], path: Path) -> Path:
    """``results.md``: the command, the machine, the tables and what they say, the sizes and the stage timings."""
    steps = sizes.steps
    lines = ["# AnimateLCM at toy scale: results", "",
             f"Command: `python -m weightlab.toy.reproduce {' '.join(argv)}`  ",
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}; "
             f"total {sum(t['seconds'] for t in timings.values()) / 60:.1f} min of stages run in this call.", "",
             f"## Table 1 (video, {sizes.eval_samples} clips of {sizes.frames} frames per cell)", "",
             "Toy FVD (lower is better) and prompt accuracy shape / colour / direction. "
             f"Real vs real′ (two disjoint real sets of the same size): FVD {results['floor']['fvd']:.3f}, "
             f"accuracy {_acc(results['floor'])}.", "",
             "| method | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for name, row in results["table1"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[s]['fvd']:.2f} ({_acc(row[s])})" for s in steps) + " |")
    lines += ["", f"## Eq. 2: a merged style ({sizes.eq2_samples} clips, against real outlined clips)", "",
              f"Real vs real′ outlined: FVD {results['eq2_floor']['fvd']:.3f}.", "",
              "| model | toy FVD | outlined (style head) | shape / colour / direction |", "|---|---|---|---|"]
    for name, cell in results["eq2"].items():
        lines.append(f"| {name} | {cell['fvd']:.2f} | {cell['style']:.2f} | {_acc(cell)} |")
    lines += ["", "## Claims, as measured", ""] + [f"- {c}" for c in claims(results, sizes)]
    lines += ["", "## Sizes and stage times", "", "```", json.dumps(dataclasses.asdict(sizes)), "```", "",
              "| stage | seconds | steps | steps/s |", "|---|---|---|---|"]
    for stage, t in timings.items():
        rate = f"{t['steps_per_second']:.2f}" if "steps_per_second" in t else ""
        lines.append(f"| {stage} | {t['seconds']:.0f} | {t.get('steps', '')} | {rate} |")
    lines += ["", "Note on sample counts: Fréchet distances of estimated statistics are biased upwards by about "
              "tr(Σ₁+Σ₂)/n and vary like 1/√n; compare values only within a table (same n), against its real-vs-real′ "
              "floor. Plot: `fd_vs_steps.png`; frames: `frames_grid.png`.", ""]
    path.write_text("\n".join(lines))
    return path


def claims(results: dict, sizes: Sizes) -> list[str]:
    """The paper's claims checked against the numbers, stated either way (nothing here is tuned to pass)."""
    t, out = results["table1"], []
    lcm, coupled = t["LCM (ours, decoupled)"], t["LCM, coupled (ablation)"]
    for s in sizes.steps:
        if s <= 4:
            best = min(t["DDIM + CFG"][s]["fvd"], t["DPM-Solver++ + CFG"][s]["fvd"])
            out.append(f"{s} step{'s' * (s > 1)}: LCM FVD {lcm[s]['fvd']:.2f} vs best baseline with CFG {best:.2f} — "
                       f"LCM {'beats' if lcm[s]['fvd'] < best else 'does NOT beat'} DDIM/DPM-Solver++.")
    wins = sum(lcm[s]["fvd"] < coupled[s]["fvd"] for s in sizes.steps)
    out.append(f"Decoupled beats coupled at equal compute at {wins} of {len(sizes.steps)} step counts.")
    merged = next(v for k, v in results["eq2"].items() if k.startswith("style + LCM"))
    plain = results["eq2"]["unstyled LCM, 4 LCM steps (reference)"]
    stays = merged["style"] > plain["style"] + 0.25
    out.append(f"Merged style: {merged['style']:.0%} of the merged model's clips read as outlined (unstyled LCM: "
               f"{plain['style']:.0%}); the style {'stays' if stays else 'does NOT stay'} recognisable by that measure "
               "(more than 25 points above the unstyled model).")
    return out


def _jsonable(results: dict, sizes: Sizes, timings: dict) -> dict:
    keep = {k: v for k, v in results.items() if k in ("table1", "floor", "eq2", "eq2_floor", "prompts", "eq2_prompts")}
    keep["table1"] = {name: {str(s): cell for s, cell in row.items()} for name, row in keep["table1"].items()}
    return {**keep, "claims": claims(results, sizes), "sizes": dataclasses.asdict(sizes), "timings": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weightlab.toy.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for every artifact and the results.")
    parser.add_argument("--quick", action="store_true", help="Smaller models and fewer steps (≈ 3 min).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-after", choices=STAGES[:-1], help="Stop after this stage (to time the first stages).")
    parser.add_argument("--plan", action="store_true", help="Time short runs of every stage at the run's sizes and "
                        "project its duration (writes plan.json in --out; use a separate --out).")
    parser.add_argument("--ship", type=Path, nargs="?", const=SHIPPED, metavar="DIR",
                        help="After the run, copy the trained family to DIR (default: the package's "
                        "weightlab/toy/family, which `make demo` uses).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    paths = Paths.under(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = args.out / "run.json"
    want = {"seed": args.seed, "sizes": json.loads(json.dumps(dataclasses.asdict(sizes))), "plan": args.plan}
    if stamp.is_file() and json.loads(stamp.read_text()) != want:
        print(f"error: {args.out} holds a run with other sizes or seed ({stamp}). Fix: use a new --out, or the same "
              "--quick/--seed as that run.", file=sys.stderr)
        return 2
    stamp.write_text(json.dumps(want))
    timings: dict = {}
    try:
        if args.plan:
            projection = plan(args.out, args.seed, sizes)
            (args.out / "plan.json").write_text(json.dumps(projection, indent=1))
            print(json.dumps(projection, indent=1))
            return 0
        art = train_models(paths, sizes, args.seed, args.stop_after, timings)
        if args.stop_after:
            print(json.dumps(timings, indent=1))
            return 0
        results = evaluate(paths, art, sizes, timings)
    except WeightlabError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    plot_fd(results, args.out / "fd_vs_steps.png")
    frame_grid(results, sizes, args.out / "frames_grid.png")
    (args.out / "results.json").write_text(json.dumps(_jsonable(results, sizes, timings), indent=1))
    write_markdown(results, sizes, timings, sys.argv[1:] if argv is None else argv, args.out / "results.md")
    print((args.out / "results.md").read_text())
    if args.ship:
        command = "python -m weightlab.toy.reproduce " + " ".join(sys.argv[1:] if argv is None else argv)
        measured = {k: v for k, v in _jsonable(results, sizes, timings).items() if k in ("claims", "sizes")}
        family = ship(args.out, args.ship, info={"command": command, "seed": args.seed, **measured})
        print(f"shipped the trained toy family to {family.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
