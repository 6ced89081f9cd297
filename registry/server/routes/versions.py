"""Versions: search, list, get, and create by uploading a file (streamed, hashed while it arrives)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect

from weightlab.errors import NotFoundError, RegistryError, WeightlabError
from weightlab.registry.service import DuplicateVersionError
from weightlab.registry.schemas import (JSON_LIMITS, Derivation, Kind, MetadataError, VersionInfo, check_label,
                                        parse_json)
from weightlab.registry.server import transfer
from weightlab.registry.server.deps import (FILENAME_PATTERN, LABEL_PATTERN, NAME_PATTERN, SHA256_PATTERN, TEXT_PATTERN,
                                            AccessDep, NamePath, ReadNamespace, RegistryDep, SettingsDep, VersionPath,
                                            WriteNamespace, version_ref)
from weightlab.registry.store import HashMismatchError

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


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _metadata(text: str | None) -> dict[str, Any]:
    """The ``metadata`` query value, checked against the limits before anything is received or stored."""
    return {} if text is None else parse_json(text, "metadata")


METADATA_HELP = f"a JSON object: {JSON_LIMITS} (else 422, nothing stored)"
TAG_HELP = "a tag: a letter, then letters, digits, '.', '_' or '-' (at most 100); repeat for several"
SOURCE_HELP = "where it came from (recorded; printable text, no control characters)"


def _derivation(text: str | None, access) -> Derivation | None:
    """The ``lineage`` query value: parsed here (any depth refused cleanly), then validated as a Derivation (its
    recipe within the metadata limits)."""
    if text is None:
        return None
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise MetadataError("lineage nests too deep. Fix: send Derivation(...).model_dump_json(), whose recipe "
                            "is a recipe's JSON.") from None
    except ValueError as e:
        raise RegistryError(f"lineage is not valid JSON ({e}). Fix: send Derivation(...).model_dump_json().") from None
    try:
        derivation = Derivation.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'lineage'}: {err['msg']}" for err in e.errors())
        raise RegistryError(f"lineage is not a valid Derivation ({problems}). Fix: send "
                            "Derivation(...).model_dump_json().") from None
    for inp in derivation.inputs:
        if inp.ref is not None:
            access.require_ref(inp.ref, "read")
    return derivation


def _holding(registry, name: str, sha256: str) -> VersionInfo | None:
    """The version of ``name`` whose file has this sha256, if any."""
    try:
        found = registry.get(f"{name}@{sha256}")
    except NotFoundError:
        return None
    return found if found.sha256 == sha256 else None


def _check_before_storing(path, *, kind: str | None, strict: bool) -> None:
    """Run the checks ``Registry.add`` runs after storing (family, kind, unmatched keys), so a refused upload leaves
    no blob behind. Loading memory-maps the file: nothing is hashed or copied."""
    from weightlab.loading import load

    load(path, kind=kind, strict=strict)


_UPLOAD_BODY = {"requestBody": {"required": True, "description": "the file's bytes (safetensors)",
                                "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                    "format": "binary"}}}}}


@router.post("/artifacts/{namespace}/{name}/versions", response_model=VersionInfo, status_code=201,
             summary="Upload a version", openapi_extra=_UPLOAD_BODY,
             responses={200: {"model": VersionInfo, "description": "the artifact already holds these tensors"}})
async def upload_version(
    request: Request, response: Response, namespace: WriteNamespace, name: NamePath, registry: RegistryDep,
    settings: SettingsDep, access: AccessDep,
    sha256: Annotated[str, Query(pattern=SHA256_PATTERN, description="sha256 of the body; a mismatch stores nothing")],
    filename: Annotated[str, Query(pattern=FILENAME_PATTERN, description="the file's name in the version (the server "
                                                                        "stores safetensors files)")] = "model.safetensors",
    kind: Kind | None = None,
    tag: Annotated[list[str], Query(max_length=100, description=TAG_HELP)] = [],
    metadata: Annotated[str | None, Query(max_length=65536, description=METADATA_HELP)] = None,
    source: Annotated[str | None, Query(max_length=2048, pattern=TEXT_PATTERN, description=SOURCE_HELP)] = None,
    lineage: Annotated[str | None, Query(max_length=8192, description="how it was produced: a Derivation as JSON, "
                                                                       "recorded with the version")] = None,
    strict: Annotated[bool, Query(description="refuse keys that map to no module of the family")] = True,
    exist_ok: Annotated[bool, Query(description="when the artifact already holds these tensors, return that "
                                                "version (200) instead of 409")] = True,
) -> VersionInfo:
    """Stream the body to the server, check its sha256 against ``sha256``, validate it like a local ``add``
    (safetensors header rules, family and kind detection), then register it as the next version.

    Refused uploads (4xx) change neither the store nor the database.
    """
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if content_type != "application/octet-stream":
        raise transfer.UnsupportedMediaTypeError(f"upload bodies are the file's raw bytes, sent as "
                                             f"application/octet-stream, not {content_type}. Fix: set that Content-Type.")
    tags = [check_label(t, "tag") for t in tag]
    meta = _metadata(metadata)
    derivation = _derivation(lineage, access)
    with transfer.spool_dir(registry.store) as spool:
        path = spool / filename
        try:
            digest, _ = await transfer.receive(request, path, max_bytes=settings.max_upload_bytes)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; the spool folder is removed
        if digest != sha256:
            raise HashMismatchError(f"the uploaded bytes hash to {digest}, but sha256={sha256} was declared; nothing "
                                    "was stored. Fix: upload again (the transfer was corrupted), or declare the "
                                    "file's real sha256.")
        return await register_received(
            registry, response, path, shown=filename, check=_check_before_storing, name=f"{namespace}/{name}",
            digest=digest, trusted=True, kind=kind, tags=tags, metadata=meta, lineage=derivation, strict=strict,
            exist_ok=exist_ok, recorded_source=source or f"upload:{filename}", namespaces=access.readable())


async def register_received(registry, response: Response, path, *, shown: str, check, name: str, digest: str,
                            trusted: bool, kind, tags, metadata, lineage, strict: bool, exist_ok: bool,
                            recorded_source: str, namespaces: set[str] | None) -> VersionInfo:
    """Register an upload the server has received and hash-checked at ``path`` (a file or folder), on the bulk
    threads: an identical earlier upload is answered as it is; ``check`` refuses bad content before anything is
    stored; errors name ``shown`` (what the client sent), not the server's temp path. ``namespaces``: those the
    caller may read (lineage inputs given by tensor hash link only there)."""
    try:
        existing = None if lineage else await transfer.run_bulk(_holding, registry, name, digest)
        if existing is not None:  # the same content again (a retry, or many clients): the same outcome, cheaper
            raise DuplicateVersionError(f"{existing.ref} already holds these tensors (tensor hash "
                                        f"{existing.tensor_hash[:12]}); nothing added. Fix: to register it "
                                        "again, use another name.", existing)
        await transfer.run_bulk(check, path, kind=kind, strict=strict)
        return await transfer.run_bulk(
            registry.add, path, name=name, kind=kind, tags=tags, metadata=metadata, sha256=digest,
            sha256_trusted=trusted, strict=strict, lineage=lineage, exist_ok=False, recorded_source=recorded_source,
            namespaces=namespaces)
    except DuplicateVersionError as e:
        if not exist_ok:
            raise
        response.status_code = 200
        return e.version
    except WeightlabError as e:
        e.args = (str(e).replace(str(path), shown),)
        raise
