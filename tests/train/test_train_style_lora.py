"""style-lora end to end through the CLI (bf16, gradient checkpointing, accumulation, checkpoints, validation,
registration) and a clear loss drop measured on held-out noise through the merge engine."""

import json

import pytest
import torch
from typer.testing import CliRunner

import weightlab
from weightlab.files import read_header, tensor_hash
from weightlab.recipe import Recipe, Term
from weightlab.train import DataConfig, RegisterConfig, StyleLoRAConfig, train_style_lora
from weightlab.train.consistency import add_noise
from weightlab.train.data import SyntheticShapes, write_synthetic


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), e).sample


def test_style_lora_cli_end_to_end(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    from weightlab.cli import app
    from weightlab.registry.service import Registry

    write_synthetic(tmp_path / "images", 4, resolution=24)
    cfg = StyleLoRAConfig(
        base=tiny.base_dir, output_dir=tmp_path / "run", max_steps=2, batch_size=1, gradient_accumulation_steps=2,
        data=DataConfig(format="image_folder", path=tmp_path / "images", resolution=16),
        mixed_precision="bf16", gradient_checkpointing=True, rank=4, lora_alpha=8, learning_rate=1e-2,
        checkpoint_every=1, checkpoints_keep=1, validate_every=1, validation_steps=2,
        register_as=RegisterConfig(name="me/style", home=tmp_path / "home", tags=("test",)))
    cfg.to_yaml(tmp_path / "style.yaml")

    result = CliRunner().invoke(app, ["train", "style-lora", "--config", str(tmp_path / "style.yaml")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "style_lora.safetensors"
    assert "output:" in result.output and "registered: me/style@1" in result.output

    pipe = StableDiffusionPipeline.from_pretrained(tiny.base_dir, safety_checker=None, requires_safety_checker=False)
    lora = weightlab.load(out)
    expected = {n for n, _ in pipe.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    assert lora.kind == "style" and lora.ranks == [4] and set(lora.targets) == expected
    meta = read_header(out).metadata
    assert json.loads(meta["weightlab.training_config"]) == json.loads(cfg.model_dump_json())

    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 0 and (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "samples").glob("*.gif")) == ["step-00000001.gif", "step-00000002.gif"]
    assert list((run / "logs" / "style-lora").glob("events.out.tfevents.*"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # checkpoints_keep=1
    saved = weightlab.files.load_tensors(run / "checkpoints" / "step-00000002" / "model.safetensors")[0]
    assert saved and all(".lora_" in k for k in saved)  # checkpoints hold the trainable weights only

    # diffusers loads the file (alpha/rank folded into lora_B) exactly as weightlab's merge engine applies it
    base_out = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(out))
    merged = weightlab.build_unet(Recipe(base=str(tiny.base_dir), terms=(Term(source=str(out), kind="style"),)))
    torch.testing.assert_close(_unet_out(merged), _unet_out(pipe.unet), rtol=1e-5, atol=1e-6)
    assert (_unet_out(merged) - base_out).abs().max() > 1e-4

    with Registry(home=tmp_path / "home") as reg:
        version = reg.get("me/style")
        node = reg.lineage("me/style")
    assert version.kind == "style" and version.tags == ["test"] and version.metadata["trainer"] == "style-lora"
    assert version.metadata["training_config"]["rank"] == 4
    assert node.relation == "trained_from" and [e.role for e in node.inputs] == ["base"]
    assert node.inputs[0].node.tensor_hash == tensor_hash(tiny.base_dir / "unet" / "diffusion_pytorch_model.safetensors")


@torch.no_grad()
def _held_out_eps_mse(unet, tiny) -> float:
    """ε-MSE on fixed latents, noise and timesteps (independent of the training draws)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(tiny.base_dir / "vae")
    tok = CLIPTokenizer.from_pretrained(tiny.base_dir / "tokenizer")
    text = CLIPTextModel.from_pretrained(tiny.base_dir / "text_encoder")
    abar = DDPMScheduler.from_pretrained(tiny.base_dir / "scheduler").alphas_cumprod
    ds = SyntheticShapes(4, 16)
    items = [ds.load(i, None) for i in range(4)]
    z = vae.encode(torch.stack([i["pixels"] for i in items])).latent_dist.mean * vae.config.scaling_factor
    emb = text(tok([i["caption"] for i in items], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    g, total = torch.Generator().manual_seed(99), 0.0
    for t in range(50, 1000, 100):
        t = torch.full((4,), t)
        noise = torch.randn(z.shape, generator=g)
        total += (unet(add_noise(z, noise, t, abar), t, emb).sample - noise).pow(2).mean().item()
    return total / 10


def test_style_lora_loss_drops_clearly_on_synthetic_images(tiny, tmp_path):
    """The tiny random UNet starts at ε-MSE ≈ 1 (it predicts ≈ 0); 30 steps must cut the loss by > 20%."""
    cfg = StyleLoRAConfig(base=tiny.base_dir, output_dir=tmp_path / "run", seed=0, max_steps=30, batch_size=4,
                          data=DataConfig(format="synthetic_images", resolution=16, synthetic_samples=4),
                          rank=8, learning_rate=5e-2,  # a tiny random model: large steps are needed to move it
                          target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_out"),
                          validation_prompts=())
    result = train_style_lora(cfg)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.85 * first, result.losses

    base = weightlab.build_unet(Recipe(base=str(tiny.base_dir)))
    trained = weightlab.build_unet(Recipe(base=str(tiny.base_dir), terms=(Term(source=str(result.outputs[0]), kind="style"),)))
    before, after = _held_out_eps_mse(base, tiny), _held_out_eps_mse(trained, tiny)
    assert before == pytest.approx(1.0, abs=0.05) and after < 0.8 * before, (before, after)
