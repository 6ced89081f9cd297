"""LoRA alphas recorded as PEFT options merge exactly as the libraries that write them merge them.

References no one here wrote: PEFT's own ``merge_and_unload`` of the adapter it saved (``get_peft_model`` +
``save_pretrained``: ``adapter_config.json`` beside ``adapter_model.safetensors``), diffusers' own
``load_lora_weights`` + ``fuse_lora`` of a file its ``save_lora_weights(..., unet_lora_adapter_metadata=...)`` wrote,
and LyCORIS's own ``merge_to`` of a DoRA it saved (``dora_scale``, kohya keys).
Every case has ``lora_alpha != r`` (scale != 1), so reading the options wrongly moves every targeted weight by tens
of percent.

Tolerance 1e-6 relative to each weight's largest magnitude (fp32): PEFT and diffusers add ``scaling · B @ A`` to the
fp32 weight (two roundings), we accumulate in fp32 and round once; the two differ by a few fp32 ULPs (~1e-7).
"""

import copy
import shutil

import pytest
import torch

from weightlab import Recipe, Term
from weightlab.errors import AdapterOptionError
from weightlab.merge import build_unet, merge_to_file
from weightlab.testing import max_rel_error

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]  # linear, 1x1 and 3x3 conv
ONE_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
OPTIONS = {  # LoraConfig options beyond r=4, target_modules=TARGETS
    "alpha": dict(lora_alpha=8),
    "patterns": dict(lora_alpha=6, rank_pattern={ONE_Q: 2, "conv1": 6}, alpha_pattern={"to_k": 3, "conv2": 10}),
    "rslora": dict(lora_alpha=6, use_rslora=True, rank_pattern={"to_v": 2}, alpha_pattern={"to_out.0": 1}),
    "dora": dict(lora_alpha=8, use_dora=True, rank_pattern={"conv2": 2}),
}


@pytest.fixture(scope="module")
def base_unet(tiny):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny.base_dir / "unet")


def _train_magnitudes(model) -> None:
    """DoRA starts with m = ‖W + ΔW‖ (a plain LoRA); move every magnitude as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape))


def _peft_adapter(base_unet, folder, options: dict, seed: int = 0):
    """PEFT's ``get_peft_model`` + ``save_pretrained``; returns PEFT's own merged state dict."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so every delta is live
    model = get_peft_model(copy.deepcopy(base_unet),
                           LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, **options))
    _train_magnitudes(model)
    model.save_pretrained(folder)
    return model.merge_and_unload().state_dict()


@pytest.mark.parametrize("given", ["folder", "weights file"])
@pytest.mark.parametrize("case", OPTIONS)
def test_peft_adapter_matches_merge_and_unload(tiny, base_unet, tmp_path, case, given):
    ref = _peft_adapter(base_unet, tmp_path / "adapter", OPTIONS[case])
    source = tmp_path / "adapter" if given == "folder" else tmp_path / "adapter" / "adapter_model.safetensors"
    ours = build_unet(Recipe(base=str(tiny.base_dir), terms=[Term(source=str(source), kind="style")]))
    assert max_rel_error(ref, ours.state_dict()) <= 1e-6


def test_peft_weights_without_their_options_use_alpha_equal_rank(tiny, base_unet, tmp_path):
    """Alone, PEFT's weights file carries no alpha: alpha = rank (diffusers' convention), and inspect says so."""
    from weightlab.inspect import inspect_path

    _peft_adapter(base_unet, tmp_path / "adapter", OPTIONS["alpha"])
    alone = shutil.copy(tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "alone.safetensors")
    assert "alpha = rank" in inspect_path(alone).alpha_source
    assert "adapter_config.json" in inspect_path(tmp_path / "adapter").alpha_source
    assert inspect_path(tmp_path / "adapter").weights_file == str(tmp_path / "adapter" / "adapter_model.safetensors")
    # PEFT's reading of the same weights with alpha = r is the reference for the alpha = rank merge.
    ref = _peft_adapter(base_unet, tmp_path / "as_rank", dict(lora_alpha=4))
    ours = build_unet(Recipe(base=str(tiny.base_dir), terms=[Term(source=str(alone), kind="style")]))
    assert max_rel_error(ref, ours.state_dict()) <= 1e-6


