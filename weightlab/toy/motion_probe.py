"""Does a motion module use time, and the prompt's direction? ε-MSE probes on held-out toy clips.

    python -m weightlab.toy.motion_probe --teacher weightlab/toy/family/teacher \\
        --motion runs/toy/runs/motion_module/motion_module

At each noise level ``t`` the teacher UNet with the motion module predicts the noise of real clips (same clips, noise
and seed for every column). Columns:

- ``own``: each clip with its own caption;
- ``motion off``: the module's output projections zeroed (the image model alone, frame by frame);
- ``shuffled``: the frames in a fixed random order (the noise follows its frame);
- ``reversed``: the frames backwards, i.e. a real clip moving the opposite way, under the original caption;
- ``other direction``: the caption's direction swapped for its opposite; ``no direction``: dropped.

A module that has learned motion has ``own`` < ``motion off`` and ``own`` < ``shuffled``; one that follows the
prompt's direction also has ``own`` < ``reversed`` and ``own`` < ``other direction``. With the motion branch off every
column but the two caption ones equals ``own`` (a per-frame model does not see frame order).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

COLUMNS = ("own", "motion off", "shuffled", "reversed", "other direction", "no direction")
TIMESTEPS = (999, 900, 800, 600, 300)


def _opposite(caption: str) -> str:
    from weightlab.train.data import DIRECTIONS

    swap = {a: b for a, da in DIRECTIONS.items() for b, db in DIRECTIONS.items() if db == (-da[0], -da[1])}
    return " ".join(swap.get(w, w) for w in caption.split())


@torch.no_grad()
def motion_off(unet):
    """``unet`` (a UNetMotionModel) with its motion modules' output projections zeroed, in place: the image model
    frame by frame (a fresh module's starting point)."""
    for name, p in unet.named_parameters():
        if ".motion_modules." in name and ".proj_out." in name:
            p.zero_()
    return unet


@torch.no_grad()
def probe(teacher: str | Path, motion: str | Path, *, clips: int = 16, frames: int = 16,
          timesteps: tuple[int, ...] = TIMESTEPS, seed: int = 0) -> dict[int, dict[str, float]]:
    """ε-MSE per ``t`` and column (see the module's docstring) of ``teacher`` + ``motion`` on ``clips`` held-out clips.

    Args:
        teacher (str | Path): a diffusers Stable Diffusion pipeline folder (the image teacher).
        motion (str | Path): a motion module (MotionAdapter folder or AnimateDiff file) fitting it.
        clips (int, default 16): held-out toy clips (balanced over prompts in multiples of 32). frames (int, default 16).
        timesteps (tuple[int, ...]): noise levels. seed (int, default 0): noise and shuffle order.
    Returns:
        dict[int, dict[str, float]]: ``{t: {column: mse}}``.
    """
    from weightlab.toy.data import HELD_OUT, toy_set
    from weightlab.train import common
    from weightlab.train.data import to_pixels

    models = common.load_base(SimpleNamespace(base=teacher, beta_schedule=None, beta_start=None, beta_end=None),
                              torch.device("cpu"), torch.float32)
    adapter = common.load_motion_adapter(motion)
    unet = common.motion_unet(models.unet, adapter, base=teacher).eval()
    off = motion_off(copy.deepcopy(unet))

    real = toy_set(clips, start=HELD_OUT, num_frames=frames)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(clips)]
    latents = common.encode_latents(models.vae, to_pixels(real.frames), gens)

    def embeds(captions: list[str]) -> torch.Tensor:
        return common.encode_prompts(models, captions, "cpu").repeat_interleave(frames, dim=0)

    own = embeds(real.captions)
    text = {"other direction": embeds([_opposite(c) for c in real.captions]),
            "no direction": embeds([c.split(" moving ")[0] for c in real.captions])}
    order = {"shuffled": torch.randperm(frames, generator=torch.Generator().manual_seed(seed)),
             "reversed": torch.arange(frames - 1, -1, -1)}
    out = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + t))
        a = models.alphas_cumprod[t]
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        steps = torch.full((clips,), t)

        def mse(model, x, e, n) -> float:
            return (model(x, steps, e).sample - n).pow(2).mean().item()

        row = {"own": mse(unet, x_t, own, noise), "motion off": mse(off, x_t, own, noise)}
        row.update({k: mse(unet, x_t[:, :, o], own, noise[:, :, o]) for k, o in order.items()})
        row.update({k: mse(unet, x_t, e, noise) for k, e in text.items()})
        out[t] = {c: row[c] for c in COLUMNS}
    return out


def markdown(result: dict[int, dict[str, float]]) -> str:
    """The probe as a Markdown table, one row per ``t``."""
    lines = ["| t | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(f"{row[c]:.5f}" for c in COLUMNS) + " |" for t, row in result.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m weightlab.toy.motion_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, type=Path, help="the image teacher's pipeline folder")
    p.add_argument("--motion", required=True, type=Path, help="the motion module to probe (folder or file)")
    p.add_argument("--clips", type=int, default=16, help="held-out clips (default 16)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(markdown(probe(a.teacher, a.motion, clips=a.clips, frames=a.frames, seed=a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
