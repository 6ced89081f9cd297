"""The merge engine resolves paths only; the registry's resolver (`weightlab.registry.resolve`) resolves names."""

import pytest

from weightlab import Recipe, Term
from weightlab.errors import NotFoundError, UnresolvedSourceError
from weightlab.files import tensor_hash
from weightlab.merge import merge_to_file, resolve_path
from weightlab.registry.resolve import LocalResolver, version_path
from weightlab.registry.service import Registry


def test_a_reference_without_a_resolver_is_refused_with_the_fix(tiny, tmp_path):
    recipe = Recipe(base="sd/base:prod", terms=[Term(source=str(tiny.accel_lora), kind="image_accel")])
    out = tmp_path / "never.safetensors"
    with pytest.raises(UnresolvedSourceError, match="resolves paths only.*LocalResolver.*CLI"):
        merge_to_file(recipe, out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert resolve_path(str(tiny.accel_lora)) == tiny.accel_lora


def test_local_resolver_merges_by_name_as_by_path(tiny, tmp_path):
    """Registered names resolve to the registered copies: the merge equals the merge of the original paths
    (identical tensors, so identical tensor hashes)."""
    home = tmp_path / "home"
    with LocalResolver(home=home) as resolve:  # paths never open a registry
        assert resolve(str(tiny.base_dir)) == tiny.base_dir
        assert not home.exists()
    with Registry(home=home) as reg:
        reg.alias(reg.add(tiny.base_dir, name="sd/base").ref, "prod")
        reg.add(tiny.style_lora_kohya, name="me/style")
        assert version_path(reg, "me/style@1") == reg.path("me/style@1")
    by_name = Recipe(base="sd/base:prod", terms=[Term(source="me/style", kind="style", scale=0.7)])
    by_path = Recipe(base=str(tiny.base_dir), terms=[Term(source=str(tiny.style_lora_kohya), kind="style", scale=0.7)])
    with LocalResolver(home=home) as resolve:
        named = merge_to_file(by_name, tmp_path / "named.safetensors", progress=False, resolve=resolve)
        with pytest.raises(NotFoundError):
            resolve("me/nothing")
        with pytest.raises(UnresolvedSourceError, match="not a registry reference"):
            resolve(str(tmp_path / "missing.safetensors"))
    plain = merge_to_file(by_path, tmp_path / "plain.safetensors", progress=False)
    assert named["output_hash"] == plain["output_hash"] == tensor_hash(tmp_path / "named.safetensors")
