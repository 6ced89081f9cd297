"""Merge/export jobs: submit (queued in the database), poll, list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from weightlab.registry import jobs
from weightlab.registry.db import transaction
from weightlab.registry.schemas import JobCreate, JobPublic, JobStatus, Ref
from weightlab.registry.server.deps import AccessDep, PrincipalDep, RegistryDep

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", response_model=JobPublic, status_code=202, summary="Submit a job")
def submit_job(body: JobCreate, request: Request, registry: RegistryDep, access: AccessDep,
               principal: PrincipalDep) -> JobPublic:
    """Queue a job; a worker runs it and registers the result with its lineage. Poll ``GET /jobs/{id}``.

    Needs write on the result's namespace and read on every input.
    """
    runner, params = jobs.parse(body)
    access.require(Ref.parse_name(runner.output(params)).namespace, "write")
    for ref in runner.inputs(params):
        access.require_ref(ref, "read")
    with transaction(registry.engine, write=True) as s:
        job = jobs.public(jobs.enqueue(s, spec=body, token_id=principal.token_id))
    request.app.state.wake_workers.set()
    return job


@router.get("/{job_id}", response_model=JobPublic, summary="Get a job")
def get_job(job_id: Annotated[int, Path(ge=1, le=2**62)], registry: RegistryDep, access: AccessDep) -> JobPublic:
    """A job whose result goes to a namespace the caller may read; any other answers 404, exactly as an id that
    does not exist."""
    return registry.job(job_id, namespaces=access.readable())


@router.get("", response_model=list[JobPublic], summary="List jobs")
def list_jobs(registry: RegistryDep, access: AccessDep, status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> list[JobPublic]:
    """Jobs whose results go to namespaces the caller may read, newest first."""
    return registry.jobs(status=status, limit=limit, offset=offset, namespaces=access.readable())
