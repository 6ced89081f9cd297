"""``image-lcm``: latent consistency distillation of the base into a spatial LoRA, τ_image_accel (an LCM-LoRA).

    weightlab train image-lcm --config lcm.yaml
    accelerate launch --num_processes 8 -m weightlab.train image-lcm --config lcm.yaml

Per sample (LCM Algorithm 1 with the LCM-LoRA choices of diffusers' ``train_lcm_distill_lora_sd_wds.py``):
n ~ U{0..N−1}, ``t = t_n``, ``s = max(t − k, 0)``, ``x_t = α_t·z + σ_t·ε``, w ~ U[w_min, w_max]; the frozen
teacher gives CFG-augmented ``(x̂_0, ε̂) = cond + w·(cond − uncond)``, one DDIM step gives ``x̂_s``; the loss is the
pseudo-Huber distance between the student's ``f(x_t, t)`` and the target's ``f(x̂_s, s)``, where the target is the
online student itself under ``no_grad`` (no EMA copy for the LoRA variant). The noise schedule is the video
sampler's (AnimateLCM's linear β) unless configured, not the base's. Output: ``lcm_lora.safetensors`` (diffusers/PEFT
keys, kind ``image_accel``; the schedule, solver, N, k and σ_d in its metadata).
"""

from __future__ import annotations

import copy

import torch

from weightlab.files import save_tensors
from weightlab.train import common
from weightlab.train.config import ImageLCMConfig
from weightlab.train.consistency import DDIMSolver, distillation_loss

NAME = "image-lcm"
OUTPUT = "lcm_lora.safetensors"


def build_teacher(models: common.BaseModels, dtype: torch.dtype):
    """A frozen copy of the base UNet (cast to the mixed-precision dtype)."""
    return copy.deepcopy(models.unet).to(dtype=dtype).requires_grad_(False).eval()


def lcm_loss(cfg: ImageLCMConfig, accelerator, unet, teacher, models: common.BaseModels, solver: DDIMSolver,
             uncond: torch.Tensor, batch: dict) -> torch.Tensor:
    """The consistency distillation loss of one micro-batch (all draws per sample, from the sample's seed)."""
    device = accelerator.device
    gens = common.generators(batch["seed"])
    captions = common.drop_captions(batch["caption"], gens, cfg.empty_caption_prob)
    latents = common.encode_latents(models.vae, batch["pixels"], gens)
    index = common.draw(gens, lambda g: torch.randint(0, len(solver.timesteps), (), generator=g)).to(device)
    noise = common.draw(gens, lambda g: torch.randn(latents.shape[1:], generator=g)).to(device)
    w = common.draw(gens, lambda g: cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand((), generator=g)).to(device)
    embeds = common.encode_prompts(models, captions, device)
    pair = torch.cat([embeds, uncond.expand_as(embeds)])
    online_raw = accelerator.unwrap_model(unet)
    with accelerator.autocast():
        return distillation_loss(
            online=lambda x, t: unet(x, t, embeds).sample,
            target=lambda x, t: online_raw(x, t, embeds).sample,  # LCM-LoRA: the target is the online net, no_grad
            teacher=lambda x, t: teacher(torch.cat([x, x]), torch.cat([t, t]), pair).sample.float().chunk(2),
            latents=latents, noise=noise, index=index, w=w, solver=solver, alphas_cumprod=models.alphas_cumprod,
            prediction_type=models.prediction_type, sigma_data=cfg.sigma_data,
            timestep_scaling=cfg.timestep_scaling, loss=cfg.loss, huber_c=cfg.huber_c)


def train(cfg: ImageLCMConfig, *, stop_after: int | None = None) -> common.TrainResult:
    """Run (or resume) LCM-LoRA distillation of ``cfg.base``.

    Args:
        cfg (ImageLCMConfig): the run.
        stop_after (int | None, default None): stop after this many total steps with a checkpoint and no output.
    Returns:
        TrainResult: output paths, final step, per-step losses and gradient norms.
    """
    acc = common.build_accelerator(cfg, NAME)
    models = common.load_base(cfg, acc.device, common.weight_dtype(acc))
    teacher = build_teacher(models, common.weight_dtype(acc))
    unet = common.build_lora_student(cfg, models)
    solver = DDIMSolver.from_schedule(models.alphas_cumprod.cpu(), cfg.num_ddim_timesteps)
    uncond = common.encode_prompts(models, [""], acc.device)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer, lr_scheduler = common.build_optimizer(cfg, params)
    unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    # validation: 4 LCM steps without CFG (``weightlab generate``'s scheduler settings)
    run = common.Run(acc, cfg, NAME, kind="image_accel", validate=lambda step: common.validation_images(
        cfg, acc, unet, models, step, sampler="lcm", steps=4, guidance=1.0))
    start = run.resume()
    batches = common.batches(cfg, acc, start, video=False)
    last = min(cfg.max_steps, stop_after or cfg.max_steps)

    while run.state.step < last:
        loss, grad_norm = common.accumulated_step(cfg, acc, unet, params, optimizer, lambda: lcm_loss(
            cfg, acc, unet, teacher, models, solver, uncond, next(batches)))
        lr_scheduler.step()
        run.end_step(loss, grad_norm, lr_scheduler.get_last_lr()[0])

    def save():
        tensors = common.lora_tensors(acc.unwrap_model(unet), rank=cfg.rank, alpha=cfg.lora_alpha)
        meta = common.output_metadata(cfg, models, trainer=NAME, kind="image_accel", representation="lora")
        return [save_tensors(tensors, cfg.output_dir / OUTPUT, meta)]

    return run.finish(save)
