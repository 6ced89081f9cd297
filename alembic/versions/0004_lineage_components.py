"""Lineage inputs record which pipeline components (unet, text_encoder, ...) they changed in the output.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("derivation_inputs") as batch:
        batch.add_column(sa.Column("components", sa.JSON(), nullable=True))  # NULL: recorded before it existed


def downgrade() -> None:
    with op.batch_alter_table("derivation_inputs") as batch:
        batch.drop_column("components")
