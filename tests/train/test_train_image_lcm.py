"""image-lcm: the consistency property on a tiny teacher, and DDP on two CPU processes (gloo) ≈ one process with
gradient accumulation ≈ one process with the doubled batch (within float noise)."""

import socket
import subprocess
import sys

import torch

import weightlab
from weightlab.files import load_tensors
from weightlab.recipe import Recipe, Term
from weightlab.train import DataConfig, ImageLCMConfig, train_image_lcm
from weightlab.train.config import LCM_LORA_TARGETS
from weightlab.train.consistency import DDIMSolver, add_noise, boundary_scalings, consistency_fn, guided, predicted_x0
from weightlab.train.data import SyntheticShapes


@torch.no_grad()
def _distances_to_teacher_ddim(tiny, student, teacher, n_ddim: int, w: float) -> list[float]:
    """Per solver index n: MSE between the student's one-step f(x_t, t) and the teacher's n+1-step CFG DDIM result."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(tiny.base_dir / "vae")
    tok = CLIPTokenizer.from_pretrained(tiny.base_dir / "tokenizer")
    text = CLIPTextModel.from_pretrained(tiny.base_dir / "text_encoder")
    abar = DDPMScheduler.from_pretrained(tiny.base_dir / "scheduler").alphas_cumprod
    solver = DDIMSolver.from_schedule(abar, n_ddim)
    ds = SyntheticShapes(4, 16)
    items = [ds.load(i, None) for i in range(4)]
    z = vae.encode(torch.stack([i["pixels"] for i in items])).latent_dist.mean * vae.config.scaling_factor

    def embed(captions):
        return text(tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]

    cond, uncond, ws = embed([i["caption"] for i in items]), embed([""] * 4), torch.full((4,), w)
    g, out = torch.Generator().manual_seed(123), []
    for n in range(n_ddim):
        index = torch.full((4,), n)
        t = solver.timesteps[index]
        x_t = add_noise(z, torch.randn(z.shape, generator=g), t, abar)
        x = x_t
        for m in range(n, -1, -1):  # the teacher's DDIM chain t_n -> ... -> 0, CFG in the LCM form
            i = torch.full((4,), m)
            tm = solver.timesteps[i]
            c, u = teacher(x, tm, cond).sample, teacher(x, tm, uncond).sample
            x = solver.step(guided(predicted_x0(c, x, tm, abar), predicted_x0(u, x, tm, abar), ws), guided(c, u, ws), i)
        f = consistency_fn(x_t, predicted_x0(student(x_t, t, cond).sample, x_t, t, abar), *boundary_scalings(t))
        out.append((f - x).pow(2).mean().item())
    return out


def test_student_one_step_moves_toward_the_teachers_multistep_ddim(tiny, tmp_path):
    n_ddim, w = 4, 5.0
    cfg = ImageLCMConfig(base=tiny.base_dir, output_dir=tmp_path / "run", seed=0, max_steps=20, batch_size=2,
                         data=DataConfig(format="synthetic_images", resolution=16, synthetic_samples=4),
                         rank=8, learning_rate=5e-4, num_ddim_timesteps=n_ddim, w_min=w, w_max=w, validation_prompts=())
    result = train_image_lcm(cfg)
    lora = weightlab.load(result.outputs[0])
    assert lora.kind == "image_accel" and lora.ranks == [8]
    assert {t for t in LCM_LORA_TARGETS if any(p.endswith("." + t) for p in lora.targets)} == set(LCM_LORA_TARGETS)

    teacher = weightlab.build_unet(Recipe(base=str(tiny.base_dir)))
    lcm = Term(source=str(result.outputs[0]), kind="image_accel")
    student = weightlab.build_unet(Recipe(base=str(tiny.base_dir), terms=(lcm,)))
    before = _distances_to_teacher_ddim(tiny, teacher, teacher, n_ddim, w)  # untrained student = base, LoRA B = 0
    after = _distances_to_teacher_ddim(tiny, student, teacher, n_ddim, w)
    ratios = [a / b for a, b in zip(after, before)]
    assert all(r < 1.0 for r in ratios) and sum(ratios) / len(ratios) < 0.93, (before, after)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_match_one_process_with_accumulation_and_the_doubled_batch(tiny, tmp_path, subprocess_env):
    """DDP on two CPU processes (gloo, batch 1 each) against one process run two ways, same 2 samples per step.

    - Batch 1 with 2 accumulation steps: every micro-batch is the same batch-1 forward and backward as on a DDP rank;
      DDP averages (g0 + g1)/2 and accumulation sums g0/2 + g1/2, the same math.
    - Batch 2: the same math again, CPU kernels reducing a batch of 2 in another order.

    Neither is bitwise equal to the accumulation run on every machine: CPU kernels may pick another code path in a
    DDP child than in this process (measured on a fresh machine with torch 2.14: step-1 losses 3e-6 apart, before
    any update). So both are judged as float noise against the first step's values and the weights' update, not
    against a loss that falls ~50x in 3 steps; a wrong sample, a missing /2, a skipped sync or a wrong step changes
    them by O(1).
    """
    # adam_epsilon = 1: the update is ≈ lr·m (linear in the gradient); with the usual 1e-8 Adam moves a weight by
    # ±lr on the sign of a ~0 gradient, which float noise from a different reduction order can flip.
    common = dict(base=tiny.base_dir, seed=0, max_steps=3, rank=4, learning_rate=1e-2, adam_epsilon=1.0,
                  checkpoint_every=3,
                  data=DataConfig(format="synthetic_images", resolution=16, synthetic_samples=8), validation_prompts=())
    two = ImageLCMConfig(output_dir=tmp_path / "two", batch_size=1, **common)
    two.to_yaml(tmp_path / "two.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "weightlab.train", "image-lcm", "--config", str(tmp_path / "two.yaml")]
    proc = subprocess.run(cmd, env={**subprocess_env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "two" / "checkpoints" / "step-00000003" / "custom_checkpoint_0.pkl", weights_only=True)
    assert state["step"] == 3
    ddp = load_tensors(tmp_path / "two" / "lcm_lora.safetensors")[0]

    accum = train_image_lcm(ImageLCMConfig(output_dir=tmp_path / "accum", batch_size=1, gradient_accumulation_steps=2,
                                           **common))
    a = load_tensors(accum.outputs[0])[0]
    assert a.keys() == ddp.keys()
    moved = max(v.abs().max().item() for k, v in a.items() if ".lora_B." in k)  # B starts at 0: its size is the update's
    assert moved > 0

    doubled = train_image_lcm(ImageLCMConfig(output_dir=tmp_path / "doubled", batch_size=2, **common))
    b = load_tensors(doubled.outputs[0])[0]
    # Measured (torch 2.14, x86_64): losses within 1e-5 of the first loss, gradient norms within 7e-5 of the first
    # norm, weights within 4e-5 (DDP) and 2.5e-4 (batch 2) of the update; the weights' share is larger because the
    # pseudo-Huber gradient d/√(d²+c²) magnifies the noise of d where |d| ~ c. The tolerances (1e-3, 2e-3) leave a
    # margin of 8x or more and are still far below the O(1) of a bug.
    runs = {"ddp": (state["losses"], state["grad_norms"], ddp), "batch 2": (doubled.losses, doubled.grad_norms, b)}
    for run, (losses, grad_norms, weights) in runs.items():
        for name, ours, ref in (("loss", losses, accum.losses), ("grad_norm", grad_norms, accum.grad_norms)):
            assert all(abs(x - y) <= 1e-3 * ref[0] for x, y in zip(ours, ref)), (run, name, ours, ref)
        for k in a:
            torch.testing.assert_close(weights[k], a[k], rtol=0, atol=2e-3 * moved, msg=f"{run}: {k}")
