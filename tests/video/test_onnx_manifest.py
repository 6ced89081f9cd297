"""The ONNX manifest as one typed model: what the exporter writes is what every reader parses, and a malformed
manifest is refused by each reader with the file and the field named, before anything changes."""

import hashlib
import json

import pytest


def test_the_written_manifest_is_the_model(onnx_dir, recipe):
    # Reference: the file `weightlab export onnx` wrote. Parsing it and dumping it again gives the same JSON, so no
    # field is dropped, renamed or retyped on the way through the model (a reweight rewrites it from the model).
    from weightlab.onnx_manifest import MANIFEST, OnnxManifest

    text = (onnx_dir / MANIFEST).read_text()
    manifest = OnnxManifest.read(onnx_dir)
    assert json.loads(manifest.model_dump_json()) == json.loads(text)
    assert manifest.recipe_hash == recipe.hash and set(manifest.models) == {"unet", "text_encoder", "vae_decoder"}


def _break(folder, *path, value):
    file = folder / "manifest.json"
    doc = json.loads(file.read_text())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    file.write_text(json.dumps(doc))
    return hashlib.sha256((folder / "unet" / "model.onnx.data").read_bytes()).hexdigest()


@pytest.mark.parametrize("path, value, field", [
    (("models", "unet", "bytes", "data"), "many", "models.unet.bytes.data"),
    (("pipeline", "max_frames"), None, "pipeline.max_frames"),
    (("weights_sha256",), "../../outside", "weights_sha256"),  # it names the TensorRT cache folder
    (("dtype",), "bfloat16", "dtype"),
])
def test_malformed_manifest_is_refused_by_every_reader(onnx_copy, recipe2, tmp_path, path, value, field):
    from typer.testing import CliRunner

    from weightlab.cli import app
    from weightlab.errors import FileFormatError
    from weightlab.onnx_export import reweight_onnx
    from weightlab.onnx_runtime import OnnxVideoPipeline

    before = _break(onnx_copy, *path, value=value)
    words = f"manifest.json: field `{field}`"
    with pytest.raises(FileFormatError, match=words):
        OnnxVideoPipeline(onnx_copy, provider="cpu")
    with pytest.raises(FileFormatError, match=words):
        reweight_onnx(onnx_copy, recipe2)
    result = CliRunner().invoke(app, ["export", "reweight", "--onnx", str(onnx_copy),
                                      "--recipe", str(recipe2.save(tmp_path / "r2.yaml"))])
    assert result.exit_code == 2 and field in result.output, result.output
    assert hashlib.sha256((onnx_copy / "unet" / "model.onnx.data").read_bytes()).hexdigest() == before


def test_an_export_without_manifest_is_incomplete(onnx_copy):
    from weightlab.errors import ExportError
    from weightlab.onnx_runtime import OnnxVideoPipeline

    (onnx_copy / "manifest.json").unlink()
    with pytest.raises(ExportError, match="no manifest.json; not a complete weightlab ONNX export"):
        OnnxVideoPipeline(onnx_copy, provider="cpu")
