"""motion-lcm: AnimateLCM's initialization strategy, the target's LoRA schedule and EMA, a falling loss, exact resume,
and outputs that load, merge and register."""

import torch

import weightlab
from weightlab.files import load_tensors, save_tensors
from weightlab.recipe import Recipe, Term
from weightlab.testing import lora_to_peft, make_lora
from weightlab.train import DataConfig, MotionLCMConfig, RegisterConfig, train_motion_lcm
from weightlab.train.common import load_base
from weightlab.train.config import LCM_LORA_TARGETS
from weightlab.train.motion_lcm import build_networks, set_lora_weight


def _image_lora(tiny, path):
    """A small LCM-LoRA for the tiny base (what an image-lcm run would hand over)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny.base_dir / "unet")
    factors = make_lora(unet, LCM_LORA_TARGETS, rank=4, seed=7)
    return save_tensors(lora_to_peft(factors, scale=0.02), path, {"weightlab.kind": "image_accel"})


def _cfg(tiny, tmp_path, **kw):
    return MotionLCMConfig(base=tiny.base_dir, image_lora=_image_lora(tiny, tmp_path / "lcm_lora.safetensors"),
                           teacher_motion=tiny.motion_dir, seed=0,
                           data=DataConfig(format="synthetic_videos", resolution=16, num_frames=4, synthetic_samples=4),
                           **kw)


def test_initialization_strategy(tiny, tmp_path):
    """online = base + LoRA + motion (only motion trains); target = base + motion, LoRA at weight 0 that follows the
    EMA to 1; teacher = base + teacher motion module; a new module starts with its motion branch off."""
    cfg = _cfg(tiny, tmp_path, output_dir=tmp_path / "run")
    models = load_base(cfg, torch.device("cpu"), torch.float32)
    nets = build_networks(cfg, models, torch.float32)
    base = dict(models.unet.named_parameters())
    lora = weightlab.load(cfg.image_lora)
    online, target, teacher = (dict(m.named_parameters()) for m in (nets.online, nets.target, nets.teacher))
    adapter = weightlab.load(tiny.motion_dir).weights

    for path, t in lora.targets.items():
        k = f"{path}.weight"
        torch.testing.assert_close(online[k], base[k] + t.delta(base[k].shape))
        assert torch.equal(target[k], base[k]) and torch.equal(teacher[k], base[k])
    untouched = "conv_in.weight"
    assert torch.equal(online[untouched], base[untouched]) and torch.equal(target[untouched], base[untouched])
    assert {k for k, p in online.items() if p.requires_grad} == {k for k in online if ".motion_modules." in k}
    assert not any(p.requires_grad for p in target.values()) and not any(p.requires_grad for p in teacher.values())
    for k, v in adapter.items():
        if k in teacher:
            assert torch.equal(teacher[k], v) and torch.equal(online[k], v) and torch.equal(target[k], v)

    lam = 1 - 0.95**3
    set_lora_weight(nets.target_lora, nets.pristine, nets.lora, lam)
    path, t = next(iter(lora.targets.items()))
    torch.testing.assert_close(target[f"{path}.weight"], base[f"{path}.weight"] + lam * t.delta(base[f"{path}.weight"].shape))

    fresh = build_networks(cfg.model_copy(update={"init_motion": "new"}), models, torch.float32)
    proj_out = {k: p for k, p in fresh.online.named_parameters() if ".motion_modules." in k and ".proj_out." in k}
    assert proj_out and all(p.abs().max() == 0 for p in proj_out.values())


def test_resume_is_bitwise_and_outputs_load_merge_and_register(tiny, tmp_path):
    from weightlab.cli.train import register_result
    from weightlab.registry.service import Registry

    common = dict(max_steps=3, batch_size=1, gradient_accumulation_steps=2, learning_rate=1e-3, num_ddim_timesteps=10,
                  lr_scheduler="linear", checkpoint_every=1, checkpoints_keep=1,
                  register_as=RegisterConfig(name="me/motion", home=tmp_path / "home"))
    straight_cfg = _cfg(tiny, tmp_path, output_dir=tmp_path / "a", **common)
    straight = train_motion_lcm(straight_cfg)
    cfg_b = _cfg(tiny, tmp_path, output_dir=tmp_path / "b", **common)
    stopped = train_motion_lcm(cfg_b, stop_after=1)
    assert not stopped.finished and stopped.step == 1 and stopped.outputs == []
    assert (tmp_path / "b" / "checkpoints" / "step-00000001").is_dir()
    resumed = train_motion_lcm(cfg_b)
    assert resumed.finished and resumed.step == 3

    folder_a, file_a = straight.outputs
    folder_b, file_b = resumed.outputs
    a = load_tensors(folder_a / "diffusion_pytorch_model.safetensors")[0]
    b = load_tensors(folder_b / "diffusion_pytorch_model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert resumed.losses == straight.losses and resumed.grad_norms == straight.grad_norms
    assert any(not torch.equal(a[k], v) for k, v in weightlab.load(tiny.motion_dir).weights.items() if k in a)

    module, original = weightlab.load(folder_b), weightlab.load(file_b)  # diffusers folder and AnimateDiff layout
    assert module.kind == original.kind == "motion" and "temporal_transformer" in next(iter(load_tensors(file_b)[0]))
    assert module.weights.keys() == original.weights.keys()
    assert all(torch.equal(module.weights[k], original.weights[k]) for k in module.weights)

    merged = weightlab.build_unet(Recipe(base=str(tiny.base_dir), terms=(
        Term(source=str(tmp_path / "lcm_lora.safetensors"), kind="image_accel"), Term(source=str(folder_b), kind="motion"))))
    params = dict(merged.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in module.weights.items() if k in params)
    with torch.no_grad():
        out = merged(torch.randn(1, 4, 4, 8, 8), torch.tensor([500]), torch.randn(4, 77, 32)).sample
    assert out.shape == (1, 4, 4, 8, 8) and torch.isfinite(out).all()

    # registration is the entry point's (weightlab train): same tensors, the same version
    assert register_result("motion-lcm", straight_cfg, straight) == register_result("motion-lcm", cfg_b, resumed) \
        == ["me/motion@1"]
    with Registry(home=tmp_path / "home") as reg:
        node = reg.lineage("me/motion@1")
        assert reg.get("me/motion@1").kind == "motion"
    assert node.relation == "trained_from" and [e.role for e in node.inputs] == ["base", "image_accel", "teacher"]
    assert (tmp_path / "b" / "samples" / "step-00000003-0.gif").is_file()


def test_target_lora_weight_follows_the_ema_schedule_and_the_target_tracks_the_online_model(tiny, tmp_path, monkeypatch):
    """At every step the target net carries the image LoRA at weight λ_n = 1 − μⁿ (DESIGN.md "Motion stage":
    the target starts without the LoRA), and its motion parameters are the EMA θ⁻ ← μ·θ⁻ + (1 − μ)·θ of the online ones.

    Spies on ``set_lora_weight`` (the λ it is called with) and on ``motion_loss`` (the networks as the loss sees them).
    References in fp64 from the LoRA file and the recorded online weights; tolerance 4·eps32 of each tensor's scale
    (one fp32 multiply-add per value), while a wrong λ or μ moves values by a LoRA delta or an optimizer step."""
    from safetensors.torch import load_file

    from weightlab.train import motion_lcm

    mu, steps = 0.8, 4
    scales, seen = [], []
    real_set, real_loss = motion_lcm.set_lora_weight, motion_lcm.motion_loss

    def spy_set(weights, pristine, lora, scale):
        scales.append(scale)
        real_set(weights, pristine, lora, scale)

    def spy_loss(cfg, accelerator, online, target, *args):
        trainable = {n for n, p in online.named_parameters() if p.requires_grad}
        seen.append({"target": {n: p.detach().clone() for n, p in target.named_parameters()},
                     "online": {n: p.detach().clone() for n, p in online.named_parameters() if n in trainable}})
        return real_loss(cfg, accelerator, online, target, *args)

    monkeypatch.setattr(motion_lcm, "set_lora_weight", spy_set)
    monkeypatch.setattr(motion_lcm, "motion_loss", spy_loss)
    cfg = _cfg(tiny, tmp_path, output_dir=tmp_path / "run", max_steps=steps, batch_size=1, learning_rate=1e-3,
               ema_decay=mu, num_ddim_timesteps=10, validation_prompts=(), checkpoint_every=100)
    train_motion_lcm(cfg)

    assert scales == [1.0] + [1 - mu**n for n in range(steps)]  # the online net's LoRA at 1 (build), then λ_n per step
    assert len(seen) == steps
    eps32 = torch.finfo(torch.float32).eps
    w0 = load_file(tiny.base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    lora = load_file(cfg.image_lora)
    paths = [k.removeprefix("unet.").removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")]
    assert paths
    for n, step in enumerate(seen):
        lam = 1 - mu**n
        for path in paths:
            key = f"{path}.weight"
            down, up = lora[f"unet.{path}.lora_A.weight"].double(), lora[f"unet.{path}.lora_B.weight"].double()
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w0[key].shape)
            ref = w0[key].double() + lam * delta
            err = (step["target"][key].double() - ref).abs().max().item()
            assert err <= 4 * eps32 * ref.abs().max().item(), (n, key, err)

    motion = seen[0]["online"].keys()
    assert motion and all(".motion_modules." in k for k in motion)
    teacher = weightlab.load(tiny.motion_dir).weights
    assert all(torch.equal(seen[0]["target"][k], teacher[k]) for k in motion if k in teacher)  # θ⁻ starts at θ
    for before, after in zip(seen, seen[1:]):
        for k in motion:
            ref = mu * before["target"][k].double() + (1 - mu) * after["online"][k].double()
            err = (after["target"][k].double() - ref).abs().max().item()
            assert err <= 4 * eps32 * ref.abs().max().item(), (k, err)
    moved = max((seen[-1]["target"][k] - seen[0]["target"][k]).abs().max().item() for k in motion)
    assert moved > 1e-4  # the EMA target moves (an optimizer step at lr 1e-3 is ~1e-3 per weight)


def test_motion_lcm_loss_falls_against_the_same_run_without_learning(tiny, tmp_path):
    """Each step's loss is dominated by its draws (timestep, noise, guidance: per-sample seeds), which vary ~30x from
    step to step, so a raw first-vs-last comparison measures the draws. Here a control run with the same seed has the
    same draws, the same target LoRA schedule and EMA, but a learning rate of 1e-12: the ratio trained/control is
    exactly 1 at step 1 (no update yet) and then measures learning alone. Measured (16 steps): the mean ratio of the
    last 4 steps is ~0.87; a trainer that does not learn (or pushes the wrong way) stays at ≥ 1."""
    kw = dict(max_steps=16, batch_size=2, num_ddim_timesteps=10, validation_prompts=(), checkpoint_every=100)
    trained = train_motion_lcm(_cfg(tiny, tmp_path, output_dir=tmp_path / "trained", learning_rate=1e-4, **kw)).losses
    control = train_motion_lcm(_cfg(tiny, tmp_path, output_dir=tmp_path / "control", learning_rate=1e-12, **kw)).losses
    ratios = [a / b for a, b in zip(trained, control)]
    assert ratios[0] == 1.0
    k = 4
    first, last = sum(ratios[:k]) / k, sum(ratios[-k:]) / k
    assert last < 0.95 and last < first - 0.05, ratios


def test_a_dora_image_lora_is_refused(tiny, tmp_path):
    """A DoRA file's change depends on the weight it is merged into: the motion stage, which freezes a plain LoRA
    and scales it by 1−μⁿ, must refuse it rather than drop the magnitudes (self-consistency: our reader, our error)."""
    import pytest

    from weightlab.errors import WeightlabError
    from weightlab.train.motion_lcm import load_image_lora

    cfg = _cfg(tiny, tmp_path, output_dir=tmp_path / "run")
    sd = dict(load_tensors(cfg.image_lora)[0])
    for k in [k for k in sd if k.endswith(".lora_B.weight")]:
        sd[k.replace(".lora_B.weight", ".lora_magnitude_vector")] = torch.ones(sd[k].shape[0])
    dora = save_tensors(sd, tmp_path / "dora.safetensors", {"weightlab.kind": "image_accel"})
    with pytest.raises(WeightlabError, match="DoRA"):
        load_image_lora(dora, torch.device("cpu"))


def test_coupled_mode_trains_the_spatial_lora_and_the_motion_module_and_resumes_exactly(tiny, tmp_path):
    """The paper's coupled ablation: a fresh spatial LoRA (B = 0) and the motion module distilled together on video;
    both change and both are output; resume is bitwise. Decoupled, only the motion module trains: its checkpoints
    (trainable weights only) hold no spatial weight, so the image LoRA of its input stays as it came."""
    from weightlab.files import read_header
    from weightlab.schedules import CONSISTENCY_KEY

    data = DataConfig(format="synthetic_videos", resolution=16, num_frames=4, synthetic_samples=4)
    common = dict(base=tiny.base_dir, teacher_motion=tiny.motion_dir, seed=0, data=data, max_steps=3, batch_size=1,
                  learning_rate=1e-3, num_ddim_timesteps=10, checkpoint_every=1, checkpoints_keep=1,
                  validation_prompts=(), coupled=True, rank=4)
    straight = train_motion_lcm(MotionLCMConfig(output_dir=tmp_path / "a", **common))
    cfg_b = MotionLCMConfig(output_dir=tmp_path / "b", **common)
    assert not train_motion_lcm(cfg_b, stop_after=1).finished
    saved = load_tensors(tmp_path / "b" / "checkpoints" / "step-00000001" / "model.safetensors")[0]
    assert any(".lora_" in k for k in saved) and any(".motion_modules." in k for k in saved)
    assert all(".lora_" in k or ".motion_modules." in k for k in saved)
    resumed = train_motion_lcm(cfg_b)
    assert [p.name for p in resumed.outputs] == ["motion_module", "motion_module_animatediff.safetensors",
                                                 "lcm_lora.safetensors"]
    for x, y in zip(straight.outputs, resumed.outputs):
        fx = x / "diffusion_pytorch_model.safetensors" if x.is_dir() else x
        fy = y / "diffusion_pytorch_model.safetensors" if y.is_dir() else y
        a, b = load_tensors(fx)[0], load_tensors(fy)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), x.name  # bitwise

    lora = weightlab.load(resumed.outputs[2])
    assert lora.kind == "image_accel" and lora.ranks == [4]
    assert lora.targets and all("motion_modules" not in p for p in lora.targets)  # spatial modules only
    assert max(t.up.abs().max().item() for t in lora.targets.values()) > 0  # B started at zero
    assert CONSISTENCY_KEY in read_header(resumed.outputs[2]).metadata  # the motion stage's checks accept it
    module = weightlab.load(resumed.outputs[0]).weights
    teacher = weightlab.load(tiny.motion_dir).weights
    assert any(not torch.equal(module[k], teacher[k]) for k in module if k in teacher)  # init_motion: teacher

    train_motion_lcm(MotionLCMConfig(**{**common, "coupled": False, "max_steps": 1}, output_dir=tmp_path / "d",
                                     image_lora=_image_lora(tiny, tmp_path / "lcm_lora.safetensors")))
    saved = load_tensors(tmp_path / "d" / "checkpoints" / "step-00000001" / "model.safetensors")[0]
    assert saved and all(".motion_modules." in k for k in saved)


def test_coupled_and_image_lora_exclude_each_other(tiny, tmp_path):
    import pytest

    from weightlab.errors import WeightlabError
    from weightlab.train import load_config

    doc = "base: b\noutput_dir: o\ndata: {format: synthetic_videos}\nteacher_motion: m\n"
    for extra, message in (("coupled: true\nimage_lora: l\n", "drop image_lora"), ("", "image_lora is required")):
        (tmp_path / "c.yaml").write_text(doc + extra)
        with pytest.raises(WeightlabError, match=message):
            load_config(tmp_path / "c.yaml", MotionLCMConfig)
