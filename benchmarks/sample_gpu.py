#!/usr/bin/env python
"""16-frame 512x512 fp16 video sampling on one GPU: AnimateLCM 4 steps (PyTorch eager, ONNX Runtime CUDA) vs the
AnimateLCM paper's baseline, 50 steps with CFG 7.5 (PyTorch). Prepared for an H100/H200; nothing comes from the
network; a few minutes.

Workload: a full-size SD1.5 AnimateDiff pipeline with random weights built in code: UNetMotionModel (SD1.5 UNet
+ motion module), CLIP text encoder (SD1.5 config), SD VAE, weightlab's byte-level test tokenizer. Timed, as the
AnimateLCM paper does: the denoising loop only (prompt encoding and VAE decode excluded), batch 1, 16 frames,
64x64 latents.

Rows:
- ``animatelcm-4step pytorch``: :class:`weightlab.video.VideoPipeline` (diffusers AnimateDiffPipeline, AnimateLCM's
  LCMScheduler), 4 steps, guidance 1.0.
- ``animatelcm-4step onnxruntime-cuda``: :class:`weightlab.onnx_runtime.OnnxVideoPipeline` on the CUDA provider with
  IO binding, from :func:`weightlab.onnx_export.export_onnx` (fp16; export time and verification recorded).
  Skipped with the reason when onnxruntime has no CUDA provider.
- ``baseline-50step-cfg7.5 pytorch``: the paper's baseline: the same AnimateDiffPipeline with a DDIMScheduler,
  50 steps, guidance 7.5 (100 UNet evaluations: diffusers batches the conditional and unconditional halves, so 50
  UNet calls at batch 2).
- ``baseline-25step-cfg7.5 pytorch``: the same with 25 steps (50 UNet evaluations), a second, easier baseline.

Targets (issue 5): 4-step denoising <= 250 ms on an H100; ONNX Runtime >= 1.3x faster than PyTorch eager;
4-step >= 12x faster than the 50-step CFG baseline. Every row is timed the same way: wall clock around the
denoising loop, the device synchronised before and after; ``--warmup`` untimed runs of every row, then
``--repeats`` (>= 5) timed runs, interleaved across rows. Ratios are medians of the per-repeat ratios, with their
range.

Usage (GPU machine; needs torch, diffusers, safetensors, transformers, onnx, onnxscript, onnxruntime-gpu):
    python benchmarks/sample_gpu.py --results benchmarks/RESULTS.md   # replaces this benchmark's section
    python benchmarks/sample_gpu.py --device cpu --tiny      # smoke test of the whole script on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout (no install)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

SECTION = "## Video sampling on GPU (`benchmarks/sample_gpu.py`)"
BASELINES = {"baseline-50step-cfg7.5 pytorch": 50, "baseline-25step-cfg7.5 pytorch": 25}

SD_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def build_pipeline_folder(folder: Path, *, tiny: bool, dtype) -> tuple[Path, Path]:
    """Write a random-weight SD1.5 pipeline (text encoder, tokenizer, VAE, scheduler) and a merged UNetMotionModel
    folder; return (pipeline_dir, unet_dir)."""
    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from weightlab.families import SD15_MOTION_CONFIG, SD15_UNET_CONFIG
    from weightlab.testing import BOS_ID, EOS_ID, TINY_MOTION_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, build_tokenizer
    from weightlab.video import animatelcm_scheduler

    torch.manual_seed(0)
    text_cfg = dict(SD_TEXT, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    if tiny:
        text_cfg.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG))
    adapter = MotionAdapter(**(TINY_MOTION_CONFIG if tiny else SD15_MOTION_CONFIG))
    with torch.no_grad():  # motion proj_out is zero-initialised: make the temporal branch live
        for name, p in adapter.named_parameters():
            if name.endswith(("proj_out.weight", "proj_out.bias")):
                p.normal_(0, 0.02)
    UNetMotionModel.from_unet2d(unet, adapter).to(dtype).save_pretrained(folder / "unet_merged")
    pipe_dir = folder / "pipeline"
    CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype).save_pretrained(pipe_dir / "text_encoder")
    AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD_VAE)).to(dtype).save_pretrained(pipe_dir / "vae")
    build_tokenizer(pipe_dir / "tokenizer")
    animatelcm_scheduler().save_config(pipe_dir / "scheduler")
    return pipe_dir, folder / "unet_merged"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny widths and 32 px (smoke test)")
    ap.add_argument("--dtype", default=None, help="float16 (default on cuda) | float32 (default on cpu)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512; 128 with --tiny)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset for the export (exporter default when omitted)")
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (a temp folder by default)")
    ap.add_argument("--results", type=Path, default=None, help="write (replace) this benchmark's section here")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be >= 5 (no ratio rests on fewer timed runs)")

    import onnxruntime as ort
    import torch
    from diffusers import DDIMScheduler

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("sample_gpu.py needs CUDA: torch sees no GPU here. For a CPU smoke test of the script run it "
                 "with --device cpu --tiny.")

    from weightlab.video import VideoPipeline, build_pipeline, load_unet, sync

    dtype_name = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    size = args.size or (32 if args.tiny else 512)
    if args.device == "cpu":
        torch.set_flush_denormal(True)
    work = args.work or Path(tempfile.mkdtemp(prefix="sample_gpu_"))
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {card}; torch {torch.__version__}; onnxruntime {ort.__version__} "
          f"providers {ort.get_available_providers()}", flush=True)

    t0 = time.perf_counter()
    pipe_dir, unet_dir = build_pipeline_folder(work, tiny=args.tiny, dtype=dtype)
    unet = load_unet(unet_dir, pipeline_dir=pipe_dir, dtype=dtype_name, device=args.device).unet
    torch_pipe = VideoPipeline(build_pipeline(unet, pipe_dir, device=args.device))
    print(f"built random-weight pipeline in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M UNet parameters)", flush=True)

    prompt = "a corgi running on the beach at sunset"
    sampling = dict(frames=args.frames, height=size, width=size, progress=False)
    baseline = torch_pipe.pipe
    ddim = DDIMScheduler.from_config(baseline.scheduler.config, beta_schedule="linear", clip_sample=False,
                                     set_alpha_to_one=False, steps_offset=1)

    def run_baseline(steps: int) -> float:
        """``steps``-step DDIM with CFG 7.5: denoising only (prompt embeddings precomputed, latents out)."""
        lcm = baseline.scheduler
        baseline.scheduler = ddim
        try:
            with torch.inference_mode():
                cond, uncond = baseline.encode_prompt(prompt, args.device, 1, True, None)
                gen = torch.Generator(args.device).manual_seed(0)
                sync(args.device)
                t = time.perf_counter()
                baseline(prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=args.frames, height=size,
                         width=size, num_inference_steps=steps, guidance_scale=7.5, generator=gen,
                         output_type="latent")
                sync(args.device)
                return time.perf_counter() - t
        finally:
            baseline.scheduler = lcm

    # VideoPipeline's "denoise" is timed as run_baseline times its loop: sync, wall clock, the pipeline call, sync
    rows = {"animatelcm-4step pytorch": lambda: torch_pipe(prompt, steps=4, guidance=1.0, **sampling).seconds["denoise"],
            **{name: (lambda n=n: run_baseline(n)) for name, n in BASELINES.items()}}
    notes, export_info = [], None
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers() and args.device.startswith("cuda")
    if args.skip_onnx:
        notes.append("ONNX Runtime row skipped (--skip-onnx).")
    elif args.device.startswith("cuda") and not cuda_ep:
        notes.append(f"ONNX Runtime CUDA row not measured: onnxruntime {ort.__version__} here has no "
                     "CUDAExecutionProvider (install onnxruntime-gpu).")
    else:
        from weightlab.onnx_export import export_onnx
        from weightlab.onnx_runtime import OnnxVideoPipeline

        t0 = time.perf_counter()
        manifest = export_onnx(unet_dir, work / "onnx", dtype=dtype_name, pipeline_dir=pipe_dir, device=args.device,
                               opset=args.opset, progress=False)
        unet_entry = manifest.models["unet"]
        export_info = {"seconds": time.perf_counter() - t0, "unet_export_seconds": unet_entry.export_seconds,
                       "opset": manifest.opset, "graph_mb": unet_entry.bytes.graph / 1e6,
                       "data_mb": unet_entry.bytes.data / 1e6,
                       "max_abs_err": unet_entry.verification.max_abs_err,
                       "max_rel_err": unet_entry.verification.max_rel_err}
        print(f"export: {json.dumps(export_info)}", flush=True)
        onnx_pipe = OnnxVideoPipeline(work / "onnx", provider="cuda" if cuda_ep else "cpu")
        label = f"animatelcm-4step onnxruntime-{onnx_pipe.provider}"
        rows[label] = lambda: onnx_pipe(prompt, steps=4, guidance=1.0, **sampling).seconds["denoise"]

    times: dict[str, list[float]] = {name: [] for name in rows}
    for i in range(args.warmup + args.repeats):
        for name, fn in rows.items():
            seconds = fn()
            if i >= args.warmup:
                times[name].append(seconds)
            print(f"{'warm-up' if i < args.warmup else 'timed'} {name}: {seconds * 1e3:.1f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    fast_row, onnx_row = "animatelcm-4step pytorch", next((k for k in med if "onnxruntime" in k), None)
    speedups = {name: H.ratios(times[name], times[fast_row]) for name in BASELINES}  # per repeat, interleaved
    if onnx_row:
        speedups["onnx"] = H.ratios(times[fast_row], times[onnx_row])
    summary = {"device": card, "dtype": dtype_name, "frames": args.frames, "size": size, "tiny": args.tiny,
               "date": H.now(), "times_s": times, "median_s": med, "export": export_info,
               "per_repeat_speedups": speedups, "notes": notes}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if args.results:
        x = lambda v: H.mr(v, "{:.1f}") + "x"  # noqa: E731
        lines = [SECTION, "",
                 f"Run {H.now()}. Card: {card}; machine: {H.machine()}; torch {torch.__version__}, onnxruntime "
                 f"{ort.__version__}. {'Tiny widths (SMOKE TEST, not a result), ' if args.tiny else 'Full-size SD1.5 AnimateDiff pipeline, '}"
                 f"random weights, {dtype_name}, {args.frames} frames at {size}x{size}, batch 1; denoising loop only "
                 f"(prompt encoding and VAE decode excluded), wall clock with the device synchronised before and after, "
                 f"for every row; {args.warmup} warm-up + {args.repeats} timed runs of every row, interleaved.", "",
                 "| row | UNet evaluations | ms: median [min–max] |", "|---|---|---|"]
        evals = {fast_row: "4", onnx_row: "4", **{k: str(2 * n) for k, n in BASELINES.items()}}
        lines += [f"| {k} | {evals.get(k, '?')} | {H.mr([t * 1e3 for t in times[k]], '{:.1f}')} |" for k in rows]
        lines += ["", "Ratios: medians of the per-repeat ratios [range].", "",
                  f"- 4-step vs the paper's 50-step CFG 7.5 baseline: {x(speedups['baseline-50step-cfg7.5 pytorch'])} "
                  "(target >= 12x).",
                  f"- 4-step vs the 25-step CFG 7.5 baseline (second row): {x(speedups['baseline-25step-cfg7.5 pytorch'])}.",
                  f"- 4-step PyTorch: {med[fast_row] * 1e3:.0f} ms (target <= 250 ms on an H100)."]
        if onnx_row:
            lines.append(f"- ONNX Runtime vs PyTorch eager: {H.mr(speedups['onnx'])}x (target >= 1.3x). Export: "
                         f"{export_info['seconds']:.0f} s incl. verification (UNet {export_info['unet_export_seconds']:.0f} s, "
                         f"opset {export_info['opset']}, graph {export_info['graph_mb']:.1f} MB + data "
                         f"{export_info['data_mb']:.0f} MB, max abs err {export_info['max_abs_err']:.2e}).")
        lines += [f"- {n}" for n in notes]
        H.write_section("\n".join(lines) + "\n", args.results)
        print(f"wrote {SECTION!r} to {args.results}")


if __name__ == "__main__":
    main()
