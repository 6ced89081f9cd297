"""Folder versions (a diffusers pipeline or MotionAdapter folder, an ONNX export): uploaded as one tar stream."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response
from starlette.requests import ClientDisconnect

from weightlab.registry import folder_tar
from weightlab.registry.ingest import stage
from weightlab.registry.onnx_artifact import describe_onnx, is_onnx_export
from weightlab.registry.schemas import Kind, VersionInfo, check_json, check_label, manifest_digest
from weightlab.registry.server import transfer
from weightlab.registry.server.deps import (NAME_PATTERN, SHA256_PATTERN, TEXT_PATTERN, AccessDep, NamePath,
                                            RegistryDep, SettingsDep, WriteNamespace)
from weightlab.registry.server.routes.versions import (METADATA_HELP, SOURCE_HELP, TAG_HELP, _derivation, _metadata,
                                                       register_received)
from weightlab.registry.store import HashMismatchError

router = APIRouter(tags=["versions"])

TAR = "application/x-tar"
_TAR_BODY = {"requestBody": {"required": True, "description": "the folder as an uncompressed PAX tar stream: regular "
                             f"files only, each with a `{folder_tar.SHA256_RECORD}` PAX record (its sha256)",
                             "content": {TAR: {"schema": {"type": "string", "format": "binary"}}}}}


def _check_before_storing(folder, *, kind: str | None, strict: bool) -> None:
    """The checks ``Registry.add`` runs after storing, run first so that a refused upload leaves no blob behind
    (the folder's config, which the version records, within the metadata limits too)."""
    from weightlab.loading import load

    with stage(folder):  # the ingest rules first: no pickles, sound safetensors headers
        pass
    if kind == "onnx" or is_onnx_export(folder):
        config = describe_onnx(folder).config
    else:
        config = getattr(load(folder, kind=kind, strict=strict), "config", None)
    if config:
        check_json(config, "config")


@router.post("/artifacts/{namespace}/{name}/folders", response_model=VersionInfo, status_code=201,
             summary="Upload a folder version", openapi_extra=_TAR_BODY,
             responses={200: {"model": VersionInfo, "description": "the artifact already holds this folder"}})
async def upload_folder(
    request: Request, response: Response, namespace: WriteNamespace, name: NamePath, registry: RegistryDep,
    settings: SettingsDep, access: AccessDep,
    sha256: Annotated[str, Query(pattern=SHA256_PATTERN, description="the folder's manifest digest: sha256 of its "
                                 "`<sha256>  <path>` lines sorted by path; a mismatch stores nothing")],
    folder: Annotated[str, Query(pattern=NAME_PATTERN, description="the folder's name (recorded as the source)")] = "folder",
    kind: Kind | None = None,
    tag: Annotated[list[str], Query(max_length=100, description=TAG_HELP)] = [],
    metadata: Annotated[str | None, Query(max_length=65536, description=METADATA_HELP)] = None,
    source: Annotated[str | None, Query(max_length=2048, pattern=TEXT_PATTERN, description=SOURCE_HELP)] = None,
    lineage: Annotated[str | None, Query(max_length=8192, description="how it was produced: a Derivation as JSON")] = None,
    strict: Annotated[bool, Query(description="refuse keys that map to no module of the family")] = True,
    exist_ok: Annotated[bool, Query(description="when the artifact already holds this folder, return that version "
                                                "(200) instead of 409")] = True,
) -> VersionInfo:
    """Stream a tar of the folder to the server: every file is unpacked as it arrives and checked against its
    declared sha256, the set of files against ``sha256``; then the folder is validated like a local ``add`` and
    registered as the next version.

    Refused uploads (4xx) change neither the store nor the database; an interrupted one leaves only a temp folder,
    which ``gc`` removes.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type != TAR:
        raise transfer.UnsupportedMediaTypeError(f"folder uploads are an uncompressed tar stream sent as {TAR}, not "
                                                 f"{content_type or 'no Content-Type'}. Fix: set that Content-Type.")
    declared = request.headers.get("content-length", "")
    too_large = transfer.UploadTooLargeError(f"the upload is larger than this server's limit of "
                                             f"{settings.max_upload_bytes} bytes. Fix: ask the operator to raise "
                                             "WEIGHTLAB_MAX_UPLOAD_BYTES, or upload a smaller folder.")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise too_large
    tags = [check_label(t, "tag") for t in tag]
    meta = _metadata(metadata)
    derivation = _derivation(lineage, access)
    with transfer.spool_dir(registry.store) as spool:
        root = spool / folder
        root.mkdir()
        try:
            files = await anyio.to_thread.run_sync(
                lambda: folder_tar.extract(request.stream(), root, max_bytes=settings.max_upload_bytes,
                                           too_large=too_large))
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; the spool folder is removed
        digest = manifest_digest(files)
        if digest != sha256:
            raise HashMismatchError(f"the folder's files ({len(files)}) have manifest digest {digest}, but sha256="
                                    f"{sha256} was declared; nothing was stored. Fix: declare the digest of exactly "
                                    "the files you send (weightlab.Client.add(folder) does).")
        return await register_received(
            registry, response, root, shown=folder, check=_check_before_storing, name=f"{namespace}/{name}",
            digest=digest, trusted=False, kind=kind, tags=tags, metadata=meta, lineage=derivation, strict=strict,
            exist_ok=exist_ok, recorded_source=source or f"upload:{folder}/", namespaces=access.readable())
