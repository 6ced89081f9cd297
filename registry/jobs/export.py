"""The ``export`` job: a registered merged video model, or a recipe of registered versions, to ONNX.

The worker lays the model out locally (the registered folder, or the recipe merged into a folder first), runs
:func:`weightlab.onnx_export.export_onnx` (dynamo exporter, external data, verified against PyTorch, manifest) with
the text encoder, tokenizer and VAE of the recipe's base pipeline, and registers the export folder as a version of
kind ``onnx`` with ``exported_from`` lineage: the model version, or the recipe's inputs with their scales.

Example:
    >>> client.submit_job("export", {"source": "team/anim@1", "output": "team/anim-onnx", "dtype": "float16"})  # doctest: +SKIP
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from weightlab.errors import RecipeError
from weightlab.onnx_manifest import ExportDtype
from weightlab.recipe import Recipe
from weightlab.registry.jobs.queue import OutputParams, Runner, job_dir
from weightlab.registry.resolve import version_path
from weightlab.registry.schemas import Derivation, LineageInput, Ref, VersionInfo, check_registered


class ExportParams(OutputParams):
    """An export job: give ``source`` (a registered merged video model) or ``recipe`` (merged first), not both."""

    source: str | None = Field(None, description="a merged video model folder in the registry, e.g. a video merge "
                                                 "job's result: ns/name[@N|:alias]")
    recipe: Recipe | None = Field(None, description="a recipe with a motion term, every source a registry reference")
    dtype: ExportDtype = "float32"
    opset: int | None = Field(None, ge=18, le=30, description="ONNX opset; the exporter's default when null")
    verify: bool = Field(True, description="compare every graph with PyTorch (recorded in the manifest)")

    @field_validator("source")
    @classmethod
    def _source(cls, source: str | None) -> str | None:
        return source if source is None else str(Ref.parse(source))

    @field_validator("recipe")
    @classmethod
    def _registered_sources(cls, recipe: Recipe | None) -> Recipe | None:
        return recipe if recipe is None else check_registered(recipe)

    @model_validator(mode="after")
    def _one_input(self) -> ExportParams:
        if (self.source is None) == (self.recipe is None):
            raise ValueError("give exactly one of `source` (a registered merged model) and `recipe`")
        return self

    @property
    def inputs(self) -> list[str]:
        if self.source is not None:
            return [self.source]
        return [self.recipe.base, *(t.source for t in self.recipe.terms)]


def _pipeline_dir(registry, recipe: Recipe) -> Path:
    """The diffusers pipeline folder of the recipe's base (text encoder, tokenizer, VAE, scheduler)."""
    from weightlab.loading import load

    folder = load(registry.path(recipe.base), kind="base").pipeline_dir
    if folder is None:
        raise RecipeError(f"the recipe's base {recipe.base} is not a diffusers pipeline folder, so there is no text "
                          "encoder, tokenizer or VAE to export. Fix: merge onto a registered pipeline folder.")
    return folder


def _model(registry, params: ExportParams, tmp: Path) -> tuple[Path, Recipe, Derivation, VersionInfo | None]:
    """The merged model folder to export, its recipe, and the lineage of the export."""
    from weightlab.merge import merge_to_folder

    if params.recipe is not None:
        folder = tmp / "merged"
        resolve = partial(version_path, registry)
        merge_to_folder(params.recipe, folder, progress=False, resolve=resolve)
        merged = Derivation.from_merged_file(folder, resolve=resolve)  # pins each input to the version that was merged
        return folder, params.recipe, merged.model_copy(update={"relation": "exported_from"}), None
    info = registry.get(params.source)
    folder = registry.path(info.ref)
    if not info.is_folder or not (folder / "recipe.json").is_file():
        raise RecipeError(f"{info.ref} is not a merged video model folder (config.json, weights and recipe.json, as "
                          "a merge job with a motion term registers). Fix: export such a version, or pass `recipe`.")
    lineage = Derivation(relation="exported_from", inputs=[LineageInput(ref=info.ref, role="model")])
    return folder, Recipe.from_file(folder / "recipe.json"), lineage, info


def run_export(registry, params: ExportParams, job_id: int) -> VersionInfo:
    """Export, then register the folder as ``params.output`` (kind ``onnx``)."""
    from weightlab.onnx_export import export_onnx

    with job_dir(registry, job_id) as tmp:
        model, recipe, lineage, source = _model(registry, params, Path(tmp))
        out = Path(tmp) / Ref.parse_name(params.output).name
        manifest = export_onnx(model, out, dtype=params.dtype, pipeline_dir=_pipeline_dir(registry, recipe),
                               opset=params.opset, verify=params.verify, progress=False,
                               resolve=partial(version_path, registry))  # the recipe's inputs, for the schedule check
        manifest.model_copy(update={"source": source.ref if source else None}).write(out)  # not the worker's temp folder
        return registry.register_output(out, name=params.output, kind="onnx", derivation=lineage, tags=params.tags,
                                        metadata={**params.metadata, "recipe_hash": recipe.hash, "job": job_id},
                                        source=f"job:{job_id}")


EXPORT = Runner(kind="export", params=ExportParams, output=lambda p: p.output, inputs=lambda p: p.inputs,
                run=run_export)
