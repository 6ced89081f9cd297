"""Any UNet config: SD2.x-, SDXL- and distilled-SD1.5-shaped bases load from their own config and merge exactly.

References no one here wrote: diffusers builds each UNet from its ``config.json`` (the parameter set a base must
hold), diffusers' single-file converter reads the LDM layout, PEFT's ``merge_and_unload`` merges the LoRA it made
on that UNet (saved by PEFT's ``save_pretrained`` and by diffusers' ``save_lora_weights`` with the adapter's
options as metadata). The LCM-LoRA-SDXL-shaped case is checked against its definition in float64.

Tolerance 1e-6 relative to each weight's largest magnitude (fp32): PEFT adds ``scaling · B @ A`` to the fp32
weight (two roundings), we accumulate in fp32 and round once; the two differ by a few fp32 ULPs (~1e-7).
"""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import weightlab
from weightlab import Recipe, Term
from weightlab.errors import FamilyMismatchError, ShapeMismatchError
from weightlab.families import FAMILIES, infer_unet_config, unet_shapes_for
from weightlab.formats.ldm import convert_ldm_unet, diffusers_to_ldm
from weightlab.merge import build_unet, merge_to_file
from weightlab.residuals import Base
from weightlab.testing import (LCM_LORA_TARGETS, TINY_VARIANTS, build_tiny_variant, lora_to_kohya, make_lora,
                               max_rel_error)

# linear and conv targets; proj_in is linear in sd2/sdxl; add_embedding exists only in sdxl
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2",
           "add_embedding.linear_1"]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {name: build_tiny_variant(name, root) for name in TINY_VARIANTS}


