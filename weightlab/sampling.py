"""The sampling contract that the PyTorch and ONNX Runtime video pipelines share: defaults, request checks, the
returned :class:`Clip`, and the last steps from VAE output to frames.

:class:`weightlab.video.VideoPipeline` and :class:`weightlab.onnx_runtime.OnnxVideoPipeline` both import it (and
neither imports the other), so a call with the same arguments is refused, or sampled, the same way by either.

Example:
    >>> check_request(sampler="lcm", frames=16, steps=4, guidance=1.0, height=512, width=512, max_frames=32,
    ...               scheduler_config={"original_inference_steps": 100, "num_train_timesteps": 1000}, multiple=64)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from weightlab.errors import SamplingError
from weightlab.schedules import SAMPLERS

if TYPE_CHECKING:
    import numpy as np
    import torch

DEFAULT_FRAMES, DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SAMPLER = 16, 4, 1.0, "lcm"
MAX_GUIDANCE = 2.0  # LCM sampler only: consistency models are sampled without CFG or with mild CFG
DECODE_CHUNK = 16  # frames per VAE decode call, as diffusers' AnimateDiffPipeline


@dataclass
class Clip:
    """One sampled clip.

    Attributes:
        video (np.ndarray): ``(F, H, W, 3)`` float32 in [0, 1], before quantisation (compare clips with this).
        latents (torch.Tensor): the final latents ``(1, C, F, h, w)``.
        seconds (dict[str, float]): ``encode`` (prompt), ``denoise`` (the step loop, as the paper times it),
            ``decode`` (VAE), ``total``.
    """

    video: "np.ndarray"
    latents: "torch.Tensor"
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def frames(self) -> "np.ndarray":
        """``(F, H, W, 3)`` uint8 frames, ready for :func:`weightlab.video.write_video`."""
        import numpy as np

        return np.round(self.video * 255.0).astype(np.uint8)


def check_request(*, sampler: str, frames: int, steps: int, guidance: float, height: int, width: int, max_frames: int,
                  scheduler_config: dict, multiple: int) -> None:
    """Refuse what the model cannot sample, with the fix (shared by the PyTorch and ONNX pipelines).

    ``scheduler_config`` is the LCM scheduler's config (``original_inference_steps``, ``num_train_timesteps``).
    """
    if sampler not in SAMPLERS:
        raise SamplingError(f"sampler={sampler!r} is unknown. Fix: use one of {', '.join(SAMPLERS)}.")
    if not 1 <= frames <= max_frames:
        raise SamplingError(
            f"frames={frames}: this motion module's positional table holds {max_frames} frames "
            "(motion_max_seq_length), so one window samples 1 to that many. "
            f"Fix: pass frames <= {max_frames} (e.g. --frames 16, the trained length).")
    if sampler == "lcm":
        max_steps, grid = scheduler_config["original_inference_steps"], "original_inference_steps"
    else:
        max_steps, grid = scheduler_config["num_train_timesteps"], "num_train_timesteps"
    if not 1 <= steps <= max_steps:
        raise SamplingError(f"steps={steps}: the {sampler} sampler takes 1 to {max_steps} steps ({grid}). "
                            "Fix: use 4 (AnimateLCM's default) or another value in range.")
    if guidance < 1.0:
        raise SamplingError(f"guidance={guidance}: 1.0 samples without CFG, above 1.0 with CFG; below 1.0 means "
                            "nothing here. Fix: use 1.0 or more.")
    if sampler == "lcm" and guidance > MAX_GUIDANCE:
        raise SamplingError(f"guidance={guidance}: consistency-distilled video models are sampled with the lcm sampler "
                            f"without CFG (1.0) or with mild CFG up to {MAX_GUIDANCE}; higher values burn the frames. "
                            f"Fix: use 1.0–{MAX_GUIDANCE}, or sampler ddim/dpmpp for a model that is not "
                            "consistency-distilled (e.g. guidance 7.5).")
    if height % multiple or width % multiple or height < 2 * multiple or width < 2 * multiple:
        raise SamplingError(f"{height}x{width}: height and width must be multiples of {multiple} (VAE factor x 8), "
                            f"at least {2 * multiple}. Fix: e.g. {8 * multiple}x{8 * multiple}.")


def postprocess(video: "torch.Tensor") -> "np.ndarray":
    """VAE output ``(1, 3, F, H, W)`` in [-1, 1] -> ``(F, H, W, 3)`` float32 in [0, 1] (diffusers' postprocessing)."""
    return (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu().numpy()


def sync(device) -> None:
    """Wait for queued GPU work so wall-clock timings are true."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
