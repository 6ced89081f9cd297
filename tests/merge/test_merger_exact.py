"""Exactness: pristine-base restore, re-weighting cycles, term order, streaming == in place."""

import random

import pytest
import torch

from weightlab import Recipe, Term, load
from weightlab.merge import Input, Merger, _model_for, build_unet, merge_to_file, merge_to_folder

from weightlab.files import state_dict_hash


def state_hash(model):
    return state_dict_hash(model.state_dict())


def _inputs(tiny):
    return [Input(load(tiny.style_lora_kohya), "style", 0.8, "style"),
            Input(load(tiny.accel_lora), "image_accel", 1.0, "accel"),
            Input(load(tiny.motion_dir), "motion", 1.0, "motion"),
            Input(load(tiny.motion_lora), "motion_lora", 0.6, "mlora")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_restore_is_bit_exact_after_100_reweighting_cycles(tiny, dtype):
    base = load(tiny.base_dir)
    inputs = _inputs(tiny)
    model = _model_for(base, inputs[2].residual, device="cpu").to(dtype)
    merger = Merger(model, base, inputs)
    merger.load_all()
    merger.restore()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    merger.apply()
    assert not all(torch.equal(pristine[k], v) for k, v in model.state_dict().items())
    merger.restore()
    assert all(torch.equal(pristine[k], v) for k, v in model.state_dict().items())
    rng = random.Random(0)
    merger.apply()
    for _ in range(100):
        merger.set_scale(rng.randrange(len(inputs)), rng.uniform(-1.5, 1.5))
    merger.restore()
    assert all(torch.equal(pristine[k], v) for k, v in model.state_dict().items())


def test_reweighting_equals_fresh_merge_and_touches_only_its_tensors(tiny):
    base = load(tiny.base_dir)
    inputs = _inputs(tiny)
    model = _model_for(base, inputs[2].residual, device="cpu").to(torch.float16)
    merger = Merger(model, base, inputs).load_all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merger.set_scale(1, 0.25)  # β
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and changed <= inputs[1].residual.target_keys
    fresh_inputs = _inputs(tiny)
    fresh_inputs[1].scale = 0.25
    fresh = _model_for(base, inputs[2].residual, device="cpu").to(torch.float16)
    Merger(fresh, base, fresh_inputs).load_all()
    assert state_hash(fresh) == state_hash(model)


def test_term_order_does_not_change_a_bit_and_stream_equals_in_place(tiny, tmp_path):
    terms = [Term(source=str(tiny.style_lora_kohya), kind="style", scale=0.8),
             Term(source=str(tiny.style_lora_peft), kind="style", scale=-0.3),
             Term(source=str(tiny.style_dense), kind="style", scale=0.5),
             Term(source=str(tiny.accel_lora), kind="image_accel", scale=1.0),
             Term(source=str(tiny.motion_animatelcm), kind="motion", scale=0.9),
             Term(source=str(tiny.motion_lora), kind="motion_lora", scale=0.5)]
    r1 = Recipe(base=str(tiny.base_ldm), terms=terms, dtype="bfloat16")
    r2 = Recipe(base=str(tiny.base_ldm), terms=list(reversed(terms)), dtype="bfloat16")
    assert r1.hash == r2.hash
    m1, m2 = build_unet(r1), build_unet(r2)
    assert state_hash(m1) == state_hash(m2)
    from safetensors.torch import load_file

    from weightlab.files import read_header, tensor_hash

    summary = merge_to_file(r2, tmp_path / "merged.safetensors", progress=False)
    streamed = load_file(tmp_path / "merged.safetensors")
    sd = m1.state_dict()
    assert set(streamed) == set(sd) and all(torch.equal(streamed[k], sd[k]) for k in sd)
    header = read_header(tmp_path / "merged.safetensors")
    assert header.metadata["weightlab.output_hash"] == summary["output_hash"] == tensor_hash(tmp_path / "merged.safetensors")
    assert Recipe.model_validate_json(header.metadata["weightlab.recipe"]).hash == r1.hash


def test_folder_output_loads_with_diffusers(tiny, tmp_path):
    from diffusers import UNet2DConditionModel, UNetMotionModel

    r = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tiny.accel_lora), kind="image_accel"),
                                                Term(source=str(tiny.motion_dir), kind="motion")])
    merge_to_folder(r, tmp_path / "video", progress=False)
    video = UNetMotionModel.from_pretrained(tmp_path / "video")
    assert state_hash(video) == state_hash(build_unet(r))
    spatial = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tiny.accel_lora), kind="image_accel")])
    merge_to_folder(spatial, tmp_path / "spatial", progress=False)
    assert isinstance(UNet2DConditionModel.from_pretrained(tmp_path / "spatial"), UNet2DConditionModel)


def test_kept_copy_merger_restores_a_live_diffusers_unet(tiny):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny.base_dir, subfolder="unet")
    before = state_hash(unet)
    merger = Merger(unet, None, [Input(load(tiny.style_lora_peft), "style", 1.0, "s")]).apply()
    assert state_hash(unet) != before
    merger.restore()
    assert state_hash(unet) == before
