"""``python -m weightlab.train TRAINER --config CFG.yaml``: the entry point for multi-process launchers.

    accelerate launch --num_processes 8 -m weightlab.train image-lcm --config lcm.yaml
    torchrun --nproc_per_node 8 -m weightlab.train motion-lcm --config motion.yaml

It imports only the trainers (not the whole ``weightlab`` CLI), so each process starts quickly; the options are
those of ``weightlab train``, and so is the registry's part (``weightlab.cli.train``, imported only when a config
names a registry reference or asks to register its output).
"""

import argparse
import sys

from weightlab.errors import WeightlabError
from weightlab.train import TRAINERS, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weightlab.train", description=__doc__.splitlines()[0])
    parser.add_argument("trainer", choices=sorted(TRAINERS))
    parser.add_argument("--config", "-c", required=True, help="YAML file with the trainer's config.")
    parser.add_argument("--stop-after", type=int, default=None, help="Stop after this many total steps, checkpointed.")
    args = parser.parse_args(argv)
    cls, train = TRAINERS[args.trainer]
    try:
        cfg = load_config(args.config, cls)
        if any(not path.exists() for _, path in cfg.inputs()):  # maybe registry references: the CLI's resolver
            from weightlab.cli.train import resolve_inputs

            cfg = resolve_inputs(cfg)
        result = train(cfg, stop_after=args.stop_after)
        if cfg.register_as is not None:
            from weightlab.cli.train import register_result

            for ref in register_result(args.trainer, cfg, result):  # the main process's output only
                print(f"registered: {ref}")
    except WeightlabError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for path in result.outputs:
        print(f"output: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
