"""ONNX Runtime sampling of an export written by :func:`weightlab.onnx_export.export_onnx`.

:class:`OnnxVideoPipeline` has :class:`weightlab.video.VideoPipeline`'s call signature and returns the same
:class:`~weightlab.sampling.Clip`. It needs only torch, diffusers (the scheduler), transformers (the tokenizer) and
onnxruntime. Execution providers: CUDA with IO binding when a GPU and ``onnxruntime-gpu`` are present (TensorRT on
request), the CPU otherwise. Every model input and output is a torch tensor bound in place (IO binding, on the
ORT compute stream shared with torch), and the scheduler (LCM, or the DDIM/DPM-Solver++ baselines) runs in torch on
the same device, so latents and noise never leave the device between steps; it only reads a few scalars per step.

Example:
    >>> pipe = OnnxVideoPipeline("export/")                     # doctest: +SKIP
    >>> clip = pipe("a cat walking on the beach", seed=0)       # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from weightlab.errors import ExportError, WeightlabError
from weightlab.noise_prior import NoisePrior, with_prior
from weightlab.onnx_manifest import OnnxManifest
from weightlab.schedules import NoiseSchedule, make_scheduler
from weightlab.sampling import (DECODE_CHUNK, DEFAULT_FRAMES, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Clip,
                                check_request, postprocess, sync)

PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")
_EP = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}


def resolve_provider(provider: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU and onnxruntime has the CUDA provider, else ``cpu``."""
    import onnxruntime as ort
    import torch

    if provider not in PROVIDERS:
        raise WeightlabError(f"unknown provider {provider!r}. Fix: use one of {', '.join(PROVIDERS)}.")
    available = ort.get_available_providers()
    gpu = torch.cuda.is_available() and _EP["cuda"] in available
    if provider == "auto":
        return "cuda" if gpu else "cpu"
    if provider != "cpu" and not (gpu and _EP[provider] in available):
        raise WeightlabError(f"provider {provider!r} needs a CUDA GPU visible to torch and onnxruntime-gpu with "
                             f"{_EP[provider]} (available: {', '.join(available)}). Fix: install onnxruntime-gpu "
                             "matching your CUDA, or use provider='cpu'.")
    return provider


def create_session(path: str | Path, provider: str = "auto", *, device_id: int = 0, fp16: bool = False,
                   cache_dir: str | Path | None = None):
    """An ``onnxruntime.InferenceSession`` for one graph on ``provider`` (see :func:`resolve_provider`).

    CUDA shares torch's current stream (so bound torch tensors need no extra synchronisation); TensorRT builds
    fp16 engines for fp16 graphs and caches them under ``cache_dir`` (engines embed the weights: give each set of
    weights its own folder). On the CPU, denormals are flushed, the thread count follows ``torch.get_num_threads()``
    and idle threads sleep instead of spinning (torch shares the cores in the same process).
    """
    import onnxruntime as ort
    import torch

    provider = resolve_provider(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if provider == "cpu":  # share the cores with torch in the same process: same thread count, no busy-waiting
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = []
    if provider == "tensorrt":
        trt = {"device_id": device_id, "trt_fp16_enable": fp16}
        if cache_dir is not None:
            trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir), trt_timing_cache_enable=True)
        providers.append((_EP["tensorrt"], trt))
    if provider in ("cuda", "tensorrt"):
        stream = torch.cuda.current_stream(device_id).cuda_stream
        providers.append((_EP["cuda"], {"device_id": device_id, "user_compute_stream": str(stream)}))
    providers.append(_EP["cpu"])
    return ort.InferenceSession(str(path), options, providers=providers)


