"""Server commands: ``weightlab serve`` (the web API), ``weightlab worker`` (a job worker process) and
``weightlab token create|list|revoke`` (run on the server's host: they talk to its database directly).

Example:
    weightlab serve --db postgresql+psycopg://reg@db/registry --store s3://models/registry --workers 4
    weightlab token create --namespace team --scope write --name ci
    WEIGHTLAB_REMOTE=http://registry:8000 WEIGHTLAB_TOKEN=wl_... weightlab ls
"""

from __future__ import annotations

import os
from typing import Optional

import typer

from weightlab.cli.common import console, err_console, fail_on_error

_DB = typer.Option(None, "--db", help="Database URL (default $WEIGHTLAB_DB_URL, else SQLite under $WEIGHTLAB_HOME).")
_STORE = typer.Option(None, "--store", help="Blob store: a folder or s3://BUCKET/PREFIX (default $WEIGHTLAB_BLOB_STORE).")


def _export(**options) -> None:
    """Put the options given into the environment, where every server process uvicorn starts reads its settings."""
    names = {"db": "WEIGHTLAB_DB_URL", "store": "WEIGHTLAB_BLOB_STORE"}
    for key, value in options.items():
        if value is not None:
            os.environ[names.get(key, f"WEIGHTLAB_{key.upper()}")] = str(value)


def _registry(db: Optional[str], store: Optional[str] = None):
    from weightlab.registry.service import Registry

    return Registry(db, store=store)


def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    db: Optional[str] = _DB, store: Optional[str] = _STORE,
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes (the API is stateless)."),
    job_workers: Optional[int] = typer.Option(None, "--job-workers", min=0, help="Job worker threads per process (default 1)."),
    max_upload_bytes: Optional[int] = typer.Option(None, "--max-upload-bytes", min=1, help="Largest upload accepted (default 20 GB)."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log every request."),
) -> None:
    """Serve the registry's web API (OpenAPI docs at /docs), and run merge/export jobs."""
    import socket

    import uvicorn

    from weightlab.registry.config import ServerSettings

    with fail_on_error():
        _export(db=db, store=store, job_workers=job_workers, max_upload_bytes=max_upload_bytes)
        settings = ServerSettings()
        _registry(settings.db_url, settings.blob_store_url).close()  # fail early; creates a fresh database's schema
    err_console.print(f"weightlab registry on http://{host}:{port} (docs: /docs), database "
                      f"{_redacted(settings.db_url)}, store {settings.blob_store_url}", highlight=False)
    config = uvicorn.Config("weightlab.registry.server.app:create_server_app", factory=True, host=host, port=port,
                            workers=workers, log_level="info", access_log=access_log, timeout_graceful_shutdown=10)
    if workers == 1:
        uvicorn.Server(config).run()
        return
    from uvicorn.supervisors import Multiprocess

    sock = config.bind_socket()
    # Accepted connections inherit TCP_NODELAY. uvicorn's shared socket has proto 0, so asyncio does not set it
    # itself, and every small response would wait ~40 ms for the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Multiprocess(config, sockets=[sock]).run()


def worker_cmd(
    db: Optional[str] = _DB, store: Optional[str] = _STORE,
    once: bool = typer.Option(False, "--once", help="Run the jobs waiting now, then exit."),
) -> None:
    """Run queued merge/export jobs (any number of workers can share one PostgreSQL database)."""
    import threading

    from weightlab.registry.config import ServerSettings
    from weightlab.registry.jobs import Worker

    with fail_on_error():
        settings = ServerSettings()
        with _registry(db, store) as reg:
            worker = Worker(reg, poll_seconds=settings.job_poll_seconds, lease_seconds=settings.job_lease_seconds,
                            max_attempts=settings.job_max_attempts)
            if once:
                ran = 0
                while worker.run_once():
                    ran += 1
                console.print(f"ran {ran} job(s)", highlight=False)
                return
            stop = threading.Event()
            try:
                worker.run(stop)
            except KeyboardInterrupt:
                stop.set()


def _redacted(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


token_app = typer.Typer(help="API tokens of the web API (run on the server's host).", no_args_is_help=True)


@token_app.command("create")
def token_create_cmd(
    namespace: str = typer.Option(..., "--namespace", help="Namespace it grants access to; '*' for every namespace."),
    scope: str = typer.Option(..., "--scope", help="read | write | admin (each includes the ones before)."),
    name: str = typer.Option("token", "--name", help="A label: who or what uses it."),
    expires_days: Optional[float] = typer.Option(None, "--expires-days", help="Expire after this many days (default never)."),
    db: Optional[str] = _DB,
) -> None:
    """Create a token and print it. It is shown only now: the database keeps its hash."""
    from pydantic import ValidationError

    from weightlab.errors import RegistryError, fmt_validation_errors

    with fail_on_error(), _registry(db) as reg:
        try:
            created = reg.create_token(namespace=namespace, scope=scope, name=name, expires_in_days=expires_days)
        except ValidationError as e:
            raise RegistryError(f"{fmt_validation_errors(e.errors())}. Fix: --scope read|write|admin, --namespace "
                                "NAME or '*'.") from None
    expiry = f", expires {created.expires_at:%Y-%m-%d %H:%M} UTC" if created.expires_at else ""
    err_console.print(f"token {created.id} ({created.scope} on {created.namespace}{expiry}); store it now, it is "
                      "not shown again:", highlight=False, soft_wrap=True)
    typer.echo(created.token)


@token_app.command("list")
def token_list_cmd(db: Optional[str] = _DB) -> None:
    """List tokens (never their secrets)."""
    with fail_on_error(), _registry(db) as reg:
        tokens = reg.tokens()
    for t in tokens:
        expiry = f"{t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else "never"
        console.print(f"{t.id:>5}  {t.scope:<5}  {t.namespace:<20}  expires {expiry:<16}  {t.name}", highlight=False)


@token_app.command("revoke")
def token_revoke_cmd(token_id: int = typer.Argument(..., help="The token's id (`weightlab token list`)."),
                     db: Optional[str] = _DB) -> None:
    """Revoke a token: requests that send it are refused from now on."""
    with fail_on_error(), _registry(db) as reg:
        reg.revoke_token(token_id)
    console.print(f"revoked token {token_id}", highlight=False)


def register(app: typer.Typer) -> None:
    from weightlab.cli.registry import LIMITS_HELP

    app.command("serve", epilog="What the web API accepts (else 422, nothing stored): " + LIMITS_HELP
                + " Jobs, tokens and blobs that the caller may not read answer 404, exactly as missing ones.")(serve_cmd)
    app.command("worker")(worker_cmd)
    app.add_typer(token_app, name="token")
