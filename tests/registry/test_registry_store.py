"""Blob store, verify and gc: atomic deduplicated writes, corruption found, referenced blobs never collected."""

from __future__ import annotations

import os
import stat
import time
from types import SimpleNamespace

import pytest

from weightlab.errors import HashMismatchError, NotFoundError, RegistryError
from weightlab.files import file_sha256
from weightlab.registry import LocalBlobStore
from weightlab.registry.service import open_store


def _corrupt(path) -> None:
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_put_is_content_addressed_deduplicated_and_read_only(tmp_path, tiny):
    store = LocalBlobStore(tmp_path / "blobs")
    blob = store.put(tiny.style_lora_kohya)
    assert blob.sha256 == file_sha256(tiny.style_lora_kohya) and blob.size == tiny.style_lora_kohya.stat().st_size
    path = store.local_path(blob.sha256)
    assert path.read_bytes() == tiny.style_lora_kohya.read_bytes()
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    os.utime(path, (1, 1))
    assert store.put(tiny.style_lora_kohya, sha256=blob.sha256) == blob.__class__(blob.sha256, blob.size, pytest.approx(time.time(), abs=60))
    assert store.stat(blob.sha256).mtime > 1  # writing it again freshens it (gc's grace period covers the new user)
    assert [b.sha256 for b in store.list()] == [blob.sha256]
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    assert store.rehash(blob.sha256) == blob.sha256


def test_declared_hash_mismatch_stores_nothing(tmp_path, tiny):
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(HashMismatchError, match="was declared"):
        store.put(tiny.style_lora_kohya, sha256="f" * 64)
    assert list(store.list()) == [] and list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_trusted_put_skips_hashing_only_for_a_received_file(tmp_path, tiny, monkeypatch):
    store = LocalBlobStore(tmp_path / "blobs")
    digest = file_sha256(tiny.style_lora_kohya)
    with pytest.raises(HashMismatchError):  # outside tmp_dir, trust is not given: the file is hashed
        store.put(tiny.style_lora_kohya, sha256="f" * 64, trusted=True)
    received = store.tmp_dir / "upload-1" / "model.safetensors"
    received.parent.mkdir(parents=True)
    received.write_bytes(tiny.style_lora_kohya.read_bytes())
    class NoHashing:
        def update(self, data):
            raise AssertionError("a trusted file was hashed again")

    monkeypatch.setattr("weightlab.registry.store.hashlib", SimpleNamespace(sha256=NoHashing))
    blob = store.put(received, sha256=digest, trusted=True)
    assert blob.sha256 == digest and blob.size == received.stat().st_size
    assert store.local_path(digest).read_bytes() == received.read_bytes()


def test_concurrent_builds_of_a_checkout_keep_the_first(sqlite_reg, tiny):
    """A builder that finds the checkout complete once its own copy is ready leaves it alone: replacing it would
    pull the files from under a reader (an upload being inspected) that the first builder already returned to."""
    v = sqlite_reg.add(tiny.style_lora_kohya, name="me/style")
    first = sqlite_reg.path(v.ref)
    before = first.parent.stat().st_ino
    sqlite_reg._checkouts._build(first.parent, v.files)  # a second builder that looked before the first finished
    assert first.parent.stat().st_ino == before and first.is_file()


def test_store_errors(tmp_path):
    store = open_store(f"file://{tmp_path / 'blobs'}")
    assert isinstance(store, LocalBlobStore)
    with pytest.raises(NotFoundError, match="registry verify"):
        store.local_path("a" * 64)
    with pytest.raises(RegistryError, match="not a sha256"):
        store.stat("../../etc/passwd")
    with pytest.raises(RegistryError, match="WEIGHTLAB_BLOB_STORE"):
        open_store("gs://bucket/prefix")


