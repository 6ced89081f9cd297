"""A tiny SD1.5-shaped model family built in code, deterministic by seed, written in real on-disk layouts.

Used by the test suite and ``make demo``; nothing is downloaded. The UNet keeps SD1.5's exact block
layout (so family detection says ``sd15``) at a fraction of the width. :func:`build_tiny_variant` writes
tiny pipelines of the other UNet configs weightlab merges: SD2.x-, SDXL- and distilled-SD1.5-shaped.

Example:
    >>> fam = build_tiny_family("/tmp/tiny")      # doctest: +SKIP
    >>> fam.style_lora_kohya                      # doctest: +SKIP
    PosixPath('/tmp/tiny/style_lora_kohya.safetensors')
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from weightlab.families import SD15

TINY_UNET_CONFIG = dict(
    SD15.unet_config, sample_size=16, block_out_channels=(16, 32, 64, 64), cross_attention_dim=32,
    norm_num_groups=16,
)
TINY_MOTION_CONFIG = dict(
    SD15.motion_config, block_out_channels=(16, 32, 64, 64), motion_norm_num_groups=16,
)
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=32,
)
# AnimateLCM's own scheduler config (DESIGN.md "Video assembly").
ANIMATELCM_SCHEDULER = dict(
    beta_schedule="linear", beta_start=0.00085, beta_end=0.012, original_inference_steps=100, steps_offset=1,
    num_train_timesteps=1000, clip_sample=False,
)
STYLE_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "proj_in", "conv1", "conv2")
# LCM-LoRA target module names (DESIGN.md "Trainers").
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
MOTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
VERSION = "1"
# Tiny UNets of other configs, each keeping its model's structure at 1/20 the width (DESIGN.md "Family").
# SD2.x: linear attention projections, wider cross-attention than SD1.5 (1024 vs 768), 64-channel heads
# (attention_head_dim is diffusers' per-block head count: SD2's (5, 10, 20, 20) = widths / 64; here / 8).
TINY_SD2_UNET_CONFIG = dict(TINY_UNET_CONFIG, cross_attention_dim=48, attention_head_dim=(2, 4, 8, 8),
                            use_linear_projection=True)
# SDXL: three blocks (the first without attention), transformer depth per block, cross-attention over both text
# encoders' hidden states (32 + 32, as 768 + 1280), text_time embedding of text_encoder_2's pooled projection (32)
# plus six time ids (6 x 8): projection_class_embeddings_input_dim = 48 + 32, as 6 x 256 + 1280 = 2816.
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
    attention_head_dim=(2, 4, 8), transformer_layers_per_block=[1, 2, 3], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    norm_num_groups=16,
)
# Distilled SD1.5 as BK-SDM-Small ships it: one layer per down block (two per up block), no mid block.
TINY_DISTILLED_UNET_CONFIG = dict(TINY_UNET_CONFIG, layers_per_block=1, mid_block_type=None)
# The schedulers the real models ship: SD2.x-768 is v-prediction (its DDIM config), SDXL and SD1.5 epsilon.
SD2_SCHEDULER = dict(
    _class_name="DDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
)
SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
)
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True, prediction_type="epsilon",
)
# variant -> (UNet config, scheduler config, text encoders' hidden sizes, family weightlab must name it)
TINY_VARIANTS = {
    "sd2": (TINY_SD2_UNET_CONFIG, SD2_SCHEDULER, (48,), "sd2"),
    "sdxl": (TINY_SDXL_UNET_CONFIG, SDXL_SCHEDULER, (32, 32), "sdxl"),
    "distilled": (TINY_DISTILLED_UNET_CONFIG, SD15_SCHEDULER, (32,), "sd15"),
}
# Token ids of the tiny vocab: 256 bytes, 256 bytes + "</w>", 10 merges, then the two specials.
BOS_ID, EOS_ID = 522, 523


@dataclass(frozen=True)
class TinyFamily:
    """Paths of every file of the tiny family."""

    root: Path
    base_dir: Path  # diffusers pipeline folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/)
    base_ldm: Path  # single-file LDM checkpoint (model.diffusion_model.*)
    style_lora_peft: Path
    style_lora_kohya: Path
    accel_lora: Path  # kohya keys, LCM-LoRA targets, rank 12 (not a multiple of 16)
    style_dense: Path  # full fine-tune of the base, LDM layout
    motion_dir: Path  # diffusers MotionAdapter folder
    motion_animatediff: Path  # original AnimateDiff keys, with pos_encoder tables
    motion_animatelcm: Path  # original keys without pos_encoder (as AnimateLCM ships)
    motion_lora: Path  # PEFT keys over motion-module attention

    def files(self) -> dict[str, Path]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "root"}


def tiny_family_paths(root: str | Path) -> TinyFamily:
    root = Path(root)
    return TinyFamily(
        root=root, base_dir=root / "base", base_ldm=root / "base_ldm.safetensors",
        style_lora_peft=root / "style_lora_peft.safetensors", style_lora_kohya=root / "style_lora_kohya.safetensors",
        accel_lora=root / "accel_lcm_lora.safetensors", style_dense=root / "style_dense.safetensors",
        motion_dir=root / "motion_adapter", motion_animatediff=root / "motion_animatediff.safetensors",
        motion_animatelcm=root / "motion_animatelcm.safetensors", motion_lora=root / "motion_lora.safetensors",
    )


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _randomize(module, seed: int, std: float = 0.05) -> None:
    """Deterministic weights for every parameter (so zero-initialised branches such as proj_out are live)."""
    import torch

    g = _gen(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("norm.weight") or ".norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g) if p.dim() > 1 else 0.02 * torch.randn(p.shape, generator=g))


def build_tokenizer(folder: Path):
    """A CLIPTokenizer from a byte-level vocab and a few merges written here (no hub)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>"),
              ("i", "n"), ("in", "g</w>"), ("o", "n</w>"), ("s", "t")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert vocab.index("<|startoftext|>") == BOS_ID and vocab.index("<|endoftext|>") == EOS_ID
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: the 256 printable stand-ins for bytes, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_base_components(seed: int = 0):
    """Tiny UNet2DConditionModel, CLIPTextModel, AutoencoderKL and LCMScheduler, deterministic by seed."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    _randomize(unet, seed)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    scheduler = LCMScheduler(**ANIMATELCM_SCHEDULER)
    return unet, text_encoder, vae, scheduler


def build_motion_adapter(seed: int = 0):
    from diffusers import MotionAdapter

    adapter = MotionAdapter(**TINY_MOTION_CONFIG)
    _randomize(adapter, seed + 10, std=0.1)
    return adapter


def _lora_pair(out_f: int, in_f: int, rank: int, conv_kernel: tuple[int, int] | None, g):
    import torch

    if conv_kernel is None:
        return 0.3 * torch.randn(rank, in_f, generator=g), 0.3 * torch.randn(out_f, rank, generator=g)
    kh, kw = conv_kernel
    return 0.3 * torch.randn(rank, in_f, kh, kw, generator=g), 0.3 * torch.randn(out_f, rank, 1, 1, generator=g)


def make_lora(model, targets, rank: int, seed: int, *, prefix_filter=lambda n: True):
    """Random LoRA factors for every module of ``model`` whose path ends with one of ``targets``.

    Returns ``{module_path: (down, up)}`` with down ``[r, in(, kh, kw)]`` and up ``[out, r(, 1, 1)]``.
    """
    import torch

    g = _gen(seed)
    out = {}
    for name, mod in sorted(model.named_modules()):
        if not prefix_filter(name) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(mod, torch.nn.Linear):
            out[name] = _lora_pair(mod.out_features, mod.in_features, rank, None, g)
        elif isinstance(mod, torch.nn.Conv2d):
            out[name] = _lora_pair(mod.out_channels, mod.in_channels, rank, tuple(mod.kernel_size), g)
    return out


def lora_to_peft(factors, *, prefix: str = "unet.", scale: float = 1.0) -> dict:
    """diffusers/PEFT keys: ``unet.<path>.lora_A.weight`` (down), ``lora_B.weight`` (up, times ``scale``)."""
    sd = {}
    for path, (down, up) in factors.items():
        sd[f"{prefix}{path}.lora_A.weight"] = down.contiguous()
        sd[f"{prefix}{path}.lora_B.weight"] = (up * scale).contiguous()
    return sd


def lora_to_kohya(factors, alpha: float, *, prefix: str = "lora_unet_") -> dict:
    """kohya/A1111 keys: ``lora_unet_<path_with_underscores>.lora_down.weight``/``.lora_up.weight``/``.alpha``
    (a text encoder's, from transformers 5 module paths: ``prefix="lora_te_text_model_"``)."""
    import torch

    sd = {}
    for path, (down, up) in factors.items():
        k = prefix + path.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = down.contiguous()
        sd[f"{k}.lora_up.weight"] = up.contiguous()
        sd[f"{k}.alpha"] = torch.tensor(float(alpha))
    return sd


def with_peft_lora(model, targets, seed: int, **options):
    """A copy of ``model`` with PEFT LoRA layers on ``targets`` (``inject_adapter_in_model``, what diffusers'
    ``add_adapter`` does; ``options``: ``LoraConfig``'s, e.g. ``r``, ``lora_alpha``, ``alpha_pattern``) with random A
    and B (so every delta is live), and its ``LoraConfig``."""
    import copy

    import torch
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(target_modules=list(targets), init_lora_weights=False, **options)
    torch.manual_seed(seed)
    return inject_adapter_in_model(config, copy.deepcopy(model)), config


# kohya's prefix per pipeline component (SDXL files name the first text encoder ``lora_te1_``).
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def diffusers_lora_to_kohya(state_dict: dict, alpha, *, prefixes: dict[str, str] = KOHYA_PREFIXES) -> dict:
    """A ``save_lora_weights`` file's tensors (``<component>.<module>.lora_A/B.weight``) under kohya's names
    (``lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight``), with ``.alpha`` keys from
    ``alpha(component, module)``."""
    import torch

    out = {}
    for key, v in state_dict.items():
        component, rest = key.split(".", 1)
        module, role = rest.rsplit(".lora_", 1)
        name = module if component == "unet" else "text_model." + module.removeprefix("text_model.")
        name = prefixes[component] + name.replace(".", "_")
        out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = v
        out[f"{name}.alpha"] = torch.tensor(float(alpha(component, module)))
    return out


def max_rel_error(ref: dict, ours: dict) -> float:
    """Worst over keys of ``max|ref − ours| / max|ref|``, in float64: an error relative to each weight's scale."""
    assert set(ref) == set(ours), f"different keys: {sorted(set(ref) ^ set(ours))[:5]}"
    return max((ref[k].double() - ours[k].double()).abs().max().item() / max(ref[k].double().abs().max().item(), 1e-12)
               for k in ref)


def build_tiny_family(root: str | Path, seed: int = 0, *, force: bool = False) -> TinyFamily:
    """Write the whole tiny family under ``root`` (skipped if already built with the same seed).

    Args:
        root (str | Path): output folder.
        seed (int, default 0): every tensor is a function of this seed.
        force (bool, default False): rebuild even if a matching build exists.
    Returns:
        TinyFamily: the paths.
    """
    fam = tiny_family_paths(root)
    stamp = fam.root / "tiny_family.json"
    want = {"seed": seed, "version": VERSION}
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == want and all(p.exists() for p in fam.files().values()):
        return fam  # before the imports below: importing the diffusers pipelines alone takes seconds

    import torch
    from diffusers import StableDiffusionPipeline

    from weightlab.files import save_tensors
    from weightlab.formats.ldm import diffusers_to_ldm
    from weightlab.formats.motion import to_original_names

    fam.root.mkdir(parents=True, exist_ok=True)

    unet, text_encoder, vae, scheduler = build_base_components(seed)
    tokenizer = build_tokenizer(fam.root / ".tokenizer_src")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(fam.base_dir)
    base_sd = unet.state_dict()
    save_tensors(diffusers_to_ldm(base_sd), fam.base_ldm)

    style = make_lora(unet, STYLE_TARGETS, rank=4, seed=seed + 100)
    save_tensors(lora_to_peft(style, scale=0.5), fam.style_lora_peft)  # alpha/rank = 2/4 folded into B
    save_tensors(lora_to_kohya(style, alpha=2.0), fam.style_lora_kohya)

    accel = make_lora(unet, LCM_LORA_TARGETS, rank=12, seed=seed + 200)
    save_tensors(lora_to_kohya(accel, alpha=6.0), fam.accel_lora)

    g = _gen(seed + 300)
    dense = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
    save_tensors(diffusers_to_ldm(dense), fam.style_dense)

    adapter = build_motion_adapter(seed)
    adapter.save_pretrained(fam.motion_dir)
    msd = adapter.state_dict()
    save_tensors(to_original_names(msd, with_pos_encoder=True), fam.motion_animatediff)
    save_tensors(to_original_names(msd, with_pos_encoder=False), fam.motion_animatelcm)

    mlora = make_lora(adapter, MOTION_LORA_TARGETS, rank=4, seed=seed + 400)
    save_tensors(lora_to_peft(mlora), fam.motion_lora)

    stamp.write_text(json.dumps(want))
    return fam


def _tiny_clip(hidden: int, seed: int, *, with_projection: bool = False):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=hidden, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID))


