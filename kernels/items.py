"""What a merge is given — one `MergeItem` per live weight — and the host checks every backend runs first.

The checks cover everything that can be known without reading tensor values: dtypes, devices, shapes, memory
layout of the destination, aliasing between destinations and sources, and tied (shared) destinations. Finite
values are the merge engine's check (it would cost a full pass over every tensor here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from weightlab.errors import KernelError, NonFiniteError, ShapeMismatchError

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class MergeItem:
    """One live weight and the terms merged into it.

    ``dst = round_once(base_scale·w0 + Σ scale·up@down + Σ a·(W − w0))``, accumulated in fp32 in this order.

    Args:
        dst (Tensor): live weight, overwritten in place (fp16/bf16/fp32); conv ``(out, in, kh, kw)`` is
            handled as ``(out, in·kh·kw)``, a 1-D bias as one row.
        w0 (Tensor): pristine base value, same shape as ``dst``, any of the three dtypes (may be memory-mapped).
        loras (list[tuple[Tensor, Tensor, float]]): ``(down, up, scale)``; down ``[r, in]`` or ``[r, in, kh, kw]``,
            up ``[out, r]`` or ``[out, r, 1, 1]``; ``scale`` already includes alpha/rank. Default none.
        denses (list[tuple[Tensor, float]]): ``(W, a)`` adds ``a·(W − w0)``; ``W`` has ``dst``'s shape. Default none.
        base_scale (float): the accumulator starts at ``base_scale·w0`` (γ on a motion ``proj_out``). Default 1.0.
        name (str): the weight's key, used in error messages. Default ``""``.

    Example:
        >>> item = MergeItem(dst=lin.weight, w0=w0, loras=[(down, up, 0.5)])   # doctest: +SKIP
    """

    dst: torch.Tensor
    w0: torch.Tensor
    loras: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)
    denses: list[tuple[torch.Tensor, float]] = field(default_factory=list)
    base_scale: float = 1.0
    name: str = ""


def label(items: Sequence[MergeItem], i: int) -> str:
    """``merge item 3 (`key`)`` for error messages."""
    name = getattr(items[i], "name", "")
    return f"merge item {i}" + (f" (`{name}`)" if name else "")


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The 2-D (rows, cols) a weight of this shape is merged as: ``(out, in·kh·kw)``; a 0/1-D tensor is one row."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def check_items(items: Sequence[MergeItem]) -> list[tuple[int, int]]:
    """Validate every item before anything is written; return each item's 2-D (rows, cols).

    Raises:
        KernelError, ShapeMismatchError, NonFiniteError: on the first rule broken, naming the item and the fix.
    """
    dims = [_check_item(items, i) for i in range(len(items))]
    _check_overlaps(items)
    return dims


def _check_tensor(t, what: str, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{where}: {what} is a {type(t).__name__}, not a torch.Tensor. Fix: pass tensors.")
    if t.layout != torch.strided or t.device.type == "meta":
        raise KernelError(f"{where}: {what} is a {t.layout} tensor on {t.device}; only dense tensors with data "
                          "can be merged. Fix: materialise it (`.to_dense()`, load the weights).")
    if t.dtype not in DTYPES:
        raise KernelError(f"{where}: {what} has dtype {t.dtype}; merges take float16, bfloat16 or float32. "
                          f"Fix: convert it, e.g. `.to(torch.float32)`.")


def _scale(value, what: str, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise KernelError(f"{where}: {what} is {value!r}, not a number. Fix: pass a float.") from None
    if not math.isfinite(v):
        raise NonFiniteError(f"{where}: {what} is {v}; scales must be finite. Fix: check the recipe's scales.")
    return v


def _check_item(items: Sequence[MergeItem], i: int) -> tuple[int, int]:
    item, where = items[i], label(items, i)
    _check_tensor(item.dst, "dst", where)
    _check_tensor(item.w0, "w0", where)
    dst = item.dst
    if has_internal_overlap(dst):
        raise KernelError(f"{where}: dst has expanded or overlapping strides {tuple(dst.stride())} for shape "
                          f"{tuple(dst.shape)}; writing it would race. Fix: merge into a real weight tensor "
                          "(not an `.expand()`ed view).")
    if item.w0.shape != dst.shape:
        raise ShapeMismatchError(f"{where}: w0 has shape {tuple(item.w0.shape)} but dst has {tuple(dst.shape)}. "
                                 "Fix: pass the pristine base value of this very weight.")
    _scale(item.base_scale, "base_scale", where)
    rows, cols = matrix_shape(dst.shape)
    for k, term in enumerate(item.loras):
        if len(term) != 3:
            raise KernelError(f"{where}: LoRA term {k} is not a (down, up, scale) triple. Fix: pass (down, up, scale).")
        down, up, scale = term
        _check_tensor(down, f"LoRA {k} down", where)
        _check_tensor(up, f"LoRA {k} up", where)
        _scale(scale, f"LoRA {k} scale", where)
        _check_lora_shapes(down, up, dst.shape, f"{where}: LoRA {k}")
    for k, term in enumerate(item.denses):
        if len(term) != 2:
            raise KernelError(f"{where}: dense term {k} is not a (W, a) pair. Fix: pass (W, a).")
        w, a = term
        _check_tensor(w, f"dense {k} W", where)
        _scale(a, f"dense {k} coefficient", where)
        if w.shape != dst.shape:
            raise ShapeMismatchError(f"{where}: dense term {k} has shape {tuple(w.shape)} but dst has "
                                     f"{tuple(dst.shape)}. Fix: a dense term is a full weight of the same shape.")
    return rows, cols


def _check_lora_shapes(down: torch.Tensor, up: torch.Tensor, shape: torch.Size, where: str) -> None:
    rule = ("up must be [out, r] (or [out, r, 1, 1] for conv) and down [r, in] (or [r, in, kh, kw]). "
            "Fix: pass (down, up, scale) in that order, for this weight.")
    if len(shape) < 2:
        raise ShapeMismatchError(f"{where}: the weight has shape {tuple(shape)}; LoRA terms need a 2-D or conv "
                                 "weight. Fix: merge biases with dense terms only.")
    rows, cols = matrix_shape(shape)
    rank = down.shape[0] if down.dim() >= 1 else 0
    up_ok = up.dim() == 2 or (up.dim() == 4 and tuple(up.shape[2:]) == (1, 1))
    down_ok = (down.dim() == 2 and down.shape[1] == cols) or (down.dim() == len(shape) and down.shape[1:] == shape[1:])
    if not (up_ok and down_ok and up.shape[0] == rows and up.shape[1] == rank):
        raise ShapeMismatchError(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)} do not fit a weight "
                                 f"of shape {tuple(shape)}; {rule}")
    if rank < 1:
        raise ShapeMismatchError(f"{where}: rank is 0. Fix: drop empty LoRA terms.")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two indices of ``t`` address the same element (expanded or overlapping strides)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    reach = 0  # furthest element offset reachable with the smaller-stride dims
    for stride, size in dims:
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _extent(t: torch.Tensor) -> tuple[str, int, int] | None:
    """(device, first byte, end byte) of the memory ``t`` can touch; None when empty."""
    if t.numel() == 0:
        return None
    last = sum((sz - 1) * st for sz, st in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return str(t.device), start, start + (last + 1) * t.element_size()


def _check_overlaps(items: Sequence[MergeItem]) -> None:
    """No destination may share memory with another destination (tied weights) or with any source."""
    spans = []  # (device, start, end, is_dst, item, role)
    for i, item in enumerate(items):
        tensors = [("dst", item.dst, True), ("w0", item.w0, False)]
        tensors += [(f"LoRA {k} {part}", t, False) for k, (down, up, _) in enumerate(item.loras)
                    for part, t in (("down", down), ("up", up))]
        tensors += [(f"dense {k} W", w, False) for k, (w, _) in enumerate(item.denses)]
        for role, t, is_dst in tensors:
            ext = _extent(t)
            if ext is not None:
                spans.append((*ext, is_dst, i, role))
    spans.sort(key=lambda s: (s[0], s[1]))
    reach_any = reach_dst = None  # the span with the furthest end so far (any / destination), per device
    for span in spans:
        dev, start, end, is_dst = span[:4]
        if reach_any is not None and reach_any[0] != dev:
            reach_any = reach_dst = None
        hit = reach_any if is_dst else reach_dst
        if hit is not None and hit[2] > start:
            _raise_overlap(items, hit, span)
        if reach_any is None or end > reach_any[2]:
            reach_any = span
        if is_dst and (reach_dst is None or end > reach_dst[2]):
            reach_dst = span


def _raise_overlap(items: Sequence[MergeItem], a: tuple, b: tuple) -> None:
    (*_, a_dst, ai, a_role), (*_, b_dst, bi, b_role) = a, b
    if a_dst and b_dst:
        raise KernelError(f"{label(items, ai)} and {label(items, bi)} write overlapping memory (tied or duplicate "
                          "weights). Fix: pass a tied weight once.")
    d, s = (a, b) if a_dst else (b, a)
    raise KernelError(f"the dst of {label(items, d[4])} shares memory with {s[5]} of {label(items, s[4])}; a merge "
                      "must never read what it writes. Fix: keep the pristine base and residuals in separate "
                      "tensors (a memory-mapped file or a `.clone()`).")
