"""``style-lora``: learn τ_style from images only — an ε-prediction LoRA fine-tune of the base (AnimateLCM stage 1).

    weightlab train style-lora --config style.yaml
    accelerate launch --num_processes 4 -m weightlab.train style-lora --config style.yaml

Loss: ``‖ε − ε̂(x_t, t, c)‖²`` per sample (``v`` for v-prediction bases), optionally weighted by
``min(SNR_t, γ) / SNR_t`` (min-SNR-γ, Hang et al. 2023), under the base's noise schedule unless configured. Output:
``style_lora.safetensors`` (diffusers/PEFT keys, kind ``style``; the schedule in its metadata).

Example:
    >>> from weightlab.train import StyleLoRAConfig, DataConfig, train_style_lora     # doctest: +SKIP
    >>> train_style_lora(StyleLoRAConfig(base="sd15/", output_dir="runs/style",
    ...                  data=DataConfig(format="image_folder", path="my_style/")))   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from weightlab.files import save_tensors
from weightlab.schedules import make_scheduler
from weightlab.train import common
from weightlab.train.config import StyleLoRAConfig
from weightlab.train.consistency import add_noise
from weightlab.train.data import build_dataset, build_loader

NAME = "style-lora"
OUTPUT = "style_lora.safetensors"


def build_student(cfg: StyleLoRAConfig, models: common.BaseModels):
    """The base UNet with a fresh trainable LoRA (seeded: every process starts from the same factors)."""
    torch.manual_seed(cfg.seed)
    unet = models.unet
    common.add_lora(unet, rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.target_modules)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train()


def style_loss(cfg: StyleLoRAConfig, accelerator, unet, models: common.BaseModels, batch: dict) -> torch.Tensor:
    """ε-MSE (or v-MSE) of one micro-batch, min-SNR-γ weighted when ``cfg.snr_gamma`` is set."""
    device = accelerator.device
    gens = common.generators(batch["seed"])
    captions = common.drop_captions(batch["caption"], gens, cfg.empty_caption_prob)
    latents = common.encode_latents(models.vae, batch["pixels"], gens)
    noise = common.draw(gens, lambda g: torch.randn(latents.shape[1:], generator=g)).to(device)
    t = common.draw(gens, lambda g: torch.randint(0, len(models.alphas_cumprod), (), generator=g)).to(device)
    x_t = add_noise(latents, noise, t, models.alphas_cumprod)
    with accelerator.autocast():
        pred = unet(x_t, t, common.encode_prompts(models, captions, device)).sample
    a = models.alphas_cumprod[t]
    if models.prediction_type == "v_prediction":
        bcast = (-1,) + (1,) * (latents.dim() - 1)
        target = a.sqrt().view(bcast) * noise - (1 - a).sqrt().view(bcast) * latents
    else:
        target = noise
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if cfg.snr_gamma is not None:
        snr = a / (1 - a)
        per_sample = per_sample * snr.clamp(max=cfg.snr_gamma) / (snr + (models.prediction_type == "v_prediction"))
    return per_sample.mean()


def validate(cfg: StyleLoRAConfig, accelerator, unet, models: common.BaseModels, step: int):
    """Sample the validation prompts with DDIM (``weightlab generate --sampler ddim``'s settings under the run's
    schedule) and classifier-free guidance; one GIF frame per prompt."""
    images = common.sample_images(accelerator, models, accelerator.unwrap_model(unet),
                                  make_scheduler("ddim", models.scheduler_config, models.schedule), cfg.validation_prompts,
                                  steps=cfg.validation_steps, guidance=cfg.validation_guidance,
                                  resolution=cfg.data.resolution, seed=cfg.seed)
    return common.write_gif(images, cfg.output_dir / "samples" / f"step-{step:08d}.gif", fps=1)


def train(cfg: StyleLoRAConfig, *, stop_after: int | None = None) -> common.TrainResult:
    """Run (or resume) a style LoRA fine-tune.

    Args:
        cfg (StyleLoRAConfig): the run.
        stop_after (int | None, default None): stop after this many total steps with a checkpoint and no output
            (a time-sliced job); the next call with ``cfg.resume`` continues exactly.
    Returns:
        TrainResult: output paths, final step, per-step losses and gradient norms.
    """
    acc = common.build_accelerator(cfg, NAME)
    models = common.load_base(cfg, acc.device, common.weight_dtype(acc))
    unet = build_student(cfg, models)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer, lr_scheduler = common.build_optimizer(cfg, params)
    unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    run = common.Run(acc, cfg, NAME)
    start = run.resume()
    batches = iter(build_loader(build_dataset(cfg.data, video=False), batch_size=cfg.batch_size,
                                world_size=acc.num_processes, rank=acc.process_index, seed=cfg.seed,
                                start_batch=start * cfg.gradient_accumulation_steps, num_workers=cfg.num_workers))
    last = min(cfg.max_steps, stop_after or cfg.max_steps)

    while run.state.step < last:
        micro_losses = []
        for _ in range(cfg.gradient_accumulation_steps):
            with acc.accumulate(unet):
                loss = style_loss(cfg, acc, unet, models, next(batches))
                acc.backward(loss)
                if acc.sync_gradients:  # the last micro-batch: gradients are all-reduced, clip them
                    grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(acc.gather(loss.detach()).mean().item())
        lr_scheduler.step()
        run.end_step(sum(micro_losses) / len(micro_losses), grad_norm, lr_scheduler.get_last_lr()[0])
        if run.due(cfg.validate_every) and acc.is_main_process and cfg.validation_prompts:
            validate(cfg, acc, unet, models, run.state.step)

    if run.state.step < cfg.max_steps:
        run.checkpoint()
        return run.finish([], finished=False)
    outputs, registered = [], []
    if acc.is_main_process:
        if cfg.validation_prompts:
            validate(cfg, acc, unet, models, run.state.step)
        tensors = common.lora_tensors(acc.unwrap_model(unet), rank=cfg.rank, alpha=cfg.lora_alpha)
        meta = common.output_metadata(cfg, models, trainer=NAME, kind="style", representation="lora")
        outputs.append(save_tensors(tensors, cfg.output_dir / OUTPUT, meta))
        if cfg.register_as is not None:
            registered.append(common.register_output(cfg, outputs[0], trainer=NAME, kind="style",
                                                     inputs=[("base", cfg.base)]))
    acc.wait_for_everyone()
    return run.finish(outputs, finished=True, registered=registered)

