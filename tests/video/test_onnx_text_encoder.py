"""The ONNX export's text encoder carries the style's text-encoder residual, and re-weighting keeps it in step with
the UNet (issue 13, "Components").

Reference kind: diffusers' own ``load_lora_weights`` + ``fuse_lora(components=["text_encoder"], lora_scale=α)`` of the
same kohya file (``lora_te_*`` keys with ``.alpha``), run through transformers' ``CLIPTextModel`` in fp32, against the
exported graph run by ONNX Runtime on fixed tokens. Tolerance 1e-5 x max |reference| (the output's scale): the fused
weights differ from ours by a few fp32 ULPs (diffusers rounds twice, we once; ~1e-7 relative) and ONNX Runtime sums
in another order (measured 4e-7 in tests/video/test_onnx_export.py). The residual moves the output by order 1 of its
scale (checked: > 1e-2, a thousand times the tolerance), so a text encoder without it, or with another α, fails.
"""

import hashlib
import json

import numpy as np
import pytest
import torch

STYLE, STYLE2 = 0.8, 0.3
TOL = 1e-5


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recipe(tiny, style, scale):
    from weightlab import Recipe, Term

    return Recipe(base=str(tiny.base_dir), terms=[
        Term(source=str(style), kind="style", scale=scale),
        Term(source=str(tiny.accel_lora), kind="image_accel", scale=1.0),
        Term(source=str(tiny.motion_dir), kind="motion", scale=1.0)])


@pytest.fixture(scope="module")
def te_export(tiny, style_lora_te, tmp_path_factory):
    from weightlab.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("te_onnx") / "export"
    export_onnx(_recipe(tiny, style_lora_te, STYLE), folder, progress=False)
    return folder


@pytest.fixture
def export_copy(te_export, tmp_path):
    import shutil

    return shutil.copytree(te_export, tmp_path / "export")


