"""The PyTorch path (`backend="torch"`) against a straightforward float64 computation."""

import pytest
import torch

from weightlab.kernels import MergeItem, merge, merge_reference, prepare
from weightlab.kernels.conformance import CASES, Case, compare_to_exact


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_cases_round_once_from_exact(dtype):
    items = [case.item(dtype, seed=k) for k, case in enumerate(CASES)]
    merge(items, backend="torch")
    problems = [compare_to_exact(it.dst, it) for it in items]
    assert not any(problems), "\n".join(p for p in problems if p)


def test_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    d1, u1 = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    d2, u2 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    expect = 0.5 * w0 + 0.75 * u1 @ d1 - 1.25 * u2 @ d2 + 0.375 * (w - w0)
    dst = torch.empty(6, 5)
    f = torch.Tensor.float
    merge_reference([MergeItem(dst, f(w0), [(f(d1), f(u1), 0.75), (f(d2), f(u2), -1.25)], [(f(w), 0.375)], 0.5)])
    torch.testing.assert_close(dst.double(), expect, rtol=1e-6, atol=1e-6)


def test_rounds_once_to_nearest_even():
    """1 + 2⁻⁸ is a bf16 tie (→ 1.0, even); summed in two halves it must not round twice."""
    dst = torch.empty(1, 16, dtype=torch.bfloat16)
    w0 = torch.ones(1, 16, dtype=torch.float32)
    down = torch.full((1, 16), 2.0**-9)
    merge([MergeItem(dst, w0, [(down, torch.ones(1, 1), 1.0), (down, torch.ones(1, 1), 1.0)])], backend="torch")
    assert (dst == 1.0).all()
    merge([MergeItem(dst, w0, [(down, torch.ones(1, 1), 3.0)])], backend="torch")  # 1 + 3·2⁻⁹: above the tie
    assert (dst.float() == 1.0 + 2.0**-7).all()


def test_auto_uses_torch_on_cpu_and_empty_is_a_no_op():
    item = Case("a", (8, 8), (2,)).item(torch.float32)
    assert prepare([item]).backend == "torch"
    merge([])
    merge([item])
    assert not item.dst.isnan().any()


def test_sources_unchanged():
    item = Case("a", (20, 24), (4,), denses=1).item(torch.bfloat16)
    before = [t.clone() for t in (item.w0, item.loras[0][0], item.loras[0][1], item.denses[0][0])]
    merge([item], backend="torch")
    after = (item.w0, item.loras[0][0], item.loras[0][1], item.denses[0][0])
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_blocks_give_the_bits_of_one_block(dtype, monkeypatch):
    from weightlab.kernels import reference

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(37, 5, 3, 3, generator=g).to(dtype)
    dense = (w0.float() + 0.01 * torch.randn(w0.shape, generator=g)).to(dtype)
    down, up = torch.randn(16, 45, generator=g).to(dtype), torch.randn(37, 16, generator=g).to(dtype)

    def run():
        dst = torch.empty_like(w0)
        reference.merge_reference([MergeItem(dst=dst, w0=w0, loras=[(down, up, 0.7)], denses=[(dense, 0.3)],
                                             base_scale=0.9)])
        return dst

    whole = run()
    expected = 0.9 * w0.float() + 0.7 * (up.float() @ down.float()).view(w0.shape) + 0.3 * (dense.float() - w0.float())
    torch.testing.assert_close(whole.float(), expected, rtol=1e-2, atol=1e-2)  # one 16-bit rounding
    monkeypatch.setattr(reference, "BLOCK_BYTES", 4 * 45 * 8)  # 8 rows per block, the last one partial
    assert torch.equal(run(), whole)
