"""Validate before mutating: a bad term raises and leaves every weight unchanged."""

import pytest
import torch

from weightlab import Recipe, Term, load
from weightlab.errors import (FamilyMismatchError, NonFiniteError, RecipeError, ShapeMismatchError,
                              UnmatchedKeysError, WeightlabError)
from weightlab.files import save_tensors
from weightlab.merge import Input, Merger, _model_for
from weightlab.residuals import LoRA, LoRATarget

from weightlab.files import state_dict_hash


def state_hash(model):
    return state_dict_hash(model.state_dict())


@pytest.fixture()
def live(tiny):
    base = load(tiny.base_dir)
    motion = load(tiny.motion_dir)
    model = _model_for(base, motion, device="cpu")
    Merger(model, base, [Input(motion, "motion", 1.0, "m")]).load_all()
    return base, motion, model


def _lora(path, module, down, up):
    return Input(LoRA(targets={module: LoRATarget(down, up)}, kind="style", source=path), "style", 1.0, str(path))


def test_bad_terms_raise_and_change_nothing(tiny, live):
    base, motion, model = live
    good = Input(load(tiny.style_lora_kohya), "style", 1.0, "good")
    mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    out_f, in_f = model.state_dict()[mod + ".weight"].shape
    nan_down = torch.randn(4, in_f)
    nan_down[0, 0] = float("nan")
    bad_terms = {
        NonFiniteError: _lora("nan", mod, nan_down, torch.randn(out_f, 4)),
        ShapeMismatchError: _lora("shape", mod, torch.randn(4, in_f + 1), torch.randn(out_f, 4)),
        UnmatchedKeysError: _lora("unknown", "down_blocks.0.attentions.0.not_a_module", torch.randn(4, 2), torch.randn(2, 4)),
        FamilyMismatchError: Input(LoRA(family="sdxl", kind="style", targets={mod: LoRATarget(torch.randn(4, in_f), torch.randn(out_f, 4))}), "style", 1.0, "xl"),
        RecipeError: Input(motion, "style", 1.0, "motion-as-style"),
    }
    before = state_hash(model)
    for err, bad in bad_terms.items():
        with pytest.raises(err):
            Merger(model, base, [Input(motion, "motion", 1.0, "m"), good, bad]).apply()
        assert state_hash(model) == before, err


def test_wrong_family_file_and_unknown_keys_name_the_keys(tiny, tmp_path):
    sdxl_key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"
    save_tensors({f"{sdxl_key}.lora_down.weight": torch.randn(4, 640), f"{sdxl_key}.lora_up.weight": torch.randn(640, 4)},
                 tmp_path / "xl.safetensors")
    from weightlab.merge import build_unet

    # it loads as sdxl (its key exists in no sd15 module); the merge refuses it, naming the key
    with pytest.raises(FamilyMismatchError, match=r"'sdxl'.*'sd15'.*transformer_blocks\.1"):
        build_unet(Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tmp_path / "xl.safetensors"), kind="style")]))


def test_recipe_round_trip_and_errors(tiny, tmp_path):
    r = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tiny.accel_lora), kind="image_accel", scale=0.5)],
               method="dare", method_args={"density": 0.5, "seed": 3}, dtype="float16")
    for name in ("r.yaml", "r.json"):
        assert Recipe.from_file(r.save(tmp_path / name)) == r
    assert r.with_scale(0, 0.6).hash != r.hash
    with pytest.raises(WeightlabError):
        Recipe.from_dict({"base": "x", "terms": [{"source": "y", "kind": "nope"}]})
    with pytest.raises(WeightlabError, match="did you mean"):
        from weightlab.methods import get_method
        get_method("tie")


def test_one_kind_vocabulary_for_recipes_engine_and_registry():
    """Kinds are defined once (`weightlab.kinds`): a recipe term takes exactly the engine's term kinds, and the
    registry stores those plus ``base`` and ``onnx``."""
    from typing import get_args

    from weightlab.kinds import ARTIFACT_KINDS, KINDS, TERM_KINDS
    from weightlab.merge import TERM_TYPES
    from weightlab.registry.schemas import Kind

    assert tuple(TERM_TYPES) == TERM_KINDS and KINDS == ("base", *TERM_KINDS)
    assert get_args(Kind) == ARTIFACT_KINDS == (*KINDS, "onnx")
    for kind in TERM_KINDS:
        assert Recipe(base="b", terms=[Term(source="s", kind=kind)]).terms[0].kind == kind
    with pytest.raises(RecipeError, match="kind"):
        Recipe.from_dict({"base": "b", "terms": [{"source": "s", "kind": "base"}]})
