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

``coupled: true`` is the paper's ablation: no image LoRA; a fresh spatial LoRA (B = 0) on the online net trains
together with the motion module on video, its target being the online LoRA itself under no_grad (as in
``image-lcm``), and ``lcm_lora.safetensors`` (kind ``image_accel``) is output as well.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from weightlab.errors import ShapeMismatchError, WeightlabError
from weightlab.files import save_tensors
from weightlab.residuals import LoRA
from weightlab.schedules import check_distilled
from weightlab.train import common
from weightlab.train.config import MotionLCMConfig
from weightlab.train.consistency import DDIMSolver, distillation_loss, ema_update_

NAME = "motion-lcm"
LORA_OUTPUT = "lcm_lora.safetensors"


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


@torch.no_grad()
def copy_lora_(target, online) -> None:
    """Coupled mode: the target's spatial LoRA factors ← the online net's (the LCM-LoRA target, no EMA)."""
    src = dict(online.named_parameters())
    for name, p in target.named_parameters():
        if ".lora_" in name:
            p.copy_(src[name])


def spatial_modules(unet, targets) -> list[str]:
    """Full names of ``unet``'s modules named by ``targets`` outside the motion modules (where a spatial LoRA goes)."""
    return sorted(n for n, _ in unet.named_modules() if "motion_modules" not in n.split(".")
                  and any(n == t or n.endswith("." + t) for t in targets))


@dataclass
class Networks:
    """The three UNetMotionModels of the motion stage and what the loop needs to keep the target's LoRA exact
    (decoupled mode; None when coupled)."""

    online: torch.nn.Module
    target: torch.nn.Module
    teacher: torch.nn.Module
    lora: LoRA | None  # the frozen image LCM-LoRA
    target_lora: dict[str, torch.nn.Parameter] | None  # the target's weights the LoRA changes
    pristine: dict[str, torch.Tensor] | None  # their base values w0 (fp32)
    adapter_config: dict  # MotionAdapter config of the student


def build_networks(cfg: MotionLCMConfig, models: common.BaseModels, dtype: torch.dtype) -> Networks:
    """Online, target and teacher UNetMotionModels, each built over a copy of the base UNet."""
    teacher_adapter = common.load_motion_adapter(cfg.teacher_motion)
    if cfg.init_motion == "teacher":
        init = teacher_adapter
    elif cfg.init_motion == "new":
        init = common.new_motion_adapter(common.adapter_config(teacher_adapter), cfg.seed)
    else:
        init = common.load_motion_adapter(cfg.init_motion)
    device = models.unet.device
    if cfg.coupled:
        teacher = common.motion_unet(models.unet, teacher_adapter, base=cfg.base).to(device, dtype)
        online = common.motion_unet(models.unet, init, base=cfg.base).to(device).requires_grad_(False)
        # the target stays fp32 whatever the mixed precision: its EMA accumulates small updates
        target = common.motion_unet(models.unet, init, base=cfg.base).to(device)
        targets = spatial_modules(online, cfg.target_modules)
        for net in (online, target):
            torch.manual_seed(cfg.seed)  # the same fresh factors in both (B = 0: the LoRA starts off)
            common.add_lora(net, rank=cfg.rank, alpha=cfg.lora_alpha, targets=targets)
        for name, p in online.named_parameters():
            p.requires_grad_(".lora_" in name or ".motion_modules." in name)  # the LoRA and the motion module train
        if cfg.gradient_checkpointing:
            online.enable_gradient_checkpointing()
        return Networks(online.train(), target.requires_grad_(False).eval(), teacher.requires_grad_(False).eval(),
                        None, None, None, common.adapter_config(init))

    lora = load_image_lora(cfg.image_lora, device)
    check_distilled(lora.metadata, models.schedule, source=f"image_lora {cfg.image_lora}",
                    user="this motion stage (and the video sampler after it)",
                    fix="distil the image LCM-LoRA again with image-lcm's default schedule (AnimateLCM's linear beta "
                        "0.00085-0.012) or the same beta_schedule/beta_start/beta_end as this motion-lcm config.")
    base = dict(models.unet.named_parameters())
    teacher = common.motion_unet(models.unet, teacher_adapter, base=cfg.base).to(device, dtype)
    teacher = teacher.requires_grad_(False).eval()
    online = common.motion_unet(models.unet, init, base=cfg.base).to(device)
    online_lora = lora_weights(online, lora)
    pristine = {path: base[f"{path}.weight"] for path in online_lora}
    set_lora_weight(online_lora, pristine, lora, 1.0)
    online.freeze_unet2d_params()  # only motion_modules train
    if cfg.gradient_checkpointing:
        online.enable_gradient_checkpointing()
    # the target stays fp32 whatever the mixed precision: its EMA accumulates small updates
    target = common.motion_unet(models.unet, init, base=cfg.base).to(device).requires_grad_(False).eval()
    return Networks(online.train(), target, teacher, lora, lora_weights(target, lora), pristine,
                    common.adapter_config(init))


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


