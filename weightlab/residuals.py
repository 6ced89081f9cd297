"""Typed residuals: the terms of Eq. 2. Keys are always normalised to ``UNetMotionModel`` parameter names.

``Base``  – complete UNet weights (``w0``; may include motion modules when it is a merged video UNet).
``Dense`` – a full fine-tune; its residual is ``W − w0`` against the base it is merged into.
``LoRA``  – low-rank factors per target module; delta = (alpha / rank) · up @ down.
``MotionModule`` – new parameters (AnimateDiff temporal blocks); their "w0" is zero.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from weightlab.errors import NonFiniteError, fmt_keys
from weightlab.files import release_pages

Kind = Literal["base", "style", "image_accel", "motion", "motion_lora"]
KINDS: tuple[str, ...] = ("base", "style", "image_accel", "motion", "motion_lora")
META_PREFIX = "weightlab."


@dataclass
class LoRATarget:
    """Factors of one target module. ``down``: ``[r, in(, kh, kw)]``; ``up``: ``[out, r(, 1, 1)]``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None  # None means alpha == rank (scale 1), as PEFT/diffusers files without alphas

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        """fp32 ``scale · up @ down`` reshaped to the target weight's shape (conv via the 2-D reshape)."""
        d = self.scale * (self.up.float().reshape(self.up.shape[0], -1) @ self.down.float().reshape(self.rank, -1))
        if shape is None:
            shape = (self.up.shape[0], *self.down.shape[1:])
        return d.reshape(shape)


def _all_finite(v: torch.Tensor) -> bool:
    """NaN and Inf propagate through a sum, so a finite fp32 sum proves every value finite (several times
    faster than ``isfinite(v).all()``); a sum that overflows from finite values falls back to the exact test."""
    return bool(torch.isfinite(v.sum(dtype=torch.float32))) or bool(torch.isfinite(v).all())


@dataclass
class Residual(ABC):
    """Common fields. ``source`` is the file/folder it came from; ``skipped`` lists keys reported under strict=False."""

    family: str = "sd15"
    kind: str = "base"
    source: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    representation: ClassVar[str] = "full"

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor view in weightlab's normalised key layout (what ``save`` writes)."""

    @property
    @abstractmethod
    def target_keys(self) -> set[str]:
        """UNetMotionModel parameter names this residual writes."""

    def check_finite(self) -> None:
        """Raise `NonFiniteError` naming every tensor with a NaN or Inf (the pages read are released again)."""
        bad = []
        for k, v in self.tensors().items():
            if v.is_floating_point() and not _all_finite(v):
                bad.append(k)
            release_pages(v)
        if bad:
            raise NonFiniteError(f"{self.source or self.kind}: NaN/Inf values in {fmt_keys(bad)}. Fix: the file is damaged or was trained into divergence; use another.")

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write to ``.safetensors`` (normalised keys; kind/family/config in ``__metadata__``), atomically."""
        from weightlab.files import save_tensors

        meta = dict(self.metadata)
        meta.update({f"{META_PREFIX}kind": self.kind, f"{META_PREFIX}family": self.family,
                     f"{META_PREFIX}representation": self.representation})
        cfg = getattr(self, "config", None)
        if cfg:
            meta[f"{META_PREFIX}config"] = json.dumps(cfg, default=list)
        meta.update(metadata or {})
        return save_tensors(self.tensors(), path, meta)


@dataclass
class Weights(Residual):
    """A residual stored as named weights (diffusers names); ``tensors()`` is the dict itself."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self):
        return self.weights

    @property
    def target_keys(self):
        return set(self.weights)


@dataclass
class Base(Weights):
    """Complete UNet weights and the UNet config; ``pipeline_dir`` when loaded from a pipeline folder."""

    config: dict = field(default_factory=dict)
    pipeline_dir: Path | None = None
    representation: ClassVar[str] = "full"

    @property
    def has_motion(self) -> bool:
        return any(".motion_modules." in k for k in self.weights)


@dataclass
class Dense(Weights):
    """A full fine-tune (weights ``W``); merged as ``a · (W − w0)``."""

    kind: str = "style"
    representation: ClassVar[str] = "full"


@dataclass
class LoRA(Residual):
    """Low-rank residual: module path -> :class:`LoRATarget`."""

    targets: dict[str, LoRATarget] = field(default_factory=dict)
    kind: str = "style"
    representation: ClassVar[str] = "lora"

    def tensors(self):
        out = {}
        for path, t in self.targets.items():
            out[f"{path}.lora_A.weight"] = t.down
            out[f"{path}.lora_B.weight"] = t.up
            if t.alpha is not None:
                out[f"{path}.alpha"] = torch.tensor(float(t.alpha))
        return out

    @property
    def target_keys(self):
        return {f"{p}.weight" for p in self.targets}

    @property
    def ranks(self) -> list[int]:
        return sorted({t.rank for t in self.targets.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({float(t.alpha if t.alpha is not None else t.rank) for t in self.targets.values()})


@dataclass
class MotionModule(Weights):
    """AnimateDiff-style temporal blocks (diffusers ``MotionAdapter`` names) and the adapter config."""

    config: dict = field(default_factory=dict)
    kind: str = "motion"
    representation: ClassVar[str] = "module"
