"""teacher: a UNet trained from scratch — its loss falls against a same-seed control, resume is exact, and the output
is a base for ``weightlab.load``, the merge engine, diffusers and the other trainers (through the CLI, with registry
references resolved and the output registered)."""

import json

import torch
from typer.testing import CliRunner

import weightlab
from weightlab.files import load_tensors, read_header
from weightlab.recipe import Recipe
from weightlab.schedules import SCHEDULE_KEY
from weightlab.train import DataConfig, ImageLCMConfig, RegisterConfig, TeacherConfig, train_teacher

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _cfg(tiny, out, **kw):
    kw = {"batch_size": 2, "validation_prompts": (), "checkpoint_every": 100, **kw}
    return TeacherConfig(base=tiny.base_dir, output_dir=out, seed=0,
                         data=DataConfig(format="synthetic_images", resolution=16, synthetic_samples=8), **kw)


def test_teacher_loss_falls_against_the_same_run_without_learning(tiny, tmp_path):
    """As for motion-lcm: a control run with the same seed sees the same draws (timesteps, noise, captions) but learns
    nothing (lr 1e-12), so the ratio trained/control is exactly 1 at step 1 and then measures learning alone.
    Measured (16 steps, lr 1e-3): the mean ratio of the first 4 steps is 0.88, of the last 4 0.41; a trainer that
    does not learn stays at 1."""
    trained = train_teacher(_cfg(tiny, tmp_path / "trained", max_steps=16, learning_rate=1e-3)).losses
    control = train_teacher(_cfg(tiny, tmp_path / "control", max_steps=16, learning_rate=1e-12)).losses
    ratios = [a / b for a, b in zip(trained, control)]
    assert ratios[0] == 1.0
    first, last = sum(ratios[:4]) / 4, sum(ratios[-4:]) / 4
    assert last < 0.7 and last < first - 0.2, ratios


def test_resume_is_bitwise_and_the_output_is_a_base(tiny, tmp_path):
    """Straight 3 steps vs 1 step, stop, resume: the same bits (all draws are per-sample seeded; the fresh UNet is
    seeded). The output folder is read by weightlab.load (kind base), the merge engine and diffusers as the same
    weights (self-consistency, exact), and records the family and schedule like every trained output."""
    from diffusers import StableDiffusionPipeline

    common = dict(max_steps=3, batch_size=1, gradient_accumulation_steps=2, lr_scheduler="linear", checkpoint_every=1,
                  checkpoints_keep=1, validation_prompts=("a red circle",), validation_steps=2, validate_every=2)
    straight = train_teacher(_cfg(tiny, tmp_path / "a", **common))
    cfg_b = _cfg(tiny, tmp_path / "b", **common)
    stopped = train_teacher(cfg_b, stop_after=1)
    assert not stopped.finished and stopped.outputs == [] and stopped.step == 1
    resumed = train_teacher(cfg_b)
    assert resumed.finished and resumed.step == 3 and resumed.kind == "base"
    a = load_tensors(straight.outputs[0] / WEIGHTS)[0]
    b = load_tensors(resumed.outputs[0] / WEIGHTS)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert resumed.losses == straight.losses and resumed.grad_norms == straight.grad_norms
    assert 1e6 < sum(v.numel() for v in a.values()) < 3e6  # the default: SD1.5's block layout at ~1.5 M parameters
    assert sorted(p.name for p in (tmp_path / "b" / "samples").glob("*.gif")) == ["step-00000002.gif",
                                                                                 "step-00000003.gif"]

    out = resumed.outputs[0]
    base = weightlab.load(out)
    assert base.kind == "base"
    meta = read_header(out / WEIGHTS).metadata
    assert (meta["weightlab.kind"], meta["weightlab.family"], meta["weightlab.trainer"]) == ("base", "sd15", "teacher")
    sched = json.loads((tiny.base_dir / "scheduler" / "scheduler_config.json").read_text())
    recorded = json.loads(meta[SCHEDULE_KEY])
    assert {k: recorded[k] for k in ("beta_schedule", "beta_start", "beta_end")} == \
        {k: sched[k] for k in ("beta_schedule", "beta_start", "beta_end")}
    merged = dict(weightlab.build_unet(Recipe(base=str(out))).named_parameters())
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    theirs = dict(pipe.unet.named_parameters())
    assert all(torch.equal(merged[k], b[k]) and torch.equal(theirs[k], b[k]) for k in b)
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np").images[0]
    assert image.shape == (16, 16, 3) and bool((image >= 0).all() and (image <= 1).all())


def test_cli_teacher_from_a_registered_base_then_image_lcm_on_the_registered_teacher(tiny, tmp_path):
    """The entry point supplies the registry: ``base: ns/name@N`` resolves to the registered folder, ``register_as``
    registers the output with trained_from lineage; the teacher, named by its reference, is then a base for image-lcm."""
    from weightlab.cli import app
    from weightlab.registry.service import Registry

    home = tmp_path / "home"
    with Registry(home=home) as reg:
        assert reg.add(tiny.base_dir, name="me/tiny").ref == "me/tiny@1"
    data = DataConfig(format="synthetic_images", resolution=16, synthetic_samples=4)
    teacher = TeacherConfig(base="me/tiny@1", output_dir=tmp_path / "teacher", data=data, max_steps=2,
                            validation_prompts=(), register_as=RegisterConfig(name="me/teacher", home=home))
    teacher.to_yaml(tmp_path / "teacher.yaml")
    result = CliRunner().invoke(app, ["train", "teacher", "--config", str(tmp_path / "teacher.yaml")])
    assert result.exit_code == 0, result.output
    assert "registered: me/teacher@1" in result.output

    with Registry(home=home) as reg:
        version, node = reg.get("me/teacher@1"), reg.lineage("me/teacher@1")
    assert version.kind == "base" and version.metadata["trainer"] == "teacher"
    assert node.relation == "trained_from" and [e.role for e in node.inputs] == ["base"]
    assert node.inputs[0].node.version.ref == "me/tiny@1"  # the registered base is the parent

    lcm = ImageLCMConfig(base="me/teacher@1", output_dir=tmp_path / "lcm", data=data, max_steps=1, rank=4,
                         num_ddim_timesteps=10, validation_prompts=(), register_as=RegisterConfig(name="me/lcm", home=home))
    lcm.to_yaml(tmp_path / "lcm.yaml")
    result = CliRunner().invoke(app, ["train", "image-lcm", "--config", str(tmp_path / "lcm.yaml")])
    assert result.exit_code == 0, result.output
    lora = weightlab.load(tmp_path / "lcm" / "lcm_lora.safetensors")
    assert lora.kind == "image_accel"
    with Registry(home=home) as reg:
        assert reg.lineage("me/lcm@1").inputs[0].node.version.ref == "me/teacher@1"
