"""A personalized single-file checkpoint (``model.diffusion_model.*`` + ``cond_stage_model.*`` + ``first_stage_model.*``,
DreamBooth/Civitai style) is a whole base: its UNet, CLIP text encoder and VAE come from the one file, the tokenizer
from a given folder or the Hugging Face cache, and ``weightlab generate`` samples from it.

Reference: diffusers' ``StableDiffusionPipeline.from_single_file(file, config=<the tiny pipeline's folder>)`` (its own
converters), and the tiny family's original components; equality is exact (conversion only renames and reshapes).
The file is written from the tiny family with `weightlab.formats.ldm.diffusers_to_ldm` and
`weightlab.formats.single_file.text_encoder_to_ldm`/`vae_to_ldm`, which invert diffusers' readers key for key
(tests/formats/test_single_file_configs.py, tests/merge/test_merge_unet_configs.py).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import weightlab
from weightlab import Recipe, Term
from weightlab.errors import MissingComponentError, ShapeMismatchError, UnmatchedKeysError
from weightlab.formats import single_file
from weightlab.formats.ldm import diffusers_to_ldm
from weightlab.loading import pipeline_dir
from weightlab.merge import build_unet
from weightlab.residuals import Base


@pytest.fixture(scope="module")
def originals(tiny):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(tiny.base_dir / "unet").state_dict(),
            "text_encoder": CLIPTextModel.from_pretrained(tiny.base_dir / "text_encoder").state_dict(),
            "vae": AutoencoderKL.from_pretrained(tiny.base_dir / "vae").state_dict()}


def _single_file(originals, unet: dict) -> dict:
    return {**diffusers_to_ldm(unet), **single_file.text_encoder_to_ldm(originals["text_encoder"]),
            **single_file.vae_to_ldm(originals["vae"])}


@pytest.fixture(scope="module")
def files(tiny, originals, tmp_path_factory):
    """``personal``: the tiny base as one file, with its (non-standard, tiny) component configs in ``__metadata__``;
    ``bare``: the same tensors without them; ``finetune``: a fine-tuned UNet with the same CLIP and VAE."""
    root = tmp_path_factory.mktemp("single_file")
    configs = {f"weightlab.{c}_config": (tiny.base_dir / c / "config.json").read_text() for c in ("text_encoder", "vae")}
    configs["weightlab.config"] = (tiny.base_dir / "unet" / "config.json").read_text()  # its sample size (native size)
    save_file(_single_file(originals, originals["unet"]), root / "personal.safetensors", configs)
    save_file(_single_file(originals, originals["unet"]), root / "bare.safetensors")
    g = torch.Generator().manual_seed(9)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in originals["unet"].items()}
    save_file(_single_file(originals, tuned), root / "finetune.safetensors", configs)
    return {"personal": root / "personal.safetensors", "bare": root / "bare.safetensors",
            "finetune": root / "finetune.safetensors", "tuned": tuned}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A fresh weightlab home (the converted components' cache) and an empty Hugging Face cache per test."""
    import huggingface_hub

    monkeypatch.setenv("WEIGHTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "home"


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_base_equals_diffusers_from_single_file(tiny, files, originals):
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel

    base = weightlab.load(files["personal"])
    assert type(base) is Base and base.family == "sd15" and base.skipped == [] and base.pipeline_dir is None
    assert _equal(base.weights, originals["unet"])
    folder = pipeline_dir(base, tokenizer=tiny.base_dir / "tokenizer")
    ours = {"unet": base.weights, "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").state_dict()}
    ref = StableDiffusionPipeline.from_single_file(str(files["personal"]), config=str(tiny.base_dir), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    for name, state in ours.items():
        assert _equal(state, originals[name]), name
        assert _equal(state, getattr(ref, name).state_dict()), name
    assert all((folder / "tokenizer" / f.name).read_bytes() == f.read_bytes() for f in (tiny.base_dir / "tokenizer").iterdir())
    shipped = json.loads((single_file.config_dir("sd15") / "scheduler" / "scheduler_config.json").read_text())
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) == shipped
    assert pipeline_dir(base, tokenizer=tiny.base_dir) == folder  # a pipeline folder's tokenizer/ too; built once


