"""One noise schedule across stages: distillation runs under the video sampler's schedule (AnimateLCM's linear β), not
the base's (SD1.5: scaled_linear); every trained residual records its schedule; the motion stage and the video sampler
refuse a distilled residual recorded under another one.

The tiny family's scheduler is linear already, so these tests use a copy whose scheduler config is SD1.5's
(PNDMScheduler, scaled_linear β 0.00085–0.012).
"""

import json
import shutil

import pytest
import torch

import weightlab
from weightlab.errors import ScheduleMismatchError, WeightlabError
from weightlab.files import read_header
from weightlab.recipe import Recipe, Term
from weightlab.schedules import CONSISTENCY_KEY, SCHEDULE_KEY
from weightlab.train import (DataConfig, ImageLCMConfig, MotionLCMConfig, StyleLoRAConfig, train_image_lcm,
                             train_motion_lcm, train_style_lora)
from weightlab.train.common import load_base
from weightlab.train.motion_lcm import build_networks

# SD1.5's scheduler_config.json (runwayml/stable-diffusion-v1-5), as a base ships it.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None, "clip_sample": False}
LINEAR = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
          "prediction_type": "epsilon"}
TINY = dict(batch_size=1, learning_rate=1e-3, validation_prompts=())


def _alphas_cumprod(kind: str) -> torch.Tensor:
    """ᾱ_t in float64: β linear in β (``linear``) or in √β (``scaled_linear``) from 0.00085 to 0.012, T = 1000."""
    if kind == "linear":
        betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64)
    else:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.fixture(scope="module")
def sd15_base(tiny, tmp_path_factory):
    """The tiny pipeline with SD1.5's scaled_linear scheduler config."""
    folder = shutil.copytree(tiny.base_dir, tmp_path_factory.mktemp("sd15") / "base")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    return folder


@pytest.fixture(scope="module")
def lcm_loras(sd15_base, tmp_path_factory):
    """Two one-step image-lcm runs on the scaled_linear base: default schedule, and the base's (the old behaviour)."""
    root = tmp_path_factory.mktemp("lcm")
    data = DataConfig(format="synthetic_images", resolution=16, synthetic_samples=2)
    common = dict(base=sd15_base, data=data, max_steps=1, rank=4, num_ddim_timesteps=10, **TINY)
    default = train_image_lcm(ImageLCMConfig(output_dir=root / "default", **common)).outputs[0]
    scaled = train_image_lcm(ImageLCMConfig(output_dir=root / "scaled", beta_schedule="scaled_linear", **common)).outputs[0]
    return default, scaled


def _motion_cfg(base, tiny, image_lora, out, **kw):
    return MotionLCMConfig(base=base, output_dir=out, image_lora=image_lora, teacher_motion=tiny.motion_dir,
                           data=DataConfig(format="synthetic_videos", resolution=16, num_frames=2, synthetic_samples=2),
                           **kw)


