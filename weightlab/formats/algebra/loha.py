"""LoHa (LyCORIS ``hada_*``): ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; with Tucker cores ``hada_t1/t2`` each half is
``Σ_ij t[i, j, k] · w_a[i, p] · w_b[j, q]`` (lycoris-lora ``functional/loha.py`` ``diff_weight``, as its forward
applies it: scale alpha / rank once). Rank = ``hada_w1_b.shape[0]``.
"""

from __future__ import annotations

import math

import torch

from weightlab.formats.algebra.base import Algebra, Factors, fold_spatial, register, shape_text, tucker

SUFFIXES = {".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a",
            ".hada_w2_b": "hada_w2_b", ".hada_t1": "hada_t1", ".hada_t2": "hada_t2"}
_PLAIN = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _half(f: Factors, i: int) -> torch.Tensor:
    a, b, t = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"], f.get(f"hada_t{i}")
    return fold_spatial(a) @ fold_spatial(b) if t is None else tucker(t, a, b)


def _rebuilt_shape(f: Factors) -> tuple:
    a, b, t = f["hada_w1_a"], f["hada_w1_b"], f.get("hada_t1")
    return (a.shape[0], math.prod(b.shape[1:])) if t is None else (a.shape[1], b.shape[1], *t.shape[2:])


def check(f: Factors, shape) -> str | None:
    missing = [n for n in _PLAIN if n not in f]
    if missing or ("hada_t1" in f) != ("hada_t2" in f):
        return f"a LoHa module needs {', '.join(_PLAIN)} (and both or neither of hada_t1, hada_t2); missing " + \
            ", ".join(missing or [n for n in ("hada_t1", "hada_t2") if n not in f])
    halves = []
    for i in (1, 2):
        a, b, t = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"], f.get(f"hada_t{i}")
        if t is None:
            ok = a.dim() == 2 and b.dim() >= 2 and a.shape[1] == b.shape[0]
            halves.append((a.shape[0], math.prod(b.shape[1:])))
        else:  # LyCORIS: t [rank, rank, k...], w_a [rank, out], w_b [rank, in]
            ok = t.dim() >= 3 and a.dim() == b.dim() == 2 and t.shape[0] == a.shape[0] and t.shape[1] == b.shape[0]
            halves.append((a.shape[1], b.shape[1], *t.shape[2:]))
        if not ok:
            return (f"hada_w{i}_a {shape_text(a.shape)}, hada_w{i}_b {shape_text(b.shape)}"
                    + (f" and hada_t{i} {shape_text(t.shape)}" if t is not None else "") + " do not multiply"
                    + (" (LyCORIS Tucker: t [rank, rank, kh, kw], w_a [rank, out], w_b [rank, in])" if t is not None else ""))
    if halves[0] != halves[1]:
        return f"the two Hadamard halves have shapes {shape_text(halves[0])} and {shape_text(halves[1])}"
    if shape is not None:
        rebuilt = _rebuilt_shape(f)
        fits = tuple(rebuilt) == tuple(shape) if "hada_t1" in f else (
            rebuilt[0] == shape[0] and rebuilt[1] == math.prod(shape[1:]))
        if not fits:
            return f"the factors make {shape_text(rebuilt)}, not the weight's {shape_text(shape)}"
    return None


def delta(f: Factors, shape) -> torch.Tensor:
    return (_half(f, 1) * _half(f, 2)).reshape(shape)


def rank(f: Factors) -> int:
    return int(f["hada_w1_b"].shape[0])


ALGEBRA = register(Algebra("loha", SUFFIXES, check, delta, rank))
