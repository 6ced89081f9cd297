"""The registry's limits on what it stores (metadata and other free-form JSON, names, tags), the finiteness it
records at ingest, and where that is shown and enforced (`show`, `inspect`, merges), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from weightlab.errors import NonFiniteError, RegistryError
from weightlab.registry.schemas import (JSON_MAX_BYTES, JSON_MAX_DEPTH, JSON_MAX_ITEMS, JSON_MAX_KEY, JSON_MAX_STRING,
                                        MetadataError, check_json, check_label, check_name)


def nested(depth: int) -> dict:
    doc: dict = {}
    for _ in range(depth - 1):
        doc = {"a": doc}
    return doc


@pytest.mark.parametrize("doc, words", [
    (nested(JSON_MAX_DEPTH + 1), "deeper than 16"),
    (nested(5000), "deeper than 16"),  # built in Python: deeper than json could ever parse or write
    ({"a": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}, "deeper than 16"),  # arrays count as levels too
    ({"a": list(range(JSON_MAX_ITEMS))}, f"more than {JSON_MAX_ITEMS}"),
    ({"a": "x" * (JSON_MAX_STRING + 1)}, f"the limit is {JSON_MAX_STRING}"),
    ({"k" * (JSON_MAX_KEY + 1): 1}, f"the limit is {JSON_MAX_KEY}"),
    ({f"k{i}": "\U0001F600" * 2100 for i in range(8)}, f"the limit is {JSON_MAX_BYTES}"),  # 16,800 chars, 67 kB
    ({"a": float("nan")}, "not a finite number"), ({"a": float("inf")}, "not a finite number"),
    ({"a": 2**63}, "beyond 64 bits"), ({"a": "\x00"}, "NUL"), ({"\ud800": 1}, "lone surrogate"),
    ({1: "a"}, "not a string"), ({"a": {1, 2}}, "not a JSON value"), ([], "must be a JSON object"),
])
def test_json_limits(doc, words):
    with pytest.raises(MetadataError, match=re.escape(words)) as e:
        check_json(doc)
    assert "Fix:" in str(e.value) or "not a string" in words or "JSON value" in words


def test_json_limits_accept_what_they_name():
    ok = {"deep": nested(JSON_MAX_DEPTH - 1), "list": list(range(JSON_MAX_ITEMS - 40)), "s": "x" * JSON_MAX_STRING,
          "int": -(2**63) + 1, "float": 1e308, "unicode": "Grüße \U0001F600 \n\t", "none": None, "t": True}
    assert check_json(ok) is ok


@pytest.mark.parametrize("value", ["ok\n", "ok\r\n", "\nok", "ok\x00", "ok ", "-ok", "a" * 101])
def test_names_tags_and_aliases_match_whole(value):
    with pytest.raises(RegistryError, match="invalid"):
        check_label(value, "tag")
    with pytest.raises(RegistryError, match="invalid name"):
        check_name(value)


def test_cli_help_states_the_limits_of_the_schemas():
    """The CLI writes the limits out (its --help must not import the registry): they must agree."""
    from weightlab.cli import app
    from weightlab.cli.registry import LIMITS_HELP

    for number in (JSON_MAX_BYTES, JSON_MAX_DEPTH, JSON_MAX_ITEMS, JSON_MAX_KEY, JSON_MAX_STRING, 100):
        assert str(number) in LIMITS_HELP
    for command in (["add", "--help"], ["serve", "--help"], ["registry", "repair", "--help"]):
        out = " ".join(CliRunner().invoke(app, command, terminal_width=300).output.split())
        assert "Metadata: a JSON object of at most 65536 bytes, 16 levels of nesting" in out, command


def test_add_refuses_bad_metadata_and_stores_nothing(reg, tiny):
    with pytest.raises(MetadataError, match="deeper than 16"):
        reg.add(tiny.style_lora_kohya, name="me/style", metadata=nested(400))
    with pytest.raises(RegistryError, match="invalid tag"):
        reg.add(tiny.style_lora_kohya, name="me/style", tags=["ok\n"])
    assert reg.search(all_versions=True) == [] and list(reg.store.list()) == []


def _all_nan(src, dst):
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(str(src)).items()}, str(dst))
    return dst


def test_finiteness_is_recorded_shown_and_refused_by_merges(db_url, home, tiny, tmp_path, monkeypatch):
    from weightlab.cli import app
    from weightlab.merge import merge_to_file
    from weightlab.recipe import Recipe, Term
    from weightlab.registry import Registry
    from weightlab.registry.resolve import LocalResolver

    monkeypatch.setenv("WEIGHTLAB_DB_URL", db_url)  # what the CLI and the registry's resolver open
    nan = _all_nan(tiny.style_lora_kohya, tmp_path / "nan.safetensors")
    with Registry() as reg:
        reg.add(tiny.base_ldm, name="me/base")
        good = reg.add(tiny.style_lora_kohya, name="me/style")
        bad = reg.add(nan, name="me/nan")  # accepted, and recorded as such
    assert (good.finite, bad.finite) == (True, False)
    runner = CliRunner()
    shown = runner.invoke(app, ["show", "me/nan", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["finite"] is False
    assert "NO: holds NaN or Inf" in runner.invoke(app, ["show", "me/nan"], terminal_width=200).output
    inspected = runner.invoke(app, ["inspect", str(nan), "--json"])
    assert json.loads(inspected.stdout)["finite"] is False
    assert json.loads(runner.invoke(app, ["inspect", str(tiny.style_lora_kohya), "--json"]).stdout)["finite"] is True
    recipe = Recipe(base="me/base@1", terms=[Term(source="me/nan", kind="style", scale=1.0)])
    with LocalResolver() as resolve:  # merges by registry name, as the CLI does
        with pytest.raises(NonFiniteError, match=r"me/nan@1 holds NaN or Inf values \(found when it was added\)"):
            merge_to_file(recipe, tmp_path / "out.safetensors", progress=False, resolve=resolve)
        assert not (tmp_path / "out.safetensors").exists()
        ok = Recipe(base="me/base@1", terms=[Term(source="me/style", kind="style", scale=1.0)])
        assert merge_to_file(ok, tmp_path / "ok.safetensors", progress=False, resolve=resolve)["tensors"] > 0


def test_upgrading_a_0002_database_keeps_its_versions_with_finiteness_unknown(db_url, home):
    from sqlalchemy import text

    from weightlab.registry import Registry, db

    engine = db.make_engine(db_url)
    try:
        db.upgrade(engine, "0002")
        with engine.begin() as conn:  # a version as weightlab wrote it before 0003 (columns of 0001/0002 only)
            conn.execute(text("INSERT INTO namespaces (id, name, public, created_at) VALUES (1, 'me', false, :t)"),
                         {"t": "2026-01-01 00:00:00"})
            conn.execute(text("INSERT INTO artifacts (id, namespace_id, name, created_at) VALUES (1, 1, 'old', :t)"),
                         {"t": "2026-01-01 00:00:00"})
            conn.execute(text(
                "INSERT INTO versions (id, artifact_id, number, sha256, tensor_hash, size_bytes, format, family, kind, "
                "representation, ranks, alphas, dtypes, n_params, n_targets, metadata, created_at) VALUES (1, 1, 1, "
                ":h, :h, 1, 'safetensors', 'sd15', 'style', 'lora', '[4]', '[4.0]', '[\"float32\"]', 1, 1, "
                "'{\"a\": 1}', :t)"), {"h": "ab" * 32, "t": "2026-01-01 00:00:00"})
        db.upgrade(engine)
    finally:
        engine.dispose()
    with Registry(db_url, home=home) as reg:
        old = reg.get("me/old@1")
    assert (old.metadata, old.finite) == ({"a": 1}, None)
