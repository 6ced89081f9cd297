"""`weightlab merge` end to end: flags and recipe files, folder and streamed outputs, registration."""

import json

import torch
from typer.testing import CliRunner

from weightlab.cli import app


def test_merge_cli_flags_file_and_recipe_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTLAB_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    out = tmp_path / "m.safetensors"
    res = runner.invoke(app, ["merge", "--base", str(tiny.base_ldm), "--style", f"{tiny.style_lora_peft}:0.8",
                              "--accel", str(tiny.accel_lora), "--motion", f"{tiny.motion_animatelcm}:1.0",
                              "--dtype", "float16", "--out", str(out), "--save-recipe", str(tmp_path / "r.yaml")])
    assert res.exit_code == 0, res.output
    assert "output hash:" in res.output
    from weightlab.files import read_header, tensor_hash

    meta = read_header(out).metadata
    assert meta["weightlab.output_hash"] == tensor_hash(out) and meta["weightlab.output_hash"] in res.output
    assert json.loads(meta["weightlab.recipe"])["terms"][0]["scale"] == 0.8

    res = runner.invoke(app, ["merge", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "folder"),
                              "--register", "me/video"])
    assert res.exit_code == 0, res.output
    from diffusers import UNetMotionModel
    from safetensors.torch import load_file

    folder = UNetMotionModel.from_pretrained(tmp_path / "folder").state_dict()
    single = load_file(out)
    assert all(torch.equal(folder[k], single[k]) for k in single)
    assert "registered: me/video@1" in res.output
    from weightlab.registry.service import Registry

    with Registry() as reg:
        node = reg.lineage("me/video@1")
    assert sorted((e.role, e.scale) for e in node.inputs) == [("base", None), ("image_accel", 1.0), ("motion", 1.0), ("style", 0.8)]


def test_merge_cli_bad_input_exits_2_without_output(tiny, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    out = tmp_path / "never.safetensors"
    res = runner.invoke(app, ["merge", "--base", str(tiny.base_dir), "--style", str(bad), "--out", str(out)])
    assert res.exit_code == 2 and "error:" in res.output
    assert not out.exists() and not list(tmp_path.glob(".never*"))
