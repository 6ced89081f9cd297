"""``weightlab generate``: sample a clip (PyTorch, or ONNX Runtime with ``--onnx``) and write MP4 + GIF."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from weightlab.cli.common import console, fail_on_error


def generate_cmd(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text prompt."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .mp4; the GIF is written next to it."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML/JSON or merged model folder (optional with --onnx)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Sample with ONNX Runtime from this `weightlab export onnx` folder."),
    provider: str = typer.Option("auto", "--provider", help="With --onnx: auto | cuda | tensorrt | cpu."),
    sampler: str = typer.Option("lcm", "--sampler", help="lcm (AnimateLCM) | ddim | dpmpp (DPM-Solver++), all on "
                                "the linear schedule; ddim/dpmpp for models that are not consistency-distilled."),
    steps: int = typer.Option(4, "--steps", help="Sampler steps."),
    frames: int = typer.Option(16, "--frames", help="Frames (at most the motion module's 32)."),
    guidance: float = typer.Option(1.0, "--guidance", help="1.0 = no CFG; lcm allows up to 2.0, ddim/dpmpp any (e.g. 7.5)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial and per-step noise."),
    height: Optional[int] = typer.Option(None, "--height", help="Pixels; the model's native size when omitted."),
    width: Optional[int] = typer.Option(None, "--width", help="Pixels; the model's native size when omitted."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Used only with --guidance > 1."),
    fps: int = typer.Option(8, "--fps", help="Frames per second of the MP4/GIF."),
    gif: bool = typer.Option(True, "--gif/--no-gif", help="Also write a GIF."),
    device: Optional[str] = typer.Option(None, "--device", help="PyTorch device (cpu, cuda); the recipe's when omitted."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder for a single-file base "
                                             "checkpoint; the family's from the Hugging Face cache when omitted."),
    shared_noise: float = typer.Option(0.0, "--shared-noise", help="Share (0-1) of each frame's noise common to all "
                                       "frames (PYoCo's mixed noise); 0 = i.i.d., as motion modules are trained."),
    noise_motion: Optional[str] = typer.Option(None, "--noise-motion", metavar="DX,DY", help="Move the shared noise "
                                               "by DX,DY latent pixels per frame (Text2Video-Zero); needs --shared-noise."),
) -> None:
    """Sample a video clip (16 frames, 4 LCM steps, no CFG by default) and write it as MP4 and GIF."""
    from rich.table import Table

    from weightlab.noise_prior import NoisePrior
    from weightlab.registry.resolve import LocalResolver
    from weightlab.video import generate

    with fail_on_error(), LocalResolver() as resolve:
        noise = NoisePrior(shared=shared_noise, motion=_pair(noise_motion) if noise_motion else (0.0, 0.0))
        result = generate(recipe, prompt, out, onnx_dir=onnx, provider=provider, gif=gif, fps=fps, device=device, frames=frames,
                          steps=steps, guidance=guidance, seed=seed, height=height, width=width,
                          negative_prompt=negative_prompt, sampler=sampler, resolve=resolve, tokenizer=tokenizer,
                          noise=noise)
    table = Table(title=f"weightlab generate ({result['backend']}, {sampler})")
    for col in ("stage", "seconds"):
        table.add_column(col)
    for stage, seconds in result["seconds"].items():
        table.add_row(stage, f"{seconds:.3f}")
    console.print(table)
    console.print(f"{result['frames']} frames, {result['size'][1]}x{result['size'][0]} px")
    console.print(f"mp4: {result['mp4']}")
    if result["gif"]:
        console.print(f"gif: {result['gif']}")


def _pair(text: str) -> tuple[float, float]:
    from weightlab.errors import SamplingError

    try:
        dx, dy = (float(v) for v in text.split(","))
    except ValueError:
        raise SamplingError(f"--noise-motion {text!r}: give DX,DY in latent pixels per frame. Fix: e.g. "
                            "--noise-motion 0.7,0 (rightwards).") from None
    return dx, dy


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
