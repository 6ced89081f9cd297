"""γ in weight space: scaling each motion module's proj_out (weight and bias) scales the motion branch by γ."""

import re

import torch

from weightlab import Recipe, Term
from weightlab.merge import build_unet


def _recipe(tiny, gamma):
    return Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tiny.motion_dir), kind="motion", scale=gamma)])


def _inputs(frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, frames, 16, 16, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    return sample, text


def test_gamma_half_equals_diffusers_with_scaled_proj_out(tiny):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    ref = UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(tiny.base_dir, subfolder="unet"),
                                      MotionAdapter.from_pretrained(tiny.motion_dir)).eval()
    n = 0
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if re.search(r"motion_modules\.\d+\.proj_out\.(weight|bias)$", name):
                p.mul_(0.5)
                n += 1
    assert n > 0
    ours = build_unet(_recipe(tiny, 0.5))
    rsd, osd = ref.state_dict(), ours.state_dict()
    assert all(torch.equal(rsd[k], osd[k]) for k in rsd)
    sample, text = _inputs()
    with torch.no_grad():
        a = ref(sample, 10, encoder_hidden_states=text.repeat_interleave(4, 0)).sample
        b = ours(sample, 10, encoder_hidden_states=text.repeat_interleave(4, 0)).sample
    assert torch.equal(a, b)


def test_gamma_zero_makes_frames_independent(tiny):
    from diffusers import UNet2DConditionModel

    frames = 4
    video = build_unet(_recipe(tiny, 0.0))
    spatial = UNet2DConditionModel.from_pretrained(tiny.base_dir, subfolder="unet").eval()
    sample, text = _inputs(frames)
    with torch.no_grad():
        out = video(sample, 10, encoder_hidden_states=text.repeat_interleave(frames, 0)).sample  # (1, C, F, H, W)
        per_frame = spatial(sample[0].permute(1, 0, 2, 3), 10, encoder_hidden_states=text.repeat(frames, 1, 1)).sample
    # Same arithmetic, different batch layout: agreement to fp32 rounding noise.
    assert (out[0].permute(1, 0, 2, 3) - per_frame).abs().max().item() < 1e-5
    with torch.no_grad():  # and γ = 1 really does mix frames
        mixed = build_unet(_recipe(tiny, 1.0))(sample, 10, encoder_hidden_states=text.repeat_interleave(frames, 0)).sample
    assert (mixed[0].permute(1, 0, 2, 3) - per_frame).abs().max().item() > 1e-3
