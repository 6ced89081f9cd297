"""Every dependency of the routes, as ``Annotated`` types: the registry, settings, the caller and their access.

Path parameters that name things are validated here once (``NamespacePath``, ``NamePath``, ``VersionPath``), and
``ReadNamespace``/``WriteNamespace``/``AdminNamespace`` are the ``namespace`` path parameter after the caller's
access to it was checked, so a route cannot forget to authorise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from weightlab.errors import NotFoundError
from weightlab.registry import auth, crud
from weightlab.registry.service import Registry
from weightlab.registry.config import ServerSettings
from weightlab.registry.db import transaction
from weightlab.registry.schemas import Ref

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
FILENAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,88}\.safetensors$"
LABEL_PATTERN = r"^[A-Za-z][A-Za-z0-9._-]{0,99}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
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
        raise auth.AuthenticationError("the Authorization header is not `Bearer <token>`. Fix: send "
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
            raise auth.AuthenticationError("this needs a token. Fix: send `Authorization: Bearer <token>` (an admin "
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
