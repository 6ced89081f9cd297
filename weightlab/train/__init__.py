"""Trainers for the learned terms of Eq. 2 (AnimateLCM's decoupled recipe) and the models they start from, each a
short loop on accelerate.

    train_teacher(TeacherConfig)             -> w0              (a small UNet from scratch, ε-MSE on images)
    train_motion_module(MotionModuleConfig)  -> a motion module (AnimateDiff stage, ε-MSE on video; a teacher's)
    train_style_lora(StyleLoRAConfig)        -> τ_style         (ε-MSE LoRA on images)
    train_image_lcm(ImageLCMConfig)          -> τ_image_accel   (LCM-LoRA, consistency distillation on images)
    train_motion_lcm(MotionLCMConfig)        -> τ_motion        (motion module, consistency distillation on video)

The CLI is ``weightlab train TRAINER --config CFG.yaml`` (TRAINER a key of :data:`TRAINERS`); configs are YAML files
of the config classes' fields (:func:`load_config`). See docs/training.md for multi-GPU (DDP, FSDP) runs.

The configs import no torch; the trainers (and ``TRAINERS``, ``TrainResult``) are imported on first use, so reading
a config — the CLI's help — stays light.
"""

import importlib

from weightlab.train.config import (
    CONFIGS,
    DataConfig,
    ImageLCMConfig,
    MotionLCMConfig,
    MotionModuleConfig,
    RegisterConfig,
    StyleLoRAConfig,
    TeacherConfig,
    load_config,
)

# train_<trainer> -> its module
_MODULES = {"train_teacher": "teacher", "train_motion_module": "motion_module", "train_style_lora": "style_lora",
            "train_image_lcm": "image_lcm", "train_motion_lcm": "motion_lcm"}


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"weightlab.train.{_MODULES[name]}").train
    if name == "TrainResult":
        return importlib.import_module("weightlab.train.common").TrainResult
    if name == "TRAINERS":  # CLI name -> (config class, trainer)
        return {cli: (cls, __getattr__("train_" + cli.replace("-", "_"))) for cli, cls in CONFIGS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CONFIGS", "DataConfig", "ImageLCMConfig", "MotionLCMConfig", "MotionModuleConfig", "RegisterConfig",
           "StyleLoRAConfig", "TRAINERS", "TeacherConfig", "TrainResult", "load_config", "train_image_lcm",
           "train_motion_lcm", "train_motion_module", "train_style_lora", "train_teacher"]
