"""Fused merge kernels: ``dst = round_once(base_scale·w0 + Σ s·up@down + Σ a·(W − w0))``, in place.

`merge` picks the Triton kernel for CUDA tensors and the PyTorch reference otherwise; both accumulate in fp32
and round once to nearest-even. Triton is imported only when the kernel is used; set ``TRITON_INTERPRET=1``
before that to run the kernel on CPU tensors (tests).

Example:
    >>> from weightlab.kernels import MergeItem, merge
    >>> merge([MergeItem(dst=lin.weight, w0=w0, loras=[(down, up, 0.5)])])   # doctest: +SKIP
"""

from weightlab.kernels.dispatch import MergePlan, merge, prepare, triton_available
from weightlab.kernels.items import KernelError, MergeItem
from weightlab.kernels.reference import merge_reference

__all__ = ["KernelError", "MergeItem", "MergePlan", "merge", "merge_reference", "prepare", "triton_available"]
