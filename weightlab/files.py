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
import re
import struct
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from weightlab.errors import FileFormatError, UnsafeFileError, fmt_keys

SHA256_PATTERN = "[0-9a-f]{64}"  # a sha256 digest (a file's, a tensor hash) as weightlab writes it
SHA256 = re.compile(SHA256_PATTERN)  # apply with fullmatch

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
# The one dtype table: safetensors' name -> (torch's name, bytes per element); the whitelist a header is checked against.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")  # what a merge rounds to and a model runs in (torch's names)
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


def _no_duplicates(pairs: list) -> dict:
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate names {fmt_keys({k for k in names if names.count(k) > 1})}")
    return dict(pairs)


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
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, duplicate names, absurd nesting
        raise FileFormatError(f"{path}: header is not valid JSON ({e}); this is not a safetensors file.") from None
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
        if dtype not in DTYPES:
            raise FileFormatError(f"{path}: tensor `{name}` has unsupported dtype {dtype!r} (allowed: {', '.join(DTYPES)}).")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FileFormatError(f"{path}: tensor `{name}` has an invalid shape {shape!r}.")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise FileFormatError(f"{path}: tensor `{name}` has invalid data_offsets {offs!r}.")
        if offs[1] - offs[0] != math.prod(shape) * DTYPES[dtype][1]:
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


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``F16``) or a torch one (``float16``), from :data:`DTYPES`."""
    import torch

    return getattr(torch, DTYPES[name][0] if name in DTYPES else name)


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name (``F16``) of a torch dtype, from :data:`DTYPES`.

    Raises:
        FileFormatError: safetensors has no name for it (complex, unsigned wider than 8 bits, ...).
    """
    torch_name = str(dtype).removeprefix("torch.")
    for name, (torch_name_of, _) in DTYPES.items():
        if torch_name_of == torch_name:
            return name
    raise FileFormatError(f"a {torch_name} tensor cannot be written to safetensors here (allowed: "
                          f"{', '.join(t for t, _ in DTYPES.values())}). Fix: convert it with .to(torch.float32).")


def state_dict_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """The same identity as :func:`tensor_hash`, computed from tensors in memory."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, safetensors_dtype(t.dtype), list(t.shape)]).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_pickle(path: str | os.PathLike) -> bool:
    """True for torch zip checkpoints and raw pickles (by magic bytes, whatever the suffix)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return magic == b"PK" or (len(magic) == 2 and magic[0] == 0x80 and 2 <= magic[1] <= 5)  # PROTO opcode, 2..5