def test_tokenizer_from_the_hugging_face_cache(tiny, home, tmp_path):
    """The family's tokenizer repository laid out as huggingface_hub caches it (refs/main -> snapshot)."""
    import huggingface_hub

    repo = tmp_path / "hf" / "models--openai--clip-vit-large-patch14"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny.base_dir / "tokenizer", repo / "snapshots" / ("0" * 40))
    assert huggingface_hub.constants.HF_HUB_CACHE == str(tmp_path / "hf")
    assert single_file.find_tokenizer("sd15") == repo / "snapshots" / ("0" * 40)


def test_missing_tokenizer_says_how_to_get_one(files, home):
    base = weightlab.load(files["personal"])
    with pytest.raises(MissingComponentError, match=r"no tokenizer.*openai/clip-vit-large-patch14.*Fix: `huggingface-cli "
                                                    r"download .*--tokenizer DIR"):
        pipeline_dir(base)
    with pytest.raises(MissingComponentError, match=r"no CLIP tokenizer there.*Fix:"):
        pipeline_dir(base, tokenizer=files["personal"].parent)
    assert not home.exists()


def test_foreign_component_without_its_config_is_refused(tiny, files, home):
    """Without the configs in its metadata, the tiny CLIP (2 layers, 32 wide) is checked against SD1.5's shipped one
    (12 layers, 768 wide)."""
    base = weightlab.load(files["bare"])
    with pytest.raises((UnmatchedKeysError, ShapeMismatchError),
                       match=r"text_encoder is not the sd15 one that weightlab/configs/sd15/text_encoder/config.json "
                             r"describes \(\d+ missing: .*of another shape: .*768.*Fix:.*weightlab.text_encoder_config"):
        pipeline_dir(base, tokenizer=tiny.base_dir / "tokenizer")
    assert not any(p.name.startswith("bare") for p in (home / "cache" / "single_file").glob("*"))


def test_unet_only_base_needs_a_pipeline_folder(tiny):
    with pytest.raises(MissingComponentError, match=r"holds a UNet only.*Fix:"):
        pipeline_dir(weightlab.load(tiny.base_ldm))


def test_generate_from_the_single_file(tiny, files, tmp_path):
    """``weightlab generate`` from a recipe whose base is the one file (plus --tokenizer): the same clip as from the
    tiny family's diffusers folder, whose components are the same tensors (same scheduler family: AnimateLCM's LCM
    settings over each base's scheduler config)."""
    from typer.testing import CliRunner

    from weightlab.cli import app
    from weightlab.video import VideoPipeline

    motion = Term(source=str(tiny.motion_dir), kind="motion")
    recipe = Recipe(base=str(files["personal"]), terms=[motion]).save(tmp_path / "r.yaml")
    out = tmp_path / "clip.mp4"
    result = CliRunner().invoke(app, ["generate", "--recipe", str(recipe), "--prompt", "a cat", "--out", str(out),
                                      "--frames", "2", "--steps", "1", "--tokenizer", str(tiny.base_dir / "tokenizer")])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".gif").is_file()
    ours = VideoPipeline.from_source(recipe, tokenizer=tiny.base_dir / "tokenizer")("a cat", frames=2, steps=1, progress=False)
    ref = VideoPipeline.from_source(Recipe(base=str(tiny.base_dir), terms=[motion]))("a cat", frames=2, steps=1, progress=False)
    assert (ours.video == ref.video).all()


def test_full_single_file_as_a_dense_style_term(tiny, files, originals):
    """Its UNet is the dense term (the CLIP and VAE are other components); reference: w0 + s·(W − w0) in float64.
    Tolerance 1e-6 relative to each weight's scale: one fp32 rounding of the sum."""
    merged = build_unet(Recipe(base=str(tiny.base_dir), terms=[Term(source=str(files["finetune"]), kind="style", scale=0.5)]))
    for k, w0 in originals["unet"].items():
        want = w0.double() + 0.5 * (files["tuned"][k].double() - w0.double())
        got = merged.state_dict()[k].double()
        assert (got - want).abs().max().item() <= 1e-6 * max(want.abs().max().item(), 1e-12), k
