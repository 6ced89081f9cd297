"""Metadata, tags, names and query values at the web API's boundary, on SQLite and PostgreSQL: what breaks the
limits is refused with a clear 4xx and nothing is stored; rows stored before the limits were checked (inserted
here directly) cannot break any listing, and `weightlab registry repair` rewrites them."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import text
from typer.testing import CliRunner

from weightlab.registry import Derivation, LineageInput
from weightlab.registry.schemas import INVALID_JSON_KEY, JSON_MAX_DEPTH


def nested(depth: int) -> str:
    """A JSON object nested ``depth`` levels deep."""
    return '{"a":' * depth + "1" + "}" * depth


BAD_METADATA = {  # query value -> words of the 422's message
    "deep_2000": (nested(2000), "deeper than 16 levels"),  # json.loads raises RecursionError on this
    "deep_400": (nested(400), "deeper than 16 levels"),  # parses, but pydantic cannot serialise it
    "deep_17": (nested(JSON_MAX_DEPTH + 1), "deeper than 16 levels"),
    "nan": ('{"a": NaN}', "not valid JSON"),
    "array": ("[1, 2]", "must be a JSON object"),
    "long_string": (json.dumps({"a": "x" * 8193}), "the limit is 8192"),
    "long_key": (json.dumps({"k" * 257: 1}), "the limit is 256"),
    "many_items": (json.dumps({"a": list(range(2001))}), "more than 2000"),
    "nul": (json.dumps({"a": "x\u0000y"}), "NUL"),
    "lone_surrogate": ('{"a": "\\ud800"}', "lone surrogate"),
    "huge_int": ('{"a": 1' + "0" * 30 + "}", "beyond 64 bits"),
}


def _upload(http, data: bytes, name: str = "me/x", **params):
    params = {"sha256": hashlib.sha256(data).hexdigest(), "filename": "x.safetensors", **params}
    return http.post(f"/artifacts/{name}/versions", params=params, content=data,
                     headers={"content-type": "application/octet-stream"})


def test_metadata_beyond_the_limits_is_refused_and_nothing_stored(db_url, serve, tiny):
    live = serve(db_url)
    data = tiny.style_lora_kohya.read_bytes()
    before = live.snapshot()
    with live.http(live.admin) as http:
        for case, (metadata, words) in BAD_METADATA.items():
            for r in (_upload(http, data, metadata=metadata),
                      http.post("/artifacts/me/x/folders", params={"sha256": "0" * 64, "metadata": metadata},
                                content=b"", headers={"content-type": "application/x-tar"})):
                assert r.status_code == 422, (case, r.text)
                assert r.json()["error"] == "MetadataError" and words in r.json()["detail"], (case, r.json())
                assert "Fix:" in r.json()["detail"]
        assert live.snapshot() == before
        ok = _upload(http, data, metadata=nested(JSON_MAX_DEPTH))  # the limit itself is accepted
        assert ok.status_code == 201, ok.text
        assert http.get("/versions").status_code == 200 and http.get("/artifacts/me/x/versions").status_code == 200


def test_labels_names_and_query_values_must_match_whole(db_url, serve, tiny):
    live = serve(db_url, job_workers=0)
    data = tiny.style_lora_kohya.read_bytes()
    recipe = {"base": "me/base@1", "terms": [{"source": "me/style@1", "kind": "style", "scale": 1.0}]}
    before = live.snapshot()
    with live.http(live.admin) as http:
        r = _upload(http, data, tag="ok\n")  # `$` would have let the newline through
        assert r.status_code == 400 and "invalid tag 'ok\\n'" in r.json()["detail"]
        for path in ("/artifacts/me%0A/x/versions", "/artifacts/me/x%0A/versions"):
            assert http.post(path, params={"sha256": "0" * 64}, content=data).status_code == 422
        assert http.put("/artifacts/me/x/aliases/prod%0A", json={"ref": "me/x@1"}).status_code == 422
        for params in ({"tag": "ok\n"}, {"namespace": "me\n"}, {"family": "sd15\n"}, {"text": "a\u0000b"},
                       {"text": "a\nb"}):
            assert http.get("/versions", params=params).status_code == 422, params
        assert http.post("/tokens", json={"namespace": "me", "scope": "read", "name": "a\u0000b"}).status_code == 422
        r = http.post("/tokens", json={"namespace": "me\n", "scope": "read"})
        assert r.status_code == 400 and "invalid name 'me\\n'" in r.json()["detail"]
        for params in ({"recipe": recipe, "output": "me/out", "tags": ["ok\n"]},
                       {"recipe": recipe, "output": "me/out\n"},
                       {"recipe": recipe, "output": "me/out", "metadata": json.loads(nested(400))}):
            r = http.post("/jobs", json={"kind": "merge", "params": params})
            assert r.status_code == 422 and r.json()["error"] == "JobSpecError", r.text
        r = _upload(http, data, source="a\nb")
        assert r.status_code == 422 and "source" in r.text
        lineage = Derivation(relation="trained_from", inputs=[LineageInput(tensor_hash="ab" * 32, label="x")])
        deep = {**json.loads(lineage.model_dump_json()), "recipe": json.loads(nested(400))}
        r = _upload(http, data, lineage=json.dumps(deep))
        assert r.status_code == 422 and r.json()["error"] == "MetadataError", r.text
        nul = {**json.loads(lineage.model_dump_json()), "inputs": [{"tensor_hash": "ab" * 32, "label": "a\u0000"}]}
        r = _upload(http, data, lineage=json.dumps(nul))
        assert r.status_code == 422 and "NUL" in r.text
    assert live.snapshot() == before


def test_a_request_that_fails_with_5xx_commits_nothing(db_url, serve, tiny, monkeypatch):
    from weightlab.registry import crud

    live = serve(db_url)
    versions = live.registry.search(all_versions=True)

    def broken(version):  # fails inside the upload's transaction, after the version row was written
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(crud, "version_info", broken)
    with live.http(live.admin) as http:
        assert _upload(http, tiny.style_lora_kohya.read_bytes()).status_code == 500
    monkeypatch.undo()
    assert live.registry.search(all_versions=True) == versions == []


def _poison(engine, table: str, column: str, row_id: int, doc: str) -> None:
    """Write ``doc`` into a JSON column directly, as rows stored before the limits were checked hold it."""
    cast = "CAST(:doc AS json)" if engine.dialect.name == "postgresql" else ":doc"
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {table} SET {column} = {cast} WHERE id = :id"), {"doc": doc, "id": row_id})


def test_rows_stored_before_the_limits_list_and_are_repaired(db_url, serve, tiny, monkeypatch):
    from weightlab.cli import app

    live = serve(db_url, job_workers=0)
    admin = live.client(live.admin)
    v = admin.add(tiny.style_lora_kohya, name="me/style", metadata={"ok": 1})
    w = admin.add(tiny.accel_lora, name="me/lcm", lineage=Derivation(
        relation="trained_from", inputs=[LineageInput(ref=v.ref)], recipe={"method": "linear"}))
    recipe = {"base": "me/style@1", "terms": [{"source": "me/lcm@1", "kind": "image_accel", "scale": 1.0}]}
    job = admin.submit_job("merge", {"recipe": recipe, "output": "me/out"})
    engine = live.registry.engine
    _poison(engine, "versions", "metadata", 1, nested(400))  # the row: breaks pydantic's serialiser
    _poison(engine, "versions", "config", 1, nested(3000))  # breaks json.loads itself
    _poison(engine, "derivations", "recipe", 1, nested(400))
    _poison(engine, "jobs", "params", job.id, nested(400))
    expected = 4
    if engine.dialect.name == "sqlite":  # PostgreSQL's json type refuses a lone surrogate, SQLite's text does not
        _poison(engine, "versions", "metadata", 2, '{"a": "\\ud800"}')
        expected += 1

    reader = live.token("me", "read")
    paths = ["/versions", "/versions?all_versions=true", "/versions?text=a", "/artifacts/me/style/versions",
             "/artifacts/me/style/versions/latest", "/artifacts/me/style/versions/1", "/artifacts/me/lcm/versions",
             f"/artifacts/me/lcm/versions/{w.number}/lineage", "/namespaces", "/jobs", f"/jobs/{job.id}"]
    for token in (live.admin, reader):
        with live.http(token) as http:
            for path in paths:
                r = http.get(path)
                assert r.status_code == 200, (path, r.text[:300])
            shown = http.get("/artifacts/me/style/versions/1").json()
            assert list(shown["metadata"]) == list(shown["config"]) == [INVALID_JSON_KEY]
            assert "weightlab registry repair" in shown["metadata"][INVALID_JSON_KEY]
    assert list(live.registry.lineage(w.ref).recipe) == [INVALID_JSON_KEY]  # the local Registry too

    monkeypatch.setenv("WEIGHTLAB_DB_URL", db_url)
    runner = CliRunner()
    dry = runner.invoke(app, ["registry", "repair", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert len(json.loads(dry.stdout)["found"]) == expected and json.loads(dry.stdout)["replaced"] == [], dry.stdout
    done = runner.invoke(app, ["registry", "repair"])
    assert done.exit_code == 0 and f"replaced {expected} stored document(s)" in done.output, done.output
    assert "me/style@1: config nests too deep to parse" in done.output and f"job {job.id}: params" in done.output
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT metadata, config FROM versions WHERE id = 1")).one()
    assert all(len(str(doc)) < 500 and "replaced by" in str(doc) for doc in stored)
    again = runner.invoke(app, ["registry", "repair"])
    assert again.exit_code == 0 and "replaced 0 stored document(s)" in again.output
    assert live.registry.get(v.ref).metadata[INVALID_JSON_KEY].startswith("replaced by `weightlab registry repair`")
    assert live.registry.get(w.ref).ref == w.ref  # everything else of the rows is as it was


def test_an_all_nan_upload_is_recorded_and_merge_jobs_refuse_it_by_name(db_url, serve, tiny, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    live = serve(db_url)
    nan = tmp_path / "nan.safetensors"
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(str(tiny.style_lora_kohya)).items()}, str(nan))
    c = live.client(live.admin)
    c.add(tiny.base_ldm, name="me/base")
    bad = c.add(nan, name="me/nan")
    with live.http(live.admin) as http:
        shown = http.get("/artifacts/me/nan/versions/1").json()
    assert shown["finite"] is False and set(shown["alphas"]) == {None} and bad.finite is False
    assert c.get("me/base").finite is True
    recipe = {"base": "me/base@1", "terms": [{"source": "me/nan:latest", "kind": "style", "scale": 1.0}]}
    done = c.wait_job(c.submit_job("merge", {"recipe": recipe, "output": "me/out"}).id, timeout=120, poll=0.1)
    assert done.status == "failed" and done.error.startswith("NonFiniteError: me/nan@1 holds NaN or Inf"), done.error
    assert [v.ref for v in c.search()] == ["me/base@1", "me/nan@1"]  # nothing registered


def test_the_api_docs_state_the_limits():
    from weightlab.registry.schemas import JSON_LIMITS
    from weightlab.registry.server.app import create_app

    doc = create_app().openapi()
    assert JSON_LIMITS in doc["info"]["description"] and "answers exactly as if it did not exist (404)" in \
        doc["info"]["description"]
    upload = doc["paths"]["/api/v1/artifacts/{namespace}/{name}/versions"]["post"]["parameters"]
    described = {p["name"]: p.get("description", "") for p in upload}
    assert JSON_LIMITS in described["metadata"] and "a letter, then letters" in described["tag"]
    assert "404" in doc["paths"]["/api/v1/jobs/{job_id}"]["get"]["description"]
