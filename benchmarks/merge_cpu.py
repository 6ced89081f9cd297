#!/usr/bin/env python
"""Merge on CPU (issue 3): weightlab vs diffusers vs PEFT, time and peak RSS, full-size SD1.5 (+ MotionAdapter).

Workload (random weights, real configs, written once under ``--work`` as safetensors and reused):
- base: ``UNet2DConditionModel(**SD15_UNET_CONFIG)`` as a diffusers folder, fp32 and fp16 copies;
- motion: ``MotionAdapter(**SD15_MOTION_CONFIG)`` as a diffusers MotionAdapter folder, fp32 and fp16;
- image_accel: LCM-LoRA-shaped, rank 64 over the 14 LCM-LoRA target types, kohya keys + alpha, fp16 file;
- style: rank 32 on attention (attn1/attn2 to_q/to_k/to_v/to_out.0), PEFT keys, fp16 file.
Recipe: w' = w0 + 0.8·style + 1.0·accel (+ 1.0·motion for the video rows).

Measured (each one in a fresh process, forked from a fork server that has only imported the libraries):
- ours.fuse             ``Merger(model, base, inputs).apply()`` on an already-loaded UNet (the fuse alone);
- diffusers.fuse_lora   ``fuse_lora`` alone, both LoRAs loaded untimed (its peer);
- peft.merge_and_unload ``merge_and_unload`` alone (``get_peft_model`` + both adapters set up untimed);
  (the three fuse-alone rows load the UNet with ``disable_mmap=True``: diffusers 0.42 otherwise leaves every weight
  a lazy view of a private mmap, and the first in-place write would copy pages into RAM inside the timed section)
- ours.build_unet       ``build_unet(recipe)`` end to end from files (spatial, and video = with the motion term);
- diffusers             ``from_pretrained`` + ``load_lora_weights`` x2 + ``set_adapters`` + ``fuse_lora`` +
                        ``unload_lora_weights`` end to end (the video variant builds the model the AnimateDiffPipeline
                        way, ``UNetMotionModel.from_unet2d``); each step is also timed on its own;
- diffusers.disable_mmap  the same with ``from_pretrained(..., disable_mmap=True)``: weights read into RAM at load
                        time, so ``fuse_lora`` does not pay copy-on-write page faults (diffusers' fastest setting);
- ours.stream           ``merge_to_file(recipe)`` (video recipe), including the final fsync;
- sd-mecha as a peer (issue 13), on the inputs it reads: the base as a single-file LDM checkpoint
  (``model.diffusion_model.*``, the base's own values renamed with sd-mecha's SD1 key table) and
  - ldm_lora:  + 1.0·accel (the same kohya LoRA file): ``sd_mecha.add_difference``'s graph over
               ``convert(lora, "sd1-ldm")``, against ``merge_to_file`` of the same recipe;
  - ldm_dense: + 0.8·(style checkpoint − base), a dense fine-tune as a second LDM file: ``sd_mecha.weighted_sum``
               (= base + α·(style − base)), against ``merge_to_file`` with the checkpoint as a dense style term.
  Both sides read the files, merge (fp32 accumulation, one rounding to the dtype) and write a safetensors file,
  fsynced (``merge_to_file`` does it; the sd-mecha row calls ``os.fsync`` after ``merge`` returns, timed apart);
  after the repeats every tensor of the two outputs is compared. sd-mecha reads no PEFT-keyed LoRA, so the style
  LoRA of the rows above has no sd-mecha row; its LoRA path needs SD1.5's full shapes, so ``--quick`` runs only
  ldm_dense. sd-mecha 1.1.8's SD1 kohya -> LDM converter raises TypeError (``relation["kohya_sd"]`` on a
  ``RealizedKeyRelation``); the ldm_lora row runs it with that one line fixed (`_fix_sd_mecha_sd1_lora`).

Peak RSS: ``VmHWM`` from /proc/self/status, reset with ``echo 5 > /proc/self/clear_refs`` right before each timed
section, minus ``VmRSS`` just before it ("extra"). File-backed (mmap) and anonymous parts come from a 20 ms sampler
thread (approximate; the HWM is exact). Benchmarks are scripts, never timed assertions (DESIGN.md).

Usage:
    .venv/bin/python benchmarks/merge_cpu.py                      # full size, 5 repeats -> benchmarks/RESULTS.md
    .venv/bin/python benchmarks/merge_cpu.py --quick              # tiny config, 1 repeat, prints only (< 1 min)
    .venv/bin/python benchmarks/merge_cpu.py --threads 1 --out /tmp/t1.md  # contention-robust control run
    .venv/bin/python benchmarks/merge_cpu.py --render-only --notes notes.md   # re-render the last raw results
    .venv/bin/python benchmarks/merge_cpu.py --dtypes float32 --only 'ldm_' --title '### sd-mecha ...'  # its rows
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _harness import write_section  # noqa: E402

SECTION = "## Merge on CPU (issue 3)"
STYLE_SCALE, ACCEL_SCALE, GAMMA = 0.8, 1.0, 1.0
STYLE_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
CHECK_KEYS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
              "up_blocks.3.resnets.0.conv1.weight", "mid_block.resnets.0.time_emb_proj.weight",
              "down_blocks.1.attentions.0.proj_out.weight")
PRELOAD = ["torch", "numpy", "safetensors.torch", "transformers", "peft", "diffusers", "diffusers.models.unets.unet_2d_condition",
           "diffusers.models.unets.unet_motion_model", "diffusers.loaders.lora_pipeline",
           "diffusers.pipelines.pipeline_utils", "weightlab", "weightlab.loading", "weightlab.merge",
           "weightlab.kernels", "weightlab.testing", "tqdm.auto"]
SD_MECHA_PRELOAD = ["sd_mecha"]  # only when its rows run: the other rows' processes stay as they were
MECHA_STYLE_STD = 0.002  # the dense fine-tune's change per weight (the base's weights have std 0.02)
FIXTURE_VERSION = 1
GB = 1e9


# --------------------------------------------------------------------------------------------- configs

def workload(quick: bool) -> dict:
    """Model configs and LoRA ranks: the real ones, or the SD1.5 block layout at 1/10 width for --quick."""
    from weightlab.families import SD15_MOTION_CONFIG, SD15_UNET_CONFIG

    if not quick:
        return dict(unet=dict(SD15_UNET_CONFIG), motion=dict(SD15_MOTION_CONFIG), accel_rank=64, accel_alpha=8.0,
                    style_rank=32)
    widths = (32, 64, 128, 128)  # same keys, same family, ~1/100 of the parameters
    return dict(unet=dict(SD15_UNET_CONFIG, block_out_channels=widths, cross_attention_dim=64, sample_size=8),
                motion=dict(SD15_MOTION_CONFIG, block_out_channels=widths), accel_rank=8, accel_alpha=4.0,
                style_rank=4)


def fixture_paths(root: Path) -> dict[str, str]:
    return {"base_float32": str(root / "base_fp32"), "base_float16": str(root / "base_fp16"),
            "motion_float32": str(root / "motion_fp32"), "motion_float16": str(root / "motion_fp16"),
            "accel": str(root / "lcm_lora_kohya.safetensors"),
            "style": str(root / "style_lora_peft.safetensors"), "root": str(root)}


# --------------------------------------------------------------------------------------------- fixtures

def _randomize(module, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.02, generator=g)
            else:  # zero-initialised branches (motion proj_out) become live too
                p.normal_(0.0, 0.02, generator=g)


def build_fixtures(root: str, quick: bool) -> dict:
    """Write the base, motion module and both LoRAs once (skipped when the stamp matches)."""
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel

    from weightlab.files import save_tensors
    from weightlab.testing import LCM_LORA_TARGETS, lora_to_kohya, lora_to_peft, make_lora

    root_p = Path(root)
    paths = fixture_paths(root_p)
    wl = workload(quick)
    unet_cfg, motion_cfg = wl["unet"], wl["motion"]
    want = {"version": FIXTURE_VERSION, **wl}
    stamp = root_p / "fixtures.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(want)):
        return {"built": False, "paths": paths, "seconds": 0.0}
    t0 = time.perf_counter()
    root_p.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_cfg).eval()
    _randomize(unet, 0)
    unet.save_pretrained(paths["base_float32"], safe_serialization=True, max_shard_size="100GB")
    unet.to(torch.float16).save_pretrained(paths["base_float16"], safe_serialization=True, max_shard_size="100GB")
    factors = make_lora(unet, LCM_LORA_TARGETS, rank=wl["accel_rank"], seed=1)
    style = make_lora(unet, STYLE_TARGETS, rank=wl["style_rank"], seed=2)
    del unet
    gc.collect()
    half = lambda sd: {k: v.to(torch.float16) for k, v in sd.items()}  # noqa: E731 — LoRAs ship as fp16
    save_tensors(half(lora_to_kohya({k: (d * 0.1, u * 0.1) for k, (d, u) in factors.items()}, wl["accel_alpha"])), paths["accel"])
    save_tensors(half(lora_to_peft({k: (d * 0.1, u * 0.1) for k, (d, u) in style.items()})), paths["style"])
    del factors, style
    adapter = MotionAdapter(**motion_cfg).eval()
    _randomize(adapter, 10)
    adapter.save_pretrained(paths["motion_float32"], safe_serialization=True, max_shard_size="100GB")
    adapter.to(torch.float16).save_pretrained(paths["motion_float16"], safe_serialization=True, max_shard_size="100GB")
    stamp.write_text(json.dumps(want))
    return {"built": True, "paths": paths, "seconds": time.perf_counter() - t0}


def sd_mecha_unet_names() -> dict[str, str]:
    """LDM UNet key -> diffusers key, from sd-mecha's own SD1 table (its ``sd1-ldm`` config and the key map of its
    kohya converter): the LDM fixtures are written with it and the outputs compared through it, so the names are
    sd-mecha's, not ours."""
    import importlib

    from sd_mecha.extensions import model_configs

    conv = importlib.import_module("sd_mecha.extensions.builtin.model_configs.convert_sd1_kohya_to_original")
    keys = [k for k in model_configs.resolve("sd1-ldm").keys() if k.startswith("model.diffusion_model.")]
    return {k: conv.convert_unet_key(k).removeprefix("unet.") for k in keys}


