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

from weightlab.files import save_tensors
from weightlab.train import common
from weightlab.train.config import StyleLoRAConfig

NAME = "style-lora"
OUTPUT = "style_lora.safetensors"


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
    unet = common.build_lora_student(cfg, models)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer, lr_scheduler = common.build_optimizer(cfg, params)
    unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    # validation: DDIM with classifier-free guidance (``weightlab generate --sampler ddim``'s settings)
    run = common.Run(acc, cfg, NAME, kind="style", validate=lambda step: common.validation_images(
        cfg, acc, unet, models, step, sampler="ddim", steps=cfg.validation_steps, guidance=cfg.validation_guidance))
    start = run.resume()
    batches = common.batches(cfg, acc, start, video=False)
    last = min(cfg.max_steps, stop_after or cfg.max_steps)

    while run.state.step < last:
        loss, grad_norm = common.accumulated_step(
            cfg, acc, unet, params, optimizer, lambda: common.diffusion_loss(cfg, acc, unet, models, next(batches)))
        lr_scheduler.step()
        run.end_step(loss, grad_norm, lr_scheduler.get_last_lr()[0])

    def save():
        tensors = common.lora_tensors(acc.unwrap_model(unet), rank=cfg.rank, alpha=cfg.lora_alpha)
        meta = common.output_metadata(cfg, models, trainer=NAME, kind="style", representation="lora")
        return [save_tensors(tensors, cfg.output_dir / OUTPUT, meta)]

    return run.finish(save)