def test_verify_finds_corrupt_and_missing_blobs(sqlite_reg, tiny):
    reg = sqlite_reg
    style = reg.add(tiny.style_lora_kohya, name="me/style")
    reg.add(tiny.style_lora_kohya, name="me/same")
    motion = reg.add(tiny.motion_dir, name="me/motion")
    assert reg.verify().ok
    sha = style.files[0].sha256
    _corrupt(reg.store.local_path(sha))
    weights = next(f for f in motion.files if f.path.endswith(".safetensors"))
    reg.store.delete(weights.sha256)
    report = reg.verify()
    assert not report.ok and report.checked == 2
    corrupt, missing = report.problems
    assert (corrupt.problem, corrupt.sha256, corrupt.versions) == ("corrupt", sha, ["me/same@1", "me/style@1"])
    assert corrupt.actual_sha256 != sha
    assert (missing.problem, missing.versions) == ("missing", ["me/motion@1"])
    with pytest.raises(NotFoundError, match="registry verify"):
        reg.path("me/motion")
    # Repair: drop the corrupt blob, then add the originals again.
    assert reg.verify(remove_corrupt=True).removed == [sha]
    reg.add(tiny.style_lora_kohya, name="me/style")
    reg.add(tiny.motion_dir, name="me/motion")
    assert reg.verify().ok
    assert reg.path("me/style").read_bytes() == tiny.style_lora_kohya.read_bytes()
    assert (reg.path("me/motion") / weights.path).is_file()


def test_gc_removes_only_unreferenced_blobs_after_the_grace_period(sqlite_reg, tiny, tmp_path):
    reg = sqlite_reg
    kept = [reg.add(tiny.style_lora_kohya, name="me/style"), reg.add(tiny.motion_dir, name="me/motion")]
    orphan = reg.store.put(tiny.accel_lora).sha256  # as left by an add that crashed before its commit
    stale_tmp = reg.store.root / "tmp" / "blob-dead.part"
    stale_tmp.write_bytes(b"half a blob")
    for blob in reg.store.list():  # everything old: only references may protect a blob
        os.utime(reg.store.local_path(blob.sha256), (1, 1))
    os.utime(stale_tmp, (1, 1))

    assert reg.gc(grace=3600, dry_run=True).deleted == [orphan]
    assert reg.store.exists(orphan)
    report = reg.gc(grace=3600)
    assert report.deleted == [orphan] and report.freed_bytes == tiny.accel_lora.stat().st_size
    assert report.temp_removed == 1 and report.kept == 3
    assert not reg.store.exists(orphan) and not stale_tmp.exists()
    assert reg.verify().ok and all(reg.store.exists(f.sha256) for v in kept for f in v.files)

    fresh = reg.store.put(tiny.accel_lora).sha256  # inside the grace period: an add may be about to use it
    assert reg.gc().deleted == [] and reg.store.exists(fresh)
    assert reg.gc(grace=0).deleted == [fresh]


def test_gc_removes_checkouts_of_unregistered_content(sqlite_reg, tiny, monkeypatch):
    reg = sqlite_reg
    reg.add(tiny.style_lora_kohya, name="me/style")
    wanted = reg.path("me/style").parent

    def fail(*args, **kwargs):
        raise RegistryError("commit failed")

    monkeypatch.setattr("weightlab.registry.service.crud.create_version", fail)
    with pytest.raises(RegistryError, match="commit failed"):  # stored and inspected, never committed
        reg.add(tiny.accel_lora, name="me/lcm")
    assert len(list(wanted.parent.iterdir())) == 2
    assert reg.gc(grace=0).checkouts_removed == 1
    assert list(wanted.parent.iterdir()) == [wanted] and reg.path("me/style").is_file()


def test_add_restores_a_blob_collected_between_its_write_and_its_commit(sqlite_reg, tiny, monkeypatch):
    """gc cannot know an add in progress will reference a blob; the add re-writes it after committing."""
    from weightlab.registry import crud

    reg = sqlite_reg
    original = crud.create_version

    def create_after_gc(session, **kw):
        for f in kw["new"].files:
            reg.store.delete(f.sha256)  # what a gc with grace=0 would do at this moment
        return original(session, **kw)

    monkeypatch.setattr("weightlab.registry.service.crud.create_version", create_after_gc)
    v = reg.add(tiny.style_lora_kohya, name="me/style")
    assert reg.store.exists(v.files[0].sha256) and reg.verify().ok
