"""Registry fixtures: an isolated ``$WEIGHTLAB_HOME`` per test, and databases on SQLite and PostgreSQL.

PostgreSQL: ``$WEIGHTLAB_TEST_PG_URL`` names a server (``.ci/postgres.sh`` starts one). Each test session
(each xdist worker) creates its own database and drops it at the end; each test gets a fresh schema in it.
Without a server the PostgreSQL tests are skipped, with the reason in the skip summary and a warning.
"""

from __future__ import annotations


import pytest

@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own registry home; nothing touches ~/.weightlab."""
    monkeypatch.setenv("WEIGHTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WEIGHTLAB_DB_URL", raising=False)
    monkeypatch.delenv("WEIGHTLAB_BLOB_STORE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def reg(db_url, home):
    from weightlab.registry import Registry

    registry = Registry(db_url, home=home)
    yield registry
    registry.close()


@pytest.fixture
def sqlite_reg(tmp_path, home):
    """A registry on SQLite only (for behaviour that does not depend on the database)."""
    from weightlab.registry import Registry

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", home=home)
    yield registry
    registry.close()
