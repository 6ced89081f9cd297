"""motion-lcm: AnimateLCM's initialization strategy, exact resume, and outputs that load, merge and register."""

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
    from weightlab.registry.api import Registry

    common = dict(max_steps=3, batch_size=1, gradient_accumulation_steps=2, learning_rate=1e-3, num_ddim_timesteps=10,
                  lr_scheduler="linear", checkpoint_every=1, checkpoints_keep=1,
                  register_as=RegisterConfig(name="me/motion", home=tmp_path / "home"))
    straight = train_motion_lcm(_cfg(tiny, tmp_path, output_dir=tmp_path / "a", **common))
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

    assert straight.registered == resumed.registered == ["me/motion@1"]  # same tensors: the same version
    with Registry(home=tmp_path / "home") as reg:
        node = reg.lineage("me/motion@1")
        assert reg.get("me/motion@1").kind == "motion"
    assert node.relation == "trained_from" and [e.role for e in node.inputs] == ["base", "image_accel", "teacher"]
    assert (tmp_path / "b" / "samples" / "step-00000003-0.gif").is_file()
