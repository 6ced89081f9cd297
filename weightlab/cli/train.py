"""``weightlab train TRAINER --config CFG.yaml``: the bundled trainers (``teacher``, ``motion-module``, ``style-lora``,
``image-lcm``, ``motion-lcm``).

Multi-process runs use the same config through ``python -m weightlab.train`` (one process per GPU):

    accelerate launch --num_processes 8 -m weightlab.train image-lcm --config lcm.yaml

The trainers read paths only. This entry point (and ``python -m weightlab.train``) supplies the registry: an input
that is not a path may be a registry reference (``ns/name@version``, ``ns/name:alias``), and a config's
``register_as`` registers the finished output with ``trained_from`` lineage.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from weightlab.cli.common import console, fail_on_error

CONFIG_HELP = "YAML file with the trainer's config (fields: below, and docs/training.md)."
SUMMARIES = {
    "teacher": "w0: train a small text-conditioned UNet from scratch (ε-prediction) on captioned images; outputs a "
               "diffusers pipeline folder. Default UNet: SD1.5's block layout, block_out_channels (32, 64, 64), one "
               "layer per block, ~1.5 M parameters (unet_config overrides it).",
    "motion-module": "The AnimateDiff stage: train a motion module on video over a frozen base (ε-prediction).",
    "style-lora": "τ_style: ε-prediction LoRA fine-tune on captioned images.",
    "image-lcm": "τ_image_accel: consistency-distil the base into an LCM-LoRA.",
    "motion-lcm": "τ_motion: consistency-distil a motion module on video (coupled: true also distils a spatial LoRA).",
}


def resolve_inputs(cfg):
    """``cfg`` with its input paths that do not exist resolved as registry references, by the registry's resolver
    (:class:`weightlab.registry.resolve.LocalResolver`, in ``register_as.home``'s registry, else the default one)."""
    from weightlab.registry.resolve import LocalResolver

    with LocalResolver(cfg.register_as.home if cfg.register_as is not None else None) as resolve:
        return cfg.resolve_inputs(resolve)


def register_result(trainer: str, cfg, result) -> list[str]:
    """Register a finished run's main output as ``cfg.register_as`` says: ``trained_from`` lineage naming each input
    (by the tensor hash of its weights file, so a registered copy becomes the parent), the full config as metadata.

    Returns:
        list[str]: the new version's reference, or ``[]`` (nothing to register, or not this process's output).
    """
    if cfg.register_as is None or not result.outputs:
        return []
    from weightlab.files import tensor_hash
    from weightlab.inspect import weights_file
    from weightlab.registry.schemas import Derivation, LineageInput
    from weightlab.registry.service import Registry

    reg = cfg.register_as
    derivation = Derivation(relation="trained_from", inputs=[
        LineageInput(tensor_hash=tensor_hash(weights_file(Path(p))), label=str(p), role=role) for role, p in cfg.inputs()])
    metadata = {"trainer": trainer, "training_config": json.loads(cfg.model_dump_json())}
    with Registry(home=reg.home) as registry:
        return [registry.register_output(result.outputs[0], name=reg.name, kind=result.kind, derivation=derivation,
                                         tags=reg.tags, metadata=metadata).ref]


def _run(trainer: str, config: Path, stop_after: int | None) -> None:
    from weightlab.train import TRAINERS, load_config

    cls, fn = TRAINERS[trainer]
    with fail_on_error():
        cfg = resolve_inputs(load_config(config, cls))
        result = fn(cfg, stop_after=stop_after)
        registered = register_result(trainer, cfg, result)
    if not result.finished:
        console.print(f"stopped at step {result.step} with a checkpoint in {result.output_dir / 'checkpoints'}; "
                      "run the same command again to continue")
        return
    for path in result.outputs:
        console.print(f"output: {path}")
    for ref in registered:
        console.print(f"registered: {ref}")


def _fields_help(cls) -> str:
    """The trainer's own config fields (those beyond the shared ones) with their defaults, one per line."""
    from weightlab.train.config import TrainConfig

    own = [(name, f) for name, f in cls.model_fields.items() if name not in TrainConfig.model_fields
           or f.default != TrainConfig.model_fields[name].default]
    lines = [f"{name}: {'required' if f.is_required() else json.dumps(f.default, default=str)}" for name, f in own]
    return "\n\n".join(["Config fields of this trainer (YAML; shared fields: base, output_dir, data, max_steps, "
                        "learning_rate, ... in docs/training.md):", "\n".join(lines)])


def _command(trainer: str):
    from weightlab.train.config import CONFIGS  # no torch: the help stays quick

    def command(
        config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
        stop_after: int | None = typer.Option(None, "--stop-after", help="Stop after this many total steps, "
                                              "checkpointed (for time-sliced jobs); rerun to continue."),
    ) -> None:
        _run(trainer, config, stop_after)

    command.__doc__ = f"{SUMMARIES[trainer]}\n\n{_fields_help(CONFIGS[trainer])}"
    return command


def build_app() -> typer.Typer:
    """The ``train`` command group."""
    app = typer.Typer(help="Train the residuals of Eq. 2 (style LoRA, image LCM-LoRA, motion module) and the teacher "
                           "models they start from.", no_args_is_help=True, pretty_exceptions_enable=False)
    for trainer in SUMMARIES:
        app.command(trainer)(_command(trainer))
    return app


def register(app: typer.Typer) -> None:
    app.add_typer(build_app(), name="train")
