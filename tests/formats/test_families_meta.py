"""Family detection and key mapping on the real, full-size SD1.5 architecture, built on the meta device (no memory)."""

import math

import pytest
import torch

from weightlab.errors import FamilyMismatchError
from weightlab.families import SD2, SD15, SDXL, check_fits, detect_family, infer_motion_config, is_motion_key
from weightlab.formats import ldm, motion
from weightlab.formats.lora import parse_lora
from weightlab.formats.ldm import diffusers_to_ldm as diffusers_to_ldm_unet
from weightlab.testing import LCM_LORA_TARGETS
from weightlab.formats.motion import to_original_names


def _meta_state_dict(cls, config) -> dict:
    with torch.device("meta"):
        return cls(**config).state_dict()


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15.unet_config)


def test_full_size_sd15_unet_is_sd15(unet):
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert shapes == SD15.unet_shapes
    assert sum(math.prod(s) for s in shapes.values()) == 859_520_964  # SD1.5's UNet parameter count
    assert detect_family({k: len(s) for k, s in shapes.items()}) is SD15


def test_full_size_motion_adapter_is_sd15():
    from diffusers import MotionAdapter

    sd = _meta_state_dict(MotionAdapter, SD15.motion_config)
    assert {k: tuple(v.shape) for k, v in sd.items()} == SD15.motion_shapes
    assert detect_family({k: v.dim() for k, v in sd.items()}) is SD15
    assert infer_motion_config(SD15.motion_shapes) == SD15.motion_config
    # AnimateLCM's layout (original names, no pos_encoder) converts to exactly the adapter's parameters.
    original = to_original_names(sd, with_pos_encoder=False)
    assert motion.is_original_layout(original)
    assert set(motion.to_diffusers_names(original)) == {k for k in sd if not k.endswith("pos_embed.pe")}


def test_full_size_single_file_converts_key_for_key(unet):
    """diffusers' LDM converter with weightlab's inferred config consumes every key of a real-size checkpoint."""
    sd = unet.state_dict()
    converted, config, skipped = ldm.convert_ldm_unet(diffusers_to_ldm_unet(sd))
    assert skipped == [] and config == SD15.unet_config
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in sd.items()}


def test_lcm_lora_kohya_names_cover_the_real_unet(unet):
    modules = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
               and any(n == t or n.endswith("." + t) for t in LCM_LORA_TARGETS)}
    assert all(any(n.endswith("." + t) for n in modules) for t in LCM_LORA_TARGETS)  # every target name occurs
    rank, sd = 64, {}
    for name, m in modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        n_in, n_out = (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else (m.in_channels, m.out_channels)
        kernel = () if isinstance(m, torch.nn.Linear) else tuple(m.kernel_size)
        sd[f"{key}.lora_down.weight"] = torch.empty(rank, n_in, *kernel, device="meta")
        sd[f"{key}.lora_up.weight"] = torch.empty(n_out, rank, *(1,) * len(kernel), device="meta")
        sd[f"{key}.alpha"] = torch.tensor(8.0)
    targets, unmatched = parse_lora(sd, SD15)
    assert unmatched == [] and set(targets) == set(modules)
    for name, t in targets.items():
        assert t.delta().shape == modules[name].weight.shape, name
    assert len(SD15.kohya_names) == len(SD15.weight_modules)  # flattening the names loses nothing


def test_full_size_sdxl_unet_is_named_as_sdxl():
    assert detect_family({k: len(s) for k, s in SDXL.unet_shapes.items()}) is SDXL
    with pytest.raises(FamilyMismatchError, match="'sdxl'.*'sd15'") as e:  # an SDXL residual meets an sd15 base
        check_fits(SDXL.unet_shapes, "sdxl", "sd15")
    assert "add_embedding.linear_1.weight" in str(e.value)  # named: an SDXL-only module


def test_full_size_sd2_unet_is_named_as_sd2():
    # the same module names as SD1.5; proj_in/proj_out are linear (2-D) where SD1.5 has 1x1 convs
    assert detect_family({k: len(s) for k, s in SD2.unet_shapes.items()}) is SD2
    assert {k for k, s in SD2.unet_shapes.items() if len(s) != len(SD15.unet_shapes[k])} == {
        k for k in SD15.unet_shapes if ".proj_in.weight" in k or ".proj_out.weight" in k}


def test_is_motion_key_splits_a_full_size_unet_motion_model():
    """Against diffusers' own models: every parameter a ``MotionAdapter`` holds is a motion key once joined to the
    UNet, and no parameter of ``UNet2DConditionModel`` is."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15.unet_config)
        joined = UNetMotionModel.from_unet2d(unet, MotionAdapter(**SD15.motion_config), load_weights=False)
    spatial = set(unet.state_dict())
    motion = set(joined.state_dict()) - spatial
    assert motion and all(is_motion_key(k) for k in motion)
    assert not any(is_motion_key(k) for k in spatial)
