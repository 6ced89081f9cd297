"""Full (LyCORIS ``diff``/``diff_b``): the weight's and the bias's change, stored whole; no alpha, scale 1
(lycoris-lora ``modules/full.py``: ``W + diff``, ``b + diff_b``)."""

from __future__ import annotations

import math

import torch

from weightlab.formats.algebra.base import Algebra, Factors, register, shape_text

SUFFIXES = {".diff": "diff", ".diff_b": "diff_b"}


def check(f: Factors, shape) -> str | None:
    if "diff" not in f:
        return "a full-diff module needs `diff` (its `diff_b` alone is not a module)"
    if "diff_b" in f and (f["diff_b"].dim() != 1 or f["diff_b"].shape[0] != f["diff"].shape[0]):
        return f"diff_b {shape_text(f['diff_b'].shape)} is not one value per output of diff {shape_text(f['diff'].shape)}"
    if shape is not None and (f["diff"].shape[0] != shape[0] or math.prod(f["diff"].shape) != math.prod(shape)):
        return f"diff {shape_text(f['diff'].shape)} is not the weight's shape {shape_text(shape)}"
    return None


def delta(f: Factors, shape) -> torch.Tensor:
    return f["diff"].float().reshape(shape)


def rank(f: Factors) -> None:
    return None


ALGEBRA = register(Algebra("full", SUFFIXES, check, delta, rank, bias="diff_b"))
