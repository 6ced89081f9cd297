"""Motion modules: diffusers ``MotionAdapter`` names and the original AnimateDiff/AnimateLCM layout.

The original layout (``temporal_transformer``, ``attention_blocks.{0,1}``, ``norms.{0,1}``, ``ff_norm``) is
converted with diffusers' own ``convert_animatediff_checkpoint_to_diffusers``. AnimateLCM ships without
``pos_encoder`` tables; the sinusoidal table is recomputed in code, so detection never depends on it. The expected
parameters come from the module's own config (given, or inferred from its weights), so SDXL's three-block modules
load like SD1.5's four-block ones; the family only names it (and refuses it on a base of another family at merge).
"""

from __future__ import annotations

import re

from weightlab.errors import FamilyMismatchError, FileFormatError, fmt_keys
from weightlab.families import FAMILIES, Family

ORIGINAL_MARKERS = (".temporal_transformer.", ".attention_blocks.", ".norms.", ".ff_norm.")


def is_original_layout(keys) -> bool:
    return any(m in k for k in keys for m in ORIGINAL_MARKERS)


def to_diffusers_names(state_dict: dict) -> dict:
    """Original AnimateDiff keys -> diffusers ``MotionAdapter`` keys (drops ``pos_encoder`` tables)."""
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    return convert_animatediff_checkpoint_to_diffusers(dict(state_dict))


def rename_path(path: str) -> str:
    """The same rename for a single module path (used for motion LoRA targets)."""
    out = to_diffusers_names({path + ".weight": None})
    return next(iter(out))[: -len(".weight")] if out else path


def adapter_shapes(config: dict, *, what: str = "motion module") -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the diffusers ``MotionAdapter`` a config describes (SD1.5's four blocks, SDXL's three...).

    Raises:
        FileFormatError: diffusers cannot build a MotionAdapter from the config (its message is quoted).
    """
    import torch
    from diffusers import MotionAdapter

    try:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in MotionAdapter(**config).state_dict().items()}
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise FileFormatError(f"{what}: its config is not one diffusers' MotionAdapter can build ({e}). "
                              "Fix: pass the config.json saved with the weights.") from None


def family_of(keys_ndim: dict[str, int], *, what: str = "motion module") -> Family:
    """The family whose full-size motion module holds every parameter (name and rank) and lacks the fewest:
    AnimateDiff-SDXL's three blocks are a subset of SD1.5's four by name, so the block count decides.

    Raises:
        FamilyMismatchError: naming the keys no family's motion module has.
    """
    best = None
    for fam in FAMILIES.values():
        sig = {k: len(s) for k, s in fam.motion_shapes.items()}
        foreign = [k for k, n in keys_ndim.items() if sig.get(k) != n]
        score = (len(foreign), len(sig.keys() - keys_ndim.keys()))
        if best is None or score < best[0]:
            best = score, fam, foreign
    if best[2]:
        raise FamilyMismatchError(
            f"{what}: {len(best[2])} parameter(s) are in no known family's motion module "
            f"({', '.join(f for f, fam in FAMILIES.items() if fam.motion_config)}): {fmt_keys(best[2])}. "
            "Fix: pass an AnimateDiff motion module (or strict=False to report and skip them).")
    return best[1]


def positional_tables(config: dict) -> dict:
    """The ``pos_embed.pe`` buffers diffusers computes for a MotionAdapter config (deterministic)."""
    shapes = {k: s for k, s in adapter_shapes(config).items() if k.endswith("pos_embed.pe")}
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    tables = {}
    for k, shape in shapes.items():
        dim = shape[-1]
        if dim not in tables:
            tables[dim] = SinusoidalPositionalEmbedding(dim, max_seq_length=shape[1]).pe.detach().clone()
    return {k: tables[s[-1]].clone() for k, s in shapes.items()}  # one tensor per key: safetensors refuses shared memory


def to_original_names(state_dict: dict, *, with_pos_encoder: bool) -> dict:
    """Diffusers ``MotionAdapter`` keys -> original AnimateDiff keys (inverse of :func:`to_diffusers_names`).

    ``with_pos_encoder`` writes the sinusoidal tables as AnimateDiff does; AnimateLCM ships without them.
    """
    out = {}
    for k, v in state_dict.items():
        if k.endswith("pos_embed.pe"):
            if with_pos_encoder:  # the original keeps one table per attention block
                base = k[: -len("pos_embed.pe")]
                for a in (0, 1):
                    out[re.sub(r"(motion_modules\.\d+\.)", r"\1temporal_transformer.", base)
                        + f"attention_blocks.{a}.pos_encoder.pe"] = v.clone()
            continue
        name = re.sub(r"(motion_modules\.\d+\.)", r"\1temporal_transformer.", k)
        name = (name.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
                .replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm."))
        out[name] = v
    return out
