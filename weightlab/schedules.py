"""The noise schedule every stage shares, the samplers built on it, and its record in trained residuals.

A consistency-distilled residual (an LCM-LoRA, a distilled motion module) learned one-step solutions of the
probability-flow ODE of *one* noise schedule; sampled under another, it solves the wrong ODE (SD1.5's
scaled_linear ᾱ at t = 499 is 0.278, AnimateLCM's linear one 0.162). So the image stage is distilled under the
schedule the video model samples with (AnimateLCM's linear β 0.00085–0.012), every trainer records its schedule in
the output's safetensors metadata, and the motion stage and the video sampler refuse a distilled residual recorded
under another schedule (DESIGN.md "Trainers": one noise schedule for every stage).

Example:
    >>> make_scheduler("ddim").config.beta_schedule, make_scheduler("lcm").config.original_inference_steps
    ('linear', 100)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass

from weightlab.errors import FileFormatError, SamplingError, ScheduleMismatchError

SCHEDULE_KEY = "weightlab.noise_schedule"  # safetensors metadata: the NoiseSchedule a residual was trained under
CONSISTENCY_KEY = "weightlab.consistency"  # safetensors metadata: solver, N, k, σ_d of a consistency distillation


@dataclass(frozen=True)
class NoiseSchedule:
    """What fixes the forward process ``ᾱ_t`` and what the network predicts (diffusers scheduler config fields).

    Attributes:
        beta_schedule (str): ``linear`` or ``scaled_linear`` (β interpolated linearly in β or in √β).
        beta_start, beta_end (float): β at t = 0 and t = T − 1.
        num_train_timesteps (int, default 1000): T.
        prediction_type (str, default "epsilon"): ``epsilon`` or ``v_prediction``.
    """

    beta_schedule: str
    beta_start: float
    beta_end: float
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """The schedule of a diffusers scheduler config (diffusers' defaults for missing fields)."""
        return cls(config.get("beta_schedule", "linear"), float(config.get("beta_start", 0.0001)),
                   float(config.get("beta_end", 0.02)), int(config.get("num_train_timesteps", 1000)),
                   config.get("prediction_type", "epsilon"))

    def replace(self, **changes) -> "NoiseSchedule":
        """A copy with ``changes``; None values keep the current field."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def scheduler_kwargs(self) -> dict:
        """Overrides for ``Scheduler.from_config``; ``trained_betas=None`` so a base's explicit β table cannot win."""
        return {**dataclasses.asdict(self), "trained_betas": None}

    def matches(self, other: "NoiseSchedule") -> bool:
        return (self.beta_schedule, self.num_train_timesteps, self.prediction_type) == (
            other.beta_schedule, other.num_train_timesteps, other.prediction_type) and all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in ((self.beta_start, other.beta_start),
                                                          (self.beta_end, other.beta_end)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def __str__(self) -> str:
        return (f"{self.beta_schedule} beta {self.beta_start:g}-{self.beta_end:g} over {self.num_train_timesteps} steps, "
                f"{self.prediction_type}")


# AnimateLCM's schedule (its LCMScheduler config): what the video sampler and, by default, every distillation use.
ANIMATELCM = NoiseSchedule("linear", 0.00085, 0.012)
ANIMATELCM_ORIGINAL_STEPS = 100  # LCMScheduler original_inference_steps: the teacher's skipping-step grid

SAMPLERS = {  # sampler name -> (diffusers scheduler class, settings over the schedule)
    # AnimateLCM's own LCMScheduler config.
    "lcm": ("LCMScheduler", dict(original_inference_steps=ANIMATELCM_ORIGINAL_STEPS, steps_offset=1)),
    # Baselines for models that are not consistency-distilled, with CFG. "trailing" spacing starts at t = T − 1 (a
    # "leading" 1-step grid would start at t = 1, Lin et al. 2024), and the last step lands on ᾱ = 1 (the x̂_0
    # prediction) as LCM's does, so few-step comparisons are fair.
    "ddim": ("DDIMScheduler", dict(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)),
    "dpmpp": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2,
                                                  timestep_spacing="trailing", final_sigmas_type="zero")),
}


