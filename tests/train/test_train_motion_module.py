"""motion-module (the AnimateDiff stage): only the motion module trains, its loss falls against a same-seed control
on a trained teacher, resume is exact, and the outputs load as kind ``motion`` and merge onto the base."""

import pytest
import torch

import weightlab
from weightlab.errors import WeightlabError
from weightlab.files import load_tensors
from weightlab.recipe import Recipe, Term
from weightlab.train import DataConfig, MotionModuleConfig, TeacherConfig, load_config, train_motion_module, train_teacher

WEIGHTS = "diffusion_pytorch_model.safetensors"
VIDEOS = DataConfig(format="synthetic_videos", resolution=16, num_frames=4, synthetic_samples=8)


def _cfg(base, out, **kw):
    kw = {"batch_size": 2, "validation_prompts": (), "checkpoint_every": 100, **kw}
    return MotionModuleConfig(base=base, output_dir=out, seed=0, data=VIDEOS, **kw)


def test_motion_module_loss_falls_against_the_same_run_without_learning(tiny, tmp_path):
    """On the tiny family's random UNet the ε-MSE is ≈ 1 whatever the motion branch adds (its output is attenuated by
    the random layers after it): measured, 16 steps move the ratio below by 0.4% only. So the base is a teacher
    trained here for 24 steps (its ε-MSE ≈ 0.2). A control with the same seed and lr 1e-12 has the same draws: the
    ratio trained/control is exactly 1 at step 1 (no update yet; the fresh module's proj_out is zero) and then
    measures learning alone. Measured (lr 1e-2): ratios 0.83–0.95 over steps 2–14, mean 0.90; a trainer that does
    not learn stays at 1, one that pushes the wrong way above it."""
    teacher = train_teacher(TeacherConfig(base=tiny.base_dir, output_dir=tmp_path / "teacher", seed=0, max_steps=24,
                                          batch_size=2, learning_rate=3e-3, validation_prompts=(),
                                          data=DataConfig(format="synthetic_images", resolution=16, synthetic_samples=8)))
    base = teacher.outputs[0]
    trained = train_motion_module(_cfg(base, tmp_path / "trained", max_steps=16, learning_rate=1e-2)).losses
    control = train_motion_module(_cfg(base, tmp_path / "control", max_steps=16, learning_rate=1e-12)).losses
    ratios = [a / b for a, b in zip(trained, control)]
    assert ratios[0] == 1.0
    assert sum(ratios[1:]) / len(ratios[1:]) < 0.95 and max(ratios[1:]) < 1.0, ratios


def test_resume_is_bitwise_and_outputs_load_as_motion_and_merge(tiny, tmp_path):
    common = dict(max_steps=3, batch_size=1, gradient_accumulation_steps=2, learning_rate=1e-3, lr_scheduler="linear",
                  checkpoint_every=1, checkpoints_keep=1, validation_prompts=("a red circle moving left",),
                  validation_steps=2)
    straight = train_motion_module(_cfg(tiny.base_dir, tmp_path / "a", **common))
    cfg_b = _cfg(tiny.base_dir, tmp_path / "b", **common)
    stopped = train_motion_module(cfg_b, stop_after=1)
    assert not stopped.finished and stopped.outputs == []
    saved = load_tensors(tmp_path / "b" / "checkpoints" / "step-00000001" / "model.safetensors")[0]
    assert saved and all(".motion_modules." in k for k in saved)  # only the motion module trains
    resumed = train_motion_module(cfg_b)
    assert resumed.finished and resumed.step == 3 and resumed.kind == "motion"

    folder_a, _ = straight.outputs
    folder_b, file_b = resumed.outputs
    a, b = load_tensors(folder_a / WEIGHTS)[0], load_tensors(folder_b / WEIGHTS)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert resumed.losses == straight.losses and resumed.grad_norms == straight.grad_norms
    proj_out = [k for k in b if ".proj_out." in k]
    assert proj_out and all(b[k].abs().max() > 0 for k in proj_out)  # started at zero, trained

    module, original = weightlab.load(folder_b), weightlab.load(file_b)  # diffusers folder and AnimateDiff layout
    assert module.kind == original.kind == "motion"
    assert module.weights.keys() == original.weights.keys()
    assert all(torch.equal(module.weights[k], original.weights[k]) for k in module.weights)
    merged = weightlab.build_unet(Recipe(base=str(tiny.base_dir), terms=(Term(source=str(folder_b), kind="motion"),)))
    params = dict(merged.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in module.weights.items() if k in params)
    base = weightlab.load(tiny.base_dir)
    assert all(torch.equal(params[k], v) for k, v in base.weights.items())  # the base is frozen
    assert (tmp_path / "b" / "samples" / "step-00000003-0.gif").is_file()


def test_init_motion_and_motion_config_exclude_each_other(tmp_path):
    (tmp_path / "c.yaml").write_text("base: b\noutput_dir: o\ndata: {format: synthetic_videos}\n"
                                     "init_motion: m\nmotion_config: {motion_layers_per_block: 1}\n")
    with pytest.raises(WeightlabError, match="set one of them"):
        load_config(tmp_path / "c.yaml", MotionModuleConfig)
