"""Safe reading and writing of weight files.

Every safetensors file is validated before a byte of tensor data is trusted: header size bound, dtype
whitelist, shapes, offsets inside the file, no holes and no overlaps (the same rules as the safetensors
reference implementation, checked up front so we can raise a clear error instead of crashing).
Pickle checkpoints are only read with explicit opt-in, with ``torch.load(weights_only=True)`` in a child process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from weightlab.errors import FileFormatError, UnsafeFileError

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.end - t.start for t in self.tensors.values())


def read_header(path: str | os.PathLike, *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate a safetensors header without loading tensor data.

    Raises:
        FileFormatError: the file is truncated, not safetensors, or its header breaks a rule.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FileFormatError(f"{path}: {size} bytes is too short to be a safetensors file. Fix: re-download or re-export it.")
            (n,) = struct.unpack("<Q", head)
            if n > max_header_bytes:
                raise FileFormatError(
                    f"{path}: header length {n} exceeds the {max_header_bytes}-byte limit; the file is corrupt or "
                    "not safetensors. Fix: re-download it, or check that it really is a .safetensors file.")
            if 8 + n > size:
                raise FileFormatError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?). Fix: re-download it.")
            raw = f.read(n)
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read: {e}") from e
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: header is not valid JSON ({e}); this is not a safetensors file.") from e
    if not isinstance(doc, dict):
        raise FileFormatError(f"{path}: header is not a JSON object; this is not a safetensors file.")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FileFormatError(f"{path}: __metadata__ must map strings to strings.")
    data_start = 8 + n
    tensors: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FileFormatError(f"{path}: tensor `{name}` needs exactly dtype, shape and data_offsets.")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise FileFormatError(f"{path}: tensor `{name}` has unsupported dtype {dtype!r} (allowed: {', '.join(DTYPE_SIZES)}).")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FileFormatError(f"{path}: tensor `{name}` has an invalid shape {shape!r}.")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise FileFormatError(f"{path}: tensor `{name}` has invalid data_offsets {offs!r}.")
        if offs[1] - offs[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise FileFormatError(f"{path}: tensor `{name}` byte range {offs} does not match shape {shape} x {dtype}.")
        tensors[name] = TensorEntry(dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
    pos = data_start
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != pos:
            kind = "overlaps the previous tensor" if t.start < pos else "leaves a hole before it"
            raise FileFormatError(f"{path}: tensor `{name}` {kind} (offset {t.start - data_start}, expected {pos - data_start}); the file is corrupt.")
        pos = t.end
    if pos != size:
        raise FileFormatError(
            f"{path}: tensor data ends at byte {pos} but the file has {size} bytes "
            f"({'truncated' if pos > size else 'trailing bytes'}). Fix: re-download it.")
    return Header(path, tensors, meta, data_start)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the whole file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tensor_hash(path: str | os.PathLike, header: Header | None = None) -> str:
    """Header-independent identity: sha256 over (name, dtype, shape, bytes) of every tensor, keys sorted.

    Editing ``__metadata__`` or re-ordering tensors in the file does not change it.
    """
    header = header or read_header(path)
    h = hashlib.sha256()
    with open(header.path, "rb") as f:
        for name in sorted(header.tensors):
            t = header.tensors[name]
            h.update(json.dumps([name, t.dtype, list(t.shape)]).encode())
            f.seek(t.start)
            left = t.end - t.start
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise FileFormatError(f"{header.path}: file shrank while hashing `{name}`.")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def state_dict_hash(tensors: Mapping[str, "torch.Tensor"]) -> str:  # noqa: F821
    """The same identity as :func:`tensor_hash`, computed from tensors in memory."""
    from safetensors.torch import _TYPES  # dtype -> safetensors name

    names = {v: k for k, v in _TYPES.items()}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, names[t.dtype], list(t.shape)]).encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_pickle(path: str | os.PathLike) -> bool:
    """True for torch zip checkpoints and raw pickles (by magic bytes, whatever the suffix)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return magic[:2] == b"PK" or magic[:1] == b"\x80"


def load_tensors(path: str | os.PathLike, *, allow_pickle: bool = False, device: str = "cpu") -> tuple[dict, dict[str, str]]:
    """Load every tensor of a weight file after validating it. Returns ``(tensors, metadata)``.

    Pickle files (.ckpt/.pt/.pth/.bin) are refused unless ``allow_pickle=True``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file.")
    if path.suffix in PICKLE_SUFFIXES or is_pickle(path):
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path}: refusing to read a pickle-based checkpoint. Unpickling can run arbitrary code from the file. "
                "Fix: convert it to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source; "
                "it is then read with torch.load(weights_only=True) in a separate process.")
        return load_pickle(path), {}
    header = read_header(path)
    return load_file(str(path), device=device), dict(header.metadata)


def _pickle_child(src: str, dst: str) -> None:
    import torch
    from safetensors.torch import save_file

    obj = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SystemExit(f"not a state dict: {type(obj).__name__}")
    tensors = {k: v.contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, dst)


def load_pickle(path: str | os.PathLike) -> dict:
    """Read a pickle checkpoint with ``torch.load(weights_only=True)`` in a child process, via safetensors."""
    import multiprocessing as mp

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "converted.safetensors")
        proc = mp.get_context("spawn").Process(target=_pickle_child, args=(str(path), dst))
        proc.start()
        proc.join()
        if proc.exitcode != 0 or not os.path.exists(dst):
            raise FileFormatError(
                f"{path}: could not be read as a weights-only torch checkpoint (exit code {proc.exitcode}). "
                "It may hold code objects or be corrupt; only plain tensor state dicts are accepted.")
        tensors = load_file(dst)
        return {k: v.clone() for k, v in tensors.items()}


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then fsync and rename into place; nothing half-written is ever visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_tensors(tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors to a safetensors file atomically (temp file + rename)."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=dict(metadata or {})))