def sniff(path: str | os.PathLike) -> Header | None:
    """The validated header of a safetensors file, or None for a pickle checkpoint.

    A pickle suffix (.ckpt/.pt/.pth/.bin) means pickle. Otherwise the safetensors header is tried first (a pickle
    cannot pass its checks, while magic bytes alone can collide with a header length) and pickle magic bytes
    are the fallback, whatever the suffix.

    Raises:
        FileFormatError: neither a valid safetensors file nor a pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file.")
    if path.suffix in PICKLE_SUFFIXES:
        return None
    try:
        return read_header(path)
    except FileFormatError:
        if is_pickle(path):
            return None
        raise


def load_tensors(path: str | os.PathLike, *, allow_pickle: bool = False, device: str = "cpu") -> tuple[dict, dict[str, str]]:
    """Load every tensor of a weight file after validating it. Returns ``(tensors, metadata)``.

    Pickle files (see :func:`sniff`) are refused unless ``allow_pickle=True``.
    """
    from safetensors.torch import load_file

    header = sniff(path)
    if header is not None:
        return load_file(str(path), device=device), dict(header.metadata)
    if not allow_pickle:
        raise UnsafeFileError(
            f"{path}: refusing to read a pickle-based checkpoint. Unpickling can run arbitrary code from the file. "
            "Fix: convert it to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source; "
            "it is then read with torch.load(weights_only=True) in a separate process.")
    return load_pickle(path), {}


def _pickle_child(src: str, dst: str) -> None:
    """Child-process side of :func:`load_pickle`: weights-only unpickling, then re-saved as safetensors."""
    import torch
    from safetensors.torch import save_file

    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # one line for the parent's error message (torch's own message is a page long)
        lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith(_TORCH_BOILERPLATE)]
        raise SystemExit(f"{type(e).__name__}: {lines[0] if lines else e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SystemExit(f"not a state dict but a {type(obj).__name__}")
    tensors, seen = {}, set()
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        storage = v.untyped_storage()
        # safetensors refuses tensors that share memory (tied weights, views): give those their own copy.
        if storage.data_ptr() in seen or storage.nbytes() != v.nbytes or not v.is_contiguous():
            v = v.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(storage.data_ptr())
        tensors[k] = v
    save_file(tensors, dst)


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def load_pickle(path: str | os.PathLike) -> dict:
    """Read a pickle checkpoint with ``torch.load(weights_only=True)`` in a child process, via safetensors.

    The child is a fresh interpreter (not ``multiprocessing``, which re-imports the caller's ``__main__``).
    """
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "converted.safetensors")
        code = "import sys; from weightlab.files import _pickle_child; _pickle_child(sys.argv[1], sys.argv[2])"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")))))
        proc = subprocess.run([sys.executable, "-c", code, str(path), dst], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(dst):
            reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise FileFormatError(
                f"{path}: could not be read as a weights-only torch checkpoint ({reason}). It may hold code objects "
                "or be corrupt; only plain tensor state dicts are accepted. "
                "Fix: re-export it as .safetensors from a trusted copy.")
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


def mmap_tensors(path: str | os.PathLike, header: Header | None = None) -> dict:
    """Zero-copy tensors over a private (copy-on-write) memory map of a validated safetensors file.

    Pages are read on demand and never written back, so this is the "pristine base" the merge engine
    reads from: writing into a returned tensor cannot change the file. The tensors are read-only by contract:
    :func:`release_pages` may drop a page a caller wrote, and the next read sees the file's bytes again.
    """
    import mmap
    import warnings

    import torch

    header = header or read_header(path)
    out: dict = {}
    if not header.tensors:
        return out
    with open(header.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = None
    for name, t in header.tensors.items():
        dtype = torch_dtype(t.dtype)
        if t.end == t.start:
            out[name] = torch.empty(t.shape, dtype=dtype)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(mm, dtype=dtype, count=(t.end - t.start) // DTYPES[t.dtype][1], offset=t.start)
        out[name] = flat.view(t.shape)
        if start is None:
            start = flat.data_ptr() - t.start
    if start is not None:  # the tensors keep `mm` alive (buffer export); the weak reference dies with the last one
        _MAPS.append((start, start + len(mm), weakref.ref(mm)))
    return out


_MAPS: list[tuple[int, int, weakref.ref]] = []  # (first address, end address, map) of each map of mmap_tensors


def release_pages(*tensors) -> None:
    """Drop the pages under ``tensors`` from this process's resident set when they view a map of
    :func:`mmap_tensors`; any other tensor (or None) is ignored.

    Nothing writes those maps, so their pages are clean: ``MADV_DONTNEED`` unmaps them (the page cache keeps
    them) and a later read maps the same bytes again. Without this, every page a merge reads stays mapped and
    the process grows by the size of the files read.
    """
    import mmap

    for t in tensors:
        if t is None or t.numel() == 0 or t.device.type != "cpu":
            continue
        addr = t.data_ptr()
        for entry in list(_MAPS):
            lo, hi, ref = entry
            mm = ref()
            if mm is None or mm.closed:  # a dead map: its addresses may belong to something else now
                _MAPS.remove(entry)
            elif lo <= addr < hi:
                first = (addr - lo) - (addr - lo) % mmap.PAGESIZE
                end = min(addr - lo + t.numel() * t.element_size(), hi - lo)
                mm.madvise(mmap.MADV_DONTNEED, first, end - first)
                break
