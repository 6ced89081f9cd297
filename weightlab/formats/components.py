"""The components of a diffusers pipeline that residuals change, in one table: name -> model class, weights file and
the key prefixes that mark the component in each on-disk layout. A component's name is also its pipeline subfolder
and its name in a recipe term's ``components``. Adding a component is adding a row.

Keys inside a component are its model's ``state_dict`` names without ``strip`` (transformers 4 nests a CLIP text
model's parameters in ``text_model.``, 5 does not for ``CLIPTextModel``), so every version's files compare equal.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    """One pipeline component.

    Args:
        name (str): ``unet``, ``text_encoder``, ``text_encoder_2``, ``vae``; the pipeline's subfolder.
        model_class (str): ``"library:Class"`` of the model it is.
        weights_file (str): the weights file in its folder, as ``save_pretrained`` names it.
        adapter_prefixes (tuple[str, ...]): prefixes of its adapter keys, the dotted one (diffusers/PEFT
            ``text_encoder.``) first, then kohya's (``lora_te_``); empty for the UNet (every other adapter key) and for
            a component no adapter targets.
        ldm_prefixes (tuple[str, ...]): prefixes of its keys in a single-file LDM checkpoint.
        strip (str): the prefix its parameter names are used without.
    """

    name: str
    model_class: str
    weights_file: str
    adapter_prefixes: tuple[str, ...] = ()
    ldm_prefixes: tuple[str, ...] = ()
    strip: str = ""

    def model_type(self):
        """The model class (``CLIPTextModel``, ``AutoencoderKL``, ...)."""
        library, cls = self.model_class.split(":")
        return getattr(importlib.import_module(library), cls)

    def names(self, keys) -> dict[str, str]:
        """Component key (without ``strip``) -> the key as stored or in the model's ``state_dict``."""
        return {k.removeprefix(self.strip): k for k in keys}


COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component("unet", "diffusers:UNet2DConditionModel", "diffusion_pytorch_model.safetensors",
              ldm_prefixes=("model.diffusion_model.",)),
    Component("text_encoder", "transformers:CLIPTextModel", "model.safetensors",
              adapter_prefixes=("text_encoder.", "lora_te_", "lora_te1_", "te."),
              ldm_prefixes=("cond_stage_model.transformer.", "cond_stage_model.model.",
                            "conditioner.embedders.0.transformer."), strip="text_model."),
    Component("text_encoder_2", "transformers:CLIPTextModelWithProjection", "model.safetensors",
              adapter_prefixes=("text_encoder_2.", "lora_te2_"), ldm_prefixes=("conditioner.embedders.1.model.",),
              strip="text_model."),
    Component("vae", "diffusers:AutoencoderKL", "diffusion_pytorch_model.safetensors",
              ldm_prefixes=("first_stage_model.",)),
)}
NAMES = tuple(COMPONENTS)  # a recipe term's `components` values


def of_adapter_key(key: str) -> str:
    """The component an adapter key belongs to (the UNet unless another component's prefix marks it)."""
    return next((c.name for c in COMPONENTS.values() if c.adapter_prefixes and key.startswith(c.adapter_prefixes)),
                "unet")
