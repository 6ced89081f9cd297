"""AnimateDiff-SDXL-shaped motion modules: three blocks (widths of the base's three), no mid-block module, loaded
against their own config and named sdxl; merged into an SDXL base exactly as diffusers joins them
(``UNetMotionModel.from_unet2d`` with the ``MotionAdapter``), γ scaling each module's ``proj_out``; an SD1.5 module
on an SDXL base, or the reverse, is refused naming both families.

Reference: diffusers' own ``MotionAdapter`` (built for the tiny SDXL UNet) and ``UNetMotionModel.from_unet2d``;
equality is bit-exact (the merge copies w0 and the module, and γ = 0.5 scales exactly in fp32).
"""

import re

import pytest
import torch
from safetensors.torch import save_file

import weightlab
from weightlab import Recipe, Term
from weightlab.errors import FamilyMismatchError
from weightlab.formats.motion import to_original_names
from weightlab.merge import build_unet
from weightlab.residuals import MotionModule
from weightlab.testing import TINY_SDXL_UNET_CONFIG, build_tiny_variant

# As guoyww/animatediff-motion-adapter-sdxl-beta, at the tiny SDXL UNet's widths.
TINY_SDXL_MOTION_CONFIG = dict(block_out_channels=TINY_SDXL_UNET_CONFIG["block_out_channels"], motion_layers_per_block=2,
                               motion_num_attention_heads=8, motion_norm_num_groups=16, motion_max_seq_length=32,
                               use_motion_mid_block=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The tiny SDXL pipeline folder and an SDXL motion module as a MotionAdapter folder and in AnimateDiff's naming."""
    from diffusers import MotionAdapter

    root = tmp_path_factory.mktemp("sdxl_motion")
    adapter = MotionAdapter(**TINY_SDXL_MOTION_CONFIG)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every weight live, proj_out included (diffusers zero-initialises it)
        for p in adapter.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    adapter.save_pretrained(root / "motion")
    save_file(to_original_names(adapter.state_dict(), with_pos_encoder=False), root / "motion_original.safetensors")
    return build_tiny_variant("sdxl", root), root / "motion", root / "motion_original.safetensors"


def test_sdxl_motion_module_loads_against_its_own_config(sdxl):
    from diffusers import MotionAdapter

    _, folder, original = sdxl
    ref = MotionAdapter.from_pretrained(folder).state_dict()
    for source in (folder, original):  # the original layout's config is inferred from its weights
        res = weightlab.load(source)
        assert type(res) is MotionModule and res.family == "sdxl" and res.skipped == [], source
        assert res.weights.keys() == ref.keys() and all(torch.equal(res.weights[k], v) for k, v in ref.items())
        assert not any(k.startswith(("down_blocks.3.", "mid_block.")) for k in res.weights)


def test_sdxl_motion_merges_exactly_with_gamma(sdxl):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    base, folder, _ = sdxl
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    ref = UNetMotionModel.from_unet2d(unet, MotionAdapter.from_pretrained(folder))
    # diffusers 0.42's from_unet2d does not copy SDXL's add_embedding (text_time) weights; the base's are the truth.
    ref.add_embedding.load_state_dict(unet.add_embedding.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if re.search(r"motion_modules\.\d+\.proj_out\.(weight|bias)$", name):
                p.mul_(0.5)
    ours = build_unet(Recipe(base=str(base), terms=[Term(source=str(folder), kind="motion", scale=0.5)]))
    rsd, osd = ref.state_dict(), ours.state_dict()
    assert rsd.keys() == osd.keys() and all(torch.equal(rsd[k], osd[k]) for k in rsd)


def test_motion_module_of_another_family_is_refused(tiny, sdxl):
    base, folder, _ = sdxl
    with pytest.raises(FamilyMismatchError, match=r"family 'sd15'.*base is family 'sdxl'.*down_blocks\.3.*Fix:"):
        build_unet(Recipe(base=str(base), terms=[Term(source=str(tiny.motion_dir), kind="motion")]))
    with pytest.raises(FamilyMismatchError, match=r"family 'sdxl'.*base is family 'sd15'.*Fix:"):
        build_unet(Recipe(base=str(tiny.base_dir), terms=[Term(source=str(folder), kind="motion")]))
