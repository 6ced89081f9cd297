"""The adapter-algebra contract and registry (see `weightlab.formats.algebra`); each algebra module imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Factors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Algebra:
    name: str
    suffixes: dict[str, str]
    check: Callable[[Factors, tuple | None], str | None]
    delta: Callable[[Factors, tuple], torch.Tensor]
    rank: Callable[[Factors], int | None]
    bias: str | None = None


ALGEBRAS: dict[str, Algebra] = {}

# Key suffix -> the algebra it belongs to; weightlab does not merge these (docs/formats.md "Adapter algebras").
REFUSED: dict[str, str] = {
    ".oft_blocks": "OFT/BOFT (LyCORIS `oft_blocks`)", ".oft_r": "OFT (PEFT `oft_r`)",
    ".oft_R.weight": "OFT (PEFT `oft_R`)", ".boft_R": "BOFT (PEFT `boft_R`)", ".boft_s": "BOFT (PEFT `boft_s`)",
    ".a1.weight": "GLoRA (LyCORIS `a1/a2/b1/b2`)", ".b1.weight": "GLoRA (LyCORIS `a1/a2/b1/b2`)",
    ".on_input": "IA³ (LyCORIS `on_input`)", ".ia3_l": "IA³ (PEFT `ia3_l`)",
    ".w_norm": "norm-layer fine-tune (LyCORIS `w_norm`/`b_norm`)", ".lambda_layer": "T-LoRA (LyCORIS `lambda_layer`)",
}


def register(algebra: Algebra) -> Algebra:
    """Add ``algebra`` to the registry (a name or a key suffix given twice is refused)."""
    taken = {s for a in ALGEBRAS.values() for s in a.suffixes}
    if algebra.name in ALGEBRAS or taken & set(algebra.suffixes):
        raise ValueError(f"adapter algebra {algebra.name!r} (or one of its key suffixes) is already registered")
    ALGEBRAS[algebra.name] = algebra
    return algebra


def of(factors) -> list[Algebra]:
    """The algebras whose factor names occur in ``factors`` (one for a well-formed module)."""
    return [a for a in ALGEBRAS.values() if set(a.suffixes.values()) & set(factors)]


def fold_spatial(t: torch.Tensor) -> torch.Tensor:
    """``[a, b, k...]`` -> ``[a, b·k...]`` in fp32 (a conv factor as the matrix LyCORIS multiplies)."""
    return t.float().reshape(t.shape[0], -1)


def tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``Σ_ij core[i, j, k...] · left[i, p] · right[j, q]`` -> ``[p, q, k...]`` in fp32 (LyCORIS ``rebuild_tucker``)."""
    return torch.einsum("i j ..., i p, j q -> p q ...", core.float(), left.float(), right.float())


def shape_text(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"