def build_ldm_fixtures(root: str, quick: bool, dtypes) -> dict:
    """The sd-mecha rows' inputs, from the fixtures of :func:`build_fixtures` (skipped when the stamp matches):
    ``ldm_base_<dtype>`` = the base's own values under LDM names; ``ldm_style_<dtype>`` = a dense fine-tune of it
    (fp32 base + N(0, MECHA_STYLE_STD), then cast), also under LDM names."""
    import torch
    from safetensors import safe_open

    from weightlab.files import save_tensors

    root_p = Path(root)
    paths = {f"ldm_{what}_{dt}": str(root_p / f"ldm_{what}_{dt}.safetensors") for dt in dtypes for what in ("base", "style")}
    stamp = root_p / "ldm_fixtures.json"
    want = {"version": FIXTURE_VERSION, "style_std": MECHA_STYLE_STD, **workload(quick)}
    done = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if done.get("want") != json.loads(json.dumps(want)):
        done = {"want": want, "dtypes": []}
    todo = [dt for dt in dtypes if dt not in done["dtypes"] or not all(Path(paths[f"ldm_{w}_{dt}"]).is_file()
                                                                       for w in ("base", "style"))]
    t0 = time.perf_counter()
    if todo:
        names = sd_mecha_unet_names()
        src = fixture_paths(root_p)
        weights = lambda dt: str(Path(src[f"base_{dt}"]) / "diffusion_pytorch_model.safetensors")  # noqa: E731
        with safe_open(weights("float32"), "pt") as f32:
            if set(f32.keys()) != set(names.values()):
                raise RuntimeError(f"{weights('float32')}: its keys are not those of sd-mecha's SD1 UNet table")
            g = torch.Generator().manual_seed(20)
            style = {}
            for k in sorted(names):
                w = f32.get_tensor(names[k])
                style[k] = w + torch.randn(w.shape, generator=g) * MECHA_STYLE_STD
        for dt in todo:
            with safe_open(weights(dt), "pt") as f:
                save_tensors({k: f.get_tensor(d) for k, d in names.items()}, paths[f"ldm_base_{dt}"])
            save_tensors({k: v.to(_dtype(dt)) for k, v in style.items()}, paths[f"ldm_style_{dt}"])
            done["dtypes"] = sorted(set(done["dtypes"]) | {dt})
            stamp.write_text(json.dumps(done))
    return {"built": bool(todo), "paths": paths, "seconds": time.perf_counter() - t0}


def fixture_sizes(paths: dict) -> dict[str, int]:
    out = {}
    for name, p in paths.items():
        if name == "root":
            continue
        p = Path(p)
        files = [p] if p.is_file() else list(p.glob("*.safetensors"))
        out[name] = sum(f.stat().st_size for f in files)
    return out


def case_inputs(case: dict) -> set[str]:
    """The fixture names (keys of the paths) a planned case reads."""
    dt, kw = case["kw"]["dtype"], case["kw"]
    if case["group"] == "sd_mecha":
        return {f"ldm_base_{dt}", "accel" if kw["work"] == "lora" else f"ldm_style_{dt}"}
    return {f"base_{dt}", "accel", "style"} | ({f"motion_{dt}"} if case["group"] == "video" else set())


def warm_page_cache(paths: dict) -> None:
    """Read every input once so every case starts from the same (warm) page cache."""
    for name, p in paths.items():
        if name == "root":
            continue
        p = Path(p)
        for f in ([p] if p.is_file() else p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


# --------------------------------------------------------------------------------------------- memory

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Max RssAnon / RssFile every few ms (the split of the peak; VmHWM stays the exact total)."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self._stop_ev = interval, threading.Event()
        self.max_anon = self.max_file = 0
        self.start()

    def reset(self) -> None:
        s = _status()
        self.max_anon, self.max_file = s["RssAnon"], s["RssFile"]

    def run(self) -> None:
        while not self._stop_ev.wait(self.interval):
            s = _status()
            self.max_anon = max(self.max_anon, s["RssAnon"])
            self.max_file = max(self.max_file, s["RssFile"])

    def stop(self) -> None:
        self._stop_ev.set()
        self.join()


class Tracker:
    """Timed sections, each with its own peak RSS (HWM reset before it) and the overall peak since creation."""

    def __init__(self):
        gc.collect()
        self.start = _status()["VmRSS"]
        self.can_reset = _reset_hwm()
        self.peak_total = self.start
        self.sections: dict[str, dict] = {}
        self.sampler = _Sampler()

    @contextlib.contextmanager
    def section(self, name: str):
        self.peak_total = max(self.peak_total, _status()["VmHWM"])
        _reset_hwm()
        s0 = _status()
        self.sampler.reset()
        c = os.times()
        t = time.perf_counter()
        yield
        dt = time.perf_counter() - t
        c1 = os.times()
        cpu = (c1.user - c.user) + (c1.system - c.system)
        s1 = _status()
        self.peak_total = max(self.peak_total, s1["VmHWM"])
        self.sections[name] = dict(
            seconds=dt, cpu_seconds=cpu, rss_before=s0["VmRSS"], peak=s1["VmHWM"], extra=s1["VmHWM"] - s0["VmRSS"],
            anon_extra=max(self.sampler.max_anon, s1["RssAnon"]) - s0["RssAnon"],
            file_extra=max(self.sampler.max_file, s1["RssFile"]) - s0["RssFile"])

    def result(self) -> dict:
        self.sampler.stop()
        self.peak_total = max(self.peak_total, _status()["VmHWM"])
        return dict(sections=self.sections, start_rss=self.start, peak_total=self.peak_total,
                    extra_total=self.peak_total - self.start, hwm_reset=self.can_reset,
                    seconds_total=sum(s["seconds"] for s in self.sections.values()),
                    cpu_total=sum(s["cpu_seconds"] for s in self.sections.values()))


# --------------------------------------------------------------------------------------------- cases (child side)

DT_NAMES = ("float32", "float16")


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16}[name]


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
    except Exception:  # noqa: BLE001 — logging niceties only
        pass


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _checksum(get) -> dict[str, float]:
    out = {}
    for k in CHECK_KEYS:
        t = get(k)
        if t is not None:
            out[k] = float(t.double().sum()) + float(t.double().abs().sum())
    return out


