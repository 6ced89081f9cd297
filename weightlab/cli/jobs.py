"""``weightlab job merge|export|show|ls``: merge and export jobs on a registry server (``--remote`` or
``$WEIGHTLAB_REMOTE``, token in ``$WEIGHTLAB_TOKEN``), run by its workers, results registered with lineage.

Example:
    weightlab job merge --recipe video.yaml --output team/anim --wait
    weightlab job export --source team/anim@1 --output team/anim-onnx --dtype float16 --wait
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from weightlab.cli.common import console, fail_on_error

job_app = typer.Typer(help="Merge and export jobs on a registry server.", no_args_is_help=True)

_REMOTE = typer.Option(..., "--remote", envvar="WEIGHTLAB_REMOTE", help="The registry server (jobs run there).")
_OUTPUT = typer.Option(..., "--output", "-o", help="ns/name to register the result as.")
_TAG = typer.Option([], "--tag", "-t", help="Tag of the result (repeatable).")
_WAIT = typer.Option(False, "--wait", help="Poll until the job succeeded or failed (exit 1 if it failed).")
_JSON = typer.Option(False, "--json", help="Print the job as JSON.")


def _recipe(path: str) -> dict:
    from weightlab.recipe import Recipe

    return Recipe.from_file(path).model_dump(mode="json")


def _report(job, as_json: bool) -> None:
    if as_json:
        console.print_json(job.model_dump_json())
        return
    outcome = job.result_ref or job.error or ""
    console.print(f"job {job.id} ({job.kind}): {job.status} {outcome}".rstrip(), highlight=False, soft_wrap=True)


def _submit(remote: str, kind: str, params: dict[str, Any], wait: bool, as_json: bool) -> None:
    from weightlab.registry.client import Client

    with fail_on_error(), Client(remote) as client:
        job = client.submit_job(kind, params)
        if wait:
            job = client.wait_job(job.id, timeout=float("inf"))
    _report(job, as_json)
    if job.status == "failed":
        raise typer.Exit(1)


@job_app.command("merge")
def merge_cmd(recipe: str = typer.Option(..., "--recipe", help="Recipe YAML/JSON; every source a registry reference."),
              output: str = _OUTPUT, tags: list[str] = _TAG, wait: bool = _WAIT, as_json: bool = _JSON,
              remote: str = _REMOTE) -> None:
    """Queue a merge; a video recipe (with a motion term) is registered as a merged model folder."""
    with fail_on_error():
        params = {"recipe": _recipe(recipe), "output": output, "tags": tags}
    _submit(remote, "merge", params, wait, as_json)


@job_app.command("export")
def export_cmd(source: Optional[str] = typer.Option(None, "--source", help="A registered merged video model (ns/name[@N|:alias])."),
               recipe: Optional[str] = typer.Option(None, "--recipe", help="Or a recipe of registered versions, merged first."),
               output: str = _OUTPUT,
               dtype: str = typer.Option("float32", "--dtype", help="float32 | float16"),
               opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset; the exporter's default when omitted."),
               verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare each graph with PyTorch."),
               tags: list[str] = _TAG, wait: bool = _WAIT, as_json: bool = _JSON, remote: str = _REMOTE) -> None:
    """Queue an ONNX export; the export folder is registered as a version of kind onnx."""
    with fail_on_error():
        params = {"source": source, "recipe": _recipe(recipe) if recipe else None, "output": output, "dtype": dtype,
                  "opset": opset, "verify": verify, "tags": tags}
    _submit(remote, "export", params, wait, as_json)


@job_app.command("show")
def show_cmd(job_id: int = typer.Argument(..., help="The job's id."), wait: bool = _WAIT, as_json: bool = _JSON,
             remote: str = _REMOTE) -> None:
    """A job's status, result or error."""
    from weightlab.registry.client import Client

    with fail_on_error(), Client(remote) as client:
        job = client.wait_job(job_id, timeout=float("inf")) if wait else client.job(job_id)
    _report(job, as_json)


@job_app.command("ls")
def ls_cmd(status: Optional[str] = typer.Option(None, "--status", help="queued | running | succeeded | failed"),
           limit: int = typer.Option(100, "--limit", min=1, max=1000), as_json: bool = _JSON,
           remote: str = _REMOTE) -> None:
    """Jobs whose results go to namespaces you may read, newest first."""
    from weightlab.registry.client import Client

    with fail_on_error(), Client(remote) as client:
        found = client.jobs(status=status, limit=limit)
    if as_json:
        console.print_json(json.dumps([j.model_dump(mode="json") for j in found]))
    for job in [] if as_json else found:
        _report(job, False)


def register(app: typer.Typer) -> None:
    app.add_typer(job_app, name="job")
