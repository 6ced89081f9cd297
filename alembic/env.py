"""Alembic environment of the registry.

``weightlab.registry.db`` runs migrations on its own connection (passed in ``config.attributes``). The
``alembic`` command line (``-c alembic/alembic.ini``) connects to ``-x url=...``, else ``$WEIGHTLAB_DB_URL``,
else the default SQLite registry under ``$WEIGHTLAB_HOME``.
"""

from alembic import context
from sqlalchemy import Connection

from weightlab.registry.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from weightlab.registry.config import RegistrySettings
    from weightlab.registry.db import make_engine

    url = context.get_x_argument(as_dictionary=True).get("url") or RegistrySettings().db_url
    with make_engine(url).connect() as conn:
        _run(conn)
        conn.commit()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database.")
_main()
