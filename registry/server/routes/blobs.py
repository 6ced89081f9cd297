"""Downloads: a version's file, or any blob by its sha256; streamed, with HTTP Range for resuming."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from weightlab.errors import NotFoundError
from weightlab.registry.server.deps import (SHA256_PATTERN, AccessDep, NamePath, ReadNamespace, RegistryDep,
                                            VersionPath, version_ref)
from weightlab.registry.server.transfer import blob_response

router = APIRouter(tags=["blobs"])

_BINARY = {200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                 "description": "the bytes"},
           206: {"description": "the requested range"}, 416: {"description": "the range starts past the end"}}


def _stream(request: Request, registry, sha256: str, filename: str | None = None) -> Response:
    found = registry.store.stat(sha256)
    if found is None:
        raise NotFoundError(f"blob {sha256} is missing from the server's store. Fix: ask the operator to run "
                            "`weightlab registry verify`.")
    return blob_response(request, registry.store, sha256, found.size, filename=filename)


@router.get("/blobs/{sha256}", response_class=Response, responses=_BINARY, summary="Download a blob")
@router.head("/blobs/{sha256}", response_class=Response, summary="Size and ETag of a blob", operation_id="head_blob")
def download_blob(request: Request, sha256: Annotated[str, Path(pattern=SHA256_PATTERN)], registry: RegistryDep,
                  access: AccessDep) -> Response:
    """A blob that a version in a namespace the caller may read has a file in (ETag: its sha256)."""
    access.require_blob(sha256)
    return _stream(request, registry, sha256)


@router.get("/artifacts/{namespace}/{name}/versions/{version}/files/{path:path}", response_class=Response,
            responses=_BINARY, summary="Download a version's file")
@router.head("/artifacts/{namespace}/{name}/versions/{version}/files/{path:path}", response_class=Response,
             summary="Size and ETag of a version's file", operation_id="head_file")
def download_file(request: Request, namespace: ReadNamespace, name: NamePath, version: VersionPath, path: str,
                  registry: RegistryDep) -> Response:
    """One file of a version, by its path in the version (a single-file version has one)."""
    info = registry.get(version_ref(namespace, name, version))
    for f in info.files:
        if f.path == path:
            return _stream(request, registry, f.sha256, filename=f.path.rsplit("/", 1)[-1])
    raise NotFoundError(f"{info.ref} has no file {path!r}; its files: {', '.join(f.path for f in info.files)}.")
