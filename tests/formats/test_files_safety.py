"""Weight files are checked before they are trusted: pickles need opt-in and never run code, corrupt files fail cleanly."""

import json
import os
import pickle
import random
import re
import shlex
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import weightlab
from weightlab.errors import FileFormatError, UnsafeFileError, WeightlabError
from weightlab.files import (MAX_HEADER_BYTES, file_sha256, load_tensors, mmap_tensors, read_header, state_dict_hash,
                             tensor_hash)


def _file(header, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors-like file: 8-byte little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _t(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


GOOD = save({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, 3, dtype=torch.float16)})
CORRUPT = {
    "empty": b"",
    "shorter_than_length_field": b"\x01\x02\x03",
    "random_bytes": random.Random(1).randbytes(4096),
    "truncated": GOOD[:-5],
    "trailing_bytes": GOOD + b"\0\0",
    "header_length_over_limit": _file(b"{}", length=MAX_HEADER_BYTES + 1),
    "header_length_past_eof": _file(b"{}", length=1000),
    "header_not_json": _file(b"this is not json"),
    "header_not_utf8": _file(b'{"\xff\xfe": 1}'),
    "header_not_an_object": _file([1, 2]),
    "header_nested_deeply": _file(b"[" * 200_000),
    "duplicate_tensor_names": _file(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                    b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
    "overlapping_offsets": _file({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, bytes(12)),
    "hole_between_tensors": _file({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, bytes(12)),
    "offsets_outside_file": _file({"a": _t("F32", [4], 0, 16)}, bytes(8)),
    "reversed_offsets": _file({"a": _t("F32", [0], 8, 0)}, bytes(8)),
    "bytes_do_not_match_shape": _file({"a": _t("F32", [3], 0, 8)}, bytes(8)),
    "bad_dtype": _file({"a": _t("F33", [2], 0, 8)}, bytes(8)),
    "negative_dim": _file({"a": _t("F32", [-2], 0, 8)}, bytes(8)),
    "missing_field": _file({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "metadata_not_strings": _file({"__metadata__": {"n": 1}, "a": _t("F32", [2], 0, 8)}, bytes(8)),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_safetensors_raise_file_format_error(tmp_path, name):
    path = tmp_path / "w.safetensors"
    path.write_bytes(CORRUPT[name])
    with pytest.raises(FileFormatError, match=re.escape(str(path))):
        read_header(path)
    with pytest.raises(FileFormatError):
        weightlab.load(path)
    no_suffix = shutil.copy(path, tmp_path / "weights")  # detected by content, not by name
    with pytest.raises(WeightlabError):
        weightlab.load(no_suffix)


def test_header_validation_accepts_what_safetensors_writes(tmp_path):
    tensors = {"w": torch.randn(3, 4), "h": torch.ones(2, dtype=torch.bfloat16), "b": torch.tensor([True, False]),
               "i": torch.arange(5, dtype=torch.int64), "s": torch.tensor(1.5), "e": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"k": "v"})
    header = read_header(tmp_path / "ok.safetensors")
    assert header.metadata == {"k": "v"} and set(header.tensors) == set(tensors)
    assert tensor_hash(tmp_path / "ok.safetensors") == state_dict_hash(tensors)
    mapped = mmap_tensors(tmp_path / "ok.safetensors", header)
    assert all(torch.equal(mapped[k], v) for k, v in tensors.items())


def test_mmap_writes_never_reach_the_file(tmp_path):
    save_file({"w": torch.zeros(1024)}, tmp_path / "base.safetensors")
    digest = file_sha256(tmp_path / "base.safetensors")
    mmap_tensors(tmp_path / "base.safetensors")["w"].add_(1.0)
    assert file_sha256(tmp_path / "base.safetensors") == digest
    assert torch.equal(mmap_tensors(tmp_path / "base.safetensors")["w"], torch.zeros(1024))


def test_header_length_that_looks_like_pickle_magic_is_still_safetensors(tmp_path):
    name = next("x" * n for n in range(1, 700) if struct.unpack("<Q", save({"x" * n: torch.zeros(1)})[:8]) == (640,))
    save_file({name: torch.zeros(1)}, tmp_path / "w")
    assert (tmp_path / "w").read_bytes()[:2] == b"\x80\x02"  # 640 = 0x280: pickle's PROTO 2 opcode
    assert list(load_tensors(tmp_path / "w")[0]) == [name]


@pytest.mark.parametrize("name", ["lora.ckpt", "lora.pt", "pytorch_lora_weights.bin", "lora.weights", "renamed.safetensors"])
def test_pickle_is_refused_without_opt_in(tiny, tmp_path, name):
    torch.save(load_file(tiny.style_lora_kohya), tmp_path / name)
    with pytest.raises(UnsafeFileError) as e:
        weightlab.load(tmp_path / name)
    assert "allow_pickle=True" in str(e.value) and "arbitrary code" in str(e.value)


def test_pickle_is_read_with_opt_in(tiny, tmp_path):
    kohya = load_file(tiny.style_lora_kohya)
    tied = torch.arange(6.0).reshape(2, 3)  # views and tied weights share storage; safetensors needs them apart
    torch.save({"state_dict": {**kohya, "tied": tied, "row": tied[1], "col": tied.t()}, "epoch": 3}, tmp_path / "w.ckpt")
    tensors, metadata = load_tensors(tmp_path / "w.ckpt", allow_pickle=True)
    assert metadata == {} and set(tensors) == {*kohya, "tied", "row", "col"}
    assert torch.equal(tensors["row"], tied[1]) and torch.equal(tensors["col"], tied.t())
    assert all(torch.equal(tensors[k], v) for k, v in kohya.items())


def test_pickle_diffusers_folder_needs_opt_in(tiny, tmp_path):
    folder = tmp_path / "motion_adapter"
    folder.mkdir()
    shutil.copy(tiny.motion_dir / "config.json", folder)
    torch.save(load_file(tiny.motion_dir / "diffusion_pytorch_model.safetensors"), folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        weightlab.load(folder)
    opted_in, reference = weightlab.load(folder, allow_pickle=True), weightlab.load(tiny.motion_dir)
    assert opted_in.weights.keys() == reference.weights.keys()
    assert all(torch.equal(v, reference.weights[k]) for k, v in opted_in.weights.items())


class _RunsShell:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_fails_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": _RunsShell(f"touch {shlex.quote(str(marker))}")}, tmp_path / "evil.ckpt")
    with pytest.raises(FileFormatError, match="posix.system"):
        weightlab.load(tmp_path / "evil.ckpt", allow_pickle=True)
    assert not marker.exists()
    # Control: the payload is live; plain unpickling (never done by weightlab) runs it.
    pickle.loads(pickle.dumps(_RunsShell(f"touch {shlex.quote(str(marker))}")))
    assert marker.exists()
