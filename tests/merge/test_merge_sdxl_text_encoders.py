"""SDXL's two text encoders: a style LoRA's ``text_encoder.*``/``lora_te1_*`` half is composed into the pipeline's
``CLIPTextModel`` and its ``text_encoder_2.*``/``lora_te2_*`` half into its ``CLIPTextModelWithProjection`` (issue 13,
"Components"), on the tiny SDXL pipeline of `weightlab.testing`.

Reference kind: diffusers' own ``StableDiffusionXLPipeline.load_lora_weights`` + ``fuse_lora`` of a file its
``save_lora_weights(..., text_encoder_lora_layers=..., text_encoder_2_lora_layers=...)`` wrote from PEFT layers
(``get_peft_model_state_dict``), each component with its own ``lora_alpha != r`` in ``lora_adapter_metadata``; and
the same factors under kohya's SDXL names with ``.alpha`` keys. Tolerance 1e-6 relative to each weight's largest
magnitude (fp32): diffusers adds ``scale · B @ A`` to the fp32 weight (two roundings), we accumulate in fp32 and
round once; the two differ by a few fp32 ULPs (~1e-7).
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlab
from weightlab import Recipe, Term
from weightlab.errors import MissingComponentError
from weightlab.merge import build_component, merge_to_folder
from weightlab.testing import KOHYA_PREFIXES, build_tiny_variant, diffusers_lora_to_kohya, max_rel_error, with_peft_lora

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
OPTIONS = {"unet": dict(r=4, lora_alpha=6), "text_encoder": dict(r=4, lora_alpha=8), "text_encoder_2": dict(r=2, lora_alpha=3)}
TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": TE_TARGETS, "text_encoder_2": TE_TARGETS}
SCALE = 0.7
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors",
           "text_encoder_2": "text_encoder_2/model.safetensors"}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_tiny_variant("sdxl", tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def style(sdxl, tmp_path_factory):
    """A style LoRA for the UNet and both text encoders, written by diffusers' SDXL ``save_lora_weights``."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    layers, metadata = {}, {}
    for i, c in enumerate(OPTIONS):
        model, config = with_peft_lora(getattr(pipe, c), TARGETS[c], seed=i, **OPTIONS[c])
        layers[f"{c}_lora_layers"] = get_peft_model_state_dict(model)
        metadata[f"{c}_lora_adapter_metadata"] = config.to_dict()
    folder = tmp_path_factory.mktemp("sdxl_style")
    StableDiffusionXLPipeline.save_lora_weights(folder, **layers, **metadata)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def fused(sdxl, style):
    """diffusers' own merged SDXL pipeline: load_lora_weights + fuse_lora on the UNet and both text encoders."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.load_lora_weights(str(style))
    pipe.fuse_lora(components=list(OPTIONS), lora_scale=SCALE)
    pipe.unload_lora_weights()
    return pipe


def _kohya(style, tmp_path):
    """The same factors under kohya's SDXL names (``lora_te1_``, ``lora_te2_``), the metadata's alphas as keys."""
    sd = diffusers_lora_to_kohya(load_file(style), lambda component, module: OPTIONS[component]["lora_alpha"],
                                 prefixes=dict(KOHYA_PREFIXES, text_encoder="lora_te1_"))
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in sd)
    save_file(sd, tmp_path / "kohya.safetensors")
    return tmp_path / "kohya.safetensors"


def _recipe(base, source, **term):
    return Recipe(base=str(base), terms=[Term(source=str(source), kind="style", scale=SCALE, **term)])


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_both_text_encoders_match_fuse_lora(sdxl, style, fused, tmp_path, layout):
    source = style if layout == "diffusers" else _kohya(style, tmp_path)
    lora = weightlab.load(source)
    assert lora.family == "sdxl" and lora.skipped == []
    assert lora.components == ["unet", "text_encoder", "text_encoder_2"]
    merge_to_folder(_recipe(sdxl, source), tmp_path / "merged", progress=False)
    for c, name in WEIGHTS.items():
        ours = load_file(tmp_path / "merged" / name)
        ref = getattr(fused, c).state_dict()
        assert ref.keys() == ours.keys(), c
        base = load_file(sdxl / ("unet/" if c == "unet" else "") / name)
        assert max_rel_error(ref, {k: base[k] for k in ref}) > 0.05, c  # diffusers did change the component
        assert max_rel_error(ref, ours) <= 1e-6, c
    # The in-memory composition is the same arithmetic: bit-identical.
    model = build_component(_recipe(sdxl, source), "text_encoder_2")
    assert type(model).__name__ == "CLIPTextModelWithProjection"
    ours = load_file(tmp_path / "merged" / WEIGHTS["text_encoder_2"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.items())


def test_second_text_encoder_into_a_base_without_one_is_refused(tiny, style, tmp_path):
    """Only its text_encoder_2 half (the UNet half would be refused by family), into the SD1.5 pipeline."""
    with pytest.raises(MissingComponentError, match=r"change\(s\) the text_encoder_2, but the base .* has none.*Fix"):
        merge_to_folder(_recipe(tiny.base_dir, style, components=["text_encoder_2"]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
