"""Where a LoRA's alpha lives (``.alpha`` keys in any layout, PEFT options) and the options weightlab refuses.

Merge parity with PEFT and diffusers themselves is in tests/merge/test_merge_adapter_metadata.py; these tests
check loading against float64 math done here, and that bad options fail by name with a fix.
"""

import json
import math

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import weightlab
from weightlab.cli import app
from weightlab.errors import AdapterOptionError, FileFormatError

RANK = 4  # the tiny style LoRA's rank


@pytest.fixture(scope="module")
def factors(tiny) -> dict:
    """module path -> (down, up) of the tiny style LoRA."""
    return {p: (t.down.clone(), t.up.clone()) for p, t in weightlab.load(tiny.style_lora_kohya).targets.items()}


def _layout(factors: dict, name: str, alpha: float) -> dict:
    """The factors with an ``.alpha`` key per module, in one of the key layouts found in the wild."""
    sd = {}
    for path, (down, up) in factors.items():
        if name == "kohya":
            stem, d, u = "lora_unet_" + path.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif name == "diffusers-old":
            stem, d, u = f"unet.{path}", "lora.down.weight", "lora.up.weight"
        else:
            stem, d, u = {"peft": "base_model.model.", "diffusers": "unet."}[name] + path, "lora_A.weight", "lora_B.weight"
        sd.update({f"{stem}.{d}": down, f"{stem}.{u}": up, f"{stem}.alpha": torch.tensor(alpha)})
    return sd


@pytest.mark.parametrize("layout", ["kohya", "diffusers-old", "peft", "diffusers"])
def test_alpha_keys_in_any_layout(factors, tmp_path, layout):
    """Reference: float64 (alpha / rank) · up @ down, computed here. 1e-6 relative: our delta is an fp32 matmul."""
    save_file(_layout(factors, layout, 3.0), tmp_path / "l.safetensors")
    lora = weightlab.load(tmp_path / "l.safetensors")
    assert set(lora.targets) == set(factors) and lora.alpha_source == "`.alpha` keys"
    for path, (down, up) in factors.items():
        ref = (3.0 / RANK) * (up.double().flatten(1) @ down.double().flatten(1))
        ours = lora.targets[path].delta().double().flatten(1)
        assert (ours - ref).abs().max() <= 1e-6 * ref.abs().max(), path


def _peft_folder(factors: dict, folder, **options):
    """A PEFT adapter folder: keys as ``save_pretrained`` writes them, options written by PEFT's LoraConfig."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v for k, v in _layout(factors, "peft", 0.0).items() if not k.endswith(".alpha")},
              folder / "adapter_model.safetensors")
    LoraConfig(r=RANK, **options).save_pretrained(folder)
    return folder


def _scales(lora) -> dict:
    return {p: t.scale for p, t in lora.targets.items()}


def test_peft_options_per_module(factors, tmp_path):
    """PEFT's rules: pattern keys match a suffix of the module name (get_pattern_key); rsLoRA is alpha / √r.
    Reference: the scales written out here from PEFT's documented formula (float64)."""
    to_k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    folder = _peft_folder(factors, tmp_path / "a", lora_alpha=6, use_rslora=True, alpha_pattern={"attn1.to_k": 2})
    scales = _scales(weightlab.load(folder))
    for path, s in scales.items():
        alpha = 2 if path.endswith("attn1.to_k") else 6
        assert s == pytest.approx(alpha / math.sqrt(RANK), rel=1e-12), path
    assert scales[to_k] == pytest.approx(1.0)


def _with_metadata(factors, path, metadata: dict):
    """diffusers' keys with the options in ``lora_adapter_metadata``, as ``save_lora_weights`` writes them."""
    sd = {k: v for k, v in _layout(factors, "diffusers", 0.0).items() if not k.endswith(".alpha")}
    save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(metadata)})
    return path


def _options(**kw) -> dict:
    """``LoraConfig.to_dict()`` as JSON holds it (sets become lists)."""
    return json.loads(json.dumps(LoraConfig(r=RANK, **kw).to_dict(), default=list))


def test_save_round_trips_the_scales(factors, tmp_path):
    """A LoRA read from PEFT options saves its scales as `.alpha` keys (kohya's convention) and drops the options."""
    meta = {f"unet.{k}": v for k, v in _options(lora_alpha=6, use_rslora=True, alpha_pattern={"to_k": 1}).items()}
    lora = weightlab.load(_with_metadata(factors, tmp_path / "l.safetensors", meta))
    saved = lora.save(tmp_path / "saved.safetensors")
    with safe_open(saved, "pt") as f:
        assert "lora_adapter_metadata" not in f.metadata()
    again = weightlab.load(saved)
    assert again.alpha_source == "`.alpha` keys" and len(set(_scales(lora).values())) == 2
    assert _scales(again) == pytest.approx(_scales(lora), rel=1e-6)  # `.alpha` is stored in fp32


