"""Moving bytes: request bodies streamed to disk while hashed, and blobs streamed out with HTTP Range.

Uploads land in a fresh folder under the store's ``tmp_dir`` (swept by ``gc`` if the server dies mid-upload),
written in large chunks on a worker thread so the event loop keeps serving other requests. CPU-heavy work
(hashing and inspecting uploads) runs on :func:`run_bulk`'s threads, which on Linux have a lower priority: when
the cores are busy, a list or search is answered first instead of queueing behind bulk hashing. Downloads honour a
single ``Range: bytes=...`` (206, or 416 when it starts past the end); ``If-Range`` with another validator, a
malformed range or several ranges get the whole blob (200), as RFC 9110 allows. Blobs never change, so the
sha256 is a strong ETag.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import quote

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from weightlab.errors import RegistryError, UploadTooLargeError
from weightlab.registry.store import BlobStore

CHUNK = 4 * 1024 * 1024
BULK_NICE = 10  # nice value of the bulk threads (Linux): ~1/10 of the CPU share of a normal thread when cores are busy
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
T = TypeVar("T")


def _lower_priority() -> None:
    if sys.platform == "linux":  # the nice value is per thread there; elsewhere it would lower the whole server
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICE)


_BULK = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="weightlab-bulk",
                           initializer=_lower_priority)


async def run_bulk(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a low-priority bulk thread, awaited even if the request is cancelled meanwhile
    (as ``anyio.to_thread.run_sync`` does), so that cleanup never runs under a thread still using the files."""
    future = asyncio.get_running_loop().run_in_executor(_BULK, functools.partial(fn, *args, **kwargs))
    with anyio.CancelScope(shield=True):
        return await future


@contextmanager
def spool_dir(store: BlobStore) -> Iterator[Path]:
    """A private folder for one upload, removed afterwards (``gc`` sweeps it if the process dies)."""
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=store.tmp_dir, prefix="upload-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _too_large(limit: int) -> UploadTooLargeError:
    return UploadTooLargeError(f"the upload is larger than this server's limit of {limit} bytes. Fix: ask the "
                               "operator to raise WEIGHTLAB_MAX_UPLOAD_BYTES, or upload a smaller file.")


def _write(f: BinaryIO, h, chunks: list[bytes]) -> None:
    data = b"".join(chunks)  # one copy, here: growing a buffer on the event loop copies each byte several times
    h.update(data)
    f.write(data)


async def receive(request: Request, dest: Path, *, max_bytes: int) -> tuple[str, int]:
    """Stream the request body into ``dest``; returns its sha256 and size.

    Raises:
        UploadTooLargeError: the declared or actual length exceeds ``max_bytes`` (nothing more is read).
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    h = hashlib.sha256()
    size = 0
    chunks: list[bytes] = []
    buffered = 0
    with open(dest, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
            buffered += len(chunk)
            if buffered >= CHUNK:
                await run_bulk(_write, f, h, chunks)
                chunks, buffered = [], 0
        await run_bulk(_write, f, h, chunks)
    return h.hexdigest(), size


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (inclusive) of a single satisfiable range; None to send everything; (-1, -1) if unsatisfiable."""
    m = _RANGE.fullmatch(header.strip()) if header else None
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix: the last N bytes
        n = int(m[2])
        return (max(size - n, 0), size - 1) if n and size else (-1, -1)
    start = int(m[1])
    end = min(int(m[2]), size - 1) if m[2] else size - 1
    if m[2] and int(m[2]) < start:
        return None  # invalid: ignored
    return (start, end) if start < size else (-1, -1)


def _chunks(store: BlobStore, sha256: str, start: int, length: int) -> Iterator[bytes]:
    with store.open(sha256) as f:
        f.seek(start)
        while length > 0:
            chunk = f.read(min(CHUNK, length))
            if not chunk:
                raise RegistryError(f"blob {sha256} ended early; it is corrupt. Fix: `weightlab registry verify`.")
            length -= len(chunk)
            yield chunk


def blob_response(request: Request, store: BlobStore, sha256: str, size: int, *,
                  filename: str | None = None) -> Response:
    """The blob (or the requested range of it), streamed; headers only for HEAD."""
    etag = f'"{sha256}"'
    headers = {"accept-ranges": "bytes", "etag": etag, "cache-control": "private, max-age=31536000, immutable"}
    if filename:
        headers["content-disposition"] = f"attachment; filename*=UTF-8''{quote(filename)}"
    if_range = request.headers.get("if-range")
    rng = _byte_range(request.headers.get("range"), size) if if_range in (None, etag) else None
    if rng == (-1, -1):
        return Response(status_code=416, headers={**headers, "content-range": f"bytes */{size}"})
    start, end = rng or (0, size - 1)
    length = end - start + 1 if size else 0
    status = 206 if rng else 200
    headers["content-length"] = str(length)
    if rng:
        headers["content-range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(_chunks(store, sha256, start, length), status_code=status, headers=headers,
                             media_type="application/octet-stream")
