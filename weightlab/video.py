"""Video assembly and sampling: a merged ``UNetMotionModel`` in diffusers' ``AnimateDiffPipeline`` (DESIGN.md
"Video assembly, sampling and export").

The base's text encoder (with the recipe's text-encoder residuals composed in), tokenizer and VAE join the merged UNet;
the scheduler is ``LCMScheduler`` with AnimateLCM's own config. Defaults follow the paper: 16 frames, 4 steps, guidance
1.0 (no CFG; up to 2 allowed). DDIM and DPM-Solver++ (``sampler="ddim"|"dpmpp"``) sample models that are not
consistency-distilled, with any CFG, under the same linear schedule (:mod:`weightlab.schedules`). A
consistency-distilled residual of the recipe recorded under another schedule is refused.
:class:`weightlab.onnx_runtime.OnnxVideoPipeline` has the same call signature and returns the same
:class:`~weightlab.sampling.Clip`; the request checks and defaults both share live in :mod:`weightlab.sampling`.

Example:
    >>> pipe = VideoPipeline.from_source("recipe.yaml")            # doctest: +SKIP
    >>> clip = pipe("a cat walking on the beach", seed=0)           # doctest: +SKIP
    >>> write_video(clip.frames, "clip.mp4"); write_video(clip.frames, "clip.gif")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from weightlab.errors import RecipeError, SamplingError, WeightlabError
from weightlab.noise_prior import NoisePrior, with_prior
from weightlab.sampling import (DECODE_CHUNK, DEFAULT_FRAMES, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Clip,
                                check_request, postprocess, sync)
from weightlab.schedules import NoiseSchedule, check_distilled, make_scheduler, sampling_schedule

if TYPE_CHECKING:
    import numpy as np
    import torch

    from weightlab.merge import Resolver
    from weightlab.recipe import Recipe

DEFAULT_FPS = 8
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


class VideoUNet(NamedTuple):
    """A merged ``UNetMotionModel``, the pipeline folder its other components come from, and its recipe if known."""

    unet: Any
    pipeline_dir: Path
    recipe: "Recipe | None"


def torch_dtype(dtype: "str | torch.dtype | None", default: str = "float32") -> "torch.dtype":
    """``"float16"``/``"float32"``/``"bfloat16"`` (or a torch dtype, or None for ``default``) -> torch dtype."""
    import torch

    from weightlab.files import COMPUTE_DTYPES, torch_dtype as from_name

    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or default
    if name not in COMPUTE_DTYPES:
        raise WeightlabError(f"unknown dtype {name!r}. Fix: use {', '.join(COMPUTE_DTYPES[:-1])} or {COMPUTE_DTYPES[-1]}.")
    return from_name(name)


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    return str(torch_dtype(dtype)).removeprefix("torch.")


def animatelcm_scheduler(base_config: dict | None = None):
    """``LCMScheduler`` with AnimateLCM's settings over ``base_config`` (the base pipeline's scheduler config)."""
    return make_scheduler("lcm", base_config)


def _scheduler_config(folder: Path) -> dict | None:
    file = folder / "scheduler" / "scheduler_config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def check_schedules(recipe: "Recipe", base_config: dict | None = None, *, resolve: "Resolver | None" = None) -> None:
    """Refuse a recipe with a consistency-distilled residual recorded under another noise schedule than the video
    sampler's (:func:`weightlab.schedules.sampling_schedule` of the base's ``base_config``). Only safetensors headers
    are read; ``resolve`` turns sources into paths (None: paths only, :func:`weightlab.merge.resolve_path`)."""
    from weightlab.files import read_header
    from weightlab.inspect import weights_file
    from weightlab.merge import resolve_path

    want = sampling_schedule(base_config)
    for term in recipe.terms:
        try:
            file = weights_file((resolve or resolve_path)(term.source))
        except WeightlabError:  # a merged folder may outlive its inputs; a recipe's missing input fails in the merge
            continue
        if file.suffix == ".safetensors":
            check_distilled(read_header(file).metadata, want, source=f"{term.kind} term {term.source}",
                            user="the video sampler",
                            fix="distil it again under the sampler's schedule (the image-lcm and motion-lcm defaults), "
                                "or leave it out of the recipe.")


def _recipe_of(source) -> "Recipe | None":
    """The recipe a source is, or was merged from (a merged folder's ``recipe.json``); None if unknown."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    file = path if path.is_file() and path.suffix in RECIPE_SUFFIXES else path / "recipe.json"
    if not file.is_file():
        return None
    from weightlab.recipe import Recipe  # pydantic: only when there is a recipe to read

    return Recipe.from_file(file)


def _base_pipeline_dir(recipe: "Recipe", resolve: "Resolver | None", tokenizer: str | Path | None = None) -> Path:
    from weightlab.loading import load, pipeline_dir
    from weightlab.merge import resolve_path

    return pipeline_dir(load((resolve or resolve_path)(recipe.base), kind="base"), tokenizer=tokenizer)


def merged_unet(source, *, dtype: "str | torch.dtype | None" = None, device: str | None = None,
                resolve: "Resolver | None" = None):
    """The merged ``UNetMotionModel`` (eval mode) of a recipe, a recipe file or a merged folder, and its recipe.

    This is the one place where weightlab's merge engine is called for video (:func:`weightlab.build_unet`).

    Args:
        source (Recipe | str | Path): a :class:`~weightlab.recipe.Recipe`, a recipe ``.yaml``/``.json`` file, or a folder
            written by :func:`weightlab.merge_to_folder` (whose ``recipe.json`` is returned when present).
        dtype (str | torch.dtype | None, default None): the model dtype; the recipe's (or float32) when None.
        device (str | None, default None): where to build the model; the recipe's (or cpu) when None.
        resolve (Resolver | None, default None): turns a recipe's sources into paths; None resolves paths only
            (registry references need :class:`weightlab.registry.resolve.LocalResolver`).
    Returns:
        tuple: ``(unet, recipe or None)``.
    """
    from diffusers import UNetMotionModel

    recipe = _recipe_of(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source)
        config = folder / "config.json"
        if not config.is_file() or json.loads(config.read_text()).get("_class_name") != "UNetMotionModel":
            raise RecipeError(f"{folder}: not a merged video model folder (config.json of a UNetMotionModel). Fix: pass "
                              "a recipe, or the folder `weightlab merge --out DIR` wrote for a recipe with a motion term.")
        unet = UNetMotionModel.from_pretrained(folder, torch_dtype=torch_dtype(dtype)).to(device or "cpu")
    elif recipe is not None:
        from weightlab.merge import build_unet, resolve_path

        recipe = recipe.model_copy(update={k: v for k, v in (("dtype", _dtype_name(dtype)), ("device", device)) if v})
        unet = build_unet(recipe, resolve=resolve or resolve_path)
    else:
        raise RecipeError(f"{source}: neither a recipe file ({', '.join(RECIPE_SUFFIXES)}) nor a merged model folder. "
                          "Fix: pass a recipe, or the folder written by `weightlab merge --out DIR`.")
    if type(unet).__name__ != "UNetMotionModel":
        raise RecipeError("the recipe has no motion term, so it merges an image UNet, not a video model. "
                          "Fix: add a motion module term (kind: motion, scale 1.0).")
    return unet.eval().requires_grad_(False), recipe


def load_unet(source, *, pipeline_dir: str | Path | None = None, dtype: "str | torch.dtype | None" = None,
              device: str | None = None, resolve: "Resolver | None" = None,
              tokenizer: str | Path | None = None) -> VideoUNet:
    """:func:`merged_unet` plus the diffusers pipeline folder that provides ``text_encoder/``, ``tokenizer/``,
    ``vae/`` and ``scheduler/``: ``pipeline_dir`` when given, else the recipe base's folder (a single-file base's is
    built from the file, with ``tokenizer`` or the family's cached one: `weightlab.loading.pipeline_dir`). The
    recipe's residuals are checked against the sampler's noise schedule first (:func:`check_schedules`)."""
    recipe = _recipe_of(source)
    folder = Path(pipeline_dir) if pipeline_dir else (_base_pipeline_dir(recipe, resolve, tokenizer) if recipe else None)
    if folder is not None and (folder / "text_encoder_2").is_dir():
        raise SamplingError(f"{folder}: an SDXL pipeline (two text encoders); weightlab samples and exports SD1.x/SD2 "
                            "AnimateDiff pipelines only. Fix: `weightlab merge --recipe R --out DIR` and load DIR's UNet "
                            "into diffusers' AnimateDiffSDXLPipeline.")
    if recipe is not None and folder is not None:
        check_schedules(recipe, _scheduler_config(folder), resolve=resolve)
    unet, recipe = merged_unet(source, dtype=dtype, device=device, resolve=resolve)
    if folder is None or not all((folder / sub).is_dir() for sub in ("text_encoder", "tokenizer", "vae")):
        raise WeightlabError(f"no pipeline folder with text_encoder/, tokenizer/ and vae/ for {source!s} (found {folder}). "
                             "Fix: use a diffusers pipeline folder as the recipe's base, or pass pipeline_dir=.")
    return VideoUNet(unet, folder, recipe)


def merged_component(source, name: str, *, dtype: "torch.dtype", device: str, resolve: "Resolver | None" = None,
                     tokenizer: str | Path | None = None):
    """The pipeline component ``name`` (``text_encoder``, ``vae``, ...) with the recipe's residuals of it composed in,
    in ``dtype`` on ``device``: a merged folder's ``<name>/`` (:func:`weightlab.merge_to_folder`), or a recipe's
    composed in memory (:func:`weightlab.merge.build_component`); None when no term changes it."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source) / name
        if not folder.is_dir():
            return None
        from weightlab.formats.components import COMPONENTS

        model = COMPONENTS[name].model_type().from_pretrained(folder, torch_dtype=dtype)
        return model.to(device).eval().requires_grad_(False)
    recipe = _recipe_of(source)
    if recipe is None:
        return None
    from weightlab.merge import build_component, resolve_path

    return build_component(recipe, name, dtype=dtype, device=device, resolve=resolve or resolve_path,
                           tokenizer=tokenizer)


def vae_dtype(vae_dir: str | Path, dtype: "torch.dtype") -> "torch.dtype":
    """The VAE runs in float32 when its config says ``force_upcast`` (SD1.5's overflows in fp16), else in ``dtype``."""
    import torch

    config = json.loads((Path(vae_dir) / "config.json").read_text())
    return torch.float32 if config.get("force_upcast", False) else dtype


def build_pipeline(unet, pipeline_dir: str | Path, *, device: str | None = None, text_encoder=None, vae=None):
    """An ``AnimateDiffPipeline``: merged ``unet`` + ``text_encoder`` (default: the folder's, in the UNet's dtype) +
    the folder's tokenizer, ``vae`` (default: the folder's, see :func:`vae_dtype`) + :func:`animatelcm_scheduler`."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(pipeline_dir)
    dtype = unet.dtype
    device = device or str(unet.device)
    scheduler = animatelcm_scheduler(_scheduler_config(folder))
    pipe = AnimateDiffPipeline(
        vae=vae or AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype(folder / "vae", dtype)),
        text_encoder=text_encoder or CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet, motion_adapter=None, scheduler=scheduler)
    return pipe.to(device)


class VideoPipeline:
    """PyTorch sampling with diffusers' ``AnimateDiffPipeline`` (see :func:`build_pipeline`).

    Args:
        pipe (AnimateDiffPipeline): an assembled pipeline whose scheduler is an ``LCMScheduler``; each call builds
            the requested sampler's scheduler from its config (:func:`weightlab.schedules.make_scheduler`).
    Example:
        >>> clip = VideoPipeline.from_source(merged_dir)("a cat", frames=16, steps=4, seed=0)   # doctest: +SKIP
    """

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def from_source(cls, source, *, pipeline_dir: str | Path | None = None, dtype: "str | torch.dtype | None" = None,
                    device: str | None = None, resolve: "Resolver | None" = None,
                    tokenizer: str | Path | None = None) -> "VideoPipeline":
        """Assemble from a recipe, recipe file or merged folder (see :func:`load_unet`); the recipe's text-encoder and
        VAE residuals are composed into the base's (:func:`merged_component`)."""
        unet, folder, _ = load_unet(source, pipeline_dir=pipeline_dir, dtype=dtype, device=device, resolve=resolve,
                                    tokenizer=tokenizer)
        merged = {name: merged_component(source, name, dtype=d, device=str(unet.device), resolve=resolve,
                                         tokenizer=tokenizer)
                  for name, d in (("text_encoder", unet.dtype), ("vae", vae_dtype(folder / "vae", unet.dtype)))}
        return cls(build_pipeline(unet, folder, device=device, **merged))

    @property
    def device(self):
        return self.pipe.unet.device

    def __call__(self, prompt: str, *, frames: int = DEFAULT_FRAMES, steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, seed: int = 0, height: int | None = None, width: int | None = None,
                 negative_prompt: str | None = None, progress: bool = True, sampler: str = DEFAULT_SAMPLER,
                 noise: NoisePrior | None = None) -> Clip:
        """Sample one clip.

        Args:
            prompt (str): the text prompt.
            frames (int, default 16): 1 to the motion module's limit (32 for AnimateDiff/AnimateLCM modules).
            steps (int, default 4): sampler steps.
            guidance (float, default 1.0): 1.0 disables CFG; the lcm sampler allows up to 2.0, ddim/dpmpp any value.
            seed (int, default 0): seeds the initial noise and every LCM step's noise.
            height, width (int | None, default None): pixels; the UNet's ``sample_size`` x VAE factor when None.
            negative_prompt (str | None, default None): used only with guidance > 1.
            progress (bool, default True): show a progress bar over the steps.
            sampler (str, default "lcm"): ``lcm`` (AnimateLCM's LCMScheduler), ``ddim`` or ``dpmpp`` (DPM-Solver++ 2M),
                all under the same linear schedule (:data:`weightlab.schedules.SAMPLERS`).
            noise (NoisePrior | None, default None): how the noise is drawn across frames (shared, moving); None is
                i.i.d., as diffusers draws it (:mod:`weightlab.noise_prior`).
        Returns:
            Clip: frames in [0, 1], final latents and timings.
        """
        import torch

        pipe = self.pipe
        factor = pipe.vae_scale_factor
        height = height or pipe.unet.config.sample_size * factor
        width = width or pipe.unet.config.sample_size * factor
        check_request(sampler=sampler, frames=frames, steps=steps, guidance=guidance, height=height, width=width,
                      max_frames=pipe.unet.config.motion_max_seq_length, scheduler_config=pipe.scheduler.config,
                      multiple=8 * factor)
        pipe.set_progress_bar_config(disable=not progress, desc="denoise")
        device = self.device
        cfg = guidance > 1.0
        lcm = pipe.scheduler
        with torch.inference_mode():
            t0 = time.perf_counter()
            cond, uncond = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt)
            sync(device)
            t1 = time.perf_counter()
            # this call's sampler: a baseline one under the LCM scheduler's schedule, and per-step noise from the prior
            prior = noise or NoisePrior()
            generator = torch.Generator(device).manual_seed(seed)
            shape = (1, pipe.unet.config.in_channels, frames, height // factor, width // factor)
            start = None if prior.iid else prior.sample(shape, generator, device, pipe.unet.dtype)
            try:
                pipe.scheduler = with_prior(lcm if sampler == "lcm" else make_scheduler(
                    sampler, lcm.config, NoiseSchedule.from_config(lcm.config)), prior)
                latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=frames, height=height,
                               width=width, num_inference_steps=steps, guidance_scale=guidance, latents=start,
                               generator=generator, output_type="latent").frames
            finally:
                pipe.scheduler = lcm
            sync(device)
            t2 = time.perf_counter()
            video = postprocess(pipe.decode_latents(latents.to(pipe.vae.dtype), DECODE_CHUNK))
            t3 = time.perf_counter()
        return Clip(video=video, latents=latents, seconds={"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2,
                                                           "total": t3 - t0})


def write_video(frames: "np.ndarray", path: str | Path, *, fps: int = DEFAULT_FPS) -> Path:
    """Write ``(F, H, W, 3)`` uint8 frames as H.264 MP4 (``.mp4``, ffmpeg from ``imageio-ffmpeg``) or looping GIF (``.gif``)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimwrite(path, list(frames), format="GIF", duration=1000 / fps, loop=0)
    elif path.suffix == ".mp4":
        # yuv420p needs even sizes; frames are multiples of 8 (latents x VAE factor), so nothing is resized.
        with imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=8, ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
    else:
        raise WeightlabError(f"{path}: unknown video format {path.suffix!r}. Fix: end the path in .mp4 or .gif.")
    return path


def frame_strip(frames: "np.ndarray", *, every: int = 1, scale: int = 1):
    """Frames ``(F, H, W, 3)`` uint8 side by side (every ``every``-th), each pixel a ``scale``×``scale`` block: a
    ``PIL.Image``."""
    import numpy as np
    from PIL import Image

    strip = np.concatenate(list(frames[::every]), axis=1)
    return Image.fromarray(strip.repeat(scale, axis=0).repeat(scale, axis=1))


def generate(source, prompt: str, out: str | Path, *, onnx_dir: str | Path | None = None, provider: str = "auto",
             gif: bool = True, fps: int = DEFAULT_FPS, device: str | None = None, resolve: "Resolver | None" = None,
             tokenizer: str | Path | None = None, **sampling) -> dict:
    """Sample a clip and write ``out`` (MP4) and, with ``gif``, the same clip as ``out`` with ``.gif``.

    Args:
        source (Recipe | str | Path | None): recipe, recipe file or merged folder; may be None with ``onnx_dir``.
        prompt (str): the text prompt.
        out (str | Path): the ``.mp4`` path.
        onnx_dir (str | Path | None, default None): sample with ONNX Runtime from this export instead of PyTorch.
            With a ``source`` too, the export must have been made (or re-weighted) from the same recipe.
        provider (str, default "auto"): ONNX Runtime provider: ``auto`` | ``cuda`` | ``tensorrt`` | ``cpu``.
        gif (bool, default True): also write a GIF next to the MP4.
        fps (int, default 8): frames per second of the written files.
        device (str | None, default None): PyTorch device (ONNX: chosen from the available providers).
        resolve (Resolver | None, default None): turns the recipe's sources into paths (see :func:`merged_unet`).
        tokenizer (str | Path | None, default None): tokenizer folder for a single-file base (see :func:`load_unet`).
        **sampling: ``frames``, ``steps``, ``guidance``, ``seed``, ``height``, ``width``, ``negative_prompt``, ``progress``,
            ``sampler``, ``noise``.
    Returns:
        dict: ``{"mp4", "gif", "seconds", "frames", "size", "backend"}``.
    """
    out = Path(out)
    if out.suffix != ".mp4":
        raise WeightlabError(f"{out}: --out must end in .mp4 (the GIF is written next to it).")
    if onnx_dir is not None:
        from weightlab.onnx_runtime import OnnxVideoPipeline

        pipe = OnnxVideoPipeline(onnx_dir, provider=provider)
        if source is not None:
            pipe.check_recipe(_recipe_of(source))
        backend = f"onnxruntime ({pipe.provider})"
    elif source is None:
        raise WeightlabError("nothing to sample from. Fix: pass a recipe/merged folder, or --onnx DIR.")
    else:
        pipe = VideoPipeline.from_source(source, device=device, resolve=resolve, tokenizer=tokenizer)
        backend = f"pytorch ({pipe.device})"
    clip = pipe(prompt, **sampling)
    frames = clip.frames
    result = {"mp4": str(write_video(frames, out, fps=fps)), "gif": None, "seconds": clip.seconds,
              "frames": int(frames.shape[0]), "size": (int(frames.shape[1]), int(frames.shape[2])), "backend": backend}
    if gif:
        result["gif"] = str(write_video(frames, out.with_suffix(".gif"), fps=fps))
    return result
