"""``motion-lcm``: video consistency distillation of a motion module, τ_motion (AnimateLCM's decoupled motion stage).

    weightlab train motion-lcm --config motion.yaml
    accelerate launch --num_processes 8 -m weightlab.train motion-lcm --config motion.yaml

Three networks over video latents ``[B, C, F, H, W]`` (AnimateLCM, decoupled consistency learning):
- online  = base + the image LCM-LoRA (fused, frozen) + a motion module; only ``motion_modules`` train;
- target  = base + the EMA (μ = ``ema_decay``) of the online motion parameters + the LoRA at weight
  ``λ_n = 1 − μ^n``: the target's copy of the frozen LoRA delta starts at zero and follows the same EMA, so the
  target begins *without* the LoRA (AnimateLCM's initialization strategy) and converges to the online model;
- teacher = base + ``teacher_motion``, with CFG ``cond + w·(cond − uncond)``, w ~ U[w_min, w_max].
The loss and solver are the image stage's (:func:`~weightlab.train.consistency.distillation_loss`), with
AnimateLCM's linear β schedule and 10% empty captions by default; an image LoRA recorded as distilled under another
schedule is refused. Outputs: ``motion_module/`` (diffusers
MotionAdapter folder) and ``motion_module_animatediff.safetensors`` (original AnimateDiff keys), kind ``motion``.
"""

from __future__ import annotations

import json
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from weightlab.errors import ShapeMismatchError, WeightlabError
from weightlab.files import save_tensors
from weightlab.residuals import LoRA
from weightlab.schedules import check_distilled, make_scheduler
from weightlab.train import common
from weightlab.train.config import MotionLCMConfig
from weightlab.train.consistency import DDIMSolver, distillation_loss, ema_update_
from weightlab.train.data import build_dataset, build_loader

NAME = "motion-lcm"
OUTPUT_DIR = "motion_module"
OUTPUT_FILE = "motion_module_animatediff.safetensors"


def load_motion_adapter(path):
    """A diffusers ``MotionAdapter`` from a MotionAdapter folder or an AnimateDiff/AnimateLCM file (via ``weightlab.load``)."""
    from diffusers import MotionAdapter

    from weightlab.loading import load
    from weightlab.residuals import MotionModule

    res = load(path)
    if not isinstance(res, MotionModule):
        raise WeightlabError(f"{path}: is a {type(res).__name__}, not a motion module. Fix: pass a MotionAdapter folder "
                             "or an AnimateDiff motion-module file.")
    adapter = MotionAdapter(**res.config)
    adapter.load_state_dict({k: v.clone() for k, v in res.weights.items()})
    return adapter


def new_motion_adapter(config: dict, seed: int):
    """A fresh MotionAdapter (seeded) whose temporal transformers end in a zero ``proj_out``: the motion branch is off."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(**config)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".proj_out." in name:
                p.zero_()
    return adapter


def load_image_lora(path, device: torch.device):
    """The frozen image LCM-LoRA (any LoRA layout ``weightlab.load`` reads), factors on ``device``."""
    from weightlab.loading import load

    lora = load(path)
    if not isinstance(lora, LoRA) or lora.kind == "motion_lora":
        raise WeightlabError(f"{path}: image_lora must be a spatial LoRA (the image-lcm output), got "
                             f"{type(lora).__name__} kind {lora.kind!r}. "
                             "Fix: pass the lcm_lora.safetensors of an image-lcm run.")
    dora = sorted(p for p, t in lora.targets.items() if t.magnitude is not None)
    if dora:
        raise WeightlabError(f"{path}: image_lora is a DoRA file ({len(dora)} target(s), e.g. {dora[0]}); the motion "
                             "stage freezes a plain LoRA, whose change does not depend on the weight. "
                             "Fix: pass the lcm_lora.safetensors of an image-lcm run.")
    lora.targets = {p: dataclasses.replace(t, down=t.down.to(device), up=t.up.to(device))
                    for p, t in lora.targets.items()}
    return lora


def lora_weights(unet, lora) -> dict[str, torch.nn.Parameter]:
    """Target module path -> the ``.weight`` it changes in ``unet``; shapes checked."""
    params = dict(unet.named_parameters())
    out = {}
    for path, t in lora.targets.items():
        p = params.get(f"{path}.weight")
        if p is None or p.numel() != t.up.shape[0] * t.down[0].numel():
            found = "no such weight" if p is None else f"weight {tuple(p.shape)}"
            raise ShapeMismatchError(f"image LoRA target {path} does not fit this base ({found}). "
                                     "Fix: use the LCM-LoRA trained on this base.")
        out[path] = p
    return out


@torch.no_grad()
def set_lora_weight(weights: dict, pristine: dict, lora, scale: float) -> None:
    """``W = w0 + scale·ΔW`` from the pristine ``w0`` (never by adding increments: exact at any step, on resume too)."""
    for path, w in weights.items():
        w.copy_((pristine[path] + scale * lora.targets[path].delta(w.shape)).to(w.dtype))


@dataclass
class Networks:
    """The three UNetMotionModels of the motion stage and what the loop needs to keep the target's LoRA exact."""

    online: torch.nn.Module
    target: torch.nn.Module
    teacher: torch.nn.Module
    lora: LoRA  # the frozen image LCM-LoRA
    target_lora: dict[str, torch.nn.Parameter]  # the target's weights the LoRA changes
    pristine: dict[str, torch.Tensor]  # their base values w0 (fp32)
    adapter_config: dict  # MotionAdapter config of the student


