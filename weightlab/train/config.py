"""Typed trainer configs (pydantic v2), one class per trainer, read from and written to YAML.

Every field has a default except the paths a run cannot guess. Unknown keys are refused, so a typo in a
YAML file fails before any model is loaded.

Example:
    >>> cfg = ImageLCMConfig(base="base/", output_dir="runs/lcm", data=DataConfig(format="synthetic_images"))
    >>> cfg.rank, cfg.num_ddim_timesteps, cfg.huber_c
    (64, 50, 0.001)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from weightlab.errors import WeightlabError, fmt_validation_errors
from weightlab.schedules import ANIMATELCM

# DESIGN.md "Trainers": the LCM-LoRA target list (diffusers train_lcm_distill_lora_sd_wds.py).
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
STYLE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# A tiny teacher in SD1.5's block layout (cross-attention down/up blocks around a plain lowest block): 1.5 M parameters
# with a 32-wide text encoder. in/out channels, cross_attention_dim and sample_size follow the base (see teacher.py).
TEACHER_UNET_CONFIG = dict(
    layers_per_block=1, block_out_channels=(32, 64, 64), attention_head_dim=8, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where samples come from and how they are shaped.

    ``format``: ``image_folder`` (images + ``metadata.jsonl`` or side-car ``.txt`` captions), ``video_folder``
    (videos + the same captions), ``video_csv`` (a CSV with ``video,caption`` and optional ``start_frame,end_frame``),
    ``synthetic_images`` / ``synthetic_videos`` (captioned moving shapes generated in memory, for tests and demos).
    """

    format: Literal["image_folder", "video_folder", "video_csv", "synthetic_images", "synthetic_videos"]
    path: Path | None = None
    resolution: int = Field(512, ge=8)
    num_frames: int = Field(16, ge=1, le=32)  # motion modules' positional table holds 32 frames
    frame_stride: int = Field(4, ge=1)
    synthetic_samples: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _needs_path(self):
        if not self.format.startswith("synthetic") and self.path is None:
            raise ValueError(f"data.format {self.format!r} reads files: set data.path")
        return self


class RegisterConfig(_Strict):
    """Register the trained output in a local registry (``trained_from`` lineage, the full config as metadata)."""

    name: str
    home: Path | None = None  # registry home; None uses $WEIGHTLAB_HOME (default ~/.weightlab)
    tags: tuple[str, ...] = ()


