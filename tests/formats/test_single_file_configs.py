"""The family configs shipped in ``weightlab/configs/<family>/`` (what a single-file checkpoint is built with, offline)
are diffusers' own: its single-file config makers (``create_unet_diffusers_config_from_ldm``,
``create_vae_diffusers_config_from_ldm``) applied to the original LDM configs (``v1-inference.yaml``,
``v2-inference-v.yaml``, ``sd_xl_base.yaml``, written below), the text encoders' published configs (CLIP ViT-L/14;
SD2's OpenCLIP-H as diffusers loads it: 23 of its 24 layers; SDXL's CLIP ViT-L/14 and OpenCLIP-bigG with its
projection, as stabilityai/stable-diffusion-xl-base-1.0 ships them), and the schedulers and pipeline indexes the SD1.5,
SD2.1 and SDXL-base repositories ship. Full-size models built from them (on the meta device) have exactly the
parameters diffusers' converters make of an LDM checkpoint.
"""

import json

import pytest
import torch

from weightlab.families import FAMILIES, unet_shapes_for
from weightlab.formats import single_file
from weightlab.testing import SD2_SCHEDULER, SD15_SCHEDULER, SDXL_SCHEDULER

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
    "sdxl": {"model": {"params": {"scale_factor": 0.13025,
                                  "network_config": {"params": {
                                      "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4,
                                      "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2],
                                      "num_res_blocks": 2, "channel_mult": [1, 2, 4], "num_head_channels": 64,
                                      "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
                                      "context_dim": 2048}},
                                  "first_stage_config": {"params": _VAE}}}},
}
IMAGE_SIZE = {"sd15": 512, "sd2": 768, "sdxl": 1024}
_CLIP = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
         "max_position_embeddings": 77, "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
_CLIP_L = dict(_CLIP, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, hidden_act="quick_gelu")
TEXT_ENCODERS = {  # component -> config, per family
    "sd15": {"text_encoder": _CLIP_L},
    "sd2": {"text_encoder": dict(_CLIP, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                 num_attention_heads=16, projection_dim=512, hidden_act="gelu")},
    "sdxl": {"text_encoder": _CLIP_L,
             "text_encoder_2": dict(_CLIP, architectures=["CLIPTextModelWithProjection"], hidden_size=1280,
                                    intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                    projection_dim=1280, hidden_act="gelu")},
}
# Each text encoder's single-file prefix (the keys diffusers' from_single_file detects each family by).
PREFIXES = {"sd15": {"text_encoder": "cond_stage_model.transformer."}, "sd2": {"text_encoder": "cond_stage_model.model."},
            "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."}}
SCHEDULERS = {"sd15": SD15_SCHEDULER, "sd2": SD2_SCHEDULER, "sdxl": SDXL_SCHEDULER}
_COMMON_INDEX = {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
MODEL_INDEX = {
    "sd15": dict(_COMMON_INDEX, _class_name="StableDiffusionPipeline", feature_extractor=[None, None],
                 safety_checker=[None, None], requires_safety_checker=False),
    "sdxl": dict(_COMMON_INDEX, _class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                 text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer_2=["transformers", "CLIPTokenizer"]),
}
MODEL_INDEX["sd2"] = MODEL_INDEX["sd15"]


def _shipped(family: str, name: str) -> dict:
    return json.loads((single_file.config_dir(family) / name).read_text())


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_shipped_configs_are_diffusers_own(family):
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    size = IMAGE_SIZE[family]
    with pytest.warns(FutureWarning):  # diffusers deprecates image_size= (it would read it off a real checkpoint)
        unet = create_unet_diffusers_config_from_ldm(ORIGINAL[family], {}, image_size=size)
        vae = create_vae_diffusers_config_from_ldm(ORIGINAL[family], {}, image_size=size)
    assert _shipped(family, "unet/config.json") == json.loads(json.dumps(dict(_class_name="UNet2DConditionModel", **unet)))
    assert _shipped(family, "vae/config.json") == json.loads(json.dumps(dict(_class_name="AutoencoderKL", **vae)))
    for component, config in TEXT_ENCODERS[family].items():
        assert _shipped(family, f"{component}/config.json") == config
    assert _shipped(family, "scheduler/scheduler_config.json") == SCHEDULERS[family]
    assert _shipped(family, "model_index.json") == dict(MODEL_INDEX[family],
                                                        scheduler=["diffusers", SCHEDULERS[family]["_class_name"]])
    # The shipped UNet config is the family's: same parameters, same shapes.
    assert unet_shapes_for(_shipped(family, "unet/config.json")) == FAMILIES[family].unet_shapes


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_full_size_components_convert_key_for_key(family):
    """A full-size LDM checkpoint's text encoder(s) and VAE (meta tensors; the shipped configs' models written in LDM
    names by `single_file.text_encoder_to_ldm`/`vae_to_ldm`) convert with diffusers' converters to exactly those
    models' parameters (SDXL's text_encoder_2 with its text_projection), and our checks accept them: the writers
    invert diffusers' readers key for key."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    with torch.device("meta"):
        models = {c: classes[c](CLIPTextConfig(**_shipped(family, f"{c}/config.json"))).state_dict()
                  for c in PREFIXES[family]}
        models["vae"] = AutoencoderKL.from_config(_shipped(family, "vae/config.json")).state_dict()
    ldm = {k: v for c, prefix in PREFIXES[family].items()
           for k, v in single_file.text_encoder_to_ldm(models[c], prefix=prefix).items()}
    components = single_file.convert_components({**ldm, **single_file.vae_to_ldm(models["vae"])}, family,
                                                source="full-size")
    assert components.keys() == models.keys()
    for name, state in models.items():
        assert {k: v.shape for k, v in components[name].items()} == {k: v.shape for k, v in state.items()}, name
    if family == "sdxl":  # OpenCLIP-bigG's projection is kept, as text_encoder_2's
        assert components["text_encoder_2"]["text_projection.weight"].shape == (1280, 1280)