class BoundModel:
    """One ONNX graph called with torch tensors through IO binding (no host copies on any device).

    Args:
        session (onnxruntime.InferenceSession): from :func:`create_session`.
        device (torch.device): where the inputs live and outputs are allocated.
    """

    def __init__(self, session, device):
        import numpy as np
        import torch

        self.session = session
        self.device = torch.device(device)
        self.output = session.get_outputs()[0].name
        self._np = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}

    def __call__(self, out_shape: tuple[int, ...], out_dtype, **inputs):
        """Run with ``inputs`` (name -> torch tensor on this device) into a new ``out_shape`` tensor."""
        import torch

        kind = self.device.type
        index = self.device.index or 0
        binding = self.session.io_binding()
        keep = []  # contiguous copies must outlive the run
        for name, tensor in inputs.items():
            tensor = tensor.to(self.device).contiguous()
            keep.append(tensor)
            binding.bind_input(name, kind, index, self._np[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        out = torch.empty(out_shape, dtype=out_dtype, device=self.device)
        binding.bind_output(self.output, kind, index, self._np[out.dtype], tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


class OnnxVideoPipeline:
    """Video sampling with ONNX Runtime; same call as :class:`weightlab.video.VideoPipeline`.

    Args:
        onnx_dir (str | Path): an export folder (``manifest.json``, ``unet/``, ``text_encoder/``, ``vae_decoder/``,
            ``tokenizer/``, ``scheduler/``).
        provider (str, default "auto"): ``auto`` | ``cuda`` | ``tensorrt`` | ``cpu``.
        device_id (int, default 0): the GPU for CUDA/TensorRT.
    Example:
        >>> clip = OnnxVideoPipeline("export/", provider="cuda")("a cat", seed=0)   # doctest: +SKIP
    """

    def __init__(self, onnx_dir: str | Path, *, provider: str = "auto", device_id: int = 0):
        import torch
        from diffusers import LCMScheduler
        from transformers import CLIPTokenizer

        self.dir = Path(onnx_dir)
        self.manifest = OnnxManifest.read(self.dir)
        self.provider = resolve_provider(provider)
        self.device = torch.device("cuda", device_id) if self.provider != "cpu" else torch.device("cpu")
        self.dtype = getattr(torch, self.manifest.dtype)
        self.config = self.manifest.pipeline
        fp16 = self.manifest.dtype == "float16"
        models = self.manifest.models
        missing = [name for name in ("text_encoder", "vae_decoder") if name not in models]
        if missing:
            raise ExportError(f"{self.dir}: the manifest lists no {' or '.join(missing)} graph, so this export cannot "
                              "sample. Fix: export with `weightlab export onnx`, which writes all three graphs.")
        self.unet, self.text_encoder, self.vae_decoder = (
            BoundModel(create_session(self.dir / models[name].graph, self.provider, device_id=device_id, fp16=fp16,
                                      cache_dir=self.dir / "trt_cache" / self.manifest.engine_key), self.device)
            for name in ("unet", "text_encoder", "vae_decoder"))
        self.tokenizer = CLIPTokenizer.from_pretrained(self.dir / "tokenizer")
        self.scheduler = LCMScheduler.from_config(json.loads((self.dir / "scheduler" / "scheduler_config.json").read_text()))

    def check_recipe(self, recipe) -> None:
        """Refuse to sample ``recipe`` from an export of another recipe (its weights would be wrong)."""
        have = self.manifest.recipe_hash
        if recipe is not None and have != recipe.hash:
            raise ExportError(f"{self.dir} holds the weights of recipe {have}, not {recipe.hash}. "
                              f"Fix: `weightlab export reweight --onnx {self.dir} --recipe R.yaml` (no re-export needed).")

    def _encode(self, text: str):
        import torch

        ids = self.tokenizer(text, padding="max_length", max_length=self.config.text_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder((ids.shape[0], ids.shape[1], self.config.text_hidden_size), self.dtype,
                                 input_ids=ids.to(torch.int64))

    def _decode(self, latents):
        import torch

        b, c, f, h, w = latents.shape
        factor = self.config.vae_scale_factor
        dtype = getattr(torch, self.config.vae_dtype)
        flat = (1 / self.config.vae_scaling_factor * latents.to(dtype)).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        chunks = [self.vae_decoder((len(x), self.config.vae_out_channels, h * factor, w * factor), dtype, latents=x)
                  for x in flat.split(DECODE_CHUNK)]
        video = torch.cat(chunks)
        return video.reshape(b, f, *video.shape[1:]).permute(0, 2, 1, 3, 4)

    def __call__(self, prompt: str, *, frames: int = DEFAULT_FRAMES, steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, seed: int = 0, height: int | None = None, width: int | None = None,
                 negative_prompt: str | None = None, progress: bool = True, sampler: str = DEFAULT_SAMPLER,
                 noise: NoisePrior | None = None) -> Clip:
        """Sample one clip; arguments as :meth:`weightlab.video.VideoPipeline.__call__`."""
        import torch
        from tqdm.auto import tqdm

        cfg, factor = self.config, self.config.vae_scale_factor
        height = height or cfg.sample_size * factor
        width = width or cfg.sample_size * factor
        check_request(sampler=sampler, frames=frames, steps=steps, guidance=guidance, height=height, width=width,
                      max_frames=cfg.max_frames, scheduler_config=self.scheduler.config, multiple=8 * factor)
        device, do_cfg = self.device, guidance > 1.0
        with torch.inference_mode():
            t0 = time.perf_counter()
            embeds = self._encode(prompt)
            if do_cfg:
                embeds = torch.cat([self._encode(negative_prompt or ""), embeds])
            embeds = embeds.repeat_interleave(frames, dim=0)
            sync(device)
            t1 = time.perf_counter()
            lcm = self.scheduler
            prior = noise or NoisePrior()
            scheduler = with_prior(lcm if sampler == "lcm" else make_scheduler(
                sampler, lcm.config, NoiseSchedule.from_config(lcm.config)), prior)
            scheduler.set_timesteps(steps, device=device)
            # Keep the scheduler's tables on the device: LCM and DDIM index them with device timesteps (DPM-Solver++
            # indexes its sigmas with Python ints).
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
            if hasattr(scheduler, "final_alpha_cumprod"):
                scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(device)
            generator = torch.Generator(device).manual_seed(seed)
            shape = (1, cfg.latent_channels, frames, height // factor, width // factor)
            latents = prior.sample(shape, generator, device, self.dtype) * scheduler.init_noise_sigma
            for t in tqdm(scheduler.timesteps, desc="denoise", disable=not progress):
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
                eps = self.unet(tuple(model_input.shape), self.dtype, sample=model_input, timestep=t,
                                encoder_hidden_states=embeds)
                if do_cfg:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + guidance * (cond - uncond)
                latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
            sync(device)
            t2 = time.perf_counter()
            video = postprocess(self._decode(latents))
            t3 = time.perf_counter()
        return Clip(video=video, latents=latents, seconds={"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2,
                                                           "total": t3 - t0})
