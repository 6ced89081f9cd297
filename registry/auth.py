"""API tokens and who may do what through the web API.

A token grants one scope on one namespace (``*``: every namespace). Scopes nest: ``read`` (get, search,
download, lineage) < ``write`` (upload, aliases, tags, lineage, jobs whose result goes there) < ``admin``
(tokens for the namespace, making it public; with ``*`` also ``verify`` and ``gc``). A token is shown once, when
it is created; the database keeps only its sha256 (tokens are 256-bit random, so a fast hash is enough).
Anyone, without a token, may read the namespaces marked public.

Decisions depend only on the token and the namespace's name, never on whether an artifact exists, so a refusal
reveals nothing about another namespace's contents.

Example:
    >>> created = create_token(session, name="ci", namespace="team", scope="write")   # doctest: +SKIP
    >>> created.token                                                                 # shown once  # doctest: +SKIP
    'wl_4Jq...'
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from weightlab.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from weightlab.registry import crud
from weightlab.registry.models import ApiToken
from weightlab.registry.schemas import ALL, SCOPES, Scope, TokenCreate, TokenCreated, TokenPublic

TOKEN_PREFIX = "wl_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's grant, or anonymous (``token_id`` None)."""

    token_id: int | None = None
    namespace: str | None = None
    scope: Scope | None = None

    @property
    def anonymous(self) -> bool:
        return self.token_id is None

    def grants(self, namespace: str, scope: Scope) -> bool:
        """Whether the token alone allows ``scope`` on ``namespace``."""
        return (self.scope is not None and self.namespace in (ALL, namespace)
                and SCOPES.index(self.scope) >= SCOPES.index(scope))

    def describe(self) -> str:
        return "anonymous" if self.anonymous else f"token {self.token_id} ({self.scope} on {self.namespace})"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _public(row: ApiToken) -> TokenPublic:
    return TokenPublic(id=row.id, name=row.name, namespace=row.namespace, scope=row.scope,
                       created_at=row.created_at, expires_at=row.expires_at)


def create_token(session: Session, *, spec: TokenCreate) -> TokenCreated:
    """Insert a new token; the returned ``token`` is the only copy of the secret."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = datetime.now(timezone.utc) + timedelta(days=spec.expires_in_days) if spec.expires_in_days else None
    row = ApiToken(name=spec.name, token_hash=_hash(secret), namespace=spec.namespace, scope=spec.scope,
                   expires_at=expires)
    session.add(row)
    session.flush()
    return TokenCreated(**_public(row).model_dump(), token=secret)


def list_tokens(session: Session, *, namespaces: set[str] | None = None) -> list[TokenPublic]:
    """Tokens (never their secrets): those of ``namespaces``, or all (None)."""
    q = select(ApiToken).order_by(ApiToken.id)
    if namespaces is not None:
        q = q.where(ApiToken.namespace.in_(sorted(namespaces)))
    return [_public(row) for row in session.scalars(q)]


def token_not_found(token_id: int) -> NotFoundError:
    """The error for a token id that does not exist, or that the caller may not see (the same, byte for byte)."""
    return NotFoundError(f"no token with id {token_id}. Fix: `GET /api/v1/tokens` lists them.")


def get_token(session: Session, *, token_id: int) -> TokenPublic:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise token_not_found(token_id)
    return _public(row)


def delete_token(session: Session, *, token_id: int) -> None:
    """Revoke a token: requests that send it are refused from now on."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise token_not_found(token_id)
    session.delete(row)
    session.flush()


_HOW = "send `Authorization: Bearer <token>` (Client(url, token=...), or $WEIGHTLAB_TOKEN for the CLI)"


def authenticate(session: Session, *, token: str | None) -> Principal:
    """The principal a bearer token (or none) stands for.

    Raises:
        AuthenticationError: the token is unknown, revoked or expired.
    """
    if token is None:
        return Principal()
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == _hash(token)))
    if row is None:
        raise AuthenticationError("the token is not valid (unknown or revoked). Fix: ask an admin for a new one "
                                  "(`weightlab token create --namespace NS --scope read|write|admin`).")
    expires = row.expires_at
    if expires is not None and expires <= datetime.now(timezone.utc):
        raise AuthenticationError(f"token {row.id} ({row.name!r}) expired at {expires.isoformat()}. Fix: ask an admin "
                                  f"for a new one (`weightlab token create --namespace {row.namespace} --scope "
                                  f"{row.scope}`).")
    return Principal(row.id, row.namespace, row.scope)


def authorize(session: Session, *, principal: Principal, namespace: str, scope: Scope) -> None:
    """Allow ``scope`` on ``namespace`` or raise.

    Raises:
        AuthenticationError: anonymous, and the namespace is not public (or more than reading is asked).
        PermissionDeniedError: the token does not grant it.
    """
    if principal.grants(namespace, scope):
        return
    if scope == "read" and namespace in crud.public_namespaces(session):
        return
    if principal.anonymous:
        why = "is not public" if scope == "read" else f"needs a token with scope {scope}"
        raise AuthenticationError(f"namespace {namespace!r} {why}. Fix: {_HOW}; an admin creates one with "
                                  f"`weightlab token create --namespace {namespace} --scope {scope}`.")
    raise PermissionDeniedError(f"{principal.describe()} does not allow {scope} on namespace {namespace!r}. Fix: use a "
                                f"token for {namespace!r} with scope {scope} (`weightlab token create --namespace "
                                f"{namespace} --scope {scope}`).")


def readable_namespaces(session: Session, *, principal: Principal) -> set[str] | None:
    """The namespaces the principal may read; None means all."""
    if principal.namespace == ALL:
        return None
    public = crud.public_namespaces(session)
    return public | {principal.namespace} if principal.namespace else public
