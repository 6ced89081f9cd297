"""weightlab.Registry on SQLite and PostgreSQL: add/get/search, identity, aliases, tags, lineage, open."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from weightlab.errors import (DuplicateVersionError, FileFormatError, HashMismatchError, NotFoundError, RegistryError,
                              UnsafeFileError, WeightlabError)
from weightlab.registry import Derivation, LineageInput, Ref


def variant(src: Path, dst: Path, *, factor: float = 1.0, metadata: dict | None = None) -> Path:
    """A copy of a safetensors file with tensors scaled by ``factor`` and/or a different header."""
    tensors = load_file(str(src))
    save_file({k: v * factor if v.is_floating_point() else v for k, v in tensors.items()}, str(dst),
              metadata=metadata)
    return dst


def test_add_detects_and_get_resolves(reg, tiny):
    v = reg.add(tiny.style_lora_kohya, name="me/style", tags=["anime"], metadata={"author": "me"})
    assert (v.ref, v.kind, v.family, v.representation, v.ranks, v.alphas) == \
        ("me/style@1", "style", "sd15", "lora", [4], [2.0])
    assert v.format == "safetensors" and v.metadata == {"author": "me"} and v.tags == ["anime"]
    assert [f.path for f in v.files] == [tiny.style_lora_kohya.name]
    for ref in ("me/style", "me/style@1", "me/style:latest", f"me/style@{v.sha256[:10]}",
                f"me/style@{v.tensor_hash[:10]}"):
        assert reg.get(ref) == v
    assert reg.add(tiny.accel_lora, name="me/lcm").kind == "image_accel"
    assert reg.add(tiny.motion_lora, name="me/mlora").kind == "motion_lora"


def test_versions_are_immutable_and_aliases_move(reg, tiny, tmp_path):
    v1 = reg.add(tiny.style_lora_kohya, name="me/style")
    v2 = reg.add(variant(tiny.style_lora_kohya, tmp_path / "s2.safetensors", factor=1.5), name="me/style")
    assert (v1.number, v2.number) == (1, 2) and v1.tensor_hash != v2.tensor_hash
    assert reg.get("me/style").ref == "me/style@2"
    assert reg.alias("me/style@1", "prod").aliases == ["prod"]
    assert reg.get("me/style:prod").ref == "me/style@1"
    assert reg.alias("me/style@2", "prod").ref == "me/style@2"  # the alias moves...
    assert reg.get("me/style:prod").ref == "me/style@2"
    after = reg.get("me/style@1")  # ...the version does not change
    assert after.model_dump(exclude={"aliases"}) == v1.model_dump(exclude={"aliases"}) and after.aliases == []
    with pytest.raises(RegistryError, match="latest"):
        reg.alias("me/style@1", "latest")
    reg.unalias("me/style:prod")
    with pytest.raises(NotFoundError, match="alias 'prod'"):
        reg.get("me/style:prod")
    assert [v.number for v in reg.versions("me/style")] == [1, 2]


def test_duplicate_returns_existing_or_refuses_politely(reg, tiny, tmp_path):
    v1 = reg.add(tiny.style_lora_kohya, name="me/style")
    assert reg.add(tiny.style_lora_kohya, name="me/style") == v1
    # A metadata-only edit keeps the tensor hash: the same identity, so the same version.
    edited = variant(tiny.style_lora_kohya, tmp_path / "edited.safetensors", metadata={"note": "edited"})
    with pytest.raises(DuplicateVersionError, match="already holds these tensors") as e:
        reg.add(edited, name="me/style", exist_ok=False)
    assert e.value.version == v1
    assert [v.number for v in reg.versions("me/style")] == [1]
    # The same file under another name is a new version that shares the blob.
    other = reg.add(tiny.style_lora_kohya, name="you/style")
    assert other.ref == "you/style@1" and other.files == v1.files
    assert len(list(reg.store.list())) == 2  # the original and the edited file


def test_folders_are_stored_file_by_file_and_come_back_identical(reg, tiny):
    v = reg.add(tiny.motion_dir, name="me/motion")
    assert (v.format, v.kind, v.representation) == ("diffusers", "motion", "module")
    assert sorted(f.path for f in v.files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert v.config and v.config["block_out_channels"] == [16, 32, 64, 64]
    out = reg.path("me/motion")
    for f in v.files:
        assert (out / f.path).read_bytes() == (tiny.motion_dir / f.path).read_bytes()
    assert reg.open("me/motion").kind == "motion"


def test_pipeline_folder_round_trip(sqlite_reg, tiny):
    v = sqlite_reg.add(tiny.base_dir, name="me/base")
    assert (v.kind, v.format) == ("base", "diffusers")
    originals = sorted(p.relative_to(tiny.base_dir).as_posix() for p in tiny.base_dir.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(tiny.base_dir).parts))
    assert sorted(f.path for f in v.files) == originals
    out = sqlite_reg.path("me/base")
    assert all((out / rel).read_bytes() == (tiny.base_dir / rel).read_bytes() for rel in originals)
    assert sqlite_reg.open("me/base").kind == "base"


def test_open_loads_the_residual_with_its_registered_kind(sqlite_reg, tiny):
    sqlite_reg.add(tiny.style_dense, name="me/dense", kind="style")  # a full fine-tune declared a style
    res = sqlite_reg.open("me/dense")
    assert type(res).__name__ == "Dense" and res.kind == "style"
    with pytest.raises(WeightlabError, match="motion"):
        sqlite_reg.add(tiny.style_lora_kohya, name="me/bad", kind="motion")
    assert sqlite_reg.search(text="me/bad") == []


def test_search_filters(reg, tiny, tmp_path):
    reg.add(tiny.style_lora_kohya, name="me/anime", tags=["anime"], metadata={"description": "Cel shading"})
    reg.add(variant(tiny.style_lora_kohya, tmp_path / "a2.safetensors", factor=2.0), name="me/anime")
    reg.add(tiny.accel_lora, name="lcm/sd15-lcm", tags=["fast"])
    reg.add(tiny.motion_animatelcm, name="lcm/motion")
    refs = lambda found: [v.ref for v in found]  # noqa: E731
    assert refs(reg.search()) == ["lcm/motion@1", "lcm/sd15-lcm@1", "me/anime@2"]
    assert refs(reg.search(kind="style")) == ["me/anime@2"]
    assert refs(reg.search(kind="style", all_versions=True)) == ["me/anime@1", "me/anime@2"]
    assert refs(reg.search(tag="anime")) == ["me/anime@1"]  # the newest version *with the tag*
    assert refs(reg.search(tag="fast", family="sd15")) == ["lcm/sd15-lcm@1"]
    assert refs(reg.search(text="CEL SHAD")) == ["me/anime@1"]
    assert refs(reg.search(namespace="lcm")) == ["lcm/motion@1", "lcm/sd15-lcm@1"]
    assert refs(reg.search(text="100%_")) == []
    assert refs(reg.search(family="sdxl")) == []


def test_tags(reg, tiny):
    reg.add(tiny.style_lora_kohya, name="me/style", tags=["a"])
    assert reg.tag("me/style", ["b", "c"], remove=["a"]).tags == ["b", "c"]
    assert reg.get("me/style@1").tags == ["b", "c"]
    with pytest.raises(RegistryError, match="invalid tag"):
        reg.tag("me/style", ["no spaces"])


def test_lineage_of_a_merge_names_base_and_every_term_with_scale(reg, tiny, tmp_path):
    from weightlab.files import tensor_hash
    from weightlab.recipe import Recipe, Term

    reg.add(tiny.base_ldm, name="sd/base")
    style1 = reg.add(tiny.style_lora_kohya, name="me/style")
    reg.alias("me/style@1", "prod")
    reg.add(tiny.accel_lora, name="lcm/lora")
    motion = tiny.motion_animatelcm  # left unregistered: recorded by tensor hash
    recipe = Recipe(base="sd/base@1", terms=[Term(source="me/style:prod", kind="style", scale=0.8),
                                             Term(source="lcm/lora", kind="image_accel", scale=1.0),
                                             Term(source=str(motion), kind="motion", scale=0.9)])
    # The merge ran with me/style:prod = @1; the alias moves before the output is registered.
    hashes = {"me/style:prod": style1.tensor_hash, str(motion): tensor_hash(motion)}
    reg.add(variant(tiny.style_lora_kohya, tmp_path / "s2.safetensors", factor=3.0), name="me/style")
    reg.alias("me/style@2", "prod")
    merged = reg.add(tiny.style_dense, name="me/anim", kind="base",
                     lineage=Derivation.from_recipe(recipe, input_hashes=hashes))

    node = reg.lineage(merged.ref)
    assert node.relation == "merged_from" and node.recipe == recipe.model_dump(mode="json")
    got = [(e.role, e.node.label, e.scale) for e in node.inputs]
    assert got == [("base", "sd/base@1", None), ("style", "me/style@1", 0.8), ("image_accel", "lcm/lora@1", 1.0),
                   ("motion", str(motion), 0.9)]
    assert node.inputs[3].node.version is None
    # Registering the outside input later links it by tensor hash.
    reg.add(motion, name="lcm/motion")
    assert reg.lineage(merged.ref).inputs[3].node.label == "lcm/motion@1"
    with pytest.raises(NotFoundError, match="holds tensors"):
        reg.add_lineage("me/style@2", Derivation(relation="trained_from", inputs=[
            LineageInput(ref="lcm/lora", tensor_hash="ab" * 32)]))


def test_merge_output_registers_with_the_lineage_in_its_header(sqlite_reg, tiny, tmp_path):
    """What ``weightlab merge --register NAME`` does: merge registry entries, add the output with its lineage."""
    from weightlab.merge import merge_to_file
    from weightlab.recipe import Recipe, Term

    reg = sqlite_reg
    reg.add(tiny.base_ldm, name="sd/base")
    reg.add(tiny.style_lora_kohya, name="me/style")
    reg.add(tiny.motion_dir, name="lcm/motion")  # a folder: linked through its weights file's tensor hash
    recipe = Recipe(base="sd/base", terms=[Term(source="me/style@1", kind="style", scale=0.7),
                                           Term(source="lcm/motion", kind="motion", scale=1.0)])
    out = tmp_path / "anim.safetensors"
    merge_to_file(recipe, out, progress=False, resolve=reg.path)
    merged = reg.add(out, name="me/anim", lineage=Derivation.from_merged_file(out))
    node = reg.lineage(merged.ref)
    assert [(e.role, e.node.label, e.scale) for e in node.inputs] == [
        ("base", "sd/base@1", None), ("style", "me/style@1", 0.7), ("motion", "lcm/motion@1", 1.0)]
    assert node.recipe["terms"][0]["scale"] == 0.7
    with pytest.raises(RegistryError, match="not a weightlab merge output"):
        Derivation.from_merged_file(tiny.style_lora_kohya)


def test_lineage_is_written_once_and_never_cycles(reg, tiny):
    a = reg.add(tiny.style_lora_kohya, name="me/a")
    b = reg.add(tiny.style_lora_peft, name="me/b")
    node = reg.add_lineage(b.ref, Derivation(relation="trained_from", inputs=[LineageInput(ref=a.ref)]))
    assert [e.node.label for e in node.inputs] == ["me/a@1"]
    with pytest.raises(RegistryError, match="already has lineage"):
        reg.add_lineage(b.ref, Derivation(relation="trained_from", inputs=[LineageInput(ref=a.ref)]))
    with pytest.raises(RegistryError, match="cycle"):
        reg.add_lineage(a.ref, Derivation(relation="trained_from", inputs=[LineageInput(ref=b.ref)]))
    with pytest.raises(NotFoundError, match="Did you mean me/a"):
        reg.add_lineage(a.ref, Derivation(relation="trained_from", inputs=[LineageInput(ref="me/aa")]))
    assert reg.lineage(a.ref).relation is None


def test_refs_and_errors_say_what_to_do(sqlite_reg, tiny, tmp_path):
    reg = sqlite_reg
    reg.add(tiny.style_lora_kohya, name="me/style")
    with pytest.raises(RegistryError, match="not a registry reference"):
        reg.get("no-namespace")
    with pytest.raises(RegistryError, match="at least 8 hex digits"):
        reg.get("me/style@abc")
    with pytest.raises(NotFoundError, match="versions 1..1"):
        reg.get("me/style@7")
    with pytest.raises(NotFoundError, match="Did you mean me/style"):
        reg.get("me/styel")
    with pytest.raises(RegistryError, match="without @version"):
        reg.add(tiny.accel_lora, name="me/lcm@2")
    assert Ref.parse("a/b@12345678") == Ref("a", "b", digest="12345678")
    assert str(Ref.parse("a/b:prod")) == "a/b:prod"


def test_invalid_files_are_refused_and_leave_nothing(sqlite_reg, tiny, tmp_path):
    reg = sqlite_reg
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny.style_lora_kohya.read_bytes()[:-10])
    with pytest.raises(FileFormatError, match="truncated"):
        reg.add(truncated, name="me/bad")
    with pytest.raises(FileFormatError, match="no such file"):
        reg.add(tmp_path / "missing.safetensors", name="me/bad")
    with pytest.raises(HashMismatchError, match="declared"):
        reg.add(tiny.style_lora_kohya, name="me/bad", sha256="0" * 64)
    assert reg.search(all_versions=True) == [] and list(reg.store.list()) == []


def test_pickles_need_opt_in_and_are_stored_as_safetensors(sqlite_reg, tiny, tmp_path):
    import torch

    ckpt = tmp_path / "style.ckpt"
    torch.save(load_file(str(tiny.style_lora_kohya)), ckpt)
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        sqlite_reg.add(ckpt, name="me/pickled")
    v = sqlite_reg.add(ckpt, name="me/pickled", allow_pickle=True)
    assert v.format == "safetensors" and [f.path for f in v.files] == ["style.safetensors"]
    assert v.tensor_hash == sqlite_reg.add(tiny.style_lora_kohya, name="me/plain").tensor_hash
    assert json.loads(json.dumps(v.model_dump(mode="json")))["source"] == str(ckpt)


def test_registry_kinds_match_the_sdk():
    from weightlab.registry.schemas import KINDS
    from weightlab.kinds import KINDS as SDK_KINDS

    assert KINDS == (*SDK_KINDS, "onnx")  # the residual roles, plus ONNX exports (folders, not residuals)


def test_unmatched_keys_are_refused_unless_lenient(sqlite_reg, tiny, tmp_path):
    import torch

    from weightlab.errors import UnmatchedKeysError

    tensors = load_file(str(tiny.style_lora_kohya))
    tensors.update({"lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 8),
                    "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4)})
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd))
    with pytest.raises(UnmatchedKeysError, match="strict=False"):
        sqlite_reg.add(odd, name="me/odd")
    sqlite_reg.add(odd, name="me/odd", strict=False)
    assert sqlite_reg.open("me/odd").skipped
