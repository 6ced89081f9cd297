"""Schemathesis against the OpenAPI schema: generated requests (valid and invalid) for every operation, with an
admin token and anonymously, must never get a 5xx. Bounded: a few examples per operation, derandomized."""

from __future__ import annotations

import threading
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from weightlab.registry.server.app import create_app

@schemathesis.serializer("application/x-tar")  # folder uploads: random bytes, sent as they are
def _tar(ctx, value) -> dict:
    return {"data": value if isinstance(value, bytes) else str(value).encode()}


SCHEMA = schemathesis.openapi.from_dict(create_app().openapi())  # the schema only: no database is opened
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny):
    """One server for the module, holding a version, an alias, lineage and a job to aim at."""
    import uvicorn

    from weightlab.registry import Derivation, LineageInput, Registry, auth
    from weightlab.registry.config import ServerSettings
    from weightlab.registry.db import transaction

    home = tmp_path_factory.mktemp("fuzz")
    reg = Registry(f"sqlite:///{home / 'r.db'}", home=home)
    v = reg.add(tiny.style_lora_kohya, name="me/style")
    reg.alias(v.ref, "prod")
    reg.add(tiny.accel_lora, name="me/lcm", lineage=Derivation(relation="trained_from",
                                                               inputs=[LineageInput(ref=v.ref)]))
    with transaction(reg.engine, write=True) as s:
        admin = auth.create_token(s, spec=auth.TokenCreate(namespace="*", scope="admin")).token
    app = create_app(ServerSettings(home=home, job_workers=0, max_upload_bytes=10_000_000), registry=reg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", admin
    server.should_exit = True
    thread.join(20)
    reg.close()


@SCHEMA.exclude(method="DELETE", path_regex="/tokens/").parametrize()
@SETTINGS
def test_no_server_errors_with_a_token(case, live):
    url, admin = live
    case.call_and_validate(base_url=url, headers={"authorization": f"Bearer {admin}"}, checks=[not_a_server_error])


@SCHEMA.parametrize()
@SETTINGS
def test_no_server_errors_anonymously(case, live):
    url, _ = live
    case.call_and_validate(base_url=url, checks=[not_a_server_error])
