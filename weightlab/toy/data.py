"""Labelled toy data for the AnimateLCM reproduction, built on :func:`weightlab.train.data.synthetic_clip`.

The trainers read the moving shapes themselves (``DataConfig(format="synthetic_images"|"synthetic_videos")``); this
module adds what the experiments need on top: labels for the evaluator, clips at several speeds (a window of a
slower pass), a restyled ``outlined`` variant for the style LoRA (the base never sees it), and an image folder with
``metadata.jsonl`` that ``style-lora`` reads. Everything is a function of the sample index.

Example:
    >>> s = toy_set(4, start=0, num_frames=16, style="outlined")
    >>> s.frames.shape, s.captions[0], s.labels[0].tolist()
    ((4, 16, 32, 32, 3), 'a red circle moving right', [0, 0, 0, 1])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from weightlab.errors import WeightlabError
from weightlab.train.data import COLORS, DIRECTIONS, SHAPES, synthetic_clip

# Attribute -> its values; a label is the value's index. ``style`` is not in captions (the style LoRA adds it).
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLORS), "direction": tuple(DIRECTIONS),
                                          "style": ("filled", "outlined")}
STYLES = ATTRIBUTES["style"]
BACKGROUND = (245, 245, 240)  # synthetic_clip's background colour
HELD_OUT = 1_000_000  # first index of evaluation data: the trainers' synthetic data uses indices 0..samples-1


@dataclass(frozen=True)
class ToySet:
    """Frames, captions and labels of ``n`` toy samples.

    Attributes:
        frames (np.ndarray): uint8 ``[n, F, H, W, 3]`` (``[n, H, W, 3]`` for images).
        captions (list[str]): ``"a red circle moving right"`` (``"a red circle"`` for images).
        labels (torch.Tensor): long ``[n, 4]``, one column per :data:`ATTRIBUTES` key (direction 0 for images).
    """

    frames: np.ndarray
    captions: list[str]
    labels: torch.Tensor


def parse_caption(caption: str) -> dict[str, int | None]:
    """The label of each attribute a caption names (None where it names none), e.g. ``"a red circle moving left"``
    -> ``{"shape": 0, "colour": 0, "direction": 1, "style": None}``."""
    words = caption.lower().replace(",", " ").split()
    return {attr: next((i for i, v in enumerate(values) if v in words), None) for attr, values in ATTRIBUTES.items()}



def noise_motion(caption: str, *, resolution: int = 32, num_frames: int = 16, vae_factor: int = 2) -> tuple[float, float]:
    """Latent pixels per frame that a toy clip moving the caption's way travels (for
    :class:`weightlab.noise_prior.NoisePrior`'s ``motion``): a shape of the mean radius crosses the frame once in
    ``num_frames`` frames (:func:`synthetic_clip`). ``(0, 0)`` when the caption names no direction."""
    direction = parse_caption(caption)["direction"]
    if direction is None:
        return (0.0, 0.0)
    r = 0.16 * resolution  # synthetic_clip draws radii of 0.12-0.20 of the frame
    speed = (resolution - 1 - 2 * r) / (num_frames - 1) / vae_factor
    dx, dy = DIRECTIONS[ATTRIBUTES["direction"][direction]]
    return (dx * speed, dy * speed)


def outline(frames: np.ndarray, width: int = 2) -> np.ndarray:
    """The ``outlined`` style: each shape keeps a ``width``-pixel rim, its inside becomes background."""
    mask = (frames != np.array(BACKGROUND, np.uint8)).any(-1)
    inner = mask.copy()
    for _ in range(width):  # erosion by a 4-neighbourhood, ``width`` times
        padded = np.pad(inner, [(0, 0)] * (inner.ndim - 2) + [(1, 1), (1, 1)])
        inner = inner & padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1] & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:]
    out = frames.copy()
    out[inner] = BACKGROUND
    return out


def toy_clip(index: int, *, resolution: int = 32, num_frames: int | None = 16, speed: float = 1.0,
             style: str = "filled") -> tuple[np.ndarray, str]:
    """Sample ``index`` as uint8 frames ``[F, H, W, 3]`` (``[H, W, 3]`` for ``num_frames=None``) and its caption.

    ``speed`` 1.0 crosses the frame in ``num_frames`` frames (:func:`synthetic_clip`); ``speed`` s < 1 is a window of
    ``num_frames`` consecutive frames of a pass ``num_frames / s`` frames long, its start drawn from the index.
    """
    if style not in STYLES:
        raise WeightlabError(f"style {style!r} is unknown. Fix: use one of {', '.join(STYLES)}.")
    if not 0 < speed <= 1:
        raise WeightlabError(f"speed {speed} is out of range. Fix: use 0 < speed <= 1 (1 crosses the frame once).")
    if num_frames is None or speed == 1.0:
        frames, caption = synthetic_clip(index, resolution, num_frames)
    else:
        total = round(num_frames / speed)
        frames, caption = synthetic_clip(index, resolution, total)
        start = int(torch.randint(total - num_frames + 1, (), generator=torch.Generator().manual_seed(index + 7)))
        frames = frames[start:start + num_frames]
    return (outline(frames) if style == "outlined" else frames), caption


def toy_set(n: int, *, start: int = HELD_OUT, resolution: int = 32, num_frames: int | None = 16,
            speeds: tuple[float, ...] = (1.0,), style: str = "filled") -> ToySet:
    """Samples ``start .. start + n − 1`` (speeds cycle with the index; labels cycle over all 32 shape × colour ×
    direction combinations every 32 indices, so ``n`` a multiple of 32 is balanced)."""
    clips = [toy_clip(start + i, resolution=resolution, num_frames=num_frames, speed=speeds[i % len(speeds)],
                      style=style) for i in range(n)]
    captions = [c for _, c in clips]
    labels = torch.tensor([[v or 0 for v in parse_caption(c).values()] for c in captions], dtype=torch.long)
    labels[:, list(ATTRIBUTES).index("style")] = STYLES.index(style)
    return ToySet(np.stack([f for f, _ in clips]), captions, labels)


def write_image_folder(folder: str | Path, n: int, *, resolution: int = 32, style: str = "filled",
                       num_frames: int = 16) -> Path:
    """Write ``n`` captioned PNG images and ``metadata.jsonl``: an ``image_folder`` for the trainers.

    Image ``i`` is a frame of clip ``i`` drawn from the index, so the shapes stand at every position of their paths
    (as in the video frames the spatial layers later denoise); its caption drops the motion (``"a red circle"``).

    Args:
        folder (str | Path): output folder (created; existing files of the same names are replaced).
        n (int): number of images. resolution (int, default 32): square size in pixels.
        style (str, default "filled"): ``filled`` or ``outlined`` (:func:`outline`).
        num_frames (int, default 16): length of the clips the frames come from.
    Returns:
        Path: the folder.
    """
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        frames, caption = toy_clip(i, resolution=resolution, num_frames=num_frames, style=style)
        pick = int(torch.randint(num_frames, (), generator=torch.Generator().manual_seed(i)))
        iio.imwrite(folder / f"{i:05d}.png", frames[pick])
        rows.append(json.dumps({"file_name": f"{i:05d}.png", "text": caption.split(" moving ")[0]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder
