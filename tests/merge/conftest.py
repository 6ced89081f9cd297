import pytest
import torch


@pytest.fixture(scope="session")
def diffusers_pipe_factory(tiny):
    """Build an AnimateDiffPipeline the diffusers way (load_lora_weights + set_adapters + fuse_lora).

    ``dtype``: the pipeline is loaded with ``dtype=dtype`` before the LoRAs are fused (diffusers' half-precision
    path: the LoRA factors are held in ``dtype``; PEFT multiplies them in fp32 on CPU, casts the delta to ``dtype``
    and adds it to the ``dtype`` weight)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline

    def make(loras=(), motion=True, dtype=torch.float32):
        if motion:
            adapter = MotionAdapter.from_pretrained(tiny.motion_dir, dtype=dtype)
            pipe = AnimateDiffPipeline.from_pretrained(tiny.base_dir, motion_adapter=adapter, dtype=dtype)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(tiny.base_dir, dtype=dtype)
        names, scales = [], []
        for i, (path, scale) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
            names.append(f"l{i}")
            scales.append(scale)
        if names:
            pipe.set_adapters(names, scales)
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
            pipe.unload_lora_weights()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture(scope="session")
def kohya_delta64():
    """``delta(sd, key, shape)``: a kohya LoRA file's ΔW for the weight ``key`` in fp64, from its definition
    ((alpha / rank) · up @ down, conv factors reshaped to 2-D); None if the file does not target ``key``.
    ``magnitude=True`` gives (alpha / rank) · |up| @ |down| instead, the scale of the product's rounding errors."""
    def delta(sd: dict, key: str, shape, *, magnitude: bool = False) -> torch.Tensor | None:
        k = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if not key.endswith(".weight") or f"{k}.lora_down.weight" not in sd:
            return None
        down, up = sd[f"{k}.lora_down.weight"].double(), sd[f"{k}.lora_up.weight"].double()
        if magnitude:
            down, up = down.abs(), up.abs()
        rank = down.shape[0]
        return (sd[f"{k}.alpha"].double() / rank * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))).reshape(shape)

    return delta
