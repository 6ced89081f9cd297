"""LyCORIS adapters merge exactly as lycoris-lora merges them.

References no one here wrote: lycoris-lora's own network (``create_lycoris`` on the tiny UNet: LoCon with Tucker
``lora_mid``, LoHa, LoHa + Tucker, LoKr with a factored or whole half, both factored, Tucker, both whole, full
``diff``/``diff_b``), saved by its own ``save_weights`` and merged by its own ``merge_to``. The zero-initialised factor is randomised (every factor moved), so every ΔW is live.

alpha/rank: lycoris-lora's forward applies alpha/rank once, as ComfyUI and A1111 do; its ``merge_to`` applies it a
second time for LoHa and LoKr (``get_diff_weight`` rescales ``get_weight``, which is already scaled). The weights a
LyCORIS model was trained with are its forward's, so weightlab follows the forward: the ``merge_to`` cases use
alpha = rank for LoHa/LoKr (where the two agree) and alpha != rank for LoCon, and alpha != rank for LoHa/LoKr is
checked against the UNet's output under LyCORIS's own forward.

Tolerances: fp32, 1e-6 of each weight's largest magnitude (both form ΔW in fp32 and add it to w0 in fp32, in other
orders: a few fp32 ULPs apart); fp16, one fp16 rounding of LyCORIS's fp32 merge plus that fp32 noise.
"""

import copy
import io

import pytest
import torch

from weightlab import Recipe, Term, load
from weightlab.errors import AdapterOptionError, FileFormatError, ShapeMismatchError
from weightlab.inspect import inspect_path
from weightlab.merge import build_unet, merge_to_file
from weightlab.testing import max_rel_error

# name -> (create_lycoris keyword arguments, the algebra weightlab reads it as)
CASES = {
    "locon-tucker": (dict(algo="locon", use_tucker=True, linear_dim=4, linear_alpha=2), "lora"),
    "loha": (dict(algo="loha", linear_dim=4, linear_alpha=4), "loha"),
    "loha-tucker": (dict(algo="loha", use_tucker=True, linear_dim=4, linear_alpha=4), "loha"),
    "lokr-w2-factored": (dict(algo="lokr", factor=2, linear_dim=4, linear_alpha=4), "lokr"),
    "lokr-both-factored": (dict(algo="lokr", decompose_both=True, linear_dim=1, linear_alpha=1), "lokr"),
    "lokr-tucker": (dict(algo="lokr", factor=2, use_tucker=True, linear_dim=4, linear_alpha=4), "lokr"),
    "lokr-whole": (dict(algo="lokr", full_matrix=True, linear_dim=4, linear_alpha=2), "lokr"),
    "full": (dict(algo="full"), "full"),
}


@pytest.fixture(scope="module")
def base_unet(tiny):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny.base_dir / "unet")


def _lycoris(base_unet, path, options: dict, seed: int = 0):
    """LyCORIS's network on a copy of the UNet, every parameter moved as training would, saved by LyCORIS."""
    from lycoris import create_lycoris

    unet = copy.deepcopy(base_unet)
    torch.manual_seed(seed)
    options = dict(options)
    net = create_lycoris(unet, 1.0, options.pop("linear_dim", 4), options.pop("linear_alpha", 1), **options)
    net.apply_to()
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.add_(0.2 * torch.randn(p.shape) if options["algo"] != "full" else 0.02 * torch.randn(p.shape))
    net.save_weights(str(path), torch.float32, None)
    return unet, net


def _merge_to(net) -> None:
    """LyCORIS's own merge into the UNet's fp32 weights (``W + ΔW``, one fp32 rounding; its ``precise=True`` path
    cannot add a conv LoHa's 2-D ΔW). ``restore`` first puts back the layers' own forward (and the original weight,
    which ``full``'s ``apply_to`` takes off the layer)."""
    net.restore()
    net.merge_to(1.0)