def _sd_getter(model):
    sd = model.state_dict()
    return lambda k: sd.get(k)


def _recipe(paths: dict, dtype: str, video: bool):
    from weightlab import Recipe, Term

    terms = [Term(source=paths["style"], kind="style", scale=STYLE_SCALE),
             Term(source=paths["accel"], kind="image_accel", scale=ACCEL_SCALE)]
    if video:
        terms.append(Term(source=paths[f"motion_{dtype}"], kind="motion", scale=GAMMA))
    return Recipe(base=paths[f"base_{dtype}"], terms=terms, dtype=dtype)


def _load_unet(paths: dict, dtype: str, *, in_ram: bool = False):
    """diffusers' own loader. By default (diffusers 0.42) every parameter is a zero-copy view of a private mmap of
    the safetensors file, so the first in-place write copies each page (copy-on-write) into anonymous memory.
    ``in_ram=True`` (``disable_mmap=True``) gives a model whose weights really are in RAM: the baseline for
    "fuse alone" on an already-loaded UNet."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(paths[f"base_{dtype}"], torch_dtype=_dtype(dtype), disable_mmap=in_ram)
    return model.eval().requires_grad_(False)


def _resident(model) -> dict:
    """How much of the loaded model is in anonymous memory (sanity check of the in-RAM baseline)."""
    gc.collect()
    s = _status()
    return {"rss": s["VmRSS"], "anon": s["RssAnon"], "file": s["RssFile"], "model_bytes": _model_bytes(model)}


def case_ours_fuse(paths: dict, dtype: str) -> dict:
    import weightlab
    from weightlab.merge import Input, Merger

    model = _load_unet(paths, dtype, in_ram=True)
    resident = _resident(model)
    base = weightlab.load(paths[f"base_{dtype}"], kind="base")
    inputs = [Input(weightlab.load(paths["style"], kind="style"), "style", STYLE_SCALE, paths["style"]),
              Input(weightlab.load(paths["accel"], kind="image_accel"), "image_accel", ACCEL_SCALE, paths["accel"])]
    tr = Tracker()
    with tr.section("fuse"):
        t = time.perf_counter()
        merger = Merger(model, base, inputs)  # validation: family, keys, shapes, finite values
        t_init = time.perf_counter() - t
        merger.apply()
    res = tr.result()
    return dict(res, model_bytes=_model_bytes(model), check=_checksum(_sd_getter(model)),
                sub={"Merger() validation": t_init}, resident=resident)


def case_ours_build(paths: dict, dtype: str, video: bool) -> dict:
    from weightlab.merge import build_unet

    recipe = _recipe(paths, dtype, video)
    tr = Tracker()
    with tr.section("e2e"):
        model = build_unet(recipe)
    res = tr.result()
    return dict(res, model_bytes=_model_bytes(model), check=_checksum(_sd_getter(model)),
                model_class=type(model).__name__)


def case_ours_stream(paths: dict, dtype: str) -> dict:
    from safetensors import safe_open

    from weightlab.merge import merge_to_file

    recipe = _recipe(paths, dtype, video=True)
    out = Path(paths["root"]) / f"streamed_{dtype}_{os.getpid()}.safetensors"
    tr = Tracker()
    try:
        with tr.section("stream"):
            summary = merge_to_file(recipe, out, progress=False)
        res = tr.result()
        with safe_open(str(out), "pt") as f:
            keys = set(f.keys())
            check = _checksum(lambda k: f.get_tensor(k) if k in keys else None)
    finally:
        out.unlink(missing_ok=True)
    return dict(res, model_bytes=summary["bytes"], check=check)


_PIPE_CLS = None


def _unet_only_pipeline():
    """The smallest pipeline that carries diffusers' own ``load_lora_weights`` (what users call)."""
    global _PIPE_CLS
    if _PIPE_CLS is None:
        from diffusers import DiffusionPipeline
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        class UNetOnlyPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
            _lora_loadable_modules = ["unet", "text_encoder"]

            def __init__(self, unet, text_encoder=None):
                super().__init__()
                self.register_modules(unet=unet, text_encoder=text_encoder)

        _PIPE_CLS = UNetOnlyPipeline
    return _PIPE_CLS


def case_diffusers(paths: dict, dtype: str, video: bool, in_ram: bool = False) -> dict:
    tr = Tracker()
    with tr.section("load_unet"):
        unet = _load_unet(paths, dtype, in_ram=in_ram)
        if video:
            from diffusers import MotionAdapter, UNetMotionModel

            adapter = MotionAdapter.from_pretrained(paths[f"motion_{dtype}"], torch_dtype=_dtype(dtype),
                                                    disable_mmap=in_ram)
            unet = UNetMotionModel.from_unet2d(unet, adapter)  # what AnimateDiffPipeline.__init__ does
            del adapter
            unet.eval().requires_grad_(False)
    with tr.section("load_lora"):
        pipe = _unet_only_pipeline()(unet=unet)
        pipe.load_lora_weights(paths["style"], adapter_name="style")
        pipe.load_lora_weights(paths["accel"], adapter_name="accel")
        pipe.set_adapters(["style", "accel"], [STYLE_SCALE, ACCEL_SCALE])
    with tr.section("fuse"):
        pipe.fuse_lora(adapter_names=["style", "accel"], lora_scale=1.0)
    with tr.section("unload"):
        pipe.unload_lora_weights()
    res = tr.result()
    return dict(res, model_bytes=_model_bytes(unet), check=_checksum(_sd_getter(unet)))


def case_diffusers_fuse(paths: dict, dtype: str) -> dict:
    """``fuse_lora`` alone on an in-RAM UNet with both LoRAs already loaded (the peer of ``ours.fuse``)."""
    unet = _load_unet(paths, dtype, in_ram=True)
    resident = _resident(unet)
    pipe = _unet_only_pipeline()(unet=unet)
    pipe.load_lora_weights(paths["style"], adapter_name="style")
    pipe.load_lora_weights(paths["accel"], adapter_name="accel")
    pipe.set_adapters(["style", "accel"], [STYLE_SCALE, ACCEL_SCALE])
    tr = Tracker()
    with tr.section("fuse"):
        pipe.fuse_lora(adapter_names=["style", "accel"], lora_scale=1.0)
    res = tr.result()
    pipe.unload_lora_weights()
    return dict(res, model_bytes=_model_bytes(unet), check=_checksum(_sd_getter(unet)), resident=resident)


