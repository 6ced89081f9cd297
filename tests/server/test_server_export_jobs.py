"""Export jobs through the API: a video merge job's result (a registered merged model folder) exported to ONNX by
the server's worker, registered as kind ``onnx`` with ``exported_from`` lineage; bad parameters get a 422 and
failures are recorded on the job. Exporting the tiny UNetMotionModel takes about a minute on two cores."""

from __future__ import annotations

import json

import pytest

from weightlab.errors import RegistryError, WeightlabError
from weightlab.recipe import Recipe, Term


def _video_recipe(**changes) -> dict:
    recipe = Recipe(base="me/base@1", terms=(Term(source="me/style@1", kind="style", scale=0.8),
                                             Term(source="me/lcm@1", kind="image_accel", scale=1.0),
                                             Term(source="me/motion@1", kind="motion", scale=1.0)))
    return recipe.model_copy(update=changes).model_dump(mode="json")


def _add_inputs(c, tiny) -> None:
    c.add(tiny.base_dir, name="me/base")  # folders go up as tar streams
    c.add(tiny.motion_dir, name="me/motion")
    c.add(tiny.style_lora_kohya, name="me/style")
    c.add(tiny.accel_lora, name="me/lcm")


def test_export_job_end_to_end(db_url, serve, tiny):
    from weightlab.registry.onnx_artifact import describe_onnx

    live = serve(db_url)
    c = live.client(live.admin)
    _add_inputs(c, tiny)
    merged = c.wait_job(c.submit_job("merge", {"recipe": _video_recipe(), "output": "me/anim"}).id, timeout=120, poll=0.1)
    assert merged.status == "succeeded", merged.error
    model = c.get(merged.result_ref)
    assert model.is_folder and {"config.json", "recipe.json"} <= {f.path for f in model.files}

    job = c.submit_job("export", {"source": "me/anim:latest", "output": "me/anim-onnx", "tags": ["onnx"],
                                  "verify": False})
    done = c.wait_job(job.id, timeout=600, poll=0.2)
    assert done.status == "succeeded", done.error
    out = c.get(done.result_ref)
    assert (out.ref, out.kind, out.format, out.family, out.tags) == ("me/anim-onnx@1", "onnx", "onnx", "sd15", ["onnx"])
    assert out.source == f"job:{job.id}" and out.metadata["job"] == job.id
    assert {"manifest.json", "unet/model.onnx", "unet/model.onnx.data", "vae_decoder/model.onnx"} <= {f.path for f in out.files}
    node = c.lineage(out.ref)
    assert node.relation == "exported_from" and [(e.role, e.node.label) for e in node.inputs] == [("model", "me/anim@1")]
    assert node.inputs[0].node.relation == "merged_from"  # and on to the merge's inputs
    folder = c.path(out.ref)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"] == "me/anim@1" and manifest["recipe"]["base"] == "me/base@1"
    assert describe_onnx(folder).family == "sd15"
    assert [v.ref for v in c.search(kind="onnx")] == [out.ref]
    with pytest.raises(RegistryError, match="is an ONNX export, not a residual"):
        c.open(out.ref)


def test_export_job_refusals(serve, sqlite_url, tiny):
    live = serve(sqlite_url)
    live.client(live.admin).add(tiny.style_lora_kohya, name="secret/style")
    me = live.client(live.token("me", "write"))
    for params, words in (
        ({"output": "me/x"}, "give exactly one of `source`"),
        ({"source": "me/anim@1", "recipe": _video_recipe(), "output": "me/x"}, "give exactly one of `source`"),
        ({"source": "../etc/passwd", "output": "me/x"}, "not a registry reference"),
        ({"recipe": _video_recipe(base="/tmp/base"), "output": "me/x"}, "not a registry reference"),
        ({"source": "me/anim@1", "output": "me/x", "dtype": "int8"}, "dtype: Input should be 'float32' or 'float16'"),
        ({"source": "me/anim@1", "output": "me/x", "opset": 7}, "opset: Input should be greater than or equal to 18"),
        ({"source": "me/anim@1", "output": "me/x", "device": "cuda"}, "device: Extra inputs are not permitted"),
        ({"source": "me/anim@1", "output": "me/x:prod"}, "without @version or :alias"),
        ({"source": "me/anim@1", "output": "secret/x"}, "does not allow write on namespace 'secret'"),
        ({"source": "secret/style@1", "output": "me/x"}, "does not allow read"),
    ):
        with pytest.raises(WeightlabError, match=words) as e:
            me.submit_job("export", params)
        assert type(e.value).__name__ in ("JobSpecError", "PermissionDeniedError")
    with live.http(live.admin) as http:
        r = http.post("/jobs", json={"kind": "export", "params": {"output": "me/x", "dtype": "int8"}})
        assert r.status_code == 422 and r.json()["error"] == "JobSpecError"
    assert me.jobs() == []


def test_failed_export_records_the_error(serve, sqlite_url, tiny):
    live = serve(sqlite_url)
    c = live.client(live.admin)
    c.add(tiny.style_lora_kohya, name="me/style")
    done = c.wait_job(c.submit_job("export", {"source": "me/style@1", "output": "me/x"}).id, timeout=60, poll=0.1)
    assert done.status == "failed" and done.result_ref is None
    assert done.error.startswith("RecipeError: me/style@1 is not a merged video model folder") and "Fix:" in done.error
    assert c.search(namespace="me", kind="onnx") == []


def test_job_cli(serve, sqlite_url, tiny, monkeypatch):
    from typer.testing import CliRunner

    from weightlab.cli import app

    live = serve(sqlite_url)
    live.client(live.admin).add(tiny.style_lora_kohya, name="me/style")
    monkeypatch.setenv("WEIGHTLAB_TOKEN", live.admin)
    run = CliRunner().invoke
    r = run(app, ["job", "export", "--source", "me/style@1", "--output", "me/x", "--wait", "--remote", live.url])
    assert r.exit_code == 1 and "failed RecipeError: me/style@1 is not a merged video model folder" in r.output, r.output
    r = run(app, ["job", "export", "--output", "me/x", "--remote", live.url])
    assert r.exit_code == 2 and "give exactly one of `source`" in r.output, r.output
    r = run(app, ["job", "ls", "--status", "failed", "--json", "--remote", live.url])
    assert r.exit_code == 0 and [j["kind"] for j in json.loads(r.output)] == ["export"], r.output
    r = run(app, ["job", "show", str(json.loads(r.output)[0]["id"]), "--remote", live.url])
    assert r.exit_code == 0 and "(export): failed" in r.output, r.output