def _unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder / "unet")


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_config_inferred_from_full_size_weights(family):
    """Reference: the real full-size configs; the inferred config builds exactly the same parameters."""
    from diffusers import UNet2DConditionModel

    fam = FAMILIES[family]
    assert infer_unet_config(fam.unet_shapes) == fam.unet_config
    with torch.device("meta"):
        sd = UNet2DConditionModel(**fam.unet_config).state_dict()
    converted, config, skipped = convert_ldm_unet(diffusers_to_ldm(sd))  # diffusers' converter, key for key
    assert skipped == [] and config == fam.unet_config
    assert {k: tuple(v.shape) for k, v in converted.items()} == fam.unet_shapes


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_variant_base_loads_from_its_own_config(variants, tmp_path, name):
    config, scheduler, _, family = TINY_VARIANTS[name]
    base = weightlab.load(variants[name])
    stored = _unet(variants[name]).state_dict()
    assert type(base) is Base and base.family == family and base.pipeline_dir == variants[name]
    assert base.weights.keys() == stored.keys() and all(torch.equal(base.weights[k], v) for k, v in stored.items())
    assert unet_shapes_for(base.config) == {k: tuple(v.shape) for k, v in stored.items()}
    sched = json.loads((variants[name] / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == scheduler["prediction_type"]  # sd2: v-prediction, as SD2.x-768 ships
    # The single-file layout of the same UNet: config inferred from the weights, same tensors, same family.
    save_file(diffusers_to_ldm(stored), tmp_path / "single.safetensors")
    single = weightlab.load(tmp_path / "single.safetensors")
    assert single.family == family and single.skipped == []
    assert single.weights.keys() == stored.keys() and all(torch.equal(single.weights[k], v) for k, v in stored.items())
    assert unet_shapes_for(single.config) == unet_shapes_for(base.config)


def _peft_lora(unet, folder, pipeline: str, seed: int = 0) -> dict:
    """PEFT's LoRA on ``unet`` (lora_alpha != r), saved by PEFT and by diffusers; returns PEFT's merged weights."""
    import diffusers
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    present = [t for t in TARGETS if any(n.endswith("." + t) or n == t for n, _ in unet.named_modules())]
    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so every delta is live
    model = get_peft_model(copy.deepcopy(unet), LoraConfig(r=4, lora_alpha=6, target_modules=present,
                                                           init_lora_weights=False))
    model.save_pretrained(folder / "peft")
    layers = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    getattr(diffusers, pipeline).save_lora_weights(folder / "diffusers", unet_lora_layers=layers,
                                                   unet_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return model.merge_and_unload().state_dict()


PIPELINES = {"sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "distilled": "StableDiffusionPipeline"}


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_peft_lora_merges_like_merge_and_unload(variants, tmp_path, name):
    ref = _peft_lora(_unet(variants[name]), tmp_path, PIPELINES[name])
    for source in (tmp_path / "peft", tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"):
        lora = weightlab.load(source)
        assert lora.family == TINY_VARIANTS[name][3], source
        ours = build_unet(Recipe(base=str(variants[name]), terms=[Term(source=str(source), kind="style")]))
        assert max_rel_error(ref, ours.state_dict()) <= 1e-6, source


def test_lcm_lora_sdxl_shaped_merges_exactly(variants, tmp_path, kohya_delta64):
    """kohya keys over LCM-LoRA's targets (time_emb_proj, samplers, shortcuts, add_embedding-free) on the SDXL UNet,
    rank 12: detected as image_accel; reference: w0 + s·(alpha/rank)·up@down in float64."""
    unet = _unet(variants["sdxl"])
    sd = lora_to_kohya(make_lora(unet, LCM_LORA_TARGETS, rank=12, seed=7), alpha=6.0)
    save_file(sd, tmp_path / "lcm_lora_sdxl.safetensors")
    lora = weightlab.load(tmp_path / "lcm_lora_sdxl.safetensors")
    assert lora.family == "sdxl" and lora.kind == "image_accel" and lora.ranks == [12]
    scale = 0.9
    ours = build_unet(Recipe(base=str(variants["sdxl"]),
                             terms=[Term(source=str(tmp_path / "lcm_lora_sdxl.safetensors"), kind="image_accel", scale=scale)]))
    base = unet.state_dict()
    for key, w0 in base.items():
        delta = kohya_delta64(sd, key, w0.shape)
        want = w0.double() + (0 if delta is None else scale * delta)
        err = (ours.state_dict()[key].double() - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        assert err <= 1e-6, key


@pytest.fixture(scope="module")
def sdxl_lora(variants, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_lora")
    _peft_lora(_unet(variants["sdxl"]), folder, "StableDiffusionXLPipeline")
    return folder / "peft"


def test_sdxl_lora_into_sd15_base_is_refused(tiny, sdxl_lora, tmp_path):
    out = tmp_path / "merged.safetensors"
    recipe = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(sdxl_lora), kind="style")])
    with pytest.raises(FamilyMismatchError, match=r"family 'sdxl'.*base is family 'sd15'.*add_embedding.*Fix:"):
        merge_to_file(recipe, out, progress=False)
    assert not out.exists()


def test_sd15_lora_into_sdxl_base_is_refused(tiny, variants, tmp_path):
    out = tmp_path / "merged.safetensors"
    recipe = Recipe(base=str(variants["sdxl"]), terms=[Term(source=str(tiny.style_lora_kohya), kind="style")])
    with pytest.raises(FamilyMismatchError, match=r"family 'sd15'.*base is family 'sdxl'.*down_blocks\.0\.attentions.*Fix:"):
        merge_to_file(recipe, out, progress=False)
    assert not out.exists()


def test_sd15_lora_into_sd2_base_is_refused_by_rank_or_width(tiny, variants, tmp_path):
    """sd15 and sd2 share every module name: a 1x1-conv proj_in factor names the family; without one, the
    768- vs 1024-wide (here 32 vs 48) cross-attention tells them apart."""
    from safetensors.torch import load_file

    recipe = Recipe(base=str(variants["sd2"]), terms=[Term(source=str(tiny.style_lora_kohya), kind="style")])
    with pytest.raises(FamilyMismatchError, match=r"family 'sd15'.*base is family 'sd2'.*proj_in.*Fix:"):
        merge_to_file(recipe, tmp_path / "merged.safetensors", progress=False)
    attention = {k: v for k, v in load_file(tiny.style_lora_kohya).items() if "_attn" in k}
    save_file(attention, tmp_path / "attention.safetensors")
    recipe = Recipe(base=str(variants["sd2"]), terms=[Term(source=str(tmp_path / "attention.safetensors"), kind="style")])
    with pytest.raises(ShapeMismatchError, match=r"attn2\.to_k.*Fix:"):
        merge_to_file(recipe, tmp_path / "merged.safetensors", progress=False)
    assert not (tmp_path / "merged.safetensors").exists()


def test_sd2_lora_into_sd15_base_is_refused(tiny, variants, tmp_path):
    """Its linear proj_in/proj_out factors make it sd2; sd15 precedes sd2, so an sd15 base cannot take it."""
    _peft_lora(_unet(variants["sd2"]), tmp_path, "StableDiffusionPipeline")
    assert weightlab.load(tmp_path / "peft").family == "sd2"
    recipe = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tmp_path / "peft"), kind="style")])
    with pytest.raises(FamilyMismatchError, match=r"family 'sd2'.*base is family 'sd15'.*proj_in.*Fix:"):
        merge_to_file(recipe, tmp_path / "merged.safetensors", progress=False)
    assert not (tmp_path / "merged.safetensors").exists()