def case_peft(paths: dict, dtype: str) -> dict:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    import weightlab

    dt = _dtype(dtype)
    unet = _load_unet(paths, dtype, in_ram=True)
    resident = _resident(unet)
    loras = [("style", weightlab.load(paths["style"], kind="style"), STYLE_SCALE),
             ("accel", weightlab.load(paths["accel"], kind="image_accel"), ACCEL_SCALE)]
    pm = None
    for name, lora, scale in loras:
        (rank,) = lora.ranks
        alphas = {t.alpha for t in lora.targets.values()}
        assert len(alphas) == 1
        alpha = alphas.pop() or rank
        cfg = LoraConfig(r=rank, lora_alpha=alpha * scale, target_modules=sorted(lora.targets))
        if pm is None:
            pm = get_peft_model(unet, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        sd = {}
        for p, t in lora.targets.items():
            sd[f"base_model.model.{p}.lora_A.weight"] = t.down.to(dt)
            sd[f"base_model.model.{p}.lora_B.weight"] = t.up.to(dt)
        out = set_peft_model_state_dict(pm, sd, adapter_name=name)
        assert not [k for k in out.unexpected_keys if "lora" in k], out.unexpected_keys[:5]
    del loras
    pm.eval()
    tr = Tracker()
    with tr.section("merge_and_unload"):
        merged = pm.merge_and_unload(adapter_names=["style", "accel"])
    res = tr.result()
    return dict(res, model_bytes=_model_bytes(merged), check=_checksum(_sd_getter(merged)), resident=resident)


def _fix_sd_mecha_sd1_lora() -> bool:
    """sd-mecha 1.1.8's SD1 kohya -> LDM converter reads ``relation["kohya_sd"]`` from a ``RealizedKeyRelation``
    (not subscriptable: TypeError), so ``convert(<SD1 kohya LoRA>, "sd1-ldm")`` cannot run. Give it the same body
    reading ``relation.inputs["kohya_sd"]``, as its SDXL converter does. Returns whether the fix was needed."""
    import importlib
    import inspect

    from sd_mecha.extensions import merge_methods

    conv = importlib.import_module("sd_mecha.extensions.builtin.model_configs.convert_sd1_kohya_to_original")
    cls = merge_methods.resolve("convert_'sd1-kohya'_to_'sd1-ldm'").__wrapped__
    if 'relation["kohya_sd"]' not in inspect.getsource(cls.__call__):
        return False

    def __call__(self, kohya_sd, **kwargs):
        relation = kwargs["key_relation"]
        res = kohya_sd[relation.inputs["kohya_sd"][0]]
        return conv.reshape_weight_for_sd(res) if relation.meta else res

    cls.__call__ = __call__
    return True


def _output(paths: dict, name: str) -> Path:
    """A row's output file, removed before its timed section and kept after it for the agreement check."""
    out = Path(paths["root"]) / "outputs" / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    return out


def _tensor_bytes(path: Path) -> int:
    """Bytes of the tensors in a safetensors file (its ``model_bytes``)."""
    import math

    from safetensors import safe_open

    size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(sl.get_shape()) * size[sl.get_dtype()] for sl in map(f.get_slice, f.keys()))


def case_ours_ldm(paths: dict, dtype: str, work: str) -> dict:
    """``merge_to_file`` of the sd-mecha rows' recipe (the LDM base + the kohya LoRA, or + the dense checkpoint)."""
    from weightlab import Recipe, Term
    from weightlab.merge import merge_to_file

    term = (Term(source=paths["accel"], kind="image_accel", scale=ACCEL_SCALE) if work == "lora" else
            Term(source=paths[f"ldm_style_{dtype}"], kind="style", scale=STYLE_SCALE))
    recipe = Recipe(base=paths[f"ldm_base_{dtype}"], terms=[term], dtype=dtype)
    out = _output(paths, f"ours.ldm_{work}[{dtype}]")
    tr = Tracker()
    with tr.section("stream"):
        summary = merge_to_file(recipe, out, progress=False)
    return dict(tr.result(), model_bytes=summary["bytes"], output=str(out))


def case_sd_mecha(paths: dict, dtype: str, work: str) -> dict:
    """sd-mecha's merge of the same recipe into a file: its own ``merge`` defaults (fp32 merge dtype, its key
    thread pool), output dtype = the row's dtype, then ``os.fsync`` of the file (``merge_to_file`` fsyncs too)."""
    import functools

    import sd_mecha
    import torch
    from sd_mecha.extensions.builtin.merge_methods import linear
    from tqdm.auto import tqdm

    fixed = _fix_sd_mecha_sd1_lora() if work == "lora" else False
    out = _output(paths, f"sd_mecha.ldm_{work}[{dtype}]")
    tr = Tracker()
    with tr.section("merge"):
        t = time.perf_counter()
        base = sd_mecha.model(paths[f"ldm_base_{dtype}"], "sd1-ldm")
        if work == "lora":
            delta = sd_mecha.convert(sd_mecha.model(paths["accel"], "sd1-kohya_kohya_lora"), "sd1-ldm")
            # the body of sd_mecha.add_difference(base, delta, alpha=...), whose merge-space check raises
            # AttributeError on a converted (not yet resolved) LoRA in 1.1.8
            recipe = linear.add_difference(base, delta, alpha=ACCEL_SCALE) | base
        else:
            recipe = sd_mecha.weighted_sum(base, sd_mecha.model(paths[f"ldm_style_{dtype}"], "sd1-ldm"),
                                           alpha=STYLE_SCALE)
        sd_mecha.merge(recipe, merge_dtype=torch.float32, output_dtype=_dtype(dtype), output=str(out),
                       tqdm=functools.partial(tqdm, disable=True))
        t_merge = time.perf_counter() - t
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    res = tr.result()
    files = recipe.accept(sd_mecha.recipe_nodes.ModelsCountVisitor()) + 1  # + the output: merge()'s default pool
    return dict(res, model_bytes=_tensor_bytes(out), output=str(out), sub={"merge() returned": t_merge},
                sd_mecha_fixed=fixed, sd_mecha_threads=min(max(files, 2), os.cpu_count() or 0, 4))


def compare_outputs(ours: str, peer: str) -> dict:
    """Every tensor of our output (diffusers names) against sd-mecha's (LDM names, mapped by sd-mecha's table):
    ``max |ours − peer|`` over all tensors, relative to the largest ``|ours|`` (the weights' scale)."""
    from safetensors import safe_open

    names = sd_mecha_unet_names()
    worst, scale, worst_key, n = 0.0, 0.0, "", 0
    with safe_open(ours, "pt") as fo, safe_open(peer, "pt") as fp:
        peer_keys, ours_keys = set(fp.keys()), set(fo.keys())
        if {names.get(k) for k in peer_keys} != ours_keys:
            raise RuntimeError(f"{peer} and {ours} hold different tensors "
                               f"({len(peer_keys)} vs {len(ours_keys)} keys)")
        for k in sorted(peer_keys):
            a, b = fo.get_tensor(names[k]), fp.get_tensor(k)
            if a.dtype != b.dtype or a.shape != b.shape:
                raise RuntimeError(f"{k}: {b.dtype} {tuple(b.shape)} vs ours {a.dtype} {tuple(a.shape)}")
            d = float((a.double() - b.double()).abs().max())
            scale = max(scale, float(a.double().abs().max()))
            if d > worst:
                worst, worst_key = d, k
            n += 1
    return {"tensors": n, "max_abs": worst, "scale": scale, "rel": worst / scale, "worst_key": worst_key}


