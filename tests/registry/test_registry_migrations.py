"""Alembic migrations on SQLite and PostgreSQL: empty -> head, round trip, ORM == migrated schema."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from weightlab.errors import RegistryError
from weightlab.registry import Registry, db
from weightlab.registry.models import Base

TABLES = {"namespaces", "artifacts", "versions", "version_files", "version_tags", "aliases", "derivations",
          "derivation_inputs", "api_tokens", "jobs"}


def _diff(engine) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def _tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_from_empty_round_trip_and_no_autogenerate_diff(db_url):
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert db.current_revision(conn) is None
        assert db.upgrade(engine) == db.head_revision()
        assert _tables(engine) == TABLES
        assert _diff(engine) == []
        assert db.downgrade(engine, "base") is None
        assert _tables(engine) == set()
        assert db.upgrade(engine) == db.head_revision()
        assert _tables(engine) == TABLES and _diff(engine) == []
    finally:
        engine.dispose()


def test_fresh_database_is_created_and_others_refused(db_url, home, monkeypatch):
    Registry(db_url, home=home).close()  # creates the schema
    engine = db.make_engine(db_url)
    try:
        assert _tables(engine) == TABLES
        with monkeypatch.context() as m:  # this code knows a newer schema than the database has
            m.setattr(db, "head_revision", lambda: "9999")
            with pytest.raises(RegistryError, match="weightlab db upgrade"):
                Registry(db_url, home=home)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
        with pytest.raises(RegistryError, match="newer weightlab wrote it"):
            Registry(db_url, home=home)
    finally:
        engine.dispose()


def test_foreign_database_refused(tmp_path, home):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE customers (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(RegistryError, match="customers"):
        Registry(url, home=home)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_migrations_folder_is_found_through_the_package():
    import alembic.command  # the library, even though the repository has an alembic/ folder

    import weightlab.registry.migrations as migrations

    assert alembic.command.__file__ != migrations.__file__
    assert db.head_revision() == "0004"
