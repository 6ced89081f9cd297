"""PyTorch assembly and sampling: AnimateLCM scheduler, seeds, limits, MP4/GIF output, merged-folder sources."""

import inspect

import numpy as np
import pytest


@pytest.fixture(scope="module")
def pipe(recipe):
    from weightlab.video import VideoPipeline

    return VideoPipeline.from_source(recipe)


def test_assembly_uses_animatelcm_scheduler_and_paper_defaults(pipe):
    from diffusers import AnimateDiffPipeline, LCMScheduler, UNetMotionModel

    assert isinstance(pipe.pipe, AnimateDiffPipeline) and isinstance(pipe.pipe.unet, UNetMotionModel)
    sched = pipe.pipe.scheduler
    assert isinstance(sched, LCMScheduler)
    assert (sched.config.beta_schedule, sched.config.beta_start, sched.config.beta_end) == ("linear", 0.00085, 0.012)
    assert (sched.config.original_inference_steps, sched.config.steps_offset) == (100, 1)
    defaults = {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items()}
    assert (defaults["frames"], defaults["steps"], defaults["guidance"], defaults["sampler"]) == (16, 4, 1.0, "lcm")


def test_same_seed_same_clip_other_seed_other_clip(pipe):
    a = pipe("a cat", frames=4, steps=2, seed=1, progress=False)
    b = pipe("a cat", frames=4, steps=2, seed=1, progress=False)
    c = pipe("a cat", frames=4, steps=2, seed=2, progress=False)
    assert a.video.shape == (4, 32, 32, 3) and a.video.dtype == np.float32
    assert np.array_equal(a.video, b.video)
    assert not np.array_equal(a.latents.numpy(), c.latents.numpy())
    assert set(a.seconds) == {"encode", "denoise", "decode", "total"}


def test_cfg_and_size_are_honoured(pipe):
    clip = pipe("a cat", frames=3, steps=2, guidance=1.5, negative_prompt="blur", height=32, width=48, progress=False)
    assert clip.frames.shape == (3, 32, 48, 3) and clip.frames.dtype == np.uint8


@pytest.mark.parametrize("kwargs, words", [
    (dict(frames=33), ["frames=33", "32", "Fix"]),
    (dict(frames=0), ["frames=0"]),
    (dict(guidance=7.5), ["guidance=7.5", "lcm sampler", "Fix"]),
    (dict(steps=0), ["steps=0"]),
    (dict(height=36), ["multiples of 16"]),
])
def test_requests_the_model_cannot_serve_are_refused(pipe, kwargs, words):
    from weightlab.errors import SamplingError, WeightlabError

    with pytest.raises(SamplingError) as e:
        pipe("a cat", progress=False, **kwargs)
    assert isinstance(e.value, WeightlabError)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_merged_folder_samples_like_its_recipe(pipe, recipe, tmp_path, assert_same_clip):
    from weightlab import merge_to_folder
    from weightlab.video import VideoPipeline

    merge_to_folder(recipe, tmp_path / "merged", progress=False)
    from_folder = VideoPipeline.from_source(tmp_path / "merged")
    a = pipe("a dog", frames=4, steps=2, seed=5, progress=False)
    b = from_folder("a dog", frames=4, steps=2, seed=5, progress=False)
    assert_same_clip(a, b)


def test_recipe_without_motion_is_refused(tiny):
    from weightlab import Recipe, Term
    from weightlab.errors import RecipeError
    from weightlab.video import VideoPipeline

    spatial = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tiny.style_lora_kohya), kind="style", scale=0.5)])
    with pytest.raises(RecipeError, match="motion"):
        VideoPipeline.from_source(spatial)


def test_generate_cli_writes_playable_mp4_and_gif(recipe, tmp_path):
    import imageio.v2 as imageio
    from typer.testing import CliRunner

    from weightlab.cli import app

    recipe_file = recipe.save(tmp_path / "r.yaml")
    out = tmp_path / "clip.mp4"
    result = CliRunner().invoke(app, ["generate", "--recipe", str(recipe_file), "--prompt", "a cat walking",
                                      "--out", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    reader = imageio.get_reader(out, format="FFMPEG")
    frames = [f for f in reader]
    assert reader.get_meta_data()["codec"] == "h264"
    assert len(frames) == 16 and frames[0].shape == (32, 32, 3)
    gif = imageio.mimread(out.with_suffix(".gif"))
    assert len(gif) == 16 and gif[0].shape[:2] == (32, 32)


def test_generate_cli_reports_frame_limit(recipe, tmp_path):
    from typer.testing import CliRunner

    from weightlab.cli import app

    recipe_file = recipe.save(tmp_path / "r.yaml")
    result = CliRunner().invoke(app, ["generate", "--recipe", str(recipe_file), "--prompt", "x",
                                      "--out", str(tmp_path / "c.mp4"), "--frames", "40"])
    assert result.exit_code == 2
    assert "SamplingError" in result.output and "frames=40" in result.output
    assert not (tmp_path / "c.mp4").exists()
