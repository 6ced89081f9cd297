"""Configs (YAML round trip, errors that say what to fix) and the ``weightlab train`` command group."""

import pytest
from typer.testing import CliRunner

from weightlab.errors import WeightlabError
from weightlab.train import DataConfig, ImageLCMConfig, MotionLCMConfig, StyleLoRAConfig, load_config
from weightlab.train.config import LCM_LORA_TARGETS


def test_defaults_follow_the_design():
    cfg = ImageLCMConfig(base="b", output_dir="o", data=DataConfig(format="synthetic_images"))
    assert (cfg.rank, cfg.num_ddim_timesteps, cfg.w_min, cfg.w_max, cfg.huber_c, cfg.timestep_scaling,
            cfg.sigma_data, cfg.max_grad_norm, cfg.loss) == (64, 50, 5.0, 15.0, 0.001, 10.0, 0.5, 1.0, "huber")
    assert cfg.target_modules == LCM_LORA_TARGETS and len(LCM_LORA_TARGETS) == 14
    motion = MotionLCMConfig(base="b", output_dir="o", data=DataConfig(format="synthetic_videos"), image_lora="l",
                             teacher_motion="m")
    assert (motion.ema_decay, motion.empty_caption_prob, motion.beta_schedule, motion.init_motion,
            motion.data.num_frames) == (0.95, 0.1, "linear", "teacher", 16)


def test_yaml_round_trip(tmp_path):
    cfg = StyleLoRAConfig(base=tmp_path / "base", output_dir=tmp_path / "out", snr_gamma=5.0,
                          data=DataConfig(format="image_folder", path=tmp_path / "imgs", resolution=64))
    cfg.to_yaml(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", StyleLoRAConfig) == cfg


@pytest.mark.parametrize("doc, message", [
    ("base: b\noutput_dir: o\ndata: {format: synthetic_images}\nlearning_rat: 0.1\n", r"learning_rat: Extra inputs"),
    ("base: b\noutput_dir: o\ndata: {format: image_folder}\n", r"data: Value error, .*set data.path"),
    ("base: b\noutput_dir: o\ndata: {format: synthetic_images}\nw_min: 9\nw_max: 2\n", r"w_min \(9.0\) must not exceed"),
    ("- a list\n", "must be a YAML mapping"),
])
def test_config_errors_name_the_field(tmp_path, doc, message):
    (tmp_path / "c.yaml").write_text(doc)
    with pytest.raises(WeightlabError, match=message):
        load_config(tmp_path / "c.yaml", ImageLCMConfig)


def test_cli_lists_the_trainers_and_reports_errors_without_traceback(tmp_path):
    from weightlab.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["train", "--help"])
    assert out.exit_code == 0 and all(n in out.output for n in ("teacher", "motion-module", "style-lora", "image-lcm",
                                                                "motion-lcm"))
    out = runner.invoke(app, ["train", "motion-lcm", "--help"])  # the trainer's own fields, with their defaults
    assert out.exit_code == 0 and "teacher_motion: required" in out.output and "coupled: false" in out.output
    out = runner.invoke(app, ["train", "image-lcm", "--config", str(tmp_path / "missing.yaml")])
    assert out.exit_code == 2 and "no such config file" in out.output and "Traceback" not in out.output
    # an input that is neither a path nor a registry reference: the registry's resolver says so, nothing runs
    (tmp_path / "c.yaml").write_text(f"base: no/such/base\noutput_dir: {tmp_path / 'o'}\ndata: {{format: synthetic_images}}\n")
    out = runner.invoke(app, ["train", "teacher", "--config", str(tmp_path / "c.yaml")])
    assert out.exit_code == 2 and "no such file or folder" in out.output and not (tmp_path / "o").exists()