class TrainConfig(_Strict):
    """Fields shared by every trainer: paths, optimisation, systems and bookkeeping."""

    # input path field -> its role in the output's ``trained_from`` lineage
    INPUTS: ClassVar[dict[str, str]] = {"base": "base"}

    base: Path  # diffusers Stable Diffusion pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    output_dir: Path
    data: DataConfig
    seed: int = 0
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)  # per process; the global batch is batch_size x processes x accumulation
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    empty_caption_prob: float = Field(0.0, ge=0, le=1)
    # The noise schedule trained under (recorded in the output's metadata); None keeps the base's scheduler config.
    beta_schedule: Literal["linear", "scaled_linear"] | None = None
    beta_start: float | None = Field(None, gt=0, lt=1)
    beta_end: float | None = Field(None, gt=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    checkpoints_keep: int = Field(2, ge=1)
    resume: bool = True  # continue from the newest checkpoint in output_dir/checkpoints if there is one
    validate_every: int = Field(0, ge=0)  # 0: validate only at the end
    validation_prompts: tuple[str, ...] = ("a photo of a cat",)  # () turns validation samples off
    num_workers: int = Field(0, ge=0)
    register_as: RegisterConfig | None = None

    @model_validator(mode="after")
    def _beta_range(self):
        if self.beta_start is not None and self.beta_end is not None and self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must be below beta_end ({self.beta_end})")
        return self

    def inputs(self) -> list[tuple[str, Path]]:
        """``(role, path)`` of each input the run reads weights from (its lineage), in field order."""
        return [(role, getattr(self, f)) for f, role in self.INPUTS.items() if isinstance(getattr(self, f), Path)]

    def resolve_inputs(self, resolve: Callable[[str], Path]):
        """A copy whose input paths that do not exist are replaced by ``resolve(str(path))``.

        The trainers read paths only; an entry point passes a resolver for other names (the registry's for
        ``ns/name@version`` references, supplied by ``weightlab train``).
        """
        update = {f: Path(resolve(str(getattr(self, f)))) for f in self.INPUTS
                  if isinstance(getattr(self, f), Path) and not getattr(self, f).exists()}
        return self.model_copy(update=update) if update else self

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML (paths as strings); written to ``path`` when given."""
        text = yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


class StyleLoRAConfig(TrainConfig):
    """``style-lora``: ε-prediction LoRA fine-tune on images; optional min-SNR-γ loss weighting (Hang et al. 2023)."""

    rank: int = Field(16, ge=1)
    lora_alpha: float | None = None  # None: alpha = rank (scale 1)
    target_modules: tuple[str, ...] = STYLE_LORA_TARGETS
    snr_gamma: float | None = Field(None, gt=0)  # 5.0 is the paper's value
    validation_steps: int = Field(25, ge=1)
    validation_guidance: float = 7.5


class TeacherConfig(TrainConfig):
    """``teacher``: train a text-conditioned UNet from scratch (ε-prediction diffusion loss) on captioned images; the
    text encoder, VAE, tokenizer and noise schedule come from ``base``, whose own UNet is not used.

    ``unet_config``: ``UNet2DConditionModel`` arguments over :data:`TEACHER_UNET_CONFIG`.
    """

    unet_config: dict[str, Any] = {}
    learning_rate: float = Field(1e-3, gt=0)  # a from-scratch UNet, not a fine-tune
    empty_caption_prob: float = Field(0.1, ge=0, le=1)  # unconditional samples, for classifier-free guidance
    snr_gamma: float | None = Field(None, gt=0)
    validation_steps: int = Field(25, ge=1)
    validation_guidance: float = 7.5


class MotionModuleConfig(TrainConfig):
    """``motion-module``: the AnimateDiff stage. The base UNet is frozen; a motion module (``MotionAdapter`` layout)
    learns the ε-prediction loss on video clips.

    ``init_motion``: None starts a fresh module (``proj_out`` zero-initialised: the motion branch starts off) whose
    ``MotionAdapter`` config follows the base's block widths and layers, with ``motion_config`` over it; a path
    continues from that module.
    """

    INPUTS: ClassVar[dict[str, str]] = {"base": "base", "init_motion": "init"}

    init_motion: Path | None = None
    motion_config: dict[str, Any] = {}
    empty_caption_prob: float = Field(0.1, ge=0, le=1)
    snr_gamma: float | None = Field(None, gt=0)
    validation_steps: int = Field(25, ge=1)
    validation_guidance: float = 7.5

    @model_validator(mode="after")
    def _one_init(self):
        if self.init_motion is not None and self.motion_config:
            raise ValueError("motion_config describes a fresh module; init_motion brings its own config: set one of them")
        return self


class _DistillConfig(TrainConfig):
    """Latent consistency distillation (LCM §4; AnimateLCM): solver, guidance range, boundary scalings, loss.

    The schedule defaults to AnimateLCM's linear β 0.00085–0.012, the one the video model samples with, whatever the
    base was trained under (SD1.5: scaled_linear): a consistency model solves the ODE of the schedule it was
    distilled under, and every stage of one video model must share it (``weightlab.schedules``).
    """

    beta_schedule: Literal["linear", "scaled_linear"] | None = ANIMATELCM.beta_schedule
    beta_start: float | None = Field(ANIMATELCM.beta_start, gt=0, lt=1)
    beta_end: float | None = Field(ANIMATELCM.beta_end, gt=0, lt=1)
    w_min: float = 5.0
    w_max: float = 15.0
    num_ddim_timesteps: int = Field(50, ge=1)
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = Field(0.001, gt=0)

    @model_validator(mode="after")
    def _guidance_range(self):
        if self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must not exceed w_max ({self.w_max})")
        return self


class ImageLCMConfig(_DistillConfig):
    """``image-lcm``: distil the base into a spatial LCM-LoRA (target = the online net under no_grad)."""

    rank: int = Field(64, ge=1)
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] = LCM_LORA_TARGETS


class MotionLCMConfig(_DistillConfig):
    """``motion-lcm``: distil a motion module on video with the image LCM-LoRA frozen in the online model.

    ``teacher_motion`` is the motion module of the teacher (base + it, with CFG). ``init_motion`` starts the
    student: ``teacher`` (a copy of the teacher's module), ``new`` (fresh, ``proj_out`` zero-initialised) or a path.
    ``coupled``: the paper's ablation — no ``image_lora``; a fresh spatial LoRA (``rank``, ``lora_alpha``,
    ``target_modules``) is distilled on video together with the motion module, and both are output.
    """

    INPUTS: ClassVar[dict[str, str]] = {"base": "base", "image_lora": "image_accel", "teacher_motion": "teacher",
                                        "init_motion": "init"}

    image_lora: Path | None = None  # required unless coupled
    teacher_motion: Path
    init_motion: Literal["teacher", "new"] | Path = "teacher"
    ema_decay: float = Field(0.95, ge=0, lt=1)
    empty_caption_prob: float = Field(0.1, ge=0, le=1)
    coupled: bool = False
    rank: int = Field(64, ge=1)  # coupled mode: the spatial LoRA's
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] = LCM_LORA_TARGETS

    @model_validator(mode="after")
    def _image_lora_iff_decoupled(self):
        if self.coupled and self.image_lora is not None:
            raise ValueError("coupled mode trains its own spatial LoRA: drop image_lora (or set coupled: false)")
        if not self.coupled and self.image_lora is None:
            raise ValueError("image_lora is required (the image-lcm output) unless coupled: true")
        return self


# CLI name (``weightlab train NAME``) -> config class
CONFIGS: dict[str, type[TrainConfig]] = {"teacher": TeacherConfig, "motion-module": MotionModuleConfig,
                                         "style-lora": StyleLoRAConfig, "image-lcm": ImageLCMConfig,
                                         "motion-lcm": MotionLCMConfig}
C = TypeVar("C", bound=TrainConfig)


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read a YAML (or JSON) config file into ``cls``.

    Raises:
        WeightlabError: the file is missing, not a mapping, or a field is unknown or invalid (all problems listed).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightlabError(f"{path}: no such config file. Fix: pass --config with a YAML file (see docs/training.md).")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        raise WeightlabError(f"{path}: a config must be a YAML mapping of field: value, got {type(doc).__name__}.")
    try:
        return cls.model_validate(doc)
    except ValidationError as e:
        raise WeightlabError(f"{path}: invalid {cls.__name__}: {fmt_validation_errors(e.errors(), '(top)')}. Fix: correct these fields "
                             f"(the fields of {cls.__name__} are listed in docs/training.md).") from None
