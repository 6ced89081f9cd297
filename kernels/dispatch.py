"""Backend choice: the fused Triton kernel for CUDA tensors, the PyTorch reference otherwise."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Literal

from weightlab.kernels.items import KernelError, MergeItem, check_items
from weightlab.kernels.reference import run_reference

Backend = Literal["auto", "triton", "torch"]


class MergePlan:
    """A checked merge, ready to run: `prepare` validates and builds work tables, `run` writes.

    Running a plan again recomputes from the pristine ``w0``, so it writes the same bits again (that is what
    the GPU benchmark times). The plan keeps every tensor alive; don't reallocate their storage in between.
    """

    def __init__(self, backend: str, run, num_launches: int = 0):
        self.backend = backend  # "triton" or "torch"
        self.num_launches = num_launches  # Triton kernel launches per run (0 on the PyTorch path)
        self._run = run

    def run(self) -> None:
        """Write every destination (asynchronously on CUDA, like any kernel launch)."""
        self._run()


def prepare(items: Sequence[MergeItem], *, backend: Backend = "auto", block_m: int = 64, block_n: int = 128,
            block_r: int = 16, num_warps: int = 4, after: Callable[[MergeItem], None] | None = None) -> MergePlan:
    """Validate ``items`` and build what `MergePlan.run` executes; nothing is written here.

    Args:
        items (Sequence[MergeItem]): the weights to merge.
        backend (str): ``"auto"`` (Triton when every tensor is on CUDA and Triton imports, else PyTorch),
            ``"triton"`` or ``"torch"``. Default ``"auto"``.
        block_m, block_n, block_r, num_warps (int): Triton tile shape (rows, cols, rank step ≥ 16) and warps.
        after (callable | None): PyTorch path only: ``after(item)`` runs as soon as that item is written (the
            engine drops the memory-mapped pages the item read). Triton reads device memory and never calls it.

    Returns:
        MergePlan: call ``.run()``.

    Example:
        >>> prepare(items, backend="triton").run()   # doctest: +SKIP
    """
    dims = check_items(items)
    chosen = _choose(items, backend)
    if chosen == "torch":
        return MergePlan("torch", lambda: run_reference(items, dims, after))
    from weightlab.kernels.triton_merge import TritonPlan

    plan = TritonPlan(items, dims, block_m=block_m, block_n=block_n, block_r=block_r, num_warps=num_warps)
    return MergePlan("triton", plan.run, plan.num_launches)


def merge(items: Sequence[MergeItem], *, backend: Backend = "auto",
          after: Callable[[MergeItem], None] | None = None) -> None:
    """Merge every item in place: ``dst = round_once(base_scale·w0 + Σ s·up@down + Σ a·(W − w0))``.

    Accumulates in fp32 in the order given (base, LoRA terms, dense terms) and rounds once, to nearest-even,
    into ``dst``'s dtype. Everything is validated before anything is written.

    Args:
        items (Sequence[MergeItem]): the weights to merge.
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"`` (see `prepare`). Default ``"auto"``.
        after (callable | None): called with each item once written, PyTorch path only (see `prepare`).

    Raises:
        KernelError, ShapeMismatchError, NonFiniteError: a broken rule, before any write.

    Example:
        >>> merge([MergeItem(dst=lin.weight, w0=w0, loras=[(down, up, 0.5)])])   # doctest: +SKIP
    """
    prepare(items, backend=backend, after=after).run()


def triton_available() -> bool:
    """True when Triton is installed (whether a GPU is present is a separate question)."""
    return importlib.util.find_spec("triton") is not None


def _choose(items: Sequence[MergeItem], backend: str) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise KernelError(f"backend={backend!r} is not one of 'auto', 'triton', 'torch'. Fix: pick one of those.")
    if backend == "triton" and not triton_available():
        raise KernelError("backend='triton' but Triton is not installed. Fix: `pip install triton`, or use 'auto'.")
    if backend != "auto":
        return backend
    on_cuda = all(t.is_cuda for item in items for t in _tensors(item))
    return "triton" if items and on_cuda and triton_available() else "torch"


def _tensors(item: MergeItem):
    yield item.dst
    yield item.w0
    for down, up, _ in item.loras:
        yield down
        yield up
    for w, _ in item.denses:
        yield w
