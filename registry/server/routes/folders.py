"""Folder versions (a diffusers pipeline or MotionAdapter folder, an ONNX export): uploaded as one tar stream."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response
from starlette.requests import ClientDisconnect

from weightlab.errors import HashMismatchError, UnsupportedMediaTypeError, UploadTooLargeError
from weightlab.registry import folder_tar
from weightlab.registry.schemas import VersionInfo, manifest_digest
from weightlab.registry.server import transfer
from weightlab.registry.server.deps import (NAME_PATTERN, AccessDep, NamePath, RegistryDep, SettingsDep, UploadDep,
                                            WriteNamespace)
from weightlab.registry.server.routes.versions import register_received

router = APIRouter(tags=["versions"])

TAR = "application/x-tar"
_TAR_BODY = {"requestBody": {"required": True, "description": "the folder as an uncompressed PAX tar stream: regular "
                             f"files only, each with a `{folder_tar.SHA256_RECORD}` PAX record (its sha256)",
                             "content": {TAR: {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/artifacts/{namespace}/{name}/folders", response_model=VersionInfo, status_code=201,
             summary="Upload a folder version", openapi_extra=_TAR_BODY,
             responses={200: {"model": VersionInfo, "description": "the artifact already holds this folder"}})
async def upload_folder(
    request: Request, response: Response, namespace: WriteNamespace, name: NamePath, registry: RegistryDep,
    settings: SettingsDep, access: AccessDep, upload: UploadDep,
    folder: Annotated[str, Query(pattern=NAME_PATTERN, description="the folder's name (recorded as the source)")] = "folder",
) -> VersionInfo:
    """Stream a tar of the folder to the server: every file is unpacked as it arrives and checked against its
    declared sha256, the set of files against ``sha256``; then the folder is validated like a local ``add`` and
    registered as the next version.

    Refused uploads (4xx) change neither the store nor the database; an interrupted one leaves only a temp folder,
    which ``gc`` removes.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type != TAR:
        raise UnsupportedMediaTypeError(f"folder uploads are an uncompressed tar stream sent as {TAR}, not "
                                        f"{content_type or 'no Content-Type'}. Fix: set that Content-Type.")
    declared = request.headers.get("content-length", "")
    too_large = UploadTooLargeError(f"the upload is larger than this server's limit of {settings.max_upload_bytes} "
                                    "bytes. Fix: ask the operator to raise WEIGHTLAB_MAX_UPLOAD_BYTES, or upload a "
                                    "smaller folder.")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise too_large
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
        if digest != upload.sha256:
            raise HashMismatchError(f"the folder's files ({len(files)}) have manifest digest {digest}, but sha256="
                                    f"{upload.sha256} was declared; nothing was stored. Fix: declare the digest of "
                                    "exactly the files you send (weightlab.Client.add(folder) does).")
        return await register_received(registry, response, root, upload, name=f"{namespace}/{name}", shown=folder,
                                       source=f"upload:{folder}/", trusted=False, namespaces=access.readable())
