"""Initial registry schema: namespaces, artifacts, versions and their files, tags, aliases, derivations.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _created_at(name: str = "created_at") -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"))


def upgrade() -> None:
    op.create_table(
        "namespaces",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_namespaces")),
        sa.UniqueConstraint("name", name=op.f("uq_namespaces_name")),
    )
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        _created_at(),
        _fk("artifacts", "namespace_id", "namespaces"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
        sa.UniqueConstraint("namespace_id", "name", name=op.f("uq_artifacts_namespace_id_name")),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("artifact_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("tensor_hash", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("representation", sa.String(length=32), nullable=False),
        sa.Column("ranks", sa.JSON(), nullable=False),
        sa.Column("alphas", sa.JSON(), nullable=False),
        sa.Column("dtypes", sa.JSON(), nullable=False),
        sa.Column("n_params", sa.BigInteger(), nullable=False),
        sa.Column("n_targets", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        _created_at(),
        _fk("versions", "artifact_id", "artifacts"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_versions")),
        sa.UniqueConstraint("artifact_id", "number", name=op.f("uq_versions_artifact_id_number")),
        sa.UniqueConstraint("artifact_id", "tensor_hash", name=op.f("uq_versions_artifact_id_tensor_hash")),
    )
    for column in ("family", "kind", "sha256", "tensor_hash"):
        op.create_index(op.f(f"ix_versions_{column}"), "versions", [column])
    op.create_table(
        "version_files",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("tensor_hash", sa.String(length=64), nullable=True),
        _fk("version_files", "version_id", "versions"),
        sa.PrimaryKeyConstraint("version_id", "path", name=op.f("pk_version_files")),
    )
    op.create_index(op.f("ix_version_files_sha256"), "version_files", ["sha256"])
    op.create_index(op.f("ix_version_files_tensor_hash"), "version_files", ["tensor_hash"])
    op.create_table(
        "version_tags",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        _fk("version_tags", "version_id", "versions"),
        sa.PrimaryKeyConstraint("version_id", "name", name=op.f("pk_version_tags")),
    )
    op.create_index(op.f("ix_version_tags_name"), "version_tags", ["name"])
    op.create_table(
        "aliases",
        sa.Column("artifact_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        _created_at("updated_at"),
        _fk("aliases", "artifact_id", "artifacts"),
        _fk("aliases", "version_id", "versions"),
        sa.PrimaryKeyConstraint("artifact_id", "name", name=op.f("pk_aliases")),
    )
    op.create_index(op.f("ix_aliases_version_id"), "aliases", ["version_id"])
    op.create_table(
        "derivations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("relation", sa.String(length=32), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=True),
        _created_at(),
        _fk("derivations", "version_id", "versions"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_derivations")),
        sa.UniqueConstraint("version_id", name=op.f("uq_derivations_version_id")),
    )
    op.create_table(
        "derivation_inputs",
        sa.Column("derivation_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("parent_version_id", sa.Integer(), nullable=True),
        sa.Column("tensor_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("scale", sa.Float(), nullable=True),
        _fk("derivation_inputs", "derivation_id", "derivations"),
        _fk("derivation_inputs", "parent_version_id", "versions"),
        sa.PrimaryKeyConstraint("derivation_id", "position", name=op.f("pk_derivation_inputs")),
    )
    op.create_index(op.f("ix_derivation_inputs_parent_version_id"), "derivation_inputs", ["parent_version_id"])
    op.create_index(op.f("ix_derivation_inputs_tensor_hash"), "derivation_inputs", ["tensor_hash"])


def downgrade() -> None:
    for table in ("derivation_inputs", "derivations", "aliases", "version_tags", "version_files", "versions",
                  "artifacts", "namespaces"):
        op.drop_table(table)  # drops the table's indexes with it
