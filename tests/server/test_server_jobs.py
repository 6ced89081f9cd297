"""Merge jobs through the API (queued, run by the server's worker, polled, registered with lineage), and the
queue itself: claims that never collide (SKIP LOCKED on PostgreSQL), leases, retries."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, update

from weightlab.errors import WeightlabError
from weightlab.recipe import Recipe, Term
from weightlab.registry import jobs
from weightlab.registry.db import transaction
from weightlab.registry.models import Job
from weightlab.registry.schemas import JobCreate


def _recipe(base="me/base@1", style="me/style@1", accel="me/lcm:prod") -> dict:
    return Recipe(base=base, terms=(Term(source=style, kind="style", scale=0.8),
                                    Term(source=accel, kind="image_accel", scale=1.0))).model_dump(mode="json")


def test_merge_job_end_to_end(db_url, serve, tiny, tmp_path):
    from weightlab.files import tensor_hash
    from weightlab.merge import merge_to_file

    live = serve(db_url)
    c = live.client(live.admin)
    c.add(tiny.base_ldm, name="me/base")
    c.add(tiny.style_lora_kohya, name="me/style")
    c.alias(c.add(tiny.accel_lora, name="me/lcm").ref, "prod")
    job = c.submit_job("merge", {"recipe": _recipe(), "output": "me/anim", "tags": ["merged"]})
    assert job.status in ("queued", "running") and job.namespace == "me"
    done = c.wait_job(job.id, timeout=120, poll=0.1)
    assert done.status == "succeeded", done.error
    assert (done.result_ref, done.attempts) == ("me/anim@1", 1)
    out = c.get(done.result_ref)
    assert out.kind == "base" and out.tags == ["merged"] and out.metadata["job"] == job.id
    assert out.source == f"job:{job.id}"
    node = c.lineage(out.ref)
    assert node.relation == "merged_from"
    assert [(e.role, e.scale, e.node.label) for e in node.inputs] == [
        ("base", None, "me/base@1"), ("style", 0.8, "me/style@1"), ("image_accel", 1.0, "me/lcm@1")]
    local = merge_to_file(Recipe.model_validate(_recipe()), tmp_path / "local.safetensors", progress=False,
                          resolve=live.registry.path)  # the same merge here gives the same tensors
    assert out.tensor_hash == local["output_hash"] == tensor_hash(c.path(out.ref))
    with live.http(live.token("other", "read")) as http:
        assert http.get(f"/jobs/{job.id}").status_code == 404  # as if it did not exist (test_server_existence.py)
        assert http.get("/jobs").json() == []
    with live.http(live.token("me", "read")) as http:
        assert [j["id"] for j in http.get("/jobs", params={"status": "succeeded"}).json()] == [job.id]


def test_job_refusals(serve, sqlite_url, tiny):
    live = serve(sqlite_url)
    admin = live.client(live.admin)
    admin.add(tiny.style_lora_kohya, name="secret/style")
    me = live.client(live.token("me", "write"))
    for kind, params, words in (
        ("merge", {"recipe": _recipe(base="/etc/passwd"), "output": "me/x"}, "not a registry reference"),
        ("merge", {"recipe": _recipe(), "output": "me/x@2"}, "without @version"),
        ("merge", {"recipe": _recipe(), "output": "me/x", "extra": 1}, "extra"),
        ("merge", {"output": "me/x"}, "recipe: Field required"),
        ("mine-bitcoin", {}, "unknown job kind 'mine-bitcoin'. Fix: use one of export, merge"),
        ("merge", {"recipe": _recipe(), "output": "secret/x"}, "does not allow write on namespace 'secret'"),
        ("merge", {"recipe": _recipe(style="secret/style@1"), "output": "me/x"}, "does not allow read"),
    ):
        with pytest.raises(WeightlabError, match=words):
            me.submit_job(kind, params)
    with transaction(live.registry.engine) as s:
        assert jobs.list_jobs(s, namespaces=None) == []


def test_failed_job_records_the_error(serve, sqlite_url):
    live = serve(sqlite_url)
    c = live.client(live.admin)
    done = c.wait_job(c.submit_job("merge", {"recipe": _recipe(), "output": "me/x"}).id, timeout=60, poll=0.1)
    assert done.status == "failed" and done.result_ref is None
    assert done.error.startswith("NotFoundError: no artifact named me/base")


def _queue(url, n: int):
    from weightlab.registry import Registry

    reg = Registry(url)
    with transaction(reg.engine, write=True) as s:
        ids = [jobs.enqueue(s, spec=JobCreate(kind="merge", params={"recipe": _recipe(), "output": f"me/o{i}"}),
                            token_id=None).id for i in range(n)]
    return reg, ids


def test_concurrent_claims_never_take_the_same_job(db_url):
    reg, ids = _queue(db_url, 2)
    claimed, b_began, b_done = [], threading.Event(), threading.Event()

    def other_worker():
        with transaction(reg.engine, write=True) as s:
            claimed.append(jobs.claim(s, worker="b", lease_seconds=60, max_attempts=3).id)
        b_done.set()

    def began(conn, cursor, statement, *args):  # b is starting its transaction (SQLite: BEGIN IMMEDIATE)
        if threading.current_thread().name == "b" and statement.startswith("BEGIN"):
            b_began.set()

    event.listen(reg.engine, "before_cursor_execute", began)
    with transaction(reg.engine, write=True) as s:
        claimed.append(jobs.claim(s, worker="a", lease_seconds=60, max_attempts=3).id)
        thread = threading.Thread(target=other_worker, name="b")
        thread.start()
        if reg.engine.dialect.name == "postgresql":  # SKIP LOCKED: b does not wait for a's transaction
            assert b_done.wait(10)
        else:  # SQLite: b has asked for the write lock that a holds, so it cannot claim before a commits
            assert b_began.wait(10) and not b_done.is_set()
    thread.join(20)
    event.remove(reg.engine, "before_cursor_execute", began)
    assert sorted(claimed) == ids
    with transaction(reg.engine, write=True) as s:
        assert jobs.claim(s, worker="c", lease_seconds=60, max_attempts=3) is None
    reg.close()


def test_leases_expire_and_retries_are_bounded(sqlite_url):
    reg, (job_id,) = _queue(sqlite_url, 1)
    old = datetime.now(timezone.utc) - timedelta(seconds=120)

    def claim(worker):
        with transaction(reg.engine, write=True) as s:
            job = jobs.claim(s, worker=worker, lease_seconds=60, max_attempts=2)
            return None if job is None else (job.id, job.attempts)

    def go_silent():
        with transaction(reg.engine, write=True) as s:
            s.execute(update(Job).values(heartbeat_at=old))

    assert claim("a") == (job_id, 1)
    assert claim("b") is None  # a's lease holds
    go_silent()
    assert claim("b") == (job_id, 2)  # a died: b takes over
    with transaction(reg.engine, write=True) as s:
        assert not jobs.finish(s, job_id=job_id, worker="a", result_ref="me/o0@1")  # a's late result is dropped
        assert jobs.heartbeat(s, job_id=job_id, worker="b")
    go_silent()
    assert claim("c") is None  # b died too: two runs were the limit
    with transaction(reg.engine) as s:
        job = jobs.public(jobs.get_job(s, job_id=job_id))
    assert job.status == "failed" and "stopped sending heartbeats; 2 run(s)" in job.error
    assert not jobs.Worker(reg).run_once()
    reg.close()


def test_worker_command_runs_the_queue(sqlite_url):
    from typer.testing import CliRunner

    from weightlab.cli import app

    reg, (job_id,) = _queue(sqlite_url, 1)
    result = CliRunner().invoke(app, ["worker", "--once", "--db", sqlite_url])
    assert result.exit_code == 0 and "ran 1 job(s)" in result.output, result.output
    with transaction(reg.engine) as s:
        job = jobs.public(jobs.get_job(s, job_id=job_id))
    assert job.status == "failed" and "no artifact named me/base" in job.error  # its inputs were never added
    reg.close()
