"""ONNX exports as versions of kind ``onnx``: checked by their manifest and the ONNX checker, never loaded."""

from __future__ import annotations

import json

import pytest

from weightlab.errors import FileFormatError, RegistryError
from weightlab.testing import build_onnx_stub


@pytest.fixture
def stub(tmp_path):
    return build_onnx_stub(tmp_path / "export")


def _manifest(folder, **changes):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["models"]["unet"].update(changes.pop("unet", {}))
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_onnx_export_is_a_folder_version(reg, stub):
    v = reg.add(stub, name="me/anim-onnx", tags=["onnx"])
    assert (v.kind, v.format, v.family, v.representation, v.is_folder) == ("onnx", "onnx", "sd15", "graph", True)
    assert sorted(f.path for f in v.files) == ["manifest.json", "unet/model.onnx", "unet/model.onnx.data"]
    assert v.n_params == 4 * 4 * 3 * 3 and v.dtypes == ["float32"] and v.config["opset"] == 18
    assert reg.add(stub, name="me/anim-onnx", kind="onnx").ref == v.ref  # same files: the same version
    assert [x.ref for x in reg.search(kind="onnx")] == [v.ref]
    copy = reg.path(v.ref)  # symlinks to blobs: still a valid export (the checker never follows them)
    assert (copy / "unet" / "model.onnx.data").read_bytes() == (stub / "unet" / "model.onnx.data").read_bytes()
    with pytest.raises(RegistryError, match="is an ONNX export, not a residual to load. Fix: use path"):
        reg.open(v.ref)


def _escape_data(folder):
    import hashlib

    import onnx

    graph = folder / "unet" / "model.onnx"
    proto = onnx.load(str(graph), load_external_data=False)
    for e in proto.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../../etc/passwd"
    graph.write_bytes(proto.SerializeToString())
    _manifest(folder, unet={"graph_sha256": hashlib.sha256(graph.read_bytes()).hexdigest()})


@pytest.mark.parametrize("break_it, words", [
    (lambda f: (f / "manifest.json").write_text("{"), "not readable JSON"),
    (lambda f: _manifest(f, format="other"), "not a weightlab.onnx version 1 manifest"),
    (lambda f: _manifest(f, models={}), "no `unet` graph"),
    (lambda f: _manifest(f, unet={"graph": "../../model.onnx"}), "not a relative path inside the folder"),
    (lambda f: _manifest(f, unet={"graph_sha256": "0" * 64}), "does not have the sha256 the manifest records"),
    (lambda f: (f / "unet" / "model.onnx.data").write_bytes(b"\0" * 8), "does not fit in model.onnx.data"),
    (lambda f: (f / "unet" / "model.onnx.data").unlink(), "unet/model.onnx.data is missing"),
    (_escape_data, "points at '../../etc/passwd'"),
])
def test_broken_exports_are_refused(sqlite_reg, stub, break_it, words):
    break_it(stub)
    with pytest.raises(FileFormatError, match=words):
        sqlite_reg.add(stub, name="me/x")
    assert sqlite_reg.search(all_versions=True) == []


def test_graph_that_fails_the_checker(sqlite_reg, stub):
    import hashlib

    import onnx

    graph = stub / "unet" / "model.onnx"
    proto = onnx.load(str(graph), load_external_data=False)
    proto.graph.node[0].op_type = "NoSuchOp"
    graph.write_bytes(proto.SerializeToString())
    _manifest(stub, unet={"graph_sha256": hashlib.sha256(graph.read_bytes()).hexdigest()})
    with pytest.raises(FileFormatError, match="fails the ONNX checker"):
        sqlite_reg.add(stub, name="me/x")


def test_kind_and_shape_mismatches(sqlite_reg, stub, tiny, tmp_path):
    with pytest.raises(RegistryError, match="cannot be registered as 'base'"):
        sqlite_reg.add(stub, name="me/x", kind="base")
    with pytest.raises(FileFormatError, match="manifest.json is not readable"):
        sqlite_reg.add(tiny.motion_dir, name="me/x", kind="onnx")
    with pytest.raises(RegistryError, match="is a single file"):
        sqlite_reg.add(tiny.style_lora_kohya, name="me/x", kind="onnx")
    assert sqlite_reg.search(all_versions=True) == []


def test_manifest_and_onnx_checks_import_without_torch_or_sqlalchemy(stub):
    # The HTTP client imports onnx_artifact (check_residual); neither it nor the manifest model may pull in torch
    # or the database stack. A child process with both blocked reads the stub's manifest.
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(torch=None, sqlalchemy=None)\n"
            "from weightlab.onnx_manifest import OnnxManifest\n"
            "import weightlab.registry.onnx_artifact\n"
            f"print(OnnxManifest.read({str(stub)!r}).models['unet'].graph)")
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "unet/model.onnx", proc.stderr
