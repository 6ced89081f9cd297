"""``hf://`` imports through huggingface_hub, offline, from a local folder laid out as the HF cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from weightlab.errors import HashMismatchError, NotFoundError, RegistryError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hf_cache(root: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """Write ``files`` ({path in repo: source}) as huggingface_hub caches them: blobs, snapshot links, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for rel, src in files.items():
        data = src.read_bytes()
        # LFS files are cached under their sha256; small git files under a 40-hex git blob id.
        etag = (hashlib.sha256(data).hexdigest() if rel.endswith(".safetensors")
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


@pytest.fixture
def hf_cache(tmp_path, tiny, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    make_hf_cache(cache, "wangfuyun/AnimateLCM", {
        "AnimateLCM_sd15_t2v_lora.safetensors": tiny.accel_lora,
        "motion_adapter/config.json": tiny.motion_dir / "config.json",
        "motion_adapter/diffusion_pytorch_model.safetensors": tiny.motion_dir / "diffusion_pytorch_model.safetensors",
    })
    return cache


def test_import_a_file_from_the_cache(sqlite_reg, hf_cache, tiny):
    v = sqlite_reg.add("hf://wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors")
    assert v.ref == "wangfuyun/AnimateLCM_sd15_t2v_lora@1" and v.kind == "image_accel"
    assert v.source == f"hf://wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors@{COMMIT}"
    assert sqlite_reg.path(v.ref).read_bytes() == tiny.accel_lora.read_bytes()
    pinned = sqlite_reg.add(f"hf://wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors@{COMMIT}", name="lcm/lora")
    assert pinned.sha256 == v.sha256
    assert sqlite_reg.add("hf://wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors", name="lcm/lora",
                          revision="main") == pinned


def test_import_a_folder(sqlite_reg, hf_cache):
    v = sqlite_reg.add("hf://wangfuyun/AnimateLCM/motion_adapter", name="lcm/motion")
    assert (v.format, v.kind) == ("diffusers", "motion")
    assert sorted(f.path for f in v.files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert v.source == f"hf://wangfuyun/AnimateLCM/motion_adapter@{COMMIT}"


def _corrupt_cached(hf_cache: Path, rel: str) -> None:
    """Flip the last byte of the blob that the snapshot file ``rel`` links to: same size, valid header, wrong bytes."""
    blob = (hf_cache / "models--wangfuyun--AnimateLCM" / "snapshots" / COMMIT / rel).resolve()
    assert blob.parent.name == "blobs" and blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()  # an LFS blob
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))


def _state(reg) -> tuple:
    """What the registry holds: blobs, versions, and leftovers in the store's temp folder."""
    tmp = reg.store.tmp_dir
    return (sorted(b.sha256 for b in reg.store.list()), reg.search(all_versions=True),
            sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else [])


def test_cached_lfs_file_is_checked_against_its_sha256(sqlite_reg, hf_cache):
    before = _state(sqlite_reg)
    _corrupt_cached(hf_cache, "AnimateLCM_sd15_t2v_lora.safetensors")
    with pytest.raises(HashMismatchError, match="was declared"):
        sqlite_reg.add("hf://wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors")
    assert _state(sqlite_reg) == before


def test_a_corrupt_cached_file_in_a_folder_stores_nothing(sqlite_reg, hf_cache, tiny):
    sqlite_reg.add(tiny.style_lora_kohya, name="me/style")  # something already there, which must stay as it is
    before = _state(sqlite_reg)
    # config.json sorts (and is stored) first; the corrupt weights file comes second.
    _corrupt_cached(hf_cache, "motion_adapter/diffusion_pytorch_model.safetensors")
    with pytest.raises(HashMismatchError, match="diffusion_pytorch_model.safetensors hashes to .* was declared"):
        sqlite_reg.add("hf://wangfuyun/AnimateLCM/motion_adapter", name="lcm/motion")
    assert _state(sqlite_reg) == before


def test_a_wrong_folder_digest_stores_nothing(sqlite_reg, hf_cache):
    before = _state(sqlite_reg)
    with pytest.raises(HashMismatchError, match="manifest digest .* but 0{64} was declared; nothing was stored"):
        sqlite_reg.add("hf://wangfuyun/AnimateLCM/motion_adapter", name="lcm/motion", sha256="0" * 64)
    assert _state(sqlite_reg) == before
    v = sqlite_reg.add("hf://wangfuyun/AnimateLCM/motion_adapter", name="lcm/motion")
    assert sqlite_reg.add("hf://wangfuyun/AnimateLCM/motion_adapter", name="lcm/motion", sha256=v.sha256) == v


def test_offline_misses_say_what_to_do(sqlite_reg, hf_cache):
    with pytest.raises(NotFoundError, match="HF_HUB_OFFLINE"):
        sqlite_reg.add("hf://wangfuyun/AnimateLCM/missing.safetensors")
    with pytest.raises(NotFoundError, match="HF_HUB_OFFLINE"):
        sqlite_reg.add("hf://wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors", revision="v2")
    with pytest.raises(RegistryError, match="not a hub reference"):
        sqlite_reg.add("hf://just-one-part")
    with pytest.raises(RegistryError, match="contradicts"):
        sqlite_reg.add("hf://a/b/c.safetensors@main", revision="dev")
