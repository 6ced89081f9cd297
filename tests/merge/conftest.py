import pytest


@pytest.fixture(scope="session")
def diffusers_pipe_factory(tiny):
    """Build an AnimateDiffPipeline the diffusers way (load_lora_weights + set_adapters + fuse_lora)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline

    def make(loras=(), motion=True):
        if motion:
            pipe = AnimateDiffPipeline.from_pretrained(tiny.base_dir, motion_adapter=MotionAdapter.from_pretrained(tiny.motion_dir))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(tiny.base_dir)
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
