"""A personalized single-file checkpoint (``model.diffusion_model.*`` + ``cond_stage_model.*`` + ``first_stage_model.*``,
DreamBooth/Civitai style; SDXL's ``conditioner.embedders.{0,1}.*`` two text encoders) is a whole base: its UNet, CLIP
text encoder(s) and VAE come from the one file, the tokenizer(s) from a given folder or the Hugging Face cache, and
``weightlab generate`` samples from it (SD1.5).

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
from weightlab.errors import MissingComponentError, SamplingError, ShapeMismatchError, UnmatchedKeysError
from weightlab.formats import single_file
from weightlab.formats.ldm import diffusers_to_ldm
from weightlab.loading import pipeline_dir
from weightlab.merge import build_unet
from weightlab.residuals import Base
from weightlab.testing import BOS_ID, EOS_ID, _randomize, build_tiny_variant


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
    assert single_file.find_tokenizers("sd15") == {"tokenizer": repo / "snapshots" / ("0" * 40)}


def test_missing_tokenizer_says_how_to_get_one(files, home):
    base = weightlab.load(files["personal"])
    with pytest.raises(MissingComponentError, match=r"no tokenizer.*openai/clip-vit-large-patch14.*Fix: `hf download "
                                                    r"openai/clip-vit-large-patch14 .*--tokenizer DIR"):
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


def test_merge_to_folder_composes_a_style_into_a_single_file_base(tiny, files, originals, tmp_path):
    """A style LoRA with a text-encoder half (written by diffusers' ``save_lora_weights`` from PEFT layers) over the
    one-file base: ``weightlab merge --tokenizer`` writes the merged text encoder. Reference: diffusers'
    ``load_lora_weights`` + ``fuse_lora`` on the tiny diffusers folder, whose tensors the file holds; 1e-6 relative
    to each weight's scale (diffusers rounds twice in fp32, we once). Without a tokenizer (empty HF cache) the merge is
    refused before anything is written."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from weightlab.cli import app
    from weightlab.merge import merge_to_folder
    from weightlab.testing import max_rel_error, with_peft_lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny.base_dir)
    te, te_config = with_peft_lora(pipe.text_encoder, ["q_proj", "v_proj", "fc1"], seed=2, r=4, lora_alpha=8)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "style", text_encoder_lora_layers=get_peft_model_state_dict(te),
                                              text_encoder_lora_adapter_metadata=te_config.to_dict())
    lora = tmp_path / "style" / "pytorch_lora_weights.safetensors"
    recipe = Recipe(base=str(files["personal"]), terms=[Term(source=str(lora), kind="style", scale=0.7)])
    with pytest.raises(MissingComponentError, match="tokenizer"):
        merge_to_folder(recipe, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", "--base", str(files["personal"]), "--style", f"{lora}:0.7", "--out",
                                      str(out), "--tokenizer", str(tiny.base_dir / "tokenizer")])
    assert result.exit_code == 0, result.output
    ref = StableDiffusionPipeline.from_pretrained(tiny.base_dir)
    ref.load_lora_weights(str(lora))
    ref.fuse_lora(components=["text_encoder"], lora_scale=0.7)
    ref.unload_lora_weights()
    ours = load_file(out / "text_encoder" / "model.safetensors")
    want = {k: v for k, v in ref.text_encoder.state_dict().items() if k in ours}
    assert want.keys() == ours.keys()
    assert max_rel_error(want, {k: originals["text_encoder"][k] for k in want}) > 0.01  # the style changed it
    assert max_rel_error(want, ours) <= 1e-6


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The tiny SDXL pipeline (`weightlab.testing`) with text encoders of two widths, as SDXL's are (CLIP-L 768;
    OpenCLIP-bigG 1280 with a 1280-d projection): here 16 and 48 with a 32-d projection, which keeps the UNet's 64-d
    cross-attention (16 + 48) and 80-d text_time input (6 x 8 + 32). diffusers' from_single_file tells the two
    encoders apart by width, so equal widths would load CLIP-L as its text_encoder_2. ``personal``: that pipeline as
    one file (tiny configs in ``__metadata__``); ``no_te2``: the same without ``conditioner.embedders.1.*``;
    ``tuned``: a fine-tune of its text_encoder_2 (``tuned_te2``, diffusers names), the rest the same."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("sdxl")
    variant = StableDiffusionXLPipeline.from_pretrained(build_tiny_variant("sdxl", root))
    encoders = []
    for seed, (cls, hidden, projection) in enumerate(((CLIPTextModel, 16, 16), (CLIPTextModelWithProjection, 48, 32))):
        model = cls(CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=77, projection_dim=projection,
                                   bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID))
        _randomize(model, seed)  # every parameter distinct, so a swapped or transposed tensor shows
        encoders.append(model)
    pipe = StableDiffusionXLPipeline(vae=variant.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=variant.tokenizer, tokenizer_2=variant.tokenizer_2, unet=variant.unet,
                                     scheduler=variant.scheduler)
    pipe.save_pretrained(root / "pipeline")
    originals = {c: getattr(pipe, c).state_dict() for c in ("unet", "text_encoder", "text_encoder_2", "vae")}
    # Written by our writers, which invert diffusers' readers key for key (tests/formats/test_single_file_configs.py).
    ldm = {**diffusers_to_ldm(originals["unet"]), **single_file.vae_to_ldm(originals["vae"]),
           **single_file.text_encoder_to_ldm(originals["text_encoder"], prefix="conditioner.embedders.0.transformer."),
           **single_file.text_encoder_to_ldm(originals["text_encoder_2"], prefix="conditioner.embedders.1.model.")}
    configs = {f"weightlab.{c}_config": (root / "pipeline" / c / "config.json").read_text()
               for c in ("text_encoder", "text_encoder_2", "vae")}
    configs["weightlab.config"] = (root / "pipeline" / "unet" / "config.json").read_text()
    save_file(ldm, root / "personal.safetensors", configs)
    save_file({k: v for k, v in ldm.items() if not k.startswith("conditioner.embedders.1.")}, root / "no_te2.safetensors",
              configs)
    g = torch.Generator().manual_seed(3)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in originals["text_encoder_2"].items()}
    save_file({**ldm, **single_file.text_encoder_to_ldm(tuned, prefix="conditioner.embedders.1.model.")},
              root / "tuned.safetensors", configs)
    return {"pipeline": root / "pipeline", "personal": root / "personal.safetensors",
            "no_te2": root / "no_te2.safetensors", "tuned": root / "tuned.safetensors", "tuned_te2": tuned,
            "originals": originals}


