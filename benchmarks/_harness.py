"""Shared bits of the benchmark scripts: machine description, medians with ranges, RESULTS.md sections.

Import from a script run as ``python -P benchmarks/x.py`` with ``sys.path.insert(0, str(Path(__file__).parent))``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def now() -> str:
    """The current time as ``YYYY-MM-DD HH:MM UTC`` (every figure carries its date)."""
    return f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def ram_gib() -> float:
    try:
        return next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        return float("nan")


def machine() -> str:
    """One line naming the machine: CPU, cores, RAM, GPU (if torch sees one), commit."""
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return (f"{cpu_model()}, {os.cpu_count()} cores, {ram_gib():.1f} GiB RAM, GPU: {gpu}; shared with other jobs; "
            f"weightlab commit {commit} (+ uncommitted work in the tree)")


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def mr(xs, fmt: str = "{:.2f}") -> str:
    """``median [min–max]`` of ``xs``; refuses to present a single value as a measurement."""
    if not xs:
        return "—"
    if len(xs) == 1:
        return fmt.format(xs[0]) + " (1 run)"
    return f"{fmt.format(med(xs))} [{fmt.format(min(xs))}–{fmt.format(max(xs))}]"


def ratios(num, den) -> list[float]:
    """Per-repeat ratios of two interleaved series (repeat i of one against repeat i of the other)."""
    return [a / b for a, b in zip(num, den)]


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def write_section(section: str, path: Path = RESULTS) -> None:
    """Replace the ``## `` section whose heading is ``section``'s first line, or append it; others are kept as is."""
    head = section.strip("\n").splitlines()[0]
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == head), None)
    body = section.strip("\n") + "\n"
    if start is None:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        text = "".join(lines[:start]) + body + ("\n" + tail if tail else "")
    path.write_text(text)
