"""ONNX export: UNet vs PyTorch, manifest, dynamic dimensions, stable initializers, re-weighting in place."""

import hashlib
import json

import numpy as np
import pytest


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session(folder, model="unet"):
    from weightlab.onnx_runtime import create_session

    return create_session(folder / model / "model.onnx", "cpu")


def _unet_inputs(batch, frames, h, w, t, seed, text_dim=32):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, frames, h, w, generator=g),
            "timestep": torch.tensor(t, dtype=torch.int64),
            "encoder_hidden_states": torch.randn(batch * frames, 77, text_dim, generator=g)}


def _max_err(session, unet, inputs):
    import torch

    with torch.no_grad():
        ref = unet(**inputs, return_dict=False)[0].numpy()
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    return float(np.abs(got - ref).max()), got


@pytest.fixture(scope="module")
def unet(recipe):
    from weightlab import build_unet

    return build_unet(recipe)


@pytest.fixture(scope="module")
def unet_session(onnx_dir):
    return _session(onnx_dir)


@pytest.mark.parametrize("shape", [(1, 16, 16, 16, 999), (2, 8, 24, 16, 459)])  # batch, frames, h, w, t
def test_onnx_unet_matches_pytorch_fp32(unet_session, unet, shape):
    err, _ = _max_err(unet_session, unet, _unet_inputs(*shape, seed=7, text_dim=unet.config.cross_attention_dim))
    assert err <= 1e-4


def _rel_err(session, inputs, ref) -> float:
    """max |ONNX Runtime - PyTorch| / max |PyTorch|, both fp32 on the CPU."""
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert got.shape == tuple(ref.shape)
    return float(np.abs(got - ref.numpy()).max() / ref.abs().max())


# The text encoder and VAE decoder graphs against the PyTorch models they were exported from (transformers'
# CLIPTextModel, diffusers' AutoencoderKL: the defining code), run here rather than trusting the error numbers the
# exporter wrote into its own manifest, at shapes other than the exporter's verification cases (so the dynamic
# dimensions are exercised too). Tolerance 1e-5 x the output's scale: both sides compute in fp32 and differ only in
# summation order (ONNX Runtime fuses and reorders ops); measured here 4e-7 (text encoder) and 1e-6 (VAE decoder).
# A wrong weight, op or frozen dimension is off by order 1.
def test_onnx_text_encoder_matches_transformers(onnx_dir, recipe):
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    model = CLIPTextModel.from_pretrained(f"{recipe.base}/text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(onnx_dir / "tokenizer")
    prompts = ["a cat walking", "", "a very long prompt " * 30]  # batch 3; empty; truncated to the max length
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids)[0]
    assert _rel_err(_session(onnx_dir, "text_encoder"), {"input_ids": ids.to(torch.int64)}, ref) <= 1e-5


@pytest.mark.parametrize("shape", [(5, 24, 16), (1, 16, 32)])  # images, latent height, latent width
def test_onnx_vae_decoder_matches_diffusers(onnx_dir, recipe, shape):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(f"{recipe.base}/vae").eval()
    latents = torch.randn(shape[0], vae.config.latent_channels, *shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vae.decode(latents).sample
    assert _rel_err(_session(onnx_dir, "vae_decoder"), {"latents": latents}, ref) <= 1e-5


def test_manifest_records_verification_shapes_opset_and_hashes(onnx_dir, recipe):
    m = json.loads((onnx_dir / "manifest.json").read_text())
    assert m["dtype"] == "float32" and isinstance(m["opset"], int) and m["opset"] >= 18
    assert m["recipe_hash"] == recipe.hash and len(m["weights_sha256"]) == 64
    for name in ("unet", "text_encoder", "vae_decoder"):
        entry = m["models"][name]
        check = entry["verification"]
        assert check["max_abs_err"] <= 1e-4 and check["max_rel_err"] <= 1e-4
        assert len(check["cases"]) == 2
        assert all(len(spec["sha256"]) == 64 and "shape" in spec for case in check["cases"] for spec in case.values())
        assert entry["export_seconds"] > 0 and entry["bytes"]["data"] > entry["bytes"]["graph"] / 1000
        assert (onnx_dir / entry["graph"]).is_file() and (onnx_dir / entry["data"]).is_file()
        assert entry["notes"]
    assert m["pipeline"]["max_frames"] == 32 and m["pipeline"]["text_max_length"] == 77


def test_dynamic_dimensions_stay_dynamic_and_static_ones_are_documented(onnx_dir):
    m = json.loads((onnx_dir / "manifest.json").read_text())
    unet = m["models"]["unet"]
    sample = unet["inputs"]["sample"]
    assert all(isinstance(sample[a], str) for a in (0, 2, 3, 4)) and sample[1] == 4
    assert set(unet["dynamic"]["sample"]) == {"0", "2", "3", "4"}
    assert isinstance(unet["inputs"]["encoder_hidden_states"][0], str)
    assert unet["inputs"]["encoder_hidden_states"][1] == 77 and "77" in unet["notes"]
    assert unet["inputs"]["timestep"] == []
    assert isinstance(m["models"]["text_encoder"]["inputs"]["input_ids"][0], str)
    latents = m["models"]["vae_decoder"]["inputs"]["latents"]
    assert isinstance(latents[0], str) and isinstance(latents[2], str) and isinstance(latents[3], str)


def test_every_unet_weight_is_an_external_initializer_named_after_its_parameter(onnx_dir, unet):
    import onnx

    proto = onnx.load(str(onnx_dir / "unet" / "model.onnx"), load_external_data=False)
    names = {i.name for i in proto.graph.initializer}
    assert names == set(unet.state_dict())
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer if i.dims != [0])
    table = json.loads((onnx_dir / "manifest.json").read_text())["models"]["unet"]["initializers"]
    assert set(table) == names