CASE_FUNCS = {"ours_fuse": case_ours_fuse, "ours_build": case_ours_build, "ours_stream": case_ours_stream,
              "diffusers": case_diffusers, "diffusers_fuse": case_diffusers_fuse, "peft": case_peft,
              "ours_ldm": case_ours_ldm, "sd_mecha": case_sd_mecha}


def _child(conn, func: str, kwargs: dict, threads: int | None = None) -> None:
    try:
        _quiet()
        import torch

        if threads:
            torch.set_num_threads(threads)

        load = os.getloadavg()[0]
        res = CASE_FUNCS[func](**kwargs)
        res.update(loadavg=load, threads=torch.get_num_threads())
        conn.send(("ok", res))
    except BaseException:  # noqa: BLE001 — report any failure to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------- plan

def plan_cases(dtypes, quick: bool = False) -> list[dict]:
    cases = []
    for dt in dtypes:
        cases += [
            dict(id=f"ours.fuse[{dt}]", group="spatial", func="ours_fuse", kw=dict(dtype=dt)),
            dict(id=f"diffusers.fuse_lora[{dt}]", group="spatial", func="diffusers_fuse", kw=dict(dtype=dt)),
            dict(id=f"peft.merge_and_unload[{dt}]", group="spatial", func="peft", kw=dict(dtype=dt)),
            dict(id=f"ours.build_unet[{dt}]", group="spatial", func="ours_build", kw=dict(dtype=dt, video=False)),
            dict(id=f"diffusers[{dt}]", group="spatial", func="diffusers", kw=dict(dtype=dt, video=False)),
            dict(id=f"diffusers.disable_mmap[{dt}]", group="spatial", func="diffusers",
                 kw=dict(dtype=dt, video=False, in_ram=True)),
            dict(id=f"ours.build_unet.video[{dt}]", group="video", func="ours_build", kw=dict(dtype=dt, video=True)),
            dict(id=f"diffusers.video[{dt}]", group="video", func="diffusers", kw=dict(dtype=dt, video=True)),
            dict(id=f"diffusers.video.disable_mmap[{dt}]", group="video", func="diffusers",
                 kw=dict(dtype=dt, video=True, in_ram=True)),
            dict(id=f"ours.stream.video[{dt}]", group="video", func="ours_stream", kw=dict(dtype=dt)),
        ]
        for work in ("dense",) if quick else ("lora", "dense"):  # sd-mecha's LoRA path has SD1.5's shapes built in
            cases += [dict(id=f"ours.stream.ldm_{work}[{dt}]", group="sd_mecha", func="ours_ldm",
                           kw=dict(dtype=dt, work=work)),
                      dict(id=f"sd_mecha.ldm_{work}[{dt}]", group="sd_mecha", func="sd_mecha",
                           kw=dict(dtype=dt, work=work))]
    return cases


MECHA_PAIRS = {"lora": f"base + {ACCEL_SCALE}·kohya LoRA", "dense": f"base + {STYLE_SCALE}·(dense checkpoint − base)"}


def mecha_pairs(cases: list[dict]) -> list[tuple[str, str, str, str]]:
    """(work, dtype, our row, sd-mecha's row) for every sd-mecha row planned with its peer."""
    ids = {c["id"] for c in cases}
    return [(c["kw"]["work"], c["kw"]["dtype"], c["id"].replace("sd_mecha.", "ours.stream.", 1), c["id"])
            for c in cases if c["func"] == "sd_mecha" and c["id"].replace("sd_mecha.", "ours.stream.", 1) in ids]


def run_child(ctx, func: str, kwargs: dict, timeout: float, threads: int | None = None):
    """Run ``CASE_FUNCS[func](**kwargs)`` in a fresh forked process; ``(status, result_or_error_text)``."""
    return _run(ctx, _child, (func, kwargs, threads), timeout)


def _run(ctx, target, args: tuple, timeout: float):
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    child.close()
    result = None
    if parent.poll(timeout):
        try:
            result = parent.recv()
        except EOFError:
            pass
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return "error", f"timed out after {timeout:.0f} s"
    return result or ("error", f"the process died without a result (exit code {proc.exitcode}; killed for memory?)")


# --------------------------------------------------------------------------------------------- report

