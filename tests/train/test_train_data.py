"""Data: caption sources, clip sampling (stride, window, resize/crop), the synthetic generator, the global sampler."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from weightlab.errors import WeightlabError
from weightlab.train.config import DataConfig
from weightlab.train.data import (
    GlobalBatchSampler,
    ImageFolder,
    SyntheticShapes,
    VideoClips,
    build_dataset,
    build_loader,
    resize_center_crop,
    synthetic_clip,
    write_synthetic,
)


def g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("captions", ["metadata", "txt"])
def test_image_folder_reads_captions_from_metadata_or_sidecar_txt(tmp_path, captions):
    write_synthetic(tmp_path, 5, resolution=24, captions=captions)
    assert (tmp_path / "metadata.jsonl").exists() == (captions == "metadata")
    ds = ImageFolder(tmp_path, resolution=16)
    item = ds.load(2, g())
    assert len(ds) == 5 and item["caption"] == synthetic_clip(2, 24, None)[1] == "a blue circle"
    assert item["pixels"].shape == (3, 16, 16) and -1.0 <= item["pixels"].min() < item["pixels"].max() <= 1.0


def test_missing_caption_names_the_file_and_the_fix(tmp_path):
    write_synthetic(tmp_path, 2, resolution=8, captions="txt")
    (tmp_path / "00001.txt").unlink()
    with pytest.raises(WeightlabError, match=r"00001\.png.*metadata\.jsonl"):
        ImageFolder(tmp_path, resolution=8)


def test_resize_then_centre_crop():
    frame = np.zeros((10, 20, 3), np.uint8)
    frame[:, 5:15] = 255  # a white band in the middle half
    out = resize_center_crop(frame, 8)  # 10x20 -> 8x16 -> crop columns 4..12 = the band
    assert out.shape == (8, 8, 3) and out[:, 1:-1].min() > 200


def test_video_folder_clip_frames_are_stride_apart_in_a_uniform_window(tmp_path):
    write_synthetic(tmp_path, 1, resolution=16, num_frames=8)
    decoded = np.stack(list(iio.imiter(tmp_path / "00000.gif")))
    ds = VideoClips.from_folder(tmp_path, resolution=16, num_frames=3, stride=2)  # span 5: windows start 0..3
    starts = set()
    for seed in range(40):
        clip = ds.load(0, g(seed))["pixels"]
        assert clip.shape == (3, 3, 16, 16)
        frames = ((clip.movedim(1, -1) + 1) * 127.5).round().to(torch.uint8).numpy()
        start = next(s for s in range(4) if np.array_equal(frames, decoded[s: s + 5: 2]))
        starts.add(start)
    assert starts == {0, 1, 2, 3}
    assert ds.load(0, g(5))["caption"] == "a red circle moving right"


def test_video_csv_clip_range_and_too_short_clips(tmp_path):
    write_synthetic(tmp_path / "v", 2, resolution=16, num_frames=8, captions="txt")
    (tmp_path / "clips.csv").write_text("video,caption,start_frame,end_frame\nv/00000.gif,a clip,2,7\nv/00001.gif,short,0,4\n")
    ds = build_dataset(DataConfig(format="video_csv", path=tmp_path / "clips.csv", resolution=16, num_frames=3,
                                  frame_stride=2), video=True)
    decoded = np.stack(list(iio.imiter(tmp_path / "v" / "00000.gif")))
    clip = ((ds.load(0, g())["pixels"].movedim(1, -1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(clip, decoded[2:7:2])  # the only window inside frames [2, 7)
    with pytest.raises(WeightlabError, match="fewer than the 5 frames"):
        ds.load(1, g())


def test_synthetic_clips_move_and_images_do_not():
    frames, caption = synthetic_clip(0, 32, 6)
    assert frames.shape == (6, 32, 32, 3) and caption == "a red circle moving right"
    red = (frames[..., 0] > 200) & (frames[..., 1] < 100)
    xs = [np.argwhere(r)[:, 1].mean() for r in red]
    assert all(b > a for a, b in zip(xs, xs[1:]))  # moving right
    image, caption = synthetic_clip(13, 32, None)
    assert image.shape == (32, 32, 3) and caption == "a green square"
    item = SyntheticShapes(4, 16, num_frames=4).load(3, g())
    assert item["pixels"].shape == (4, 3, 16, 16)


def test_build_dataset_refuses_images_for_a_video_trainer():
    with pytest.raises(WeightlabError, match="synthetic_videos"):
        build_dataset(DataConfig(format="synthetic_images", resolution=8), video=True)


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_global_sampler_two_ranks_equal_one_rank_with_the_doubled_batch():
    one = _take(GlobalBatchSampler(5, batch_size=4, seed=3), 6)
    r0 = _take(GlobalBatchSampler(5, batch_size=2, world_size=2, rank=0, seed=3), 6)
    r1 = _take(GlobalBatchSampler(5, batch_size=2, world_size=2, rank=1, seed=3), 6)
    assert [a + b for a, b in zip(r0, r1)] == one
    flat = [i for batch in one for i, _ in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # epochs are permutations
    assert len({s for batch in one for _, s in batch}) == 24  # every draw has its own seed


def test_global_sampler_resumes_at_any_batch():
    full = _take(GlobalBatchSampler(7, batch_size=3, seed=1), 8)
    assert _take(GlobalBatchSampler(7, batch_size=3, seed=1, start_batch=5), 3) == full[5:]


def test_loader_yields_pixels_captions_and_seeds():
    batch = next(iter(build_loader(SyntheticShapes(4, 8), batch_size=2, world_size=1, rank=0, seed=0, start_batch=0)))
    assert batch["pixels"].shape == (2, 3, 8, 8) and len(batch["caption"]) == 2 and batch["seed"].dtype == torch.long


def test_metadata_jsonl_lines_need_file_name_and_text(tmp_path):
    write_synthetic(tmp_path, 1, resolution=8)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file": "00000.png", "text": "x"}) + "\n")
    with pytest.raises(WeightlabError, match="file_name and text"):
        ImageFolder(tmp_path, resolution=8)
