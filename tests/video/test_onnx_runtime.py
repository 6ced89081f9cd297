"""ONNX Runtime pipeline: same call as the PyTorch one, same clip on the same seed, providers, recipe checks."""

import inspect

import pytest


@pytest.fixture(scope="module")
def torch_pipe(recipe):
    from weightlab.video import VideoPipeline

    return VideoPipeline.from_source(recipe)


@pytest.fixture(scope="module")
def onnx_pipe(onnx_dir):
    from weightlab.onnx_runtime import OnnxVideoPipeline

    return OnnxVideoPipeline(onnx_dir)


def test_same_call_signature():
    from weightlab.onnx_runtime import OnnxVideoPipeline
    from weightlab.video import VideoPipeline

    assert inspect.signature(OnnxVideoPipeline.__call__) == inspect.signature(VideoPipeline.__call__)


@pytest.mark.parametrize("kwargs", [
    dict(),  # the paper's setting: 16 frames, 4 steps, no CFG
    dict(frames=8, steps=2, guidance=1.5, negative_prompt="blurry", height=32, width=48, seed=11),
])
def test_onnx_pipeline_matches_pytorch_pipeline(torch_pipe, onnx_pipe, assert_same_clip, kwargs):
    a = torch_pipe("a cat walking", progress=False, **kwargs)
    b = onnx_pipe("a cat walking", progress=False, **kwargs)
    assert onnx_pipe.provider == "cpu"
    assert_same_clip(a, b)


def test_onnx_pipeline_refuses_too_many_frames(onnx_pipe):
    from weightlab.errors import SamplingError

    with pytest.raises(SamplingError, match="frames=33"):
        onnx_pipe("a cat", frames=33)


def test_generate_with_onnx_writes_mp4_and_checks_the_recipe(onnx_dir, recipe, recipe2, tmp_path):
    import imageio.v2 as imageio

    from weightlab.errors import ExportError
    from weightlab.video import generate

    result = generate(recipe, "a cat", tmp_path / "clip.mp4", onnx_dir=onnx_dir, frames=8, progress=False)
    assert result["backend"].startswith("onnxruntime")
    assert len([frame for frame in imageio.get_reader(result["mp4"], format="FFMPEG")]) == 8
    assert len(imageio.mimread(result["gif"])) == 8
    with pytest.raises(ExportError, match="reweight"):
        generate(recipe2, "a cat", tmp_path / "other.mp4", onnx_dir=onnx_dir, progress=False)


def test_provider_choice():
    from weightlab.errors import WeightlabError
    from weightlab.onnx_runtime import resolve_provider

    import torch

    assert resolve_provider("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(WeightlabError, match="provider"):
        resolve_provider("rocm")
    if not torch.cuda.is_available():
        with pytest.raises(WeightlabError, match="onnxruntime-gpu"):
            resolve_provider("cuda")
