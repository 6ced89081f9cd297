"""The job queue and its workers, and the contract every job kind (:class:`Runner`) fills.

The queue is the ``jobs`` table, so any number of workers (threads of ``weightlab serve``, or ``weightlab
worker`` processes on other machines) can share one PostgreSQL database: a worker claims the oldest queued job
with ``SELECT ... FOR UPDATE SKIP LOCKED`` (SQLite serialises writers instead), marks it running, and sends a
heartbeat while it works. A running job whose heartbeat is older than the lease is taken over by another worker
(its worker died), at most ``max_attempts`` runs in all.

Example:
    >>> spec = JobCreate(kind="merge", params={"recipe": {...}, "output": "team/anim"})   # doctest: +SKIP
    >>> job = enqueue(session, spec=spec, token_id=None)                                 # doctest: +SKIP
    >>> Worker(registry).run_once()                                                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from weightlab.errors import JobSpecError, NotFoundError, RegistryError, WeightlabError, fmt_validation_errors
from weightlab.registry.db import transaction
from weightlab.registry.models import Job
from weightlab.registry.schemas import (JobBase, JobPublic, JobStatus, Ref, VersionInfo, check_json, check_label,
                                        stored_json)

log = logging.getLogger(__name__)


class OutputParams(BaseModel):
    """What every job kind's parameters share: where the result is registered, and its labels."""

    model_config = ConfigDict(extra="forbid")
    output: str = Field(description="ns/name of the result")
    tags: list[str] = []
    metadata: dict[str, Any] = {}

    @field_validator("output")
    @classmethod
    def _output(cls, output: str) -> str:
        ref = Ref.parse_name(output)
        if str(ref) != output:
            raise RegistryError(f"output {output!r}: write it exactly as {ref}, without spaces or newlines.")
        return output

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        return [check_label(t, "tag") for t in tags]

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        return check_json(metadata)


@dataclass(frozen=True)
class Runner:
    """One kind of job.

    Args:
        kind (str): its name in :class:`~weightlab.registry.schemas.JobCreate`.
        params (type[BaseModel]): the model its ``params`` must validate against.
        output (Callable): params -> the ``ns/name`` the result is registered as (writing there is authorised).
        inputs (Callable): params -> the registry references it reads (reading them is authorised).
        run (Callable): (registry, params, job id) -> the registered result.
    """

    kind: str
    params: type[BaseModel]
    output: Callable[[Any], str]
    inputs: Callable[[Any], list[str]]
    run: Callable[[Any, Any, int], VersionInfo]


RUNNERS: dict[str, Runner] = {}


def register_runner(runner: Runner) -> None:
    """Make a job kind available to the API and the workers (:mod:`weightlab.registry.jobs` registers its own)."""
    if runner.kind in RUNNERS:
        raise RegistryError(f"job kind {runner.kind!r} is already registered. Fix: pick another name.")
    RUNNERS[runner.kind] = runner


def job_dir(registry, job_id: int) -> tempfile.TemporaryDirectory:
    """A private work folder for one job run, under the store's temp folder (swept by gc if the worker dies)."""
    registry.store.tmp_dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=registry.store.tmp_dir, prefix=f"job-{job_id}-")


def parse(spec: JobBase) -> tuple[Runner, BaseModel]:
    """The runner of ``spec.kind`` and its validated parameters.

    Raises:
        JobSpecError: unknown kind, or parameters the kind does not accept.
    """
    runner = RUNNERS.get(spec.kind)
    if runner is None:
        raise JobSpecError(f"unknown job kind {spec.kind!r}. Fix: use one of {', '.join(sorted(RUNNERS))}.")
    try:
        return runner, runner.params.model_validate(spec.params)
    except ValidationError as e:
        raise JobSpecError(f"invalid {spec.kind} job parameters: {fmt_validation_errors(e.errors(), 'params')}.") from None
    except RegistryError as e:  # raised by a validator's own check (a reference, a label): not a ValueError
        raise JobSpecError(f"invalid {spec.kind} job parameters: {e}") from None


def public(job: Job) -> JobPublic:
    return JobPublic(id=job.id, kind=job.kind, params=stored_json(job.params, "params"), status=job.status,
                     namespace=job.namespace,
                     result_ref=job.result_ref, error=job.error, attempts=job.attempts,
                     created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at)


def enqueue(session: Session, *, spec: JobBase, token_id: int | None) -> Job:
    """Queue a job (its parameters validated first)."""
    runner, params = parse(spec)
    job = Job(kind=spec.kind, status="queued", namespace=Ref.parse_name(runner.output(params)).namespace,
              params=params.model_dump(mode="json"), token_id=token_id, attempts=0)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: int, namespaces: set[str] | None = None) -> Job:
    """The job ``job_id``, if its result goes to one of ``namespaces`` (None: any).

    Raises:
        NotFoundError: no such job, or one in another namespace (the same error: ids reveal nothing).
    """
    job = session.get(Job, job_id)
    if job is None or (namespaces is not None and job.namespace not in namespaces):
        raise NotFoundError(f"no job with id {job_id}. Fix: `GET /api/v1/jobs` lists the jobs you can see.")
    return job


