"""Several processes at once, and processes killed in the middle of ``add``.

Workers are forked from the test process (torch and diffusers already imported, so they start at once). Each
opens its own Registry, waits for a shared start event, adds its files and reports the references.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest

from weightlab.errors import NotFoundError
from weightlab.registry import Registry, service, store


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _worker(url: str, home: str, jobs: list[tuple[str, str]], crash: str, ready, go, results) -> None:
    import torch

    torch.set_num_threads(1)  # OpenMP pools do not survive fork (DataLoader workers do the same)
    if crash == "during-blob-write":  # temp file written, not yet renamed into the store
        store.os.replace = _die
    elif crash == "before-commit":  # blob stored, version rows inserted, transaction still open
        create = service.crud.create_version
        service.crud.create_version = lambda session, **kw: (create(session, **kw), _die())
    elif crash == "after-commit":  # committed; the post-commit blob check never runs
        store.LocalBlobStore.exists = _die
    ready.release()
    go.wait()
    reg = Registry(url, home=home)
    results.put([reg.add(path, name=name).ref for path, name in jobs])


@pytest.fixture(autouse=True)
def _warm(tiny):
    """Import and cache in the parent what every worker needs (family signatures), so forks start warm."""
    from weightlab.inspect import inspect_path

    inspect_path(tiny.style_lora_kohya)


def _run_workers(db_url: str, home: Path, jobs: list[list[tuple[str, str]]], crash: str = "none") -> list:
    """Run one worker per job list, started together; returns (exit codes, results)."""
    ctx = mp.get_context("fork")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(db_url, str(home), job, crash, ready, go, results)) for job in jobs]
    for p in procs:
        p.start()
    for _ in procs:
        assert ready.acquire(timeout=60), "a worker did not start"
    go.set()
    outputs = [results.get(timeout=120) for p in procs if crash == "none"]
    for p in procs:
        p.join(timeout=120)
    return [p.exitcode for p in procs], outputs


def test_two_processes_adding_different_and_same_files(db_url, home, tiny):
    a = [(str(tiny.style_lora_kohya), "c/own-a"), (str(tiny.accel_lora), "c/shared"),
         (str(tiny.style_lora_peft), "c/multi"), (str(tiny.motion_lora), "c/blob-a")]
    b = [(str(tiny.style_lora_peft), "c/own-b"), (str(tiny.accel_lora), "c/shared"),
         (str(tiny.style_lora_kohya), "c/multi"), (str(tiny.motion_lora), "c/blob-b")]
    codes, (out_a, out_b) = _run_workers(db_url, home, [a, b])
    assert codes == [0, 0]
    assert out_a[1] == out_b[1] == "c/shared@1"  # same file, same name: one version, no error
    assert sorted([out_a[2], out_b[2]]) == ["c/multi@1", "c/multi@2"]  # different files, same name: none lost
    with Registry(db_url, home=home) as reg:
        assert [v.ref for v in reg.search(all_versions=True)] == [
            "c/blob-a@1", "c/blob-b@1", "c/multi@1", "c/multi@2", "c/own-a@1", "c/own-b@1", "c/shared@1"]
        assert len(list(reg.store.list())) == 4  # one blob per distinct file
        assert reg.verify().ok
        assert list((home / "blobs" / "tmp").iterdir()) == []


@pytest.mark.parametrize("crash", ["during-blob-write", "before-commit"])
def test_crash_before_commit_leaves_no_half_artifact(db_url, home, tiny, crash):
    if crash == "during-blob-write" and db_url.startswith("postgresql"):
        pytest.skip("the blob write happens before any database work: the SQLite run covers it")
    codes, _ = _run_workers(db_url, home, [[(str(tiny.style_lora_kohya), "c/style")]], crash)
    assert codes == [-signal.SIGKILL]
    with Registry(db_url, home=home) as reg:
        with pytest.raises(NotFoundError):
            reg.get("c/style")
        assert reg.search(all_versions=True) == []
        leftovers = len(list(reg.store.list())) + len(list((home / "blobs" / "tmp").iterdir()))
        assert leftovers == 1  # an unreferenced blob or temp file, which gc collects
        assert reg.verify().ok
        report = reg.gc(grace=0)
        assert len(report.deleted) + report.temp_removed == 1
        assert list(reg.store.list()) == []
        v = reg.add(tiny.style_lora_kohya, name="c/style")  # and the add simply works again
        assert v.ref == "c/style@1" and reg.verify().ok


def test_crash_after_commit_leaves_a_complete_version(tmp_path, home, tiny):
    db_url = f"sqlite:///{tmp_path / 'registry.db'}"
    codes, _ = _run_workers(db_url, home, [[(str(tiny.style_lora_kohya), "c/style")]], "after-commit")
    assert codes == [-signal.SIGKILL]
    with Registry(db_url, home=home) as reg:
        v = reg.get("c/style")
        assert reg.verify().ok and reg.gc(grace=0).deleted == []
        assert reg.path(v.ref).read_bytes() == tiny.style_lora_kohya.read_bytes()
