"""Merge methods for combining several style residuals, as typed functions in a registry.

``linear`` is Eq. 2 itself (every term added with its scale) and never combines anything. The others take
the already-scaled fp32 style deltas of one tensor and return one combined delta:

- ``ties`` (Yadav et al. 2023): keep the top ``density`` fraction of each delta by magnitude, elect a sign per
  element by the summed mass, average the surviving entries that agree with it (disjoint mean).
- ``dare`` (Yu et al. 2023): drop each entry with probability ``1 − density`` and rescale the rest by
  ``1/density``, then sum. Seeded per tensor name, so a merge is reproducible: one CPU ``torch.Generator`` per
  tensor, seeded with the first 8 bytes (little-endian, top bit cleared) of ``sha256(f"{seed}:{key}")``, draws
  ``torch.rand(delta.shape)`` once per delta in the order given; an entry is kept where its draw is < ``density``.
- ``svd``: sum the deltas, keep the best rank-``rank`` approximation (a re-ranked combined LoRA).

The engine passes the deltas in the recipe's canonical term order (kind, then source, then scale).

LoRAs are always expanded to ``ΔW = B·A`` first; factors are never averaged separately.
"""

from __future__ import annotations

import difflib
import hashlib
from typing import TYPE_CHECKING, Callable

from weightlab.errors import RecipeError

if TYPE_CHECKING:  # torch is imported by the methods themselves, so recipes validate method names without it
    import torch

Combine = Callable[..., "torch.Tensor"]
METHODS: dict[str, Combine | None] = {"linear": None}


def method(name: str):
    """Register a combine function under ``name`` (duplicates refused)."""
    def deco(fn: Combine) -> Combine:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        METHODS[name] = fn
        return fn
    return deco


def get_method(name: str) -> Combine | None:
    """The combine function registered as ``name`` (None for ``linear``).

    Raises:
        RecipeError: no method has that name; the message suggests the nearest registered name.
    """
    if name not in METHODS:
        near = difflib.get_close_matches(name, METHODS, n=1)
        raise RecipeError(f"unknown merge method {name!r}{f'; did you mean {near[0]!r}' if near else ''}? Known: "
                          f"{', '.join(METHODS)}. Fix: name one of them, or register yours first with "
                          "@weightlab.methods.method(name).")
    return METHODS[name]


def _seed_for(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@method("ties")
def ties(deltas: list[torch.Tensor], *, key: str, density: float = 0.2) -> torch.Tensor:
    import torch

    if not 0 < density <= 1:
        raise RecipeError(f"ties: density must be in (0, 1], got {density}.")
    stacked = torch.stack([d.flatten() for d in deltas])
    k = max(1, int(round(density * stacked.shape[1])))
    thresh = stacked.abs().kthvalue(stacked.shape[1] - k + 1, dim=1, keepdim=True).values
    trimmed = torch.where(stacked.abs() >= thresh, stacked, torch.zeros_like(stacked))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0)
    count = agree.sum(0).clamp(min=1)
    return (total / count).reshape(deltas[0].shape)


@method("dare")
def dare(deltas: list[torch.Tensor], *, key: str, density: float = 0.5, seed: int = 0) -> torch.Tensor:
    import torch

    if not 0 < density <= 1:
        raise RecipeError(f"dare: density must be in (0, 1], got {density}.")
    g = torch.Generator().manual_seed(_seed_for(key, int(seed)))
    out = torch.zeros_like(deltas[0])
    for d in deltas:
        keep = torch.rand(d.shape, generator=g) < density
        out += torch.where(keep.to(d.device), d, torch.zeros_like(d)) / density
    return out


@method("svd")
def svd(deltas: list[torch.Tensor], *, key: str, rank: int = 64) -> torch.Tensor:
    import torch

    total = torch.stack(deltas).sum(0)
    mat = total.reshape(total.shape[0], -1)
    if int(rank) >= min(mat.shape):
        return total
    u, s, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    r = int(rank)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float().reshape(total.shape)
