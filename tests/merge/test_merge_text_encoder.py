"""The text-encoder half of a style LoRA is composed into the pipeline's text encoder (issue 13, "Components").

Reference kind: diffusers' own ``load_lora_weights`` + ``fuse_lora(components=["unet", "text_encoder"])`` of a file
its ``save_lora_weights`` wrote from PEFT layers (``get_peft_model_state_dict``), with ``lora_alpha != r`` and an
``alpha_pattern`` recorded in ``lora_adapter_metadata`` (so a misread alpha moves every targeted weight by tens of
percent), and the same factors renamed to kohya's ``lora_te_*``/``lora_unet_*`` keys with ``.alpha`` keys.
Tolerance 1e-6 relative to each weight's largest magnitude (fp32): diffusers adds ``scale · B @ A`` to the fp32
weight (two roundings), we accumulate in fp32 and round once; the two differ by a few fp32 ULPs (~1e-7).
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlab
from weightlab import Recipe, Term
from weightlab.errors import MissingComponentError, RecipeError, UnmatchedKeysError
from weightlab.merge import build_text_encoder, merge_to_folder
from weightlab.testing import diffusers_lora_to_kohya, max_rel_error, with_peft_lora

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FC2 = "encoder.layers.1.mlp.fc2"  # transformers 5's CLIPTextModel name (4: text_model.encoder...)
TE_OPTIONS = dict(r=4, lora_alpha=8, alpha_pattern={FC2: 2})
SCALE = 0.7


@pytest.fixture(scope="module")
def style(tiny, tmp_path_factory):
    """A style LoRA for the UNet and the text encoder, written by diffusers' ``save_lora_weights``."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    base = StableDiffusionPipeline.from_pretrained(tiny.base_dir)
    unet, unet_config = with_peft_lora(base.unet, UNET_TARGETS, seed=1, r=4, lora_alpha=6)
    te, te_config = with_peft_lora(base.text_encoder, TE_TARGETS, seed=2, **TE_OPTIONS)
    folder = tmp_path_factory.mktemp("te_style")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def fused(tiny, style):
    """diffusers' own merged pipeline: load_lora_weights + fuse_lora on the UNet and the text encoder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny.base_dir)
    pipe.load_lora_weights(str(style))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=SCALE)
    pipe.unload_lora_weights()
    return pipe


def _kohya(style, tmp_path):
    """The same factors under kohya's names (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``), with the
    alphas the metadata gives as ``.alpha`` keys."""
    def alpha(component, module):
        return 6.0 if component == "unet" else 2.0 if module.endswith(FC2) else 8.0

    save_file(diffusers_lora_to_kohya(load_file(style), alpha), tmp_path / "kohya.safetensors")
    return tmp_path / "kohya.safetensors"


def _recipe(tiny, source, **term):
    return Recipe(base=str(tiny.base_dir), terms=[Term(source=str(source), kind="style", scale=SCALE, **term)])


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_merged_text_encoder_matches_fuse_lora(tiny, style, fused, tmp_path, layout):
    source = style if layout == "diffusers" else _kohya(style, tmp_path)
    lora = weightlab.load(source)
    assert lora.components == ["unet", "text_encoder"] and lora.skipped == []
    merge_to_folder(_recipe(tiny, source), tmp_path / "merged", progress=False)
    ours = load_file(tmp_path / "merged" / "text_encoder" / "model.safetensors")
    ref = {k: v for k, v in fused.text_encoder.state_dict().items() if k in ours}
    assert ref.keys() == ours.keys()
    base = load_file(tiny.base_dir / "text_encoder" / "model.safetensors")
    assert max_rel_error(ref, {k: base[k] for k in ref}) > 0.05  # diffusers did change the text encoder
    assert max_rel_error(ref, ours) <= 1e-6
    unet = load_file(tmp_path / "merged" / "diffusion_pytorch_model.safetensors")
    assert max_rel_error(fused.unet.state_dict(), unet) <= 1e-6
    # The in-memory composition (weightlab generate from a recipe) is the same arithmetic: bit-identical.
    model = build_text_encoder(_recipe(tiny, source))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.items())


def test_video_pipeline_uses_the_merged_text_encoder(tiny, style, tmp_path):
    from weightlab.video import merged_component

    merge_to_folder(_recipe(tiny, style), tmp_path / "merged", progress=False)
    ours = load_file(tmp_path / "merged" / "text_encoder" / "model.safetensors")
    for source in (tmp_path / "merged", _recipe(tiny, style)):
        model = merged_component(source, "text_encoder", dtype=torch.float32, device="cpu")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.items())
    assert merged_component(Recipe(base=str(tiny.base_dir)), "text_encoder", dtype=torch.float32, device="cpu") is None


def test_components_select_what_a_term_touches(tiny, style, tmp_path):
    base_te = load_file(tiny.base_dir / "text_encoder" / "model.safetensors")
    base_unet = load_file(tiny.base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    # UNet only: no text encoder is written (a previous merge's is removed), so the pipeline keeps the base's.
    merge_to_folder(_recipe(tiny, style), tmp_path / "unet_only", progress=False)
    merge_to_folder(_recipe(tiny, style, components=["unet"]), tmp_path / "unet_only", progress=False)
    assert not (tmp_path / "unet_only" / "text_encoder").exists()
    assert build_text_encoder(_recipe(tiny, style, components=["unet"])) is None
    # Text encoder only: the UNet is the base's, bit for bit; untouched text-encoder weights are copies.
    merge_to_folder(_recipe(tiny, style, components=["text_encoder"]), tmp_path / "te_only", progress=False)
    unet = load_file(tmp_path / "te_only" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet[k], v) for k, v in base_unet.items())
    te = load_file(tmp_path / "te_only" / "text_encoder" / "model.safetensors")
    changed = {k for k in te if not torch.equal(te[k], base_te[k])}
    assert changed == {f"{p}.weight" for p in weightlab.load(style).others["text_encoder"]}
    # A component the residual does not carry is refused, and nothing is written.
    with pytest.raises(RecipeError, match="text_encoder.*Fix"):
        merge_to_folder(_recipe(tiny, tiny.base_dir / "unet", components=["text_encoder"]), tmp_path / "bad",
                        progress=False)
    assert not (tmp_path / "bad").exists()
    # A UNet-only base has no text encoder to compose into: said, with the fix, before anything is written.
    unet_base = Recipe(base=str(tiny.base_dir / "unet"), terms=[Term(source=str(style), kind="style")])
    with pytest.raises(MissingComponentError, match="components: \\[unet\\]"):
        merge_to_folder(unet_base, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_unknown_text_encoder_keys_stay_unmatched(tiny, style, tmp_path):
    extra = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 32),
             "lora_te_text_model_embeddings_token_embedding.lora_down.weight": torch.ones(4, 32)}
    save_file({**load_file(style), **extra}, tmp_path / "extra.safetensors")
    with pytest.raises(UnmatchedKeysError) as e:
        weightlab.load(tmp_path / "extra.safetensors")
    assert e.value.keys == sorted(extra)
    lenient = weightlab.load(tmp_path / "extra.safetensors", strict=False)
    assert lenient.skipped == sorted(extra) and lenient.others["text_encoder"].keys() == weightlab.load(style).others["text_encoder"].keys()


def test_inspect_lists_components(tiny, style, tmp_path):
    from weightlab.inspect import inspect_path

    assert inspect_path(style).components == ["unet", "text_encoder"]
    assert inspect_path(tiny.style_lora_kohya).components == ["unet"]
    # weightlab's own save keeps both components (text-encoder keys prefixed `text_encoder.`).
    lora = weightlab.load(style)
    again = weightlab.load(lora.save(tmp_path / "again.safetensors"))
    assert again.components == ["unet", "text_encoder"]
    assert all(torch.equal(again.others["text_encoder"][p].delta(), t.delta()) for p, t in lora.others["text_encoder"].items())
