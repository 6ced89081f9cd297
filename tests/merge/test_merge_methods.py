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


# Keys of the tiny UNet: LoRA style + dense style + accel (linear and conv), dense style + accel, dense style only.
ENGINE_KEYS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", "up_blocks.1.resnets.0.conv1.weight",
               "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight", "conv_in.weight")


@pytest.fixture(scope="module")
def engine_terms(tiny, kohya_delta64):
    """The recipe's terms, and per key the fp64 inputs of Eq. 2 read straight from the files: w0 (diffusers folder),
    the two scaled style deltas (in the engine's canonical term order: kind, then source), the scaled accel delta.

    The dense style is an LDM single file: diffusers' own converter gives its diffusers keys."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    alpha, beta = 0.5, 1.0
    terms = [Term(source=str(tiny.style_lora_kohya), kind="style", scale=alpha),
             Term(source=str(tiny.style_dense), kind="style", scale=alpha),
             Term(source=str(tiny.accel_lora), kind="image_accel", scale=beta)]
    w0 = load_file(tiny.base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    config = UNet2DConditionModel.load_config(tiny.base_dir / "unet")
    dense = convert_ldm_unet_checkpoint(load_file(tiny.style_dense), config)
    style_lora, accel = load_file(tiny.style_lora_kohya), load_file(tiny.accel_lora)

    inputs = {}
    for key in ENGINE_KEYS:
        base = w0[key].double()
        by_source = {str(tiny.style_dense): dense[key].double() - base,
                     str(tiny.style_lora_kohya): kohya_delta64(style_lora, key, base.shape)}
        styles = [alpha * d for _, d in sorted(by_source.items()) if d is not None]
        acc = kohya_delta64(accel, key, base.shape)
        inputs[key] = (base, styles, beta * acc if acc is not None else torch.zeros_like(base))
    assert [len(inputs[k][1]) for k in ENGINE_KEYS] == [2, 2, 1, 1]
    assert [bool(inputs[k][2].any()) for k in ENGINE_KEYS] == [True, True, True, False]
    return terms, inputs


def _ties64(deltas, density):
    """TIES-merging (Yadav et al. 2023, Alg. 1) in fp64: keep each delta's top-k magnitudes, elect the sign of the
    summed trimmed mass, average the kept entries that agree with it."""
    flat = [d.flatten() for d in deltas]
    k = max(1, round(density * flat[0].numel()))
    trimmed = torch.stack([torch.zeros_like(f).scatter(0, f.abs().topk(k).indices, f.gather(0, f.abs().topk(k).indices))
                           for f in flat])
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    mean = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return mean.reshape(deltas[0].shape)


def _dare_masks(key, seed, density, shapes):
    """The engine's documented DARE draws: one CPU generator per tensor, seeded with the first 8 bytes (little-endian,
    top bit cleared) of sha256(f"{seed}:{key}"), one ``torch.rand(shape)`` per delta in term order; kept: draw < density."""
    import hashlib

    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
                                      & ((1 << 63) - 1))
    return [torch.rand(shape, generator=g) < density for shape in shapes]


def _svd64(deltas, rank):
    """Best rank-``rank`` approximation (Eckart–Young) of the summed delta, as a 2-D [out, in·k·k] matrix, in fp64."""
    total = torch.stack(deltas).sum(0)
    u, s, vh = torch.linalg.svd(total.reshape(total.shape[0], -1), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(total.shape)


@pytest.mark.parametrize("method, args", [("ties", {"density": 0.3}), ("dare", {"density": 0.5, "seed": 3}),
                                          ("svd", {"rank": 2})])
def test_methods_through_the_engine_match_fp64_math(tiny, engine_terms, method, args):
    """w' = w0 + method([α·ΔW_style, …]) + β·ΔW_accel, the method done here in fp64 from its definition.

    Tolerance: the engine works in fp32 (the LoRA products, the combine, one accumulator) and rounds once: a few fp32
    ULPs of the largest term. 8·eps32 of the key's largest magnitude covers that; a wrong trim, sign, mask, rescale
    or rank moves whole entries by a delta's size (~1e-2 of the weight scale or more)."""
    terms, inputs = engine_terms
    merged = build_unet(Recipe(base=str(tiny.base_dir), terms=terms, method=method, method_args=args)).state_dict()
    for key, (w0, styles, accel) in inputs.items():
        if method == "ties":
            combined = _ties64(styles, args["density"])
        elif method == "dare":
            masks = _dare_masks(key, args["seed"], args["density"], [d.shape for d in styles])
            assert all(0.4 < m.double().mean() < 0.6 for m in masks)  # the draws keep about `density`
            combined = sum(torch.where(m, d, 0.0) for m, d in zip(masks, styles)) / args["density"]
        else:
            combined = _svd64(styles, args["rank"])
        ref = w0 + combined + accel
        scale = max(t.abs().max().item() for t in (ref, w0, accel, *styles))
        err = (merged[key].double() - ref).abs().max().item()
        assert err <= 8 * torch.finfo(torch.float32).eps * scale, (method, key, err, scale)
        if method == "dare":  # where every delta was dropped the weight is w0 + accel alone
            dropped = ~torch.stack(masks).any(0)
            assert dropped.any()
            torch.testing.assert_close(merged[key][dropped].double(), (w0 + accel)[dropped], rtol=0,
                                       atol=8 * torch.finfo(torch.float32).eps * scale)


def test_full_rank_svd_is_linear_and_methods_need_style_terms(tiny, engine_terms):
    terms, _ = engine_terms
    linear = build_unet(Recipe(base=str(tiny.base_dir), terms=terms)).state_dict()
    wide_svd = build_unet(Recipe(base=str(tiny.base_dir), terms=terms, method="svd", method_args={"rank": 4096})).state_dict()
    # Same sums in another association (combined delta first, then accel): a few fp32 ULPs of the weights.
    assert max((linear[k] - wide_svd[k]).abs().max().item() for k in linear) < 1e-5
    with pytest.raises(RecipeError):
        build_unet(Recipe(base=str(tiny.base_dir), terms=terms[2:], method="ties"))


def test_a_registered_method_can_be_named_in_a_recipe(tiny, engine_terms, monkeypatch):
    """A method registered with ``@method`` is a valid recipe method, and the engine runs it: here the element-wise
    mean of the style deltas, against fp64 math (tolerance as in the test above: a few fp32 ULPs of the largest term;
    running another method would move entries by a whole delta)."""
    from weightlab import methods

    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))  # the registration ends with this test

    @methods.method("mean")
    def mean(deltas, *, key):
        return torch.stack(deltas).mean(0)

    terms, inputs = engine_terms
    merged = build_unet(Recipe(base=str(tiny.base_dir), terms=terms, method="mean")).state_dict()
    for key, (w0, styles, accel) in inputs.items():
        ref = w0 + torch.stack(styles).mean(0) + accel
        scale = max(t.abs().max().item() for t in (ref, w0, accel, *styles))
        assert (merged[key].double() - ref).abs().max().item() <= 8 * torch.finfo(torch.float32).eps * scale, key
    with pytest.raises(RecipeError, match="did you mean 'mean'"):
        Recipe.from_dict({"base": str(tiny.base_dir), "method": "maen"})
    with pytest.raises(ValueError, match="already registered"):
        methods.method("mean")(mean)
