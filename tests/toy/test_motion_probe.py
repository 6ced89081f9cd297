"""The motion probe (weightlab.toy.motion_probe) on the shipped toy teacher.

Expected values come from invariants, not from a reference library: a per-frame model (motion branch off) cannot
see frame order, so its shuffled / reversed columns equal ``own`` up to float32 rounding (1e-5 relative: the same
per-frame arithmetic in another batch order); a module with a live motion branch (output projections drawn with
σ 0.5) must move them by more than 1e-4, ten times that bound.
"""

from types import SimpleNamespace

import pytest
import torch

from weightlab.toy.family import SHIPPED
from weightlab.toy.motion_probe import COLUMNS, _opposite, main, probe
from weightlab.train import motion_module

TEACHER = SHIPPED / "teacher"


def _module(folder, *, live: bool):
    """A MotionAdapter folder fitting the toy teacher: fresh (branch off), or with seeded random output projections."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(TEACHER / "unet")
    adapter = motion_module.build_adapter(SimpleNamespace(init_motion=None, motion_config={}, seed=0),
                                          SimpleNamespace(unet=unet))
    if live:
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                if ".proj_out." in name:
                    p.normal_(0, 0.5)
    adapter.save_pretrained(folder)
    return folder


def test_direction_words_swap_for_their_opposites():
    assert _opposite("a red circle moving left") == "a red circle moving right"
    assert _opposite("a blue square moving up") == "a blue square moving down"


@pytest.mark.parametrize("live", [False, True])
def test_frame_order_columns(tmp_path, live):
    result = probe(TEACHER, _module(tmp_path / "mm", live=live), clips=2, frames=8, timesteps=(900, 300))
    for row in result.values():
        assert list(row) == list(COLUMNS) and all(v > 0 for v in row.values())
        for column in ("motion off", "shuffled", "reversed"):
            rel = abs(row[column] - row["own"]) / row["own"]
            assert (rel > 1e-4) if live else (rel < 1e-5), (column, row)


def test_cli_prints_a_table(tmp_path, capsys):
    assert main(["--teacher", str(TEACHER), "--motion", str(_module(tmp_path / "mm", live=False)),
                 "--clips", "1", "--frames", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| t | own | motion off") and len(lines) == 2 + 5
