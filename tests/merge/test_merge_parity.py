"""Parity with diffusers' own LoRA loading and fusing: spatial LoRAs (fp32, fp16, bf16) and a motion LoRA.

fp32, against diffusers (max relative error <= 1e-6): both sides accumulate in fp32, but diffusers adds each LoRA's
delta to the weight separately (w + s1·B1A1 + s2·B2A2, several roundings) while we add all terms to one fp32
accumulator and round once; the difference is a few fp32 ULPs of the weight, ~1e-7 relative.

fp16/bf16: see :func:`test_half_precision_is_the_fp64_sum_rounded_once_and_near_diffusers`.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from weightlab import Recipe, Term
from weightlab.merge import build_unet
from weightlab.testing import max_rel_error


@pytest.mark.parametrize("lora_attr", ["style_lora_peft", "style_lora_kohya"])
def test_single_lora_matches_diffusers_fuse(tiny, diffusers_pipe_factory, lora_attr):
    path = getattr(tiny, lora_attr)  # attention + conv1/conv2/proj_in (conv LoRA)
    ours = build_unet(Recipe(base=str(tiny.base_dir), terms=[Term(source=str(path), kind="style", scale=0.7)]))
    ref = diffusers_pipe_factory([(path, 0.7)], motion=False).unet
    assert type(ours).__name__ == "UNet2DConditionModel"
    assert max_rel_error(ref.state_dict(), ours.state_dict()) <= 1e-6


def test_two_loras_and_motion_match_diffusers(tiny, diffusers_pipe_factory):
    recipe = Recipe(base=str(tiny.base_dir), terms=[
        Term(source=str(tiny.style_lora_kohya), kind="style", scale=0.8),
        Term(source=str(tiny.accel_lora), kind="image_accel", scale=1.0),
        Term(source=str(tiny.motion_dir), kind="motion", scale=1.0)])
    ours = build_unet(recipe)
    pipe = diffusers_pipe_factory([(tiny.style_lora_kohya, 0.8), (tiny.accel_lora, 1.0)])
    assert max_rel_error(pipe.unet.state_dict(), ours.state_dict()) <= 1e-6

    # Same frames from an AnimateDiffPipeline built around our merged UNet (fixed seed, 2 steps).
    from diffusers import AnimateDiffPipeline

    ours_pipe = AnimateDiffPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                    unet=ours, motion_adapter=None, scheduler=pipe.scheduler)
    ours_pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="the cat", num_frames=4, num_inference_steps=2, guidance_scale=1.0, output_type="np",
              height=32, width=32)
    a = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames[0]
    b = ours_pipe(**kw, generator=torch.Generator().manual_seed(0)).frames[0]
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at the values ``x`` (fp64; subnormal spacing below the smallest normal)."""
    info = torch.finfo(dtype)
    mantissa = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    exp = torch.floor(torch.log2(x.double().abs().clamp(min=info.smallest_normal)))
    return torch.exp2(exp - mantissa)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_is_the_fp64_sum_rounded_once_and_near_diffusers(tiny, diffusers_pipe_factory, kohya_delta64,
                                                                         dtype):
    """Two LoRAs merged into a half-precision UNet, checked per entry.

    The sharp check is against a float64 reference rounded once (the contract, DESIGN.md: accumulate in fp32, round
    once): w0 (fp32 file) + Σ s·(α/r)·up@down in fp64, rounded once to ``dtype``. Ours may be 1 ULP of the result
    off it where the fp32 accumulator's own error (≤ 4·eps32·Σ|terms|) moves the sum across a rounding boundary,
    and a few ULPs of a result that cancels to far below its terms: bound 1 ULP(result) + 4·eps32·Σ|terms|. A
    second rounding, a truncating cast or a wrong scale breaks it.

    diffusers' ``fuse_lora`` on a pipeline loaded in ``dtype`` is not once-rounded: it stores the LoRA factors in
    ``dtype`` (rounding up and down: an error ≈ eps·(α/r)·|up|@|down| per LoRA, larger than the delta where it
    cancels) and rounds w0, each delta and each sum. So it differs from ours on about half the touched entries and
    is held to 3·eps·M, M = |w0| + Σ s·(α/r)·|up|@|down| (measured: 1.25·eps·M); weights no LoRA touches are
    rounded once on both sides and must be equal."""
    loras = [(tiny.style_lora_kohya, 0.8), (tiny.accel_lora, 1.0)]
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    ours = build_unet(Recipe(base=str(tiny.base_dir), dtype=name, terms=[
        Term(source=str(tiny.style_lora_kohya), kind="style", scale=0.8),
        Term(source=str(tiny.accel_lora), kind="image_accel", scale=1.0)])).state_dict()
    w0 = load_file(tiny.base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    files = [(load_file(path), scale) for path, scale in loras]
    theirs = diffusers_pipe_factory(loras, motion=False, dtype=dtype).unet.state_dict()
    assert ours.keys() == w0.keys() == theirs.keys()

    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    off_ref, off_diffusers, untouched_differ, touched = [], [], [], 0
    for k, v in w0.items():
        assert ours[k].dtype == theirs[k].dtype == dtype
        mine, base = ours[k].double(), v.double()
        deltas = [s * d for sd, s in files if (d := kohya_delta64(sd, k, v.shape)) is not None]
        factor_mags = [s * m for sd, s in files if (m := kohya_delta64(sd, k, v.shape, magnitude=True)) is not None]
        if not deltas:
            if not torch.equal(ours[k], theirs[k]):
                untouched_differ.append(k)
            continue
        touched += 1
        ref = (base + sum(deltas)).to(dtype).double()
        if ((mine - ref).abs() > _ulp(ref, dtype) + 4 * eps32 * (base.abs() + sum(d.abs() for d in deltas))).any():
            off_ref.append(k)
        if ((mine - theirs[k].double()).abs() > 3 * eps * (base.abs() + sum(factor_mags))).any():
            off_diffusers.append(k)
    assert touched > 100
    assert off_ref == [] and off_diffusers == [] and untouched_differ == []


def test_motion_lora_matches_diffusers_fuse(tiny, diffusers_pipe_factory):
    """A motion LoRA (PEFT keys over motion-module attention) on base + motion module, fp32: against
    ``AnimateDiffPipeline.load_lora_weights`` + ``fuse_lora`` (tolerance as for the spatial LoRAs, module docstring)."""
    ours = build_unet(Recipe(base=str(tiny.base_dir), terms=[
        Term(source=str(tiny.motion_dir), kind="motion", scale=1.0),
        Term(source=str(tiny.motion_lora), kind="motion_lora", scale=0.6)]))
    assert type(ours).__name__ == "UNetMotionModel"
    pipe = diffusers_pipe_factory([(tiny.motion_lora, 0.6)])
    ref, plain = pipe.unet.state_dict(), diffusers_pipe_factory().unet.state_dict()
    changed = [k for k in ref if not torch.equal(ref[k], plain[k])]
    assert changed and all(".motion_modules." in k for k in changed)  # diffusers did fuse the motion LoRA
    assert max_rel_error(ref, ours.state_dict()) <= 1e-6
