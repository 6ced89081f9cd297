"""What the trainers share: accelerate setup, the base models, encoders, the ε loss, LoRA and motion-module I/O,
validation samples, and the run bookkeeping.

:class:`Run` owns the tail of every loop — :meth:`Run.end_step` (history, TensorBoard, bar, checkpoints, validation
samples when due) and :meth:`Run.finish` (a checkpoint when stopped early, else the final samples and the outputs) —
plus resume from the newest checkpoint (``accelerator.save_state``: trainable weights only, optimizer, lr scheduler,
RNG, and registered state such as the step, the loss history and EMA weights) and the loss PNG. The trainers read
paths only: registering outputs, or resolving registry references, is the entry points' business.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from weightlab.errors import FileFormatError, ShapeMismatchError, WeightlabError
from weightlab.schedules import NoiseSchedule, make_scheduler, schedule_metadata
from weightlab.train.consistency import add_noise
from weightlab.train.data import build_dataset, build_loader

log = logging.getLogger(__name__)
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class BaseModels:
    """The frozen parts of a Stable Diffusion pipeline folder, plus its noise schedule."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module | None  # fp32, on the device, requires_grad off (None: not loaded)
    alphas_cumprod: torch.Tensor  # ᾱ_t, t = 0..T-1 (fp32, on the device)
    prediction_type: str
    scheduler_config: dict
    schedule: NoiseSchedule  # what the run trains under (recorded in its output)


def load_base(cfg, device: torch.device, dtype: torch.dtype, *, unet: bool = True) -> BaseModels:
    """Load ``cfg.base`` (a diffusers pipeline folder). The text encoder is cast to ``dtype``; the VAE stays fp32
    (SD1.5's VAE overflows in fp16) and so does the UNet (the trainers copy or train it; ``unet=False`` skips it).
    The noise schedule is the base's with ``cfg.beta_schedule``/``beta_start``/``beta_end`` where set (T and the
    prediction type are the base's)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = Path(cfg.base)
    missing = [p for p in PIPELINE_PARTS if not (base / p).is_dir()]
    if missing:
        raise FileFormatError(f"{base}: not a diffusers Stable Diffusion pipeline folder (missing {', '.join(missing)}/). "
                              "Fix: pass the folder StableDiffusionPipeline.save_pretrained wrote (or convert a single "
                              "file with StableDiffusionPipeline.from_single_file(...).save_pretrained(...)).")
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", local_files_only=True).to(device, dtype)
    vae = AutoencoderKL.from_pretrained(base / "vae", local_files_only=True).to(device)
    unet = UNet2DConditionModel.from_pretrained(base / "unet", local_files_only=True).to(device) if unet else None
    for m in (text_encoder, vae, unet):
        if m is not None:
            m.requires_grad_(False).eval()
    base_sched = dict(DDPMScheduler.load_config(base / "scheduler"))
    schedule = NoiseSchedule.from_config(base_sched).replace(
        beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    sched_cfg = {**base_sched, **schedule.scheduler_kwargs()}
    noise = DDPMScheduler.from_config(sched_cfg)
    return BaseModels(tokenizer, text_encoder, vae, unet, noise.alphas_cumprod.to(device, torch.float32),
                      noise.config.prediction_type, sched_cfg, schedule)


def build_accelerator(cfg, name: str):
    """An ``Accelerator`` for ``cfg``: mixed precision, accumulation, TensorBoard under ``output_dir/logs``.

    The lr scheduler is stepped by the loop once per optimizer step (``step_scheduler_with_optimizer=False``), so the
    schedule depends on the step count only, not on the number of processes.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    # accelerate keeps one process-wide AcceleratorState and refuses a second run (notebook, test session) with
    # another precision; drop that state only (the PartialState — device, process group — stays).
    if AcceleratorState._shared_state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
        AcceleratorState._reset_state()
    out = Path(cfg.output_dir)
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        step_scheduler_with_optimizer=False,
    )


