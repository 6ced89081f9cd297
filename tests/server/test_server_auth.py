"""Tokens: created by `weightlab token create` or the API, shown once, stored hashed, scoped per namespace,
revocable; scopes nest (read < write < admin)."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from weightlab.errors import WeightlabError
from weightlab.registry.auth import ALL, Principal
from weightlab.registry.db import transaction
from weightlab.registry.models import ApiToken


def test_scopes_nest_per_namespace():
    writer = Principal(1, "team", "write")
    assert writer.grants("team", "read") and writer.grants("team", "write") and not writer.grants("team", "admin")
    assert not writer.grants("other", "read")
    assert Principal(2, ALL, "read").grants("anything", "read")
    assert not Principal().grants("team", "read")


def test_token_cli_shows_once_stores_hash_and_revokes(serve, sqlite_url, tiny):
    from weightlab.cli import app

    live = serve(sqlite_url)
    runner = CliRunner()
    result = runner.invoke(app, ["token", "create", "--namespace", "team", "--scope", "write", "--name", "ci",
                                 "--db", sqlite_url, "--expires-days", "30"])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[-1]
    assert secret.startswith("wl_") and "not shown again" in result.output
    with transaction(live.registry.engine) as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == "ci"))
    assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest() and secret not in repr(vars(row))
    assert row.expires_at is not None
    c = live.client(secret)
    assert c.add(tiny.style_lora_kohya, name="team/style").ref == "team/style@1"
    listed = runner.invoke(app, ["token", "list", "--db", sqlite_url]).output
    assert "team" in listed and "ci" in listed and secret not in listed
    assert runner.invoke(app, ["token", "revoke", str(row.id), "--db", sqlite_url]).exit_code == 0
    with pytest.raises(WeightlabError, match="not valid"):
        c.get("team/style")
    bad = runner.invoke(app, ["token", "create", "--namespace", "team", "--scope", "root", "--db", sqlite_url])
    assert bad.exit_code == 2 and "scope" in bad.output and "read|write|admin" in bad.output
    bad = runner.invoke(app, ["token", "create", "--namespace", "../x", "--scope", "read", "--db", sqlite_url])
    assert bad.exit_code == 2 and "invalid name" in bad.output


def test_token_api(serve, sqlite_url):
    live = serve(sqlite_url)
    team_admin = live.client(live.token("team", "admin"))
    made = team_admin.create_token(namespace="team", scope="read", name="reader", expires_in_days=1)
    assert made.token.startswith("wl_") and made.scope == "read" and made.expires_at is not None
    for namespace in ("other", ALL):
        with pytest.raises(WeightlabError, match="does not allow admin"):
            team_admin.create_token(namespace=namespace, scope="read")
    with live.http(made.token) as http:
        me = http.get("/tokens/current").json()
        assert me["id"] == made.id and "token" not in me
        assert http.get("/tokens").status_code == 403  # listing needs admin
        other = live.token("other", "read")
        with live.http(other) as other_http:
            assert other_http.delete(f"/tokens/{made.id}").status_code == 404  # as if it did not exist
    with live.http(live.admin) as http:
        listed = http.get("/tokens").json()
        assert made.id in [t["id"] for t in listed] and all("token" not in t for t in listed)
    with live.http(team_admin._http.headers["authorization"].split()[1]) as http:
        assert [t["name"] for t in http.get("/tokens").json()] == ["test", "reader"]  # only team's tokens
    with live.http(made.token) as http:
        assert http.delete(f"/tokens/{made.id}").status_code == 204  # a token may revoke itself
        assert http.get("/tokens/current").status_code == 401
    with live.http() as http:
        assert http.get("/tokens/current").status_code == 401
        assert http.delete("/tokens/1").status_code == 401