def _recipe(tiny, path, **kw) -> Recipe:
    return Recipe(base=str(tiny.base_dir), terms=[Term(source=str(path), kind="style")], **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_lycoris_merge_to(tiny, base_unet, tmp_path, case):
    options, algebra = CASES[case]
    unet, net = _lycoris(base_unet, tmp_path / "lyco.safetensors", options)
    _merge_to(net)
    ref = unet.state_dict()
    ours = build_unet(_recipe(tiny, tmp_path / "lyco.safetensors")).state_dict()
    assert max_rel_error(ref, ours) <= 1e-6
    changed = [k for k, v in base_unet.state_dict().items() if not torch.equal(v, ref[k])]
    assert len(changed) > 50 and (case != "full" or any(k.endswith(".bias") for k in changed))
    assert inspect_path(tmp_path / "lyco.safetensors").algebras == [algebra]
    if algebra != "lora":  # `weightlab inspect`'s table names the algebra next to the representation
        from rich.console import Console

        from weightlab.inspect import inspect_table

        console = Console(width=400, record=True, file=io.StringIO())
        console.print(inspect_table([inspect_path(tmp_path / "lyco.safetensors")]))
        assert f"lora ({algebra})" in console.export_text()
    # weightlab's own save keeps the algebra: the reloaded file gives the same ΔW.
    lyco = load(tmp_path / "lyco.safetensors")
    again = load(lyco.save(tmp_path / "again.safetensors"))
    path, t = next((p, t) for p, t in lyco.targets.items() if p.endswith("conv1"))
    assert torch.equal(again.targets[path].delta(ref[f"{path}.weight"].shape), t.delta(ref[f"{path}.weight"].shape))


@pytest.mark.parametrize("case", ["loha-tucker", "lokr-w2-factored", "lokr-tucker"])
def test_alpha_matches_lycoris_forward(tiny, base_unet, tmp_path, case):
    """alpha != rank: the UNet's output under LyCORIS's own forward (ΔW scaled by alpha/rank once) equals the output
    of our merged UNet. Tolerance 1e-5 of the output's scale: the same weights applied in another order (LyCORIS adds
    ``x @ ΔWᵀ`` to ``x @ W0ᵀ``, we apply the merged weight), a few fp32 ULPs per layer through ~40 layers."""
    options = dict(CASES[case][0], linear_alpha=1.5)
    unet, _ = _lycoris(base_unet, tmp_path / "lyco.safetensors", options)
    ours = build_unet(_recipe(tiny, tmp_path / "lyco.safetensors"))
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([10]), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        ref, mine = unet(x, t, ctx).sample, ours(x, t, ctx).sample
        plain = base_unet(x, t, ctx).sample
    # The adapter moves the output far more than the tolerance, so alpha read as rank (scale 2.7x) would fail.
    assert (ref - plain).abs().max() > 100 * (ref - mine).abs().max()
    assert (ref - mine).abs().max() <= 1e-5 * ref.abs().max()


def test_half_precision_is_one_rounding_of_lycoris(tiny, base_unet, tmp_path):
    """fp16 output: LyCORIS's fp32 merge of the fp32 base, rounded once to fp16; ours may differ by one fp16 ULP
    where the two fp32 sums land on either side of a rounding boundary, plus the fp32 noise of the fp32 test."""
    unet, net = _lycoris(base_unet, tmp_path / "lyco.safetensors", CASES["loha-tucker"][0])
    _merge_to(net)
    ref = unet.state_dict()
    ours = build_unet(_recipe(tiny, tmp_path / "lyco.safetensors", dtype="float16")).state_dict()
    for k, v in ref.items():
        r = v.double().to(torch.float16).double()
        ulp = torch.exp2(torch.floor(torch.log2(r.abs().clamp(min=torch.finfo(torch.float16).smallest_normal))) - 10)
        assert ours[k].dtype == torch.float16
        assert ((ours[k].double() - r).abs() <= ulp + 1e-6 * v.abs().max()).all(), k


def _edit(src, dst, change) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(src)
    change(sd)
    save_file(sd, dst)


def _one(sd: dict, suffix: str) -> str:
    return next(k for k in sorted(sd) if k.endswith(suffix) and "_resnets_0_conv1" in k)


BAD = {  # what is wrong -> (case, edit of the saved state dict, error, message)
    "kron shape": ("lokr-w2-factored",
                   lambda sd: sd.__setitem__(k := _one(sd, ".lokr_w1"), torch.randn(sd[k].shape[0] + 1, sd[k].shape[1])),
                   ShapeMismatchError, r"lokr `lycoris_\w+_conv1`: lokr_w1 \(3, 2\) ⊗ lokr_w2 .* not the weight's .*Fix:"),
    "missing factor": ("loha", lambda sd: sd.pop(_one(sd, ".hada_w2_b")), FileFormatError,
                       r"module `lycoris_\w+conv1` .*missing hada_w2_b\. Fix:"),
    "tucker core": ("loha-tucker", lambda sd: sd.__setitem__(k := _one(sd, ".hada_t1"), sd[k][:, :2].contiguous()), FileFormatError,
                    r"hada_t1 \(4, 2, 3, 3\) do not multiply .*Fix:"),
    "locon mid": ("locon-tucker", lambda sd: sd.__setitem__(k := _one(sd, ".lora_mid.weight"), sd[k][:3]),
                  FileFormatError, r"Tucker core `lora_mid` \(3, 4, 3, 3\) does not join .*Fix:"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_factors_are_refused_before_writing(tiny, base_unet, tmp_path, what):
    case, change, error, message = BAD[what]
    _lycoris(base_unet, tmp_path / "lyco.safetensors", CASES[case][0])
    _edit(tmp_path / "lyco.safetensors", tmp_path / "bad.safetensors", change)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(error, match=message):
        merge_to_file(_recipe(tiny, tmp_path / "bad.safetensors"), out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("algo, name", [("diag-oft", "OFT"), ("glora", "GLoRA"), ("ia3", "IA³")])
def test_unsupported_algebras_are_refused_by_name(base_unet, tmp_path, algo, name):
    _lycoris(base_unet, tmp_path / "lyco.safetensors", dict(algo=algo))
    for strict in (True, False):
        with pytest.raises(AdapterOptionError, match=rf"{name}.*not this algebra\. Fix: merge it .* dense style term"):
            load(tmp_path / "lyco.safetensors", strict=strict)