def test_metadata_prefixed_and_unprefixed(factors, tmp_path):
    """save_lora_weights prefixes the UNet's options with `unet.`; a model's save_lora_adapter does not."""
    options = _options(lora_alpha=2)
    for name, meta in {"pipe": {f"unet.{k}": v for k, v in options.items()}, "model": options}.items():
        lora = weightlab.load(_with_metadata(factors, tmp_path / f"{name}.safetensors", meta))
        assert set(_scales(lora).values()) == {0.5} and "lora_adapter_metadata" in lora.alpha_source
    # Only a text encoder's options: the UNet's modules have none (alpha = rank).
    te_only = {f"text_encoder.{k}": v for k, v in options.items()}
    lora = weightlab.load(_with_metadata(factors, tmp_path / "te.safetensors", te_only))
    assert set(_scales(lora).values()) == {1.0} and "alpha = rank" in lora.alpha_source


REFUSED = {
    "lora_bias": True, "layer_replication": [[0, 1]], "modules_to_save": ["conv_in"],
    "bias": "all", "init_lora_weights": "pissa", "peft_type": "LOHA", "use_qalora": True,
    "shiny_new_option": {"on": 1},
}


@pytest.mark.parametrize("where", ["adapter_config.json", "lora_adapter_metadata"])
@pytest.mark.parametrize("option", REFUSED)
def test_unimplemented_options_are_refused_by_name(factors, tmp_path, option, where):
    options = {**_options(lora_alpha=8), option: REFUSED[option]}
    if where == "adapter_config.json":
        path = _peft_folder(factors, tmp_path / "a")
        (path / "adapter_config.json").write_text(json.dumps(options))
    else:
        path = _with_metadata(factors, tmp_path / "l.safetensors", {f"unet.{k}": v for k, v in options.items()})
    with pytest.raises(AdapterOptionError, match=rf"`{option}`.*Fix:"):
        weightlab.load(path)


@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_rank_contradicting_tensors(factors, tmp_path, prefix):
    meta = {f"{prefix}r": 8, f"{prefix}lora_alpha": 8}
    with pytest.raises(AdapterOptionError, match=r"has rank 4 but `r` = 8.*Fix:"):
        weightlab.load(_with_metadata(factors, tmp_path / "l.safetensors", meta))


def test_conflicting_sources_and_bad_json(factors, tmp_path):
    folder = _peft_folder(factors, tmp_path / "a", lora_alpha=8)
    weights = folder / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 2})})
    with pytest.raises(AdapterOptionError, match="disagree.*Fix:"):
        weightlab.load(folder)
    save_file(load_file(weights), weights, metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(FileFormatError, match="not valid JSON.*Fix:"):
        weightlab.load(weights)
    # An `.alpha` key that disagrees with the options.
    sd = _layout(factors, "diffusers", 3.0)
    save_file(sd, tmp_path / "both.safetensors", metadata={"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 8})})
    with pytest.raises(AdapterOptionError, match=r"\.alpha` = 3 but the options give alpha 8"):
        weightlab.load(tmp_path / "both.safetensors")


def test_dora_needs_every_magnitude(factors, tmp_path):
    meta = {"unet.r": RANK, "unet.lora_alpha": 8, "unet.use_dora": True}  # DoRA options, no magnitude vectors
    with pytest.raises(AdapterOptionError, match=r"magnitude vector .* have none: .*Fix:"):
        weightlab.load(_with_metadata(factors, tmp_path / "l.safetensors", meta))


def test_lycoris_dora_round_trips(factors, tmp_path):
    """kohya/LyCORIS ``dora_scale`` per input channel ([1, in, ...]) keeps its definition through save and load."""
    sd = _layout(factors, "kohya", 4.0)
    for path, (down, _) in factors.items():
        sd["lora_unet_" + path.replace(".", "_") + ".dora_scale"] = torch.rand(1, down.shape[1], *[1] * (down.dim() - 2))
    save_file(sd, tmp_path / "dora.safetensors")
    lora = weightlab.load(tmp_path / "dora.safetensors")
    again = weightlab.load(lora.save(tmp_path / "saved.safetensors"))
    for path, t in again.targets.items():
        assert t.dora == "lycoris" and torch.equal(t.magnitude, lora.targets[path].magnitude)


def test_inspect_says_where_alphas_come_from(factors, tmp_path):
    folder = _peft_folder(factors, tmp_path / "a", lora_alpha=8)
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    text = result.stdout.replace("\n", "")  # rich wraps long lines at the terminal width
    assert "LoRA alphas from" in text and "adapter_config.json (r=4, lora_alpha=8)" in text
