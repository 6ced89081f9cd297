"""Engines, transactions and schema migrations.

SQLite runs in WAL mode with a busy timeout, foreign keys on, and write transactions that take the write lock
up front (``BEGIN IMMEDIATE``), so concurrent writers queue instead of failing. PostgreSQL needs nothing special.
Migrations are Alembic's, run on the caller's connection: :func:`ensure_schema` creates a fresh database and
refuses an outdated one (``weightlab db upgrade`` upgrades it).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.orm import Session

from weightlab.errors import RegistryError

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 60_000
_WRITE = "weightlab_write"
_PG_MIGRATION_LOCK = 0x7765696768746C62  # pg_advisory_xact_lock key ("weightlb")


class UnreadableJSON(dict):
    """What a stored JSON value that cannot be parsed (nested beyond Python's recursion limit) reads as: a
    placeholder saying so, so that one such row cannot break every listing (``weightlab registry repair`` fixes it)."""


def _loads(text: str | bytes):
    """``json.loads`` for stored JSON columns; a document too deep to parse reads as :class:`UnreadableJSON`."""
    try:
        return json.loads(text)
    except RecursionError:
        return UnreadableJSON({"weightlab.invalid": "this stored JSON nests too deep to read. Fix: an operator runs "
                                                    "`weightlab registry repair`."})


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite databases get their folder, WAL mode and a busy timeout."""
    sa_url = make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        return create_engine(sa_url, pool_pre_ping=True, json_deserializer=_loads)
    if sa_url.database and sa_url.database != ":memory:":
        Path(sa_url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(sa_url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, json_deserializer=_loads)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_connection.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


@contextmanager
def transaction(engine: Engine, *, write: bool = False) -> Iterator[Session]:
    """A session inside one transaction, committed on success and rolled back on error.

    Args:
        write (bool, default False): take SQLite's write lock at BEGIN (use it for every transaction that writes).
    """
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.connection(execution_options={_WRITE: write})
        yield session


def _migrations_dir() -> str:
    from weightlab.registry import migrations

    return str(Path(migrations.__file__).parent)


def _alembic(action: str, connection: Connection, revision: str) -> None:
    """Run ``alembic <action> <revision>`` on ``connection`` (env.py uses it as is)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", _migrations_dir())
    cfg.attributes["connection"] = connection
    getattr(command, action)(cfg, revision)


def head_revision() -> str:
    """The newest migration this code knows."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(_migrations_dir()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The migration the database is at, or None for a database without the registry's tables."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that no other process can be migrating at the same time."""
    with engine.connect().execution_options(**{_WRITE: True}) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        yield conn


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Apply migrations up to ``revision``; returns the revision the database is at afterwards."""
    with _migration_lock(engine) as conn:
        _alembic("upgrade", conn, revision)
        return current_revision(conn)


def downgrade(engine: Engine, revision: str) -> str | None:
    """Revert migrations down to ``revision`` (``"base"`` drops every registry table)."""
    with _migration_lock(engine) as conn:
        _alembic("downgrade", conn, revision)
        return current_revision(conn)


def ensure_schema(engine: Engine) -> None:
    """Create the schema in a fresh database; refuse a database at another revision than this code's.

    Raises:
        RegistryError: the database is older (fix: ``weightlab db upgrade``) or newer (fix: upgrade weightlab),
            or holds tables that are not the registry's.
    """
    from alembic.script import ScriptDirectory

    head = head_revision()
    with engine.connect() as conn:
        if current_revision(conn) == head:
            return
    url = engine.url.render_as_string(hide_password=True)
    with _migration_lock(engine) as conn:
        current = current_revision(conn)
        if current == head:
            return
        if current is None:
            foreign = set(inspect(conn).get_table_names()) - {"alembic_version"}
            if foreign:
                raise RegistryError(
                    f"database {url} holds tables that are not the registry's ({', '.join(sorted(foreign))}). "
                    "Fix: point WEIGHTLAB_DB_URL at an empty database or at an existing weightlab registry.")
            log.info("creating the registry schema in %s", url)
            _alembic("upgrade", conn, "head")
            return
    known = {s.revision for s in ScriptDirectory(_migrations_dir()).walk_revisions()}
    if current in known:
        raise RegistryError(
            f"database {url} is at schema revision {current}; this weightlab needs {head}. "
            "Fix: back it up, then run `weightlab db upgrade`.")
    raise RegistryError(
        f"database {url} is at schema revision {current}, which this weightlab does not know (a newer "
        "weightlab wrote it). Fix: upgrade weightlab.")
