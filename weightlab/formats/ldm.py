"""Single-file LDM checkpoints (``model.diffusion_model.*``), converted with diffusers' own converter.

The inverse key map (diffusers -> LDM, after diffusers' ``convert_diffusers_to_original_stable_diffusion.py``)
is kept here to prove that the converter consumed every UNet key: diffusers' converter silently drops keys
it does not know, and weightlab treats unmatched keys as errors.
"""

from __future__ import annotations

import math

from weightlab.errors import UnmatchedKeysError, fmt_keys
from weightlab.families import SD15

LDM_UNET_PREFIX = "model.diffusion_model."
# Other components a single-file checkpoint may carry; they are not part of the UNet and are left out on purpose.
LDM_OTHER_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.", "alphas_cumprod",
                      "betas", "log_one_minus_alphas_cumprod", "posterior_", "sqrt_", "model.diffusion_model_ema.",
                      "lvlb_weights")


def _layer_map() -> tuple[list, list, list]:
    top = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
           ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    layer = []
    for i in range(4):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return top, resnet, layer


def diffusers_to_ldm_name(name: str) -> str:
    """SD1.x UNet parameter name, diffusers -> LDM (without the ``model.diffusion_model.`` prefix)."""
    top, resnet, layer = _layer_map()
    for sd_part, hf_part in top:
        if name.startswith(hf_part):
            name = sd_part + name[len(hf_part):]
    if "resnets" in name:
        for sd_part, hf_part in resnet:
            name = name.replace(hf_part, sd_part)
    for sd_part, hf_part in layer:
        name = name.replace(hf_part, sd_part)
    return name


def diffusers_to_ldm(state_dict: dict) -> dict:
    """Diffusers UNet state dict -> single-file LDM keys (``model.diffusion_model.*``)."""
    return {LDM_UNET_PREFIX + diffusers_to_ldm_name(k): v for k, v in state_dict.items()}


def is_ldm(keys) -> bool:
    return any(k.startswith(LDM_UNET_PREFIX) for k in keys)


def infer_unet_config(ldm_unet: dict) -> dict:
    """SD1.5 UNet config with widths read from the weights (norm groups: gcd(32, first width), 32 for real models)."""
    c0 = ldm_unet["input_blocks.0.0.weight"].shape[0]
    widths = [ldm_unet[f"input_blocks.{3 * i + 1}.0.out_layers.3.weight"].shape[0] for i in range(4)]
    ctx = ldm_unet["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    return dict(SD15.unet_config, block_out_channels=tuple(widths), cross_attention_dim=ctx,
                norm_num_groups=math.gcd(32, c0), in_channels=ldm_unet["input_blocks.0.0.weight"].shape[1],
                out_channels=ldm_unet["out.2.weight"].shape[0])


def convert_ldm_unet(checkpoint: dict, *, strict: bool = True, source: str = "checkpoint") -> tuple[dict, dict, list[str]]:
    """LDM single-file -> (diffusers UNet state dict, inferred config, skipped keys).

    Uses ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``. Raises ``UnmatchedKeysError``
    for ``model.diffusion_model.*`` keys the converter did not consume (unless ``strict=False``).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_UNET_PREFIX)}
    other = [k for k in checkpoint if not k.startswith(LDM_UNET_PREFIX)]
    unknown = [k for k in other if not k.startswith(LDM_OTHER_PREFIXES)]
    try:
        config = infer_unet_config(unet)
    except KeyError as e:
        raise UnmatchedKeysError(
            f"{source}: single-file checkpoint lacks the SD1.x UNet key {e}; it is not an sd15 UNet.", [str(e)]) from None
    converted = convert_ldm_unet_checkpoint({LDM_UNET_PREFIX + k: v for k, v in unet.items()}, config)
    # The converter renames whole blocks, unknown keys inside them too: keep only real sd15 parameters, so that
    # errors name the file's own keys (``input_blocks.1.1.extra``), not their renamed forms.
    converted = {k: v for k, v in converted.items() if k in SD15.signature}
    consumed = {diffusers_to_ldm_name(k) for k in converted}
    unknown += [LDM_UNET_PREFIX + k for k in unet if k not in consumed]
    if unknown and strict:
        raise UnmatchedKeysError(
            f"{source}: {len(unknown)} key(s) match no sd15 UNet parameter: {fmt_keys(unknown)}. "
            "Fix: check the file is an SD1.x checkpoint, or pass strict=False to report and skip them.", unknown)
    return converted, config, sorted(unknown)
