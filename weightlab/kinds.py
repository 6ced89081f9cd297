"""Kinds: the role a weight file plays in Eq. 2 (DESIGN.md "Concepts"), the one vocabulary that residuals, recipes
and the registry share. Torch-free and database-free, so every layer can import it."""

from __future__ import annotations

from typing import Literal, get_args

TermKind = Literal["style", "image_accel", "motion", "motion_lora"]  # a recipe term's role, in canonical order
Kind = Literal["base", TermKind]  # a residual's role: a base, or a term
ArtifactKind = Literal[Kind, "onnx"]  # what the registry stores: a residual, or an ONNX export folder

TERM_KINDS: tuple[str, ...] = get_args(TermKind)
KINDS: tuple[str, ...] = get_args(Kind)
ARTIFACT_KINDS: tuple[str, ...] = get_args(ArtifactKind)
KIND_ORDER: dict[str, int] = {k: i for i, k in enumerate(TERM_KINDS)}  # the canonical term order of a recipe
