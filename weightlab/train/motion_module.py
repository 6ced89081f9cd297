"""``motion-module``: the AnimateDiff stage — teach a frozen base to move by training a motion module on video.

    weightlab train motion-module --config motion_module.yaml
    accelerate launch --num_processes 8 -m weightlab.train motion-module --config motion_module.yaml

The base UNet is frozen inside a ``UNetMotionModel`` (``from_unet2d``); only its ``motion_modules`` (diffusers
``MotionAdapter`` layout) train, with the ε-MSE loss (``v`` for v-prediction schedules, optionally min-SNR-γ) on
video latents ``[B, C, F, h, w]``, the prompt repeated per frame and 10% empty captions (for classifier-free guidance
later). A fresh module follows the base's block widths and layers (``motion_config`` over it) and starts with its
motion branch off (zero ``proj_out``); ``init_motion`` continues from an existing one. Outputs, kind ``motion`` (the
schedule in their metadata): ``motion_module/`` (a diffusers MotionAdapter folder) and
``motion_module_animatediff.safetensors`` (original AnimateDiff keys) — e.g. the ``teacher_motion`` of ``motion-lcm``.

Example:
    >>> from weightlab.train import DataConfig, MotionModuleConfig, train_motion_module           # doctest: +SKIP
    >>> train_motion_module(MotionModuleConfig(base="runs/teacher/pipeline", output_dir="runs/motion",
    ...                     data=DataConfig(format="synthetic_videos", resolution=32)))             # doctest: +SKIP
"""

from __future__ import annotations

from weightlab.errors import WeightlabError
from weightlab.families import SD15
from weightlab.train import common
from weightlab.train.config import MotionModuleConfig

NAME = "motion-module"


def build_adapter(cfg: MotionModuleConfig, models: common.BaseModels):
    """The motion module to train: ``cfg.init_motion``, or a fresh one shaped after the base UNet."""
    if cfg.init_motion is not None:
        return common.load_motion_adapter(cfg.init_motion)
    unet = models.unet.config
    config = {**SD15.motion_config, "block_out_channels": list(unet.block_out_channels),
              "motion_layers_per_block": unet.layers_per_block, "motion_norm_num_groups": unet.norm_num_groups,
              **cfg.motion_config}
    try:
        return common.new_motion_adapter(config, cfg.seed)
    except (TypeError, ValueError) as e:
        raise WeightlabError(f"motion_config: diffusers cannot build a MotionAdapter from {config} ({e}). "
                             "Fix: give motion_config only MotionAdapter arguments that fit the base.") from None


def build_student(cfg: MotionModuleConfig, models: common.BaseModels, adapter):
    """The base UNet and ``adapter`` as one UNetMotionModel in which only the motion modules train."""
    unet = common.motion_unet(models.unet, adapter, base=cfg.base).to(models.unet.device)
    unet.freeze_unet2d_params()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train()


def train(cfg: MotionModuleConfig, *, stop_after: int | None = None) -> common.TrainResult:
    """Run (or resume) motion-module training on video.

    Args:
        cfg (MotionModuleConfig): the run.
        stop_after (int | None, default None): stop after this many total steps with a checkpoint and no output.
    Returns:
        TrainResult: output paths (MotionAdapter folder, AnimateDiff file), final step, per-step losses and
        gradient norms.
    """
    acc = common.build_accelerator(cfg, NAME)
    models = common.load_base(cfg, acc.device, common.weight_dtype(acc))
    adapter = build_adapter(cfg, models)
    unet = build_student(cfg, models, adapter)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer, lr_scheduler = common.build_optimizer(cfg, params)
    unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    # validation: DDIM with classifier-free guidance (``weightlab generate --sampler ddim``'s settings)
    run = common.Run(acc, cfg, NAME, kind="motion", validate=lambda step: common.validation_videos(
        cfg, acc, unet, models, step, sampler="ddim", steps=cfg.validation_steps, guidance=cfg.validation_guidance))
    start = run.resume()
    batches = common.batches(cfg, acc, start, video=True)
    last = min(cfg.max_steps, stop_after or cfg.max_steps)

    while run.state.step < last:
        loss, grad_norm = common.accumulated_step(
            cfg, acc, unet, params, optimizer, lambda: common.diffusion_loss(cfg, acc, unet, models, next(batches)))
        lr_scheduler.step()
        run.end_step(loss, grad_norm, lr_scheduler.get_last_lr()[0])

    return run.finish(lambda: common.save_motion_module(cfg, models, acc.unwrap_model(unet),
                                                        common.adapter_config(adapter), trainer=NAME))
