"""Namespaces: which exist and whether anyone may read them without a token."""

from __future__ import annotations

from fastapi import APIRouter

from weightlab.registry import crud
from weightlab.registry.db import transaction
from weightlab.registry.server.deps import AccessDep, AdminNamespace, RegistryDep
from weightlab.registry.server.schemas import NamespacePublic, NamespaceUpdate

router = APIRouter(prefix="/namespaces", tags=["namespaces"])


@router.get("", response_model=list[NamespacePublic], summary="List namespaces")
def list_namespaces(registry: RegistryDep, access: AccessDep) -> list[NamespacePublic]:
    """The namespaces the caller may read."""
    readable = access.readable()
    with transaction(registry.engine) as s:
        return [NamespacePublic(name=ns.name, public=ns.public) for ns in crud.list_namespaces(s)
                if readable is None or ns.name in readable]


@router.put("/{namespace}", response_model=NamespacePublic, summary="Make a namespace public or private")
def update_namespace(namespace: AdminNamespace, body: NamespaceUpdate, registry: RegistryDep) -> NamespacePublic:
    """Public: anyone may read it without a token. Private (the default): only token holders."""
    with transaction(registry.engine, write=True) as s:
        ns = crud.set_namespace_public(s, namespace=namespace, public=body.public)
        return NamespacePublic(name=ns.name, public=ns.public)
