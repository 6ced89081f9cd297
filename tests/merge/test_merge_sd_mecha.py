"""The merge CPU benchmark's sd-mecha rows (benchmarks/merge_cpu.py, issue 13), run small so CI exercises them in seconds.

- Dense: our ``merge_to_file`` equals sd-mecha's ``weighted_sum`` (reference kind: sd-mecha, an independent merger
  from PyPI) on the tiny LDM checkpoint pair, every output tensor compared through sd-mecha's own LDM key table.
  Tolerance 1e-6 relative to the largest weight (fp32): both accumulate in fp32 and round once; ``torch.lerp`` and
  our ``w0 + α·(W − w0)`` may differ by a few fp32 ULPs (~1e-7).
- LoRA: sd-mecha's LoRA conversion reshapes to SD1.5's full shapes, so it cannot run on the tiny UNet; its row
  (with the benchmark's fix of sd-mecha 1.1.8's SD1 kohya converter) is checked on three full-size SD1.5 weights
  against kohya's ΔW = (alpha / rank) · up @ down done in float64 here (reference kind: float64 math). Tolerance
  1e-6 relative to the weight's largest magnitude: one fp32 matmul over rank 4 and one add, a few ULPs.
  Our side of that row is the same kohya merge that tests/merge/test_merge_parity.py checks against diffusers.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightlab.testing import lora_to_kohya

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "merge_cpu.py"
TOL = 1e-6


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("merge_cpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_rows_agree(bench, tiny, tmp_path):
    paths = {"ldm_base_float32": str(tiny.base_ldm), "ldm_style_float32": str(tiny.style_dense), "root": str(tmp_path)}
    ours = bench.case_ours_ldm(paths, "float32", "dense")
    peer = bench.case_sd_mecha(paths, "float32", "dense")

    agree = bench.compare_outputs(ours["output"], peer["output"])
    assert agree["tensors"] == len(load_file(tiny.base_ldm)) and ours["model_bytes"] == peer["model_bytes"]
    assert agree["rel"] <= TOL, agree
    moved = bench.compare_outputs(ours["output"], str(tiny.base_ldm))  # the merge changed the weights
    assert moved["rel"] > 1e-3, moved


def test_sd_mecha_lora_row_matches_kohya_definition(bench, tmp_path, monkeypatch):
    from sd_mecha.extensions import merge_methods, model_configs

    converter = merge_methods.resolve("convert_'sd1-kohya'_to_'sd1-ldm'").__wrapped__
    monkeypatch.setattr(converter, "__call__", converter.__call__)  # undo the row's fix after this test
    names = bench.sd_mecha_unet_names()
    shapes = model_configs.resolve("sd1-ldm").keys()
    keys = ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "model.diffusion_model.output_blocks.9.0.in_layers.2.weight",
            "model.diffusion_model.input_blocks.4.1.proj_out.weight"]
    g = torch.Generator().manual_seed(0)
    base = {k: 0.02 * torch.randn(shapes[k].shape, generator=g) for k in keys}
    factors = {}
    for k, w in base.items():
        kernel = w.shape[2:]
        factors[names[k].removesuffix(".weight")] = (0.3 * torch.randn(4, w.shape[1], *kernel, generator=g),
                                                    0.3 * torch.randn(w.shape[0], 4, *(1,) * len(kernel), generator=g))
    save_file(base, tmp_path / "base.safetensors")
    save_file(lora_to_kohya(factors, alpha=2.0), tmp_path / "lora.safetensors")
    paths = {"ldm_base_float32": str(tmp_path / "base.safetensors"), "accel": str(tmp_path / "lora.safetensors"),
             "root": str(tmp_path)}

    merged = load_file(bench.case_sd_mecha(paths, "float32", "lora")["output"])

    assert set(merged) == set(keys)
    for k, w in base.items():
        down, up = (f.double() for f in factors[names[k].removesuffix(".weight")])
        ref = w.double() + bench.ACCEL_SCALE * (2.0 / 4) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        err = (merged[k].double() - ref).abs().max() / ref.abs().max()
        assert err <= TOL, (k, float(err))
