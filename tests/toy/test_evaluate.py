"""The toy evaluator: the Fréchet distance against closed forms, a classifier that reads held-out real data, and
metrics that separate real from wrong samples."""

import math

import numpy as np
import pytest

from weightlab.errors import WeightlabError
from weightlab.toy.data import BACKGROUND, HELD_OUT, outline, parse_caption, toy_clip, toy_set, write_image_folder
from weightlab.toy.evaluate import Evaluator, frechet_distance, frechet_distance_of


def test_frechet_distance_matches_hand_computed_cases():
    """Reference kind: closed forms worked by hand, in float64. Tolerance 1e-12 relative: two 2×2 eigen-
    decompositions in float64 lose a few ulps, nothing more."""
    # Commuting (diagonal) covariances: FD = |Δμ|² + Σ (√a_i − √b_i)² = 1 + (1 − 2)² + (2 − 3)² = 3.
    fd = frechet_distance(np.array([0.0, 1.0]), np.diag([1.0, 4.0]), np.array([1.0, 1.0]), np.diag([4.0, 9.0]))
    assert fd == pytest.approx(3.0, rel=1e-12)
    # Non-commuting: for a 2×2 PSD M, tr √M = √(tr M + 2√det M); with M similar to Σ₁Σ₂, tr(Σ₁Σ₂) = 2 + 6 = 8 and
    # det Σ₁ det Σ₂ = 3·3, so tr((Σ₁Σ₂)^½) = √14 and FD = 4 + 4 − 2√14 (equal means).
    s1, s2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 3.0])
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(8 - 2 * math.sqrt(14), rel=1e-12)
    # Symmetric in its two arguments although the formula is not written symmetrically.
    assert frechet_distance(np.zeros(2), s2, np.zeros(2), s1) == pytest.approx(8 - 2 * math.sqrt(14), rel=1e-12)