def build_tiny_variant(name: str, root: str | Path, seed: int = 0) -> Path:
    """Write the tiny ``name`` pipeline (a key of :data:`TINY_VARIANTS`) as a diffusers folder ``root/name``.

    Args:
        name (str): ``sd2`` (v-prediction scheduler), ``sdxl`` (two text encoders) or ``distilled``.
        root (str | Path): parent folder; a folder already built with the same seed is reused.
        seed (int, default 0): every tensor is a function of this seed.
    Returns:
        Path: the pipeline folder (``unet/``, ``scheduler/``, text encoder(s), tokenizer(s), ``vae/``).
    """
    unet_config, scheduler_config, hidden, _ = TINY_VARIANTS[name]
    folder = Path(root) / name
    stamp, want = folder / "tiny_variant.json", {"name": name, "seed": seed, "version": VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder

    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_config)
    _randomize(unet, seed + 1000)
    torch.manual_seed(seed + 1002)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    scheduler_cls = getattr(diffusers, scheduler_config["_class_name"])
    scheduler = scheduler_cls(**{k: v for k, v in scheduler_config.items() if not k.startswith("_")})
    tokenizer = build_tokenizer(Path(root) / ".tokenizer_src")
    encoders = [_tiny_clip(h, seed + 1001 + i, with_projection=i == 1) for i, h in enumerate(hidden)]
    if name == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)
    stamp.write_text(json.dumps(want))
    return folder


