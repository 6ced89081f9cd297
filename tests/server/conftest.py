"""Web API fixtures: a real uvicorn server on a free 127.0.0.1 port, over SQLite or PostgreSQL, with tokens.

``serve()`` starts the app in a thread of the test process (torch and the tiny family are already imported, so
it starts at once); the crash test starts ``weightlab serve`` as a subprocess instead, to kill it.
PostgreSQL: as in tests/registry, ``$WEIGHTLAB_TEST_PG_URL`` names a server; each test gets a fresh schema.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest

@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own registry home; no environment leaks in from the developer's shell."""
    monkeypatch.setenv("WEIGHTLAB_HOME", str(tmp_path / "home"))
    for var in ("WEIGHTLAB_DB_URL", "WEIGHTLAB_BLOB_STORE", "WEIGHTLAB_TOKEN", "WEIGHTLAB_REMOTE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # boto3 must never look for credentials off loopback
    return tmp_path / "home"


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'registry.db'}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port()`` -> a TCP port nothing listens on at 127.0.0.1 now."""
    return _free_port


@dataclass
class Live:
    """A running server: its URL, the registry it serves (for direct checks), and token helpers."""

    url: str
    registry: object
    admin: str = ""
    _thread: threading.Thread | None = None
    _server: object = None

    def token(self, namespace: str, scope: str, *, expires_in_days: float | None = None) -> str:
        """A new token, created directly in the database (as `weightlab token create` does)."""
        from weightlab.registry import auth
        from weightlab.registry.db import transaction

        with transaction(self.registry.engine, write=True) as s:
            spec = auth.TokenCreate(name="test", namespace=namespace, scope=scope, expires_in_days=expires_in_days)
            return auth.create_token(s, spec=spec).token

    def client(self, token: str | None = None, **kwargs):
        from weightlab.registry.client import Client

        # A hang guard only: on a loaded 2-core CI an upload the server inspects in ~4 s took over the default 60 s
        # (fresh-clone CI, 2026-12-01); tests of the timeout itself pass their own.
        return Client(self.url, token=token, progress=False, **{"timeout": 600.0, **kwargs})

    def http(self, token: str | None = None):
        import httpx

        return httpx.Client(base_url=f"{self.url}/api/v1", timeout=30,
                            headers={"authorization": f"Bearer {token}"} if token else {})

    def snapshot(self) -> tuple:
        """Everything a refused request must leave unchanged: versions, blobs, and temp files."""
        reg = self.registry
        tmp = sorted(p.name for p in reg.store.tmp_dir.iterdir()) if reg.store.tmp_dir.is_dir() else []
        return ([v.model_dump() for v in reg.search(all_versions=True)], sorted(b.sha256 for b in reg.store.list()), tmp)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)


@pytest.fixture
def serve(home, tmp_path):
    """``serve(db_url, store=None, **settings)`` -> a :class:`Live` server (stopped after the test)."""
    import uvicorn

    from weightlab.registry.service import Registry
    from weightlab.registry.config import ServerSettings
    from weightlab.registry.server.app import create_app

    started: list[Live] = []

    def start(db_url: str, *, store: str | None = None, **settings) -> Live:
        reg = Registry(db_url, home=home, store=store)
        app = create_app(ServerSettings(home=home, **{"job_poll_seconds": 0.1, **settings}), registry=reg)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        live = Live(f"http://127.0.0.1:{port}", reg, _thread=thread, _server=server)
        live.admin = live.token("*", "admin")
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()
        live.registry.close()
