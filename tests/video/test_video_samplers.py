"""Baseline samplers (DDIM, DPM-Solver++ with CFG) next to LCM, all on AnimateLCM's linear schedule."""

import numpy as np
import pytest
import torch

from weightlab.errors import SamplingError
from weightlab.schedules import SAMPLERS, make_scheduler

# SD1.5's scheduler_config.json with an explicit β table, which must not override the shared schedule.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": [0.5] * 1000, "clip_sample": False}


def _linear_alphas_cumprod() -> torch.Tensor:
    """AnimateLCM's ᾱ_t in float64: β = linspace(0.00085, 0.012, 1000)."""
    return torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64), 0)


@pytest.fixture(scope="module")
def pipe(recipe):
    from weightlab.video import VideoPipeline

    return VideoPipeline.from_source(recipe)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_uses_the_linear_schedule_and_a_trailing_grid(sampler):
    """Float64 reference: diffusers builds ᾱ as an fp32 cumulative product (≲ 1e-4 relative after 1000 factors)."""
    scheduler = make_scheduler(sampler, SD15_SCHEDULER)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), _linear_alphas_cumprod(), rtol=1e-4, atol=0)
    scheduler.set_timesteps(4)
    # LCM picks from its 100-step teacher grid; the baselines' trailing spacing starts at T - 1 as well.
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]


def _ddim_reference(pipe, prompt: str, *, frames: int, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """DDIM (η = 0) with CFG written out in float64 over the pipeline's own UNet and text encoder:
    ε̂ = ε_u + g(ε_c − ε_u), x̂_0 = (x − √(1−ᾱ_t) ε̂)/√ᾱ_t, x ← √ᾱ_s x̂_0 + √(1−ᾱ_s) ε̂ with s = t − T/steps (ᾱ = 1
    past the end), on the trailing grid t = T − 1 − i·T/steps."""
    p = pipe.pipe
    abar = _linear_alphas_cumprod()
    cond, uncond = p.encode_prompt(prompt, "cpu", 1, True, None)
    embeds = torch.cat([uncond, cond]).repeat_interleave(frames, dim=0)
    size = p.unet.config.sample_size
    x = torch.randn((1, p.unet.config.in_channels, frames, size, size), generator=torch.Generator().manual_seed(seed))
    x = x.double()
    ts = [999 - i * (1000 // steps) for i in range(steps)]
    with torch.no_grad():
        for t in ts:
            out = p.unet(torch.cat([x, x]).float(), t, encoder_hidden_states=embeds).sample.double()
            e_u, e_c = out.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
            x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            s = t - 1000 // steps
            a_s = abar[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    return x


def test_ddim_with_cfg_matches_the_written_out_solver_and_cfg_changes_the_clip(pipe):
    """Tolerance: fp32 UNet calls and the fp32 schedule table vs float64 arithmetic, through two steps whose x̂_0
    amplifies by 1/√ᾱ_999 ≈ 15: ~1e-5 of the latents' scale; a wrong grid, schedule or CFG form moves them by O(1)."""
    kw = dict(frames=3, steps=2, seed=3)
    clip = pipe("a cat", guidance=7.5, sampler="ddim", progress=False, **kw)
    ref = _ddim_reference(pipe, "a cat", guidance=7.5, **kw)
    scale = float(ref.abs().max())
    assert float((clip.latents.double() - ref).abs().max()) <= 1e-4 * scale
    plain = pipe("a cat", guidance=1.0, sampler="ddim", progress=False, **kw)
    # the tiny random text encoder makes "a cat" and "" close, so CFG moves the clip by ~2% (latents) and ~3 uint8
    # levels (frames): far above what two samplings of the same settings differ by (1e-4, 1e-3: conftest)
    assert float((plain.latents - clip.latents).abs().max()) > 5e-3 * scale
    assert np.abs(plain.video - clip.video).max() > 5e-3
    assert type(pipe.pipe.scheduler).__name__ == "LCMScheduler"  # the pipeline's scheduler is restored


def test_dpmpp_is_ddim_at_first_order_and_differs_at_second(pipe):
    """Identity reference (Lu et al. 2022): DPM-Solver++'s first-order step is DDIM's, and below 15 steps diffusers'
    2M solver takes first-order steps only at 2 steps; at 3 its second-order step makes it differ. Both are fp32
    samplings of the same UNet whose σ/α tables round differently: they agree to ~1e-7 of the latents' scale at first
    order (bound 1e-5); the second-order step moves them by ~2e-3 (required: above 2e-4, 20x that bound)."""
    kw = dict(frames=2, guidance=3.0, seed=1, progress=False)
    ddim2, dpm2 = (pipe("a dog", steps=2, sampler=s, **kw) for s in ("ddim", "dpmpp"))
    assert float((dpm2.latents - ddim2.latents).abs().max()) <= 1e-5 * float(ddim2.latents.abs().max())
    ddim3, dpm3 = (pipe("a dog", steps=3, sampler=s, **kw) for s in ("ddim", "dpmpp"))
    assert float((dpm3.latents - ddim3.latents).abs().max()) > 2e-4 * float(ddim3.latents.abs().max())


@pytest.mark.parametrize("kwargs, words", [
    (dict(sampler="lcm", guidance=7.5), ["guidance=7.5", "lcm", "ddim", "Fix"]),
    (dict(sampler="euler"), ["sampler='euler'", "lcm, ddim, dpmpp"]),
    (dict(sampler="ddim", guidance=0.5), ["guidance=0.5", "Fix"]),
    (dict(sampler="ddim", steps=1001), ["steps=1001", "1000"]),
    (dict(sampler="lcm", steps=101), ["steps=101", "100"]),
])
def test_requests_a_sampler_cannot_serve_are_refused(pipe, kwargs, words):
    with pytest.raises(SamplingError) as e:
        pipe("a cat", progress=False, frames=2, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_generate_cli_samples_ddim_with_cfg(recipe, tmp_path):
    from typer.testing import CliRunner

    from weightlab.cli import app

    recipe_file = recipe.save(tmp_path / "r.yaml")
    args = ["generate", "--recipe", str(recipe_file), "--prompt", "a cat", "--frames", "2", "--steps", "2",
            "--guidance", "7.5", "--no-gif"]
    ok = CliRunner().invoke(app, [*args, "--sampler", "ddim", "--out", str(tmp_path / "a.mp4")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "a.mp4").stat().st_size > 0 and "ddim" in ok.output
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.mp4")])  # lcm is the default sampler
    assert refused.exit_code == 2 and "SamplingError" in refused.output and not (tmp_path / "b.mp4").exists()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_onnx_runtime_samples_the_baselines_like_pytorch(pipe, onnx_dir, sampler, assert_same_clip):
    from weightlab.onnx_runtime import OnnxVideoPipeline

    kw = dict(frames=3, steps=3, guidance=7.5, seed=4, sampler=sampler, progress=False)
    assert_same_clip(pipe("a cat", **kw), OnnxVideoPipeline(onnx_dir, provider="cpu")("a cat", **kw))
