"""Conformance cases and tolerances for merge backends; shared by the CPU tests and the GPU benchmark.

Two fp32 paths that sum the same terms in different orders agree only to within their rounding error, so
"exact" needs care. With ``S = |bs·w0| + Σ|s|·|up|@|down| + Σ|a|·(|W| + |w0|)`` (every partial sum is bounded
by it), each path's fp32 accumulator is within ``ε = c·u·S`` of the exact value ``E``, where ``u = 2⁻²⁴`` and
``c = 2R + 2·n_lora + 3·n_dense + 4`` counts the roundings along an element's chain (``R``: total rank; one per
product, per addition, per scale multiply, per ``W − w0``). Hence:

- fp32 destinations: ``|kernel − reference| ≤ 2ε`` (not bitwise: the summation orders differ).
- fp16/bf16 destinations: equal bits, except where a rounding midpoint lies within ``ε`` of ``E`` (the two fp32
  accumulators may straddle it); there both results are correct roundings of values within ``ε`` of ``E``:
  ``|out − E| ≤ ½ulp(out) + ε``. Normally that is a one-ULP tie flip; where cancellation makes ``ε`` larger than
  an ULP (results much smaller than ``S``, e.g. subnormals) it can be a few ULPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightlab.kernels.items import MergeItem, matrix_shape

U32 = 2.0**-24
_PRECISION = {torch.float16: (11, -14), torch.bfloat16: (8, -126), torch.float32: (24, -126)}  # (bits, emin)


@dataclass(frozen=True)
class Case:
    """A merge to check: one weight of ``shape`` with LoRAs of ``ranks``, ``denses`` dense terms, ``base_scale``.

    ``scales`` defaults to alternating-sign scales; ``w0_dtype`` / ``factor_dtype`` default to the destination's.
    """

    name: str
    shape: tuple[int, ...]
    ranks: tuple[int, ...] = ()
    denses: int = 0
    base_scale: float = 1.0
    scales: tuple[float, ...] | None = None
    w0_dtype: torch.dtype | None = None
    factor_dtype: torch.dtype | None = None

    def item(self, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0) -> MergeItem:
        """A `MergeItem` with random values; its ``dst`` is poisoned with NaN (every element must be written)."""
        g = torch.Generator().manual_seed(seed)
        rows = self.shape[0]
        fdt = self.factor_dtype or dtype

        def rand(*shape, std=1.0, dt=dtype):
            return (std * torch.randn(shape, generator=g)).to(device=device, dtype=dt)

        scales = self.scales or tuple((0.8 if k % 2 == 0 else -0.6) * (k + 1) for k in range(len(self.ranks)))
        loras = []
        for r, s in zip(self.ranks, scales):
            down = rand(r, *self.shape[1:], std=r**-0.5, dt=fdt)
            up = rand(rows, r, 1, 1, dt=fdt) if len(self.shape) == 4 else rand(rows, r, dt=fdt)
            loras.append((down, up, s))
        denses = [(rand(*self.shape, dt=self.w0_dtype or dtype), 0.5 - 0.3 * k) for k in range(self.denses)]
        dst = torch.full(self.shape, float("nan"), dtype=dtype, device=device)
        return MergeItem(dst, rand(*self.shape, dt=self.w0_dtype or dtype), loras, denses, self.base_scale, self.name)


CASES = (
    *(Case(f"rank{r}", (77, 130), (r,)) for r in (1, 4, 8, 16, 17, 128)),
    Case("mixed_ranks", (77, 130), (1, 17, 64, 8)),
    Case("conv3x3", (24, 16, 3, 3), (8, 5)),
    Case("conv1x1", (40, 24, 1, 1), (4,)),
    Case("dense_only", (77, 130), denses=2),
    Case("lora_dense", (77, 130), (16, 3), denses=1),
    Case("negative_scales", (50, 70), (4, 9), scales=(-1.5, -0.25)),
    Case("base_scale", (33, 130), (8,), base_scale=0.37),
    Case("gamma_only", (64, 32), base_scale=-0.5),
    Case("bias_dense", (130,), denses=1, base_scale=0.5),
    Case("fp32_w0_fp16_factors", (77, 130), (16, 4), denses=1, w0_dtype=torch.float32, factor_dtype=torch.float16),
)


def exact_value(item: MergeItem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, S)`` in float64 on the CPU, shaped like ``dst``: the exact merge and its absolute-value sum.

    Scales are rounded to fp32 first, as both backends use them.
    """
    rows, cols = matrix_shape(item.dst.shape)

    def f64(t, *shape):
        return t.detach().to("cpu", torch.float64).reshape(*shape)

    def f32(x):
        return float(torch.tensor(float(x), dtype=torch.float32))

    w0 = f64(item.w0, rows, cols)
    bs = f32(item.base_scale)
    exact, absum = bs * w0, abs(bs) * w0.abs()
    for down, up, s in item.loras:
        d, u = f64(down, -1, cols), f64(up, rows, -1)
        exact = exact + f32(s) * (u @ d)
        absum = absum + abs(f32(s)) * (u.abs() @ d.abs())
    for w, a in item.denses:
        w = f64(w, rows, cols)
        exact = exact + f32(a) * (w - w0)
        absum = absum + abs(f32(a)) * (w.abs() + w0.abs())
    return exact.reshape(item.dst.shape), absum.reshape(item.dst.shape)