def build_networks(cfg: MotionLCMConfig, models: common.BaseModels, dtype: torch.dtype) -> Networks:
    """Online, target and teacher UNetMotionModels, each built over a copy of the base UNet."""
    from diffusers import UNetMotionModel

    teacher_adapter = load_motion_adapter(cfg.teacher_motion)
    if cfg.init_motion == "teacher":
        init = teacher_adapter
    elif cfg.init_motion == "new":
        init = new_motion_adapter(_config(teacher_adapter), cfg.seed)
    else:
        init = load_motion_adapter(cfg.init_motion)
    device = models.unet.device
    lora = load_image_lora(cfg.image_lora, device)
    check_distilled(lora.metadata, models.schedule, source=f"image_lora {cfg.image_lora}",
                    user="this motion stage (and the video sampler after it)",
                    fix="distil the image LCM-LoRA again with image-lcm's default schedule (AnimateLCM's linear beta "
                        "0.00085-0.012) or the same beta_schedule/beta_start/beta_end as this motion-lcm config.")
    base = dict(models.unet.named_parameters())

    try:
        teacher = UNetMotionModel.from_unet2d(models.unet, teacher_adapter).to(device, dtype).requires_grad_(False).eval()
        online = UNetMotionModel.from_unet2d(models.unet, init).to(device)
    except (ValueError, RuntimeError) as e:
        raise ShapeMismatchError(f"the motion module does not fit the base {cfg.base}: {e}. Fix: use a motion module "
                                 "made for this base's block layout and widths (teacher_motion, init_motion).") from e
    online_lora = lora_weights(online, lora)
    pristine = {path: base[f"{path}.weight"] for path in online_lora}
    set_lora_weight(online_lora, pristine, lora, 1.0)
    online.freeze_unet2d_params()  # only motion_modules train
    if cfg.gradient_checkpointing:
        online.enable_gradient_checkpointing()
    # the target stays fp32 whatever the mixed precision: its EMA accumulates small updates
    target = UNetMotionModel.from_unet2d(models.unet, init).to(device).requires_grad_(False).eval()
    return Networks(online.train(), target, teacher, lora, lora_weights(target, lora), pristine, _config(init))


def _config(adapter) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in adapter.config.items() if not k.startswith("_")}


def motion_loss(cfg: MotionLCMConfig, accelerator, online, target, teacher, models: common.BaseModels,
                solver: DDIMSolver, uncond: torch.Tensor, batch: dict) -> torch.Tensor:
    """The consistency distillation loss of one micro-batch of clips (all draws per sample, from its seed)."""
    device = accelerator.device
    gens = common.generators(batch["seed"])
    captions = common.drop_captions(batch["caption"], gens, cfg.empty_caption_prob)
    latents = common.encode_latents(models.vae, batch["pixels"], gens)  # [B, C, F, h, w]
    frames = latents.shape[2]
    index = common.draw(gens, lambda g: torch.randint(0, len(solver.timesteps), (), generator=g)).to(device)
    noise = common.draw(gens, lambda g: torch.randn(latents.shape[1:], generator=g)).to(device)
    w = common.draw(gens, lambda g: cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand((), generator=g)).to(device)
    embeds = common.encode_prompts(models, captions, device).repeat_interleave(frames, dim=0)  # one per frame
    pair = torch.cat([embeds, uncond.expand_as(embeds)])
    with accelerator.autocast():
        return distillation_loss(
            online=lambda x, t: online(x, t, embeds).sample,
            target=lambda x, t: target(x, t, embeds).sample,
            teacher=lambda x, t: teacher(torch.cat([x, x]), torch.cat([t, t]), pair).sample.float().chunk(2),
            latents=latents, noise=noise, index=index, w=w, solver=solver, alphas_cumprod=models.alphas_cumprod,
            prediction_type=models.prediction_type, sigma_data=cfg.sigma_data,
            timestep_scaling=cfg.timestep_scaling, loss=cfg.loss, huber_c=cfg.huber_c)


def validate(cfg: MotionLCMConfig, accelerator, online, models: common.BaseModels, step: int) -> list:
    """One GIF per validation prompt: AnimateDiffPipeline around the online model, 4 LCM steps, no CFG
    (``weightlab generate``'s scheduler settings under the run's schedule)."""
    from diffusers import AnimateDiffPipeline

    unet = accelerator.unwrap_model(online)
    scheduler = make_scheduler("lcm", models.scheduler_config, models.schedule)
    pipe = AnimateDiffPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=unet,
                               motion_adapter=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    unet.eval()
    paths = []
    with accelerator.autocast(), torch.no_grad():
        for i, prompt in enumerate(cfg.validation_prompts):
            frames = pipe(prompt, num_frames=cfg.data.num_frames, num_inference_steps=4, guidance_scale=1.0,
                          height=cfg.data.resolution, width=cfg.data.resolution,
                          generator=torch.Generator().manual_seed(cfg.seed)).frames[0]
            paths.append(common.write_gif(frames, cfg.output_dir / "samples" / f"step-{step:08d}-{i}.gif"))
    unet.train()
    return paths


