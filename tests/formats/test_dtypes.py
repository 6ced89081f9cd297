"""The one dtype table (`weightlab.files.DTYPES`) against safetensors itself, the library that defines the format:
the name it writes for each torch dtype, and the bytes per element it stores."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from weightlab.errors import FileFormatError
from weightlab.files import DTYPES, mmap_tensors, read_header, safetensors_dtype, torch_dtype


@pytest.mark.parametrize("name", list(DTYPES))
def test_dtype_table_agrees_with_safetensors(name, tmp_path):
    dtype = torch_dtype(name)
    assert torch_dtype(DTYPES[name][0]) is dtype and safetensors_dtype(dtype) == name
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.zeros(3, dtype=dtype)}, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    written = json.loads(raw[8:8 + n])["t"]  # what safetensors wrote, read without weightlab
    assert written["dtype"] == name
    assert written["data_offsets"][1] - written["data_offsets"][0] == 3 * DTYPES[name][1]
    assert read_header(path).tensors["t"].dtype == name and mmap_tensors(path)["t"].dtype is dtype


def test_a_dtype_safetensors_cannot_name_is_refused_with_the_fix():
    with pytest.raises(FileFormatError, match="Fix: convert"):
        safetensors_dtype(torch.complex64)
