"""How a clip's Gaussian noise is drawn across its frames: the initial latents and the LCM sampler's per-step noise.

A :class:`NoisePrior` with ``shared`` ρ gives frame ``f`` the noise ``√ρ·n_f + √(1−ρ)·e_f``, the ``e_f`` i.i.d. and
``n_f`` one draw ``n`` common to all frames: the mixed-noise prior of PYoCo (Ge et al. 2023, Eq. 3, ρ = α²/(1+α²)).
Frames then agree on what the noise seeds. With ``motion`` (dx, dy), ``n_f`` is ``n`` translated by
``round(f·dx), round(f·dy)`` latent pixels (circularly): the motion dynamics Text2Video-Zero puts in the latent codes
(Khachatryan et al. 2023, §3.1), so what the common part seeds moves that way. A translation permutes i.i.d. entries,
so every frame's noise is still N(0, I): each frame is sampled from the input distribution its model knows.

The default (ρ = 0) is i.i.d. noise, what AnimateDiff and AnimateLCM motion modules are trained with; the samplers
then draw exactly as diffusers does.

Example:
    >>> import torch
    >>> prior = NoisePrior(shared=1.0, motion=(1.0, 0.0))
    >>> x = prior.sample((1, 4, 3, 8, 8), torch.Generator().manual_seed(0))
    >>> torch.equal(x[:, :, 2], torch.roll(x[:, :, 0], 2, dims=3))
    True
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from weightlab.errors import SamplingError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class NoisePrior:
    """``shared``: ρ in [0, 1], the share of each frame's noise variance common to all frames (0: i.i.d.).
    ``motion``: (dx, dy) latent pixels per frame by which the common part moves (needs ``shared`` > 0)."""

    shared: float = 0.0
    motion: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if not 0.0 <= self.shared <= 1.0:
            raise SamplingError(f"shared noise {self.shared}: a share of variance is 0 to 1. Fix: use e.g. 0.9, or 0 "
                                "for i.i.d. noise.")
        if len(self.motion) != 2 or not all(math.isfinite(v) for v in self.motion):
            raise SamplingError(f"noise motion {self.motion}: give two finite numbers, dx and dy in latent pixels per "
                                "frame (e.g. 0.7,0).")
        if any(self.motion) and self.shared == 0.0:
            raise SamplingError("noise motion moves the noise that frames share, and shared is 0. Fix: set shared "
                                "noise too (e.g. 0.9).")

    @property
    def iid(self) -> bool:
        return self.shared == 0.0

    def sample(self, shape: tuple[int, ...], generator: "torch.Generator | None" = None, device=None,
               dtype=None) -> "torch.Tensor":
        """Noise of ``shape`` ``(B, C, F, h, w)`` drawn from ``generator`` (i.i.d. like diffusers' when ρ = 0)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        if self.iid:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        b, c, f, h, w = shape
        common = randn_tensor((b, c, 1, h, w), generator=generator, device=device, dtype=dtype)
        own = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
        dx, dy = self.motion
        moved = torch.cat([torch.roll(common, (round(k * dy), round(k * dx)), dims=(3, 4)) for k in range(f)], dim=2)
        return math.sqrt(self.shared) * moved + math.sqrt(1.0 - self.shared) * own


def with_prior(scheduler, prior: NoisePrior):
    """``scheduler`` re-made so that its per-step noise comes from ``prior`` (the LCM sampler re-noises the predicted
    clean latents between steps; DDIM with η = 0 and DPM-Solver++ draw none and are returned as they are)."""
    from diffusers import LCMScheduler

    if prior.iid or not isinstance(scheduler, LCMScheduler):
        return scheduler
    out = _prior_lcm_class().from_config(scheduler.config)
    out.noise_prior = prior
    return out


@functools.cache
def _prior_lcm_class():
    from diffusers import LCMScheduler
    from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

    class PriorLCMScheduler(LCMScheduler):
        """diffusers' ``LCMScheduler`` whose re-noising between steps draws from ``noise_prior``."""

        noise_prior = NoisePrior()

        def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
            out = super().step(model_output, timestep, sample, generator=generator, return_dict=True)
            if self.step_index < self.num_inference_steps:  # not the last step: x_prev = √ᾱ·x̂0 + √(1−ᾱ)·noise
                alpha = self.alphas_cumprod[self.timesteps[self.step_index]].to(out.denoised.dtype)
                noise = self.noise_prior.sample(tuple(model_output.shape), generator, out.denoised.device,
                                                out.denoised.dtype)
                out = LCMSchedulerOutput(prev_sample=alpha.sqrt() * out.denoised + (1 - alpha).sqrt() * noise,
                                         denoised=out.denoised)
            return out if return_dict else (out.prev_sample, out.denoised)

    return PriorLCMScheduler