def test_reweight_rewrites_only_the_data_file_and_matches_a_fresh_export(onnx_copy, onnx_dir2, recipe2):
    from weightlab.onnx_export import reweight_onnx
    from weightlab.onnx_manifest import OnnxManifest

    graph, data = onnx_copy / "unet" / "model.onnx", onnx_copy / "unet" / "model.onnx.data"
    graph_bytes, data_hash = graph.read_bytes(), _sha(data)
    others = {p: _sha(p) for p in onnx_copy.rglob("*") if p.is_file() and p != data and p.name != "manifest.json"}
    manifest = reweight_onnx(onnx_copy, recipe2)
    assert graph.read_bytes() == graph_bytes
    assert _sha(data) != data_hash
    assert {p: _sha(p) for p in others} == others  # text encoder, VAE, tokenizer, scheduler untouched
    assert not list(onnx_copy.rglob("*.old")) and not list(onnx_copy.rglob("*.new"))
    # Same names, layout and values as exporting recipe2 from scratch: the data files are byte-identical.
    assert data.read_bytes() == (onnx_dir2 / "unet" / "model.onnx.data").read_bytes()
    assert manifest.recipe_hash == recipe2.hash and manifest.reweighted is not None
    assert manifest.models["unet"].verification.max_abs_err <= 1e-4  # the new weights vs PyTorch
    assert OnnxManifest.read(onnx_copy) == manifest  # what was written is what was returned
    inputs = {k: v.numpy() for k, v in _unet_inputs(2, 4, 16, 16, 700, seed=3).items()}
    np.testing.assert_array_equal(_session(onnx_copy).run(None, inputs)[0], _session(onnx_dir2).run(None, inputs)[0])


def test_reweight_cli_and_untouched_graph_check(onnx_copy, recipe2, tmp_path):
    from typer.testing import CliRunner

    from weightlab.cli import app

    recipe_file = recipe2.save(tmp_path / "r2.yaml")
    result = CliRunner().invoke(app, ["export", "reweight", "--onnx", str(onnx_copy), "--recipe", str(recipe_file),
                                      "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "unet" in result.output
    with open(onnx_copy / "unet" / "model.onnx", "ab") as f:
        f.write(b"\0")
    result = CliRunner().invoke(app, ["export", "reweight", "--onnx", str(onnx_copy), "--recipe", str(recipe_file)])
    assert result.exit_code == 2 and "changed since it was exported" in result.output


def test_failed_verification_puts_the_previous_weights_back(onnx_copy, recipe2, monkeypatch):
    from weightlab import onnx_export
    from weightlab.errors import ExportError

    data = onnx_copy / "unet" / "model.onnx.data"
    before = _sha(data)

    def disagree(*args, **kwargs):
        raise ExportError("unet: ONNX Runtime differs from PyTorch")

    monkeypatch.setattr(onnx_export, "_verify", disagree)
    with pytest.raises(ExportError, match="differs"):
        onnx_export.reweight_onnx(onnx_copy, recipe2)
    assert _sha(data) == before
    assert sorted(p.name for p in data.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_reweight_refuses_another_architecture(onnx_copy, tiny):
    from weightlab import Recipe, Term
    from weightlab.errors import RecipeError
    from weightlab.onnx_export import reweight_onnx

    before = _sha(onnx_copy / "unet" / "model.onnx.data")
    spatial = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tiny.style_lora_kohya), kind="style", scale=0.5)])
    with pytest.raises(RecipeError, match="motion"):
        reweight_onnx(onnx_copy, spatial)
    assert _sha(onnx_copy / "unet" / "model.onnx.data") == before


def test_export_refuses_bad_dtype_and_foreign_folder(recipe, tmp_path):
    from weightlab.errors import ExportError
    from weightlab.onnx_export import export_onnx

    with pytest.raises(ExportError, match="float32 or float16"):
        export_onnx(recipe, tmp_path / "a", dtype="bfloat16")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes.txt"):
        export_onnx(recipe, tmp_path / "b")
