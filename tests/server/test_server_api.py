"""The web API and weightlab.Client against a real uvicorn server on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from weightlab.errors import DuplicateVersionError, NotFoundError, RegistryError
from weightlab.registry import Derivation, LineageInput


def variant(src, dst, factor: float):
    save_file({k: v * factor if v.is_floating_point() else v for k, v in load_file(str(src)).items()}, str(dst))
    return dst


def test_upload_get_search_labels_and_download(db_url, serve, tiny, tmp_path):
    live = serve(db_url)
    c = live.client(live.admin)
    v = c.add(tiny.style_lora_kohya, name="me/style", tags=["anime"], metadata={"author": "me"})
    assert (v.ref, v.kind, v.family, v.representation, v.ranks, v.tags, v.metadata) == \
        ("me/style@1", "style", "sd15", "lora", [4], ["anime"], {"author": "me"})
    assert v.sha256 == hashlib.sha256(tiny.style_lora_kohya.read_bytes()).hexdigest()
    assert v == live.registry.get("me/style@1")  # the server's registry holds exactly what the client was told
    assert v.source == str(tiny.style_lora_kohya.resolve())
    v2 = c.add(variant(tiny.style_lora_kohya, tmp_path / "s2.safetensors", 1.5), name="me/style")
    assert v2.ref == "me/style@2"
    assert c.add(tiny.accel_lora, name="me/lcm").kind == "image_accel"
    assert c.add(tiny.motion_lora, name="other/mlora").kind == "motion_lora"

    # the same tensors again: the existing version (200), or a DuplicateVersionError carrying it
    assert c.add(tiny.style_lora_kohya, name="me/style") == v
    with pytest.raises(DuplicateVersionError, match="already holds these tensors") as e:
        c.add(tiny.style_lora_kohya, name="me/style", exist_ok=False)
    assert e.value.version == v

    for ref in ("me/style@1", f"me/style@{v.sha256[:10]}", f"me/style@{v.tensor_hash[:12]}"):
        assert c.get(ref) == v
    assert c.get("me/style").ref == c.get("me/style:latest").ref == "me/style@2"
    assert [x.number for x in c.versions("me/style")] == [1, 2]
    assert [x.ref for x in c.search()] == ["me/lcm@1", "me/style@2", "other/mlora@1"]
    assert [x.ref for x in c.search(all_versions=True, limit=2, offset=1)] == ["me/style@1", "me/style@2"]
    assert [x.ref for x in c.search(kind="image_accel")] == ["me/lcm@1"]
    assert [x.ref for x in c.search(tag="anime", all_versions=True)] == ["me/style@1"]
    assert [x.ref for x in c.search(text="MLORA", family="sd15")] == ["other/mlora@1"]
    assert [x.ref for x in c.search(namespace="other")] == ["other/mlora@1"]

    assert c.alias("me/style@1", "prod").aliases == ["prod"]
    assert c.alias("me/style@2", "prod").ref == "me/style@2"  # the alias moves, versions never change
    assert c.get("me/style:prod").ref == "me/style@2"
    assert c.tag("me/style:prod", ["best"], remove=["nothing"]).tags == ["best"]
    c.unalias("me/style:prod")
    with pytest.raises(NotFoundError, match="alias 'prod'"):
        c.get("me/style:prod")
    with pytest.raises(RegistryError, match="latest"):
        c.alias("me/style@1", "latest")

    # downloads: through the cache (resumable, verified), to a file, and as the version's file with ranges
    assert c.path("me/style@1").read_bytes() == tiny.style_lora_kohya.read_bytes()
    assert c.download("me/style@2", tmp_path / "out.safetensors").read_bytes() == \
        (tmp_path / "s2.safetensors").read_bytes()
    assert c.open("me/lcm").kind == "image_accel"
    data = tiny.style_lora_kohya.read_bytes()
    with live.http(live.admin) as http:
        url = f"/artifacts/me/style/versions/1/files/{tiny.style_lora_kohya.name}"
        r = http.get(url)
        assert r.status_code == 200 and r.content == data and r.headers["etag"] == f'"{v.sha256}"'
        assert r.headers["accept-ranges"] == "bytes"
        r = http.get(url, headers={"range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
        assert http.get(url, headers={"range": "bytes=-7"}).content == data[-7:]
        assert http.get(url, headers={"range": f"bytes={len(data) - 3}-"}).content == data[-3:]
        r = http.get(url, headers={"range": f"bytes={len(data)}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
        r = http.get(url, headers={"range": "bytes=10-19", "if-range": '"another"'})  # changed: whole file
        assert r.status_code == 200 and r.content == data
        assert http.get(url, headers={"range": "bytes=1-2,5-6"}).status_code == 200  # several ranges: whole file
        r = http.head(f"/blobs/{v.sha256}")
        assert r.status_code == 200 and r.headers["content-length"] == str(len(data)) and r.content == b""
        assert http.get("/artifacts/me/style/versions/1/files/nope.bin").status_code == 404


def test_lineage_through_the_api(db_url, serve, tiny, tmp_path):
    live = serve(db_url)
    c = live.client(live.admin)
    base = c.add(tiny.base_ldm, name="me/base")
    style = c.add(tiny.style_lora_kohya, name="me/style")
    merged = variant(tiny.base_ldm, tmp_path / "merged.safetensors", 1.01)
    derivation = Derivation(relation="merged_from", recipe={"method": "linear"}, inputs=[
        LineageInput(ref=base.ref, role="base"), LineageInput(ref=style.ref, role="style", scale=0.8)])
    out = c.add(merged, name="me/anim", lineage=derivation)
    node = c.lineage(out.ref)
    assert node.relation == "merged_from" and node.recipe == {"method": "linear"}
    assert [(e.role, e.scale, e.node.label) for e in node.inputs] == [("base", None, "me/base@1"),
                                                                     ("style", 0.8, "me/style@1")]
    assert node == live.registry.lineage(out.ref)
    other = c.add(variant(tiny.base_ldm, tmp_path / "other.safetensors", 0.99), name="me/other")
    assert c.add_lineage(other.ref, Derivation(relation="trained_from", inputs=[LineageInput(ref=base.ref)])) \
        .inputs[0].node.label == "me/base@1"
    with pytest.raises(RegistryError, match="already has lineage"):
        c.add_lineage(other.ref, Derivation(relation="trained_from", inputs=[LineageInput(ref=base.ref)]))
    assert c.lineage(out.ref, depth=0).truncated


def test_openapi_and_docs(serve, sqlite_url):
    live = serve(sqlite_url)
    with live.http() as http:
        assert http.get("/health").json()["status"] == "ok"
        schema = http.get(f"{live.url}/openapi.json").json()
        assert all(p.startswith("/api/v1/") for p in schema["paths"])
        assert "HTTPBearer" in schema["components"]["securitySchemes"]
        assert "swagger" in http.get(f"{live.url}/docs").text.lower()


def test_cli_with_remote(serve, sqlite_url, tiny, monkeypatch):
    from weightlab.cli import app

    live = serve(sqlite_url)
    runner = CliRunner()

    def cli(*args, code=0):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == code, result.output
        return result.output

    monkeypatch.setenv("WEIGHTLAB_TOKEN", live.admin)
    assert "added me/style@1 (style, lora, rank 4, sd15" in cli("add", tiny.style_lora_kohya, "--name", "me/style",
                                                               "--tag", "anime", "--remote", live.url)
    assert "already holds these tensors" in cli("add", tiny.style_lora_kohya, "-n", "me/style", "--remote", live.url)
    monkeypatch.setenv("WEIGHTLAB_REMOTE", live.url)
    assert [v["ref"] for v in json.loads(cli("ls", "--json"))] == ["me/style@1"]
    assert "me/style:prod -> me/style@1" in cli("alias", "me/style@1", "prod")
    assert "me/style@1: anime, cute" in cli("tag", "me/style", "cute")
    assert json.loads(cli("show", "me/style:prod", "--json"))["aliases"] == ["prod"]
    assert "me/style@1" in cli("lineage", "me/style")
    assert "checked 1 blob(s): 0 problem(s)" in cli("registry", "verify")
    assert "deleted 0 blob(s)" in cli("registry", "gc")
    assert live.registry.get("me/style").tags == ["anime", "cute"]  # it went to the server's registry
    monkeypatch.delenv("WEIGHTLAB_TOKEN")
    assert "nothing registered matches" in cli("ls")  # anonymous: private namespaces are invisible
    out = cli("show", "me/style", code=2)
    assert "AuthenticationError" in out and "weightlab token create" in out
    monkeypatch.setenv("WEIGHTLAB_REMOTE", "http://127.0.0.1:9")  # nothing listens there
    out = cli("ls", code=2)
    assert "cannot reach the registry server" in out and "WEIGHTLAB_REMOTE" in out
