"""The pieces of latent consistency distillation, as pure functions with the equations they implement.

Notation (LCM, Luo et al. 2023; AnimateLCM, Wang et al. 2024): ``ᾱ_t`` the cumulative noise schedule,
``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 − ᾱ_t)``, ``x_t = α_t·x_0 + σ_t·ε``. The DDIM solver runs on N of the T
training steps with skip ``k = T / N``; a training pair is ``(t, s) = (t_n, max(t_n − k, 0))``.
Values follow diffusers' ``train_lcm_distill_lora_sd_wds.py`` (DESIGN.md "Trainers").

Example:
    >>> solver = DDIMSolver.from_schedule(torch.linspace(0.999, 0.01, 1000), num_ddim_timesteps=50)
    >>> solver.timesteps[:3].tolist(), solver.skip
    ([19, 39, 59], 20)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ...]`` broadcastable against ``like`` (images ``[B,C,H,W]`` or videos ``[B,C,F,H,W]``)."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1))).to(like)


def ddim_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """DDIM solver grid ``t_n = n·k − 1`` for ``n = 1..N``, ``k = T // N`` (LCM §4.3 skipping-step).

    Example: T = 1000, N = 50 -> ``[19, 39, ..., 999]``.
    """
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * k - 1


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process ``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε`` (DDPM, Ho et al. 2020, Eq. 4)."""
    a = alphas_cumprod.to(x0.device)[t]
    return _per_sample(a.sqrt(), x0) * x0 + _per_sample((1 - a).sqrt(), x0) * noise


