"""Every on-disk layout of the tiny family loads to diffusers names, agrees with diffusers' own loaders, and round-trips."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlab
from weightlab.errors import FamilyMismatchError, FileFormatError, UnmatchedKeysError, WeightlabError
from weightlab.families import SD15
from weightlab.residuals import Base, Dense, LoRA, MotionModule
from weightlab.testing import LCM_LORA_TARGETS, STYLE_TARGETS, TINY_MOTION_CONFIG

# TinyFamily field -> (class, detected kind, kind declared to load); a full checkpoint is a Dense only when declared.
LAYOUTS = {
    "base_dir": (Base, "base", None),
    "base_ldm": (Base, "base", None),
    "style_lora_peft": (LoRA, "style", None),
    "style_lora_kohya": (LoRA, "style", None),
    "accel_lora": (LoRA, "image_accel", None),
    "style_dense": (Dense, "style", "style"),
    "motion_dir": (MotionModule, "motion", None),
    "motion_animatediff": (MotionModule, "motion", None),
    "motion_animatelcm": (MotionModule, "motion", None),
    "motion_lora": (LoRA, "motion_lora", None),
}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def stored_tensors(path) -> dict:
    """A file's tensors as stored (no renaming); for a diffusers pipeline folder, its UNet's."""
    return load_file(path / "unet" / "diffusion_pytorch_model.safetensors" if path.is_dir() else path)


def modules_named(targets, *, motion: bool = False) -> set[str]:
    """The sd15 module paths a LoRA over ``targets`` covers (spatial or motion modules)."""
    return {p for p in SD15.weight_modules if (".motion_modules." in p) == motion
            and any(p == t or p.endswith("." + t) for t in targets)}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_loads_and_round_trips(tiny, tmp_path, name):
    cls, kind, declared = LAYOUTS[name]
    res = weightlab.load(getattr(tiny, name), kind=declared)
    assert type(res) is cls and res.kind == kind and res.family == "sd15" and res.skipped == []
    again = weightlab.load(res.save(tmp_path / f"{name}.safetensors"))  # kind comes back from __metadata__
    assert type(again) is cls and again.kind == kind and again.family == "sd15"
    assert_same_tensors(res.tensors(), again.tensors())
    if isinstance(res, (Base, MotionModule)):
        assert again.config == json.loads(json.dumps(res.config))


def test_lora_targets_are_the_declared_modules(tiny):
    assert set(weightlab.load(tiny.style_lora_kohya).targets) == modules_named(STYLE_TARGETS)
    accel = weightlab.load(tiny.accel_lora)
    assert set(accel.targets) == modules_named(LCM_LORA_TARGETS) and accel.ranks == [12] and accel.alphas == [6.0]
    assert set(weightlab.load(tiny.motion_lora).targets) == modules_named(("to_q", "to_k", "to_v", "to_out.0"), motion=True)


def test_kohya_and_peft_copies_load_to_identical_deltas(tiny):
    peft, kohya = weightlab.load(tiny.style_lora_peft), weightlab.load(tiny.style_lora_kohya)
    base = weightlab.load(tiny.base_dir).weights
    assert peft.targets.keys() == kohya.targets.keys()
    assert kohya.ranks == [4] and kohya.alphas == [2.0] and peft.alphas == [4.0]  # PEFT folded alpha/rank into B
    convs = [p for p, t in peft.targets.items() if t.down.dim() == 4]
    assert any(base[f"{p}.weight"].shape[-1] == 3 for p in convs)  # 3x3 conv targets are covered
    for path in peft.targets:
        d = kohya.targets[path].delta()
        assert d.shape == base[f"{path}.weight"].shape
        assert torch.equal(peft.targets[path].delta(), d), path


def test_conv_lora_delta_equals_the_two_convolutions(tiny):
    """delta = (alpha/r) · up @ down (reshaped) is the weight of conv(up, conv(down, x)) scaled by alpha/r."""
    t = weightlab.load(tiny.style_lora_kohya).targets["down_blocks.0.resnets.0.conv1"]
    x = torch.randn(1, t.down.shape[1], 8, 8, generator=torch.Generator().manual_seed(0))
    two_convs = t.scale * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, t.down, padding=1), t.up)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, t.delta(), padding=1), two_convs, rtol=1e-5, atol=1e-5)


def test_motion_layouts_load_to_diffusers_tensors(tiny):
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    reference = MotionAdapter.from_pretrained(tiny.motion_dir).state_dict()
    for path in (tiny.motion_dir, tiny.motion_animatediff, tiny.motion_animatelcm):
        module = weightlab.load(path)
        assert_same_tensors(module.tensors(), reference)
        assert MotionAdapter(**module.config).state_dict().keys() == reference.keys()
    # diffusers' converter on the raw file: the same tensors, minus the positional tables it drops.
    converted = convert_animatediff_checkpoint_to_diffusers(load_file(tiny.motion_animatediff))
    assert set(reference) - set(converted) == {k for k in reference if k.endswith("pos_embed.pe")}
    assert_same_tensors(converted, {k: module.weights[k] for k in converted})


def test_animatediff_v1_keeps_its_24_positions(tiny, tmp_path):
    """diffusers' converter drops pos_encoder tables; their length is still the module's frame limit."""
    from diffusers import MotionAdapter

    short = {k: v[:, :24] if k.endswith("pos_encoder.pe") else v for k, v in load_file(tiny.motion_animatediff).items()}
    save_file(short, tmp_path / "v1.safetensors")
    module = weightlab.load(tmp_path / "v1.safetensors")
    assert module.config["motion_max_seq_length"] == 24
    reference = MotionAdapter(**dict(TINY_MOTION_CONFIG, motion_max_seq_length=24)).state_dict()
    pe = {k: v for k, v in reference.items() if k.endswith("pos_embed.pe")}
    assert_same_tensors({k: module.weights[k] for k in pe}, pe)


def test_motion_lora_in_animatediff_naming(tiny, tmp_path):
    """AnimateDiff's own motion LoRAs: ``temporal_transformer...attention_blocks.0.processor.to_q_lora.down``."""
    pattern = re.compile(r"unet\.(.*motion_modules\.\d+)\.(.*)\.attn([12])\.(to_[qkv]|to_out)(?:\.0)?\.lora_([AB])\.weight")

    def original(key):
        m = pattern.fullmatch(key)
        return (f"{m[1]}.temporal_transformer.{m[2]}.attention_blocks.{int(m[3]) - 1}.processor."
                f"{m[4]}_lora.{'down' if m[5] == 'A' else 'up'}.weight")

    save_file({original(k): v for k, v in load_file(tiny.motion_lora).items()}, tmp_path / "mm_lora.safetensors")
    ours, peft = weightlab.load(tmp_path / "mm_lora.safetensors"), weightlab.load(tiny.motion_lora)
    assert ours.kind == "motion_lora" and ours.targets.keys() == peft.targets.keys()
    for path, t in peft.targets.items():
        assert torch.equal(ours.targets[path].delta(), t.delta()), path


