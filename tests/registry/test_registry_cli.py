"""The registry commands of the ``weightlab`` CLI, against the SQLite registry under ``$WEIGHTLAB_HOME``."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from weightlab.cli import app
from weightlab.registry import Derivation, LineageInput, Registry


@pytest.fixture
def cli():
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == code, result.output
        return result.output

    return run


def test_add_ls_show_alias_tag(cli, tiny):
    assert "added me/style@1 (style, lora, rank 4, sd15" in cli("add", tiny.style_lora_kohya, "--name", "me/style",
                                                               "--tag", "anime", "--meta", "author=me")
    assert "already holds these tensors; nothing added" in cli("add", tiny.style_lora_kohya, "-n", "me/style")
    assert "added local/accel_lcm_lora@1" in cli("import", tiny.accel_lora)
    listed = json.loads(cli("ls", "--json"))
    assert [v["ref"] for v in listed] == ["local/accel_lcm_lora@1", "me/style@1"]
    assert listed[1]["metadata"] == {"author": "me"} and listed[1]["tags"] == ["anime"]
    assert "me/style@1" in cli("ls", "--kind", "style") and "accel" not in cli("ls", "--tag", "anime")
    assert "nothing registered matches" in cli("ls", "--kind", "motion")
    assert "me/style:prod -> me/style@1" in cli("alias", "me/style@1", "prod")
    assert "me/style@1: anime, cute" in cli("tag", "me/style", "cute")
    assert "me/style@1: cute" in cli("tag", "me/style", "--remove", "anime")
    shown = json.loads(cli("show", "me/style:prod", "--json"))
    assert shown["aliases"] == ["prod"] and shown["lineage"]["relation"] is None
    text = cli("show", "me/style")
    assert "tensor hash" in text and tiny.style_lora_kohya.name in text
    assert "deleted alias me/style:prod" in cli("alias", "me/style:prod", "--delete")


def test_errors_exit_2_with_the_fix(cli, tiny, tmp_path):
    out = cli("show", "me/nothing", code=2)
    assert "error:" in out and "weightlab ls" in out
    pickled = tmp_path / "x.ckpt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    assert "--allow-pickle" in cli("add", pickled, "--name", "me/x", code=2)
    assert "--meta" in cli("add", tiny.accel_lora, "--name", "me/x", "--meta", "novalue", code=2)


def test_lineage_tree(cli, tiny, home):
    with Registry() as reg:  # the CLI's registry: $WEIGHTLAB_HOME
        reg.add(tiny.base_ldm, name="sd/base")
        reg.add(tiny.style_lora_kohya, name="me/style")
        reg.add(tiny.style_dense, name="me/anim", kind="base", lineage=Derivation(
            relation="merged_from", recipe={"method": "linear", "dtype": "float16"},
            inputs=[LineageInput(ref="sd/base@1", role="base"), LineageInput(ref="me/style", role="style", scale=0.8),
                    LineageInput(tensor_hash="ab" * 32, label="/tmp/motion.safetensors", role="motion", scale=1.0)]))
    tree = cli("lineage", "me/anim")
    for part in ("me/anim@1", "merged_from", "linear, float16", "base sd/base@1", "style x0.8 me/style@1",
                 "motion x1 /tmp/motion.safetensors", "not registered"):
        assert part in tree, tree
    node = json.loads(cli("lineage", "me/anim", "--json"))
    assert [e["scale"] for e in node["inputs"]] == [None, 0.8, 1.0]
    assert "merged_from" in cli("show", "me/anim")


def test_db_upgrade_verify_gc(cli, tiny, home):
    assert "schema empty -> 0004" in cli("db", "upgrade")
    assert "already at 0004" in cli("db", "upgrade")
    cli("add", tiny.style_lora_kohya, "--name", "me/style")
    assert "checked 1 blob(s): 0 problem(s)" in cli("registry", "verify")
    with Registry() as reg:
        orphan = reg.store.put(tiny.accel_lora).sha256
        blob = reg.store.local_path(reg.get("me/style").files[0].sha256)
    os.chmod(blob, stat.S_IRUSR | stat.S_IWUSR)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    out = cli("registry", "verify", code=1)
    assert "corrupt" in out and "me/style@1" in out and "Fix:" in out
    assert json.loads(cli("registry", "gc", "--grace", "0", "--dry-run", "--json"))["deleted"] == [orphan]
    assert "deleted 1 blob(s)" in cli("registry", "gc", "--grace", "0")
