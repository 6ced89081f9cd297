"""Versions record whether every tensor value is finite; lineage records which namespaces its recorder could read.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("finite", sa.Boolean(), nullable=True))  # NULL: added before it was checked
    with op.batch_alter_table("derivations") as batch:
        batch.add_column(sa.Column("linkable_namespaces", sa.JSON(), nullable=True))  # NULL: every one


def downgrade() -> None:
    with op.batch_alter_table("derivations") as batch:
        batch.drop_column("linkable_namespaces")
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("finite")