def weight_dtype(accelerator) -> torch.dtype:
    """dtype of frozen weights under the run's mixed precision (trainable weights stay fp32 master copies)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def build_optimizer(cfg, params: list[torch.nn.Parameter]):
    """AdamW over ``params`` and the lr schedule (diffusers ``get_scheduler``) in optimizer steps."""
    from diffusers.optimization import get_scheduler

    if not params:
        raise WeightlabError("nothing to train: no parameter requires a gradient. Fix: check target_modules.")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.max_steps)
    return optimizer, scheduler


def generators(seeds: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by the sample's seed (see :mod:`weightlab.train.data`)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw(gens: list[torch.Generator], fn: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """``stack([fn(g) for g in gens])``: a per-sample random draw, independent of batch layout and process count."""
    return torch.stack([fn(g) for g in gens])


def drop_captions(captions: list[str], gens: list[torch.Generator], p: float) -> list[str]:
    """Replace each caption by ``""`` with probability ``p`` (unconditional training for CFG)."""
    return ["" if float(torch.rand((), generator=g)) < p else c for c, g in zip(captions, gens)]


@torch.no_grad()
def encode_prompts(models: BaseModels, captions: list[str], device) -> torch.Tensor:
    """CLIP last hidden states ``[B, 77, D]`` (fp32)."""
    ids = models.tokenizer(captions, padding="max_length", max_length=models.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)
    return models.text_encoder(ids)[0].float()


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """VAE latents ``z = (μ + σ·n)·scaling_factor``, ``n`` drawn per sample.

    Images ``[B, 3, H, W]`` -> ``[B, C, h, w]``; clips ``[B, F, 3, H, W]`` -> ``[B, C, F, h, w]`` (UNetMotionModel layout).
    """
    video = pixels.dim() == 5
    flat = pixels.flatten(0, 1) if video else pixels
    dist = vae.encode(flat.to(vae.device, vae.dtype)).latent_dist
    shape = dist.mean.shape[1:]
    if video:
        n = draw(gens, lambda g: torch.randn((pixels.shape[1], *shape), generator=g)).flatten(0, 1)
    else:
        n = draw(gens, lambda g: torch.randn(shape, generator=g))
    z = (dist.mean.float() + dist.std.float() * n.to(dist.mean.device)) * vae.config.scaling_factor
    return z.unflatten(0, pixels.shape[:2]).movedim(2, 1) if video else z


def add_lora(unet, *, rank: int, alpha: float | None, targets) -> None:
    """Inject a trainable PEFT LoRA (``B = 0``: the model is unchanged at step 0) into ``unet``'s ``targets``."""
    from peft import LoraConfig

    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=True))
    except ValueError as e:
        raise WeightlabError(f"cannot attach a LoRA to target_modules {list(targets)}: {e}. Fix: use module names of "
                             "the UNet (e.g. to_q, to_k, to_v, to_out.0, conv1).") from e


def lora_tensors(unet, *, rank: int, alpha: float | None) -> dict[str, torch.Tensor]:
    """The LoRA in diffusers/PEFT keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (fp32).

    ``alpha / rank`` is folded into ``lora_B`` (``ΔW = (α/r)·B·A = ((α/r)·B)·A``): diffusers' ``load_lora_weights``
    rejects ``.alpha`` keys in this layout, and without them every loader reads the scale as 1.
    """
    from peft.utils import get_peft_model_state_dict

    scale = (alpha or rank) / rank
    return {f"unet.{k}": (v.detach().float().cpu() * (scale if ".lora_B." in k else 1.0)).contiguous()
            for k, v in get_peft_model_state_dict(unet).items()}


def build_lora_student(cfg, models: BaseModels):
    """The base UNet with a fresh trainable LoRA (``cfg.rank``, ``lora_alpha``, ``target_modules``; seeded, so every
    process starts from the same factors)."""
    torch.manual_seed(cfg.seed)
    unet = models.unet
    add_lora(unet, rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.target_modules)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train()


def batches(cfg, accelerator, start: int, *, video: bool) -> Iterator[dict]:
    """The run's batches from optimizer step ``start`` on: this process's share, resumable (see ``data``)."""
    return iter(build_loader(build_dataset(cfg.data, video=video), batch_size=cfg.batch_size,
                             world_size=accelerator.num_processes, rank=accelerator.process_index, seed=cfg.seed,
                             start_batch=start * cfg.gradient_accumulation_steps, num_workers=cfg.num_workers))


