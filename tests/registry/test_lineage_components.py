"""Lineage records which pipeline components each term of a merge changed (issue 13, "Components").

Expected values are written here from what the inputs are (the tiny family's style LoRA with a ``lora_te_*`` half
changes the UNet and the text encoder, the LCM-LoRA only the UNet), never read back from what was recorded.
"""

from pathlib import Path

import pytest
from rich.console import Console

from weightlab.merge import merge_to_file, merge_to_folder
from weightlab.recipe import Recipe, Term
from weightlab.registry.render import lineage_tree
from weightlab.registry.resolve import version_path
from weightlab.registry.schemas import Derivation


def _recipe(tiny, style, **style_term):
    return Recipe(base=str(tiny.base_dir), terms=[Term(source=str(style), kind="style", scale=0.8, **style_term),
                                                  Term(source=str(tiny.accel_lora), kind="image_accel", scale=1.0)])


def _components(node) -> list:
    return [(e.role, e.components) for e in node.inputs]


def _text(node) -> str:
    console = Console(width=400, record=True, color_system=None)
    console.print(lineage_tree(node))
    return console.export_text()


def test_lineage_shows_the_components_each_term_changed(reg, tiny, style_lora_te, tmp_path):
    merge_to_folder(_recipe(tiny, style_lora_te), tmp_path / "both", progress=False)
    reg.register_output(tmp_path / "both", name="me/both", kind="base",
                        derivation=Derivation.from_merged_file(tmp_path / "both"))
    node = reg.lineage("me/both")
    assert _components(node) == [("base", None), ("style", ["unet", "text_encoder"]), ("image_accel", ["unet"])]
    text = _text(node)
    assert "style x0.8" in text and "components: unet, text_encoder" in text and "components: unet\n" in text
    # A term limited to the UNet, and a UNet file (which leaves the text-encoder residual out), record the UNet only.
    merge_to_folder(_recipe(tiny, style_lora_te, components=["unet"]), tmp_path / "unet", progress=False)
    merge_to_file(_recipe(tiny, style_lora_te), tmp_path / "unet.safetensors", progress=False)
    for out in (tmp_path / "unet", tmp_path / "unet.safetensors"):
        assert _components(Derivation.from_merged_file(out))[1:] == [("style", ["unet"]), ("image_accel", ["unet"])]
    # A text-encoder-only term changed no UNet weight.
    merge_to_folder(_recipe(tiny, style_lora_te, components=["text_encoder"]), tmp_path / "te", progress=False)
    assert _components(Derivation.from_merged_file(tmp_path / "te"))[1] == ("style", ["text_encoder"])


def test_registered_terms_need_the_resolver_to_record_components(reg, tiny, style_lora_te, tmp_path):
    reg.add(style_lora_te, name="me/style")
    recipe = _recipe(tiny, "me/style@1")

    def resolve(source):  # paths as themselves, references through the registry (what LocalResolver does)
        return Path(source) if Path(source).exists() else version_path(reg, source)

    merge_to_folder(recipe, tmp_path / "out", progress=False, resolve=resolve)
    assert _components(Derivation.from_merged_file(tmp_path / "out"))[1] == ("style", None)  # paths only: unknown
    derivation = Derivation.from_merged_file(tmp_path / "out", resolve=resolve)
    reg.register_output(tmp_path / "out", name="me/out", kind="base", derivation=derivation)
    node = reg.lineage("me/out")
    assert node.inputs[1].node.label == "me/style@1"
    assert _components(node)[1:] == [("style", ["unet", "text_encoder"]), ("image_accel", ["unet"])]
    # Without its file, a term counts as carrying what it names, of which a UNet file holds the UNet only.
    named = _recipe(tiny, "me/style@1", components=["unet", "text_encoder"])
    merge_to_file(named, tmp_path / "named.safetensors", progress=False, resolve=resolve)
    assert _components(Derivation.from_merged_file(tmp_path / "named.safetensors"))[1] == ("style", ["unet"])


def test_components_are_labels():
    from weightlab.errors import RegistryError
    from weightlab.registry.schemas import LineageInput

    with pytest.raises(RegistryError, match="invalid component"):
        LineageInput(tensor_hash="ab" * 32, components=["text encoder; drop"])