@pytest.fixture(scope="module")
def ids(te_export):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(te_export / "tokenizer")
    return tokenizer(["a cat walking on the beach", ""], padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(torch.int64)


def _fused(tiny, style, scale):
    """diffusers' text encoder with the LoRA fused at ``scale`` (None: the base's)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny.base_dir)
    if scale is not None:
        pipe.load_lora_weights(str(style))
        pipe.fuse_lora(components=["text_encoder"], lora_scale=scale)
        pipe.unload_lora_weights()
    return pipe.text_encoder.eval()


def _outputs(folder, ids, text_encoder):
    """(ONNX Runtime's output, PyTorch's output of ``text_encoder``) on ``ids``."""
    from weightlab.onnx_runtime import create_session

    got = create_session(folder / "text_encoder" / "model.onnx", "cpu").run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        ref = text_encoder(ids)[0].numpy()
    return got, ref


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_exported_text_encoder_carries_the_style_residual(tiny, style_lora_te, te_export, ids):
    from weightlab.files import state_dict_hash
    from weightlab.merge import build_text_encoder
    from weightlab.onnx_manifest import OnnxManifest

    fused = _fused(tiny, style_lora_te, STYLE)
    got, ref = _outputs(te_export, ids, fused)
    assert _rel(got, ref) <= TOL
    _, base = _outputs(te_export, ids, _fused(tiny, style_lora_te, None))
    assert _rel(base, ref) > 1e-2  # the residual matters: the base's text encoder fails the check above
    manifest = OnnxManifest.read(te_export)
    assert manifest.text_encoder_merged is True
    assert manifest.text_encoder_sha256 == state_dict_hash(build_text_encoder(_recipe(tiny, style_lora_te, STYLE)).state_dict())
    assert manifest.models["text_encoder"].verification.max_rel_err <= 1e-4


def test_reweight_rewrites_the_text_encoder_with_the_unet(tiny, style_lora_te, export_copy, ids):
    from weightlab.onnx_export import reweight_onnx

    te_graph, te_data = export_copy / "text_encoder" / "model.onnx", export_copy / "text_encoder" / "model.onnx.data"
    graph_bytes, te_before, unet_before = te_graph.read_bytes(), _sha(te_data), _sha(export_copy / "unet" / "model.onnx.data")
    vae = _sha(export_copy / "vae_decoder" / "model.onnx.data")
    manifest = reweight_onnx(export_copy, _recipe(tiny, style_lora_te, STYLE2))
    assert te_graph.read_bytes() == graph_bytes and _sha(te_data) != te_before
    assert _sha(export_copy / "unet" / "model.onnx.data") != unet_before
    assert _sha(export_copy / "vae_decoder" / "model.onnx.data") == vae
    assert not list(export_copy.rglob("*.old")) and not list(export_copy.rglob("*.new"))
    got, ref = _outputs(export_copy, ids, _fused(tiny, style_lora_te, STYLE2))
    assert _rel(got, ref) <= TOL
    assert manifest.text_encoder_merged is True and manifest.models["text_encoder"].verification.max_rel_err <= 1e-4
    # Back to a style without a text-encoder half: the text encoder is the base's again.
    manifest = reweight_onnx(export_copy, _recipe(tiny, tiny.style_lora_kohya, STYLE))
    got, ref = _outputs(export_copy, ids, _fused(tiny, style_lora_te, None))
    assert _rel(got, ref) <= TOL and manifest.text_encoder_merged is False


def test_reweight_leaves_an_unchanged_text_encoder_alone(tiny, style_lora_te, export_copy):
    from weightlab.onnx_export import reweight_onnx

    te_data = export_copy / "text_encoder" / "model.onnx.data"
    before = _sha(te_data), te_data.stat().st_mtime_ns
    reweight_onnx(export_copy, _recipe(tiny, style_lora_te, STYLE).with_scale(2, 0.5), verify=False)  # only γ changes
    assert (_sha(te_data), te_data.stat().st_mtime_ns) == before


def test_failed_text_encoder_verification_puts_both_data_files_back(tiny, style_lora_te, export_copy, monkeypatch):
    from weightlab import onnx_export
    from weightlab.errors import ExportError

    files = [export_copy / name / "model.onnx.data" for name in ("unet", "text_encoder")]
    before = [_sha(f) for f in files]
    manifest = (export_copy / "manifest.json").read_bytes()
    verify = onnx_export._verify

    def disagree(spec, *args):
        if spec.name == "text_encoder":  # after the UNet's verification passed
            raise ExportError("text_encoder: ONNX Runtime differs from PyTorch")
        return verify(spec, *args)

    monkeypatch.setattr(onnx_export, "_verify", disagree)
    with pytest.raises(ExportError, match="differs"):
        onnx_export.reweight_onnx(export_copy, _recipe(tiny, style_lora_te, STYLE2))
    assert [_sha(f) for f in files] == before and (export_copy / "manifest.json").read_bytes() == manifest
    for f in files:
        assert sorted(p.name for p in f.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_manifest_without_text_encoder_fields_still_reads(te_export):
    from weightlab.onnx_manifest import OnnxManifest

    doc = json.loads((te_export / "manifest.json").read_text())
    del doc["text_encoder_sha256"], doc["text_encoder_merged"]  # as written before they existed
    old = OnnxManifest.parse(json.dumps(doc), where="old manifest.json")
    assert old.text_encoder_sha256 is None and old.text_encoder_merged is None
    assert old.engine_key == old.weights_sha256[:16]  # an old export keeps its TensorRT engine cache
    new = OnnxManifest.read(te_export)
    assert new.engine_key != old.engine_key  # a new text encoder means a new engine


def test_reweight_refuses_a_recipe_that_changes_the_vae(tiny, style_lora_te, export_copy, tmp_path):
    """Bad input: a term carrying a VAE residual (a fine-tuned pipeline's vae/ as a dense term); re-weighting rewrites
    only the UNet and the text encoder, so it refuses before touching any file of the export."""
    import shutil

    from safetensors.torch import load_file, save_file

    from weightlab import Term
    from weightlab.errors import ExportError
    from weightlab.onnx_export import reweight_onnx

    tuned = shutil.copytree(tiny.base_dir, tmp_path / "tuned")
    vae_file = tuned / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(vae_file).items()}, vae_file)
    recipe = _recipe(tiny, style_lora_te, STYLE)
    recipe = recipe.model_copy(update={"terms": [*recipe.terms, Term(source=str(tuned), kind="style", scale=0.5,
                                                                     components=["vae"])]})
    before = {p: _sha(p) for p in export_copy.rglob("*") if p.is_file()}
    with pytest.raises(ExportError, match="VAE"):
        reweight_onnx(export_copy, recipe, verify=False)
    assert {p: _sha(p) for p in export_copy.rglob("*") if p.is_file()} == before
