"""Typed residuals: the terms of Eq. 2. Keys are always normalised to ``UNetMotionModel`` parameter names.

``Base``  – complete UNet weights (``w0``; may include motion modules when it is a merged video UNet).
``Dense`` – a full fine-tune; its residual is ``W − w0`` against the base it is merged into, per component.
``LoRA``  – adapter factors per target module: delta = (alpha / rank) · up @ down, or another registered algebra
            (LoHa, LoKr, full diff: `weightlab.formats.algebra`), or DoRA.
``MotionModule`` – new parameters (AnimateDiff temporal blocks); their "w0" is zero.
A LoRA or Dense may also change the pipeline's other components (``others``; `weightlab.formats.components`).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

import torch

from weightlab.errors import NonFiniteError, WeightlabError, fmt_keys
from weightlab.families import is_motion_key
from weightlab.files import release_pages, sniff
from weightlab.formats import algebra as algebras
from weightlab.formats.components import COMPONENTS

META_PREFIX = "weightlab."


@dataclass(kw_only=True)
class AdapterTarget(ABC):
    """One target module of an adapter: ``ΔW = scale · algebra(factors)``, or DoRA's merged weight.

    ``alpha`` is in kohya's convention, scale = alpha / rank, whatever the file's: readers convert PEFT's options
    to it (``lora_alpha``, patterns, rsLoRA's alpha / √r; `weightlab.formats.adapter_config`). None means
    alpha = rank (scale 1), as PEFT/diffusers files without alphas. ``magnitude`` makes it DoRA, and the merged
    weight is :meth:`dora_weight`, not w0 + ΔW; ``dora`` names whose definition: ``"peft"`` (PEFT's
    ``lora_magnitude_vector``, one value per output channel) or ``"lycoris"`` (kohya/LyCORIS ``dora_scale``, per
    output channel ``[out, 1, ...]`` or per input channel ``[1, in, ...]``).
    """

    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    dora: Literal["peft", "lycoris"] = "peft"

    @property
    @abstractmethod
    def rank(self) -> int | None:
        """What alpha is divided by; None for an algebra without alpha (scale 1)."""

    @abstractmethod
    def _unscaled(self, shape) -> torch.Tensor:
        """fp32 ΔW / scale with the weight's ``shape``."""

    @abstractmethod
    def factors(self) -> dict[str, torch.Tensor]:
        """Key suffix (``lora_A.weight``, ``hada_w1_a``) -> tensor, as ``LoRA.save`` writes them."""

    @abstractmethod
    def misfit(self, shape) -> str | None:
        """Why the factors cannot make a weight of ``shape``, or None."""

    @property
    def params(self) -> tuple[str, ...]:
        """The parameters of the module it changes (``weight``; ``bias`` too for a full diff with ``diff_b``)."""
        return ("weight",)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or self.rank is None else float(self.alpha) / self.rank

    def delta(self, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        """fp32 ``scale · ΔW`` with the target weight's shape.

        Raises:
            WeightlabError: a DoRA target, whose change to the weight depends on it (use :meth:`dora_weight`).
        """
        if self.magnitude is not None:
            raise WeightlabError("a DoRA target's change depends on the weight it is merged into. "
                                 "Fix: use LoRATarget.dora_weight(w0).")
        return self.scale * self._unscaled(shape)

    def bias_delta(self) -> torch.Tensor:
        """fp32 change of the module's bias (only for targets whose ``params`` include ``bias``)."""
        raise WeightlabError(f"a {self.algebra} target does not change a bias.")

    def dora_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """DoRA's merged weight ``m · (w0 + ΔW) / ‖w0 + ΔW‖`` in fp32 (ΔW = scale · algebra(factors)).

        ``"peft"``: the norm per output channel over the other dims (PEFT ``DoraLinearVariant`` /
        ``DoraConv2dVariant.merge_safe``). ``"lycoris"``: per output channel, or per input channel over the other
        dims when ``magnitude`` is ``[1, in, ...]``, plus the magnitude dtype's eps (lycoris-lora
        ``functional/general.py`` ``_weight_decompose``).
        """
        w = w0.float() + self.scale * self._unscaled(w0.shape)
        if self.dora == "lycoris" and not self._on_output(w.shape):
            norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1) + torch.finfo(self.magnitude.dtype).eps
            return w * (self.magnitude.float().reshape(-1) / norm).reshape(1, -1, *[1] * (w.dim() - 2))
        norm = w.reshape(w.shape[0], -1).norm(dim=1)
        if self.dora == "lycoris":
            norm = norm + torch.finfo(self.magnitude.dtype).eps
        return w * (self.magnitude.float().reshape(-1) / norm).reshape(-1, *[1] * (w.dim() - 1))

    def magnitude_fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the DoRA magnitude has one value per output channel (or, LyCORIS, per input channel) of ``shape``."""
        if self.dora == "lycoris" and not self._on_output(shape):
            return len(shape) > 1 and tuple(self.magnitude.shape) == (1, shape[1], *[1] * (len(shape) - 2))
        return self.magnitude.numel() == shape[0]

    def _on_output(self, shape) -> bool:
        return self.magnitude.shape[0] == shape[0] and self.magnitude.numel() == shape[0]

    def tensors(self, path: str) -> dict[str, torch.Tensor]:
        """This target's tensors under module ``path``, as ``LoRA.save`` writes them (alpha, DoRA magnitude included)."""
        out = {f"{path}.{k}": v for k, v in self.factors().items()}
        if self.alpha is not None:
            out[f"{path}.alpha"] = torch.tensor(float(self.alpha))
        if self.magnitude is not None:
            out[f"{path}.{'dora_scale' if self.dora == 'lycoris' else 'lora_magnitude_vector'}"] = self.magnitude
        return out

    def to(self, device: torch.device) -> AdapterTarget:
        """A copy with every tensor on ``device``; this target is unchanged."""
        return replace(self, magnitude=None if self.magnitude is None else self.magnitude.to(device))


@dataclass
class LoRATarget(AdapterTarget):
    """LoRA factors of one target module: ΔW = scale · up @ down. ``down``: ``[r, in(, kh, kw)]``; ``up``:
    ``[out, r(, 1, 1)]`` (a LoCon Tucker core is folded into ``down``: `weightlab.formats.algebra.lora`). Merged by
    the fused kernels as factors, unless it is DoRA."""

    down: torch.Tensor
    up: torch.Tensor

    algebra: ClassVar[str] = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def _unscaled(self, shape) -> torch.Tensor:
        return algebras.lora.delta({"down": self.down, "up": self.up}, shape or (self.up.shape[0], *self.down.shape[1:]))

    def factors(self):
        return {"lora_A.weight": self.down, "lora_B.weight": self.up}

    def misfit(self, shape) -> str | None:
        out_f, in_f = shape[0], math.prod(shape[1:])
        if self.up.shape[0] != out_f or self.down.reshape(self.rank, -1).shape[1] != in_f or self.up.reshape(out_f, -1).shape[1] != self.rank:
            return f"up {tuple(self.up.shape)} @ down {tuple(self.down.shape)} vs weight {tuple(shape)}"
        return None

    def to(self, device):
        return replace(super().to(device), down=self.down.to(device), up=self.up.to(device))


@dataclass
class FactorTarget(AdapterTarget):
    """A target of any other registered algebra (LoHa, LoKr, full diff): the file's factors by name, its ΔW computed
    once per merge as a dense term (`weightlab.formats.algebra`). ``name`` is the module's name in the file."""

    algebra: str
    factor_map: dict[str, torch.Tensor]
    name: str = ""

    @property
    def _def(self) -> algebras.Algebra:
        return algebras.ALGEBRAS[self.algebra]

    @property
    def rank(self) -> int | None:
        return self._def.rank(self.factor_map)

    @property
    def params(self):
        bias = self._def.bias
        return ("weight", "bias") if bias is not None and bias in self.factor_map else ("weight",)

    @property
    def scale(self) -> float:
        # LyCORIS reads an alpha of 0 as "alpha = rank" (scale 1), as it does a missing one.
        return 1.0 if not self.alpha or self.rank is None else float(self.alpha) / self.rank

    def _unscaled(self, shape) -> torch.Tensor:
        return self._def.delta(self.factor_map, shape)

    def bias_delta(self) -> torch.Tensor:
        if "bias" not in self.params:
            return super().bias_delta()
        return self.factor_map[self._def.bias].float()

    def factors(self):
        suffix = {f: s for s, f in self._def.suffixes.items()}
        return {suffix[f].lstrip("."): v for f, v in self.factor_map.items()}

    def misfit(self, shape) -> str | None:
        why = self._def.check(self.factor_map, tuple(shape))
        return None if why is None else f"{self.algebra} `{self.name}`: {why}"

    def to(self, device):
        return replace(super().to(device), factor_map={k: v.to(device) for k, v in self.factor_map.items()})


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

    @property
    def components(self) -> list[str]:
        """The pipeline components it changes (`weightlab.formats.components`): ``unet`` unless it says more."""
        return ["unet"]

    def component(self, name: str) -> Residual:
        """This residual reduced to component ``name``, keyed in that component's names (the merge engine's input
        for it); a residual with only a UNet part is its own ``unet`` component."""
        return self

    def select(self, names) -> Residual:
        """This residual with only the components in ``names``."""
        return self

    def non_finite(self) -> list[str]:
        """The tensors holding a NaN or Inf (the pages read are released again)."""
        bad = []
        for k, v in self.tensors().items():
            if v.is_floating_point() and not _all_finite(v):
                bad.append(k)
            release_pages(v)
        return bad

    def check_finite(self) -> None:
        """Raise `NonFiniteError` naming every tensor with a NaN or Inf (the pages read are released again)."""
        bad = self.non_finite()
        if bad:
            raise NonFiniteError(f"{self.source or self.kind}: NaN/Inf values in {fmt_keys(bad)}. Fix: the file is damaged or was trained into divergence; use another.")

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write to ``.safetensors`` (normalised keys; kind/family/config in ``__metadata__``), atomically."""
        from weightlab.files import save_tensors

        meta = dict(self.metadata)
        meta.pop("lora_adapter_metadata", None)  # a LoRA's options are written as its `.alpha` keys (tensors())
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
        return any(is_motion_key(k) for k in self.weights)

    @property
    def components(self) -> list[str]:
        """The pipeline components it comes with: its pipeline folder's, else those its single file carries."""
        from weightlab.formats import single_file

        if self.pipeline_dir is not None:
            return [c for c in COMPONENTS if (self.pipeline_dir / c / "config.json").is_file()]
        header = sniff(self.source) if self.source is not None and Path(self.source).is_file() else None
        return ["unet", *single_file.components(header.tensors if header else ())]


class _Parts:
    """Components besides the UNet, for a residual whose UNet part is the field ``_unet`` names and whose other
    components' parts (the same kind of mapping, in each component's own names) are ``others[name]``."""

    _unet: ClassVar[str]
    others: dict[str, dict]

    @property
    def components(self) -> list[str]:
        parts = {"unet": getattr(self, self._unet), **self.others}
        return [c for c in COMPONENTS if parts.get(c)]

    def component(self, name: str):
        return replace(self, **{self._unet: getattr(self, self._unet) if name == "unet" else self.others.get(name, {})},
                       others={})

    def select(self, names):
        return replace(self, **{self._unet: getattr(self, self._unet) if "unet" in names else {}},
                       others={c: p for c, p in self.others.items() if c in names})


@dataclass
class Dense(_Parts, Weights):
    """A full fine-tune (weights ``W``); merged as ``a · (W − w0)``, per component: ``weights`` is the UNet's,
    ``others`` the other components' (a single-file checkpoint's CLIP and baked VAE), each in diffusers names
    without the component's ``strip`` prefix (`weightlab.formats.components`)."""

    others: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    kind: str = "style"
    representation: ClassVar[str] = "full"
    _unet: ClassVar[str] = "weights"

    def tensors(self):
        return {**self.weights, **{f"{c}.{k}": v for c, part in self.others.items() for k, v in part.items()}}


@dataclass
class LoRA(_Parts, Residual):
    """Adapter residual: UNet module path -> :class:`LoRATarget` or :class:`FactorTarget` (``targets``), and the same
    for the other components' modules (``others``: ``text_encoder``, ``text_encoder_2``; CLIP module paths without
    ``text_model.``); ``alpha_source`` says where the alphas came from. ``target_keys`` are the UNet's."""

    targets: dict[str, AdapterTarget] = field(default_factory=dict)
    others: dict[str, dict[str, AdapterTarget]] = field(default_factory=dict)
    alpha_source: str = ""
    kind: str = "style"
    representation: ClassVar[str] = "lora"
    _unet: ClassVar[str] = "targets"

    def tensors(self):
        parts = {"": self.targets, **{f"{c}.": part for c, part in self.others.items()}}  # key prefix -> targets
        return {k: v for prefix, part in parts.items() for path, t in part.items() for k, v in t.tensors(prefix + path).items()}

    @property
    def target_keys(self):
        return {f"{p}.{param}" for p, t in self.targets.items() for param in t.params}

    @property
    def ranks(self) -> list[int]:
        return sorted({t.rank for t in self._all if t.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({float(t.alpha if t.alpha is not None else t.rank) for t in self._all if t.rank is not None})

    @property
    def algebras(self) -> list[str]:
        """The adapter algebras of its targets (``lora``, ``loha``, ``lokr``, ``full``; ``+dora`` when DoRA)."""
        return sorted({t.algebra + ("+dora" if t.magnitude is not None else "") for t in self._all})

    @property
    def _all(self) -> list[AdapterTarget]:
        return [*self.targets.values(), *(t for part in self.others.values() for t in part.values())]


@dataclass
class MotionModule(Weights):
    """AnimateDiff-style temporal blocks (diffusers ``MotionAdapter`` names) and the adapter config."""

    config: dict = field(default_factory=dict)
    kind: str = "motion"
    representation: ClassVar[str] = "module"
