"""Trainers for the three learned terms of Eq. 2 (AnimateLCM's decoupled recipe), each a short loop on accelerate.

    train_style_lora(StyleLoRAConfig)   -> τ_style         (ε-MSE LoRA on images)
    train_image_lcm(ImageLCMConfig)     -> τ_image_accel   (LCM-LoRA, consistency distillation on images)
    train_motion_lcm(MotionLCMConfig)   -> τ_motion        (motion module, consistency distillation on video)

The CLI is ``weightlab train style-lora|image-lcm|motion-lcm --config CFG.yaml``; configs are YAML files of the
config classes' fields (:func:`load_config`). See docs/training.md for multi-GPU (DDP, FSDP) runs.
"""

from weightlab.train.common import TrainResult
from weightlab.train.config import (
    DataConfig,
    ImageLCMConfig,
    MotionLCMConfig,
    RegisterConfig,
    StyleLoRAConfig,
    load_config,
)
from weightlab.train.image_lcm import train as train_image_lcm
from weightlab.train.motion_lcm import train as train_motion_lcm
from weightlab.train.style_lora import train as train_style_lora

# CLI name -> (config class, trainer)
TRAINERS = {
    "style-lora": (StyleLoRAConfig, train_style_lora),
    "image-lcm": (ImageLCMConfig, train_image_lcm),
    "motion-lcm": (MotionLCMConfig, train_motion_lcm),
}

__all__ = ["DataConfig", "ImageLCMConfig", "MotionLCMConfig", "RegisterConfig", "StyleLoRAConfig", "TRAINERS",
           "TrainResult", "load_config", "train_image_lcm", "train_motion_lcm", "train_style_lora"]