def accumulated_step(cfg, accelerator, model, params, optimizer, loss_fn: Callable[[], torch.Tensor]):
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches (``loss_fn()`` each; gradients clipped
    on the last, once all-reduced). Returns (loss averaged over processes and micro-batches, gradient norm)."""
    micro_losses = []
    for _ in range(cfg.gradient_accumulation_steps):
        with accelerator.accumulate(model):
            loss = loss_fn()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro_losses.append(accelerator.gather(loss.detach()).mean().item())
    return sum(micro_losses) / len(micro_losses), grad_norm


def diffusion_loss(cfg, accelerator, unet, models: BaseModels, batch: dict) -> torch.Tensor:
    """ε-MSE (v-MSE for v-prediction bases) of one micro-batch of images or clips, min-SNR-γ weighted (Hang et al.
    2023) when ``cfg.snr_gamma`` is set. Clips: latents ``[B, C, F, h, w]``, the prompt repeated per frame."""
    device = accelerator.device
    gens = generators(batch["seed"])
    captions = drop_captions(batch["caption"], gens, cfg.empty_caption_prob)
    latents = encode_latents(models.vae, batch["pixels"], gens)
    noise = draw(gens, lambda g: torch.randn(latents.shape[1:], generator=g)).to(device)
    t = draw(gens, lambda g: torch.randint(0, len(models.alphas_cumprod), (), generator=g)).to(device)
    x_t = add_noise(latents, noise, t, models.alphas_cumprod)
    with accelerator.autocast():
        embeds = encode_prompts(models, captions, device)
        if latents.dim() == 5:
            embeds = embeds.repeat_interleave(latents.shape[2], dim=0)  # one per frame
        pred = unet(x_t, t, embeds).sample
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


def adapter_config(adapter) -> dict:
    """A MotionAdapter's constructor arguments (JSON-ready)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in adapter.config.items() if not k.startswith("_")}


def motion_unet(unet, adapter, *, base: object):
    """``UNetMotionModel.from_unet2d(unet, adapter)``, or a clear error when the module does not fit the base."""
    from diffusers import UNetMotionModel

    try:
        return UNetMotionModel.from_unet2d(unet, adapter)
    except (ValueError, RuntimeError) as e:
        raise ShapeMismatchError(f"the motion module does not fit the base {base}: {e}. Fix: use a motion module "
                                 "made for this base's block layout and widths.") from e


def save_motion_module(cfg, models: BaseModels, unet, config: dict, *, trainer: str,
                       folder: str = "motion_module", file: str = "motion_module_animatediff.safetensors") -> list[Path]:
    """The motion modules of ``unet`` (a UNetMotionModel) as a diffusers MotionAdapter folder and as an
    original-layout AnimateDiff file under ``cfg.output_dir``, both with the run's metadata (schedule, solver) in
    their safetensors header. Returns ``[folder, file]``."""
    from diffusers import MotionAdapter

    from weightlab.files import save_tensors
    from weightlab.formats.motion import to_original_names

    adapter = MotionAdapter(**config)
    adapter.load_state_dict({k: v for k, v in unet.state_dict().items() if ".motion_modules." in k})
    meta = output_metadata(cfg, models, trainer=trainer, kind="motion", representation="module")
    meta["weightlab.config"] = json.dumps(config)
    out = Path(cfg.output_dir) / folder
    adapter.save_config(out)  # the folder MotionAdapter.save_pretrained writes, with our metadata in the weights
    save_tensors(adapter.state_dict(), out / "diffusion_pytorch_model.safetensors", {"format": "pt", **meta})
    original = to_original_names(adapter.state_dict(), with_pos_encoder=True)
    return [out, save_tensors(original, Path(cfg.output_dir) / file, meta)]


def output_metadata(cfg, models: BaseModels, *, trainer: str, kind: str, representation: str) -> dict[str, str]:
    """safetensors ``__metadata__`` of a trained residual: kind/family for ``weightlab.load``, the full config, and
    the noise schedule trained under (with the DDIM solver's N, k and σ_d for a consistency distillation), which
    the motion stage and the video sampler check (:mod:`weightlab.schedules`)."""
    from weightlab.families import best_family

    distill = {k: getattr(cfg, k) for k in ("num_ddim_timesteps", "sigma_data", "timestep_scaling") if hasattr(cfg, k)}
    family = best_family({k: p.dim() for k, p in models.unet.named_parameters()})[0].name  # the base's, not assumed
    return {"weightlab.kind": kind, "weightlab.family": family, "weightlab.representation": representation,
            "weightlab.trainer": trainer, "weightlab.training_config": cfg.model_dump_json(),
            **schedule_metadata(models.schedule, **distill)}


class TrainState:
    """Step counter and per-step history, checkpointed with the run."""

    def __init__(self):
        self.step = 0
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.losses, self.grad_norms = int(state["step"]), list(state["losses"]), list(state["grad_norms"])


