"""A personalized single-file checkpoint (``model.diffusion_model.*`` + ``cond_stage_model.*`` + ``first_stage_model.*``)
as a dense style term changes every component it carries: w' = w0 + α·(w_ckpt − w0) for the UNet, the CLIP text
encoder and the VAE, each from the base pipeline's pristine component (issue 13, "Components").

Reference kind: diffusers' single-file converter. The checkpoint's components are read back by
``StableDiffusionPipeline.from_single_file`` (diffusers' own converters, with the tiny pipeline's configs), the base's
from its diffusers folder, and the expected weights are computed here in float64. Tolerance 1e-6 relative to each
weight's largest magnitude (fp32): we accumulate w0 + α·(W − w0) in fp32 and round once, a few fp32 ULPs (~1e-7)
from the float64 value.
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlab
from weightlab import Recipe, Term
from weightlab.errors import RecipeError, ShapeMismatchError
from weightlab.formats import single_file
from weightlab.formats.ldm import diffusers_to_ldm
from weightlab.inspect import inspect_path
from weightlab.merge import build_component, build_text_encoder, merge_to_file, merge_to_folder
from weightlab.testing import TINY_VAE_CONFIG, max_rel_error

ALPHA = 0.5
FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors",
         "vae": "vae/diffusion_pytorch_model.safetensors"}


def _perturbed(state: dict, seed: int, std: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _write_checkpoint(path, unet: dict, text_encoder: dict, vae: dict, configs: dict) -> None:
    """One LDM file, its tiny component configs in ``__metadata__`` (the shipped sd15 ones are full-size)."""
    save_file({**diffusers_to_ldm(unet), **single_file.text_encoder_to_ldm(text_encoder), **single_file.vae_to_ldm(vae)},
              path, configs)


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A DreamBooth-style checkpoint of the tiny base: UNet, CLIP and VAE all fine-tuned."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("dense_components")
    configs = {f"weightlab.{c}_config": (tiny.base_dir / c / "config.json").read_text() for c in ("text_encoder", "vae")}
    base = {"unet": UNet2DConditionModel.from_pretrained(tiny.base_dir / "unet").state_dict(),
            "text_encoder": CLIPTextModel.from_pretrained(tiny.base_dir / "text_encoder").state_dict(),
            "vae": AutoencoderKL.from_pretrained(tiny.base_dir / "vae").state_dict()}
    tuned = {c: _perturbed(state, seed=i) for i, (c, state) in enumerate(base.items())}
    _write_checkpoint(root / "personal.safetensors", tuned["unet"], tuned["text_encoder"], tuned["vae"], configs)
    return root / "personal.safetensors"


@pytest.fixture(scope="module")
def expected(tiny, checkpoint):
    """w0 + α·(w_ckpt − w0) in float64, the checkpoint's components as diffusers' from_single_file converts them."""
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(tiny.base_dir), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    out = {}
    for c, name in FILES.items():
        w0 = load_file(tiny.base_dir / ("unet/" if c == "unet" else "") / name)
        w = getattr(ref, c).state_dict()
        out[c] = {k: w0[k].double() + ALPHA * (w[k].double() - w0[k].double()) for k in w0}
        assert max_rel_error(out[c], w0) > 0.05, c  # the checkpoint does change the component
    return out


def _recipe(tiny, source, **term):
    return Recipe(base=str(tiny.base_dir), terms=[Term(source=str(source), kind="style", scale=ALPHA, **term)])


def test_dense_checkpoint_changes_unet_clip_and_vae(tiny, checkpoint, expected, tmp_path):
    dense = weightlab.load(checkpoint, kind="style")
    assert dense.components == ["unet", "text_encoder", "vae"] and dense.skipped == []
    assert inspect_path(checkpoint).components == ["unet", "text_encoder", "vae"]
    # weightlab's own save keeps every component (`text_encoder.`/`vae.`-prefixed diffusers names).
    again = weightlab.load(dense.save(tmp_path / "again.safetensors"))
    assert type(again) is type(dense) and again.components == dense.components
    assert all(torch.equal(again.tensors()[k], v) for k, v in dense.tensors().items())
    merge_to_folder(_recipe(tiny, checkpoint), tmp_path / "merged", progress=False)
    ours = {c: load_file(tmp_path / "merged" / name) for c, name in FILES.items()}
    for c in FILES:
        assert max_rel_error(expected[c], ours[c]) <= 1e-6, c
    # The in-memory compositions (generate from a recipe) are the same arithmetic: bit-identical.
    built = {"text_encoder": build_text_encoder(_recipe(tiny, checkpoint)),
             "vae": build_component(_recipe(tiny, checkpoint), "vae")}
    for c, model in built.items():
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ours[c].items()), c


def test_diffusers_pipeline_folder_as_a_dense_term(tiny, checkpoint, expected, tmp_path):
    """The same fine-tune saved as a diffusers pipeline folder carries the same components and merges the same."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(tiny.base_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "tuned")
    assert weightlab.load(tmp_path / "tuned", kind="style").components == ["unet", "text_encoder", "vae"]
    merge_to_folder(_recipe(tiny, tmp_path / "tuned"), tmp_path / "merged", progress=False)
    for c, name in FILES.items():
        assert max_rel_error(expected[c], load_file(tmp_path / "merged" / name)) <= 1e-6, c


