#!/usr/bin/env python
"""One denoising step of an SD1.5-shaped UNetMotionModel on CPU: PyTorch eager vs ONNX Runtime, same run.

Workload: ``UNetMotionModel.from_unet2d(UNet2DConditionModel(**SD15_UNET_CONFIG), MotionAdapter(**SD15_MOTION_CONFIG))``
with random (default-initialised) weights, fp32; input ``(1, 4, frames, latent, latent)`` with 77-token prompt
embeddings repeated per frame (no CFG, as AnimateLCM samples). The issue's size is 16 frames at 64x64 latents.

Measured: the export (``weightlab.onnx_export.export_unet``: torch.export + ONNX translation + external-data write
+ verification against PyTorch), the graph and data file sizes, ONNX Runtime session creation, then per framework
one untimed warm-up step and ``--repeats`` (>= 3) timed steps, interleaved (torch, ort, torch, ort...); the ratio is
the median of the per-repeat ratios, with its range. Both flush denormals (torch.set_flush_denormal / ORT
session.set_denormal_as_zero), both use torch's thread count, both compute in fp32 on the same input.

ONNX Runtime's CPU attention is the exported MatMul-Softmax-MatMul, which materialises the full score matrix:
at 64x64 latents that is frames x 8 heads x 4096^2 fp32 values (8.6 GB for 16 frames, twice over with the
softmax), so on small machines run smaller latents or fewer frames and say so (the script records the sizes).

Usage (take the benchmark lock: flock -x /tmp/weightlab_cpu.lock ...):
    .venv/bin/python -P benchmarks/sample_cpu.py                         # 16 frames, 64x64 latents, full width
    .venv/bin/python -P benchmarks/sample_cpu.py --base-channels 160 --frames 16 --latent 32   # fits 2 cores, 24 GB
    .venv/bin/python -P benchmarks/sample_cpu.py --tiny                  # tiny widths, seconds (smoke test)
    add --results benchmarks/RESULTS.md to write (replace) this benchmark's section there
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
SECTION = "## Video UNet denoising step on CPU: PyTorch eager vs ONNX Runtime (`benchmarks/sample_cpu.py`)"


def build_model(base_channels: int, seed: int = 0):
    """SD1.5 UNet + AnimateDiff motion module layout, widths scaled by base_channels/320, random weights."""
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from weightlab.families import SD15_MOTION_CONFIG, SD15_UNET_CONFIG

    widths = tuple(c * base_channels // 320 for c in SD15_UNET_CONFIG["block_out_channels"])
    groups = 32 if base_channels >= 32 else base_channels // 2
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(SD15_UNET_CONFIG, block_out_channels=widths, norm_num_groups=groups))
    adapter = MotionAdapter(**dict(SD15_MOTION_CONFIG, block_out_channels=widths, motion_norm_num_groups=groups))
    with torch.no_grad():  # motion proj_out is zero-initialised: make the temporal branch live
        for name, p in adapter.named_parameters():
            if name.endswith(("proj_out.weight", "proj_out.bias")):
                p.normal_(0, 0.02)
    return UNetMotionModel.from_unet2d(unet, adapter).eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--latent", type=int, default=64, help="latent height = width (64 = 512 px)")
    ap.add_argument("--base-channels", type=int, default=320, help="320 = SD1.5 width; smaller scales every block")
    ap.add_argument("--tiny", action="store_true", help="smoke test: --base-channels 16 --frames 4 --latent 16")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per framework (after one warm-up), >= 3")
    ap.add_argument("--work", type=Path, default=None, help="where the export goes (a temp folder by default)")
    ap.add_argument("--keep", action="store_true", help="keep the export")
    ap.add_argument("--notes", type=Path, default=None, help="Markdown appended to the section")
    ap.add_argument("--results", type=Path, default=None, help="write (replace) this benchmark's section here")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be >= 3: no ratio rests on fewer timed steps")
    if args.tiny:
        args.base_channels, args.frames, args.latent = 16, 4, 16

    import numpy as np
    import onnxruntime as ort
    import torch

    from weightlab.onnx_export import export_unet
    from weightlab.onnx_runtime import BoundModel, create_session

    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    model = build_model(args.base_channels)
    params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - t0
    print(f"model: {params / 1e6:.0f} M parameters, built in {build_s:.1f} s", flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix="sample_cpu_"))
    t0 = time.perf_counter()
    entry = export_unet(model, work / "unet")
    export_s = time.perf_counter() - t0
    graph_mb, data_mb = entry.bytes.graph / 1e6, entry.bytes.data / 1e6
    check = entry.verification
    print(f"export: {export_s:.1f} s (trace+translate+save {entry.export_seconds:.1f} s), graph {graph_mb:.1f} MB, "
          f"data {data_mb:.1f} MB, verify max abs {check.max_abs_err:.2e} rel {check.max_rel_err:.2e}", flush=True)
    gc.collect()

    t0 = time.perf_counter()
    session = create_session(work / "unet" / "model.onnx", "cpu")
    session_s = time.perf_counter() - t0
    onnx_unet = BoundModel(session, "cpu")
    print(f"ORT session: {session_s:.1f} s", flush=True)

    g = torch.Generator().manual_seed(0)
    shape = (1, 4, args.frames, args.latent, args.latent)
    sample = torch.randn(shape, generator=g)
    embeds = torch.randn(args.frames, 77, model.config.cross_attention_dim, generator=g)
    t = torch.tensor(999, dtype=torch.int64)

    def step_torch():
        with torch.inference_mode():
            return model(sample, t, embeds, return_dict=False)[0]

    def step_ort():
        return onnx_unet(shape, torch.float32, sample=sample, timestep=t, encoder_hidden_states=embeds)

    times = {"pytorch": [], "onnxruntime": []}
    outs = {}
    for name, fn in (("pytorch", step_torch), ("onnxruntime", step_ort)):  # warm-up
        t0 = time.perf_counter()
        outs[name] = fn()
        print(f"{name} warm-up step: {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.repeats):
        for name, fn in (("pytorch", step_torch), ("onnxruntime", step_ort)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"{name} step: {times[name][-1]:.2f} s", flush=True)
    diff = float((outs["pytorch"] - outs["onnxruntime"]).abs().max())
    per = H.ratios(times["pytorch"], times["onnxruntime"])  # interleaved: repeat i of each ran back to back
    peak = H.peak_rss_gb()
    print(f"steps: pytorch {H.mr(times['pytorch'])} s, onnxruntime {H.mr(times['onnxruntime'])} s; ORT speed-up per "
          f"repeat {H.mr(per)}x; max |diff| {diff:.2e}; peak RSS {peak:.1f} GB", flush=True)

    if args.results:
        full = args.base_channels == 320
        size = f"{args.frames}x{args.latent}x{args.latent} latents"
        lines = [
            SECTION, "",
            f"Run {H.now()}. Machine: {H.machine()}. torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"onnxruntime {ort.__version__} (CPUExecutionProvider, same thread count, no spinning), numpy "
            f"{np.__version__}.", "",
            f"Model: {'full-size SD1.5' if full else f'SD1.5 layout at {args.base_channels}/320 width'} UNetMotionModel "
            f"(UNet + AnimateDiff motion module, {params / 1e6:.0f} M parameters), random weights, fp32 on both sides. "
            f"Input: {size}, batch 1 (no CFG), 77-token prompt embeddings per frame, t = 999. One untimed warm-up step "
            f"each, then {args.repeats} timed steps each, interleaved (PyTorch, ONNX Runtime, PyTorch, ...); "
            "median [min–max].", "",
            "| measure | value |", "|---|---|",
            f"| export (torch.export + ONNX translation + save), 1 run | {entry['export_seconds']:.1f} s |",
            f"| export incl. verification vs PyTorch, 1 run | {export_s:.1f} s (max abs err {check['max_abs_err']:.2e}, "
            f"rel {check['max_rel_err']:.2e}) |",
            f"| files | graph {graph_mb:.1f} MB + external data {data_mb:.1f} MB |",
            f"| ONNX Runtime session creation, 1 run | {session_s:.1f} s |",
            f"| PyTorch eager, one step at {size} | {H.mr(times['pytorch'])} s |",
            f"| ONNX Runtime CPU, one step at {size} | {H.mr(times['onnxruntime'])} s |",
            f"| **ONNX Runtime speed-up over PyTorch** (per-repeat ratios) | **{H.mr(per)}x** |",
            f"| max abs difference of the two outputs | {diff:.2e} |",
            f"| peak RSS of the process | {peak:.1f} GB |",
        ]
        if not (full and args.frames == 16 and args.latent == 64):
            lines += ["", f"Not the issue's size (full-size model, 16x64x64): this run used "
                      f"{'full width' if full else f'width {args.base_channels}/320'} at {size}. "
                      "See the script's docstring for why 16x64x64 does not fit ONNX Runtime's CPU attention here."]
        if args.notes:
            lines += ["", args.notes.read_text().strip()]
        H.write_section("\n".join(lines) + "\n", args.results)
        print(f"wrote {SECTION!r} to {args.results}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
