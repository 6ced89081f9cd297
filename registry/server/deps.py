"""Every dependency of the routes, as ``Annotated`` types: the registry, settings, the caller and their access.

Path parameters that name things are validated here once (``NamespacePath``, ``NamePath``, ``VersionPath``), and
``ReadNamespace``/``WriteNamespace``/``AdminNamespace`` are the ``namespace`` path parameter after the caller's
access to it was checked, so a route cannot forget to authorise. ``UploadDep`` is what both upload routes (a file,
a folder) take besides the body: their query parameters, checked before a byte of the body is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from weightlab.errors import AuthenticationError, MetadataError, NotFoundError, RegistryError, fmt_validation_errors
from weightlab import files
from weightlab.registry import auth, crud
from weightlab.registry.config import ServerSettings
from weightlab.registry.db import transaction
from weightlab.registry.schemas import JSON_LIMITS, Derivation, Kind, Ref, check_label, parse_json
from weightlab.registry.service import Registry

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
FILENAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,88}\.safetensors$"
LABEL_PATTERN = r"^[A-Za-z][A-Za-z0-9._-]{0,99}$"
SHA256_PATTERN = f"^{files.SHA256_PATTERN}$"
VERSION_PATTERN = r"^(latest|[0-9a-fA-F]{1,64}|:[A-Za-z][A-Za-z0-9._-]{0,99})$"
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"  # printable text: no control characters (NUL, newlines, escapes)
# pydantic checks `pattern` with Rust's regex engine, whose `$` matches only at the very end (never before a
# trailing newline), so these are full matches.


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


RegistryDep = Annotated[Registry, Depends(get_registry)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False, description="An API token from `weightlab token create` or POST /api/v1/tokens. "
                                                   "Without one, only public namespaces can be read.")


def get_principal(request: Request, registry: RegistryDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> auth.Principal:
    if credentials is None and request.headers.get("authorization"):
        raise AuthenticationError("the Authorization header is not `Bearer <token>`. Fix: send "
                                       "`Authorization: Bearer <token>`.")
    with transaction(registry.engine) as s:
        return auth.authenticate(s, token=credentials.credentials if credentials else None)


PrincipalDep = Annotated[auth.Principal, Depends(get_principal)]


@dataclass(frozen=True)
class Access:
    """The caller's rights, checked against the database (public namespaces) when asked."""

    registry: Registry
    principal: auth.Principal

    def require_token(self) -> None:
        """Raise AuthenticationError (401) for an anonymous caller."""
        if self.principal.anonymous:
            raise AuthenticationError("this needs a token. Fix: send `Authorization: Bearer <token>` (an admin "
                                           "creates one with `weightlab token create`).")

    def require(self, namespace: str, scope: auth.Scope) -> None:
        """Raise AuthenticationError (401) or PermissionDeniedError (403) unless allowed."""
        if self.principal.grants(namespace, scope):
            return
        with transaction(self.registry.engine) as s:
            auth.authorize(s, principal=self.principal, namespace=namespace, scope=scope)

    def require_ref(self, ref: str, scope: auth.Scope) -> Ref:
        """Parse a reference and require ``scope`` on its namespace."""
        parsed = Ref.parse(ref)
        self.require(parsed.namespace, scope)
        return parsed

    def readable(self) -> set[str] | None:
        """The namespaces the caller may read (None: every one)."""
        if self.principal.namespace == auth.ALL:
            return None
        with transaction(self.registry.engine) as s:
            return auth.readable_namespaces(s, principal=self.principal)

    def require_blob(self, sha256: str) -> None:
        """Raise NotFoundError unless a version in a namespace the caller may read has a file in the blob."""
        with transaction(self.registry.engine) as s:
            users = crud.blob_namespaces(s, sha256=sha256)
        readable = self.readable()
        if not users or (readable is not None and not users & readable):
            raise NotFoundError(f"no version you can read has a file with sha256 {sha256}. Fix: check the hash, or "
                                "send a token for the namespace that holds it.")


