"""The toy base pipeline: the tiny family's text encoder, tokenizer and AnimateLCM scheduler, with a VAE fitted to
the toy frames.

The tiny family's VAE is random (it only has to have the right shapes for the merge and format tests), so it cannot
decode a sample into a picture; the teacher trainer borrows its base's VAE, so the experiments need one that
reconstructs the toy shapes, filled and outlined. It is the tiny family's VAE architecture (32×32 pixels ->
4×16×16 latents) trained here by reconstruction with a small KL term; its ``scaling_factor`` makes the latents
of the toy frames unit-variance, as SD's 0.18215 does for SD's.

Example:
    >>> base = build_toy_base("runs/toy/base", seed=0)     # doctest: +SKIP
    >>> sorted(p.name for p in base.iterdir())              # doctest: +SKIP
    ['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'toy_base.json', 'unet', 'vae']
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from weightlab.toy.data import STYLES, toy_set
from weightlab.train.data import to_pixels

log = logging.getLogger(__name__)
VERSION = "1"


def fit_vae(*, seed: int = 0, steps: int = 1500, batch_size: int = 32, samples: int = 512, resolution: int = 32,
            kl_weight: float = 1e-4, learning_rate: float = 2e-3):
    """An ``AutoencoderKL`` of the tiny family's config trained to reconstruct toy frames (both styles, all positions).

    Args:
        seed (int, default 0): initial weights, batches and the posterior noise.
        steps (int, default 1500): AdamW steps. batch_size (int, default 32): frames per step.
        samples (int, default 512): clips per style whose frames are the training set.
        kl_weight (float, default 1e-4): weight of KL(q(z|x) ‖ N(0, I)) per latent element against the pixel MSE.
    Returns:
        AutoencoderKL: eval mode, ``scaling_factor`` set to 1 / std of the latent means of the training frames.
    """
    from diffusers import AutoencoderKL

    from weightlab.testing import TINY_VAE_CONFIG

    frames = np.concatenate([toy_set(samples, start=0, resolution=resolution, style=s).frames for s in STYLES])
    frames = frames.reshape(-1, *frames.shape[-3:])  # every frame of every clip: [N, H, W, 3]
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": resolution})
    opt = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = to_pixels(frames[torch.randint(len(frames), (batch_size,), generator=rng).numpy()])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=rng)
        loss = (vae.decode(z).sample - x).pow(2).mean() + kl_weight * post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            log.info("toy VAE step %d loss %.5f", step, loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = [vae.encode(to_pixels(frames[i:i + 256])).latent_dist.mean
                 for i in range(0, min(len(frames), 2048), 256)]
    std = torch.cat(means).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return vae


def build_toy_base(folder: str | Path, *, seed: int = 0, vae_steps: int = 1500, force: bool = False) -> Path:
    """Write the toy base pipeline folder (reused when already built with the same seed and steps).

    The tiny family's pipeline (:func:`weightlab.testing.build_tiny_family`) with ``vae/`` replaced by
    :func:`fit_vae`'s; its random UNet is only a placeholder (the ``teacher`` trainer builds its own).

    Args:
        folder (str | Path): output folder. seed (int, default 0): the family's and the VAE's seed.
        vae_steps (int, default 1500): VAE training steps. force (bool, default False): rebuild anyway.
    Returns:
        Path: the pipeline folder.
    """
    from weightlab.testing import build_tiny_family

    folder = Path(folder)
    stamp, want = folder / "toy_base.json", {"seed": seed, "vae_steps": vae_steps, "version": VERSION}
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    family = build_tiny_family(folder.parent / f"{folder.name}.tiny", seed)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(family.base_dir, folder)
    shutil.rmtree(folder / "vae")
    fit_vae(seed=seed, steps=vae_steps).save_pretrained(folder / "vae")
    stamp.write_text(json.dumps(want))
    return folder
