"""The toy noise motion and the noise-prior table (weightlab.toy.noise_table) on the shipped family.

Kinds: ``noise_motion`` is checked against the toy data generator's own clips (how far their shapes actually move
per frame, measured from the pixels), not against its formula; the table is a smoke run of the command (2 prompts
cannot order the rows), whose figures the README reports from the full 64-prompt run.
"""

import numpy as np
import pytest

from weightlab.toy.data import BACKGROUND, noise_motion, toy_set
from weightlab.toy.noise_table import ROWS, main


def _centroids(clip: np.ndarray) -> np.ndarray:
    """(x, y) of each frame's shape: pixels away from the background."""
    ink = np.abs(clip.astype(float) - BACKGROUND).sum(-1) > 30
    ys, xs = np.mgrid[: clip.shape[1], : clip.shape[2]]
    return np.array([[(xs * m).sum() / m.sum(), (ys * m).sum() / m.sum()] for m in ink])


def test_noise_motion_is_the_toy_clips_own_speed_in_latent_pixels():
    """Measured: 32 clips' mean displacement per frame (pixels / 2, the VAE's factor) against the caption's motion,
    per direction. The mean radius stands in for each clip's own, so one clip differs by up to ~8% (radii 0.12-0.20
    of the frame); the mean over 8 clips per direction within 5%, the sign and axis exactly."""
    clips = toy_set(32, start=0)
    moved = {}
    for frames, caption in zip(clips.frames, clips.captions):
        c = _centroids(frames)
        moved.setdefault(caption.split()[-1], []).append((c[-1] - c[0]) / (len(c) - 1) / 2)
    for direction, steps in moved.items():
        want = np.array(noise_motion(f"a red circle moving {direction}"))
        got = np.mean(steps, axis=0)
        assert np.all(np.sign(got.round(3)) == np.sign(want))
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max(), (direction, got, want)
    assert noise_motion("a red circle") == (0.0, 0.0)


@pytest.mark.slow
def test_the_noise_table_command_prints_every_row(capsys):
    assert main(["--clips", "2"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {row} |" in out for row in ROWS), out
