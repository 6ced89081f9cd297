"""kohya LoRAs with LDM module names (``lora_unet_input_blocks_1_1_proj_in``, ``middle_block``, ``output_blocks``), as
kohya writes SDXL LoRAs and A1111-era tools some SD1.x/SD2 ones, merge like diffusers' ``load_lora_weights`` +
``fuse_lora`` (diffusers renames them with ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_unet_lora_key``;
weightlab with its single-file converter's table, `weightlab.formats.ldm.ldm_module_names`).

The files are written here from diffusers-named factors renamed to LDM names by `weightlab.formats.ldm.diffusers_to_ldm`,
whose inverse is diffusers' converter key for key (tests/formats/test_families_meta.py); the reference that reads
them, diffusers' LoRA loader, is independent of both.

Tolerance 1e-6 relative to each weight's largest magnitude (fp32): PEFT adds ``scaling · B @ A`` to the weight (two
roundings), we accumulate in fp32 and round once; they differ by a few fp32 ULPs (~1e-7).
"""

import re

import pytest
import torch
from safetensors.torch import save_file

import weightlab
from weightlab import Recipe, Term
from weightlab.formats.ldm import LDM_UNET_PREFIX, diffusers_to_ldm
from weightlab.merge import build_unet
from weightlab.testing import LCM_LORA_TARGETS, build_tiny_variant, lora_to_kohya, make_lora, max_rel_error


def ldm_names(unet) -> dict[str, str]:
    """diffusers module path -> LDM module path of ``unet``."""
    return {k.removesuffix(".weight"): v.removeprefix(LDM_UNET_PREFIX).removesuffix(".weight")
            for k, v in zip(unet.state_dict(), diffusers_to_ldm(dict.fromkeys(unet.state_dict())))}


def ldm_kohya(unet, factors: dict, alpha: float) -> dict:
    """kohya keys over LDM module names: ``lora_unet_input_blocks_1_1_proj_in.lora_down.weight``, ..."""
    ldm = ldm_names(unet)
    renamed = {ldm[p]: f for p, f in factors.items()}
    assert any(p.startswith("input_blocks.") for p in renamed) and any(p.startswith("output_blocks.") for p in renamed)
    assert any(p.startswith("middle_block.") for p in renamed)
    return lora_to_kohya(renamed, alpha)


def diffusers_can_rename(ldm: str) -> bool:
    """Whether diffusers' LoRA renamer (``_maybe_map_sgm_blocks_to_diffusers``) handles an SD1.x/SD2 LDM module: it
    finds a block's keys by substring, so ``input_blocks_1`` also takes ``input_blocks_10``/``_11`` (a KeyError), and
    it reads every ``output_blocks.N.1`` as an attention, which up block 0's upsampler ``output_blocks.2.1.conv``
    is not. SDXL's 9 blocks a side and attention in both upsampling up blocks avoid both."""
    index = re.match(r"(input|output)_blocks\.(\d+)\.", ldm)
    return (index is None or int(index.group(2)) < 10) and ldm != "output_blocks.2.1.conv"


def _reference(pipeline_cls, folder, lora, scale):
    pipe = pipeline_cls.from_pretrained(folder)
    # The SDXL loader passes its UNet config to the LDM renamer itself; the SD one when asked (diffusers' option).
    extra = {} if pipeline_cls.__name__.endswith("XLPipeline") else {"unet_config": pipe.unet.config}
    pipe.load_lora_weights(str(lora), adapter_name="ldm", **extra)
    pipe.set_adapters(["ldm"], [scale])
    pipe.fuse_lora(adapter_names=["ldm"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe.unet.state_dict()


@pytest.mark.parametrize("name", ["sd15", "sd2", "sdxl"])
def test_ldm_named_kohya_lora_merges_like_diffusers(tiny, tmp_path, name):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    folder = tiny.base_dir if name == "sd15" else build_tiny_variant(name, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    ldm = ldm_names(unet)
    factors = {p: f for p, f in make_lora(unet, LCM_LORA_TARGETS, rank=4, seed=11).items()
               if name == "sdxl" or diffusers_can_rename(ldm[p])}  # every module: the next test
    path = tmp_path / f"{name}_ldm_lora.safetensors"
    save_file(ldm_kohya(unet, factors, alpha=3.0), path)
    lora = weightlab.load(path)
    assert lora.family == name and lora.skipped == []
    assert set(lora.targets) == set(factors)  # every module found, by its diffusers path
    ours = build_unet(Recipe(base=str(folder), terms=[Term(source=str(path), kind="style", scale=0.8)]))
    pipeline_cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    assert max_rel_error(_reference(pipeline_cls, folder, path, 0.8), ours.state_dict()) <= 1e-6


def test_ldm_names_reach_every_module_as_the_single_file_converter_does(tiny, tmp_path):
    """Where diffusers' LoRA renamer cannot serve as the reference (SD1.x blocks 10 and 11, up block 0's upsampler):
    a LoRA over every conv and linear module, named the LDM way, lands on the modules diffusers' single-file converter
    gives those LDM names, i.e. it equals the same LoRA named the diffusers way (whose merge diffusers checks in
    test_merge_parity)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny.base_dir / "unet")
    factors = make_lora(unet, [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))],
                        rank=2, seed=3)
    assert "up_blocks.0.upsamplers.0.conv" in factors
    save_file(ldm_kohya(unet, factors, alpha=1.0), tmp_path / "ldm.safetensors")
    save_file(lora_to_kohya(factors, alpha=1.0), tmp_path / "diffusers.safetensors")
    ldm, named = weightlab.load(tmp_path / "ldm.safetensors"), weightlab.load(tmp_path / "diffusers.safetensors")
    assert ldm.skipped == [] and set(ldm.targets) == set(named.targets) == set(factors)
    assert all(torch.equal(ldm.targets[p].delta(), named.targets[p].delta()) for p in factors)
