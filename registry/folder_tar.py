"""Folder uploads over HTTP: one uncompressed tar stream (PAX format), written by the client as it is sent
(:func:`tar_chunks`) and unpacked by the server as it arrives into a private spool folder (:func:`extract`).

Each member declares its file's sha256 in a ``WEIGHTLAB.sha256`` PAX record; the file is hashed while it is written
and a mismatch refuses the upload. The client also declares the folder's manifest digest (see
:func:`weightlab.registry.schemas.manifest_digest`), which the route compares with the files received, so a file the
client did not declare, or one that went missing, refuses it too. Nothing here touches the store or the database.

Rules (each broken one is a :class:`FolderUploadError`, HTTP 400): regular files only (no links, devices, FIFOs,
folder entries or sparse files); relative ``/``-separated paths of plain names (no absolute paths, ``..``, ``.``,
hidden parts, backslashes or duplicates); at most :data:`MAX_FILES` files; tar headers (long names, PAX records) of at
most :data:`MAX_HEADER_BYTES` per member; the whole body within the server's upload limit (HTTP 413).

Example (client side, see :func:`tar_chunks`):
    >>> body = tar_chunks([(path, "unet/config.json", sha256)])   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator

import anyio

from weightlab.errors import FolderUploadError, HashMismatchError, RegistryError
from weightlab.files import SHA256
from weightlab.registry.schemas import FileInfo

SHA256_RECORD = "WEIGHTLAB.sha256"
MAX_FILES = 10_000
MAX_HEADER_BYTES = 1 << 20
MAX_PATH = 1024
CHUNK = 4 * 1024 * 1024
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}$")
_FIX = "Fix: upload with weightlab.Client.add(folder), which writes the tar stream this route expects."


class _Body(io.RawIOBase):
    """The request body as a blocking file for a worker thread: each read pulls the next chunk from the event loop.

    ``limit`` (bytes read in all) bounds what tarfile may read before the next member's data: its headers.
    """

    def __init__(self, chunks: AsyncIterator[bytes], max_bytes: int, too_large: Exception):
        self._chunks, self._max, self._too_large = chunks, max_bytes, too_large
        self._buf, self._pos = b"", 0
        self.count = 0
        self.limit: int | None = MAX_HEADER_BYTES + CHUNK  # tarfile.open reads the first member's headers

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos == len(self._buf):
            try:
                self._buf, self._pos = anyio.from_thread.run(self._chunks.__anext__), 0
            except StopAsyncIteration:
                return 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        self.count += n
        if self.count > self._max:
            raise self._too_large
        if self.limit is not None and self.count > self.limit:
            raise FolderUploadError(f"a member's tar headers (long name, PAX records) exceed {MAX_HEADER_BYTES} bytes. "
                                    f"{_FIX}")
        return n


def _check_member(member: tarfile.TarInfo, seen: set[str]) -> str:
    """The member's path, if it is a regular file at a safe, new path."""
    name = member.name
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.issparse():
        what = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a folder entry",
                tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
                tarfile.FIFOTYPE: "a FIFO"}.get(member.type, f"of tar type {member.type!r}")
        raise FolderUploadError(f"member {name!r} is {what}; only regular files are accepted (folders are implied by "
                                f"the files' paths). {_FIX}")
    parts = name.split("/")
    if (len(name) > MAX_PATH or "\\" in name or name.startswith("/")
            or not all(_PART.fullmatch(p) for p in parts)):
        raise FolderUploadError(
            f"member {name!r}: a path must be relative and '/'-separated, each part a plain name (letters, digits, "
            f"'_', '.', '+', '-', not starting with '.'; so no '..', hidden files or absolute paths), at most "
            f"{MAX_PATH} characters. {_FIX}")
    if name in seen:
        raise FolderUploadError(f"member {name!r} appears twice in the tar stream. {_FIX}")
    seen.add(name)
    return name


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    h = hashlib.sha256()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(target, "xb")
    except OSError:
        raise FolderUploadError(f"member {member.name!r} clashes with another member (a file and a folder of the same "
                                f"name). {_FIX}") from None
    with out, tar.extractfile(member) as src:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


def extract(chunks: AsyncIterator[bytes], dest: Path, *, max_bytes: int, too_large: Exception) -> list[FileInfo]:
    """Unpack the tar stream ``chunks`` into ``dest`` (an empty folder), checking every rule; run it in a worker
    thread of the event loop that owns ``chunks``.

    Returns:
        list[FileInfo]: the files received, each with its verified sha256.
    Raises:
        FolderUploadError: a rule is broken, or the body is not an uncompressed tar stream.
        HashMismatchError: a file's bytes do not match its declared sha256.
        ``too_large``: the body is larger than ``max_bytes``.
    """
    body = _Body(chunks, max_bytes, too_large)
    files: list[FileInfo] = []
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=body, mode="r|", bufsize=CHUNK) as tar:
            while True:
                body.limit = body.count + MAX_HEADER_BYTES + CHUNK
                member = tar.next()
                body.limit = None
                if member is None:
                    break
                path = _check_member(member, seen)
                declared = member.pax_headers.get(SHA256_RECORD, "")
                if not SHA256.fullmatch(declared):
                    raise FolderUploadError(f"member {path!r} declares no sha256 (a {SHA256_RECORD} PAX record of 64 "
                                            f"lowercase hex digits). {_FIX}")
                if len(files) == MAX_FILES:
                    raise FolderUploadError(f"the folder has more than {MAX_FILES} files. Fix: upload fewer files.")
                actual = _write(tar, member, dest / path)
                if actual != declared:
                    raise HashMismatchError(f"{path}: its bytes hash to {actual}, but its header declares {declared}; "
                                            "nothing was stored. Fix: upload again (the transfer was corrupted), or "
                                            "check that the file did not change while it was sent.")
                files.append(FileInfo(path=path, sha256=actual, size_bytes=member.size))
    except tarfile.TarError as e:
        raise FolderUploadError(f"the body is not a complete, uncompressed tar stream ({e}). {_FIX}") from None
    if not files:
        raise FolderUploadError(f"the tar stream holds no files. {_FIX}")
    return files


def _header(relpath: str, size: int, sha256: str) -> bytes:
    info = tarfile.TarInfo(relpath)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.pax_headers = {SHA256_RECORD: sha256}
    return info.tobuf(format=tarfile.PAX_FORMAT)


def tar_size(files: Iterable[tuple[Path, str, str]]) -> int:
    """The length of :func:`tar_chunks` over the same ``(path, relpath, sha256)`` files."""
    total = 2 * tarfile.BLOCKSIZE
    for path, relpath, sha256 in files:
        size = path.stat().st_size
        total += len(_header(relpath, size, sha256)) + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return total


def tar_chunks(files: Iterable[tuple[Path, str, str]], *, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    """The tar stream of ``(path, relpath, sha256)`` files that :func:`extract` reads, generated as it is sent."""
    for path, relpath, sha256 in files:
        size = path.stat().st_size
        yield _header(relpath, size, sha256)
        sent = 0
        with open(path, "rb") as f:
            while data := f.read(min(chunk, size - sent)):
                sent += len(data)
                yield data
        if sent != size:
            raise RegistryError(f"{path} changed size while it was uploaded. Fix: upload it again when it is complete.")
        if size % tarfile.BLOCKSIZE:
            yield bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
    yield bytes(2 * tarfile.BLOCKSIZE)
