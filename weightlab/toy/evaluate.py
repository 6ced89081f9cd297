"""The toy evaluator: a small classifier of shape, colour, style and direction trained on real toy data, the
Fréchet distance on its penultimate features (toy FID for images, toy FVD for videos) and prompt accuracy (toy
CLIPSIM: does the classifier read the prompt's shape, colour and direction from the sample).

Features: the appearance branch (a CNN per frame, averaged over frames) gives ``FEATURES`` numbers; videos add the
motion branch's ``FEATURES`` (a CNN over ``MOTION_FRAMES`` evenly spaced frames stacked as channels, so it sees the
shape's displacement). FID uses appearance only, FVD both.

On sample counts: the Fréchet distance of *estimated* means and covariances is biased upwards, by roughly
``tr(Σ₁ + Σ₂)/n`` for ``n`` samples per side, and its spread shrinks like ``1/√n``. Values are only comparable at the
same ``n`` and feature size; every table reports FD(real, real′) — two disjoint real sets of the same ``n`` — as the
floor a perfect generator would reach. With ``n`` below the feature size the covariances are singular; the formula
still holds (all square roots are of positive semi-definite matrices).

Example:
    >>> ev = Evaluator.train(seed=0)                                    # doctest: +SKIP
    >>> real, fake = toy_set(64), toy_set(64, start=2_000_000)          # doctest: +SKIP
    >>> ev.fvd(real.frames, fake.frames), ev.prompt_accuracy(fake.frames, fake.captions)   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from weightlab.errors import WeightlabError
from weightlab.toy.data import ATTRIBUTES, ToySet, parse_caption, toy_set
from weightlab.train.data import to_pixels

log = logging.getLogger(__name__)
FEATURES = 32  # per branch: FID features are 32-d, FVD features 64-d
MOTION_FRAMES = 4
HEADS = {"shape": "appearance", "colour": "appearance", "style": "appearance", "direction": "motion"}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)`` in float64 (Dowson & Landau 1982; the FID formula).

    ``tr((Σ₁Σ₂)^½)`` is computed as ``tr((Σ₁^½ Σ₂ Σ₁^½)^½)`` — the same eigenvalues, of a symmetric PSD matrix — by two
    symmetric eigen-decompositions (tiny negative eigenvalues from rounding are clipped to 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise WeightlabError(f"Fréchet distance of mismatched statistics: means {mu1.shape}, {mu2.shape}, covariances "
                             f"{s1.shape}, {s2.shape}. Fix: compute both from features of the same size.")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    middle = root1 @ s2 @ root1
    cross = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def frechet_distance_of(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to feature rows ``a`` ``[n, d]`` and ``b`` ``[m, d]``."""
    if len(a) < 2 or len(b) < 2:
        raise WeightlabError(f"Fréchet distance needs at least 2 samples per side, got {len(a)} and {len(b)}. "
                             "Fix: evaluate more samples (see the module's note on sample counts).")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _motion_frames(frames: int) -> torch.Tensor:
    """Indices of the ``MOTION_FRAMES`` evenly spaced frames the motion branch sees."""
    return torch.linspace(0, frames - 1, MOTION_FRAMES).round().long()


def _trunk(in_channels: int, width: int) -> nn.Sequential:
    """Three 3×3 convolutions (the last two stride 2), GroupNorm + SiLU, global average pool -> ``2·width``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ToyClassifier(nn.Module):
    """Appearance branch (per frame) with shape, colour and style heads; motion branch with a direction head.

    Input: pixels ``[B, F, 3, H, W]`` in ``[-1, 1]``; ``F = 1`` (images) has no motion branch output.
    """

    def __init__(self, width: int = FEATURES // 2):
        super().__init__()
        self.appearance = _trunk(3, width)
        self.motion = _trunk(3 * MOTION_FRAMES, width)
        self.heads = nn.ModuleDict({a: nn.Linear(2 * width, len(ATTRIBUTES[a])) for a in HEADS})

    def features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``appearance`` ``[B, FEATURES]`` (mean over frames) and, for clips, ``motion`` ``[B, FEATURES]``."""
        b, f = pixels.shape[:2]
        out = {"appearance": self.appearance(pixels.flatten(0, 1)).unflatten(0, (b, f)).mean(1)}
        if f > 1:
            out["motion"] = self.motion(pixels[:, _motion_frames(f)].flatten(1, 2))
        return out

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute (``direction`` only for clips)."""
        feats = self.features(pixels)
        return {a: head(feats[HEADS[a]]) for a, head in self.heads.items() if HEADS[a] in feats}


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, F, H, W, 3]`` (or images ``[N, H, W, 3]``) -> float ``[N, F, 3, H, W]`` in ``[-1, 1]``."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (4, 5) or frames.shape[-1] != 3:
        raise WeightlabError(f"expected uint8 frames [N, F, H, W, 3] or images [N, H, W, 3], got {frames.dtype} "
                             f"{frames.shape}. Fix: pass Clip.frames (uint8), stacked over samples.")
    return to_pixels(frames if frames.ndim == 5 else frames[:, None])


def _training_batch(data: ToySet, rng: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clips, each with Gaussian pixel noise of a random σ ≤ 0.1 (generated samples are not clean).

    Only the motion branch's frames are kept: the same input to it, a quarter of the appearance branch's work."""
    pick = torch.randint(len(data.frames), (batch,), generator=rng)
    frames = data.frames.shape[1]
    pixels = to_pixels(data.frames[pick.numpy()][:, _motion_frames(frames).numpy()])
    sigma = 0.1 * torch.rand((batch, 1, 1, 1, 1), generator=rng)
    return pixels + sigma * torch.randn(pixels.shape, generator=rng), data.labels[pick]


