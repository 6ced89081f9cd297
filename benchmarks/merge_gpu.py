"""The fused merge kernel on a GPU (issue 4): conformance, determinism, speed against copy bandwidth and peers.

Full size, on an H100/H200 (a few minutes; nothing is downloaded):
    python3 benchmarks/merge_gpu.py --out benchmarks/merge_gpu.md
On a lent machine where weightlab is not installed and diffusers (+ importlib_metadata) travel as wheels in .whl/:
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . .whl/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/merge_gpu.py --out $OUT/merge_gpu.md
CPU smoke run of the same code paths (tiny model, the kernel interpreted):
    .venv/bin/python benchmarks/merge_gpu.py --device cpu --interpret --out /tmp/merge_gpu.md

Residual sets (random weights, real configs): as in benchmarks/merge_cpu.py, the SD1.5 UNet with a rank-64
LCM-LoRA (alpha 8) over the 14 LCM target types plus a rank-32 style LoRA (scale 0.8) on attention; the SD1.5
MotionAdapter with every parameter written and γ = 0.8 on each proj_out (weight and bias), plus (not in the CPU
benchmark) a rank-32 motion LoRA on its attention.
Timing, the same for every row (ours and the peers): ``--warmup`` untimed runs of each, then ``--repeats`` (>= 10)
timed runs, interleaved across the rows compared; each run is wall clock between two ``torch.cuda.synchronize()``
calls (a peer's untimed set-up, e.g. ``unfuse_lora``, runs before the first sync). Shown: median [min–max]; ratios
are medians of the per-repeat ratios. Bandwidth counts each byte read or written once (dst, w0, factors); every
kernel row is interleaved with a device-to-device copy of the same number of bytes (half read, half written) and
reported as % of that copy's bandwidth.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

TILES = ((64, 128, 16, 4), (128, 128, 16, 8), (64, 256, 16, 8), (128, 128, 32, 8), (128, 256, 16, 16))  # m,n,r,warps
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file the table is written to")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--interpret", action="store_true", help="run the kernel under TRITON_INTERPRET=1 (CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 20 on cuda, "
                    "2 in the CPU smoke run; at least 10 on cuda)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs of every measured thing first")
    args = ap.parse_args()
    if args.interpret:  # must precede the kernel module's import
        os.environ["TRITON_INTERPRET"] = "1"
    if args.device == "cpu" and not args.interpret:
        ap.error("--device cpu needs --interpret (the kernel only runs on CPU under the interpreter)")
    repeats = args.repeats or (20 if args.device == "cuda" else 2)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("merge_gpu.py needs CUDA: torch sees no GPU here. For a CPU smoke run of the same code paths "
                     "(timings meaningless) use --device cpu --interpret.")
        if repeats < 10:
            ap.error("--repeats must be >= 10 on cuda")
    bench = Bench(args.device, tiny=args.device == "cpu", iters=repeats, warmup=args.warmup)
    try:
        bench.run_all()
    finally:
        bench.write(args.out)


class Bench:
    """Runs every section and collects one markdown table."""

    def __init__(self, device: str, *, tiny: bool, iters: int, warmup: int):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.tiny = tiny
        self.iters, self.warmup = iters, warmup
        self.rows: list[tuple[str, str, str]] = []
        torch.backends.cuda.matmul.allow_tf32 = False  # the PyTorch path must be an fp32 reference
        torch.manual_seed(0)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" after `.to(dtype)`
        for repeat in ("Already unmerged", "Already found a `peft_config`"):  # expected when a peer is re-run
            warnings.filterwarnings("ignore", message=repeat)

    # -- reporting ---------------------------------------------------------------------------------------
    def row(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"{what:<58} {value:>20}  {note}", flush=True)

    def write(self, path: str) -> None:
        torch = self.torch
        import triton

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        head = [f"# merge_gpu.py — {name}", "",
                f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {H.machine()}; torch {torch.__version__}, "
                f"triton {triton.__version__}, python {platform.python_version()}; {self.warmup} warm-up + "
                f"{self.iters} timed runs per row, wall clock between torch.cuda.synchronize() calls, interleaved"
                + ("; TRITON_INTERPRET=1 smoke run, tiny model: timings mean nothing" if self.tiny else ""), "",
                "| measurement | value | note |", "|---|---:|---|"]
        lines = head + [f"| {w} | {v} | {n} |" for w, v, n in self.rows]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {path}")

    # -- timing ------------------------------------------------------------------------------------------
    def timed(self, fns: dict, setups: dict | None = None) -> dict[str, list[float]]:
        """Milliseconds of every ``fns[name]()``, all timed alike: ``self.warmup`` untimed runs of each, then
        ``self.iters`` rounds, each running every fn once (interleaved); a run is wall clock between two device
        syncs, after its untimed ``setups[name]()``."""
        setups = setups or {}
        for _ in range(0 if self.tiny else self.warmup):
            for name, fn in fns.items():
                setups.get(name, lambda: None)()
                fn()
        times = {name: [] for name in fns}
        for _ in range(self.iters):
            for name, fn in fns.items():
                setups.get(name, lambda: None)()
                self.sync()
                t = time.perf_counter()
                fn()
                self.sync()
                times[name].append((time.perf_counter() - t) * 1e3)
        return times

    def copy_of(self, nbytes: int):
        """A device-to-device copy that reads and writes ``nbytes`` in all (``nbytes // 2`` each way)."""
        n = nbytes // 2
        src = self.torch.empty(n, dtype=self.torch.uint8, device=self.device)
        dst = self.torch.empty(n, dtype=self.torch.uint8, device=self.device)
        return lambda: dst.copy_(src)

    def vs_copy(self, what: str, fn, moved: int, note: str) -> list[float]:
        """Time ``fn`` interleaved with a copy of the same bytes; one row; the kernel's times."""
        t = self.timed({"kernel": fn, "copy": self.copy_of(moved)})
        pct = H.ratios(t["copy"], t["kernel"])
        self.row(what, H.mr(t["kernel"], "{:.3f}") + " ms",
                 f"{moved / H.med(t['kernel']) / 1e6:,.0f} GB/s = {H.mr([100 * x for x in pct], '{:.0f}')} % of a "
                 f"copy of the same bytes (copy {H.mr(t['copy'], '{:.3f}')} ms, "
                 f"{moved / H.med(t['copy']) / 1e6:,.0f} GB/s); {note}")
        return t["kernel"]

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    # -- sections ----------------------------------------------------------------------------------------
    def run_all(self) -> None:
        import triton

        torch = self.torch
        if self.device.type == "cuda":
            self.row("device", torch.cuda.get_device_name(self.device),
                     f"{torch.cuda.get_device_properties(self.device).multi_processor_count} SMs")
        self.row("versions", f"torch {torch.__version__}", f"triton {triton.__version__}")
        self.conformance()
        best = self.unet_section()
        self.motion_section(best)
        self.peers(best)

    def conformance(self) -> None:
        """Every conformance case (plus full-size ones on a GPU), kernel vs the PyTorch path, native dtypes."""
        torch = self.torch
        from weightlab.kernels import MergeItem, merge
        from weightlab.kernels.conformance import CASES, Case, compare_to_exact, compare_to_reference

        cases = list(CASES)
        if not self.tiny:
            cases += [Case("sd15_conv3x3", (1280, 1280, 3, 3), (64, 32)), Case("sd15_ff", (5120, 1280), (64, 32)),
                      Case("sd15_attn_dense", (640, 640), (64, 32), denses=1)]
        slack = 2.0 if self.device.type == "cuda" else 1.0  # tensor cores do not round-to-nearest inside a dot
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            items = [c.item(dtype, self.device, seed=k) for k, c in enumerate(cases)]
            refs = [MergeItem(it.dst.clone(), it.w0, it.loras, it.denses, it.base_scale, it.name) for it in items]
            merge(items, backend="triton")
            merge(refs, backend="torch")
            problems = [p for it, r in zip(items, refs) if (p := compare_to_reference(it.dst, r.dst, it, slack))]
            if dtype == torch.float16:
                problems += [p for it in items if (p := compare_to_exact(it.dst, it, ulps=1.0, slack=slack))]
            differ = sum(int((it.dst != r.dst).sum()) for it, r in zip(items, refs))
            total = sum(it.dst.numel() for it in items)
            verdict = "pass" if not problems else f"FAIL ({len(problems)})"
            self.row(f"conformance {_dt(dtype)}: {len(cases)} cases vs PyTorch path", verdict,
                     "; ".join([f"{differ}/{total} elements differ (allowed: rounding within ε)", *problems[:3]]))

    def unet_section(self) -> tuple[int, int, int, int]:
        """SD1.5 UNet LoRA set: tile sweep (fp16), determinism, then bf16 and fp32 with the best tiles."""
        torch = self.torch
        from weightlab.kernels import prepare

        best, best_ms = TILES[0], float("inf")
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            unet, items = self.unet_items(dtype)
            moved = _bytes_moved(items)
            tiles = (TILES if dtype == torch.float16 and not self.tiny else (best,))
            for tile in tiles:
                plan = prepare(items, backend="triton", **_tile_kw(tile))
                ms = H.med(self.vs_copy(f"UNet {_dt(dtype)} kernel, tiles {'x'.join(map(str, tile))}", plan.run, moved,
                                        f"{plan.num_launches} launch(es), {len(items)} weights, "
                                        f"{moved / 1e9:.2f} GB moved"))
                if ms < best_ms and dtype == torch.float16:
                    best, best_ms = tile, ms
            if dtype == torch.float16:
                self.fp16_extras(items, _tile_kw(best))
            del unet, items, plan
        return best

    def fp16_extras(self, items, tile_kw: dict) -> None:
        """Determinism, host-side cost, CUDA graph replay and the PyTorch path, on the fp16 UNet set."""
        from weightlab.kernels import merge, prepare

        plan = prepare(items, backend="triton", **tile_kw)
        self.determinism(items, plan, tile_kw)
        t = self.timed({"prepare": lambda: prepare(items, backend="triton", **tile_kw),
                        "merge": lambda: merge(items), "torch": lambda: merge(items, backend="torch")})
        self.row("UNet fp16 host prepare (validate + work tables)", H.mr(t["prepare"], "{:.1f}") + " ms")
        self.row("UNet fp16 merge() end to end (prepare + kernel)", H.mr(t["merge"], "{:.1f}") + " ms",
                 "default tiles; what the engine pays per re-merge")
        self.row("UNet fp16 PyTorch path on this device", H.mr(t["torch"], "{:.1f}") + " ms",
                 "backend='torch' (the reference), same items")
        if self.device.type == "cuda":
            self.graph_replay(plan)

    def determinism(self, items, plan, tile_kw: dict) -> None:
        torch = self.torch
        from weightlab.kernels import prepare

        plan.run()
        first = [it.dst.clone() for it in items]
        same = True
        for run in (plan.run, plan.run, lambda: prepare(items, backend="triton", **tile_kw).run()):
            for it in items:
                it.dst.fill_(float("nan"))
            run()
            same &= all(torch.equal(a.view(torch.int16), it.dst.view(torch.int16)) for a, it in zip(first, items))
        self.row("UNet fp16 run-to-run bitwise determinism (3 reruns, 1 new plan)",
                 "identical" if same else "DIFFERENT")

    def graph_replay(self, plan) -> None:
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            plan.run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan.run()
        t = self.timed({"graph": graph.replay})["graph"]
        self.row("UNet fp16 kernel as CUDA graph replay", H.mr(t, "{:.3f}") + " ms",
                 f"{plan.num_launches} launch(es) captured")

    def motion_section(self, tile) -> None:
        torch = self.torch
        from weightlab.kernels import prepare

        for dtype in (torch.float16, torch.bfloat16):
            adapter, items = self.motion_items(dtype)
            plan = prepare(items, backend="triton", **_tile_kw(tile))
            moved = _bytes_moved(items)
            self.vs_copy(f"MotionAdapter {_dt(dtype)} kernel", plan.run, moved,
                         f"{plan.num_launches} launch(es), {len(items)} tensors")
            del adapter, items, plan

    def peers(self, tile) -> None:
        """diffusers `fuse_lora` and PEFT `merge_and_unload` on the same UNet LoRA set (fp16, this device), each on
        its own UNet, interleaved with ours (``merge()`` end to end, and the kernel alone) and timed the same way."""
        torch = self.torch
        from peft import LoraConfig
        from weightlab.kernels import merge, prepare
        from weightlab.testing import LCM_LORA_TARGETS

        (r1, alpha), r2 = ((8, 4.0), 4) if self.tiny else ((64, 8.0), 32)
        cfgs = {"lcm": LoraConfig(r=r1, lora_alpha=alpha, target_modules=list(LCM_LORA_TARGETS),
                                  init_lora_weights=False),
                "style": LoraConfig(r=r2, lora_alpha=r2, target_modules=list(ATTENTION), init_lora_weights=False)}
        _, items = self.unet_items(torch.float16)
        plan = prepare(items, backend="triton", **_tile_kw(tile))
        fns = {"ours merge()": lambda: merge(items), "ours kernel": plan.run}
        setups = {}
        try:
            unet = self.build_unet(torch.float16)
            for name, cfg in cfgs.items():
                unet.add_adapter(cfg, adapter_name=name)
            unet.set_adapters(list(cfgs), weights=[1.0, 0.8])
            fns["diffusers fuse_lora"] = lambda: unet.fuse_lora(adapter_names=list(cfgs))
            setups["diffusers fuse_lora"] = unet.unfuse_lora
            fns["diffusers fuse_lora"]()  # fails here, untimed, if the peer's API drifted
        except Exception as e:  # a peer's API drift is a result to report, not a reason to lose the table
            fns.pop("diffusers fuse_lora", None)
            self.row("diffusers fuse_lora", "failed", f"{type(e).__name__}: {e}")
        try:
            from peft.tuners.lora import LoraModel

            peft_unet, holder = self.build_unet(torch.float16), {}

            def inject():
                holder["model"] = LoraModel(peft_unet, dict(cfgs), "lcm")
                holder["model"].inject_adapter(peft_unet, "style")

            fns["PEFT merge_and_unload"] = lambda: holder["model"].merge_and_unload(adapter_names=list(cfgs))
            setups["PEFT merge_and_unload"] = inject
            inject()
            fns["PEFT merge_and_unload"]()
        except Exception as e:
            fns.pop("PEFT merge_and_unload", None)
            self.row("PEFT merge_and_unload", "failed", f"{type(e).__name__}: {e}")
        t = self.timed(fns, setups)
        for name in ("ours merge()", "ours kernel"):
            self.row(f"UNet fp16, {name} (interleaved with the peers)", H.mr(t[name], "{:.3f}") + " ms")
        for name in [k for k in fns if not k.startswith("ours")]:
            self.row(f"{name} (same LoRA set)", H.mr(t[name], "{:.1f}") + " ms",
                     f"per repeat, ours merge() is {H.mr(H.ratios(t[name], t['ours merge()']), '{:,.1f}')}× faster, "
                     f"the kernel alone {H.mr(H.ratios(t[name], t['ours kernel']), '{:,.1f}')}×")

    # -- models and residual sets ------------------------------------------------------------------------
    def build_unet(self, dtype):
        from diffusers import UNet2DConditionModel
        from weightlab.families import SD15_UNET_CONFIG
        from weightlab.testing import TINY_UNET_CONFIG

        with self.torch.device(self.device):
            unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if self.tiny else SD15_UNET_CONFIG))
        return unet.to(dtype).requires_grad_(False)

    def unet_items(self, dtype):
        """The UNet and one MergeItem per LoRA-targeted weight: rank-64 LCM-LoRA (+ rank-32 style on attention)."""
        from weightlab.kernels import MergeItem
        from weightlab.testing import LCM_LORA_TARGETS

        unet = self.build_unet(dtype)
        (r1, alpha), r2 = ((8, 4.0), 4) if self.tiny else ((64, 8.0), 32)
        items = []
        for name, module in _targets(unet, LCM_LORA_TARGETS):
            loras = [self.lora(module.weight, r1, alpha / r1, dtype)]
            if any(name.endswith("." + a) for a in ATTENTION):
                loras.append(self.lora(module.weight, r2, 0.8, dtype))
            items.append(MergeItem(module.weight, module.weight.detach().clone(), loras, name=name + ".weight"))
        return unet, items

    def motion_items(self, dtype):
        """Every MotionAdapter parameter; γ = 0.8 on proj_out; a rank-32 LoRA on motion attention."""
        torch = self.torch
        from diffusers import MotionAdapter
        from weightlab.families import SD15_MOTION_CONFIG
        from weightlab.kernels import MergeItem
        from weightlab.testing import TINY_MOTION_CONFIG

        with torch.device(self.device):
            adapter = MotionAdapter(**(TINY_MOTION_CONFIG if self.tiny else SD15_MOTION_CONFIG))
        adapter = adapter.to(dtype).requires_grad_(False)
        lora_weights = {name + ".weight" for name, _ in _targets(adapter, ATTENTION)}
        rank = 4 if self.tiny else 32
        items = []
        for name, p in adapter.named_parameters():
            loras = [self.lora(p, rank, 1.0, dtype)] if name in lora_weights else []
            gamma = 0.8 if ".proj_out." in name else 1.0
            items.append(MergeItem(p, p.detach().clone(), loras, base_scale=gamma, name=name))
        return adapter, items

    def lora(self, weight, rank: int, scale: float, dtype):
        torch = self.torch
        fdt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank) + ((1, 1) if weight.dim() == 4 else ())
        down = torch.randn(down_shape, device=self.device, dtype=fdt) * rank**-0.5
        up = torch.randn(up_shape, device=self.device, dtype=fdt) * 0.01
        return down, up, scale


def _targets(model, suffixes):
    """(name, module) of every Linear/Conv2d whose qualified name ends with one of ``suffixes``."""
    import torch

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and any(n == s or n.endswith("." + s) for s in suffixes)]


def _tile_kw(tile: tuple[int, int, int, int]) -> dict:
    return dict(zip(("block_m", "block_n", "block_r", "num_warps"), tile))


def _bytes_moved(items) -> int:
    """Bytes a merge must read or write at least once: every dst, w0 and factor."""
    total = 0
    for it in items:
        total += it.dst.nbytes + it.w0.nbytes
        total += sum(d.nbytes + u.nbytes for d, u, _ in it.loras) + sum(w.nbytes for w, _ in it.denses)
    return total


def _dt(dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")


if __name__ == "__main__":
    sys.exit(main())
