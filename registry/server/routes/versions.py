"""Versions: search, list, get, and create by uploading a file (streamed, hashed while it arrives)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import TypeAdapter
from starlette.requests import ClientDisconnect

from weightlab.errors import DuplicateVersionError, HashMismatchError, UnsupportedMediaTypeError, WeightlabError
from weightlab.registry.schemas import Kind, VersionInfo
from weightlab.registry.server import transfer
from weightlab.registry.server.deps import (FILENAME_PATTERN, LABEL_PATTERN, NAME_PATTERN, TEXT_PATTERN, AccessDep,
                                            NamePath, ReadNamespace, RegistryDep, SettingsDep, Upload, UploadDep,
                                            VersionPath, WriteNamespace, version_ref)
from weightlab.registry.service import register_upload

router = APIRouter(tags=["versions"])

MAX_PAGE = 1000
_VERSIONS = TypeAdapter(list[VersionInfo])


def _json(versions: list[VersionInfo]) -> Response:
    """Serialise once (a returned list would be validated against the response model again, which costs as much)."""
    return Response(_VERSIONS.dump_json(versions), media_type="application/json")


@router.get("/versions", response_model=list[VersionInfo], summary="Search versions")
def search_versions(
    registry: RegistryDep, access: AccessDep,
    kind: Kind | None = None,
    family: Annotated[str | None, Query(max_length=32, pattern=NAME_PATTERN)] = None,
    tag: Annotated[str | None, Query(max_length=100, pattern=LABEL_PATTERN)] = None,
    text: Annotated[str | None, Query(max_length=200, pattern=TEXT_PATTERN, description="substring of name, "
                                      "source or metadata (no control characters)")] = None,
    namespace: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    all_versions: Annotated[bool, Query(description="every version, not only the newest of each artifact")] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> Response:
    """Versions matching every filter, sorted by name, among the namespaces the caller may read; one page."""
    if namespace is not None:
        access.require(namespace, "read")
    return _json(registry.search(kind=kind, family=family, tag=tag, text=text, namespace=namespace,
                                 namespaces=access.readable(), all_versions=all_versions, limit=limit, offset=offset))


@router.get("/artifacts/{namespace}/{name}/versions", response_model=list[VersionInfo], summary="List versions")
def list_versions(namespace: ReadNamespace, name: NamePath, registry: RegistryDep) -> Response:
    """Every version of the artifact, oldest first."""
    return _json(registry.versions(f"{namespace}/{name}"))


@router.get("/artifacts/{namespace}/{name}/versions/{version}", response_model=VersionInfo, summary="Get a version")
def get_version(namespace: ReadNamespace, name: NamePath, version: VersionPath, registry: RegistryDep) -> VersionInfo:
    return registry.get(version_ref(namespace, name, version))


_UPLOAD_BODY = {"requestBody": {"required": True, "description": "the file's bytes (safetensors)",
                                "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                    "format": "binary"}}}}}


@router.post("/artifacts/{namespace}/{name}/versions", response_model=VersionInfo, status_code=201,
             summary="Upload a version", openapi_extra=_UPLOAD_BODY,
             responses={200: {"model": VersionInfo, "description": "the artifact already holds these tensors"}})
async def upload_version(
    request: Request, response: Response, namespace: WriteNamespace, name: NamePath, registry: RegistryDep,
    settings: SettingsDep, access: AccessDep, upload: UploadDep,
    filename: Annotated[str, Query(pattern=FILENAME_PATTERN, description="the file's name in the version (the server "
                                                                        "stores safetensors files)")] = "model.safetensors",
) -> VersionInfo:
    """Stream the body to the server, check its sha256 against ``sha256``, validate it like a local ``add``
    (safetensors header rules, family and kind detection), then register it as the next version.

    Refused uploads (4xx) change neither the store nor the database.
    """
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if content_type != "application/octet-stream":
        raise UnsupportedMediaTypeError(f"upload bodies are the file's raw bytes, sent as application/octet-stream, "
                                        f"not {content_type}. Fix: set that Content-Type.")
    with transfer.spool_dir(registry.store) as spool:
        path = spool / filename
        try:
            digest, _ = await transfer.receive(request, path, max_bytes=settings.max_upload_bytes)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; the spool folder is removed
        if digest != upload.sha256:
            raise HashMismatchError(f"the uploaded bytes hash to {digest}, but sha256={upload.sha256} was declared; "
                                    "nothing was stored. Fix: upload again (the transfer was corrupted), or declare "
                                    "the file's real sha256.")
        return await register_received(registry, response, path, upload, name=f"{namespace}/{name}", shown=filename,
                                       source=f"upload:{filename}", trusted=True, namespaces=access.readable())


async def register_received(registry, response: Response, path, upload: Upload, *, name: str, shown: str,
                            source: str, trusted: bool, namespaces: set[str] | None) -> VersionInfo:
    """Register an upload the server has received and hash-checked at ``path`` (a file or folder) on the bulk
    threads (:func:`weightlab.registry.service.register_upload`); ``source`` is recorded unless the uploader named
    one. Errors name ``shown`` (what the client sent), not the server's temp path."""
    try:
        return await transfer.run_bulk(
            register_upload, registry, path, name=name, source=upload.source or source, sha256=upload.sha256,
            trusted=trusted, kind=upload.kind, tags=upload.tags, metadata=upload.metadata, lineage=upload.lineage,
            strict=upload.strict, namespaces=namespaces)
    except DuplicateVersionError as e:
        if not upload.exist_ok:
            raise
        response.status_code = 200
        return e.version
    except WeightlabError as e:
        e.args = (str(e).replace(str(path), shown),)
        raise
