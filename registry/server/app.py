"""The FastAPI application: routes under ``/api/v1``, OpenAPI at ``/openapi.json``, docs at ``/docs``.

Stateless over the registry (database + blob store), so several processes or machines can serve one
PostgreSQL + S3 registry. Each process also runs ``job_workers`` job worker threads on the shared queue.
Every :class:`~weightlab.errors.WeightlabError` becomes its class's ``http_status`` with an
:class:`~weightlab.registry.schemas.ErrorBody` (message, class name, fields).

Example:
    >>> app = create_app(ServerSettings(database_url="sqlite:////tmp/r.db"))   # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                           # doctest: +SKIP
"""

from __future__ import annotations

import gc
import threading
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

import weightlab
from weightlab.errors import WeightlabError
from weightlab.registry.config import ServerSettings
from weightlab.registry.jobs import Worker
from weightlab.registry.schemas import JSON_LIMITS, ErrorBody, Health, error_classes
from weightlab.registry.server.routes import ROUTERS
from weightlab.registry.service import Registry

API_PREFIX = "/api/v1"
THREADS = 128  # request handlers run in threads (database and file work); downloads hold one while they stream
_ERRORS = {code: {"model": ErrorBody} for code in sorted({cls.http_status for cls in error_classes().values()})}


async def _weightlab_error(request: Request, error: WeightlabError) -> JSONResponse:
    status = error.http_status
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(ErrorBody.of(error).model_dump(mode="json"), status_code=status, headers=headers)


def create_app(settings: ServerSettings | None = None, *, registry: Registry | None = None) -> FastAPI:
    """The web API over a registry.

    Args:
        settings (ServerSettings | None): default from the environment (``WEIGHTLAB_*``).
        registry (Registry | None): serve this registry (the caller closes it); default one opened from
            ``settings`` when the app starts and closed when it stops.
    """
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        reg = registry or Registry(settings.db_url, home=settings.home, store=settings.blob_store_url)
        app.state.registry, app.state.settings = reg, settings
        app.state.wake_workers = wake = threading.Event()
        stop = threading.Event()
        workers = [threading.Thread(target=Worker(reg, poll_seconds=settings.job_poll_seconds,
                                                  lease_seconds=settings.job_lease_seconds,
                                                  max_attempts=settings.job_max_attempts, wake=wake).run,
                                    args=(stop,), name=f"weightlab-job-worker-{i}", daemon=True)
                   for i in range(settings.job_workers)]
        for w in workers:
            w.start()
        try:
            yield
        finally:
            stop.set()
            wake.set()
            for w in workers:
                w.join(timeout=5)  # a job still running is taken over by another worker after its lease
            if registry is None:
                reg.close()

    app = FastAPI(title="weightlab registry", version=weightlab.__version__, lifespan=lifespan, responses=_ERRORS,
                  description="Bases and residuals as immutable, content-addressed versions with lineage. "
                              "Send `Authorization: Bearer <token>`; without one only public namespaces can be read.\n\n"
                              "**Limits.** Namespaces and names: a letter or digit, then letters, digits, `.`, `_` or "
                              "`-`, at most 100 characters. Tags and aliases: the same, starting with a letter. Every "
                              "pattern must match the whole value (no trailing newline). Metadata (and lineage "
                              f"recipes, job metadata): {JSON_LIMITS}; anything else is refused with 422 and nothing "
                              "is stored. Whatever is addressed by an id or a hash (a job, a token, a blob) and "
                              "cannot be read answers exactly as if it did not exist (404).")
    app.add_exception_handler(WeightlabError, _weightlab_error)
    api = APIRouter(prefix=API_PREFIX)

    @api.get("/health", response_model=Health, tags=["health"], summary="Liveness")
    def health() -> Health:
        return Health(version=weightlab.__version__)

    for router in ROUTERS:
        api.include_router(router)
    app.include_router(api)
    return app


def create_server_app() -> FastAPI:
    """The app of one ``weightlab serve`` process (settings from the environment), ready before its first request.

    What uploads need is loaded now, not by the first uploads in several threads at once: the loaders (torch,
    diffusers) and each family's key tables (built from a full-size UNet on the meta device, ~1 s). Then everything
    loaded so far is exempted from garbage collection (``gc.freeze``): a full collection otherwise walks torch's
    objects, ~100 ms during which the request that triggered it (a list, a search) waits.
    """
    import weightlab.inspect  # noqa: F401
    from weightlab.families import FAMILIES

    for family in FAMILIES.values():
        family.kohya_names  # noqa: B018  (a cached property: builds the tables it depends on)
    gc.collect()
    gc.freeze()
    return create_app()
