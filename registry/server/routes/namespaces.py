"""Namespaces: which exist and whether anyone may read them without a token."""

from __future__ import annotations

from fastapi import APIRouter

from weightlab.registry.schemas import NamespacePublic, NamespaceUpdate
from weightlab.registry.server.deps import AccessDep, AdminNamespace, RegistryDep

router = APIRouter(prefix="/namespaces", tags=["namespaces"])


@router.get("", response_model=list[NamespacePublic], summary="List namespaces")
def list_namespaces(registry: RegistryDep, access: AccessDep) -> list[NamespacePublic]:
    """The namespaces the caller may read."""
    return registry.namespaces(namespaces=access.readable())


@router.put("/{namespace}", response_model=NamespacePublic, summary="Make a namespace public or private")
def update_namespace(namespace: AdminNamespace, body: NamespaceUpdate, registry: RegistryDep) -> NamespacePublic:
    """Public: anyone may read it without a token. Private (the default): only token holders."""
    return registry.set_public(namespace, body.public)
