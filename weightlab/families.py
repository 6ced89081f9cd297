"""Architecture families, identified by structure: the set of parameter names and each one's rank (ndim).

Shapes are not part of the signature, so a scaled-down model with the same block layout (the tiny test
family) is still ``sd15``; shapes are checked against the actual base at merge time. The full-size
configs below are the real ones; models are built on the ``meta`` device (no memory) to read the structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from weightlab.errors import FamilyMismatchError, UnmatchedKeysError, fmt_keys

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
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def _meta_state_shapes(build) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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

    def is_motion_key(self, key: str) -> bool:
        return ".motion_modules." in key


SD15 = Family("sd15", SD15_UNET_CONFIG, SD15_MOTION_CONFIG, "Stable Diffusion 1.x UNet (+ AnimateDiff motion modules)")
SDXL = Family("sdxl", SDXL_UNET_CONFIG, None, "Stable Diffusion XL UNet (detected only, not mergeable yet)")
FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, SDXL)}
MERGEABLE = ("sd15",)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FamilyMismatchError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}.") from None


def _fits(keys_ndim: dict[str, int], family: Family) -> list[str]:
    sig = family.signature
    return [k for k, n in keys_ndim.items() if sig.get(k) != n]


def detect_family(keys_ndim: dict[str, int], *, what: str = "residual") -> Family:
    """Return the family whose structure holds every given parameter (name -> ndim).

    Raises:
        FamilyMismatchError: naming the keys that fit no mergeable family (and the family they do fit, if any).
    """
    bad = _fits(keys_ndim, SD15)
    if not bad:
        return SD15
    for fam in FAMILIES.values():
        if fam is not SD15 and not _fits(keys_ndim, fam):
            raise FamilyMismatchError(
                f"{what} belongs to family {fam.name!r} ({fam.description}); weightlab merges "
                f"{', '.join(MERGEABLE)}. Keys that do not exist in sd15: {fmt_keys(bad)}. "
                "Fix: use a residual made for an sd15 base.")
    raise FamilyMismatchError(
        f"{what}: {len(bad)} parameter(s) do not exist (with that rank) in any known family: {fmt_keys(bad)}. "
        "Fix: check that the file is an SD1.5 UNet, LoRA or motion module, or pass strict=False to report and skip them.")


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