def _diffusers_lora(base_unet, folder, options: dict, seed: int = 1):
    """A LoRA written by diffusers' ``save_lora_weights`` with the adapter's options as ``lora_adapter_metadata``."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(base_unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, **options))
    _train_magnitudes(unet)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("case", OPTIONS)
def test_diffusers_metadata_matches_fuse_lora(tiny, base_unet, diffusers_pipe_factory, tmp_path, case):
    # DoRA at scale 1 only: diffusers' lora_scale s merges m·(W + sΔW)/‖W + sΔW‖, while a weightlab scale is the
    # strength of the DoRA residual (ComfyUI's and LyCORIS's meaning); the two agree at s = 1.
    scale = 1.0 if case == "dora" else 0.7
    path = _diffusers_lora(base_unet, tmp_path, OPTIONS[case])
    ref = diffusers_pipe_factory([(path, scale)], motion=False).unet.state_dict()
    for source in (path, tmp_path):  # the file, and the folder save_lora_weights wrote
        ours = build_unet(Recipe(base=str(tiny.base_dir), terms=[Term(source=str(source), kind="style", scale=scale)]))
        assert max_rel_error(ref, ours.state_dict()) <= 1e-6


def test_contradicting_rank_writes_nothing(tiny, base_unet, tmp_path):
    """Options whose rank disagrees with the tensors: an error naming the option and module; no output file."""
    import json

    _peft_adapter(base_unet, tmp_path / "adapter", OPTIONS["alpha"])
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "rank_pattern": {"conv1": 8}}))
    out = tmp_path / "merged.safetensors"
    recipe = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tmp_path / "adapter"), kind="style")])
    with pytest.raises(AdapterOptionError, match=r"rank 4 but `rank_pattern\['conv1'\]` = 8.*Fix:"):
        merge_to_file(recipe, out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "adapter"]


def test_dora_reweighting_starts_from_the_pristine_base(tiny, base_unet, tmp_path):
    """A DoRA term's residual is its merged weight minus w0: scale 1 is PEFT's merge (above), scale 0 the base
    bit for bit, and any path of re-weightings ends in the same bits as a fresh merge."""
    from weightlab.loading import load
    from weightlab.merge import Input, Merger

    _peft_adapter(base_unet, tmp_path / "dora", OPTIONS["dora"])
    unet = copy.deepcopy(base_unet)
    merger = Merger(unet, load(tiny.base_dir, kind="base"), [Input(load(tmp_path / "dora"), "style", 1.0, "d")]).apply()
    once = {k: v.clone() for k, v in unet.state_dict().items()}
    merger.set_scale(0, 0.0)
    assert all(torch.equal(v, base_unet.state_dict()[k]) for k, v in unet.state_dict().items())
    merger.set_scale(0, 0.4).set_scale(0, -2.0).set_scale(0, 1.0)
    assert all(torch.equal(v, once[k]) for k, v in unet.state_dict().items())


def test_dora_without_every_magnitude_writes_nothing(tiny, base_unet, tmp_path):
    from safetensors.torch import load_file, save_file

    _peft_adapter(base_unet, tmp_path / "dora", OPTIONS["dora"])
    weights = tmp_path / "dora" / "adapter_model.safetensors"
    sd = load_file(weights)
    gone = next(k for k in sorted(sd) if k.endswith("conv1.lora_magnitude_vector"))
    save_file({k: v for k, v in sd.items() if k != gone}, weights)
    out = tmp_path / "merged.safetensors"
    recipe = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tmp_path / "dora"), kind="style")])
    with pytest.raises(AdapterOptionError, match=r"magnitude vector .* 1 have none: .*conv1.*Fix:"):
        merge_to_file(recipe, out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("prefix", ["lycoris_", "lora_unet_"])  # LyCORIS's wrapper; kohya's sd-scripts
@pytest.mark.parametrize("wd_on_output", [True, False], ids=["per-output", "per-input"])
def test_lycoris_dora_matches_merge_to(tiny, base_unet, tmp_path, wd_on_output, prefix):
    """LyCORIS's DoRA (``dora_scale`` [out, 1, ...] or [1, in, ...]) over every Linear/Conv of the UNet blocks."""
    from lycoris import create_lycoris
    from safetensors.torch import load_file, save_file

    unet = copy.deepcopy(base_unet)
    torch.manual_seed(2)
    net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo="lora", dora_wd=True,
                         wd_on_output=wd_on_output)
    net.apply_to()
    with torch.no_grad():  # lora_up starts at zero and dora_scale at ‖W‖: move both as training would
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.copy_(0.3 * torch.randn(p.shape))
            elif "dora_scale" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape))
    net.save_weights(str(tmp_path / "dora.safetensors"), torch.float32, None)
    net.merge_to(1.0)
    sd = load_file(tmp_path / "dora.safetensors")
    save_file({prefix + k.removeprefix("lycoris_"): v for k, v in sd.items()}, tmp_path / "keys.safetensors")
    ours = build_unet(Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tmp_path / "keys.safetensors"), kind="style")]))
    assert max_rel_error(unet.state_dict(), ours.state_dict()) <= 1e-6