def save_motion_module(cfg: MotionLCMConfig, online, config: dict, models: common.BaseModels) -> list:
    """The trained motion module as a diffusers MotionAdapter folder and as an original-layout AnimateDiff file,
    both with the run's metadata (schedule, solver) in their safetensors header."""
    from diffusers import MotionAdapter

    from weightlab.formats.motion import to_original_names

    adapter = MotionAdapter(**config)
    adapter.load_state_dict({k: v for k, v in online.state_dict().items() if ".motion_modules." in k})
    meta = common.output_metadata(cfg, models, trainer=NAME, kind="motion", representation="module")
    meta["weightlab.config"] = json.dumps(config)
    folder = cfg.output_dir / OUTPUT_DIR
    adapter.save_config(folder)  # the folder MotionAdapter.save_pretrained writes, with our metadata in the weights
    save_tensors(adapter.state_dict(), folder / "diffusion_pytorch_model.safetensors", {"format": "pt", **meta})
    original = to_original_names(adapter.state_dict(), with_pos_encoder=True)
    file = save_tensors(original, cfg.output_dir / OUTPUT_FILE, meta)
    return [folder, file]


def train(cfg: MotionLCMConfig, *, stop_after: int | None = None) -> common.TrainResult:
    """Run (or resume) motion-module consistency distillation.

    Args:
        cfg (MotionLCMConfig): the run.
        stop_after (int | None, default None): stop after this many total steps with a checkpoint and no output.
    Returns:
        TrainResult: output paths (folder, AnimateDiff file), final step, per-step losses and gradient norms.
    """
    acc = common.build_accelerator(cfg, NAME)
    dtype = common.weight_dtype(acc)
    models = common.load_base(cfg, acc.device, dtype)
    nets = build_networks(cfg, models, dtype)
    solver = DDIMSolver.from_schedule(models.alphas_cumprod.cpu(), cfg.num_ddim_timesteps)
    uncond = common.encode_prompts(models, [""], acc.device)
    target_params = dict(nets.target.named_parameters())
    ema = {n: target_params[n] for n, p in nets.online.named_parameters() if p.requires_grad}  # θ⁻ of motion params
    params = [p for p in nets.online.parameters() if p.requires_grad]
    optimizer, lr_scheduler = common.build_optimizer(cfg, params)
    online, optimizer, lr_scheduler = acc.prepare(nets.online, optimizer, lr_scheduler)
    run = common.Run(acc, cfg, NAME, extra_state=[common.ParamState(ema)])
    start = run.resume()
    batches = iter(build_loader(build_dataset(cfg.data, video=True), batch_size=cfg.batch_size,
                                world_size=acc.num_processes, rank=acc.process_index, seed=cfg.seed,
                                start_batch=start * cfg.gradient_accumulation_steps, num_workers=cfg.num_workers))
    last = min(cfg.max_steps, stop_after or cfg.max_steps)

    while run.state.step < last:
        # the target's LoRA weight follows the EMA of a parameter that starts at 0: λ_n = 1 − μ^n
        set_lora_weight(nets.target_lora, nets.pristine, nets.lora, 1.0 - cfg.ema_decay ** run.state.step)
        micro_losses = []
        for _ in range(cfg.gradient_accumulation_steps):
            with acc.accumulate(online):
                loss = motion_loss(cfg, acc, online, nets.target, nets.teacher, models, solver, uncond, next(batches))
                acc.backward(loss)
                if acc.sync_gradients:  # the last micro-batch: gradients are all-reduced, clip them
                    grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(acc.gather(loss.detach()).mean().item())
        lr_scheduler.step()
        ema_update_(ema.values(), params, cfg.ema_decay)
        run.end_step(sum(micro_losses) / len(micro_losses), grad_norm, lr_scheduler.get_last_lr()[0])
        if run.due(cfg.validate_every) and acc.is_main_process and cfg.validation_prompts:
            validate(cfg, acc, online, models, run.state.step)

    if run.state.step < cfg.max_steps:
        run.checkpoint()
        return run.finish([], finished=False)
    outputs, registered = [], []
    if acc.is_main_process:
        if cfg.validation_prompts:
            validate(cfg, acc, online, models, run.state.step)
        outputs = save_motion_module(cfg, acc.unwrap_model(online), nets.adapter_config, models)
        if cfg.register_as is not None:
            inputs = [("base", cfg.base), ("image_accel", cfg.image_lora), ("teacher", cfg.teacher_motion)]
            if isinstance(cfg.init_motion, Path):
                inputs.append(("init", cfg.init_motion))
            registered.append(common.register_output(cfg, outputs[0], trainer=NAME, kind="motion", inputs=inputs))
    acc.wait_for_everyone()
    return run.finish(outputs, finished=True, registered=registered)
