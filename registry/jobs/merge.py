"""The ``merge`` job: a recipe of registered versions merged by a worker, the output registered with
``merged_from`` lineage.

A video merge (a motion term) becomes a diffusers ``UNetMotionModel`` folder, what generate and export read; any
other merge one ``.safetensors`` file.

Example:
    >>> client.submit_job("merge", {"recipe": recipe.model_dump(mode="json"), "output": "team/anim"})  # doctest: +SKIP
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pydantic import field_validator

from weightlab.recipe import Recipe
from weightlab.registry.jobs.queue import OutputParams, Runner, job_dir
from weightlab.registry.resolve import version_path
from weightlab.registry.schemas import Derivation, Ref, VersionInfo, check_registered


class MergeParams(OutputParams):
    """A merge job: run ``recipe`` (every source a registry reference) and register the output as ``output``."""

    recipe: Recipe

    @field_validator("recipe")
    @classmethod
    def _registered_sources(cls, recipe: Recipe) -> Recipe:
        return check_registered(recipe)


def run_merge(registry, params: MergeParams, job_id: int) -> VersionInfo:
    """Merge, then register the result as ``params.output`` (kind ``base``)."""
    from weightlab.merge import merge_to_file, merge_to_folder

    resolve = partial(version_path, registry)  # references only; a version recorded as non-finite is refused by name

    video = any(t.kind == "motion" for t in params.recipe.terms)
    with job_dir(registry, job_id) as tmp:
        out = Path(tmp) / Ref.parse_name(params.output).name
        if video:
            merge_to_folder(params.recipe, out, progress=False, resolve=resolve)
        else:
            out = out.with_name(out.name + ".safetensors")
            merge_to_file(params.recipe, out, progress=False, resolve=resolve)
        return registry.register_output(out, name=params.output, kind="base", tags=params.tags,
                                        derivation=Derivation.from_merged_file(out, resolve=resolve), source=f"job:{job_id}",
                                        metadata={**params.metadata, "recipe_hash": params.recipe.hash, "job": job_id})


MERGE = Runner(kind="merge", params=MergeParams, output=lambda p: p.output,
               inputs=lambda p: [p.recipe.base, *(t.source for t in p.recipe.terms)], run=run_merge)
