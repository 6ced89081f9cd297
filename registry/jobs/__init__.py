"""Merge and export jobs: queued in the registry's database, run by workers, results registered with lineage.

- :mod:`~weightlab.registry.jobs.queue`: the queue (the ``jobs`` table), :class:`Worker`, and :class:`Runner`, the
  contract of one job kind: a pydantic model of its parameters, the namespace its result goes to, the registry
  references it reads, and a function that produces the result as a registered version.
- :mod:`~weightlab.registry.jobs.merge`: ``merge``; :mod:`~weightlab.registry.jobs.export`: ``export`` (ONNX).

Both built-in kinds are registered here, when the package is imported; another module adds a kind with
:func:`register_runner`. The wire types (:class:`~weightlab.registry.schemas.JobCreate`,
:class:`~weightlab.registry.schemas.JobPublic`) live in :mod:`weightlab.registry.schemas`.

Example:
    >>> spec = JobCreate(kind="merge", params={"recipe": {...}, "output": "team/anim"})   # doctest: +SKIP
    >>> job = enqueue(session, spec=spec, token_id=None)                                 # doctest: +SKIP
    >>> Worker(registry).run_once()                                                       # doctest: +SKIP
"""

from weightlab.registry.jobs.export import EXPORT, ExportParams
from weightlab.registry.jobs.merge import MERGE, MergeParams
from weightlab.registry.jobs.queue import (RUNNERS, OutputParams, Runner, Worker, claim, enqueue, finish, get_job,
                                           heartbeat, job_dir, list_jobs, parse, public, register_runner)

register_runner(MERGE)
register_runner(EXPORT)

__all__ = ["RUNNERS", "Runner", "register_runner", "OutputParams", "MergeParams", "ExportParams", "MERGE", "EXPORT",
           "Worker", "parse", "public", "enqueue", "get_job", "list_jobs", "claim", "heartbeat", "finish", "job_dir"]
