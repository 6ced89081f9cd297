"""Training data: captioned image folders, video folders or CSVs of clips, and a synthetic moving-shapes generator.

Captions come from ``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line, as Hugging Face
``imagefolder``) or from a side-car ``.txt`` next to each file. Frames are resized (shorter side) and
centre-cropped to a square; clips take ``num_frames`` frames ``frame_stride`` apart from a window chosen
uniformly in the video. Pixels are ``[-1, 1]``; images ``[3, H, W]``, clips ``[F, 3, H, W]``.

Data order and every random draw of a sample are functions of ``(seed, global sample number)``
(:class:`GlobalBatchSampler`): a resumed run, or a run on N processes, sees exactly the samples and noise of one
uninterrupted single-process run with the same global batch.

Example:
    >>> ds = SyntheticShapes(8, resolution=16, num_frames=4)
    >>> item = ds.load(0, torch.Generator().manual_seed(0))
    >>> item["pixels"].shape, item["caption"]
    (torch.Size([4, 3, 16, 16]), 'a red circle moving right')
"""

from __future__ import annotations

import csv
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from weightlab.errors import FileFormatError, WeightlabError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def resize_center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic) and crop the centre square. ``[H, W, 3]`` uint8 in and out."""
    from PIL import Image

    img = Image.fromarray(frame)
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, H, W]`` in ``[-1, 1]``."""
    return torch.from_numpy(np.array(frames)).movedim(-1, -3).float() / 127.5 - 1.0


def _rgb(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = np.stack([frame] * 3, axis=-1)
    return frame[..., :3].astype(np.uint8)


def read_captions(folder: Path, files: list[Path]) -> list[str]:
    """Captions for ``files`` from ``folder/metadata.jsonl`` or side-car ``.txt`` files.

    Raises:
        WeightlabError: some file has no caption (named, with the two ways to give one).
    """
    table: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "file_name" not in row or not ({"text", "caption"} & row.keys()):
                    raise WeightlabError(f"{meta}:{n}: each line needs file_name and text (or caption). Fix: e.g. "
                                         '{"file_name": "0001.png", "text": "a red circle"}.')
                table[row["file_name"]] = row.get("text", row.get("caption"))
    captions, missing = [], []
    for f in files:
        rel = f.relative_to(folder).as_posix()
        if rel in table:
            captions.append(table[rel])
        elif f.with_suffix(".txt").is_file():
            captions.append(f.with_suffix(".txt").read_text().strip())
        else:
            missing.append(rel)
    if missing:
        raise WeightlabError(f"{folder}: {len(missing)} file(s) without a caption, e.g. {', '.join(missing[:3])}. Fix: add "
                             "them to metadata.jsonl (file_name, text) or write a side-car .txt with the same stem.")
    return captions


def _list(folder: Path, exts: tuple[str, ...], what: str) -> list[Path]:
    if not folder.is_dir():
        raise WeightlabError(f"{folder}: not a folder. Fix: point data.path at a folder of {what}.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)
    if not files:
        raise WeightlabError(f"{folder}: no {what} ({', '.join(exts)}) found. Fix: check data.path and data.format.")
    return files


class ImageFolder(Dataset):
    """Captioned images under ``folder`` (recursively)."""

    def __init__(self, folder: str | Path, resolution: int):
        self.folder, self.resolution = Path(folder), resolution
        self.files = _list(self.folder, IMAGE_EXTS, "images")
        self.captions = read_captions(self.folder, self.files)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, generator: torch.Generator) -> dict:
        import imageio.v3 as iio

        frame = resize_center_crop(_rgb(iio.imread(self.files[index])), self.resolution)
        return {"pixels": to_pixels(frame), "caption": self.captions[index]}


@dataclass(frozen=True)
class Clip:
    """A video file, its caption and an optional ``[start_frame, end_frame)`` range."""

    path: Path
    caption: str
    start_frame: int = 0
    end_frame: int | None = None


class VideoClips(Dataset):
    """Clips of ``num_frames`` frames, ``stride`` apart, from a uniformly chosen window of each clip's range."""

    def __init__(self, clips: list[Clip], resolution: int, num_frames: int, stride: int):
        self.clips, self.resolution, self.num_frames, self.stride = clips, resolution, num_frames, stride

    @classmethod
    def from_folder(cls, folder: str | Path, resolution: int, num_frames: int, stride: int) -> "VideoClips":
        folder = Path(folder)
        files = _list(folder, VIDEO_EXTS, "videos")
        return cls([Clip(f, c) for f, c in zip(files, read_captions(folder, files))], resolution, num_frames, stride)

    @classmethod
    def from_csv(cls, path: str | Path, resolution: int, num_frames: int, stride: int) -> "VideoClips":
        """CSV columns ``video`` (relative to the CSV's folder, or absolute), ``caption``, optional ``start_frame``,
        ``end_frame`` (frame indices, end exclusive)."""
        path = Path(path)
        if not path.is_file():
            raise WeightlabError(f"{path}: no such CSV. Fix: point data.path at a CSV with columns video,caption.")
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"video", "caption"} <= rows[0].keys():
            raise WeightlabError(f"{path}: needs a header with columns video,caption (optional start_frame,end_frame).")
        clips = [Clip(path.parent / r["video"], r["caption"], int(r.get("start_frame") or 0),
                      int(r["end_frame"]) if r.get("end_frame") else None) for r in rows]
        return cls(clips, resolution, num_frames, stride)

    def __len__(self) -> int:
        return len(self.clips)

    def load(self, index: int, generator: torch.Generator) -> dict:
        import imageio.v3 as iio

        clip = self.clips[index]
        span = (self.num_frames - 1) * self.stride + 1
        window: deque = deque(maxlen=span)
        chosen, windows, n = None, 0, 0
        try:
            for n, frame in enumerate(iio.imiter(clip.path), 1):  # one decoding pass, memory bounded by the window
                if n <= clip.start_frame:
                    continue
                if clip.end_frame is not None and n > clip.end_frame:
                    break
                window.append(frame)
                if len(window) == span:
                    windows += 1  # reservoir sampling: window m replaces the choice with probability 1/m
                    if int(torch.randint(windows, (), generator=generator)) == 0:
                        chosen = list(window)
        except (OSError, ValueError) as e:
            raise FileFormatError(f"{clip.path}: cannot decode video ({e}). Fix: re-encode it (e.g. H.264 .mp4) or drop it.") from e
        if chosen is None:
            raise WeightlabError(f"{clip.path}: the clip range holds fewer than the {span} frames needed for "
                                 f"{self.num_frames} frames at stride {self.stride}. Fix: lower data.num_frames or "
                                 "data.frame_stride, or remove this clip.")
        frames = np.stack([resize_center_crop(_rgb(f), self.resolution) for f in chosen[:: self.stride]])
        return {"pixels": to_pixels(frames), "caption": clip.caption}


