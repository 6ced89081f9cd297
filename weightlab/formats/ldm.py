"""Single-file LDM checkpoints (``model.diffusion_model.*``), converted with diffusers' own converter.

The inverse key map (diffusers -> LDM, after diffusers' ``convert_diffusers_to_original_stable_diffusion.py``,
for any number of blocks and layers per block) is kept here to prove that the converter consumed every UNet
key: diffusers' converter silently drops keys it does not know, and weightlab treats unmatched keys as errors.
"""

from __future__ import annotations

from weightlab.errors import UnmatchedKeysError, fmt_keys
from weightlab.families import Family, infer_unet_config, unet_shapes_for
from weightlab.formats.components import COMPONENTS

LDM_UNET_PREFIX = COMPONENTS["unet"].ldm_prefixes[0]
# Other components a single-file checkpoint may carry; they are not part of the UNet and are left out on purpose.
LDM_OTHER_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.", "alphas_cumprod",
                      "betas", "log_one_minus_alphas_cumprod", "posterior_", "sqrt_", "model.diffusion_model_ema.",
                      "lvlb_weights")


def _layout(names) -> tuple[int, int, set[int]]:
    """(down blocks, layers per down block, up blocks with attentions) of a UNet, from its diffusers names."""
    names = list(names)
    blocks = {int(k.split(".")[1]) for k in names if k.startswith("down_blocks.")}
    layers = {int(k.split(".")[3]) for k in names if k.startswith("down_blocks.0.resnets.")}
    up_attn = {int(k.split(".")[1]) for k in names if k.startswith("up_blocks.") and ".attentions." in k}
    return max(blocks, default=-1) + 1, max(layers, default=-1) + 1, up_attn


def _layer_map(n_blocks: int, layers: int, up_attn: set[int]) -> tuple[list, list, list]:
    top = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
           ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
           ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    layer, step = [], layers + 1  # LDM numbers every layer of the UNet in one sequence; up blocks have one more
    for i in range(n_blocks):
        for j in range(layers):
            layer.append((f"input_blocks.{step * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            layer.append((f"input_blocks.{step * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(step):
            layer.append((f"output_blocks.{step * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            layer.append((f"output_blocks.{step * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n_blocks - 1:
            layer.append((f"input_blocks.{step * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layer.append((f"output_blocks.{step * i + layers}.{2 if i in up_attn else 1}.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return top, resnet, layer


def _to_ldm_name(name: str, maps: tuple[list, list, list]) -> str:
    top, resnet, layer = maps
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
    """Diffusers UNet state dict -> single-file LDM keys (``model.diffusion_model.*``); any block layout."""
    maps = _layer_map(*_layout(state_dict))
    return {LDM_UNET_PREFIX + _to_ldm_name(k, maps): v for k, v in state_dict.items()}


_LDM_MODULES: dict[str, dict[str, str]] = {}


def ldm_module_names(family: Family) -> dict[str, str]:
    """LDM module path (``input_blocks.1.1.proj_in``) -> diffusers module path (``down_blocks.0.attentions.0.proj_in``)
    of the family's full-size UNet, as diffusers' own ``convert_ldm_unet_checkpoint`` renames them (kohya names its
    SDXL LoRAs this way, A1111-era tools some SD1.x/SD2 ones). Read off the converter by passing it one marker
    tensor per LDM key (it only renames), so the table is diffusers', not a copy."""
    if family.name not in _LDM_MODULES:
        import torch
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        with torch.device("meta"):
            markers = diffusers_to_ldm({k: torch.empty(s) for k, s in family.unet_shapes.items()})
        ldm_key = {id(v): k[len(LDM_UNET_PREFIX):] for k, v in markers.items()}
        converted = convert_ldm_unet_checkpoint(markers, family.unet_config)
        _LDM_MODULES[family.name] = {ldm_key[id(v)].removesuffix(".weight"): k.removesuffix(".weight")
                                     for k, v in converted.items() if k.endswith(".weight") and id(v) in ldm_key}
    return _LDM_MODULES[family.name]


def is_ldm(keys) -> bool:
    return any(k.startswith(LDM_UNET_PREFIX) for k in keys)


def _ldm_layers_per_block(ldm_unet: dict) -> int:
    """Layers per down block: the input blocks before the first downsampler (``input_blocks.<L+1>.0.op``)."""
    ops = sorted(int(k.split(".")[1]) for k in ldm_unet if k.startswith("input_blocks.") and ".0.op." in k)
    if ops:
        return ops[0] - 1
    return len({k.split(".")[1] for k in ldm_unet if k.startswith("input_blocks.")}) - 1  # one block: no downsampler


def convert_ldm_unet(checkpoint: dict, *, strict: bool = True, source: str = "checkpoint") -> tuple[dict, dict, list[str]]:
    """LDM single-file -> (diffusers UNet state dict, config inferred from the weights, skipped keys).

    Uses ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` (any layout: SD1.x, SD2.x, SDXL,
    distilled), then `weightlab.families.infer_unet_config`. Raises ``UnmatchedKeysError`` for
    ``model.diffusion_model.*`` keys the converter did not consume (unless ``strict=False``).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_UNET_PREFIX)}
    other = [k for k in checkpoint if not k.startswith(LDM_UNET_PREFIX)]
    unknown = [k for k in other if not k.startswith(LDM_OTHER_PREFIXES)]
    if "input_blocks.0.0.weight" not in unet:
        raise UnmatchedKeysError(f"{source}: single-file checkpoint lacks the UNet key "
                                 f"{LDM_UNET_PREFIX}input_blocks.0.0.weight; it is not a Stable Diffusion UNet.",
                                 [LDM_UNET_PREFIX + "input_blocks.0.0.weight"])
    pre = dict(layers_per_block=_ldm_layers_per_block(unet))
    if "label_emb.0.0.weight" in unet:
        pre["addition_embed_type"] = "text_time"
    converted = convert_ldm_unet_checkpoint({LDM_UNET_PREFIX + k: v for k, v in unet.items()}, pre)
    config = infer_unet_config({k: tuple(v.shape) for k, v in converted.items()}, what=source)
    # The converter renames whole blocks, unknown keys inside them too: keep only the config's real parameters,
    # so that errors name the file's own keys (``input_blocks.1.1.extra``), not their renamed forms.
    shapes = unet_shapes_for(config)
    converted = {k: v for k, v in converted.items() if k in shapes}
    maps = _layer_map(*_layout(converted))
    consumed = {_to_ldm_name(k, maps) for k in converted}
    unknown += [LDM_UNET_PREFIX + k for k in unet if k not in consumed]
    if unknown and strict:
        raise UnmatchedKeysError(
            f"{source}: {len(unknown)} key(s) match no UNet parameter: {fmt_keys(unknown)}. "
            "Fix: check the file is a Stable Diffusion checkpoint, or pass strict=False to report and skip them.", unknown)
    return converted, config, sorted(unknown)