def list_jobs(session: Session, *, namespaces: set[str] | None, status: JobStatus | None = None,
              limit: int = 100, offset: int = 0) -> list[Job]:
    """Jobs whose results go to ``namespaces`` (None: all), newest first."""
    q = select(Job).order_by(Job.id.desc())
    if namespaces is not None:
        q = q.where(Job.namespace.in_(sorted(namespaces)))
    if status is not None:
        q = q.where(Job.status == status)
    return list(session.scalars(q.limit(limit).offset(offset)))


def claim(session: Session, *, worker: str, lease_seconds: float, max_attempts: int) -> Job | None:
    """Take the oldest runnable job: queued, or running with a heartbeat older than the lease.

    A job whose workers died ``max_attempts`` times is failed instead. Concurrent workers on PostgreSQL skip
    the rows others have locked, so two workers never take the same job.
    """
    while True:
        now = datetime.now(timezone.utc)
        stale = and_(Job.status == "running", Job.heartbeat_at < now - timedelta(seconds=lease_seconds))
        job = session.scalar(select(Job).where(or_(Job.status == "queued", stale)).order_by(Job.id).limit(1)
                             .with_for_update(skip_locked=True))
        if job is None:
            return None
        if job.status == "running" and job.attempts >= max_attempts:
            job.status, job.finished_at = "failed", now
            job.error = (f"its worker ({job.worker}) stopped sending heartbeats; {job.attempts} run(s) were "
                         "started, none finished. Fix: check the workers' logs (out of memory?), then resubmit it.")
            session.flush()
            continue
        if job.status == "running":
            log.warning("job %d: worker %s stopped sending heartbeats; %s takes it over", job.id, job.worker, worker)
        job.status, job.worker, job.attempts = "running", worker, job.attempts + 1
        job.started_at = job.heartbeat_at = now
        job.error = None
        session.flush()
        return job


def heartbeat(session: Session, *, job_id: int, worker: str) -> bool:
    """Extend the lease; False if the job is no longer this worker's."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                             .values(heartbeat_at=datetime.now(timezone.utc)))
    return result.rowcount == 1


def finish(session: Session, *, job_id: int, worker: str, result_ref: str | None = None,
           error: str | None = None) -> bool:
    """Record the outcome; False if another worker took the job over meanwhile (nothing is recorded)."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
        .values(status="failed" if error else "succeeded", result_ref=result_ref, error=error,
                finished_at=datetime.now(timezone.utc)))
    return result.rowcount == 1


class Worker:
    """Runs queued jobs against one registry.

    Args:
        registry (Registry): where inputs come from and results go (its database holds the queue).
        name (str | None): how the worker is recorded on the jobs it runs; default ``host:pid:thread``.
        poll_seconds (float, default 2.0): wait between looks at an empty queue (``wake`` cuts it short).
        lease_seconds (float, default 300): heartbeat timeout after which other workers take a job over.
        max_attempts (int, default 3): runs of a job before it is failed for good.
        wake (threading.Event | None): set it to make an idle worker look at once (the server does on submit).
    """

    def __init__(self, registry, *, name: str | None = None, poll_seconds: float = 2.0, lease_seconds: float = 300.0,
                 max_attempts: int = 3, wake: threading.Event | None = None):
        self.registry = registry
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.poll_seconds, self.lease_seconds, self.max_attempts = poll_seconds, lease_seconds, max_attempts
        self.wake = wake or threading.Event()

    def run_once(self) -> bool:
        """Claim and run one job; False if none was waiting."""
        with transaction(self.registry.engine, write=True) as s:
            job = claim(s, worker=self.name, lease_seconds=self.lease_seconds, max_attempts=self.max_attempts)
            if job is None:
                return False
            job_id, spec = job.id, JobBase(kind=job.kind, params=job.params)
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, beating), daemon=True)
        beat.start()
        result_ref = error = None
        try:
            runner, params = parse(spec)
            result_ref = runner.run(self.registry, params, job_id).ref
            log.info("job %d (%s) succeeded: %s", job_id, spec.kind, result_ref)
        except WeightlabError as e:
            error = f"{type(e).__name__}: {e}"
        except Exception as e:  # a bug or an environment problem: record it on the job, keep the worker alive
            log.exception("job %d (%s) crashed", job_id, spec.kind)
            error = f"{type(e).__name__}: {e} (unexpected; the worker's log has the traceback)"
        finally:
            beating.set()
            beat.join()
        with transaction(self.registry.engine, write=True) as s:
            if not finish(s, job_id=job_id, worker=self.name, result_ref=result_ref, error=error):
                log.warning("job %d was taken over by another worker; its outcome here is dropped", job_id)
        return True

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        while not done.wait(self.lease_seconds / 3):
            try:
                with transaction(self.registry.engine, write=True) as s:
                    if not heartbeat(s, job_id=job_id, worker=self.name):
                        return
            except Exception:  # the database may be briefly unreachable; the next beat tries again
                log.exception("job %d: heartbeat failed", job_id)

    def run(self, stop: threading.Event) -> None:
        """Run jobs until ``stop`` is set."""
        while not stop.is_set():
            try:
                if self.run_once():
                    continue
            except Exception:  # e.g. the database went away: wait, then try again
                log.exception("worker %s: cannot claim a job", self.name)
            self.wake.wait(self.poll_seconds)
            self.wake.clear()