def synthetic_clip(index: int, resolution: int, num_frames: int | None) -> tuple[np.ndarray, str]:
    """A captioned moving shape: uint8 ``[F, H, W, 3]`` (``[H, W, 3]`` when ``num_frames`` is None) and its caption.

    Colour, shape and direction cycle with ``index``; size and the path's offset are drawn from ``index``'s seed.
    """
    color = list(COLORS)[index % len(COLORS)]
    shape = SHAPES[(index // len(COLORS)) % len(SHAPES)]
    direction = list(DIRECTIONS)[(index // (len(COLORS) * len(SHAPES))) % len(DIRECTIONS)]
    g = torch.Generator().manual_seed(index)
    r = max(1, int(resolution * (0.12 + 0.08 * float(torch.rand((), generator=g)))))
    lateral = r + float(torch.rand((), generator=g)) * (resolution - 2 * r)
    frames = num_frames or 1
    yy, xx = np.mgrid[:resolution, :resolution]
    out = np.empty((frames, resolution, resolution, 3), np.uint8)
    dx, dy = DIRECTIONS[direction]
    for f in range(frames):
        along = r + (resolution - 1 - 2 * r) * (f / max(frames - 1, 1) if num_frames else 0.5)
        along = along if dx + dy > 0 else resolution - 1 - along
        cx, cy = (along, lateral) if dx else (lateral, along)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) if shape == "circle" else (
            (abs(xx - cx) <= r) & (abs(yy - cy) <= r))
        out[f] = (245, 245, 240)
        out[f][mask] = COLORS[color]
    caption = f"a {color} {shape}" + (f" moving {direction}" if num_frames else "")
    return (out if num_frames else out[0]), caption


class SyntheticShapes(Dataset):
    """``n`` generated samples: images (``num_frames=None``) or clips of moving shapes."""

    def __init__(self, n: int, resolution: int, num_frames: int | None = None):
        self.n, self.resolution, self.num_frames = n, resolution, num_frames

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, generator: torch.Generator) -> dict:
        frames, caption = synthetic_clip(index, self.resolution, self.num_frames)
        return {"pixels": to_pixels(frames), "caption": caption}


def write_synthetic(folder: str | Path, n: int, resolution: int, num_frames: int | None = None,
                    captions: str = "metadata") -> Path:
    """Write ``n`` synthetic samples to ``folder``: PNG images or GIF clips, captions in ``metadata.jsonl`` or ``.txt``.

    Args:
        folder (str | Path): output folder (created).
        n (int): number of samples. resolution (int): square size in pixels.
        num_frames (int | None, default None): None writes images; otherwise GIFs of that many frames.
        captions (str, default "metadata"): ``metadata`` (one metadata.jsonl) or ``txt`` (side-car files).
    Returns:
        Path: the folder.
    """
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        frames, caption = synthetic_clip(i, resolution, num_frames)
        name = f"{i:05d}" + (".gif" if num_frames else ".png")
        if num_frames:
            iio.imwrite(folder / name, frames, duration=100, loop=0)
        else:
            iio.imwrite(folder / name, frames)
        if captions == "txt":
            (folder / name).with_suffix(".txt").write_text(caption)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    if captions == "metadata":
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def build_dataset(cfg, *, video: bool) -> Dataset:
    """The dataset a :class:`~weightlab.train.config.DataConfig` describes; ``video`` says what the trainer needs."""
    is_video = cfg.format in ("video_folder", "video_csv", "synthetic_videos")
    if is_video != video:
        want = "video_folder, video_csv or synthetic_videos" if video else "image_folder or synthetic_images"
        raise WeightlabError(f"data.format {cfg.format!r} gives {'videos' if is_video else 'images'}, but this trainer "
                             f"trains on {'videos' if video else 'images'}. Fix: use data.format {want}.")
    if cfg.format == "image_folder":
        return ImageFolder(cfg.path, cfg.resolution)
    if cfg.format == "video_folder":
        return VideoClips.from_folder(cfg.path, cfg.resolution, cfg.num_frames, cfg.frame_stride)
    if cfg.format == "video_csv":
        return VideoClips.from_csv(cfg.path, cfg.resolution, cfg.num_frames, cfg.frame_stride)
    return SyntheticShapes(cfg.synthetic_samples, cfg.resolution, cfg.num_frames if video else None)


def sample_seed(seed: int, sample_number: int) -> int:
    """The seed of the ``sample_number``-th sample drawn in a run (all of that sample's randomness comes from it)."""
    return (seed * 1_000_003 + sample_number) % (2**63 - 1)


class GlobalBatchSampler(Sampler):
    """This process's share of each global batch, forever, from ``start_batch`` on.

    Global batch ``b`` holds sample numbers ``b·G .. b·G + G − 1`` (``G = batch_size·world_size``); sample number
    ``m`` is item ``perm_e[m mod n]`` of epoch ``e = m // n``, ``perm_e`` a permutation seeded by ``(seed, e)``.
    Rank ``r`` takes the ``r``-th slice. Yields lists of ``(index, sample seed)``.
    """

    def __init__(self, n: int, *, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, start_batch: int = 0):
        self.n, self.batch_size, self.world_size, self.rank = n, batch_size, world_size, rank
        self.seed, self.start_batch = seed, start_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, number: int) -> int:
        epoch = number // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)))
        return int(self._perm[1][number % self.n])

    def __iter__(self):
        b = self.start_batch
        while True:
            first = (b * self.world_size + self.rank) * self.batch_size
            yield [(self._index(m), sample_seed(self.seed, m)) for m in range(first, first + self.batch_size)]
            b += 1


class _Seeded(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        item = self.dataset.load(index, torch.Generator().manual_seed(seed))
        return {**item, "seed": seed}


def _collate(items: list[dict]) -> dict:
    return {"pixels": torch.stack([i["pixels"] for i in items]), "caption": [i["caption"] for i in items],
            "seed": torch.tensor([i["seed"] for i in items], dtype=torch.long)}


def build_loader(dataset, *, batch_size: int, world_size: int, rank: int, seed: int, start_batch: int,
                 num_workers: int = 0) -> DataLoader:
    """An endless loader of this rank's micro-batches (``pixels``, ``caption``, ``seed``) starting at ``start_batch``."""
    sampler = GlobalBatchSampler(len(dataset), batch_size=batch_size, world_size=world_size, rank=rank, seed=seed,
                                 start_batch=start_batch)
    return DataLoader(_Seeded(dataset), batch_sampler=sampler, collate_fn=_collate, num_workers=num_workers)
