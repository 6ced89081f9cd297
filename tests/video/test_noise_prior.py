"""The noise prior: shared (PYoCo) and moving (Text2Video-Zero) noise across frames, in the LCM sampler's per-step
noise too, the same in the PyTorch and ONNX Runtime pipelines.

Kinds: the i.i.d. default is checked bitwise against diffusers' ``randn_tensor`` and the LCM step against diffusers'
``LCMScheduler`` (reference); the shared/moving noise's statistics against their analytic values (variance 1,
correlation ρ between frames), with tolerances of several standard errors of the estimate; the rest is
self-consistency (ONNX vs PyTorch with the same prior, as the existing parity tests).
"""

import math

import numpy as np
import pytest
import torch

from weightlab.errors import SamplingError
from weightlab.noise_prior import NoisePrior, with_prior


def test_the_iid_default_draws_exactly_what_diffusers_draws():
    from diffusers.utils.torch_utils import randn_tensor

    shape = (1, 4, 5, 8, 8)
    ours = NoisePrior().sample(shape, torch.Generator().manual_seed(3))
    assert torch.equal(ours, randn_tensor(shape, generator=torch.Generator().manual_seed(3)))


def test_moving_noise_translates_the_shared_part_frame_by_frame():
    x = NoisePrior(shared=1.0, motion=(1.5, -1.0)).sample((2, 4, 6, 16, 16), torch.Generator().manual_seed(0))
    for k in range(6):  # round(1.5k), round(-k) latent pixels, circularly
        assert torch.equal(x[:, :, k], torch.roll(x[:, :, 0], (round(-k), round(1.5 * k)), dims=(2, 3)))


@pytest.mark.parametrize("motion", [(0.0, 0.0), (1.0, 0.0)])
def test_each_frame_stays_standard_normal_and_frames_correlate_by_the_shared_share(motion):
    """Analytic reference: frame noise √ρ·n_f + √(1−ρ)·e_f has variance 1 and correlation ρ with another frame's
    (after undoing the translation). 65,536 values per frame: the standard error of a standard deviation is
    1/√(2N) ≈ 0.003 and of a correlation (1−ρ²)/√N ≈ 0.0007; bounds 0.015 and 0.005 are 5–7 of them."""
    rho = 0.9
    x = NoisePrior(shared=rho, motion=motion).sample((4, 4, 4, 64, 64), torch.Generator().manual_seed(1)).double()
    for k in range(4):
        assert abs(float(x[:, :, k].std()) - 1.0) < 0.015
    back = torch.roll(x[:, :, 3], (0, -round(3 * motion[0])), dims=(2, 3))  # frame 3 moved back onto frame 0
    a, b = x[:, :, 0].flatten(), back.flatten()
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
    assert abs(corr - rho) < 0.005


@pytest.mark.parametrize("kwargs, words", [
    (dict(shared=1.5), ["1.5", "0 to 1", "Fix"]),
    (dict(shared=-0.1), ["-0.1", "Fix"]),
    (dict(shared=0.9, motion=(math.nan, 0.0)), ["finite"]),
    (dict(motion=(1.0, 0.0)), ["shared is 0", "Fix"]),
])
def test_bad_priors_are_refused(kwargs, words):
    with pytest.raises(SamplingError) as e:
        NoisePrior(**kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def _lcm():
    from weightlab.schedules import make_scheduler

    scheduler = make_scheduler("lcm", {"num_train_timesteps": 1000})
    scheduler.set_timesteps(4)
    return scheduler


def test_the_lcm_step_renoises_from_the_prior_and_keeps_diffusers_prediction():
    """Reference: diffusers' LCMScheduler on the same model output. x̂0 (``denoised``) and the last step must be its
    own to the bit; in between, x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·n (LCM's multistep sampler) with n from the prior:
    with ρ = 1 and motion (1, 0) its frames are exact translations of one another (fp32 rounding of the
    subtraction: 1e-5 of the noise's scale)."""
    ref, ours = _lcm(), with_prior(_lcm(), NoisePrior(shared=1.0, motion=(1.0, 0.0)))
    ours.set_timesteps(4)
    assert type(ours).__name__ == "PriorLCMScheduler" and with_prior(ref, NoisePrior()) is ref
    g = torch.Generator().manual_seed(0)
    sample, out = torch.randn((1, 4, 3, 8, 8), generator=g), torch.randn((1, 4, 3, 8, 8), generator=g)
    for i, t in enumerate(ref.timesteps):
        a = ref.step(out, t, sample, generator=torch.Generator().manual_seed(i))
        b = ours.step(out, t, sample, generator=torch.Generator().manual_seed(i))
        assert torch.equal(a.denoised, b.denoised)
        if i == len(ref.timesteps) - 1:
            assert torch.equal(a.prev_sample, b.prev_sample)
            continue
        abar = ref.alphas_cumprod[ref.timesteps[i + 1]]
        noise = (b.prev_sample - abar.sqrt() * b.denoised) / (1 - abar).sqrt()
        for k in (1, 2):
            torch.testing.assert_close(noise[:, :, k], torch.roll(noise[:, :, 0], k, dims=3), rtol=0, atol=1e-5)


def test_the_pipeline_samples_from_the_prior_and_restores_its_scheduler(recipe):
    """Self-consistency on the tiny family: a prior changes the clip, the same prior and seed repeat it, and the
    pipeline's own LCM scheduler is back afterwards."""
    from weightlab.video import VideoPipeline

    pipe = VideoPipeline.from_source(recipe)
    kw = dict(frames=3, steps=2, seed=5, progress=False)
    prior = NoisePrior(shared=0.9, motion=(1.0, 0.0))
    plain, moved, again = pipe("a cat", **kw), pipe("a cat", noise=prior, **kw), pipe("a cat", noise=prior, **kw)
    assert np.abs(plain.video - moved.video).max() > 1e-2
    assert np.array_equal(moved.video, again.video)
    assert type(pipe.pipe.scheduler).__name__ == "LCMScheduler"


def test_onnx_runtime_samples_the_prior_like_pytorch(recipe, onnx_dir, assert_same_clip):
    from weightlab.onnx_runtime import OnnxVideoPipeline
    from weightlab.video import VideoPipeline

    kw = dict(frames=3, steps=3, seed=2, progress=False, noise=NoisePrior(shared=0.8, motion=(0.0, 1.0)))
    assert_same_clip(VideoPipeline.from_source(recipe)("a cat", **kw),
                     OnnxVideoPipeline(onnx_dir, provider="cpu")("a cat", **kw))


def test_generate_cli_takes_a_noise_prior_and_refuses_a_bad_one(recipe, tmp_path):
    from typer.testing import CliRunner

    from weightlab.cli import app

    args = ["generate", "--recipe", str(recipe.save(tmp_path / "r.yaml")), "--prompt", "a cat", "--frames", "2",
            "--steps", "2", "--no-gif"]
    ok = CliRunner().invoke(app, [*args, "--shared-noise", "0.9", "--noise-motion", "0.5,0", "--out",
                                  str(tmp_path / "a.mp4")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "a.mp4").stat().st_size > 0
    for bad, words in ((["--noise-motion", "left"], "DX,DY"), (["--noise-motion", "1,0"], "shared is 0")):
        refused = CliRunner().invoke(app, [*args, *bad, "--out", str(tmp_path / "b.mp4")])
        assert refused.exit_code == 2 and words in refused.output, refused.output
        assert not (tmp_path / "b.mp4").exists()