def test_frechet_distance_of_samples_with_singular_covariances():
    """Reference kind: identities. Fewer samples than features (singular covariances) still gives FD(X, X) = 0 up to
    √ε of the covariance scale (eigenvalues near 0 under a square root), and a shift by δ gives |δ|² exactly."""
    x = np.random.default_rng(0).normal(size=(10, 32))
    scale = np.trace(np.cov(x, rowvar=False))
    assert abs(frechet_distance_of(x, x)) < 1e-6 * scale
    delta = np.full(32, 0.5)
    assert frechet_distance_of(x, x + delta) == pytest.approx(32 * 0.25, abs=1e-6 * scale)
    with pytest.raises(WeightlabError, match="same size"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(WeightlabError, match="at least 2"):
        frechet_distance_of(x[:1], x)


def test_toy_data_labels_and_outline():
    """Behaviour: labels are those the caption names; the outline keeps the rim (no new colours) and empties the
    inside; speeds below 1 move less per frame."""
    assert parse_caption("a blue square moving up") == {"shape": 1, "colour": 2, "direction": 3, "style": None}
    frames, caption = toy_clip(5, num_frames=16)
    ring = outline(frames)
    assert caption == "a green square moving right"
    def shape_pixels(clip):
        return (clip != np.array(BACKGROUND, np.uint8)).any(-1)

    assert 0 < shape_pixels(ring).sum() < 0.8 * shape_pixels(frames).sum()
    assert set(map(tuple, ring.reshape(-1, 3))) <= set(map(tuple, frames.reshape(-1, 3)))

    def travel(clip):  # horizontal centre of mass, first vs last frame
        xs = [np.nonzero(shape_pixels(f))[1].mean() for f in (clip[0], clip[-1])]
        return xs[1] - xs[0]

    assert 0 < travel(toy_clip(5, speed=0.5)[0]) < 0.75 * travel(frames)
    with pytest.raises(WeightlabError, match="style"):
        toy_clip(0, style="striped")


def test_image_folder_reads_back_with_the_trainers_reader(tmp_path):
    """Format reference: the trainers' own ``ImageFolder`` reads the folder; PNG is lossless, so the pixels are
    exactly one frame of the clip (scaled to [-1, 1] by the trainers' ``to_pixels``)."""
    import torch

    from weightlab.train.data import ImageFolder, to_pixels

    item = ImageFolder(write_image_folder(tmp_path / "images", 3, style="outlined"), 32).load(2, torch.Generator())
    frames, caption = toy_clip(2, style="outlined")
    assert item["caption"] == caption.split(" moving ")[0] == "a blue circle"
    assert any(torch.equal(item["pixels"], to_pixels(f)) for f in frames)


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator.train(seed=0, samples=512, steps=800)


def test_classifier_reads_held_out_real_data(evaluator):
    """Behaviour on held-out data (indices the classifier never saw; other sizes and lateral offsets). Threshold
    0.95 per attribute, far above chance (0.25 for colour and direction, 0.5 for shape and style); measured 1.00."""
    for style in ("filled", "outlined"):
        for speed in (1.0, 0.5):
            real = toy_set(64, start=HELD_OUT, speeds=(speed,), style=style)
            acc = evaluator.prompt_accuracy(real.frames, real.captions, style=style)
            assert min(acc.values()) >= 0.95, (style, speed, acc)
    images = toy_set(64, start=HELD_OUT, num_frames=None)
    acc = evaluator.prompt_accuracy(images.frames, images.captions)
    assert set(acc) == {"shape", "colour", "all"} and acc["all"] >= 0.95  # style only when asked for


def test_prompt_accuracy_can_fail(evaluator):
    """The metric is not trivially 1: clips captioned with the opposite direction score 0 on direction."""
    real = toy_set(64, start=HELD_OUT)
    flip = {"right": "left", "left": "right", "up": "down", "down": "up"}
    wrong = [" ".join(flip.get(w, w) for w in c.split()) for c in real.captions]
    acc = evaluator.prompt_accuracy(real.frames, wrong)
    assert acc["direction"] <= 0.05 and acc["all"] <= 0.05 and acc["shape"] >= 0.95


def test_fd_separates_real_from_wrong_samples(evaluator):
    """Behaviour: FD between two disjoint real sets is small next to FD to noise, to another style, or to clips
    whose shapes stand still. Margins of 10×: measured ratios are 100× or more (noise) and 30× (outlined)."""
    a, b = toy_set(64, start=HELD_OUT), toy_set(64, start=HELD_OUT + 500_000)
    floor = evaluator.fvd(a.frames, b.frames)
    noise = np.random.default_rng(0).integers(0, 256, a.frames.shape, dtype=np.uint8)
    outlined = toy_set(64, start=HELD_OUT + 500_000, style="outlined").frames
    still = np.repeat(b.frames[:, 8:9], b.frames.shape[1], axis=1)  # the middle frame, held for the whole clip
    assert 10 * floor < evaluator.fvd(a.frames, still)
    assert 10 * floor < evaluator.fvd(a.frames, outlined) < evaluator.fvd(a.frames, noise)
    ia, ib = toy_set(64, start=HELD_OUT, num_frames=None), toy_set(64, start=HELD_OUT + 500_000, num_frames=None)
    assert 10 * evaluator.fid(ia.frames, ib.frames) < evaluator.fid(ia.frames, noise[:, 0])
    with pytest.raises(WeightlabError, match="uint8"):
        evaluator.features(a.frames.astype(np.float32))
    with pytest.raises(WeightlabError, match="fid"):
        evaluator.fvd(ia.frames, ib.frames)


def test_save_load_round_trip(evaluator, tmp_path):
    """Exactness: the saved classifier gives bit-identical features."""
    real = toy_set(8, start=HELD_OUT)
    again = Evaluator.load(evaluator.save(tmp_path / "ev.safetensors"))
    assert np.array_equal(again.features(real.frames), evaluator.features(real.frames))