def test_sdxl_single_file_base_equals_diffusers_from_single_file(sdxl):
    """Reference: diffusers' StableDiffusionXLPipeline.from_single_file with the tiny pipeline's folder as config;
    exact, as conversion only renames, splits in_proj and transposes text_projection."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = weightlab.load(sdxl["personal"])
    assert type(base) is Base and base.family == "sdxl" and base.skipped == []
    assert base.components == ["unet", "text_encoder", "text_encoder_2", "vae"]
    folder = pipeline_dir(base, tokenizer=sdxl["pipeline"])
    ours = {"unet": base.weights, "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict(),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").state_dict(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").state_dict()}
    ref = StableDiffusionXLPipeline.from_single_file(str(sdxl["personal"]), config=str(sdxl["pipeline"]),
                                                     local_files_only=True)
    assert ours["text_encoder_2"]["text_projection.weight"].shape == (32, 48)
    for name, state in ours.items():
        assert _equal(state, sdxl["originals"][name]), name
        assert _equal(state, getattr(ref, name).state_dict()), name
    for sub in ("tokenizer", "tokenizer_2"):
        assert all((folder / sub / f.name).read_bytes() == f.read_bytes() for f in (sdxl["pipeline"] / sub).iterdir())
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        assert (folder / name).read_text() == (single_file.config_dir("sdxl") / name).read_text()


def test_sdxl_base_is_refused_by_sampling_and_export(sdxl, tmp_path):
    """Generate and ONNX export build SD1.x/SD2 AnimateDiff pipelines (one text encoder): an SDXL base is refused by
    name before anything is merged or written, not failed deep in torch."""
    from weightlab.onnx_export import export_onnx
    from weightlab.video import VideoPipeline

    recipe = Recipe(base=str(sdxl["personal"]))
    with pytest.raises(SamplingError, match="SDXL pipeline"):
        VideoPipeline.from_source(recipe, tokenizer=sdxl["pipeline"])
    with pytest.raises(SamplingError, match="AnimateDiffSDXLPipeline"):
        export_onnx(recipe, tmp_path / "onnx", pipeline_dir=sdxl["pipeline"])
    assert not any((tmp_path / "onnx").iterdir())


def test_sdxl_tokenizers_from_the_hugging_face_cache(sdxl, tmp_path):
    """SDXL's repository laid out as huggingface_hub caches it (refs/main -> snapshot), tokenizer/ and tokenizer_2/."""
    repo = tmp_path / "hf" / "models--stabilityai--stable-diffusion-xl-base-1.0"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(sdxl["pipeline"] / sub, repo / "snapshots" / ("0" * 40) / sub)
    assert single_file.find_tokenizers("sdxl") == {s: repo / "snapshots" / ("0" * 40) / s for s in ("tokenizer", "tokenizer_2")}


