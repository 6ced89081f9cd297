"""Recipes: a frozen, hashable description of one merge (AnimateLCM Eq. 2), executed by :mod:`weightlab.merge`.

A recipe names a base and ordered terms ``(source, kind, scale)``; sources are paths or registry references
(``ns/name@version``, ``ns/name:alias``, ``ns/name``; the merge engine reads paths, and the registry's resolver
``weightlab.registry.resolve.LocalResolver`` turns references into paths). ``method`` names a method of the registry
in :mod:`weightlab.methods` (``linear`` by default). Term order never changes the result: the engine sorts terms
canonically, and the hash is computed over that canonical order.

Example (YAML):
    base: ~/.weightlab/tiny/base
    terms:
      - {source: style.safetensors, kind: style, scale: 0.8}
      - {source: lcm_lora.safetensors, kind: image_accel, scale: 1.0}
      - {source: motion_adapter, kind: motion, scale: 1.0}
    dtype: float16
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from weightlab.errors import RecipeError
from weightlab.files import COMPUTE_DTYPES
from weightlab.formats.components import NAMES as COMPONENT_NAMES
from weightlab.kinds import KIND_ORDER, TermKind
from weightlab.methods import get_method

DType = Literal[*COMPUTE_DTYPES]


class Term(BaseModel):
    """One residual with its scale (α, β, γ or a motion-LoRA strength). ``components``: the pipeline components it
    changes (``unet``, ``text_encoder``, ``text_encoder_2``, ``vae``: `weightlab.formats.components`); None: every one
    the residual carries (a component it does not carry is a `RecipeError` at merge)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: str
    kind: TermKind
    scale: float = 1.0
    components: tuple[Literal[*COMPONENT_NAMES], ...] | None = None

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("scale must be a finite number")
        return v

    @field_validator("components")
    @classmethod
    def _some(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"components lists some of {', '.join(COMPONENT_NAMES)}, each once (omit it for all)")
        return v


class Recipe(BaseModel):
    """Base + terms + method + dtype/device. Frozen; ``hash`` is stable across term order and formatting."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: Literal[1] = 1
    base: str
    terms: tuple[Term, ...] = ()
    method: str = "linear"  # a name in the method registry (`weightlab.methods`), checked when the recipe is made
    method_args: dict[str, float | int] = Field(default_factory=dict)
    dtype: DType = "float32"
    device: str = "cpu"

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        try:
            get_method(name)
        except RecipeError as e:  # a ValueError, so pydantic reports it as a validation error of `method`
            raise ValueError(str(e)) from None
        return name

    @property
    def canonical_terms(self) -> tuple[Term, ...]:
        return tuple(sorted(self.terms, key=lambda t: (KIND_ORDER[t.kind], t.source, t.scale)))

    @property
    def hash(self) -> str:
        doc = self.model_dump(mode="json")
        # exclude_none: a term without `components` hashes as it did before the field existed
        doc["terms"] = [t.model_dump(mode="json", exclude_none=True) for t in self.canonical_terms]
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def with_scale(self, index: int, scale: float) -> "Recipe":
        terms = list(self.terms)
        terms[index] = terms[index].model_copy(update={"scale": scale})
        return self.model_copy(update={"terms": tuple(terms)})

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())
        return path

    @classmethod
    def from_dict(cls, doc: dict) -> "Recipe":
        try:
            return cls.model_validate(doc)
        except ValidationError as e:
            raise RecipeError(f"invalid recipe: {e}. Fix: see `weightlab merge --help` for the recipe fields.") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        """Read a recipe from YAML or JSON; relative sources resolve against the recipe's folder."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"{path}: cannot read recipe: {e}") from None
        if not isinstance(doc, dict):
            raise RecipeError(f"{path}: a recipe is a mapping with `base` and `terms`.")
        recipe = cls.from_dict(doc)
        return recipe.model_copy(update={
            "base": _relative_to(recipe.base, path.parent),
            "terms": tuple(t.model_copy(update={"source": _relative_to(t.source, path.parent)}) for t in recipe.terms),
        })


def _relative_to(source: str, folder: Path) -> str:
    p = Path(source).expanduser()
    if not p.is_absolute() and (folder / p).exists():
        return str((folder / p).resolve())
    return str(p) if p.exists() else source
