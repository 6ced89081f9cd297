"""API tokens: create (the secret is shown once), list, revoke, and who am I."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from weightlab.registry import auth
from weightlab.registry.db import transaction
from weightlab.registry.schemas import ALL, TokenCreate, TokenCreated, TokenPublic
from weightlab.registry.server.deps import AccessDep, PrincipalDep, RegistryDep

router = APIRouter(prefix="/tokens", tags=["tokens"])
TokenId = Annotated[int, Path(ge=1, le=2**62)]


@router.post("", response_model=TokenCreated, status_code=201, summary="Create a token")
def create_token(body: TokenCreate, registry: RegistryDep, access: AccessDep) -> TokenCreated:
    """A new token for a namespace the caller administers (``*``: only with an admin token for ``*``).
    The response holds the secret; it is not stored and cannot be shown again."""
    access.require(body.namespace, "admin")
    return registry.create_token(namespace=body.namespace, scope=body.scope, name=body.name,
                                 expires_in_days=body.expires_in_days)


@router.get("", response_model=list[TokenPublic], summary="List tokens")
def list_tokens(registry: RegistryDep, principal: PrincipalDep, access: AccessDep) -> list[TokenPublic]:
    """The tokens of the namespace the caller administers (all tokens with admin on ``*``); never their secrets."""
    access.require_token()
    access.require(principal.namespace, "admin")
    return registry.tokens(namespaces=None if principal.namespace == ALL else {principal.namespace})


@router.get("/current", response_model=TokenPublic, summary="The token sent with this request")
def current_token(registry: RegistryDep, principal: PrincipalDep, access: AccessDep) -> TokenPublic:
    access.require_token()
    with transaction(registry.engine) as s:
        return auth.get_token(s, token_id=principal.token_id)


@router.delete("/{token_id}", status_code=204, response_class=Response, summary="Revoke a token")
def delete_token(token_id: TokenId, registry: RegistryDep, access: AccessDep) -> Response:
    """Revoke a token of a namespace the caller administers (a token may revoke itself). Any other id answers 404,
    exactly as one that does not exist."""
    access.require_token()
    with transaction(registry.engine) as s:
        token = auth.get_token(s, token_id=token_id)
    if token_id != access.principal.token_id and not access.principal.grants(token.namespace, "admin"):
        raise auth.token_not_found(token_id)  # exactly as if it did not exist: ids reveal nothing
    registry.revoke_token(token_id)
    return Response(status_code=204)