class ParamState:
    """Named tensors (e.g. EMA weights held by a target network) as a checkpointable object."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.params = params

    def state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for k, v in self.params.items():
            v.copy_(state[k])


def _keep_trainable(models, weights, _output_dir) -> None:
    """save_state hook: store trainable parameters only (frozen base weights are re-read from the base at resume)."""
    for i, model in enumerate(models[: len(weights)]):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in names}


@dataclass
class TrainResult:
    """What a run produced. ``finished`` is False when it stopped early (``stop_after``) after a checkpoint.
    ``outputs[0]`` is the main output, of Eq. 2 kind ``kind`` (what an entry point registers)."""

    output_dir: Path
    outputs: list[Path]
    step: int
    finished: bool
    kind: str
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    steps_per_second: float = 0.0  # optimizer steps of this call's loop per second (setup and saving excluded)


class Run:
    """Bookkeeping of one training run around the trainer's own loop: resume before it, the tail of each step and
    the end of the run.

    Example (inside a trainer):
        >>> run = Run(accelerator, cfg, "image-lcm", kind="image_accel", validate=sample)   # doctest: +SKIP
        >>> start = run.resume()                                                          # doctest: +SKIP
        >>> run.end_step(loss, grad_norm, lr)                                             # doctest: +SKIP
        >>> return run.finish(save)                                                       # doctest: +SKIP
    """

    def __init__(self, accelerator, cfg, name: str, *, kind: str, validate: Callable[[int], object] | None = None,
                 extra_state=()):
        """``validate(step)`` writes validation samples (main process only); ``extra_state``: more checkpointed objects."""
        self.acc, self.cfg, self.name, self.kind = accelerator, cfg, name, kind
        self.state = TrainState()
        self.dir = Path(cfg.output_dir)
        self.checkpoints = self.dir / "checkpoints"
        accelerator.register_save_state_pre_hook(_keep_trainable)
        accelerator.register_for_checkpointing(self.state, *extra_state)
        self._validate = validate
        self._bar = None
        self._t0 = self._s0 = 0.0
        self._saved = -1  # step of the last checkpoint written by this run
        self._t_last = 0.0

    def resume(self) -> int:
        """Load the newest checkpoint when ``cfg.resume`` and one exists; start the trackers and the bar. Returns the step."""
        from tqdm.auto import tqdm

        done = sorted(self.checkpoints.glob("step-*")) if self.checkpoints.is_dir() else []
        if done and not self.cfg.resume:
            raise WeightlabError(f"{self.checkpoints}: checkpoints of an earlier run are there and resume is false. "
                                 "Fix: set resume: true to continue that run, or use a new output_dir.")
        if done:
            self.acc.load_state(str(done[-1]), strict=False)
            log.info("resumed from %s at step %d", done[-1], self.state.step)
        if self.acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.cfg.to_yaml(self.dir / "config.yaml")
        self.acc.init_trackers(self.name, config=_flat(json.loads(self.cfg.model_dump_json())))
        self._bar = tqdm(total=self.cfg.max_steps, initial=self.state.step, desc=self.name,
                         disable=not self.acc.is_local_main_process)
        self._t0, self._s0 = time.perf_counter(), self.state.step
        return self.state.step

    def end_step(self, loss: float, grad_norm: float, lr: float) -> None:
        """Record one optimizer step: history, TensorBoard, bar; a checkpoint every ``checkpoint_every`` steps and
        validation samples every ``validate_every`` steps."""
        s = self.state
        s.step += 1
        s.losses.append(loss)
        s.grad_norms.append(grad_norm)
        self.acc.log({"loss": loss, "grad_norm": grad_norm, "lr": lr}, step=s.step)
        self._t_last = time.perf_counter()
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.4g}", steps_per_s=f"{self.steps_per_second:.2f}")
        if s.step % self.cfg.checkpoint_every == 0:
            self.checkpoint()
        if self.cfg.validate_every > 0 and s.step % self.cfg.validate_every == 0:
            self.validate()

    def validate(self) -> None:
        """Validation samples of this step (main process; none without ``validation_prompts``)."""
        if self._validate is not None and self.acc.is_main_process and self.cfg.validation_prompts:
            self._validate(self.state.step)

    def checkpoint(self) -> Path:
        """``accelerator.save_state`` to ``checkpoints/step-NNNNNNNN``; keeps the newest ``checkpoints_keep``."""
        path = self.checkpoints / f"step-{self.state.step:08d}"
        if self._saved == self.state.step:  # decided in memory: every process must take the same branch
            return path
        self._saved = self.state.step
        self.acc.save_state(str(path))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            for old in sorted(self.checkpoints.glob("step-*"))[: -self.cfg.checkpoints_keep]:
                shutil.rmtree(old)
        return path

    @property
    def steps_per_second(self) -> float:
        return (self.state.step - self._s0) / max(self._t_last - self._t0, 1e-9)

    def finish(self, save: Callable[[], list[Path]]) -> TrainResult:
        """End the run after its loop. Stopped before ``max_steps`` (``stop_after``): a checkpoint and no output.
        Otherwise, on the main process, the final validation samples and ``save()`` (which writes the outputs and
        returns their paths). Then close the bar and trackers and plot ``loss.png``."""
        finished, outputs = self.state.step >= self.cfg.max_steps, []
        if not finished:
            self.checkpoint()
        else:
            if self.acc.is_main_process:
                self.validate()
                outputs = list(save())
            self.acc.wait_for_everyone()
        self._bar.close()
        if self.acc.is_main_process and self.state.losses:
            plot_losses(self.state.losses, self.dir / "loss.png", title=self.name)
        self.acc.end_training()
        return TrainResult(self.dir, outputs, self.state.step, finished, self.kind, list(self.state.losses),
                           list(self.state.grad_norms), self.steps_per_second)


def _flat(doc: dict, prefix: str = "") -> dict:
    """Nested config -> flat scalars for TensorBoard hparams (lists/None as strings)."""
    out = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def plot_losses(losses: list[float], path: Path, *, title: str) -> Path:
    """Loss per step and its running mean (window 10% of the run) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(losses) + 1)
    win = max(1, len(losses) // 10)
    smooth = [sum(losses[max(0, i - win + 1): i + 1]) / len(losses[max(0, i - win + 1): i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, alpha=0.35 if win > 1 else 1.0, label="loss")
    if win > 1:
        ax.plot(steps, smooth, label=f"mean of the last {win} steps")
    ax.set(xlabel="step", ylabel="loss", title=title)
    if min(losses) > 0 and max(losses) / min(losses) > 50:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_gif(frames, path: Path, fps: int = 8) -> Path:
    """Write PIL images or uint8 arrays as a looping GIF."""
    import imageio.v3 as iio
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in frames]),
                duration=math.ceil(1000 / fps), loop=0)
    return path


