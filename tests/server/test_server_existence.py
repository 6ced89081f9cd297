"""What an attacker learns from ids and hashes: nothing. For every route addressed by an id or a hash, a thing that
exists but that the caller may not read answers byte for byte as one that does not exist (status, error type,
message, headers that describe the body); lineage given by tensor hash never links to, nor reveals, a version the
caller cannot read. Each probe is sent twice with the same id or hash, before and after the private thing exists,
so the two answers must be identical, not merely alike."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from weightlab.registry import Derivation, LineageInput
from weightlab.registry.db import transaction
from weightlab.registry.models import DerivationInput


def _answer(response) -> tuple:
    """Everything of a response that could tell two answers apart (not the Date header)."""
    return (response.status_code, response.headers.get("content-type"), response.headers.get("content-length"),
            response.headers.get("www-authenticate"), response.content)


def _probe(live, callers: dict, method: str, path: str) -> dict:
    out = {}
    for who, token in callers.items():
        with live.http(token) as http:
            out[who] = _answer(http.request(method, path))
    return out


@pytest.fixture
def live(serve, db_url):
    return serve(db_url, job_workers=0)  # jobs stay queued: nothing but the probes touches them


@pytest.fixture
def callers(live):
    """An anonymous caller, a reader and an admin of another namespace: none may read `secret`."""
    return {"anonymous": None, "reader": live.token("spy", "read"), "ns admin": live.token("spy", "admin")}


def test_jobs_of_private_namespaces_answer_as_missing_ones(live, callers):
    recipe = {"base": "secret/base@1", "terms": [{"source": "secret/style@1", "kind": "style", "scale": 1.0}]}
    before = _probe(live, callers, "GET", "/jobs/1")
    assert {a[0] for a in before.values()} == {404}
    with live.http(live.admin) as http:
        job = http.post("/jobs", json={"kind": "merge", "params": {"recipe": recipe, "output": "secret/out"}})
        assert job.status_code == 202 and job.json()["id"] == 1
        assert http.get("/jobs/1").status_code == 200
    after = _probe(live, callers, "GET", "/jobs/1")
    assert after == before
    body = after["reader"][-1].decode()
    assert "secret" not in body and "NotFoundError" in body and "no job with id 1" in body
    with live.http(live.token("secret", "read")) as http:  # whoever may read the namespace sees it
        assert http.get("/jobs/1").json()["namespace"] == "secret"


def test_tokens_of_other_namespaces_answer_as_missing_ones(live, callers):
    from sqlalchemy import func

    from weightlab.registry.models import ApiToken

    with transaction(live.registry.engine) as s:
        next_id = s.scalar(select(func.max(ApiToken.id))) + 1
    before = _probe(live, {k: v for k, v in callers.items() if v}, "DELETE", f"/tokens/{next_id}")
    assert {a[0] for a in before.values()} == {404}
    secret_token = live.token("secret", "read")
    after = _probe(live, {k: v for k, v in callers.items() if v}, "DELETE", f"/tokens/{next_id}")
    assert after == before and b"secret" not in after["ns admin"][-1]
    with live.http(secret_token) as http:  # it was not revoked
        assert http.get("/tokens/current").json()["id"] == next_id
    with live.http() as http:  # anonymous: refused before any lookup, so alike as well
        assert http.delete(f"/tokens/{next_id}").status_code == http.delete("/tokens/999").status_code == 401


def test_blobs_and_hash_prefixes_of_private_versions_answer_as_missing_ones(live, callers, tiny):
    data = tiny.style_lora_kohya.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    paths = [("GET", f"/blobs/{sha}"), ("HEAD", f"/blobs/{sha}"),
             ("GET", f"/artifacts/secret/style/versions/{sha[:12]}"),
             ("GET", f"/artifacts/secret/style/versions/{sha[:12]}/lineage"),
             ("GET", f"/artifacts/secret/style/versions/{sha[:12]}/files/style.safetensors")]
    before = {p: _probe(live, callers, *p) for p in paths}
    live.client(live.admin).add(tiny.style_lora_kohya, name="secret/style")
    after = {p: _probe(live, callers, *p) for p in paths}
    assert after == before
    assert {a[0] for p in paths for a in after[p].values()} <= {401, 403, 404}
    with live.http(live.admin) as http:
        assert http.get(f"/blobs/{sha}").content == data


def _lineage_inputs(node: dict) -> list[dict]:
    return [{**e, "node": {k: v for k, v in e["node"].items() if k != "tensor_hash"}} for e in node["inputs"]]


def test_lineage_by_tensor_hash_links_and_reveals_only_readable_versions(live, tiny):
    """A writer of `a` names inputs by tensor hash only: one held by a private version of `b`, one held by
    nothing. Both answers are alike, nothing links to `b`, not even for an admin reading it later; an input the
    writer can read (registered in `a` later) is linked when read."""
    from weightlab.files import tensor_hash

    admin = live.client(live.admin)
    secret = admin.add(tiny.style_lora_kohya, name="b/style")
    writer_token = live.token("a", "write")
    writer = live.client(writer_token)
    x, y = writer.add(tiny.accel_lora, name="a/x"), writer.add(tiny.motion_lora, name="a/y")
    unheld = tensor_hash(tiny.style_lora_peft)  # registered by nobody yet

    def record(version, held_hash):
        body = Derivation(relation="trained_from", inputs=[LineageInput(tensor_hash=held_hash, label="outside")])
        with live.http(writer_token) as http:
            r = http.post(f"/artifacts/a/{version.name}/versions/1/lineage", content=body.model_dump_json(),
                          headers={"content-type": "application/json"})
        assert r.status_code == 201, r.text
        return r.json()

    held, control = record(x, secret.tensor_hash), record(y, unheld)
    assert _lineage_inputs(held) == _lineage_inputs(control) == [
        {"role": "term", "scale": None, "components": None,
         "node": {"label": "outside", "version": None, "relation": None, "recipe": None, "inputs": [], "truncated": False}}]
    # An upload with lineage in the same request: the same rule.
    z = writer.add(tiny.style_dense, name="a/z", kind="base", lineage=Derivation(
        relation="merged_from", inputs=[LineageInput(tensor_hash=secret.tensor_hash, label="outside")]))
    with transaction(live.registry.engine) as s:
        assert s.scalars(select(DerivationInput.parent_version_id)).all() == [None, None, None]
    for reader in (admin, writer):  # no forged link, for an admin either
        for v in (x, z):
            node = reader.lineage(v.ref).inputs[0].node
            assert (node.label, node.version) == ("outside", None)
    # Registered later where the writer can read: linked; where the writer cannot (b): still not.
    admin.add(tiny.style_lora_peft, name="b/later")
    assert admin.lineage(y.ref).inputs[0].node.version is None
    mine = writer.add(tiny.style_lora_peft, name="a/later")
    assert writer.lineage(y.ref).inputs[0].node.label == mine.ref == admin.lineage(y.ref).inputs[0].node.label