def test_sdxl_missing_tokenizers_say_how_to_get_them(sdxl, home):
    base = weightlab.load(sdxl["personal"])
    with pytest.raises(MissingComponentError, match=r"no 'sdxl' tokenizer or tokenizer_2 .*stabilityai/stable-diffusion-"
                                                    r"xl-base-1.0/tokenizer.*Fix: `hf download stabilityai/stable-"
                                                    r"diffusion-xl-base-1.0 --include 'tokenizer/\*' --include "
                                                    r"'tokenizer_2/\*'`.*holding tokenizer/ and tokenizer_2/"):
        pipeline_dir(base)
    with pytest.raises(MissingComponentError, match=r"no CLIP tokenizer in tokenizer/, tokenizer_2/.*Fix: pass a folder "
                                                    r"holding tokenizer/ and tokenizer_2/ .*stabilityai/stable-diffusion-xl"):
        pipeline_dir(base, tokenizer=sdxl["pipeline"] / "tokenizer")  # a tokenizer folder: SDXL needs the pair
    assert not home.exists()


def test_sdxl_checkpoint_without_text_encoder_2_is_reported(sdxl, home):
    base = weightlab.load(sdxl["no_te2"])
    assert base.components == ["unet", "text_encoder", "vae"]
    with pytest.raises(MissingComponentError, match=r"sdxl single-file checkpoint without its text_encoder_2 "
                                                    r"\(conditioner\.embedders\.1\.model\.\*\).*Fix:"):
        pipeline_dir(base, tokenizer=sdxl["pipeline"])
    assert not home.exists()


def test_sdxl_single_file_as_a_dense_style_term(sdxl):
    """Its text_encoder_2 (text_projection included) is composed into the base's; reference: w0 + s·(W − w0) in
    float64, W the fine-tune's own weights before they were written as LDM. Tolerance 1e-6 relative to each weight's
    scale: one fp32 rounding of the sum."""
    from weightlab.merge import build_component

    recipe = Recipe(base=str(sdxl["pipeline"]), terms=[Term(source=str(sdxl["tuned"]), kind="style", scale=0.5)])
    merged = build_component(recipe, "text_encoder_2", dtype=torch.float32, device="cpu").state_dict()
    assert merged.keys() == sdxl["originals"]["text_encoder_2"].keys()
    for k, w0 in sdxl["originals"]["text_encoder_2"].items():
        want = w0.double() + 0.5 * (sdxl["tuned_te2"][k].double() - w0.double())
        assert (merged[k].double() - want).abs().max().item() <= 1e-6 * max(want.abs().max().item(), 1e-12), k


def test_text_encoder_of_another_family_is_refused():
    """SDXL's second text encoder in a checkpoint whose UNet is SD1.5's: named, not converted with a config it lacks."""
    with pytest.raises(UnmatchedKeysError, match=r"carries a text_encoder_2 \(conditioner\.embedders\.1\.model\."
                                                 r"positional_embedding\), which the sd15 pipeline has not\. Fix:"):
        single_file.convert_components({"conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)}, "sd15")
