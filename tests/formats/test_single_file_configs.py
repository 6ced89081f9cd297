"""The family configs shipped in ``weightlab/configs/<family>/`` (what a single-file checkpoint is built with, offline)
are diffusers' own: its single-file config makers (``create_unet_diffusers_config_from_ldm``,
``create_vae_diffusers_config_from_ldm``) applied to the original LDM configs (``v1-inference.yaml``,
``v2-inference-v.yaml``, written below), the text encoders' published configs (CLIP ViT-L/14; SD2's OpenCLIP-H as
diffusers loads it: 23 of its 24 layers), and the schedulers the SD1.5 and SD2.1 repositories ship. Full-size models
built from them (on the meta device) have exactly the parameters diffusers' converters make of an LDM checkpoint.
"""

import json

import pytest
import torch

from weightlab.families import FAMILIES, unet_shapes_for
from weightlab.formats import single_file
from weightlab.testing import SD2_SCHEDULER, SD15_SCHEDULER

_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                                     "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                                     "dropout": 0.0}}
_UNET = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
         "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "transformer_depth": 1, "legacy": False}
ORIGINAL = {  # the LDM configs' model.params that diffusers reads
    "sd15": {"model": {"params": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
                                  "unet_config": {"params": dict(_UNET, num_heads=8, context_dim=768)},
                                  "first_stage_config": {"params": _VAE}}}},
    "sd2": {"model": {"params": {"parameterization": "v", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
                                 "scale_factor": 0.18215,
                                 "unet_config": {"params": dict(_UNET, num_head_channels=64, use_linear_in_transformer=True,
                                                                context_dim=1024)},
                                 "first_stage_config": {"params": _VAE}}}},
}
IMAGE_SIZE = {"sd15": 512, "sd2": 768}
_CLIP = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
         "max_position_embeddings": 77, "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
TEXT_ENCODERS = {
    "sd15": dict(_CLIP, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=768, hidden_act="quick_gelu"),
    "sd2": dict(_CLIP, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                projection_dim=512, hidden_act="gelu"),
}
SCHEDULERS = {"sd15": SD15_SCHEDULER, "sd2": SD2_SCHEDULER}
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
               "requires_safety_checker": False, "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}


def _shipped(family: str, name: str) -> dict:
    return json.loads((single_file.config_dir(family) / name).read_text())


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_shipped_configs_are_diffusers_own(family):
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    size = IMAGE_SIZE[family]
    with pytest.warns(FutureWarning):  # diffusers deprecates image_size= (it would read it off a real checkpoint)
        unet = create_unet_diffusers_config_from_ldm(ORIGINAL[family], {}, image_size=size)
        vae = create_vae_diffusers_config_from_ldm(ORIGINAL[family], {}, image_size=size)
    assert _shipped(family, "unet/config.json") == json.loads(json.dumps(dict(_class_name="UNet2DConditionModel", **unet)))
    assert _shipped(family, "vae/config.json") == json.loads(json.dumps(dict(_class_name="AutoencoderKL", **vae)))
    assert _shipped(family, "text_encoder/config.json") == TEXT_ENCODERS[family]
    assert _shipped(family, "scheduler/scheduler_config.json") == SCHEDULERS[family]
    assert _shipped(family, "model_index.json") == dict(MODEL_INDEX, scheduler=["diffusers", SCHEDULERS[family]["_class_name"]])
    # The shipped UNet config is the family's: same parameters, same shapes.
    assert unet_shapes_for(_shipped(family, "unet/config.json")) == FAMILIES[family].unet_shapes


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_full_size_components_convert_key_for_key(family):
    """A full-size LDM checkpoint's text encoder and VAE (meta tensors; the shipped configs' models written in LDM
    names by `single_file.text_encoder_to_ldm`/`vae_to_ldm`) convert with diffusers' converters to exactly those
    models' parameters, and our checks accept them: the writers invert diffusers' readers key for key."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig(**_shipped(family, "text_encoder/config.json"))).state_dict()
        vae = AutoencoderKL.from_config(_shipped(family, "vae/config.json")).state_dict()
    ldm = {**single_file.text_encoder_to_ldm(te, open_clip=family == "sd2"), **single_file.vae_to_ldm(vae)}
    components = single_file.convert_components(ldm, family, source="full-size")
    assert {k: v.shape for k, v in components["text_encoder"].items()} == {k: v.shape for k, v in te.items()}
    assert {k: v.shape for k, v in components["vae"].items()} == {k: v.shape for k, v in vae.items()}
