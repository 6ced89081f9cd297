"""Registry fixtures: an isolated ``$WEIGHTLAB_HOME`` per test, and databases on SQLite and PostgreSQL.

PostgreSQL: ``$WEIGHTLAB_TEST_PG_URL`` names a server (``.ci/postgres.sh`` starts one). Each test session
(each xdist worker) creates its own database and drops it at the end; each test gets a fresh schema in it.
Without a server the PostgreSQL tests are skipped, with the reason in the skip summary and a warning.
"""

from __future__ import annotations

import os
import uuid
import warnings

import pytest

PG_ENV = "WEIGHTLAB_TEST_PG_URL"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own registry home; nothing touches ~/.weightlab."""
    monkeypatch.setenv("WEIGHTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WEIGHTLAB_DB_URL", raising=False)
    monkeypatch.delenv("WEIGHTLAB_BLOB_STORE", raising=False)
    return tmp_path / "home"


def _skip_pg(reason: str):
    message = f"PostgreSQL registry tests SKIPPED: {reason}. Fix: run `source .ci/postgres.sh && start_postgres` " \
              f"(exports {PG_ENV}), or set {PG_ENV} to a server's SQLAlchemy URL."
    warnings.warn(message, pytest.PytestWarning, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_database():
    """URL of a database created for this test session on the server ``$WEIGHTLAB_TEST_PG_URL`` names."""
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.exc import OperationalError

    server = os.environ.get(PG_ENV)
    if not server:
        _skip_pg(f"{PG_ENV} is not set")
    admin = create_engine(server, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"weightlab_registry_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as e:
        admin.dispose()
        _skip_pg(f"no PostgreSQL server answers at {make_url(server).render_as_string(hide_password=True)} "
                 f"({str(e).splitlines()[0]})")
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_database):
    """A URL whose connections use a fresh, empty schema of the session's database."""
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{pg_database}?options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """The registry database URL, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("pg_url")


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
