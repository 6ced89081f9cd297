"""Maintenance of the whole registry (admin on ``*``): verify every blob, collect garbage."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from weightlab.registry.schemas import ALL, GcReport, VerifyReport
from weightlab.registry.server.deps import AccessDep, RegistryDep

router = APIRouter(prefix="/maintenance", tags=["maintenance"])


@router.post("/verify", response_model=VerifyReport, summary="Re-hash every blob")
def verify(registry: RegistryDep, access: AccessDep,
           remove_corrupt: Annotated[bool, Query(description="delete corrupt blobs")] = False) -> VerifyReport:
    access.require(ALL, "admin")
    return registry.verify(remove_corrupt=remove_corrupt)


@router.post("/gc", response_model=GcReport, summary="Delete unreferenced blobs")
def gc(registry: RegistryDep, access: AccessDep,
       grace: Annotated[float, Query(ge=0, le=10**9, description="keep anything newer than this (seconds)")] = 3600.0,
       dry_run: bool = False) -> GcReport:
    access.require(ALL, "admin")
    return registry.gc(grace=grace, dry_run=dry_run)
