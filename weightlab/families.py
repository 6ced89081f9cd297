"""Architecture families, identified by structure: the set of parameter names and each one's rank (ndim).

Families name things and refuse a residual made for another architecture; they are not what a merge checks
against (that is the base's own config, `unet_shapes_for`). Shapes are not part of the signature, so a
scaled-down model with the same block layout (the tiny test models) or a distilled one with fewer layers (a subset
of the names) is still in its family. The full-size configs below are the real ones; models are built on the
``meta`` device (no memory) to read the structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from weightlab.errors import FamilyMismatchError, FileFormatError, UnmatchedKeysError, fmt_keys

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_MOTION_CONFIG = dict(
    block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_num_attention_heads=8,
    motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True,
)
SD2_UNET_CONFIG = dict(
    SD15_UNET_CONFIG, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# AnimateDiff-SDXL (guoyww/animatediff-motion-adapter-sdxl-beta): three blocks, no mid-block motion module.
SDXL_MOTION_CONFIG = dict(
    block_out_channels=(320, 640, 1280), motion_layers_per_block=2, motion_num_attention_heads=8,
    motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False,
)


def _meta_state_shapes(build) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def is_motion_key(key: str) -> bool:
    """Whether a parameter (diffusers ``UNetMotionModel`` name) belongs to a motion module."""
    return ".motion_modules." in key


def is_motion_unet_config(config: dict) -> bool:
    """A ``UNetMotionModel`` config (a spatial UNet's has no motion options)."""
    return "motion_max_seq_length" in config


def unet_shapes_for(config: dict, *, motion_config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the diffusers UNet a config describes: a ``UNetMotionModel`` config gives the
    ``UNetMotionModel``; ``motion_config`` (a ``MotionAdapter``'s) adds its motion modules to a spatial UNet.

    Raises:
        FileFormatError: diffusers cannot build a UNet from the config (its message is quoted).
    """
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    cls = UNetMotionModel if is_motion_unet_config(config) else UNet2DConditionModel
    try:
        shapes = _meta_state_shapes(lambda: cls.from_config(config))
        if motion_config is not None:
            shapes.update(_meta_state_shapes(lambda: MotionAdapter(**motion_config)))
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise FileFormatError(f"the UNet config is not one diffusers' {cls.__name__} can build ({e}). "
                                  "Fix: pass the config.json saved with the weights.") from None
    return shapes


@dataclass(frozen=True)
class Family:
    """An architecture family: full-size configs plus the structural signature derived from them."""

    name: str
    unet_config: dict
    motion_config: dict | None = None
    description: str = field(default="", compare=False)

    @cached_property
    def unet_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full-size parameter shapes of the spatial UNet (diffusers names)."""
        from diffusers import UNet2DConditionModel

        return _meta_state_shapes(lambda: UNet2DConditionModel(**self.unet_config))

    @cached_property
    def motion_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full-size parameter shapes of the motion module (diffusers MotionAdapter names)."""
        if self.motion_config is None:
            return {}
        from diffusers import MotionAdapter

        return _meta_state_shapes(lambda: MotionAdapter(**self.motion_config))

    @cached_property
    def signature(self) -> dict[str, int]:
        """Parameter name -> ndim over the spatial UNet and the motion module (UNetMotionModel names)."""
        sig = {k: len(s) for k, s in self.unet_shapes.items()}
        sig.update({k: len(s) for k, s in self.motion_shapes.items()})
        return sig

    @cached_property
    def weight_modules(self) -> dict[str, int]:
        """Module path -> ndim of its ``.weight``, for modules a LoRA can target (linear: 2, conv: 4)."""
        return {k[: -len(".weight")]: n for k, n in self.signature.items() if k.endswith(".weight") and n in (2, 4)}

    @cached_property
    def kohya_names(self) -> dict[str, str]:
        """kohya/A1111 flattened module name (``down_blocks_0_..._to_q``) -> module path."""
        return {p.replace(".", "_"): p for p in self.weight_modules}


SD15 = Family("sd15", SD15_UNET_CONFIG, SD15_MOTION_CONFIG, "Stable Diffusion 1.x UNet (+ AnimateDiff motion modules)")
SD2 = Family("sd2", SD2_UNET_CONFIG, None, "Stable Diffusion 2.x UNet (linear attention projections)")
SDXL = Family("sdxl", SDXL_UNET_CONFIG, SDXL_MOTION_CONFIG,
              "Stable Diffusion XL UNet (two text encoders, text_time embedding; + AnimateDiff-SDXL motion modules)")
FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, SD2, SDXL)}  # detection order: first fit wins


def _fits(keys_ndim: dict[str, int], family: Family) -> list[str]:
    sig = family.signature
    return [k for k, n in keys_ndim.items() if sig.get(k) != n]


def best_family(keys_ndim: dict[str, int]) -> tuple[Family, list[str]]:
    """The first family (sd15, sd2, sdxl) with the fewest parameters it lacks (name -> ndim), and those."""
    best = None
    for fam in FAMILIES.values():
        bad = _fits(keys_ndim, fam)
        if best is None or len(bad) < len(best[1]):
            best = fam, bad
        if not bad:
            break
    return best


def detect_family(keys_ndim: dict[str, int], *, what: str = "residual") -> Family:
    """Return the first family (sd15, sd2, sdxl) whose structure holds every given parameter (name -> ndim).

    Raises:
        FamilyMismatchError: naming the keys that fit no known family.
    """
    fam, bad = best_family(keys_ndim)
    if bad:
        raise FamilyMismatchError(
            f"{what}: {len(bad)} parameter(s) do not exist (with that rank) in any known family "
            f"({', '.join(FAMILIES)}): {fmt_keys(bad)}. Fix: check that the file is a Stable Diffusion UNet, LoRA "
            "or motion module, or pass strict=False to report and skip them.")
    return fam


def check_fits(keys_ndim: dict[str, int | None], residual_family: str, base_family: str, *,
               what: str = "residual") -> None:
    """Refuse a residual of another family than the base's, unless it fits the base's family too.

    A residual's family is the *first* (sd15, sd2, sdxl) whose structure holds it, so it may also fit a later
    one (an attention-only LoRA detected as sd15 fits sd2 as well: the shapes then decide), never an earlier
    one. ``keys_ndim``: parameter name -> rank (None: the rank is unknown, only the name is compared).

    Raises:
        FamilyMismatchError: naming both families and the keys the base's family lacks.
    """
    if residual_family == base_family:
        return
    order, base = list(FAMILIES), FAMILIES.get(base_family)
    foreign = sorted(k for k, n in keys_ndim.items()
                     if base is None or k not in base.signature or n not in (None, base.signature[k]))
    later = base is not None and residual_family in order and order.index(base_family) > order.index(residual_family)
    if later and not foreign:
        return
    made = FAMILIES[residual_family].description if residual_family in FAMILIES else "an unknown architecture"
    keys = f" Keys that do not exist (with that rank) in {base_family}: {fmt_keys(foreign)}." if foreign else ""
    raise FamilyMismatchError(
        f"{what} was made for family {residual_family!r} ({made}); the base is family {base_family!r}.{keys} "
        f"Fix: use a residual made for a {base_family} base, or a {residual_family} base for this residual.")


def infer_motion_config(shapes: dict[str, tuple[int, ...]], *, what: str = "motion module") -> dict:
    """Infer a MotionAdapter config from parameter shapes (diffusers names).

    Channel widths, layer counts, mid block and max frames come from the weights. Heads (8) follow
    AnimateDiff's SD1.5 modules; norm groups are ``gcd(32, smallest width)`` (32 for every real module).
    """
    downs = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("down_blocks.") and k.split(".")[1].isdigit()})
    if not downs:
        raise FamilyMismatchError(f"{what}: no `down_blocks.*.motion_modules.*` keys: this is not a motion module.")
    needed = [f"down_blocks.{i}.motion_modules.0.proj_in.weight" for i in downs]
    if missing := [k for k in needed if k not in shapes]:
        raise UnmatchedKeysError(
            f"{what} lacks {fmt_keys(missing)}, needed to infer its config. Fix: pass the complete module, "
            "or a diffusers MotionAdapter folder with its config.json.", missing)
    channels = tuple(shapes[k][0] for k in needed)
    layers = len({k.split(".")[3] for k in shapes if k.startswith("down_blocks.0.motion_modules.")})
    pe = [s for k, s in shapes.items() if k.endswith("pos_embed.pe")]
    return dict(
        block_out_channels=channels, motion_layers_per_block=layers, motion_num_attention_heads=8,
        motion_norm_num_groups=math.gcd(32, min(channels)), motion_max_seq_length=pe[0][1] if pe else 32,
        use_motion_mid_block=any(k.startswith("mid_block.") for k in shapes),
    )


def _count(shapes, prefix: str) -> int:
    """How many numbered children ``prefix.<i>.`` the names hold."""
    return len({k[len(prefix):].split(".")[1] for k in shapes if k.startswith(prefix + ".")})


def infer_unet_config(shapes: dict[str, tuple[int, ...]], *, what: str = "UNet") -> dict:
    """Infer a ``UNet2DConditionModel`` config from parameter shapes (diffusers names).

    From the weights: block count and widths, layers per block, which blocks attend, the mid block (or none),
    transformer layers per block, linear or 1x1-conv projections, cross-attention width, in/out channels and
    SDXL's ``text_time`` embedding. Not in the weights, so taken from the family's full-size config when it
    fits, else derived: attention heads (SD2/SDXL convention, 64 channels a head), ``sample_size``,
    ``addition_time_embed_dim``; norm groups are ``gcd(32, first width)`` (32 for every real model).
    Keys equal to diffusers' defaults are left out, so a real SD1.5 UNet gives exactly ``SD15_UNET_CONFIG``.
    """
    n = _count(shapes, "down_blocks")
    needed = ["conv_in.weight", "conv_out.weight"] + [f"down_blocks.{i}.resnets.0.conv2.weight" for i in range(max(n, 1))]
    if missing := [k for k in needed if k not in shapes]:
        raise UnmatchedKeysError(f"{what} lacks {fmt_keys(missing)}, needed to infer its config. Fix: pass the "
                                 "complete UNet, or a diffusers folder with its config.json.", missing)
    widths = tuple(shapes[f"down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(n))
    attends = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in shapes) for i in range(n)]
    up_attends = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in shapes) for i in range(n)]
    depth = tuple(max(1, _count(shapes, f"down_blocks.{i}.attentions.0.transformer_blocks")) for i in range(n))
    to_k = next((s for k, s in sorted(shapes.items()) if k.endswith("attn2.to_k.weight")), None)
    proj = next((s for k, s in sorted(shapes.items()) if k.endswith("attentions.0.proj_in.weight")), (0, 0, 1, 1))
    linear = len(proj) == 2
    text_time = "add_embedding.linear_1.weight" in shapes
    fam = FAMILIES["sdxl" if text_time else "sd2" if linear else "sd15"]
    heads = fam.unet_config["attention_head_dim"]
    per_block = (heads,) * n if isinstance(heads, int) else tuple(heads)
    if len(per_block) != n or any(c % h for c, h in zip(widths, per_block)):
        heads = tuple(max(1, c // 64) if c % max(1, c // 64) == 0 else 1 for c in widths)
    config = dict(
        sample_size=fam.unet_config["sample_size"], in_channels=shapes["conv_in.weight"][1],
        out_channels=shapes["conv_out.weight"][0], layers_per_block=_count(shapes, "down_blocks.0.resnets"),
        block_out_channels=widths,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attends),
        cross_attention_dim=to_k[1] if to_k else fam.unet_config["cross_attention_dim"], attention_head_dim=heads,
        norm_num_groups=math.gcd(32, shapes["conv_in.weight"][0]),
    )
    if not any(k.startswith("mid_block.") for k in shapes):
        config["mid_block_type"] = None
    elif not any(k.startswith("mid_block.attentions.") for k in shapes):
        config["mid_block_type"] = "UNetMidBlock2D"
    if linear:
        config["use_linear_projection"] = True
    if any(d != 1 for d in depth):
        config["transformer_layers_per_block"] = depth
    if text_time:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=fam.unet_config["addition_time_embed_dim"],
                      projection_class_embeddings_input_dim=shapes["add_embedding.linear_1.weight"][1])
    return config
