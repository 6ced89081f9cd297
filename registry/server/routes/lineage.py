"""Lineage: what a version was derived from (read), and recording it once (write)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from weightlab.registry.schemas import Derivation, LineageNode
from weightlab.registry.server.deps import (AccessDep, NamePath, ReadNamespace, RegistryDep, VersionPath,
                                            WriteNamespace, version_ref)

router = APIRouter(tags=["lineage"])


def _redact(node: LineageNode, readable: set[str] | None) -> LineageNode:
    """Hide ancestors in namespaces the caller may not read (their tensor hash stays: it reveals no content)."""
    if node.version is not None and readable is not None and node.version.namespace not in readable:
        return LineageNode(label="(a version you cannot read)", tensor_hash=node.tensor_hash)
    for edge in node.inputs:
        edge.node = _redact(edge.node, readable)
    return node


@router.get("/artifacts/{namespace}/{name}/versions/{version}/lineage", response_model=LineageNode,
            summary="Get a version's lineage")
def get_lineage(namespace: ReadNamespace, name: NamePath, version: VersionPath, registry: RegistryDep,
                access: AccessDep, depth: Annotated[int | None, Query(ge=0, le=1000)] = None) -> LineageNode:
    """The version and, recursively, its inputs with their roles and scales (merges: the base and every term)."""
    readable = access.readable()
    return _redact(registry.lineage(version_ref(namespace, name, version), depth=depth, namespaces=readable), readable)


@router.post("/artifacts/{namespace}/{name}/versions/{version}/lineage", response_model=LineageNode,
             status_code=201, summary="Record a version's lineage")
def add_lineage(namespace: WriteNamespace, name: NamePath, version: VersionPath, body: Derivation,
                registry: RegistryDep, access: AccessDep) -> LineageNode:
    """Record how the version was produced (once: lineage never changes). Inputs named by reference must be
    readable by the caller; an input given only by ``tensor_hash`` links to a version holding those tensors among
    those the caller may read (then or, if none does yet, when read later), and to no other: the answer is the same
    whether or not a version the caller cannot read holds them. The recipe obeys the metadata limits."""
    for inp in body.inputs:
        if inp.ref is not None:
            access.require_ref(inp.ref, "read")
    readable = access.readable()
    return _redact(registry.add_lineage(version_ref(namespace, name, version), body, namespaces=readable), readable)
