"""ONNX Runtime pipeline: same call as the PyTorch one, same clip on the same seed, providers, recipe checks."""

import inspect

import pytest


@pytest.fixture(scope="module")
def torch_pipe(recipe):
    from weightlab.video import VideoPipeline

    return VideoPipeline.from_source(recipe, device="cpu")


@pytest.fixture(scope="module")
def onnx_pipe(onnx_dir):
    from weightlab.onnx_runtime import OnnxVideoPipeline

    return OnnxVideoPipeline(onnx_dir, provider="cpu")  # the same device as torch_pipe, whatever the machine has


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
    assert_same_clip(a, b)


def test_onnx_pipeline_refuses_too_many_frames(onnx_pipe):
    from weightlab.errors import SamplingError

    with pytest.raises(SamplingError, match="frames=33"):
        onnx_pipe("a cat", frames=33)


def test_generate_with_onnx_writes_mp4_and_checks_the_recipe(onnx_dir, recipe, recipe2, tmp_path):
    import imageio.v2 as imageio

    from weightlab.errors import ExportError
    from weightlab.video import generate

    result = generate(recipe, "a cat", tmp_path / "clip.mp4", onnx_dir=onnx_dir, provider="cpu", frames=8,
                      progress=False)
    assert result["backend"].startswith("onnxruntime")
    assert len([frame for frame in imageio.get_reader(result["mp4"], format="FFMPEG")]) == 8
    assert len(imageio.mimread(result["gif"])) == 8
    with pytest.raises(ExportError, match="reweight"):
        generate(recipe2, "a cat", tmp_path / "other.mp4", onnx_dir=onnx_dir, provider="cpu", progress=False)


CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize("gpu", [False, True], ids=["no-gpu", "gpu"])  # what torch sees
@pytest.mark.parametrize("available", [[CPU], [CUDA, CPU], [TRT, CUDA, CPU]], ids=["ort-cpu", "ort-cuda", "ort-trt"])
def test_provider_choice(monkeypatch, gpu, available):
    """The product's rule on every combination, whatever this machine has: CUDA (and TensorRT) only with a GPU that
    torch sees and the execution provider in onnxruntime; ``auto`` falls back to the CPU."""
    import onnxruntime
    import torch

    from weightlab.errors import WeightlabError
    from weightlab.onnx_runtime import resolve_provider

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)
    usable = {"cuda": gpu and CUDA in available, "tensorrt": gpu and CUDA in available and TRT in available}
    assert resolve_provider("auto") == ("cuda" if usable["cuda"] else "cpu")
    assert resolve_provider("cpu") == "cpu"
    for provider, ok in usable.items():
        if ok:
            assert resolve_provider(provider) == provider
        else:
            with pytest.raises(WeightlabError, match="onnxruntime-gpu"):
                resolve_provider(provider)
    with pytest.raises(WeightlabError, match="unknown provider 'rocm'"):
        resolve_provider("rocm")
