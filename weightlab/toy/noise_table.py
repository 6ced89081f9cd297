"""What the noise prior does to the shipped toy family's clips: i.i.d. vs shared vs moving noise, scored by the toy
evaluator on held-out prompts.

    python -m weightlab.toy.noise_table              # 64 prompts x 4 rows, about 4 min on 2 CPU cores

Every row samples the same prompts and seeds with Eq. 2 minus the style (teacher + LCM-LoRA + motion LCM, Table 1's
"LCM (ours)"), 4 LCM steps, no CFG; only the noise differs (:class:`weightlab.noise_prior.NoisePrior`):

- ``i.i.d.``: the default, what the motion module was trained with;
- ``shared``: ρ of each frame's noise common to all frames;
- ``shared + moving``: the common part moves as a real clip with the prompt's direction does
  (:func:`weightlab.toy.data.noise_motion`);
- ``shared + moving, motion off``: the same with the motion module's output zeroed (the image model frame by frame).

Columns: toy FVD against real held-out clips (lower is better) and prompt accuracy (shape / colour / direction).
"""

from __future__ import annotations

import argparse
import sys

ROWS = ("i.i.d.", "shared", "shared + moving", "shared + moving, motion off")


def noise_table(*, clips: int = 64, shared: float = 0.9, steps: int = 4) -> dict[str, dict[str, float]]:
    """``{row: {"fvd", "shape", "colour", "direction", "all"}}`` for :data:`ROWS` over ``clips`` held-out prompts."""
    import numpy as np

    from weightlab.noise_prior import NoisePrior
    from weightlab.toy.data import HELD_OUT, noise_motion, toy_set
    from weightlab.toy.evaluate import Evaluator
    from weightlab.toy.family import toy_family
    from weightlab.toy.motion_probe import motion_off
    from weightlab.video import VideoPipeline

    family = toy_family()
    evaluator = Evaluator.load(family.evaluator)
    real = toy_set(clips, start=HELD_OUT)
    pipe = VideoPipeline.from_source(family.recipe(style=0))
    off = VideoPipeline.from_source(family.recipe(style=0))
    motion_off(off.pipe.unet)

    def moving(caption: str) -> NoisePrior:
        return NoisePrior(shared, noise_motion(caption))

    priors = {"i.i.d.": lambda c: None, "shared": lambda c: NoisePrior(shared), "shared + moving": moving,
              "shared + moving, motion off": moving}
    out = {}
    for row in ROWS:
        model = off if "motion off" in row else pipe
        samples = [model(c, frames=real.frames.shape[1], steps=steps, seed=i, progress=False,
                         noise=priors[row](c)).frames for i, c in enumerate(real.captions)]
        samples = np.stack(samples)
        out[row] = {"fvd": evaluator.fvd(real.frames, samples), **evaluator.prompt_accuracy(samples, real.captions)}
    return out


def markdown(table: dict[str, dict[str, float]]) -> str:
    """The table in Markdown, one row per noise."""
    lines = ["| noise | toy FVD | shape / colour / direction |", "|---|---|---|"]
    lines += [f"| {row} | {r['fvd']:.2f} | {r['shape']:.2f} / {r['colour']:.2f} / {r['direction']:.2f} |"
              for row, r in table.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m weightlab.toy.noise_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=64, help="held-out prompts (default 64; balanced in multiples of 32)")
    p.add_argument("--shared", type=float, default=0.9, help="ρ, the shared share of the noise (default 0.9)")
    a = p.parse_args(argv)
    print(markdown(noise_table(clips=a.clips, shared=a.shared)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
