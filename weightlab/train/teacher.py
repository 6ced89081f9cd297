"""``teacher``: train a small text-conditioned UNet from scratch — a base to distil, restyle and animate.

    weightlab train teacher --config teacher.yaml
    accelerate launch --num_processes 4 -m weightlab.train teacher --config teacher.yaml

The UNet is a ``UNet2DConditionModel`` built from ``unet_config`` over
:data:`~weightlab.train.config.TEACHER_UNET_CONFIG` (SD1.5's block layout, 1.5 M parameters); its in/out channels,
``cross_attention_dim`` and ``sample_size`` follow ``base``'s VAE and text encoder and the data's resolution unless
set. ``base`` lends the text encoder, tokenizer, VAE and noise schedule; its own UNet is not read. Loss: ε-MSE
(``v`` for v-prediction schedules) under the base's schedule unless configured, 10% empty captions (for classifier-free
guidance), optionally min-SNR-γ weighted. Output: ``pipeline/``, a diffusers Stable Diffusion folder — the trained UNet
(kind ``base``, its family and schedule in the safetensors metadata), the base's text encoder, tokenizer and VAE, and
the scheduler config of the schedule trained under — usable as ``base`` by merge, generate and the other trainers.

Example:
    >>> from weightlab.train import DataConfig, TeacherConfig, train_teacher                      # doctest: +SKIP
    >>> train_teacher(TeacherConfig(base="tiny/", output_dir="runs/teacher",
    ...               data=DataConfig(format="synthetic_images", resolution=32)))                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from weightlab.errors import WeightlabError
from weightlab.files import save_tensors
from weightlab.train import common
from weightlab.train.config import TEACHER_UNET_CONFIG, TeacherConfig

NAME = "teacher"
OUTPUT = "pipeline"


def build_unet(cfg: TeacherConfig, models: common.BaseModels, device: torch.device):
    """A fresh, trainable fp32 UNet (seeded: every process starts from the same weights)."""
    from diffusers import UNet2DConditionModel

    vae = models.vae.config
    config = {"in_channels": vae.latent_channels, "out_channels": vae.latent_channels,
              "cross_attention_dim": models.text_encoder.config.hidden_size,
              "sample_size": cfg.data.resolution // 2 ** (len(vae.block_out_channels) - 1),
              **TEACHER_UNET_CONFIG, **cfg.unet_config}
    torch.manual_seed(cfg.seed)
    try:
        unet = UNet2DConditionModel(**config)
    except (TypeError, ValueError) as e:
        raise WeightlabError(f"unet_config: diffusers cannot build a UNet2DConditionModel from {config} ({e}). "
                             "Fix: give unet_config only UNet2DConditionModel arguments that fit together "
                             "(as many block types as block_out_channels).") from None
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.to(device).train()


def save_pipeline(cfg: TeacherConfig, models: common.BaseModels, unet) -> Path:
    """``output_dir/pipeline``: the base's text encoder, tokenizer and VAE (copied), the trained UNet with the run's
    metadata, and the scheduler config of the schedule trained under."""
    base, out = Path(cfg.base), Path(cfg.output_dir) / OUTPUT
    for part in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(base / part, out / part, dirs_exist_ok=True)
    if (base / "model_index.json").is_file():
        shutil.copy2(base / "model_index.json", out / "model_index.json")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(models.scheduler_config, indent=2))
    unet.save_config(out / "unet")
    meta = common.output_metadata(cfg, models, trainer=NAME, kind="base", representation="full")
    save_tensors(unet.state_dict(), out / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt", **meta})
    return out


def train(cfg: TeacherConfig, *, stop_after: int | None = None) -> common.TrainResult:
    """Run (or resume) training a teacher UNet from scratch.

    Args:
        cfg (TeacherConfig): the run.
        stop_after (int | None, default None): stop after this many total steps with a checkpoint and no output
            (a time-sliced job); the next call with ``cfg.resume`` continues exactly.
    Returns:
        TrainResult: ``[output_dir/pipeline]``, final step, per-step losses and gradient norms.
    """
    acc = common.build_accelerator(cfg, NAME)
    models = common.load_base(cfg, acc.device, common.weight_dtype(acc), unet=False)
    models = dataclasses.replace(models, unet=build_unet(cfg, models, acc.device))
    params = list(models.unet.parameters())
    optimizer, lr_scheduler = common.build_optimizer(cfg, params)
    unet, optimizer, lr_scheduler = acc.prepare(models.unet, optimizer, lr_scheduler)
    # validation: DDIM with classifier-free guidance (``weightlab generate --sampler ddim``'s settings)
    run = common.Run(acc, cfg, NAME, kind="base", validate=lambda step: common.validation_images(
        cfg, acc, unet, models, step, sampler="ddim", steps=cfg.validation_steps, guidance=cfg.validation_guidance))
    start = run.resume()
    batches = common.batches(cfg, acc, start, video=False)
    last = min(cfg.max_steps, stop_after or cfg.max_steps)

    while run.state.step < last:
        loss, grad_norm = common.accumulated_step(
            cfg, acc, unet, params, optimizer, lambda: common.diffusion_loss(cfg, acc, unet, models, next(batches)))
        lr_scheduler.step()
        run.end_step(loss, grad_norm, lr_scheduler.get_last_lr()[0])

    return run.finish(lambda: [save_pipeline(cfg, models, acc.unwrap_model(unet))])
