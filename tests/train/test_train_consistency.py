"""The consistency-distillation pieces against hand-computed values and against diffusers' schedulers."""

import math

import pytest
import torch

from weightlab.train.consistency import (
    DDIMSolver,
    add_noise,
    boundary_scalings,
    consistency_fn,
    ddim_timesteps,
    distillation_loss,
    ema_update_,
    guided,
    huber,
    predicted_noise,
    predicted_x0,
)

# a schedule simple enough to compute by hand: ᾱ_t = 1 − t/1000
LINEAR_ABAR = 1.0 - torch.arange(1000, dtype=torch.float64) / 1000


def test_ddim_timesteps_follow_arange_times_skip_minus_one():
    ts = ddim_timesteps(1000, 50)
    assert ts[:3].tolist() == [19, 39, 59] and ts[-1] == 999 and len(ts) == 50
    assert ddim_timesteps(1000, 4).tolist() == [249, 499, 749, 999]


def test_solver_previous_timestep_and_step_by_hand():
    solver = DDIMSolver.from_schedule(LINEAR_ABAR, num_ddim_timesteps=4)
    assert solver.skip == 250
    assert solver.alphas_cumprod_prev.tolist() == pytest.approx([1.0, 0.751, 0.501, 0.251])
    assert solver.previous(torch.tensor([0, 1, 3])).tolist() == [0, 249, 749]  # s = max(t − k, 0)
    x = solver.step(torch.full((1, 1), 2.0, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), torch.tensor([1]))
    assert x.item() == pytest.approx(2 * math.sqrt(0.751) + math.sqrt(0.249))  # sqrt(ᾱ_s)·x̂0 + sqrt(1 − ᾱ_s)·ε̂


def test_solver_step_equals_diffusers_ddim_with_trailing_spacing():
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                         timestep_spacing="trailing", clip_sample=False)
    ddim.set_timesteps(50)
    solver = DDIMSolver.from_schedule(ddim.alphas_cumprod, 50)
    assert sorted(ddim.timesteps.tolist()) == solver.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for n in (0, 7, 49):
        t = solver.timesteps[n]
        ref = ddim.step(eps, int(t), x_t, eta=0.0).prev_sample
        idx = torch.full((2,), n)
        ours = solver.step(predicted_x0(eps, x_t, idx * 0 + t, ddim.alphas_cumprod), eps, idx)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_boundary_scalings_by_hand_and_as_lcm_scheduler():
    from diffusers import LCMScheduler

    c_skip, c_out = boundary_scalings(torch.tensor([0, 1, 19]))
    assert c_skip.tolist() == pytest.approx([1.0, 0.25 / 100.25, 0.25 / 36100.25])
    assert c_out.tolist() == pytest.approx([0.0, 10 / math.sqrt(100.25), 190 / math.sqrt(36100.25)])
    ref = LCMScheduler(timestep_scaling=10.0).get_scalings_for_boundary_condition_discrete(torch.tensor([19, 499, 999]))
    ours = boundary_scalings(torch.tensor([19, 499, 999]))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.float())


def test_forward_process_and_its_inversions():
    t = torch.tensor([250, 750])
    x0, eps = torch.randn(2, 3, 2, 2, 2), torch.randn(2, 3, 2, 2, 2)  # video-shaped: per-sample broadcasting on 5-D
    abar = LINEAR_ABAR.float()
    x_t = add_noise(x0, eps, t, abar)
    torch.testing.assert_close(x_t[0], math.sqrt(0.75) * x0[0] + 0.5 * eps[0])
    torch.testing.assert_close(predicted_x0(eps, x_t, t, abar), x0, rtol=1e-5, atol=1e-5)
    alpha, sigma = abar[t].sqrt().view(2, 1, 1, 1, 1), (1 - abar[t]).sqrt().view(2, 1, 1, 1, 1)
    v = alpha * eps - sigma * x0
    torch.testing.assert_close(predicted_x0(v, x_t, t, abar, "v_prediction"), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predicted_noise(v, x_t, t, abar, "v_prediction"), eps, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        predicted_x0(eps, x_t, t, abar, "sample")


def test_consistency_function_is_identity_at_the_boundary():
    x, x0 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]))
    f = consistency_fn(x, x0, c_skip, c_out)
    torch.testing.assert_close(f[0], x[0])  # f(x, 0) = x
    torch.testing.assert_close(f[1], x0[1], rtol=1e-4, atol=1e-5)  # large t: f ≈ x̂0