def machine_info() -> dict:
    import diffusers
    import peft
    import torch

    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""

    lscpu = sh(["lscpu"])
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "unknown")
    mem = next((int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    commit = sh(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(sh(["git", "status", "--porcelain", "--untracked-files=no"]))
    try:
        from importlib.metadata import version

        sd_mecha = version("sd-mecha")
    except ImportError:
        sd_mecha = "not installed"
    return dict(cpu=model, cores=os.cpu_count(), ram=mem, python=sys.version.split()[0], torch=torch.__version__,
                sd_mecha=sd_mecha,
                diffusers=diffusers.__version__, peft=peft.__version__, torch_threads=torch.get_num_threads(),
                commit=commit + ("+dirty" if dirty else ""), gpu="none" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
                date=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(raw: dict) -> dict:
    """Per case: median/min/max of every number we report."""
    out = {}
    for cid, runs in raw["runs"].items():
        ok = [r for r in runs if r.get("status") == "ok"]
        errs = [r["error"] for r in runs if r.get("status") != "ok"]
        s = {"n": len(ok), "errors": errs,  # by repeat index (None = failed), to pair interleaved repeats
             "by_repeat": [r["seconds_total"] if r.get("status") == "ok" else None for r in runs]}
        if ok:
            def col(f):
                return [f(r) for r in ok]
            s["seconds"] = col(lambda r: r["seconds_total"])
            s["cpu"] = col(lambda r: r.get("cpu_total", float("nan")))
            for name in ok[0]["sections"]:
                s[f"sec.{name}"] = col(lambda r, n=name: r["sections"][n]["seconds"])
                s[f"cpu.{name}"] = col(lambda r, n=name: r["sections"][n].get("cpu_seconds", float("nan")))
                s[f"extra.{name}"] = col(lambda r, n=name: r["sections"][n]["extra"])
                s[f"anon.{name}"] = col(lambda r, n=name: r["sections"][n]["anon_extra"])
                s[f"file.{name}"] = col(lambda r, n=name: r["sections"][n]["file_extra"])
                s[f"peak.{name}"] = col(lambda r, n=name: r["sections"][n]["peak"])
            s["extra_total"] = col(lambda r: r["extra_total"])
            s["peak_total"] = col(lambda r: r["peak_total"])
            s["start_rss"] = col(lambda r: r["start_rss"])
            s["model_bytes"] = ok[0]["model_bytes"]
            for name in ok[0].get("sub", {}):
                s[f"sub.{name}"] = col(lambda r, n=name: r["sub"][n])
            s["check"] = ok[0].get("check", {})
            s["loadavg"] = col(lambda r: r["loadavg"])
            s["hwm_reset"] = all(r["hwm_reset"] for r in ok)
        out[cid] = s
    return out


def _fmt_t(xs) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{_med(xs):.2f} [{min(xs):.2f}–{max(xs):.2f}]"


def _gb(x) -> str:
    return f"{x / GB:.2f}"


def _rows(summary: dict, cases: list[dict]) -> list[list[str]]:
    """One row per timed thing: (what, dtype, seconds, extra peak RSS, % of model, anon, file, process peak)."""
    rows = []
    for c in cases:
        s = summary.get(c["id"])
        if s is None:
            continue
        if not s["n"]:
            rows.append([c["id"], "FAILED: " + s["errors"][0].strip().splitlines()[-1][:80], "", "", "", "", "", ""])
            continue
        mb = s["model_bytes"]

        def row(label, secs, key):
            extra = _med(s[f"extra.{key}"]) if key else _med(s["extra_total"])
            anon = _med(s[f"anon.{key}"]) if key else float("nan")
            filep = _med(s[f"file.{key}"]) if key else float("nan")
            peak = _med(s[f"peak.{key}"]) if key else _med(s["peak_total"])
            cpu = _med(s[f"cpu.{key}"]) if key and f"cpu.{key}" in s else _med(s["cpu"])
            return [label, _fmt_t(secs), f"{cpu:.1f}", _gb(extra), f"{100 * extra / mb:.1f}%",
                    _gb(anon) if key else "—", _gb(filep) if key else "—", _gb(peak)]

        if c["func"] == "diffusers":
            rows.append(row(c["id"] + " end to end", s["seconds"], None))
            how = ("weights in RAM" if c["kw"].get("in_ram") else
                   "mmap-backed weights: includes copy-on-write")
            rows.append(row(f"  ↳ its fuse_lora ({how})", s["sec.fuse"], "fuse"))
        else:
            key = next(k[4:] for k in s if k.startswith("sec."))
            rows.append(row(c["id"], s["seconds"], key))
    return rows


def comparisons(summary: dict, dtypes) -> tuple[list[list[str]], list[list[str]]]:
    """Ratios (peer / ours) and the issue's targets, only for pairs that both ran.

    The headline ratio is the median of the per-repeat ratios (repeat i of the peer over repeat i of ours: the
    two ran back to back, under the same load), with their range; the ratio of the medians is shown beside it."""
    ratios, targets = [], []

    def ok(cid):
        return cid in summary and summary[cid]["n"] > 0

    def paired(p, o):
        return [a / b for a, b in zip(summary[p]["by_repeat"], summary[o]["by_repeat"]) if a and b]

    for dt in dtypes:
        ids = [
            ("fuse alone: diffusers fuse_lora / ours Merger.apply", f"diffusers.fuse_lora[{dt}]", f"ours.fuse[{dt}]"),
            ("fuse alone: PEFT merge_and_unload / ours Merger.apply", f"peft.merge_and_unload[{dt}]", f"ours.fuse[{dt}]"),
            ("end to end, spatial: diffusers (default mmap) / ours build_unet", f"diffusers[{dt}]",
             f"ours.build_unet[{dt}]"),
            ("end to end, spatial: diffusers (disable_mmap=True) / ours build_unet", f"diffusers.disable_mmap[{dt}]",
             f"ours.build_unet[{dt}]"),
            ("end to end, video: diffusers (default mmap) / ours build_unet", f"diffusers.video[{dt}]",
             f"ours.build_unet.video[{dt}]"),
            ("end to end, video: diffusers (disable_mmap=True) / ours build_unet",
             f"diffusers.video.disable_mmap[{dt}]", f"ours.build_unet.video[{dt}]"),
            ("end to end, video: diffusers (in memory) / ours streamed to a file (+ fsync; not like for like)",
             f"diffusers.video[{dt}]", f"ours.stream.video[{dt}]"),
        ] + [(f"files to file, LDM {what}: sd-mecha / ours merge_to_file", f"sd_mecha.ldm_{work}[{dt}]",
              f"ours.stream.ldm_{work}[{dt}]") for work, what in MECHA_PAIRS.items()]
        for label, p, o in ids:
            if not (ok(p) and ok(o)):
                continue
            peer, ours, per = _med(summary[p]["seconds"]), _med(summary[o]["seconds"]), paired(p, o)
            r, lo, hi = _med(per), min(per), max(per)
            ratios.append([label, dt, f"{peer:.2f}", f"{ours:.2f}", f"**{r:.2f}×** [{lo:.2f}–{hi:.2f}] (n={len(per)})",
                           f"{peer / ours:.2f}×", f"{_med(summary[p]['cpu']) / _med(summary[o]['cpu']):.2f}×"])
            if "diffusers" not in label or "not like for like" in label:  # the targets are against diffusers
                continue
            what = label.split(":")[0] + (" vs " + label.split("(")[1].split(")")[0] if "(" in label else "")
            verdict = ("met" if lo >= 3 else "**not met** (median below 3×)" if r < 3
                       else "met by the median; **not in every repeat**")
            targets.append([f"≥ 3× faster than diffusers ({what})", dt,
                            f"{r:.2f}× [{lo:.2f}–{hi:.2f}] ({peer:.2f} s vs {ours:.2f} s, medians)", verdict])
        for cid, what in ((f"ours.fuse[{dt}]", "in-place extra peak RSS ≤ 10% of model bytes (ours.fuse)"),):
            s = summary.get(cid)
            if s and s["n"]:
                pct = [100 * e / s["model_bytes"] for e in s["extra.fuse"]]
                targets.append([what, dt, f"{_med(pct):.1f}% [{min(pct):.1f}–{max(pct):.1f}] "
                                f"({_gb(_med(s['extra.fuse']))} GB of {_gb(s['model_bytes'])} GB)",
                                "met" if max(pct) <= 10 else "**not met**"])
        for cid, what in ((f"ours.stream.video[{dt}]", "streaming merge peak RSS ≤ 1.5 GB (whole process)"),):
            s = summary.get(cid)
            if s and s["n"]:
                peak, extra = _med(s["peak.stream"]), _med(s["extra.stream"])
                targets.append([what, dt, f"{_gb(peak)} GB (merge's own share {_gb(extra)} GB)",
                                "met" if peak <= 1.5 * GB else ("**not met** (own share met)" if extra <= 1.5 * GB else "**not met**")])
    return ratios, targets


def _breakdown(summary: dict, cases: list[dict]) -> str:
    lines = []
    for c in cases:
        s = summary.get(c["id"])
        if not s or not s["n"]:
            continue
        parts = [f"{k[4:]} {_med(v):.2f}" for k, v in s.items() if k.startswith("sec.")]
        parts += [f"{k[4:]} {_med(v):.2f}" for k, v in s.items() if k.startswith("sub.")]
        if len(parts) > 1:
            lines.append(f"- `{c['id']}`: " + ", ".join(parts))
    return "\n".join(lines) or "- (single sections only)"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _plain(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


RATIO_HEADER = ["comparison", "dtype", "peer s (median)", "ours s (median)",
                "peer / ours per repeat: median [min–max]", "ratio of the medians", "ratio of CPU seconds"]
ROW_HEADER = ["measurement", "seconds: median [min–max]", "CPU s", "extra peak RSS GB", "% of model bytes",
              "anon GB", "mmap/file GB", "process peak RSS GB"]


def check_agreement(summary: dict, dtypes) -> list[str]:
    """Cheap sanity: the merged weights of every method agree (4 tensors: sum + L1, relative)."""
    notes = []
    for dt in dtypes:
        ref = summary.get(f"ours.fuse[{dt}]", {}).get("check") or {}
        worst, who = 0.0, ""
        for cid, s in summary.items():
            if not cid.endswith(f"[{dt}]") or not s.get("n"):
                continue
            for k, v in (s.get("check") or {}).items():
                if k in ref:
                    d = abs(v - ref[k]) / max(abs(ref[k]), 1e-12)
                    if d > worst:
                        worst, who = d, cid
        notes.append(f"{dt} {worst:.1e}" + (f" (`{who}`)" if who else ""))
    return notes


def mecha_lines(raw: dict, cases: list[dict]) -> list[str]:
    """What the sd-mecha rows merged, from which files, and how far its outputs are from ours (Markdown bullets)."""
    pairs = mecha_pairs(cases)
    if not pairs:
        return []
    sizes, info = raw["sizes"], raw["machine"]
    files = "; ".join(f"{dt}: base {_gb(sizes[f'ldm_base_{dt}'])} GB, dense checkpoint {_gb(sizes[f'ldm_style_{dt}'])} GB"
                      for dt in sorted({dt for _, dt, _, _ in pairs}) if f"ldm_base_{dt}" in sizes)
    fixed = any(r.get("sd_mecha_fixed") for _, _, _, p in pairs for r in raw["runs"].get(p, []))
    pool = sorted({r["sd_mecha_threads"] for _, _, _, p in pairs for r in raw["runs"].get(p, []) if "sd_mecha_threads" in r})
    lines = [
        f"- sd-mecha rows (issue 13): sd-mecha {info.get('sd_mecha', '?')}, `merge` with its defaults (fp32 merge "
        f"dtype, its default pool of {'/'.join(map(str, pool)) or '?'} key worker thread(s) beside torch's), output "
        "dtype = the row's; ours is `merge_to_file` of the same recipe. Inputs: the base UNet as a single-file LDM "
        f"checkpoint (`model.diffusion_model.*`, UNet only; {files}): the base's own values, renamed with sd-mecha's SD1 "
        f"key table; the dense checkpoint is base + N(0, {MECHA_STYLE_STD:g}) per weight; the LoRA is the kohya file "
        "above. Work: " + "; ".join(f"`ldm_{w}` = {what}" for w, what in MECHA_PAIRS.items()) + ". Both sides read "
        "the files, merge in fp32, round once and write one safetensors file, fsynced (sd-mecha's row: `os.fsync` "
        "after `merge` returns, inside the timed section; the time without it is in the breakdown); ours also "
        "hashes every output byte (sha256, its provenance metadata). The style LoRA (PEFT keys) has no sd-mecha "
        "row: sd-mecha reads no PEFT-keyed LoRA.",
    ]
    if fixed:
        lines.append("- The `ldm_lora` row ran sd-mecha with one line of it fixed: its SD1 kohya → LDM converter "
                     "reads `relation[\"kohya_sd\"]` from a `RealizedKeyRelation` and raises TypeError (1.1.8), so "
                     "unfixed it cannot apply an SD1 kohya LoRA to an LDM checkpoint; the fix reads "
                     "`relation.inputs[\"kohya_sd\"]`, as its SDXL converter does. `sd_mecha.add_difference` itself "
                     "raises AttributeError on a converted LoRA (merge-space check), so the row builds that "
                     "function's own graph (`linear.add_difference(base, delta, alpha) | base`).")
    for key, a in (raw.get("agreement") or {}).items():
        lines.append(f"- Agreement `{key}`: " + (f"comparison failed: {str(a['error']).strip().splitlines()[-1]}"
                     if "error" in a else
                     f"all {a['tensors']} output tensors compared: max |ours − sd-mecha| = {a['max_abs']:.2e} "
                     f"= {a['rel']:.1e} of the largest |weight| ({a['scale']:.3f}; worst `{a['worst_key']}`)."))
    return lines


def render(raw: dict, notes_text: str = "", title: str | None = None) -> tuple[str, str]:
    """(plain-text table for the terminal, Markdown section)."""
    info, dtypes, cases = raw["machine"], raw["dtypes"], raw["cases"]
    summary = summarize(raw)
    rows = _rows(summary, cases)
    ratios, targets = comparisons(summary, dtypes)
    agree = check_agreement(summary, dtypes)
    loads = [l for s in summary.values() for l in s.get("loadavg", [])]
    sizes, wl = raw["sizes"], raw["workload"]
    breakdown = _breakdown(summary, cases)
    has_fuse = any(c["func"] == "ours_fuse" for c in cases)
    mecha = mecha_lines(raw, cases)
    text = "\n\n".join([_plain(ROW_HEADER, rows), _plain(RATIO_HEADER, ratios)]
                       + (["sanity (max relative checksum difference vs ours.fuse): " + "; ".join(agree)] if has_fuse else [])
                       + ([_plain(["target", "dtype", "value", "verdict"], targets)] if targets else []) + mecha)
    title = (title or SECTION) + (" — QUICK SMOKE CONFIG, not a result" if raw["quick"] else "")
    command = " ".join(["benchmarks/merge_cpu.py", *raw.get("argv", ["--quick"] if raw["quick"] else [])])
    md = [title, "",
          f"Run {info['date']} with `{command}` "
          f"({raw['repeats']} repeat(s) per measurement, interleaved; times are median [min–max]; RSS numbers are medians).",
          "",
          f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram'] / 2**30:.1f} GiB RAM, GPU: {info['gpu']}; "
          f"torch uses {raw.get('threads') or info['torch_threads']} thread(s) per measurement.",
          f"- **Shared machine**: other engineers run their test suites on it at the same time. The 1-min load "
          f"average at the start of each measurement (this benchmark's own process included) had median "
          f"{_med(loads):.1f} and range {min(loads, default=0):.1f}–{max(loads, default=0):.1f} on "
          f"{info['cores']} cores. Times are sensitive to that load (see the notes); compare ratios, which come from "
          "the same interleaved repeats.",
          f"- Software: Python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}, "
          f"peft {info['peft']}, weightlab {info['commit']}"
          + (f", sd-mecha {info['sd_mecha']}." if mecha else "."),
          f"- Inputs (random weights, real configs, warm page cache): base UNet "
          f"{_gb(sizes['base_float32'])} GB fp32 / {_gb(sizes['base_float16'])} GB fp16 (diffusers folder), "
          f"MotionAdapter {_gb(sizes['motion_float32'])} / {_gb(sizes['motion_float16'])} GB, "
          f"LCM-LoRA-shaped rank {wl['accel_rank']} (alpha {wl['accel_alpha']:g}) over the 14 target types "
          f"(kohya keys, fp16) {sizes['accel'] / 1e6:.0f} MB, style LoRA rank {wl['style_rank']} on attention "
          f"(PEFT keys, fp16) "
          f"{sizes['style'] / 1e6:.0f} MB. Recipe: base + {STYLE_SCALE}·style + {ACCEL_SCALE}·accel "
          f"(+ {GAMMA}·motion in the video rows). `[float16]` rows use the fp16 files and an fp16 model.",
          "- Each measurement runs in a fresh process forked from a fork server that has only imported the "
          "libraries. \"extra peak RSS\" = VmHWM during the timed section (reset via /proc/self/clear_refs) minus "
          "VmRSS just before it; for end-to-end rows the section starts before anything is loaded. The anon / "
          "mmap split comes from a 20 ms sampler thread (approximate; it can miss short transients). "
          "\"CPU s\" = user + system CPU time of the process in the timed section. \"% of model bytes\" divides by the merged model's "
          "parameter bytes in its dtype.",
          "", _table(ROW_HEADER, rows), "",
          "Where the time goes (medians, seconds):", "", breakdown, "",
          "Ratios (> 1 means ours is faster; each repeat's peer and ours ran back to back, so the per-repeat "
          "ratio is the like-for-like figure):", "",
          _table(RATIO_HEADER, ratios), "",
          ]
    if targets:
        md += ["Targets of issue 3:", "", _table(["target", "dtype", "measured", "verdict"], targets), ""]
    if has_fuse:
        md += ["Sanity: the largest relative difference between any measurement's merged weights and `ours.fuse` "
               "(sum and L1 norm of 4 touched tensors) is " + "; ".join(agree)
               + ". All methods merge the same recipe; fp16 results differ only in rounding order."]
    if mecha:
        md += ([""] if md[-1] else []) + mecha
    res_lines = []
    for dt in dtypes:
        r = [x["resident"] for cid in summary if cid.endswith(f"[{dt}]")
             for x in raw["runs"][cid] if x.get("status") == "ok" and x.get("resident")]
        if r:
            res_lines.append(f"{dt}: RssAnon {_gb(min(x['anon'] for x in r))}–{_gb(max(x['anon'] for x in r))} GB, "
                             f"RssFile ≤ {_gb(max(x['file'] for x in r))} GB for a {_gb(r[0]['model_bytes'])} GB model")
    if res_lines:
        md += ["", "In-RAM baseline of the fuse-alone rows (after `from_pretrained(disable_mmap=True)`, before the "
               "timed section): " + "; ".join(res_lines) + "."]
    errs = [(cid, s["errors"]) for cid, s in summary.items() if s["errors"]]
    if errs:
        md += ["", "Failures:"] + [f"- `{cid}`: {e[0].strip().splitlines()[-1]}" for cid, e in errs]
    if notes_text.strip():
        md += ["", notes_text.strip()]
    return text, "\n".join(md) + "\n"


# --------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="Markdown file to write the section into (default: benchmarks/RESULTS.md; none with --quick)")
    ap.add_argument("--quick", action="store_true", help="1/10-width SD1.5 layout, 1 repeat: a smoke run (< 1 min)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 5; 1 with --quick)")
    ap.add_argument("--work", type=Path, default=None, help="fixture folder (default: $TMPDIR/weightlab_bench[_quick])")
    ap.add_argument("--dtypes", default=None, help="comma list of float32,float16 (default both; float32 with --quick)")
    ap.add_argument("--only", default=None, help="regex: run only the measurements whose id matches")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per measurement")
    ap.add_argument("--notes", type=Path, default=None, help="Markdown appended to the section (observations)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every measurement (default: torch's)")
    ap.add_argument("--raw", type=Path, default=None, help="raw results JSON (default: WORK/raw_results.json)")
    ap.add_argument("--title", default=None, help="section title (default: the issue-3 section)")
    ap.add_argument("--render-only", action="store_true", help="re-render the last raw results in --work; run nothing")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import tempfile

    work = args.work or Path(tempfile.gettempdir()) / ("weightlab_bench_quick" if args.quick else "weightlab_bench")
    out = args.out if args.out is not None else (None if args.quick else REPO / "benchmarks" / "RESULTS.md")
    raw_file = args.raw or work / "raw_results.json"
    notes = args.notes.read_text() if args.notes else ""

    if args.render_only:
        raw = json.loads(raw_file.read_text())
    else:
        import multiprocessing as mp

        t_start = time.perf_counter()
        dtypes = [d for d in (args.dtypes or ("float32" if args.quick else "float32,float16")).split(",") if d]
        assert all(d in DT_NAMES for d in dtypes), dtypes
        repeats = args.repeats or (1 if args.quick else 5)
        cases = plan_cases(dtypes, quick=args.quick)
        if args.only:
            cases = [c for c in cases if re.search(args.only, c["id"])]
        mecha = [c for c in cases if c["group"] == "sd_mecha"]
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD + (SD_MECHA_PRELOAD if mecha else []))
        print(f"fixtures in {work} ...", flush=True)
        status, fx = run_child_fn(ctx, build_fixtures, dict(root=str(work), quick=args.quick), args.timeout * 2)
        if status == "ok" and mecha:
            print(f"  ({'built in %.0f s' % fx['seconds'] if fx['built'] else 'reused'}); LDM inputs of the "
                  "sd-mecha rows ...", flush=True)
            paths = fx["paths"]
            status, fx = run_child_fn(ctx, build_ldm_fixtures, dict(root=str(work), quick=args.quick,
                                                                   dtypes=sorted({c["kw"]["dtype"] for c in mecha})),
                                      args.timeout * 2)
            fx = dict(fx, paths={**paths, **fx["paths"]}) if status == "ok" else fx
        if status != "ok":
            print(fx, file=sys.stderr)
            return 1
        paths = fx["paths"]
        print(f"  {'built in %.0f s' % fx['seconds'] if fx['built'] else 'reused'}", flush=True)
        warm_page_cache({k: paths[k] for k in set().union(*map(case_inputs, cases))})
        raw = {"machine": machine_info(), "quick": args.quick, "argv": list(argv if argv is not None else sys.argv[1:]), "repeats": repeats, "dtypes": dtypes,
               "workload": workload(args.quick), "loadavg_start": os.getloadavg(), "threads": args.threads,
               "cases": cases, "sizes": fixture_sizes(paths), "runs": {c["id"]: [] for c in cases}}
        for rep in range(repeats):
            for c in cases:
                print(f"[{rep + 1}/{repeats}] {c['id']:<40} load {os.getloadavg()[0]:.1f} ... ", end="", flush=True)
                st, payload = run_child(ctx, c["func"], dict(paths=paths, **c["kw"]), args.timeout, args.threads)
                if st == "ok":
                    raw["runs"][c["id"]].append(dict(payload, status="ok"))
                    print(f"{payload['seconds_total']:.2f} s, extra peak {payload['extra_total'] / GB:.2f} GB", flush=True)
                else:
                    raw["runs"][c["id"]].append({"status": "error", "error": payload})
                    print("FAILED\n" + str(payload), flush=True)
                work.mkdir(parents=True, exist_ok=True)
                raw_file.write_text(json.dumps(raw, indent=1))
        raw["agreement"] = check_mecha_outputs(ctx, raw, cases, Path(paths["root"]) / "outputs", args.timeout)
        raw["wall_seconds"] = time.perf_counter() - t_start
        raw_file.write_text(json.dumps(raw, indent=1))
        print(f"done in {raw['wall_seconds']:.0f} s; raw results: {raw_file}", flush=True)

    text, md = render(raw, notes, title=args.title)
    print()
    print(text)
    if out is not None:
        write_section(md, out)
        print(f"\nwrote section {(args.title or SECTION)!r} to {out}")
    return 0


def _fn_child(conn, fn, kwargs):
    try:
        conn.send(("ok", fn(**kwargs)))
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_child_fn(ctx, fn, kwargs: dict, timeout: float):
    return _run(ctx, _fn_child, (fn, kwargs), timeout)


def check_mecha_outputs(ctx, raw: dict, cases: list[dict], outputs: Path, timeout: float) -> dict:
    """After the repeats: every tensor of each sd-mecha row's last output against its peer's; then remove them."""
    found = {}
    try:
        for work, dt, ours_id, peer_id in mecha_pairs(cases):
            files = [next((r["output"] for r in reversed(raw["runs"][cid]) if r.get("status") == "ok"), None)
                     for cid in (ours_id, peer_id)]
            if None not in files:
                st, res = run_child_fn(ctx, compare_outputs, dict(ours=files[0], peer=files[1]), timeout)
                found[f"{work}[{dt}]"] = res if st == "ok" else {"error": res}
                print(f"agreement {work}[{dt}]: {res}", flush=True)
    finally:
        shutil.rmtree(outputs, ignore_errors=True)
    return found


if __name__ == "__main__":
    sys.exit(main())
