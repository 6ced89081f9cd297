"""Content-addressed blob stores: bytes named by their sha256, written once, never modified.

:class:`BlobStore` is the contract every backend keeps (the local one here; the S3-compatible one in
:mod:`weightlab.registry.s3`). Writes are atomic (temp file + fsync + rename), deduplicated by hash, and verified against a declared
hash when one is given. A blob that already exists is *freshened* (its mtime set to now) when written again, so
:meth:`Registry.gc`'s grace period protects blobs that an ``add`` is about to reference (git does the same).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from weightlab.errors import HashMismatchError, NotFoundError, RegistryError
from weightlab.files import SHA256

log = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class BlobStat:
    sha256: str
    size: int
    mtime: float  # seconds since the epoch


def check_digest(sha256: str) -> str:
    if not SHA256.fullmatch(sha256):
        raise RegistryError(f"{sha256!r} is not a sha256 digest (64 lowercase hex digits).")
    return sha256


class BlobStore(ABC):
    """Where version files live, by sha256. Implementations must make :meth:`put` atomic and idempotent.

    ``tmp_dir`` is a local folder for work in progress (uploads being received, partial copies); whatever an
    interrupted process leaves there, :meth:`sweep_temp` removes.
    """

    url: str
    tmp_dir: Path

    @abstractmethod
    def put(self, src: str | os.PathLike, *, sha256: str | None = None, trusted: bool = False) -> BlobStat:
        """Store the file at ``src``; returns its digest and size.

        Args:
            src (str | PathLike): file to copy in (streamed, hashed while copying).
            sha256 (str | None, default None): declared digest; a mismatch raises and stores nothing.
            trusted (bool, default False): ``src`` lies in ``tmp_dir`` and the caller hashed it into ``sha256`` as it
                wrote it (an upload the web API received): it is stored without hashing it again. Ignored for a
                file elsewhere or without ``sha256``.
        Raises:
            HashMismatchError: the content does not match ``sha256``.
        """

    @abstractmethod
    def stat(self, sha256: str) -> BlobStat | None:
        """Size and mtime of a blob, or None if the store does not hold it."""

    @abstractmethod
    def open(self, sha256: str) -> BinaryIO:
        """A binary reader over the blob's bytes. Raises NotFoundError if missing."""

    @abstractmethod
    def local_path(self, sha256: str) -> Path:
        """A local, read-only file with the blob's bytes (a remote store downloads it into a cache first)."""

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove a blob (no error if it is already gone)."""

    @abstractmethod
    def list(self) -> Iterator[BlobStat]:
        """Every blob in the store."""

    @abstractmethod
    def sweep_temp(self, *, older_than: float) -> int:
        """Remove leftovers of interrupted writes older than ``older_than`` seconds; returns how many."""

    def exists(self, sha256: str) -> bool:
        return self.stat(sha256) is not None

    def rehash(self, sha256: str) -> str:
        """The sha256 of the blob's bytes as stored now (compare with its name to detect corruption)."""
        h = hashlib.sha256()
        with self.open(sha256) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()


class LocalBlobStore(BlobStore):
    """Blobs under ``root/sha256/<2 hex>/<62 hex>``, read-only; temp files under ``root/tmp`` (same filesystem)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        self._objects = self.root / "sha256"
        self.tmp_dir = self._tmp = self.root / "tmp"

    def _path(self, sha256: str) -> Path:
        check_digest(sha256)
        return self._objects / sha256[:2] / sha256[2:]

    def put(self, src, *, sha256=None, trusted=False) -> BlobStat:
        """See :meth:`BlobStore.put`. A file already inside ``tmp_dir`` (an upload the web API received) is
        hard-linked instead of copied: only the registry writes there, so it cannot change under us."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="blob-", suffix=".part")
        try:
            h = hashlib.sha256()
            size = 0
            received = inside(src, self._tmp)
            prehashed = received and trusted and sha256 is not None
            if received:
                os.close(fd)
                os.unlink(tmp)
                os.link(src, tmp)
                fd = os.open(tmp, os.O_RDONLY)
                with os.fdopen(fd, "rb") as f:
                    if prehashed:
                        size = os.fstat(f.fileno()).st_size
                    else:
                        while chunk := f.read(_CHUNK):
                            h.update(chunk)
                            size += len(chunk)
                    os.fsync(f.fileno())
            else:
                with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                    while chunk := fin.read(_CHUNK):
                        h.update(chunk)
                        fout.write(chunk)
                        size += len(chunk)
                    fout.flush()
                    os.fsync(fout.fileno())
            digest = sha256 if prehashed else h.hexdigest()
            if sha256 is not None and digest != sha256:
                raise HashMismatchError(
                    f"{src}: content sha256 is {digest}, but {sha256} was declared. The file is corrupt, "
                    "incomplete, or not the one you meant. Fix: re-download it, or correct the declared hash.")
            dest = self._path(digest)
            if dest.exists():
                os.utime(dest)  # freshen: gc's grace period now covers the add that is about to reference it
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
                os.replace(tmp, dest)
                _fsync_dir(dest.parent)
            return BlobStat(digest, size, time.time())
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def adopt(self, path: str | os.PathLike, sha256: str) -> BlobStat:
        """Move a file the caller has already hashed into the store (a rename, no copy: keep ``path`` on the same
        filesystem, e.g. in ``tmp_dir``). The caller vouches for ``sha256``; ``put`` checks it instead."""
        dest = self._path(sha256)
        size = os.stat(path).st_size
        if dest.exists():
            os.unlink(path)
            os.utime(dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(path, dest)
        return BlobStat(sha256, size, time.time())

    def stat(self, sha256):
        try:
            st = self._path(sha256).stat()
        except FileNotFoundError:
            return None
        return BlobStat(sha256, st.st_size, st.st_mtime)

    def open(self, sha256):
        try:
            return open(self._path(sha256), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {sha256} is missing from the store at {self.url}. "
                                "Fix: run `weightlab registry verify` to see which versions it affects.") from None

    def local_path(self, sha256):
        path = self._path(sha256)
        if not path.is_file():
            raise NotFoundError(f"blob {sha256} is missing from the store at {self.url}. "
                                "Fix: run `weightlab registry verify` to see which versions it affects.")
        return path

    def delete(self, sha256):
        self._path(sha256).unlink(missing_ok=True)

    def list(self):
        if not self._objects.is_dir():
            return
        for sub in sorted(self._objects.iterdir()):
            for f in sorted(sub.iterdir()):
                digest = sub.name + f.name
                if SHA256.fullmatch(digest):
                    st = f.stat()
                    yield BlobStat(digest, st.st_size, st.st_mtime)

    def sweep_temp(self, *, older_than):
        return sweep_folder(self._tmp, older_than=older_than)


def inside(path: str | os.PathLike, folder: Path) -> bool:
    """Whether ``path`` lies somewhere under ``folder`` (links resolved)."""
    return folder.resolve() in Path(path).resolve().parents


def sweep_folder(folder: Path, *, older_than: float) -> int:
    """Remove the files and folders directly in ``folder`` not modified for ``older_than`` seconds; returns how many."""
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than
    removed = 0
    for f in folder.iterdir():
        try:
            if f.lstat().st_mtime >= cutoff:
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
        except FileNotFoundError:  # removed by a concurrent sweep
            continue
        removed += 1
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
