"""Memory: the engine drops the memory-mapped pages it has read, so a merge does not grow by the files' size."""

import gc
import sys
from pathlib import Path

import pytest
import torch

from weightlab import Recipe, Term, load
from weightlab.files import _MAPS, mmap_tensors, release_pages, save_tensors
from weightlab.merge import Input, Merger, _model_for, merge_to_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def mapped_rss(t: torch.Tensor) -> int:
    """Resident bytes of the mapping that holds ``t`` (from /proc/self/smaps)."""
    addr, inside = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the tensor")


def test_release_pages_unmaps_what_was_read_and_keeps_the_values(tmp_path):
    g = torch.Generator().manual_seed(0)
    saved = {f"w{i}": torch.randn(512, 512, generator=g) for i in range(4)}  # 1 MiB each
    save_tensors(saved, tmp_path / "w.safetensors")
    mapped = mmap_tensors(tmp_path / "w.safetensors")
    assert all(torch.equal(mapped[k], v) for k, v in saved.items())  # reads every page
    assert mapped_rss(mapped["w0"]) >= 4 << 20
    release_pages(*mapped.values())
    assert mapped_rss(mapped["w0"]) <= 64 << 10  # at most the header page(s) and fault-around remain
    assert all(torch.equal(mapped[k], v) for k, v in saved.items())  # read back from the page cache


def test_release_pages_leaves_other_tensors_alone(tmp_path):
    plain = torch.arange(1 << 20, dtype=torch.float32)
    expected = plain.clone()
    release_pages(plain, plain[10:], None, torch.empty(0))
    assert torch.equal(plain, expected)
    save_tensors({"w": torch.ones(1024)}, tmp_path / "w.safetensors")
    mapped = mmap_tensors(tmp_path / "w.safetensors")
    count = len(_MAPS)
    del mapped
    gc.collect()
    release_pages(plain)  # prunes the dead map instead of trusting its old address range
    assert len(_MAPS) < count and torch.equal(plain, expected)


class _Spy:
    """Records the address of every tensor handed to release_pages (then releases it for real)."""

    def __init__(self):
        self.addresses: set[int] = set()

    def __call__(self, *tensors):
        self.addresses.update(t.data_ptr() for t in tensors if t is not None)
        release_pages(*tensors)


def _inputs(tiny):
    return [Input(load(tiny.style_lora_kohya), "style", 0.8, "style"),
            Input(load(tiny.accel_lora), "image_accel", 1.0, "accel")]


def _read_by(inputs) -> set[int]:
    return {t.data_ptr() for i in inputs for f in i.residual.targets.values() for t in (f.down, f.up)}


def test_in_place_merge_and_validation_release_every_page_they_read(tiny, monkeypatch):
    engine, validation = _Spy(), _Spy()
    monkeypatch.setattr("weightlab.merge.release_pages", engine)
    monkeypatch.setattr("weightlab.residuals.release_pages", validation)
    base, inputs = load(tiny.base_dir), _inputs(tiny)
    merger = Merger(_model_for(base, None, device="cpu"), base, inputs)
    assert _read_by(inputs) <= validation.addresses  # the finiteness check read every factor
    merger.apply()
    touched = {base.weights[k].data_ptr() for k in merger.touched}
    assert touched | _read_by(inputs) <= engine.addresses
    merger.restore()
    untouched = {v.data_ptr() for k, v in base.weights.items() if k not in merger.touched and v.numel()}
    assert untouched and not untouched & engine.addresses  # apply and restore read only what they merge...
    merger.load_all()
    assert untouched <= engine.addresses  # ...load_all copies (and releases) the rest


def test_streaming_merge_releases_every_page_it_reads(tiny, tmp_path, monkeypatch):
    import weightlab.merge as engine_module

    engine, loaded = _Spy(), []
    monkeypatch.setattr("weightlab.merge.release_pages", engine)
    real_load_inputs = engine_module.load_inputs
    monkeypatch.setattr("weightlab.merge.load_inputs", lambda *a, **k: loaded.append(real_load_inputs(*a, **k)) or loaded[-1])
    recipe = Recipe(base=str(tiny.base_ldm), terms=[Term(source=str(tiny.accel_lora), kind="image_accel", scale=1.0)])
    merge_to_file(recipe, tmp_path / "out.safetensors", progress=False)
    (base, inputs), = loaded
    assert {v.data_ptr() for v in base.weights.values() if v.numel()} | _read_by(inputs) <= engine.addresses
