"""``make demo``: weightlab's main job, step by step, on the tiny model family (nothing is downloaded).

Run:
    make demo                      # or: python -m weightlab.demo
    WEIGHTLAB_HOME=/tmp/wl make demo

Files go under ``$WEIGHTLAB_HOME`` (default ``~/.weightlab``); the tiny family lives in ``$WEIGHTLAB_HOME/tiny``
and is rebuilt only if missing. Each step is a small function of the shared :class:`Demo` state; later steps
(merge, sample, export, registry) are appended to ``STEPS``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never needs the hub; fail fast if something tries
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep optional-dependency notices out of the output
# Wide and fixed, so tables stay readable in CI logs (which are not terminals and would default to 80 columns).
console = Console(width=200)


@dataclass
class Demo:
    """What the steps share: where files go, and what earlier steps produced."""

    home: Path
    tiny: "TinyFamily | None" = None  # noqa: F821
    inspections: dict = field(default_factory=dict)  # name -> weightlab.inspect.Inspection


def build_tiny(demo: Demo) -> None:
    """Write the tiny SD1.5-shaped family in its real on-disk layouts."""
    from weightlab.testing import build_tiny_family

    demo.tiny = build_tiny_family(demo.home / "tiny")
    console.print(f"tiny family in {demo.tiny.root}")


def inspect_files(demo: Demo) -> None:
    """``weightlab inspect`` on every file: family, kind, representation, ranks, hashes."""
    from weightlab.cli.inspect import inspect_table
    from weightlab.inspect import inspect_path

    demo.inspections = {name: inspect_path(path) for name, path in demo.tiny.files().items()}
    console.print(inspect_table(list(demo.inspections.values())))


STEPS = [
    ("Build the tiny model family", build_tiny),
    ("Inspect every file", inspect_files),
]


def main() -> int:
    demo = Demo(home=Path(os.environ.get("WEIGHTLAB_HOME") or "~/.weightlab").expanduser())
    start = time.perf_counter()
    for i, (title, step) in enumerate(STEPS, 1):
        console.rule(f"[bold]{i}. {title}")
        t = time.perf_counter()
        step(demo)
        console.print(f"[dim]{title}: {time.perf_counter() - t:.1f} s[/]")
    console.rule(f"[bold green]demo done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