def build_onnx_stub(folder: str | Path) -> Path:
    """A minimal ONNX export folder for registry tests (seconds, not the minute a real export of the tiny family
    takes): ``manifest.json`` and ``unet/model.onnx`` + ``model.onnx.data``, one Conv whose weight is named like
    the SD1.5 UNet's ``conv_in.weight``. It passes the registry's checks; it is not a model to sample with.
    """
    import hashlib

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from weightlab.onnx_manifest import Graph, OnnxManifest, Pipeline

    unet = Path(folder) / "unet"
    unet.mkdir(parents=True, exist_ok=True)
    weight = numpy_helper.from_array(np.arange(4 * 4 * 3 * 3, dtype=np.float32).reshape(4, 4, 3, 3) / 100,
                                     "conv_in.weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["sample", "conv_in.weight"], ["noise_pred"], pads=[1, 1, 1, 1])], "unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", 4, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(unet / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    data = (unet / "model.onnx.data").stat().st_size
    entry = Graph(graph="unet/model.onnx", data="unet/model.onnx.data",
                  graph_sha256=hashlib.sha256((unet / "model.onnx").read_bytes()).hexdigest(),
                  bytes={"graph": (unet / "model.onnx").stat().st_size, "data": data}, opset=18,
                  inputs={"sample": ["batch", 4, 8, 8]}, outputs={"noise_pred": ["batch", 4, 8, 8]},
                  dynamic={"sample": {"0": "batch"}}, notes="a registry test stub, not a model",
                  initializers={"conv_in.weight": {"offset": 0, "length": data, "dtype": "float32", "shape": [4, 4, 3, 3]}},
                  constants=[], unused=[], export_seconds=0.0)
    # The pipeline sizes are those of the stub's one graph (4 latent channels, 8x8 latents); nothing samples with it.
    pipeline = Pipeline(latent_channels=4, sample_size=8, max_frames=1, text_max_length=1, text_hidden_size=1,
                        vae_scaling_factor=1.0, vae_scale_factor=1, vae_out_channels=3, vae_dtype="float32")
    OnnxManifest(dtype="float32", opset=18, created="2026-01-01T00:00:00+00:00", versions={}, weights_sha256="0" * 64,
                 pipeline=pipeline, models={"unet": entry}).write(folder)
    return Path(folder)