def test_distillation_uses_the_video_schedule_and_style_the_bases(sd15_base, tmp_path):
    """load_base's ᾱ against float64 math: ᾱ_t is a product of up to 1000 fp32 factors (relative error ≲ 1000 ulp ≈
    1e-4); the two schedules differ by 0.278 vs 0.162 at t = 499, far outside that."""
    data = DataConfig(format="synthetic_images", resolution=16)
    linear, scaled = _alphas_cumprod("linear"), _alphas_cumprod("scaled_linear")
    assert abs(float(scaled[499]) - 0.278) < 1e-3 and abs(float(linear[499]) - 0.162) < 1e-3

    distill = load_base(ImageLCMConfig(base=sd15_base, output_dir=tmp_path, data=data), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(distill.alphas_cumprod.double(), linear, rtol=1e-4, atol=0)
    assert json.loads(distill.schedule.to_json()) == LINEAR
    style = load_base(StyleLoRAConfig(base=sd15_base, output_dir=tmp_path, data=data), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(style.alphas_cumprod.double(), scaled, rtol=1e-4, atol=0)
    configured = load_base(ImageLCMConfig(base=sd15_base, output_dir=tmp_path, data=data, beta_end=0.02),
                           torch.device("cpu"), torch.float32)
    betas = torch.linspace(0.00085, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(configured.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-4, atol=0)


def test_beta_range_is_validated():
    with pytest.raises(ValueError, match="beta_start"):
        ImageLCMConfig(base="b", output_dir="o", data=DataConfig(format="synthetic_images"), beta_start=0.02)


def test_trained_residuals_record_schedule_and_solver(lcm_loras, sd15_base, tiny, tmp_path):
    default, scaled = lcm_loras
    meta = read_header(default).metadata
    assert json.loads(meta[SCHEDULE_KEY]) == LINEAR
    assert json.loads(meta[CONSISTENCY_KEY]) == {"solver": "ddim", "num_ddim_timesteps": 10, "skip": 100,
                                                 "sigma_data": 0.5, "timestep_scaling": 10.0}
    assert json.loads(read_header(scaled).metadata[SCHEDULE_KEY])["beta_schedule"] == "scaled_linear"

    style = train_style_lora(StyleLoRAConfig(base=sd15_base, output_dir=tmp_path / "style", max_steps=1, rank=2,
                                             data=DataConfig(format="synthetic_images", resolution=16,
                                                             synthetic_samples=2), **TINY)).outputs[0]
    style_meta = read_header(style).metadata
    assert json.loads(style_meta[SCHEDULE_KEY]) == {**LINEAR, "beta_schedule": "scaled_linear"}
    assert CONSISTENCY_KEY not in style_meta  # not distilled: composes under any schedule, never refused

    # motion-lcm: both outputs (diffusers folder and AnimateDiff file) carry the record and still load.
    folder, file = train_motion_lcm(_motion_cfg(sd15_base, tiny, default, tmp_path / "motion", max_steps=1,
                                                num_ddim_timesteps=5, **TINY)).outputs
    for weights in (folder / "diffusion_pytorch_model.safetensors", file):
        m = read_header(weights).metadata
        assert json.loads(m[SCHEDULE_KEY]) == LINEAR and json.loads(m[CONSISTENCY_KEY])["skip"] == 200
    from diffusers import MotionAdapter

    MotionAdapter.from_pretrained(folder)
    assert weightlab.load(folder).kind == "motion"

    # the whole decoupled recipe samples (the sampler's schedule is AnimateLCM's whatever the base's), style included
    from weightlab.video import VideoPipeline

    recipe = Recipe(base=str(sd15_base), terms=[Term(source=str(style), kind="style", scale=1.0),
                                                Term(source=str(default), kind="image_accel"),
                                                Term(source=str(folder), kind="motion")])
    clip = VideoPipeline.from_source(recipe)("a red circle", frames=2, steps=1, progress=False)
    assert clip.video.shape[0] == 2


def test_motion_stage_refuses_an_image_lora_of_another_schedule(lcm_loras, sd15_base, tiny, tmp_path):
    default, scaled = lcm_loras
    cfg = _motion_cfg(sd15_base, tiny, scaled, tmp_path / "run", max_steps=1, **TINY)
    with pytest.raises(ScheduleMismatchError) as e:
        train_motion_lcm(cfg)
    message = str(e.value)
    assert isinstance(e.value, WeightlabError)
    assert "scaled_linear beta 0.00085-0.012" in message and "[linear beta 0.00085-0.012" in message
    assert str(scaled) in message and "Fix:" in message
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()
    models = load_base(cfg, torch.device("cpu"), torch.float32)

    # the same LoRA fits a motion stage configured with its schedule, and the default LoRA fits the default stage
    build_networks(cfg.model_copy(update={"beta_schedule": "scaled_linear"}),
                   load_base(cfg.model_copy(update={"beta_schedule": "scaled_linear"}), torch.device("cpu"), torch.float32),
                   torch.float32)
    build_networks(cfg.model_copy(update={"image_lora": default}), models, torch.float32)


def test_sampler_refuses_a_recipe_with_a_residual_of_another_schedule(lcm_loras, sd15_base, tiny, tmp_path):
    from weightlab import merge_to_folder
    from weightlab.video import VideoPipeline

    default, scaled = lcm_loras
    recipe = Recipe(base=str(sd15_base), terms=[Term(source=str(scaled), kind="image_accel"),
                                                Term(source=str(tiny.motion_dir), kind="motion")])
    with pytest.raises(ScheduleMismatchError, match=r"image_accel term .*scaled_linear.*the video sampler.*Fix:"):
        VideoPipeline.from_source(recipe)
    # a merged folder is checked through its recipe.json as long as its inputs exist
    merge_to_folder(recipe, tmp_path / "merged", progress=False)
    with pytest.raises(ScheduleMismatchError):
        VideoPipeline.from_source(tmp_path / "merged")

    from typer.testing import CliRunner

    from weightlab.cli import app

    result = CliRunner().invoke(app, ["generate", "--recipe", str(recipe.save(tmp_path / "r.yaml")), "--prompt", "x",
                                      "--out", str(tmp_path / "c.mp4")])
    assert result.exit_code == 2 and "ScheduleMismatchError" in result.output
    assert not (tmp_path / "c.mp4").exists()


def test_validation_samples_with_the_generate_scheduler(lcm_loras, sd15_base, tiny, tmp_path, monkeypatch):
    """Both distillation trainers' validation samples use exactly the scheduler `weightlab generate` builds for this
    base (AnimateLCM's LCMScheduler: linear β, original_inference_steps 100), not one derived from the base's config."""
    from diffusers import AnimateDiffPipeline, StableDiffusionPipeline

    from weightlab.video import animatelcm_scheduler

    used = []
    image, animate = StableDiffusionPipeline.__call__, AnimateDiffPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", lambda self, *a, **k: (
        used.append(self.scheduler), image(self, *a, **k))[1])
    monkeypatch.setattr(AnimateDiffPipeline, "__call__", lambda self, *a, **k: (
        used.append(self.scheduler), animate(self, *a, **k))[1])
    images = DataConfig(format="synthetic_images", resolution=16, synthetic_samples=1)
    common_kw = dict(max_steps=1, batch_size=1, validation_prompts=("a red circle",))
    train_image_lcm(ImageLCMConfig(base=sd15_base, output_dir=tmp_path / "lcm", data=images, rank=2, num_ddim_timesteps=10,
                                   **common_kw))
    train_motion_lcm(_motion_cfg(sd15_base, tiny, lcm_loras[0], tmp_path / "motion", num_ddim_timesteps=5, **common_kw))

    generate = animatelcm_scheduler(json.loads((sd15_base / "scheduler" / "scheduler_config.json").read_text()))
    public = {k: v for k, v in generate.config.items() if not k.startswith("_")}
    assert public["original_inference_steps"] == 100 and public["beta_schedule"] == "linear"
    assert len(used) == 2
    for scheduler in used:
        assert type(scheduler) is type(generate)
        assert {k: v for k, v in scheduler.config.items() if not k.startswith("_")} == public


def test_outputs_record_the_base_family(tmp_path):
    """A residual trained on an SD2-shaped base records sd2 (it said sd15 whatever the base). Loading still detects
    by structure: an attention-only LoRA fits sd15 and sd2 alike, and the base's shapes decide at merge."""
    from weightlab.testing import build_tiny_variant

    base = build_tiny_variant("sd2", tmp_path)
    style = train_style_lora(StyleLoRAConfig(base=base, output_dir=tmp_path / "style", max_steps=1, rank=2,
                                             data=DataConfig(format="synthetic_images", resolution=16,
                                                             synthetic_samples=2), **TINY)).outputs[0]
    assert read_header(style).metadata["weightlab.family"] == "sd2"