def train(cfg: MotionLCMConfig, *, stop_after: int | None = None) -> common.TrainResult:
    """Run (or resume) motion-module consistency distillation (with a spatial LoRA when ``cfg.coupled``).

    Args:
        cfg (MotionLCMConfig): the run.
        stop_after (int | None, default None): stop after this many total steps with a checkpoint and no output.
    Returns:
        TrainResult: output paths (folder, AnimateDiff file, and the spatial LoRA when coupled), final step,
        per-step losses and gradient norms.
    """
    acc = common.build_accelerator(cfg, NAME)
    dtype = common.weight_dtype(acc)
    models = common.load_base(cfg, acc.device, dtype)
    nets = build_networks(cfg, models, dtype)
    solver = DDIMSolver.from_schedule(models.alphas_cumprod.cpu(), cfg.num_ddim_timesteps)
    uncond = common.encode_prompts(models, [""], acc.device)
    target_params = dict(nets.target.named_parameters())
    ema = {n: target_params[n] for n, p in nets.online.named_parameters()  # θ⁻ of the motion parameters
           if p.requires_grad and ".motion_modules." in n}
    params = [p for p in nets.online.parameters() if p.requires_grad]
    motion_params = [p for n, p in nets.online.named_parameters() if n in ema]
    optimizer, lr_scheduler = common.build_optimizer(cfg, params)
    online, optimizer, lr_scheduler = acc.prepare(nets.online, optimizer, lr_scheduler)
    # validation: 4 LCM steps without CFG (``weightlab generate``'s scheduler settings)
    run = common.Run(acc, cfg, NAME, kind="motion", extra_state=[common.ParamState(ema)],
                     validate=lambda step: common.validation_videos(cfg, acc, online, models, step, sampler="lcm",
                                                                    steps=4, guidance=1.0))
    start = run.resume()
    batches = common.batches(cfg, acc, start, video=True)
    last = min(cfg.max_steps, stop_after or cfg.max_steps)

    while run.state.step < last:
        if cfg.coupled:  # the spatial LoRA's target is the online LoRA itself, as in image-lcm
            copy_lora_(nets.target, acc.unwrap_model(online))
        else:  # the target's LoRA weight follows the EMA of a parameter that starts at 0: λ_n = 1 − μ^n
            set_lora_weight(nets.target_lora, nets.pristine, nets.lora, 1.0 - cfg.ema_decay ** run.state.step)
        loss, grad_norm = common.accumulated_step(cfg, acc, online, params, optimizer, lambda: motion_loss(
            cfg, acc, online, nets.target, nets.teacher, models, solver, uncond, next(batches)))
        lr_scheduler.step()
        ema_update_(ema.values(), motion_params, cfg.ema_decay)
        run.end_step(loss, grad_norm, lr_scheduler.get_last_lr()[0])

    def save():
        unet = acc.unwrap_model(online)
        outputs = common.save_motion_module(cfg, models, unet, nets.adapter_config, trainer=NAME)
        if cfg.coupled:
            meta = common.output_metadata(cfg, models, trainer=NAME, kind="image_accel", representation="lora")
            tensors = common.lora_tensors(unet, rank=cfg.rank, alpha=cfg.lora_alpha)
            outputs.append(save_tensors(tensors, cfg.output_dir / LORA_OUTPUT, meta))
        return outputs

    return run.finish(save)
