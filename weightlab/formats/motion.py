"""Motion modules: diffusers ``MotionAdapter`` names and the original AnimateDiff/AnimateLCM layout.

The original layout (``temporal_transformer``, ``attention_blocks.{0,1}``, ``norms.{0,1}``, ``ff_norm``) is
converted with diffusers' own ``convert_animatediff_checkpoint_to_diffusers``. AnimateLCM ships without
``pos_encoder`` tables; the sinusoidal table is recomputed in code, so detection never depends on it.
"""

from __future__ import annotations

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


def positional_tables(config: dict) -> dict:
    """The ``pos_embed.pe`` buffers diffusers computes for a MotionAdapter config (deterministic)."""
    import torch
    from diffusers import MotionAdapter

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MotionAdapter(**config).state_dict().items() if k.endswith("pos_embed.pe")}
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    tables = {}
    for k, shape in shapes.items():
        dim = shape[-1]
        if dim not in tables:
            tables[dim] = SinusoidalPositionalEmbedding(dim, max_seq_length=shape[1]).pe.detach().clone()
    return {k: tables[s[-1]].clone() for k, s in shapes.items()}  # one tensor per key: safetensors refuses shared memory
