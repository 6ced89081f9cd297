"""Fixtures for video sampling and ONNX tests: two recipes over the tiny family and their ONNX exports.

Exports take about a minute each on two cores, so each is made once per test run and shared between
pytest-xdist workers (a file lock in the run's common temp folder; the first worker exports, the others reuse).
"""

import os
import shutil

import pytest


@pytest.fixture(scope="session", autouse=True)
def _flush_denormals():
    """The tiny family's random weights drive some activations subnormal, which makes CPU matmuls ~10x slower."""
    import torch

    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def _recipe(tiny, style: float, motion: float):
    from weightlab import Recipe, Term

    return Recipe(base=str(tiny.base_dir), terms=[
        Term(source=str(tiny.style_lora_kohya), kind="style", scale=style),
        Term(source=str(tiny.accel_lora), kind="image_accel", scale=1.0),
        Term(source=str(tiny.motion_dir), kind="motion", scale=motion)])


@pytest.fixture(scope="session")
def recipe(tiny):
    """α = 0.8 style, β = 1.0 LCM-LoRA, γ = 1.0 motion."""
    return _recipe(tiny, 0.8, 1.0)


@pytest.fixture(scope="session")
def recipe2(tiny):
    """The same residuals re-weighted: α = 0.3, γ = 0.6."""
    return _recipe(tiny, 0.3, 0.6)


def _shared_export(tmp_path_factory, name: str, make):
    """Run ``make(folder)`` once per test run (across xdist workers) and return the folder."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's basetemp is a child of the run's folder: share that one, never across runs.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / "manifest.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
    return folder


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory, recipe):
    """The tiny video model of ``recipe``, exported through the CLI (`weightlab export onnx`), fp32."""
    from typer.testing import CliRunner

    from weightlab.cli import app

    def make(folder):
        recipe_file = folder.parent / "video_recipe.yaml"
        recipe.save(recipe_file)
        result = CliRunner().invoke(app, ["export", "onnx", "--recipe", str(recipe_file), "--out", str(folder)])
        assert result.exit_code == 0, result.output

    return _shared_export(tmp_path_factory, "video_onnx", make)


@pytest.fixture(scope="session")
def onnx_dir2(tmp_path_factory, recipe2):
    """A fresh export of ``recipe2`` (what re-weighting must reproduce)."""
    from weightlab.onnx_export import export_onnx

    return _shared_export(tmp_path_factory, "video_onnx2",
                          lambda folder: export_onnx(recipe2, folder, verify=False, progress=False))


@pytest.fixture
def onnx_copy(onnx_dir, tmp_path):
    """A private copy of the ``recipe`` export, for tests that modify it."""
    return shutil.copytree(onnx_dir, tmp_path / "export")


@pytest.fixture(scope="session")
def assert_same_clip():
    """Two fp32 samplings of the same weights, seed and settings agree to well under one 8-bit level.

    Model instances may differ in the last bits of each UNet call (BLAS kernels depend on buffer alignment;
    ONNX Runtime sums in another order): ~1e-7 relative per call. The tiny random model amplifies that through
    LCM's x0 prediction (x 1/sqrt(alpha_bar) ~ 15 at t = 999) over 4 steps, to at most ~5e-5 in the frames.
    Frames must agree within 1e-3 (a quarter of one uint8 level) and final latents within 1e-4 x their range;
    a wrong timestep, noise draw, guidance or weight moves them by order 1.
    """
    import numpy as np

    def check(a, b):
        assert a.video.shape == b.video.shape
        np.testing.assert_allclose(a.video, b.video, rtol=0, atol=1e-3)
        scale = float(a.latents.abs().max())
        assert float((a.latents - b.latents).abs().max()) <= 1e-4 * scale
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1

    return check