def get_access(registry: RegistryDep, principal: PrincipalDep) -> Access:
    return Access(registry, principal)


AccessDep = Annotated[Access, Depends(get_access)]

NamespacePath = Annotated[str, Path(pattern=NAME_PATTERN, description="namespace, e.g. `team`")]
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="artifact name, e.g. `anime-style`")]
VersionPath = Annotated[str, Path(pattern=VERSION_PATTERN, description="`latest`, a version number, 8+ hex digits "
                                                                       "of its sha256 or tensor hash, or `:alias`")]
AliasPath = Annotated[str, Path(pattern=LABEL_PATTERN, description="alias, e.g. `prod`")]


def version_ref(namespace: str, name: str, version: str) -> str:
    """The registry reference of a ``{namespace}/{name}/versions/{version}`` path."""
    if version == "latest":
        return f"{namespace}/{name}"
    return f"{namespace}/{name}{version}" if version.startswith(":") else f"{namespace}/{name}@{version}"


def _namespace_with(scope: auth.Scope):
    def check(namespace: NamespacePath, access: AccessDep) -> str:
        access.require(namespace, scope)
        return namespace

    return check


ReadNamespace = Annotated[str, Depends(_namespace_with("read"))]
WriteNamespace = Annotated[str, Depends(_namespace_with("write"))]
AdminNamespace = Annotated[str, Depends(_namespace_with("admin"))]


# -- uploads --------------------------------------------------------------------------------------------------


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _derivation(text: str | None, access: Access) -> Derivation | None:
    """The ``lineage`` query value: parsed here (any depth refused cleanly), then validated as a Derivation (its
    recipe within the metadata limits); the caller must be able to read every input it names."""
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
        raise RegistryError(f"lineage is not a valid Derivation ({fmt_validation_errors(e.errors(), 'lineage')}). Fix: "
                            "send Derivation(...).model_dump_json().") from None
    for inp in derivation.inputs:
        if inp.ref is not None:
            access.require_ref(inp.ref, "read")
    return derivation


@dataclass(frozen=True)
class Upload:
    """The query parameters of an upload (a file or a folder), checked: ``tags`` as labels, ``metadata`` within the
    limits, ``lineage`` a Derivation whose inputs the caller may read."""

    sha256: str
    kind: Kind | None
    tags: list[str]
    metadata: dict[str, Any]
    source: str | None
    lineage: Derivation | None
    strict: bool
    exist_ok: bool


def get_upload(
    access: AccessDep,
    sha256: Annotated[str, Query(pattern=SHA256_PATTERN, description="sha256 of the file; for a folder its manifest "
                                 "digest, the sha256 of its `<sha256>  <path>` lines sorted by path. A mismatch "
                                 "stores nothing")],
    kind: Kind | None = None,
    tag: Annotated[list[str], Query(max_length=100, description="a tag: a letter, then letters, digits, '.', '_' or "
                                    "'-' (at most 100); repeat for several")] = [],
    metadata: Annotated[str | None, Query(max_length=65536, description=f"a JSON object: {JSON_LIMITS} (else 422, "
                                          "nothing stored)")] = None,
    source: Annotated[str | None, Query(max_length=2048, pattern=TEXT_PATTERN, description="where it came from "
                                        "(recorded; printable text, no control characters)")] = None,
    lineage: Annotated[str | None, Query(max_length=8192, description="how it was produced: a Derivation as JSON, "
                                         "recorded with the version")] = None,
    strict: Annotated[bool, Query(description="refuse keys that map to no module of the family")] = True,
    exist_ok: Annotated[bool, Query(description="when the artifact already holds this content, return that version "
                                                "(200) instead of 409")] = True,
) -> Upload:
    return Upload(sha256=sha256, kind=kind, tags=[check_label(t, "tag") for t in tag],
                  metadata={} if metadata is None else parse_json(metadata, "metadata"), source=source,
                  lineage=_derivation(lineage, access), strict=strict, exist_ok=exist_ok)


UploadDep = Annotated[Upload, Depends(get_upload)]