def test_single_file_is_exactly_the_folder_unet(tiny):
    from diffusers import UNet2DConditionModel

    single, folder = weightlab.load(tiny.base_ldm), weightlab.load(tiny.base_dir)
    assert_same_tensors(single.weights, folder.weights)
    assert_same_tensors(folder.weights, stored_tensors(tiny.base_dir))
    UNet2DConditionModel(**single.config).load_state_dict(single.weights, strict=True)  # the inferred config fits


# layout -> keys added to it; errors must quote them as the file spells them, not as renamed by a converter.
UNKNOWN_KEYS = {
    "base_ldm": ["model.diffusion_model.input_blocks.1.1.extra_gate.weight", "something_else.weight"],
    "base_dir": ["down_blocks.0.attentions.0.extra_gate.weight"],
    "motion_animatediff": ["down_blocks.0.motion_modules.0.temporal_transformer.extra_gate.weight"],
}


@pytest.mark.parametrize("name", UNKNOWN_KEYS)
def test_unknown_keys_are_named_or_reported(tiny, tmp_path, name):
    source = getattr(tiny, name)
    sd = stored_tensors(source)
    unknown = UNKNOWN_KEYS[name]
    sd.update({k: torch.zeros(2) for k in unknown})
    if name == "base_ldm":
        sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2)  # a single file's VAE is expected, not unknown
    save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(UnmatchedKeysError) as e:
        weightlab.load(tmp_path / "extra.safetensors")
    assert sorted(e.value.keys) == sorted(unknown) and all(k in str(e.value) for k in unknown)
    lenient = weightlab.load(tmp_path / "extra.safetensors", strict=False)
    assert lenient.skipped == sorted(unknown)
    assert_same_tensors(lenient.tensors(), weightlab.load(source).tensors())


def _drop(prefix):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefix)}


def _first_alpha_2d(sd):
    key = next(k for k in sorted(sd) if k.endswith(".alpha"))
    return {**sd, key: torch.ones(2)}