def error_bound(item: MergeItem, absum: torch.Tensor) -> torch.Tensor:
    """``ε = c·u·S``: how far one fp32 path's accumulator may be from the exact value (module docstring)."""
    rank = sum(down.shape[0] for down, _, _ in item.loras)
    c = 2 * rank + 2 * len(item.loras) + 3 * len(item.denses) + 4
    return c * U32 * absum


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values at ``|x|`` (float64), subnormals included."""
    bits, emin = _PRECISION[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**emin)))
    return torch.exp2(e - (bits - 1))


def compare_to_reference(out: torch.Tensor, ref: torch.Tensor, item: MergeItem, slack: float = 1.0) -> str:
    """Check a backend's result against the PyTorch path's; ``""`` if it conforms, else what went wrong.

    ``slack`` widens ε for hardware whose fp32 accumulation is not round-to-nearest (tensor cores).
    """
    exact, absum = exact_value(item)
    eps = slack * error_bound(item, absum)
    o, r = out.detach().cpu(), ref.detach().cpu()
    if o.isnan().any():
        return f"{item.name}: {int(o.isnan().sum())} elements not written (NaN poison left)"
    o64, r64 = o.double(), r.double()
    if out.dtype == torch.float32:
        bad = (o64 - r64).abs() > 2 * eps
        return f"{item.name}: {int(bad.sum())} fp32 elements differ by more than 2ε" if bad.any() else ""
    differ = o64 != r64  # by value: +0 and -0 are the same weight
    rounded = ((o64 - exact).abs() <= ulp(o64, out.dtype) / 2 + eps) & (
        (r64 - exact).abs() <= ulp(r64, out.dtype) / 2 + eps)
    bad = differ & ~rounded
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        return (f"{item.name}: {int(bad.sum())} of {o.numel()} {out.dtype} elements differ from the reference "
                f"beyond rounding the same value within ε (first: flat index {i}, got {o.flatten()[i].item()}, "
                f"reference {r.flatten()[i].item()}, exact {exact.flatten()[i].item()})")
    return ""


def compare_to_exact(out: torch.Tensor, item: MergeItem, ulps: float = 0.5, slack: float = 1.0) -> str:
    """Check ``|out − E| ≤ ulps·ulp(out) + slack·ε``; ``""`` if it holds, else what went wrong."""
    exact, absum = exact_value(item)
    o = out.detach().cpu().double()
    if o.isnan().any():
        return f"{item.name}: {int(o.isnan().sum())} elements not written (NaN poison left)"
    limit = ulps * ulp(o, out.dtype) + slack * error_bound(item, absum)
    bad = (o - exact).abs() > limit
    if bad.any():
        worst = float(((o - exact).abs() / limit).max())
        return f"{item.name}: {int(bad.sum())} elements off the exact value by up to {worst:.2f}× the limit"
    return ""