def test_guidance_is_the_lcm_form_per_sample():
    cond, uncond = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), 1.0)
    out = guided(cond, uncond, torch.tensor([0.0, 3.0]))
    assert out[0].unique().tolist() == [2.0]  # w = 0: the conditional prediction
    assert out[1].unique().tolist() == [5.0]  # cond + w·(cond − uncond) = 2 + 3·1 = (1 + w)·cond − w·uncond


def test_pseudo_huber_by_hand():
    assert huber(torch.tensor([3.0, 0.0]), torch.zeros(2), c=4.0).item() == pytest.approx(0.5)  # (√25 − 4 + 0) / 2
    assert huber(torch.ones(3), torch.ones(3)).item() == 0.0
    big = huber(torch.tensor([10.0]), torch.tensor([0.0]), c=0.001).item()
    assert big == pytest.approx(10.0 - 0.001, rel=1e-6)  # ≈ L1 far from 0
    assert huber(torch.ones(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float16)).dtype == torch.float32


def test_ema_update_by_hand():
    target, online = [torch.tensor([0.0, 10.0])], [torch.tensor([1.0, 0.0])]
    ema_update_(target, online, 0.9)
    torch.testing.assert_close(target[0], torch.tensor([0.1, 9.0]))
    ema_update_(target, online, 0.9)
    torch.testing.assert_close(target[0], torch.tensor([0.19, 8.1]))


def _toy(scale):
    return lambda x, t: scale * x


def test_distillation_loss_at_the_first_solver_step_ignores_the_target():
    """At n = 0, s = 0 and c_skip(0) = 1: the target is the teacher's one DDIM step itself (LCM boundary condition)."""
    solver = DDIMSolver.from_schedule(LINEAR_ABAR.float(), 4)
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    index, w = torch.zeros(2, dtype=torch.long), torch.tensor([5.0, 10.0])
    student = torch.nn.Parameter(torch.tensor(0.3))
    kwargs = dict(online=lambda x, t: student * x, teacher=lambda x, t: (0.5 * x, 0.4 * x), latents=latents,
                  noise=noise, index=index, w=w, solver=solver, alphas_cumprod=LINEAR_ABAR.float())
    a = distillation_loss(target=_toy(0.2), **kwargs)
    b = distillation_loss(target=_toy(-7.0), **kwargs)
    assert a.item() == pytest.approx(b.item())
    a.backward()
    assert student.grad is not None and student.grad != 0


def test_distillation_loss_is_zero_when_student_and_target_are_consistent_with_the_teacher():
    """An exact ε-oracle teacher, no guidance, student = target = oracle: f(x_t, t) and f(x̂_s, s) both equal x_0
    up to the tiny c_skip blend, so the loss is ≈ 0 (here the Huber floor)."""
    abar = LINEAR_ABAR.float()
    solver = DDIMSolver.from_schedule(abar, 4)
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    index = torch.tensor([2, 3])

    def oracle(x, t):  # ε̂ that maps x back to the true x_0 at any t
        a = abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * latents) / (1 - a).sqrt()

    loss = distillation_loss(online=oracle, target=oracle, teacher=lambda x, t: (oracle(x, t), oracle(x, t)),
                             latents=latents, noise=noise, index=index, w=torch.tensor([5.0, 5.0]), solver=solver,
                             alphas_cumprod=abar)
    assert loss.item() < 1e-4
