"""``weightlab inspect``: the facts it reports, its two hashes, and clean failures."""

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from weightlab.cli import app
from weightlab.files import state_dict_hash
from weightlab.inspect import inspect_path, inspect_table

runner = CliRunner()


def inspect_json(*args) -> dict | list:
    result = runner.invoke(app, ["inspect", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_json_reports_the_file(tiny, tmp_path):
    path = Path(shutil.copy(tiny.accel_lora, tmp_path / "accel.safetensors"))
    info, tensors = inspect_json(path), load_file(path)
    assert info["path"] == str(path) and info["weights_file"] == str(path) and info["format"] == "safetensors"
    assert (info["family"], info["kind_guess"], info["representation"]) == ("sd15", "image_accel", "lora")
    assert info["ranks"] == [12] and info["alphas"] == [6.0] and info["n_targets"] == len(tensors) // 3
    assert info["dtypes"] == ["float32"] and info["skipped"] == [] and info["config"] is None
    assert info["n_params"] == sum(t.numel() for t in tensors.values()) and info["size_bytes"] == path.stat().st_size
    assert info["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["tensor_hash"] == state_dict_hash(tensors)

    save_file(tensors, tmp_path / "edited.safetensors", metadata={"note": "only the header changed"})
    edited = inspect_json(tmp_path / "edited.safetensors")
    assert edited["tensor_hash"] == info["tensor_hash"] and edited["file_sha256"] != info["file_sha256"]
    key = sorted(tensors)[0]
    save_file({**tensors, key: tensors[key] + 1}, tmp_path / "changed.safetensors")
    assert inspect_json(tmp_path / "changed.safetensors")["tensor_hash"] != info["tensor_hash"]


def test_inspect_folders_and_several_paths(tiny):
    base, adapter = inspect_json(tiny.base_dir, tiny.motion_dir)
    assert base["format"] == "diffusers" and base["kind_guess"] == "base"
    assert base["config"]["block_out_channels"] == [16, 32, 64, 64]
    assert base["weights_file"] == str(tiny.base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert (adapter["kind_guess"], adapter["representation"]) == ("motion", "module")


def test_inspect_table_has_a_row_per_file(tiny):
    console = Console(width=250, file=io.StringIO())
    console.print(inspect_table([inspect_path(p) for p in tiny.files().values()]))
    text = console.file.getvalue()
    for path in tiny.files().values():
        assert path.name in text
    assert all(word in text for word in ("image_accel", "motion_lora", "module", "sd15"))


def test_help_lists_commands():
    exe = Path(sys.executable).with_name("weightlab")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "inspect" in result.stdout and "Show family, kind" in result.stdout


@pytest.mark.parametrize("content", [b"\x05\x00\x00\x00\x00\x00\x00\x00{}", b""])
def test_corrupt_file_exits_2_with_one_line(tmp_path, content):
    (tmp_path / "bad.safetensors").write_bytes(content)
    result = runner.invoke(app, ["inspect", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: FileFormatError:")
    assert "Traceback" not in result.output


def test_error_quoting_markup_like_keys_stays_clean(tmp_path):
    import torch

    save_file({"[/weird]": torch.zeros(1)}, tmp_path / "odd.safetensors")
    result = runner.invoke(app, ["inspect", str(tmp_path / "odd.safetensors")])
    assert result.exit_code == 2 and "[/weird]" in result.stderr


def test_inspect_pickle_folder_needs_the_flag(tiny, tmp_path):
    import torch

    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copy(tiny.motion_dir / "config.json", folder)
    torch.save(load_file(tiny.motion_dir / "diffusion_pytorch_model.safetensors"), folder / "diffusion_pytorch_model.bin")
    refused = runner.invoke(app, ["inspect", str(folder)])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
    info = inspect_json(folder, "--allow-pickle")
    assert info["weights_file"] == str(folder / "diffusion_pytorch_model.bin") and info["tensor_hash"] is None
    assert info["file_sha256"] == hashlib.sha256((folder / "diffusion_pytorch_model.bin").read_bytes()).hexdigest()
    assert info["n_params"] == inspect_path(tiny.motion_dir).n_params
