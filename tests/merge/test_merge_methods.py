"""Combine methods against hand-computed values, and through the engine."""

import pytest
import torch

from weightlab import Recipe, Term
from weightlab.errors import RecipeError
from weightlab.merge import build_unet
from weightlab.methods import dare, svd, ties


def test_ties_trims_elects_sign_and_takes_disjoint_mean():
    a = torch.tensor([[4.0, -1.0, 0.5, 3.0]])
    b = torch.tensor([[2.0, 2.0, -0.1, -1.0]])
    # density 0.5 keeps the top-2 magnitudes of each: a -> [4, 0, 0, 3], b -> [2, 2, 0, 0]
    # signs by summed mass: [+, +, 0, +]; disjoint means: [3, 2, 0, 3]
    assert torch.equal(ties([a, b], key="k", density=0.5), torch.tensor([[3.0, 2.0, 0.0, 3.0]]))


def test_dare_is_seeded_unbiased_and_density_one_is_a_sum():
    d = [torch.ones(200, 200), 2 * torch.ones(200, 200)]
    assert torch.equal(dare(d, key="k", density=1.0), 3 * torch.ones(200, 200))
    x = dare(d, key="k", density=0.5, seed=1)
    assert torch.equal(x, dare(d, key="k", density=0.5, seed=1))
    assert not torch.equal(x, dare(d, key="other", density=0.5, seed=1))
    assert abs(x.mean().item() - 3.0) < 0.05  # rescaling by 1/density keeps the expectation
    with pytest.raises(RecipeError):
        dare(d, key="k", density=0.0)


def test_svd_rerank_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(8, 3, generator=g) @ torch.randn(3, 6, generator=g) for _ in range(2)]
    total = deltas[0] + deltas[1]
    assert torch.allclose(svd(deltas, key="k", rank=6), total, atol=1e-6)  # full rank: unchanged
    r2 = svd(deltas, key="k", rank=2)
    assert torch.linalg.matrix_rank(r2).item() == 2
    s = torch.linalg.svdvals(total.double())
    assert abs(torch.linalg.norm(total - r2).item() - s[2:].norm().item()) < 1e-5  # Eckart–Young


def test_methods_run_through_the_engine(tiny):
    terms = [Term(source=str(tiny.style_lora_kohya), kind="style", scale=0.5),
             Term(source=str(tiny.style_dense), kind="style", scale=0.5),
             Term(source=str(tiny.accel_lora), kind="image_accel")]
    linear = build_unet(Recipe(base=str(tiny.base_dir), terms=terms)).state_dict()
    wide_svd = build_unet(Recipe(base=str(tiny.base_dir), terms=terms, method="svd", method_args={"rank": 4096})).state_dict()
    assert max((linear[k] - wide_svd[k]).abs().max().item() for k in linear) < 1e-5  # full-rank svd == linear
    for method, args in (("ties", {"density": 0.3}), ("dare", {"density": 0.5, "seed": 0}), ("svd", {"rank": 2})):
        merged = build_unet(Recipe(base=str(tiny.base_dir), terms=terms, method=method, method_args=args)).state_dict()
        assert any(not torch.equal(merged[k], linear[k]) for k in linear), method
        assert all(torch.isfinite(v).all() for v in merged.values())
    with pytest.raises(RecipeError):
        build_unet(Recipe(base=str(tiny.base_dir), terms=terms[2:], method="ties"))
