"""Sources of new versions: a local file or folder, or ``hf://ORG/REPO[/PATH][@REVISION]`` on the Hugging Face Hub.

:func:`stage` turns a source into the files to store, validated: every ``.safetensors`` header is checked
(``weightlab.files.read_header``) before a byte is copied. Pickle checkpoints are converted to safetensors
only with ``allow_pickle=True`` (``torch.load(weights_only=True)`` in a child process); inside folders they are
refused. Hub files come through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE`` and tokens apply); an LFS
file's sha256 from the cache is the declared hash the store verifies.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from weightlab.errors import FileFormatError, NotFoundError, RegistryError, UnsafeFileError
from weightlab.files import PICKLE_SUFFIXES, load_tensors, read_header, save_tensors, sniff
from weightlab.files import SHA256

HF_SCHEME = "hf://"
_HF_URI = re.compile(r"^hf://(?P<repo>[^/@\s]+/[^/@\s]+)(?:/(?P<path>[^@\s]+?))?/?(?:@(?P<rev>[^@\s]+))?$")


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # path inside the version, '/'-separated
    path: Path  # where to read it now
    sha256: str | None = None  # declared hash, verified when stored


@dataclass(frozen=True)
class Staged:
    files: list[SourceFile]
    folder: bool
    source: str  # what to record as the version's source
    default_name: str  # ns/name suggested for an import


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    path: str | None
    revision: str | None

    @classmethod
    def parse(cls, uri: str, revision: str | None = None) -> HubRef:
        m = _HF_URI.fullmatch(uri)
        if not m:
            raise RegistryError(f"{uri!r} is not a hub reference. Use hf://ORG/REPO, hf://ORG/REPO/FILE or "
                                "hf://ORG/REPO/FOLDER, optionally with @REVISION.")
        if m["rev"] and revision and m["rev"] != revision:
            raise RegistryError(f"{uri}: revision {m['rev']!r} in the URI contradicts --revision {revision!r}.")
        return cls(m["repo"], m["path"], m["rev"] or revision)

    @property
    def is_file(self) -> bool:
        """A path whose last part has a suffix (``model.safetensors``) is a file; otherwise a folder."""
        return self.path is not None and "." in self.path.rsplit("/", 1)[-1]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:100] or "unnamed"


def _validate(path: Path) -> None:
    if path.suffix == ".safetensors":
        read_header(path)
    elif path.suffix in PICKLE_SUFFIXES:
        raise UnsafeFileError(
            f"{path}: pickle checkpoints are not stored in the registry (unpickling can run code). Fix: delete it "
            "from the folder if a .safetensors copy sits next to it, or convert it to safetensors first.")


def _folder_files(root: Path) -> list[SourceFile]:
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue  # hidden files (.git, .cache) and folders
        _validate(path)
        files.append(SourceFile(rel.as_posix(), path, _hub_blob_sha256(path)))
    if not files:
        raise FileFormatError(f"{root}: the folder holds no files.")
    return files


def _hub_blob_sha256(path: Path) -> str | None:
    """In the HF cache a snapshot file links to ``blobs/<etag>``; for LFS files the etag is the content's sha256."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target.name if target.parent.name == "blobs" and SHA256.fullmatch(target.name) else None


def _hub_fetch(ref: HubRef) -> Path:
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    where = f"hf://{ref.repo_id}/{ref.path or ''}" + (f"@{ref.revision}" if ref.revision else "")
    try:
        if ref.is_file:
            return Path(hf_hub_download(ref.repo_id, ref.path, revision=ref.revision))
        patterns = [f"{ref.path}/**"] if ref.path else None
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)) / (ref.path or "")
    except (OSError, EntryNotFoundError, HFValidationError) as e:
        if constants.is_offline_mode():
            fix = "HF_HUB_OFFLINE is set and it is not in the local cache: unset HF_HUB_OFFLINE, or download it first."
        else:
            fix = "check the repo id, path and revision, and your HF token for gated or private repos."
        raise NotFoundError(f"{where}: cannot fetch from the Hugging Face Hub ({type(e).__name__}: {e}). Fix: {fix}") from e


def _commit_of(snapshot_path: Path) -> str | None:
    """The commit hash in a cache path ``.../snapshots/<commit>/...``."""
    parts = snapshot_path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


@contextmanager
def stage(source: str | os.PathLike, *, revision: str | None = None, allow_pickle: bool = False) -> Iterator[Staged]:
    """The validated files of ``source``, ready to store (temporary conversions live until the block exits).

    Raises:
        FileFormatError: missing, empty or invalid file.
        UnsafeFileError: a pickle without ``allow_pickle`` (or inside a folder).
        NotFoundError: a hub file that cannot be fetched.
    """
    text = os.fspath(source)
    if text.startswith(HF_SCHEME):
        hub = HubRef.parse(text, revision)
        path = _hub_fetch(hub)
        commit = _commit_of(path)
        recorded = f"hf://{hub.repo_id}" + (f"/{hub.path}" if hub.path else "") + (f"@{commit}" if commit else "")
        org, repo = hub.repo_id.split("/")
        default = f"{_safe_name(org)}/{_safe_name(Path(hub.path).stem if hub.path else repo)}"
    else:
        if revision:
            raise RegistryError(f"{text}: --revision only applies to hf:// sources.")
        path = Path(text).expanduser().absolute()  # not resolved: a link into an HF cache declares its sha256
        recorded = str(path.resolve())
        default = f"local/{_safe_name(path.stem)}"
    if path.is_dir():
        yield Staged(_folder_files(path), True, recorded, default)
        return
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file or folder.")
    if sniff(path) is None:  # by content: a safetensors header may begin with pickle-like bytes (a 640-byte header)
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path}: refusing to read a pickle-based checkpoint (unpickling can run arbitrary code). Fix: pass "
                "allow_pickle=True (CLI: --allow-pickle) if you trust its source; it is read with "
                "torch.load(weights_only=True) in a child process and stored as safetensors.")
        with tempfile.TemporaryDirectory(prefix="weightlab-convert-") as tmp:
            tensors, _ = load_tensors(path, allow_pickle=True)
            converted = save_tensors(tensors, Path(tmp) / f"{path.stem}.safetensors",
                                     {"weightlab.converted_from": path.name})
            yield Staged([SourceFile(converted.name, converted)], False, recorded, default)
        return
    yield Staged([SourceFile(path.name, path, _hub_blob_sha256(path))], False, recorded, default)
