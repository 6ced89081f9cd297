"""The PyTorch merge: the reference the fused kernel must match, and the production path on CPU.

Per weight: an fp32 accumulator on the destination's device starts at ``base_scale·w0``; all LoRA terms go in
as one ``addmm_`` (factors concatenated along the rank, each scale folded into its ``up`` in fp32); dense terms
add ``a·(W − w0)``; one ``copy_`` rounds to nearest-even into ``dst`` (an fp32 ``dst`` is the accumulator
itself). A 16-bit weight is merged in row blocks of about 16 MiB through one reused fp32 buffer, so the memory a
merge adds is that buffer plus one weight's factors.
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
    scratch = _Scratch()
    with torch.no_grad():
        for item, (rows, cols) in zip(items, dims):
            _merge_one(item, rows, cols, scratch)
            if after is not None:
                after(item)


BLOCK_BYTES = 16 << 20  # fp32 accumulator per row block of a 16-bit weight (1% of an fp16 SD1.5 UNet)


class _Scratch:
    """One fp32 accumulator per device, reused by every row block of every 16-bit weight (a fresh buffer per
    weight would also cost a page fault per 4 KiB)."""

    def __init__(self):
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def block(self, rows: int, cols: int, device: torch.device, *, whole: bool = False) -> torch.Tensor:
        """An fp32 ``(block_rows, cols)`` matrix of about ``BLOCK_BYTES`` (all ``rows`` when ``whole``)."""
        block_rows = rows if whole else min(rows, max(1, BLOCK_BYTES // (4 * cols)))
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < block_rows * cols:
            buf = self._buffers[device] = torch.empty(block_rows * cols, dtype=torch.float32, device=device)
        return buf[: block_rows * cols].view(block_rows, cols)


def _merge_one(item: MergeItem, rows: int, cols: int, scratch: _Scratch) -> None:
    dev = item.dst.device
    w0 = item.w0.reshape(rows, cols)
    up = down = None
    if item.loras:
        ups = [u.reshape(rows, -1).to(dev, torch.float32) * float(s) for _, u, s in item.loras]
        downs = [d.reshape(-1, cols).to(dev, torch.float32) for d, _, _ in item.loras]
        up, down = (torch.cat(ups, 1), torch.cat(downs, 0)) if len(ups) > 1 else (ups[0], downs[0])
    denses = [(w.reshape(rows, cols), float(a)) for w, a in item.denses]
    dst = _matrix(item.dst, rows, cols)
    if dst is not None and dst.dtype == torch.float32:  # its own accumulator: same bits, one pass less
        _accumulate(dst, w0, float(item.base_scale), up, down, denses)
        return
    acc = scratch.block(rows, cols, dev, whole=dst is None)
    for r in range(0, rows, acc.shape[0]):
        e = min(rows, r + acc.shape[0])
        block = acc[: e - r]
        _accumulate(block, w0[r:e], float(item.base_scale), None if up is None else up[r:e], down,
                    [(w[r:e], a) for w, a in denses])
        if dst is not None:
            dst[r:e].copy_(block)  # the one rounding, to nearest-even
    if dst is None:  # strides that admit no 2-D view: one block of all rows
        item.dst.copy_(acc.view(item.dst.shape))


def _accumulate(acc, w0, base_scale: float, up, down, denses) -> None:
    """``acc = base_scale·w0 + up@down + Σ a·(W − w0)`` in fp32, in that order."""
    acc.copy_(w0)
    if base_scale != 1.0:
        acc.mul_(base_scale)
    if up is not None:
        acc.addmm_(up, down)
    for w, a in denses:
        diff = w.to(acc.device, torch.float32, copy=True)
        diff.sub_(w0.to(acc.device))  # in fp32: sub_ promotes a 16-bit w0 exactly
        acc.add_(diff, alpha=a)


def _matrix(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    """``t`` as a ``(rows, cols)`` view of its own storage, or None when its strides do not allow one."""
    try:
        return t.view(rows, cols)
    except RuntimeError:
        return None