def sampling_schedule(base_config: dict | None = None) -> NoiseSchedule:
    """The video sampler's schedule: AnimateLCM's β over the base's T and prediction type."""
    base = NoiseSchedule.from_config(dict(base_config or {}))
    return dataclasses.replace(ANIMATELCM, num_train_timesteps=base.num_train_timesteps,
                               prediction_type=base.prediction_type)


def make_scheduler(sampler: str = "lcm", base_config: dict | None = None, schedule: NoiseSchedule | None = None):
    """The diffusers scheduler of ``sampler`` over ``base_config`` with ``schedule``'s β — the one constructor used by
    ``weightlab generate``, the ONNX runtime and the trainers' validation samples.

    Args:
        sampler (str, default "lcm"): ``lcm`` (AnimateLCM's ``LCMScheduler``), ``ddim`` or ``dpmpp`` (DPM-Solver++ 2M).
        base_config (dict | None, default None): the base pipeline's scheduler config (fields the scheduler class
            does not take are dropped).
        schedule (NoiseSchedule | None, default None): the β schedule; :func:`sampling_schedule` of ``base_config``
            when None.
    Returns:
        SchedulerMixin: a fresh scheduler.
    """
    import diffusers

    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}. Fix: use one of {', '.join(SAMPLERS)}.")
    name, settings = SAMPLERS[sampler]
    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in dict(base_config or {}).items() if k in accepted}
    schedule = schedule or sampling_schedule(base_config)
    return cls.from_config(config, **schedule.scheduler_kwargs(), **settings)


def schedule_metadata(schedule: NoiseSchedule, *, num_ddim_timesteps: int | None = None, sigma_data: float | None = None,
                      timestep_scaling: float | None = None) -> dict[str, str]:
    """safetensors metadata recording ``schedule`` and, for a consistency distillation (``num_ddim_timesteps``
    given), its DDIM solver: N, skip k = T // N, σ_d and the timestep scaling of the boundary conditions."""
    meta = {SCHEDULE_KEY: schedule.to_json()}
    if num_ddim_timesteps is not None:
        meta[CONSISTENCY_KEY] = json.dumps({
            "solver": "ddim", "num_ddim_timesteps": num_ddim_timesteps,
            "skip": schedule.num_train_timesteps // num_ddim_timesteps, "sigma_data": sigma_data,
            "timestep_scaling": timestep_scaling}, sort_keys=True)
    return meta


def distilled_schedule(metadata: dict[str, str], source: object = "residual") -> NoiseSchedule | None:
    """The schedule a consistency-distilled residual was trained under; None for other residuals (no record)."""
    if CONSISTENCY_KEY not in metadata or SCHEDULE_KEY not in metadata:
        return None
    try:
        return NoiseSchedule(**json.loads(metadata[SCHEDULE_KEY]))
    except (TypeError, ValueError) as e:
        raise FileFormatError(f"{source}: __metadata__ {SCHEDULE_KEY} is not a noise schedule record ({e}). "
                              "Fix: re-save the residual with weightlab's trainers, or remove the damaged key.") from None


def check_distilled(metadata: dict[str, str], want: NoiseSchedule, *, source: object, user: str, fix: str) -> None:
    """Refuse a consistency-distilled residual recorded under another schedule than ``want`` (what ``user`` uses).

    Residuals without a record (third-party files, style LoRAs) pass: nothing says which ODE they solve.
    """
    have = distilled_schedule(metadata, source)
    if have is not None and not have.matches(want):
        raise ScheduleMismatchError(
            f"{source} was consistency-distilled under the noise schedule [{have}], but {user} uses [{want}]: its "
            f"one-step solutions belong to another ODE. Fix: {fix}")
