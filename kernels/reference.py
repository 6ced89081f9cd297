"""The PyTorch merge: the reference the fused kernel must match, and the production path on CPU.

Per weight: an fp32 accumulator on the destination's device starts at ``base_scale·w0``; all LoRA terms go in
as one ``addmm_`` (factors concatenated along the rank, each scale folded into its ``up`` in fp32); dense terms
add ``a·(W − w0)``; one ``copy_`` rounds to nearest-even into ``dst`` (an fp32 ``dst`` is the accumulator
itself). Memory: one fp32 accumulator as large as the largest 16-bit weight, reused for every weight of a call
(a fresh buffer per weight would cost a page fault per 4 KiB each time), plus each weight's factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from weightlab.kernels.items import MergeItem, check_items


def merge_reference(items: Sequence[MergeItem]) -> None:
    """Merge with PyTorch ops, in place; validates every item before writing any.

    Args:
        items (Sequence[MergeItem]): the weights to merge; sources may live on another device than ``dst``.

    Example:
        >>> merge_reference([MergeItem(dst=lin.weight, w0=w0, loras=[(down, up, 0.5)])])   # doctest: +SKIP
    """
    run_reference(items, check_items(items))


def run_reference(items: Sequence[MergeItem], dims: Sequence[tuple[int, int]],
                  after: Callable[[MergeItem], None] | None = None) -> None:
    """Merge already-checked items; ``dims`` are their 2-D shapes from `check_items`.

    ``after(item)`` runs as soon as an item is written (the engine drops the file pages it read there).
    """
    scratch = _Scratch(items, dims)
    with torch.no_grad():
        for item, (rows, cols) in zip(items, dims):
            _merge_one(item, rows, cols, scratch)
            if after is not None:
                after(item)


class _Scratch:
    """One fp32 accumulator per device, sized for the largest item that needs one."""

    def __init__(self, items: Sequence[MergeItem], dims: Sequence[tuple[int, int]]):
        self._need: dict[torch.device, int] = {}
        for item, (rows, cols) in zip(items, dims):
            if _fp32_matrix(item.dst, rows, cols) is None:
                self._need[item.dst.device] = max(self._need.get(item.dst.device, 0), rows * cols)
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def get(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        if device not in self._buffers:
            self._buffers[device] = torch.empty(self._need[device], dtype=torch.float32, device=device)
        return self._buffers[device][: rows * cols].view(rows, cols)


def _merge_one(item: MergeItem, rows: int, cols: int, scratch: _Scratch) -> None:
    dev = item.dst.device
    acc = _fp32_matrix(item.dst, rows, cols)  # an fp32 dst is its own accumulator: same bits, one pass less
    if acc is None:
        acc = scratch.get(rows, cols, dev)
    acc.copy_(item.w0.reshape(rows, cols))
    if float(item.base_scale) != 1.0:
        acc.mul_(float(item.base_scale))
    if item.loras:
        ups = [up.reshape(rows, -1).to(dev, torch.float32) * float(s) for _, up, s in item.loras]
        downs = [down.reshape(-1, cols).to(dev, torch.float32) for down, _, _ in item.loras]
        acc.addmm_(torch.cat(ups, 1) if len(ups) > 1 else ups[0], torch.cat(downs, 0) if len(downs) > 1 else downs[0])
    if item.denses:
        w0 = item.w0.reshape(rows, cols).to(dev)
        for w, a in item.denses:
            diff = w.reshape(rows, cols).to(dev, torch.float32, copy=True)
            diff.sub_(w0)  # in fp32: sub_ promotes a 16-bit w0 exactly
            acc.add_(diff, alpha=float(a))
    if acc.data_ptr() != item.dst.data_ptr():
        item.dst.copy_(acc.view(item.dst.shape))


def _fp32_matrix(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    if t.dtype != torch.float32:
        return None
    try:
        return t.view(rows, cols)
    except RuntimeError:
        return None
