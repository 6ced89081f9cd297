"""Write a safetensors file one tensor at a time (bounded memory), atomically, hashing as it goes.

The layout (names, dtypes, shapes) is known up front, so the header is written first with a placeholder
for the output hash; once every tensor is written the placeholder (fixed length) is replaced in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from weightlab.errors import WeightlabError
from weightlab.files import safetensors_dtype

HASH_KEY = "weightlab.output_hash"
_PLACEHOLDER = "0" * 64


class StreamWriter:
    """Context manager: ``write(name, tensor)`` in :meth:`order`, then ``finish(metadata)``.

    Args:
        path: destination ``.safetensors`` (written to a temp file in the same folder, renamed on finish).
        layout: ``{name: (dtype, shape)}``.
    """

    def __init__(self, path: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        self.order = sorted(layout)
        self.layout = layout
        self._hash = hashlib.sha256()
        self._next = 0
        self.nbytes = 0
        self.tensor_hash = ""
        self._offsets = {}
        pos = 0
        for k in self.order:
            dtype, shape = layout[k]
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            self._offsets[k] = (pos, pos + n)
            pos += n
        self.nbytes = pos

    def _header(self, metadata: dict[str, str]) -> bytes:
        doc = {"__metadata__": metadata}
        for k in self.order:
            dtype, shape = self.layout[k]
            doc[k] = {"dtype": safetensors_dtype(dtype), "shape": list(shape), "data_offsets": list(self._offsets[k])}
        raw = json.dumps(doc, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    def __enter__(self) -> "StreamWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._f = os.fdopen(fd, "wb")
        self._header_len = None
        return self

    def progress(self, *, enabled: bool = True, desc: str = "write"):
        """Iterate the names in write order, with a tqdm bar."""
        from tqdm.auto import tqdm

        return tqdm(self.order, desc=desc, unit="tensor", disable=not enabled, leave=False)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise WeightlabError(f"stream order broken at `{name}` (expected `{self.order[self._next] if self._next < len(self.order) else 'end'}`).")
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise WeightlabError(f"`{name}`: got {tensor.dtype} {tuple(tensor.shape)}, layout says {dtype} {tuple(shape)}.")
        if self._header_len is None:  # reserve the header; its final bytes are written by finish()
            self._header_len = len(self._header(self._meta_placeholder))
            self._f.write(b"\0" * self._header_len)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._hash.update(json.dumps([name, safetensors_dtype(dtype), list(shape)]).encode())
        self._hash.update(data)
        self._f.write(memoryview(data))
        self._next += 1

    def begin(self, metadata: dict[str, str]) -> None:
        """Fix the metadata (its ``weightlab.output_hash`` is filled in by :meth:`finish`)."""
        self._meta_placeholder = {**metadata, HASH_KEY: _PLACEHOLDER}

    def finish(self) -> str:
        """Write the final header (with the output hash), fsync and rename into place. Returns the hash."""
        if self._next != len(self.order):
            raise WeightlabError(f"stream incomplete: {len(self.order) - self._next} tensor(s) not written.")
        if self._header_len is None:
            self._header_len = len(self._header(self._meta_placeholder))
            self._f.write(b"\0" * self._header_len)
        self.tensor_hash = self._hash.hexdigest()
        header = self._header({**self._meta_placeholder, HASH_KEY: self.tensor_hash})
        assert len(header) == self._header_len  # the hash has the placeholder's length
        self._f.seek(0)
        self._f.write(header)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.tensor_hash

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._f.closed:
            self._f.close()
        if exc_type is not None and os.path.exists(self._tmp):
            os.unlink(self._tmp)
