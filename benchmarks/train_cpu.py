"""Training throughput on CPU: steps/s of each trainer on the tiny family, and image-lcm against a bare loop.

    .venv/bin/python -P benchmarks/train_cpu.py                 # print the table
    flock -x /tmp/weightlab_cpu.lock .venv/bin/python -P benchmarks/train_cpu.py --write   # and replace its section
                                                                 # of benchmarks/RESULTS.md

Each trainer runs ``--warmup`` steps, stops with a checkpoint, then resumes for ``--steps`` timed steps (so lazy
initialisation, data-loader start and the first step are not timed). The bare loop is the same image-lcm math
(:func:`weightlab.train.consistency.distillation_loss`, same models, batch and LoRA) without accelerate, per-sample
generators, logging or checkpoints, with the same ``--warmup`` untimed steps: the ratio is the cost of the trainer's
bookkeeping. It is the only ratio here: **no external baseline runs** (see the note the script writes). Numbers
are timings on a shared machine: compare the ratios, not the absolute values, across runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import torch  # noqa: E402

from weightlab.testing import build_tiny_family  # noqa: E402
from weightlab.train import (DataConfig, ImageLCMConfig, MotionLCMConfig, StyleLoRAConfig, train_image_lcm,  # noqa: E402
                             train_motion_lcm, train_style_lora)

SECTION = "## Trainers on CPU (`benchmarks/train_cpu.py`)"


def timed(train, cfg, warmup: int) -> float:
    train(cfg, stop_after=warmup)
    return train(cfg).steps_per_second


def bare_image_lcm(base: Path, *, steps: int, warmup: int, batch: int, rank: int, resolution: int) -> float:
    """The image-lcm step with nothing around it: global RNG, no accelerate, no per-sample generators."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from weightlab.train.config import LCM_LORA_TARGETS
    from weightlab.train.consistency import DDIMSolver, distillation_loss
    from weightlab.train.data import SyntheticShapes

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text = CLIPTextModel.from_pretrained(base / "text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(base / "vae").requires_grad_(False)
    student = UNet2DConditionModel.from_pretrained(base / "unet").requires_grad_(False)
    teacher = copy.deepcopy(student)
    student.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LCM_LORA_TARGETS)))
    abar = DDPMScheduler.from_pretrained(base / "scheduler").alphas_cumprod
    solver = DDIMSolver.from_schedule(abar, 50)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = SyntheticShapes(8, resolution)

    def embed(captions):
        with torch.no_grad():
            return text(tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]

    uncond = embed([""])
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()  # the first ``warmup`` steps are untimed, as the trainers' are
        items = [data.load((step * batch + i) % len(data), None) for i in range(batch)]
        with torch.no_grad():
            z = vae.encode(torch.stack([i["pixels"] for i in items])).latent_dist.sample() * vae.config.scaling_factor
        emb = embed([i["caption"] for i in items])
        pair = torch.cat([emb, uncond.expand_as(emb)])
        loss = distillation_loss(
            online=lambda x, t: student(x, t, emb).sample, target=lambda x, t: student(x, t, emb).sample,
            teacher=lambda x, t: teacher(torch.cat([x, x]), torch.cat([t, t]), pair).sample.chunk(2),
            latents=z, noise=torch.randn_like(z), index=torch.randint(0, 50, (batch,)),
            w=5 + 10 * torch.rand(batch), solver=solver, alphas_cumprod=abar)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per trainer")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (>= 5); the table shows medians")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription on shared cores)")
    ap.add_argument("--write", action="store_true", help=f"replace this benchmark's section of {H.RESULTS}")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    torch.set_num_threads(args.threads)
    total = args.warmup + args.steps

    rates: dict[str, list[float]] = {"style-lora": [], "image-lcm": [], "motion-lcm": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fam = build_tiny_family(tmp / "tiny")
        images = DataConfig(format="synthetic_images", resolution=16, synthetic_samples=8)
        videos = DataConfig(format="synthetic_videos", resolution=16, num_frames=8, synthetic_samples=8)
        shared = dict(base=fam.base_dir, max_steps=total, checkpoint_every=10**6, validation_prompts=())
        for r in range(args.repeats):  # interleaved, so load from other jobs hits every row alike
            run = tmp / f"run{r}"
            rates["style-lora"].append(timed(train_style_lora, StyleLoRAConfig(
                output_dir=run / "style", data=images, batch_size=2, **shared), args.warmup))
            rates["image-lcm"].append(timed(train_image_lcm, ImageLCMConfig(
                output_dir=run / "lcm", data=images, batch_size=2, **shared), args.warmup))
            rates["bare"].append(bare_image_lcm(fam.base_dir, steps=args.steps, warmup=args.warmup, batch=2, rank=64,
                                                resolution=16))
            rates["motion-lcm"].append(timed(train_motion_lcm, MotionLCMConfig(
                output_dir=run / "motion", data=videos, batch_size=1, image_lora=run / "lcm" / "lcm_lora.safetensors",
                teacher_motion=fam.motion_dir, **shared), args.warmup))
    rows = [("style-lora", "rank 16, batch 2, 16x16 px"), ("image-lcm", "rank 64, batch 2, 16x16 px"),
            ("motion-lcm", "batch 1, 8 frames, 16x16 px"), ("bare", "same math, no accelerate/bookkeeping")]
    per = H.ratios(rates["image-lcm"], rates["bare"])  # repeat i of each ran in the same interleaved pass
    ratio = f"{H.mr(per)}x"
    lines = [
        SECTION, "",
        f"Run {H.now()}. Machine: {H.machine()}; torch {torch.__version__}, {args.threads} torch thread(s) for every "
        f"row. Tiny family (SD1.5 block layout, 2.2 M-parameter UNet); per row and repeat {args.warmup} untimed "
        f"warm-up steps, then {args.steps} timed steps; {args.repeats} repeats, interleaved (every row once per "
        "repeat); median [min–max] over the repeats.", "",
        "| trainer | setting | steps/s |", "|---|---|---|",
        *[f"| {'bare image-lcm loop' if name == 'bare' else name} | {setting} | {H.mr(rates[name])} |"
          for name, setting in rows],
        f"| image-lcm trainer / bare loop | per-repeat ratio of steps/s | {ratio} |", "",
        f"image-lcm trainer / bare loop: {ratio} (median [min–max] of the {len(per)} per-repeat ratios; the same figure "
        "as the table's last row; < 1 means the trainer's bookkeeping costs time).", "",
        "**No external baseline runs here.** The only comparison is against the bare loop above, which is our own "
        "code: the same distillation step without the trainer around it. diffusers' "
        "`train_lcm_distill_lora_sd_wds.py` (the natural peer) could not be driven: it is an example script of the "
        "diffusers GitHub repository, not part of the installed wheel (no copy on this machine), it imports "
        "`webdataset` and `braceexpand` (not installed) and reads its data only as WebDataset tar shards; with no "
        "network the script cannot be fetched. No claim about speed relative to diffusers' trainer is made.", "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        H.write_section(text)


if __name__ == "__main__":
    main()