# (TinyFamily field, how to break it, error, text the message must hold)
BROKEN = {
    "base_missing_a_weight": ("base_dir", _drop("down_blocks.0.resnets.0.conv2.weight"), UnmatchedKeysError,
                              "down_blocks.0.resnets.0.conv2.weight"),
    "motion_missing_a_block": ("motion_animatelcm", _drop("down_blocks.1.motion_modules.0."), UnmatchedKeysError,
                               "down_blocks.1.motion_modules.0.proj_in.weight"),
    "lora_alpha_not_scalar": ("style_lora_kohya", _first_alpha_2d, UnmatchedKeysError,
                              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"),
    "lora_down_without_up": ("style_lora_kohya", _drop("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up"),
                             UnmatchedKeysError, "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"),
    "no_known_keys": ("style_lora_kohya", lambda sd: {"foo.bar": torch.zeros(1)}, UnmatchedKeysError, "foo.bar"),
    "no_tensors": ("style_lora_kohya", lambda sd: {}, FileFormatError, "holds no tensors"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_residuals_raise_errors_that_name_the_problem(tiny, tmp_path, case):
    name, damage, error, text = BROKEN[case]
    source = getattr(tiny, name)
    save_file(damage(stored_tensors(source)), tmp_path / "broken.safetensors")
    with pytest.raises(error, match=re.escape(text)):
        weightlab.load(tmp_path / "broken.safetensors")


def test_partial_fine_tune_loads_as_dense(tiny, tmp_path):
    sd = _drop("down_blocks.0.")(stored_tensors(tiny.base_dir))
    save_file(sd, tmp_path / "partial.safetensors")
    dense = weightlab.load(tmp_path / "partial.safetensors", kind="style")
    assert type(dense) is Dense and dense.target_keys == set(sd)


def test_broken_config_json_is_a_file_format_error(tiny, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copy(tiny.motion_dir / "diffusion_pytorch_model.safetensors", folder)
    for text in ("{", "[1, 2]"):
        (folder / "config.json").write_text(text)
        with pytest.raises(FileFormatError, match="config.json"):
            weightlab.load(folder)


def _kohya(path: str, rank: int, n_in: int, n_out: int) -> dict:
    k = "lora_unet_" + path.replace(".", "_")
    return {f"{k}.lora_down.weight": torch.ones(rank, n_in), f"{k}.lora_up.weight": torch.ones(n_out, rank),
            f"{k}.alpha": torch.tensor(float(rank))}


def test_sdxl_lora_is_refused_naming_keys(tiny, tmp_path):
    # transformer_blocks.1 exists in SDXL's block 1 (two transformer layers), not in SD1.5's; block 0 is in both.
    sdxl_only = "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"
    shared = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = {**_kohya(sdxl_only, 4, 32, 32), **_kohya(shared, 4, 32, 32)}
    save_file(sd, tmp_path / "sdxl.safetensors")
    for strict in (True, False):  # it loads as sdxl, whole: nothing is skipped that an sd15 base could take
        lora = weightlab.load(tmp_path / "sdxl.safetensors", strict=strict)
        assert lora.family == "sdxl" and set(lora.targets) == {sdxl_only, shared} and lora.skipped == []
    # merging it would add the shared-name (and same-shape) attn1 factors to sd15: refused, naming the sdxl-only key
    with pytest.raises(FamilyMismatchError, match="sdxl") as e:
        weightlab.build_unet(weightlab.Recipe(base=str(tiny.base_dir), terms=[
            weightlab.Term(source=str(tmp_path / "sdxl.safetensors"), kind="style")]))
    assert sdxl_only + ".weight" in str(e.value) and "'sd15'" in str(e.value)


def test_unmatched_lora_keys_are_named_or_reported(tiny, tmp_path):
    sd = load_file(tiny.style_lora_kohya)
    bad = _kohya("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_z", 4, 16, 16)
    # Text-encoder keys that name no composed module: an embedding of SDXL's second encoder, a lone factor (tests/
    # merge/test_merge_text_encoder.py, test_merge_sdxl_text_encoders.py: complete ones are text-encoder targets).
    te = {"lora_te2_text_model_embeddings_token_embedding.lora_down.weight": torch.ones(4, 32),
          "lora_te2_text_model_embeddings_token_embedding.lora_up.weight": torch.ones(32, 4),
          "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(4, 32)}
    for extra in (bad, te):
        save_file({**sd, **extra}, tmp_path / "lora.safetensors")
        with pytest.raises(UnmatchedKeysError) as e:
            weightlab.load(tmp_path / "lora.safetensors")
        assert e.value.keys == sorted(extra) and all(k in str(e.value) for k in extra)
        lenient = weightlab.load(tmp_path / "lora.safetensors", strict=False)
        assert lenient.skipped == sorted(extra)
        assert lenient.targets.keys() == weightlab.load(tiny.style_lora_kohya).targets.keys()


@pytest.mark.parametrize("name, kind, message", [
    ("style_lora_kohya", "base", "not 'base'"), ("style_lora_kohya", "motion_lora", "only target motion-module"),
    ("base_ldm", "motion", "not 'motion'"), ("motion_dir", "style", "not 'style'"), ("base_dir", "nonsense", "unknown kind"),
])
def test_declared_kind_that_does_not_fit_is_refused(tiny, name, kind, message):
    with pytest.raises(WeightlabError, match=message):
        weightlab.load(getattr(tiny, name), kind=kind)
