"""LoKr (LyCORIS ``lokr_*``): ``ΔW = w1 ⊗ w2`` (Kronecker product), each half stored whole (``lokr_w1``,
``lokr_w2``) or as a low-rank pair (``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``), the second optionally
with a Tucker core ``lokr_t2`` (``Σ_ij t2[i, j, k] · w2_a[i, p] · w2_b[j, q]``); lycoris-lora
``functional/lokr.py`` ``_kron_weight``/``make_kron``. Scale alpha / rank with rank = ``lokr_w1_b.shape[0]`` or
``lokr_w2_b.shape[0]`` (the factored half); with both halves whole there is no rank and the scale is 1 (LyCORIS
ignores alpha then).
"""

from __future__ import annotations

import math

import torch

from weightlab.formats.algebra.base import Algebra, Factors, fold_spatial, register, shape_text, tucker

SUFFIXES = {f".lokr_{n}": f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}


def _half(f: Factors, i: int) -> torch.Tensor:
    whole, a, b = f.get(f"lokr_w{i}"), f.get(f"lokr_w{i}_a"), f.get(f"lokr_w{i}_b")
    if whole is not None:
        return whole.float()
    if i == 2 and "lokr_t2" in f:
        return tucker(f["lokr_t2"], a, b)
    return (a.float() @ fold_spatial(b)).reshape(a.shape[0], *b.shape[1:])


def _half_shape(f: Factors, i: int) -> tuple:
    whole, a, b = f.get(f"lokr_w{i}"), f.get(f"lokr_w{i}_a"), f.get(f"lokr_w{i}_b")
    if whole is not None:
        return tuple(whole.shape)
    if i == 2 and "lokr_t2" in f:
        return (a.shape[1], b.shape[1], *f["lokr_t2"].shape[2:])
    return (a.shape[0], *b.shape[1:])


def _kron_shape(f: Factors) -> tuple:
    s1, s2 = _half_shape(f, 1), _half_shape(f, 2)
    s1 = s1 + (1,) * (len(s2) - len(s1))
    return tuple(x * y for x, y in zip(s1, s2))


def check(f: Factors, shape) -> str | None:
    for i in (1, 2):
        whole, pair = f"lokr_w{i}" in f, (f"lokr_w{i}_a" in f, f"lokr_w{i}_b" in f)
        if whole == any(pair) or pair[0] != pair[1]:
            return (f"a LoKr module needs either lokr_w{i} or both lokr_w{i}_a and lokr_w{i}_b; it has "
                    + (", ".join(n for n in (f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b") if n in f) or "none"))
    if "lokr_t2" in f and "lokr_w2_a" not in f:
        return "lokr_t2 (a Tucker core) needs lokr_w2_a and lokr_w2_b, not a whole lokr_w2"
    if "lokr_w1" in f and f["lokr_w1"].dim() != 2:
        return f"lokr_w1 {shape_text(f['lokr_w1'].shape)} is not a matrix"
    for i in (1, 2):
        a, b = f.get(f"lokr_w{i}_a"), f.get(f"lokr_w{i}_b")
        if a is None:
            continue
        t = f.get("lokr_t2") if i == 2 else None
        ok = (a.dim() == 2 and b.dim() >= 2 and a.shape[1] == b.shape[0]) if t is None else (
            t.dim() >= 3 and a.dim() == b.dim() == 2 and t.shape[0] == a.shape[0] and t.shape[1] == b.shape[0])
        if not ok:
            return (f"lokr_w{i}_a {shape_text(a.shape)} and lokr_w{i}_b {shape_text(b.shape)}"
                    + (f" with lokr_t2 {shape_text(t.shape)} do not fit (LyCORIS Tucker: t2 [rank, rank, kh, kw], "
                       "w2_a [rank, out/a], w2_b [rank, in/c])" if t is not None else " do not multiply"))
    if len(_half_shape(f, 1)) > len(_half_shape(f, 2)):
        return f"lokr_w1 has more dims than lokr_w2 {shape_text(_half_shape(f, 2))}"
    if shape is not None:
        kron = _kron_shape(f)
        if kron[0] != shape[0] or math.prod(kron) != math.prod(shape) or (len(kron) > 2 and kron != tuple(shape)):
            return (f"lokr_w1 {shape_text(_half_shape(f, 1))} ⊗ lokr_w2 {shape_text(_half_shape(f, 2))} = "
                    f"{shape_text(kron)}, not the weight's {shape_text(shape)}")
    return None


def delta(f: Factors, shape) -> torch.Tensor:
    w1, w2 = _half(f, 1), _half(f, 2)
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
    return torch.kron(w1, w2.contiguous()).reshape(shape)


def rank(f: Factors) -> int | None:
    for name in ("lokr_w1_b", "lokr_w2_b"):
        if name in f:
            return int(f[name].shape[0])
    return None


ALGEBRA = register(Algebra("lokr", SUFFIXES, check, delta, rank))
