"""The trained toy family shipped in the package, and the demo's clip made from it.

Kinds: the family's integrity is self-consistency (its files against the hashes ``ship`` recorded); the demo clip
is behaviour judged by the toy evaluator, a classifier trained on real synthetic clips (not on our samples), so the
check can fail: a model that renders noise or the wrong motion reads as another shape or direction.
"""

import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from weightlab.errors import MissingComponentError, WeightlabError
from weightlab.files import file_sha256
from weightlab.toy import family as fam
from weightlab.toy.data import parse_caption


def test_the_shipped_family_is_complete_small_and_matches_its_hashes():
    family = fam.toy_family()
    info = family.info()
    files = {p.relative_to(family.root).as_posix(): p for p in family.root.rglob("*")
             if p.is_file() and p.name != "family.json"}
    assert set(files) == set(info["sha256"])
    assert all(file_sha256(p) == info["sha256"][name] for name, p in files.items())
    assert info["bytes"] == sum(p.stat().st_size for p in files.values()) <= fam.MAX_BYTES
    assert "--ship" in info["command"] and "--quick" not in info["command"]  # the full run's models, not the quick's
    assert [t.kind for t in family.recipe().terms] == ["image_accel", "motion", "style"]
    assert [t.kind for t in family.recipe(style=0).terms] == ["image_accel", "motion"]


def _fake_run(root: Path) -> Path:
    for src, _ in fam.PIECES.values():
        path = root / src
        if "." in path.name:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 100)
        else:
            (path / "unet").mkdir(parents=True)
            (path / "unet" / "config.json").write_text("{}")
    return root


def test_ship_refuses_an_unfinished_run_and_leaves_the_old_family(tmp_path):
    """Bad input: a run without its style stage; the destination's previous family stays as it was."""
    run = _fake_run(tmp_path / "run")
    dest = fam.ship(run, tmp_path / "family", info={"command": "c"})
    before = {p: p.read_bytes() for p in dest.root.rglob("*") if p.is_file()}
    (run / fam.PIECES["style_lora.safetensors"][0]).unlink()
    with pytest.raises(MissingComponentError, match="style_lora"):
        fam.ship(run, tmp_path / "family")
    assert {p: p.read_bytes() for p in dest.root.rglob("*") if p.is_file()} == before


def test_ship_refuses_a_family_over_the_size_limit(tmp_path, monkeypatch):
    run = _fake_run(tmp_path / "run")
    monkeypatch.setattr(fam, "MAX_BYTES", 200)
    with pytest.raises(WeightlabError, match="MB"):
        fam.ship(run, tmp_path / "family")
    assert not (tmp_path / "family").exists() and not (tmp_path / "family.new").exists()


def test_toy_family_names_what_is_missing_and_how_to_regenerate(tmp_path):
    shutil.copytree(fam.toy_family().root, tmp_path / "f")
    (tmp_path / "f" / "lcm_lora.safetensors").unlink()
    with pytest.raises(MissingComponentError, match=r"lcm_lora\.safetensors.*--ship"):
        fam.toy_family(tmp_path / "f")


@pytest.fixture(scope="module")
def demo_clip(tmp_path_factory):
    """The demo's own steps (family, registry, Eq. 2 merge by names, 4-step sampling with i.i.d. and with moving
    noise) in a fresh home, and what the toy classifier reads in the clips they wrote: ``{"torch" | "moving": (clip,
    paths, read, described)}``."""
    from weightlab import demo as d
    from weightlab.toy.evaluate import Evaluator

    demo = d.Demo(home=tmp_path_factory.mktemp("demo"))
    for step in (d.load_family, d.register_family, d.merge_by_name, d.sample_pytorch, d.sample_moving_noise):
        step(demo)
    evaluator = Evaluator.load(demo.family.evaluator)
    out = {}
    for name in ("torch", "moving"):
        clip, paths = demo.results[name]
        read = {a: int(v[0]) for a, v in evaluator.predict(clip.frames[None]).items()}
        out[name] = clip, paths, read, evaluator.describe(clip.frames)
    return out


def test_the_demo_clip_shows_the_prompted_shape_in_the_merged_style(demo_clip):
    """Shape and colour as prompted, and outlined (the merged style LoRA); the GIF and the strip are the clip."""
    from weightlab import demo as d

    clip, paths, read, described = demo_clip["torch"]
    want = parse_caption(d.PROMPT)
    assert (read["shape"], read["colour"], read["style"]) == (want["shape"], want["colour"], 1), described
    gif = iio.imread(paths["gif"], index=None)
    assert gif.shape[:3] == (16, 32 * d.SCALE, 32 * d.SCALE)
    strip = iio.imread(paths["png"])
    assert strip.shape[:2] == (32 * d.SCALE // 2, 16 * 32 * d.SCALE // 2)
    assert np.array_equal(strip[:: d.SCALE // 2, : 32 * d.SCALE // 2 : d.SCALE // 2, :3], clip.frames[0])


@pytest.mark.xfail(strict=True, reason="the shipped toy motion module does not follow the prompt's direction: "
                   "direction accuracy is at chance (0.19-0.34) for every model of the full run, teacher included; "
                   "see README 'Reproducing AnimateLCM at toy scale'. Remove this mark when a retrained family passes.")
def test_the_demo_clip_moves_the_prompted_way(demo_clip):
    from weightlab import demo as d

    _, _, read, described = demo_clip["torch"]
    assert read["direction"] == parse_caption(d.PROMPT)["direction"], described


def test_the_demo_clip_with_moving_noise_moves_the_prompted_way(demo_clip):
    """The demo's second clip, same prompt and seed, with the noise moving as a toy clip with the prompt's direction
    does (:mod:`weightlab.noise_prior`): the classifier reads the prompted shape and direction. One seeded draw: on
    64 held-out prompts moving noise reads the prompted direction 59% of the time (i.i.d. noise: 30%; README, "Moving
    noise"). Colour and style are not asserted: with shared noise the clip shows one colour in 77% of its frames,
    so the classifier's vote over frames is one draw of a per-frame colour the model gets right half the time."""
    from weightlab import demo as d

    clip, paths, read, described = demo_clip["moving"]
    want = parse_caption(d.PROMPT)
    assert (read["shape"], read["direction"]) == (want["shape"], want["direction"]), described
    strip = iio.imread(paths["png"])
    assert np.array_equal(strip[:: d.SCALE // 2, : 32 * d.SCALE // 2 : d.SCALE // 2, :3], clip.frames[0])