@torch.no_grad()
def validation_images(cfg, accelerator, unet, models: BaseModels, step: int, *, sampler: str, steps: int,
                      guidance: float) -> Path:
    """One image per validation prompt from a StableDiffusionPipeline around the live ``unet``, with ``weightlab
    generate``'s scheduler settings for ``sampler`` under the run's schedule; written as ``samples/step-N.gif``."""
    from diffusers import StableDiffusionPipeline

    unet = accelerator.unwrap_model(unet)
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=unet, scheduler=make_scheduler(sampler, models.scheduler_config, models.schedule),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet.eval()
    with accelerator.autocast():
        images = [pipe(p, num_inference_steps=steps, guidance_scale=guidance, height=cfg.data.resolution,
                       width=cfg.data.resolution, generator=torch.Generator().manual_seed(cfg.seed)).images[0]
                  for p in cfg.validation_prompts]
    unet.train()
    return write_gif(images, Path(cfg.output_dir) / "samples" / f"step-{step:08d}.gif", fps=1)


@torch.no_grad()
def validation_videos(cfg, accelerator, unet, models: BaseModels, step: int, *, sampler: str, steps: int,
                      guidance: float) -> list[Path]:
    """One clip per validation prompt from an AnimateDiffPipeline around the live ``unet`` (a UNetMotionModel),
    with ``weightlab generate``'s scheduler settings for ``sampler`` under the run's schedule; written as
    ``samples/step-N-i.gif``."""
    from diffusers import AnimateDiffPipeline

    unet = accelerator.unwrap_model(unet)
    pipe = AnimateDiffPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=unet,
                               motion_adapter=None,
                               scheduler=make_scheduler(sampler, models.scheduler_config, models.schedule))
    pipe.set_progress_bar_config(disable=True)
    unet.eval()
    paths = []
    with accelerator.autocast():
        for i, prompt in enumerate(cfg.validation_prompts):
            frames = pipe(prompt, num_frames=cfg.data.num_frames, num_inference_steps=steps, guidance_scale=guidance,
                          height=cfg.data.resolution, width=cfg.data.resolution,
                          generator=torch.Generator().manual_seed(cfg.seed)).frames[0]
            paths.append(write_gif(frames, Path(cfg.output_dir) / "samples" / f"step-{step:08d}-{i}.gif"))
    unet.train()
    return paths
