"""Aliases and tags: the mutable labels of immutable versions."""

from __future__ import annotations

from fastapi import APIRouter, Response

from weightlab.errors import RegistryError
from weightlab.registry.schemas import AliasUpdate, Ref, TagsUpdate, VersionInfo
from weightlab.registry.server.deps import (AliasPath, NamePath, RegistryDep, VersionPath, WriteNamespace,
                                            version_ref)

router = APIRouter(tags=["aliases and tags"])


@router.put("/artifacts/{namespace}/{name}/aliases/{alias}", response_model=VersionInfo, summary="Set or move an alias")
def set_alias(namespace: WriteNamespace, name: NamePath, alias: AliasPath, body: AliasUpdate,
              registry: RegistryDep) -> VersionInfo:
    """Point the alias at the version ``ref`` names (a version of this artifact); returns that version."""
    target = Ref.parse(body.ref)
    if target.artifact != f"{namespace}/{name}":
        raise RegistryError(f"{body.ref} is not a version of {namespace}/{name}; an alias points into its own "
                            f"artifact. Fix: name a version as {namespace}/{name}@N.")
    return registry.alias(body.ref, alias)


@router.delete("/artifacts/{namespace}/{name}/aliases/{alias}", status_code=204, response_class=Response,
               summary="Delete an alias")
def delete_alias(namespace: WriteNamespace, name: NamePath, alias: AliasPath, registry: RegistryDep) -> Response:
    registry.unalias(f"{namespace}/{name}:{alias}")
    return Response(status_code=204)


@router.patch("/artifacts/{namespace}/{name}/versions/{version}/tags", response_model=VersionInfo,
              summary="Add and remove tags")
def update_tags(namespace: WriteNamespace, name: NamePath, version: VersionPath, body: TagsUpdate,
                registry: RegistryDep) -> VersionInfo:
    return registry.tag(version_ref(namespace, name, version), body.add, remove=body.remove)