def predicted_x0(model_output, x_t, t, alphas_cumprod, prediction_type: str = "epsilon") -> torch.Tensor:
    """``x̂_0 = (x_t − σ_t·ε̂) / α_t`` for ε-prediction, ``α_t·x_t − σ_t·v̂`` for v-prediction.

    The ``x̂_0`` inside LCM's ε-parameterised consistency function (LCM §4.1).
    """
    a = alphas_cumprod.to(x_t.device)[t]
    alpha, sigma = _per_sample(a.sqrt(), x_t), _per_sample((1 - a).sqrt(), x_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'.")


def predicted_noise(model_output, x_t, t, alphas_cumprod, prediction_type: str = "epsilon") -> torch.Tensor:
    """``ε̂`` itself for ε-prediction, ``α_t·v̂ + σ_t·x_t`` for v-prediction."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(x_t.device)[t]
        return _per_sample(a.sqrt(), x_t) * model_output + _per_sample((1 - a).sqrt(), x_t) * x_t
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'.")


@dataclass(frozen=True)
class DDIMSolver:
    """One deterministic DDIM step from ``t_n`` to ``s = t_{n−1}`` on the skipped grid (LCM §4.3, Φ = DDIM).

    ``alphas_cumprod_prev[n]`` is ``ᾱ`` at ``t_n − k`` (``ᾱ_0`` for n = 0, where ``s`` clamps to 0).
    """

    timesteps: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    skip: int

    @classmethod
    def from_schedule(cls, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int = 50) -> "DDIMSolver":
        ts = ddim_timesteps(len(alphas_cumprod), num_ddim_timesteps)
        prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ts[:-1]]])
        return cls(ts, alphas_cumprod[ts], prev, len(alphas_cumprod) // num_ddim_timesteps)

    def previous(self, index: torch.Tensor) -> torch.Tensor:
        """``s = max(t_n − k, 0)``."""
        return (self.timesteps.to(index.device)[index] - self.skip).clamp(min=0)

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x_s = sqrt(ᾱ_s)·x̂_0 + sqrt(1 − ᾱ_s)·ε̂`` (DDIM, Song et al. 2021, Eq. 12 with σ = 0)."""
        a = self.alphas_cumprod_prev.to(x0.device)[index]
        return _per_sample(a.sqrt(), x0) * x0 + _per_sample((1 - a).sqrt(), x0) * eps


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """``c_skip = σ_d² / ((st)² + σ_d²)``, ``c_out = st / sqrt((st)² + σ_d²)`` with ``s`` the timestep scaling.

    The Consistency Models (Song et al. 2023, §3) skip/out parameterisation on LCM's scaled discrete timestep
    (diffusers ``LCMScheduler.get_scalings_for_boundary_condition_discrete``): ``c_skip(0) = 1, c_out(0) = 0``,
    the boundary condition ``f(x, 0) = x``.
    """
    st = timestep_scaling * t.float()
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_fn(x_t: torch.Tensor, x0: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
    """``f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂_0`` (LCM §4.1)."""
    return _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * x0


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in the LCM form ``cond + w·(cond − uncond) = (1 + w)·cond − w·uncond``.

    LCM §4.2: applied to both ``x̂_0`` and ``ε̂`` of the teacher (the augmented PF-ODE). It equals the usual
    ``uncond + g·(cond − uncond)`` with ``g = w + 1``. ``w`` is per sample ``[B]``.
    """
    w = _per_sample(w, cond)
    return cond + w * (cond - uncond)


def huber(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber distance ``mean(sqrt((pred − target)² + c²) − c)`` in fp32 (iCT, Song & Dhariwal 2023)."""
    d = pred.float() - target.float()
    return (torch.sqrt(d * d + c * c) - c).mean()


@torch.no_grad()
def ema_update_(target, online, decay: float) -> None:
    """``θ⁻ ← μ·θ⁻ + (1 − μ)·θ`` in place for paired tensors.

    The target-network update of Consistency Models (Algorithm 2); AnimateLCM's motion stage uses μ = 0.95.
    """
    for tgt, src in zip(target, online, strict=True):
        tgt.mul_(decay).add_(src.detach().to(tgt.dtype), alpha=1 - decay)


def distillation_loss(
    *,
    online: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    teacher: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    latents: torch.Tensor,
    noise: torch.Tensor,
    index: torch.Tensor,
    w: torch.Tensor,
    solver: DDIMSolver,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    loss: str = "huber",
    huber_c: float = 0.001,
) -> torch.Tensor:
    """Latent consistency distillation loss ``d(f_θ(x_t, t), f_θ⁻(x̂_s, s))`` (LCM Algorithm 1;
    AnimateLCM's decoupled consistency learning uses the same loss for the motion stage).

    ``x_t`` noises ``latents`` at ``t = t_n``; the teacher's CFG-augmented ``(x̂_0, ε̂)`` take one DDIM step to
    ``x̂_s``; the target network evaluates the consistency function at ``s`` without gradient.

    Args:
        online / target: ``(x, t) -> model output`` of the student and of the target network.
        teacher: ``(x, t) -> (conditional output, unconditional output)``.
        latents (Tensor): clean latents ``[B, C, H, W]`` or ``[B, C, F, H, W]``.
        noise (Tensor): ``ε`` of the latents' shape. index (LongTensor ``[B]``): solver indices n.
        w (Tensor ``[B]``): guidance scales (LCM form).
    Returns:
        Tensor: the scalar fp32 loss (Huber with ``huber_c``, or mean squared error).
    """
    t, s = solver.timesteps.to(index.device)[index], solver.previous(index)
    x_t = add_noise(latents, noise, t, alphas_cumprod)
    c_skip_t, c_out_t = boundary_scalings(t, sigma_data, timestep_scaling)
    c_skip_s, c_out_s = boundary_scalings(s, sigma_data, timestep_scaling)
    x0_online = predicted_x0(online(x_t, t), x_t, t, alphas_cumprod, prediction_type)
    f_online = consistency_fn(x_t, x0_online, c_skip_t, c_out_t)
    with torch.no_grad():
        cond, uncond = teacher(x_t, t)
        x0 = guided(predicted_x0(cond, x_t, t, alphas_cumprod, prediction_type),
                    predicted_x0(uncond, x_t, t, alphas_cumprod, prediction_type), w)
        eps = guided(predicted_noise(cond, x_t, t, alphas_cumprod, prediction_type),
                     predicted_noise(uncond, x_t, t, alphas_cumprod, prediction_type), w)
        x_s = solver.step(x0.float(), eps.float(), index)
        x0_target = predicted_x0(target(x_s, s), x_s, s, alphas_cumprod, prediction_type)
        f_target = consistency_fn(x_s, x0_target, c_skip_s, c_out_s)
    if loss == "huber":
        return huber(f_online, f_target, huber_c)
    return torch.nn.functional.mse_loss(f_online.float(), f_target.float())