def test_components_select_what_a_dense_term_touches(tiny, checkpoint, expected, tmp_path):
    base = {c: load_file(tiny.base_dir / ("unet/" if c == "unet" else "") / name) for c, name in FILES.items()}
    merge_to_folder(_recipe(tiny, checkpoint), tmp_path / "out", progress=False)
    # Re-merging into the same folder with the VAE only: the UNet is the base's, the stale text_encoder/ is removed.
    merge_to_folder(_recipe(tiny, checkpoint, components=["vae"]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "text_encoder").exists()
    unet = load_file(tmp_path / "out" / FILES["unet"])
    assert all(torch.equal(unet[k], v) for k, v in base["unet"].items())
    assert max_rel_error(expected["vae"], load_file(tmp_path / "out" / FILES["vae"])) <= 1e-6
    # UNet and text encoder: no vae/ (the pipeline keeps the base's).
    merge_to_folder(_recipe(tiny, checkpoint, components=["unet", "text_encoder"]), tmp_path / "te", progress=False)
    assert not (tmp_path / "te" / "vae").exists()
    assert max_rel_error(expected["text_encoder"], load_file(tmp_path / "te" / FILES["text_encoder"])) <= 1e-6
    # A component the checkpoint does not carry is refused before anything is written.
    with pytest.raises(RecipeError, match=r"text_encoder_2.*carries only unet, text_encoder, vae.*Fix"):
        merge_to_folder(_recipe(tiny, checkpoint, components=["text_encoder_2"]), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_unet_file_warns_about_the_components_it_leaves_out(tiny, checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="weightlab.merge"):
        merge_to_file(_recipe(tiny, checkpoint), tmp_path / "unet.safetensors", progress=False)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "text_encoder residual" in warned and "vae residual" in warned and "merge_to_folder" in warned


def test_checkpoint_of_another_architecture_is_refused(tiny, tmp_path):
    """A checkpoint whose VAE is wider than the base's (its own config, in its metadata, says so): it loads, but the
    merge refuses it, naming the tensors, before anything is written."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    wide = dict(TINY_VAE_CONFIG, block_out_channels=(12, 24))
    torch.manual_seed(0)
    vae = AutoencoderKL(**wide)
    configs = {"weightlab.text_encoder_config": (tiny.base_dir / "text_encoder" / "config.json").read_text(),
               "weightlab.vae_config": json.dumps({k: v for k, v in vae.config.items() if not k.startswith("_")})}
    _write_checkpoint(tmp_path / "wide.safetensors",
                      UNet2DConditionModel.from_pretrained(tiny.base_dir / "unet").state_dict(),
                      CLIPTextModel.from_pretrained(tiny.base_dir / "text_encoder").state_dict(), vae.state_dict(), configs)
    assert weightlab.load(tmp_path / "wide.safetensors", kind="style").components == ["unet", "text_encoder", "vae"]
    with pytest.raises(ShapeMismatchError, match=r"tensor\(s\) do not fit the base: .*Fix"):
        merge_to_folder(_recipe(tiny, tmp_path / "wide.safetensors"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # Left out of the term, its VAE is neither converted nor checked, and the rest merges.
    merge_to_folder(_recipe(tiny, tmp_path / "wide.safetensors", components=["unet", "text_encoder"]), tmp_path / "out",
                    progress=False)
    assert not (tmp_path / "out" / "vae").exists()


def test_generate_and_export_use_the_merged_vae_and_text_encoder(tiny, checkpoint, expected, tmp_path):
    """The video pipeline built from a merged folder or from the recipe carries the checkpoint's CLIP and VAE composed
    into the base's (expected: diffusers' converter, float64, as above)."""
    from weightlab.video import VideoPipeline

    recipe = Recipe(base=str(tiny.base_dir), terms=[
        Term(source=str(checkpoint), kind="style", scale=ALPHA),
        Term(source=str(tiny.motion_animatelcm), kind="motion", scale=1.0)])
    merge_to_folder(recipe, tmp_path / "merged", progress=False)
    for source in (tmp_path / "merged", recipe):
        pipe = VideoPipeline.from_source(source).pipe
        for c in ("text_encoder", "vae"):
            ours = {k.removeprefix("text_model."): v for k, v in getattr(pipe, c).state_dict().items()}
            assert max_rel_error(expected[c], {k: ours[k.removeprefix("text_model.")] for k in expected[c]}) <= 1e-6, c
