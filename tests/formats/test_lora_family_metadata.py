"""A LoRA whose modules several families share (attention only: sd15 and sd2) takes the family its metadata names:
weightlab's ``weightlab.family``, kohya sd-scripts' ``ss_base_model_version`` / ``ss_v2``, the SAI model spec's
``modelspec.architecture`` (the values those tools write). Metadata that contradicts the modules is refused."""

import pytest
from safetensors.torch import load_file, save_file

import weightlab
from weightlab import Recipe, Term
from weightlab.errors import FamilyMismatchError
from weightlab.merge import merge_to_file

SD2_DECLARATIONS = [{"weightlab.family": "sd2"}, {"ss_base_model_version": "sd_v2"},
                    {"ss_base_model_version": "sd_v2_768_v"}, {"ss_v2": "True"},
                    {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}]


@pytest.fixture(scope="module")
def attention(tiny):
    """The tiny style LoRA's attention factors only: module names and ranks that sd15 and sd2 share."""
    return {k: v for k, v in load_file(tiny.style_lora_kohya).items() if "_attn" in k}


def test_ambiguous_lora_without_metadata_is_the_first_family(attention, tmp_path):
    save_file(attention, tmp_path / "a.safetensors", {"ss_v2": "False"})  # kohya's SD1.x value decides nothing
    assert weightlab.load(tmp_path / "a.safetensors").family == "sd15"


@pytest.mark.parametrize("metadata", SD2_DECLARATIONS, ids=lambda m: next(iter(m.items()))[1])
def test_ambiguous_lora_takes_the_declared_family(attention, tiny, tmp_path, metadata):
    save_file(attention, tmp_path / "a.safetensors", metadata)
    lora = weightlab.load(tmp_path / "a.safetensors")
    assert lora.family == "sd2"
    assert weightlab.load(lora.save(tmp_path / "again.safetensors")).family == "sd2"
    out = tmp_path / "merged.safetensors"  # and so an sd15 base refuses it, naming both families
    with pytest.raises(FamilyMismatchError, match=r"family 'sd2'.*base is family 'sd15'.*Fix:"):
        merge_to_file(Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tmp_path / "a.safetensors"), kind="style")]),
                      out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("metadata, why", [
    ({"ss_base_model_version": "sd_v2"}, r"ss_base_model_version=sd_v2.*'sd2'.*fit 'sd15'.*wrong rank for sd2"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, r"modelspec.architecture=.*'sdxl'.*map to no sdxl module"),
])
def test_metadata_contradicting_the_modules_is_refused(tiny, tmp_path, metadata, why):
    """The full style LoRA has 1x1-conv proj_in factors (sd15 only) and down-block-0 attentions (not in sdxl)."""
    save_file(load_file(tiny.style_lora_kohya), tmp_path / "s.safetensors", metadata)
    with pytest.raises(FamilyMismatchError, match=why + r".*Fix:"):
        weightlab.load(tmp_path / "s.safetensors")
