"""Every host check fires before anything is written, on both backends, with a message that says what to do."""

import pytest
import torch

from weightlab.errors import NonFiniteError, ShapeMismatchError, WeightlabError
from weightlab.kernels import KernelError, MergeItem, merge, prepare
from weightlab.kernels.conformance import Case


def _good():
    return Case("good", (16, 32), (4,), denses=1).item(torch.float16, seed=1)


def _bad_cases():
    """(id, build items → list[MergeItem], error type, message fragment); the bad item is always last."""
    def one(**kw):
        base = Case("bad.weight", (16, 32), (4,)).item(torch.float16, seed=2)
        fields = dict(dst=base.dst, w0=base.w0, loras=base.loras, denses=[], base_scale=1.0, name="bad.weight")
        fields.update(kw)
        return lambda: [_good(), MergeItem(**fields)]

    g = torch.Generator().manual_seed(0)
    r = lambda *s, dt=torch.float16: torch.randn(s, generator=g).to(dt)  # noqa: E731
    shared = torch.zeros(64, 32, dtype=torch.float16)

    def tied():
        a = _good()
        return [a, MergeItem(a.dst, a.w0.clone(), name="bad.weight")]

    def overlapping_views():
        return [MergeItem(shared[:40], r(40, 32), name="a"), MergeItem(shared[32:], r(32, 32), name="bad.weight")]

    def dst_is_other_items_source():
        a = _good()
        return [a, MergeItem(a.w0, r(16, 32), name="bad.weight")]

    return [
        ("w0_shape", one(w0=r(16, 31)), ShapeMismatchError, "w0 has shape"),
        ("dense_shape", one(denses=[(r(32, 16), 1.0)]), ShapeMismatchError, "dense term 0"),
        ("rank_mismatch", one(loras=[(r(4, 32), r(16, 3), 1.0)]), ShapeMismatchError, "do not fit"),
        ("swapped_factors", one(loras=[(r(16, 4), r(4, 32), 1.0)]), ShapeMismatchError, "(down, up, scale)"),
        ("lora_on_bias", one(dst=r(16), w0=r(16), loras=[(r(2, 16), r(16, 2), 1.0)]), ShapeMismatchError, "biases"),
        ("float64", one(w0=r(16, 32, dt=torch.float64)), KernelError, "float16, bfloat16 or float32"),
        ("int_dst", one(dst=torch.zeros(16, 32, dtype=torch.int32)), KernelError, "dtype torch.int32"),
        ("not_a_tensor", one(w0=[[0.0] * 32] * 16), KernelError, "not a torch.Tensor"),
        ("meta", one(w0=torch.empty(16, 32, device="meta", dtype=torch.float16)), KernelError, "materialise"),
        ("nan_scale", one(loras=[(r(4, 32), r(16, 4), float("nan"))]), NonFiniteError, "finite"),
        ("inf_base_scale", one(base_scale=float("inf")), NonFiniteError, "base_scale"),
        ("expanded_dst", one(dst=torch.zeros(1, 32, dtype=torch.float16).expand(16, 32)), KernelError, "expanded"),
        ("dst_aliases_w0", lambda: [_good(), (lambda t: MergeItem(t, t[:], name="bad.weight"))(r(16, 32))],
         KernelError, "shares memory with w0"),
        ("dst_aliases_factor", lambda: [_good(), (lambda t: MergeItem(t, r(16, 32), [(r(4, 32), t[:, :4], 1.0)],
                                                                      name="bad.weight"))(r(16, 32))],
         KernelError, "LoRA 0 up"),
        ("dst_is_a_source", dst_is_other_items_source, KernelError, "shares memory"),
        ("tied_dst", tied, KernelError, "pass a tied weight once"),
        ("overlapping_dsts", overlapping_views, KernelError, "overlapping memory"),
    ]


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_check_fires_and_writes_nothing(case, backend):
    _, build, error, fragment = case
    items = build()
    before = [it.dst.clone() if isinstance(it.dst, torch.Tensor) else None for it in items]
    with pytest.raises(error) as info:
        merge(items, backend=backend)
    assert isinstance(info.value, WeightlabError)
    assert fragment in str(info.value)
    assert "Fix:" in str(info.value)
    assert "bad.weight" in str(info.value) or "item 1" in str(info.value)
    for it, b in zip(items, before):
        assert torch.equal(it.dst.view(torch.int16) if it.dst.dtype != torch.float32 else it.dst,
                           b.view(torch.int16) if b.dtype != torch.float32 else b), "a destination was written"


def test_triton_only_checks():
    conv = torch.zeros(8, 4, 3, 3, dtype=torch.float16).to(memory_format=torch.channels_last)
    item = MergeItem(conv, torch.zeros(8, 4, 3, 3), [(torch.ones(2, 4, 3, 3), torch.ones(8, 2, 1, 1), 1.0)], name="c")
    with pytest.raises(KernelError, match="channels_last"):
        prepare([item], backend="triton")
    merge([item], backend="torch")  # the PyTorch path handles any layout
    assert (conv == 2).all()
    with pytest.raises(KernelError, match="K ≥ 16"):
        prepare([_good()], backend="triton", block_r=8)
    with pytest.raises(KernelError, match="backend="):
        merge([_good()], backend="cuda")
