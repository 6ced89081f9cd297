"""LoRA and LoCon: ``ΔW = up @ down``; with LyCORIS's Tucker core (``lora_mid``, a 3x3 LoCon made with
``use_tucker``) ``ΔW[p, q, k] = Σ_ij mid[i, j, k] · up[p, i] · down[j, q]`` (lycoris-lora ``functional/locon.py``
``diff_weight``). Scale alpha / rank, rank = ``down.shape[0]``.

The Tucker core is folded into ``down`` (:func:`factored`), so every LoRA reaches the fused kernels as
``(down, up)``.
"""

from __future__ import annotations

import math

import torch

from weightlab.formats.algebra.base import Algebra, Factors, fold_spatial, register, shape_text

SUFFIXES = {
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".down.weight": "down", ".up.weight": "up",
    ".lora_mid.weight": "mid",
}


def check(f: Factors, shape) -> str | None:
    if "down" not in f or "up" not in f:
        return "a LoRA module needs both a down (`lora_down`/`lora_A`) and an up (`lora_up`/`lora_B`) factor"
    down, up, mid = f["down"], f["up"], f.get("mid")
    if up.dim() < 2 or down.dim() < 2 or math.prod(up.shape[2:]) != 1:
        return f"up {shape_text(up.shape)} and down {shape_text(down.shape)} are not LoRA factors"
    if mid is not None and (mid.dim() < 3 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]
                            or math.prod(down.shape[2:]) != 1):
        return (f"Tucker core `lora_mid` {shape_text(mid.shape)} does not join up {shape_text(up.shape)} and down "
                f"{shape_text(down.shape)} (LyCORIS: mid [rank, rank, kh, kw], up [out, rank, 1, 1], down [rank, in, 1, 1])")
    if mid is None and up.shape[1] != down.shape[0]:
        return f"up {shape_text(up.shape)} has rank {up.shape[1]} but down {shape_text(down.shape)} has {down.shape[0]}"
    if shape is None:
        return None
    rebuilt = (up.shape[0], down.shape[1], *mid.shape[2:]) if mid is not None else None
    if up.shape[0] != shape[0] or (rebuilt is not None and tuple(rebuilt) != tuple(shape)) or (
            rebuilt is None and math.prod(down.shape[1:]) != math.prod(shape[1:])):
        return f"up {shape_text(up.shape)} @ down {shape_text(down.shape)} cannot make a weight {shape_text(shape)}"
    return None


def factored(f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` with ``ΔW = up @ down``; a Tucker core is folded into down (fp32, ``[rank, in, kh, kw]``)."""
    if "mid" not in f:
        return f["down"], f["up"]
    return torch.einsum("i j ..., j q -> i q ...", f["mid"].float(), fold_spatial(f["down"])), f["up"]


def delta(f: Factors, shape) -> torch.Tensor:
    down, up = factored(f)
    return (fold_spatial(up) @ fold_spatial(down)).reshape(shape)


def rank(f: Factors) -> int:
    return int(f["down"].shape[0])


ALGEBRA = register(Algebra("lora", SUFFIXES, check, delta, rank))