class Evaluator:
    """A trained :class:`ToyClassifier` and the metrics computed with it."""

    def __init__(self, model: ToyClassifier, *, batch_size: int = 64):
        self.model, self.batch_size = model.eval().requires_grad_(False), batch_size

    @classmethod
    def train(cls, *, seed: int = 0, samples: int = 1024, steps: int = 800, batch_size: int = 32, resolution: int = 32,
              num_frames: int = 16) -> "Evaluator":
        """Train the classifier on real toy clips (indices ``0..samples−1``; filled and outlined, speeds 1 and ½).

        Args:
            seed (int, default 0): initial weights and batch order.
            samples (int, default 1024): clips per style. steps (int, default 800): AdamW steps (lr 2e-3).
            batch_size (int, default 32): clips per step. resolution, num_frames: the clips' size.
        Returns:
            Evaluator: the trained classifier in eval mode.
        """
        sets = [toy_set(samples, start=0, resolution=resolution, num_frames=num_frames, speeds=(1.0, 0.5), style=s)
                for s in ATTRIBUTES["style"]]
        data = ToySet(np.concatenate([s.frames for s in sets]), sum((s.captions for s in sets), []),
                      torch.cat([s.labels for s in sets]))
        torch.manual_seed(seed)
        model = ToyClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        rng = torch.Generator().manual_seed(seed)
        loss_fn = nn.CrossEntropyLoss()
        for step in range(steps):
            pixels, labels = _training_batch(data, rng, batch_size)
            logits = model(pixels)
            loss = sum(loss_fn(logits[a], labels[:, i]) for i, a in enumerate(ATTRIBUTES))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0:
                log.info("evaluator step %d loss %.4f", step, loss.item())
        return cls(model)

    def save(self, path: str | Path) -> Path:
        """The classifier's weights as safetensors."""
        from weightlab.files import save_tensors

        return save_tensors(self.model.state_dict(), path, {"weightlab.toy": "evaluator"})

    @classmethod
    def load(cls, path: str | Path) -> "Evaluator":
        from weightlab.files import load_tensors

        model = ToyClassifier()
        model.load_state_dict(load_tensors(path)[0])
        return cls(model)

    @torch.no_grad()
    def _run(self, frames: np.ndarray, fn) -> dict[str, torch.Tensor]:
        pixels = _pixels(frames)
        parts = [fn(pixels[i:i + self.batch_size]) for i in range(0, len(pixels), self.batch_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def features(self, frames: np.ndarray) -> np.ndarray:
        """Penultimate features ``[N, D]``: appearance for images (``D = 32``), appearance ⊕ motion for clips (64)."""
        feats = self._run(frames, self.model.features)
        return torch.cat([feats[k] for k in ("appearance", "motion") if k in feats], 1).double().numpy()

    def predict(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Predicted label per attribute (``direction`` for clips only)."""
        return {a: v.argmax(1).numpy() for a, v in self._run(frames, self.model).items()}

    def describe(self, clip: np.ndarray) -> str:
        """What the classifier reads in one clip (uint8 ``[F, H, W, 3]``), as a caption: ``"a red circle moving
        right (outlined)"``."""
        pred = {a: ATTRIBUTES[a][int(v[0])] for a, v in self.predict(clip[None]).items()}
        return f"a {pred['colour']} {pred['shape']} moving {pred['direction']} ({pred['style']})"

    def fid(self, images_a: np.ndarray, images_b: np.ndarray) -> float:
        """Toy FID: Fréchet distance of appearance features of two image sets (uint8 ``[N, H, W, 3]``)."""
        return frechet_distance_of(self.features(images_a), self.features(images_b))

    def fvd(self, clips_a: np.ndarray, clips_b: np.ndarray) -> float:
        """Toy FVD: Fréchet distance of appearance ⊕ motion features of two clip sets (uint8 ``[N, F, H, W, 3]``)."""
        if np.ndim(clips_a) != 5 or np.ndim(clips_b) != 5:
            raise WeightlabError("fvd compares clips [N, F, H, W, 3]. Fix: use fid for images.")
        return frechet_distance_of(self.features(clips_a), self.features(clips_b))

    def prompt_accuracy(self, frames: np.ndarray, captions: list[str], *, style: str | None = None) -> dict[str, float]:
        """Toy CLIPSIM: per attribute the prompt names, the fraction of samples where the classifier reads it; ``all``:
        every attribute the caption names right. ``style`` (``filled``/``outlined``) also scores the style head."""
        if len(frames) != len(captions):
            raise WeightlabError(f"{len(frames)} samples but {len(captions)} captions. "
                                 "Fix: pass one caption per sample.")
        pred = self.predict(frames)
        want = [parse_caption(c) for c in captions]
        if style is not None:
            want = [{**w, "style": ATTRIBUTES["style"].index(style)} for w in want]
        hits = {a: [pred[a][i] == w[a] for i, w in enumerate(want) if w[a] is not None] for a in pred}
        out = {a: float(np.mean(h)) for a, h in hits.items() if h}
        named = [a for a in pred if a != "style"]
        out["all"] = float(np.mean([all(pred[a][i] == w[a] for a in named if w[a] is not None)
                                    for i, w in enumerate(want)]))
        return out
