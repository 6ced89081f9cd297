"""``weightlab train style-lora|image-lcm|motion-lcm --config CFG.yaml``: the bundled trainers.

Multi-process runs use the same config through ``python -m weightlab.train`` (one process per GPU):

    accelerate launch --num_processes 8 -m weightlab.train image-lcm --config lcm.yaml
"""

from __future__ import annotations

from pathlib import Path

import typer

from weightlab.cli.common import console, fail_on_error

CONFIG_HELP = "YAML file with the trainer's config (fields: docs/training.md)."


def _run(trainer: str, config: Path, stop_after: int | None) -> None:
    from weightlab.train import TRAINERS, load_config

    cls, fn = TRAINERS[trainer]
    with fail_on_error():
        result = fn(load_config(config, cls), stop_after=stop_after)
    if not result.finished:
        console.print(f"stopped at step {result.step} with a checkpoint in {result.output_dir / 'checkpoints'}; "
                      "run the same command again to continue")
        return
    for path in result.outputs:
        console.print(f"output: {path}")
    for ref in result.registered:
        console.print(f"registered: {ref}")


def _command(trainer: str, summary: str):
    def command(
        config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
        stop_after: int | None = typer.Option(None, "--stop-after", help="Stop after this many total steps, "
                                              "checkpointed (for time-sliced jobs); rerun to continue."),
    ) -> None:
        _run(trainer, config, stop_after)

    command.__doc__ = summary
    return command


def build_app() -> typer.Typer:
    """The ``train`` command group."""
    app = typer.Typer(help="Train the residuals of Eq. 2: style LoRA, image LCM-LoRA, motion module.",
                      no_args_is_help=True, pretty_exceptions_enable=False)
    app.command("style-lora")(_command("style-lora", "τ_style: ε-prediction LoRA fine-tune on captioned images."))
    app.command("image-lcm")(_command("image-lcm", "τ_image_accel: consistency-distil the base into an LCM-LoRA."))
    app.command("motion-lcm")(_command("motion-lcm", "τ_motion: consistency-distil a motion module on video."))
    return app


def register(app: typer.Typer) -> None:
    app.add_typer(build_app(), name="train")
