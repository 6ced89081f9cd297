"""The registry's tables (SQLAlchemy 2.x typed ORM). Alembic migrations in ``alembic/versions`` create them.

Namespaces hold artifacts (``ns/name``); an artifact holds numbered, immutable versions. A version is one
file or a folder: its files (path, blob sha256, size) are rows of ``version_files``. Aliases and tags are the
mutable labels. A derivation records how a version was produced (``merged_from``, ``trained_from``,
``exported_from``) with ordered inputs (role, scale) and, for merges, the recipe.
The web API adds API tokens (stored as hashes, one namespace and scope each) and a queue of merge/export jobs.
Kinds, families and representations are plain strings validated in :mod:`weightlab.registry.schemas`, so a new
kind needs no migration.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, String,
                        Text, TypeDecorator, UniqueConstraint, false)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAME_LEN = 100
HASH_LEN = 64

# Stable constraint names: migrations can drop and alter them on every database (SQLite included).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A moment in UTC, read back timezone-aware on every database (SQLite returns naive datetimes)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[int]: JSON, list[float]: JSON, list[str]: JSON}


class Namespace(Base):
    __tablename__ = "namespaces"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    public: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # anonymous reads (web API)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    artifacts: Mapped[list[Artifact]] = relationship(back_populates="namespace")


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("namespace_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    namespace: Mapped[Namespace] = relationship(back_populates="artifacts")
    versions: Mapped[list[Version]] = relationship(back_populates="artifact", order_by="Version.number")
    aliases: Mapped[list[Alias]] = relationship(back_populates="artifact")

    @property
    def full_name(self) -> str:
        return f"{self.namespace.name}/{self.name}"


class Version(Base):
    """An immutable version. ``tensor_hash`` is its identity within the artifact (see ``schemas.VersionInfo``)."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("artifact_id", "number"), UniqueConstraint("artifact_id", "tensor_hash"))

    id: Mapped[int] = mapped_column(primary_key=True)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"))
    number: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(HASH_LEN), index=True)
    tensor_hash: Mapped[str] = mapped_column(String(HASH_LEN), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32))
    family: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    representation: Mapped[str] = mapped_column(String(32))
    ranks: Mapped[list[int]]
    alphas: Mapped[list[float]]  # JSON null where the alpha is NaN or Inf
    dtypes: Mapped[list[str]]
    n_params: Mapped[int] = mapped_column(BigInteger)
    n_targets: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any] | None]
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finite: Mapped[bool | None] = mapped_column(Boolean)  # every tensor value finite; NULL: not checked

    artifact: Mapped[Artifact] = relationship(back_populates="versions")
    files: Mapped[list[VersionFile]] = relationship(order_by="VersionFile.path", cascade="all, delete-orphan")
    tags: Mapped[list[VersionTag]] = relationship(order_by="VersionTag.name", cascade="all, delete-orphan")
    aliases: Mapped[list[Alias]] = relationship(back_populates="version", order_by="Alias.name")
    derivation: Mapped[Derivation | None] = relationship(back_populates="version")


class VersionFile(Base):
    """One file of a version: its path inside the version, the blob holding its bytes, its tensor hash."""

    __tablename__ = "version_files"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(HASH_LEN), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    tensor_hash: Mapped[str | None] = mapped_column(String(HASH_LEN), index=True)  # safetensors files only


class VersionTag(Base):
    __tablename__ = "version_tags"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True, index=True)


class Alias(Base):
    """A movable name (``prod``, ``stable``) for one version of an artifact."""

    __tablename__ = "aliases"

    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    artifact: Mapped[Artifact] = relationship(back_populates="aliases")
    version: Mapped[Version] = relationship(back_populates="aliases")


class Derivation(Base):
    """How one version was produced; recorded once, never changed."""

    __tablename__ = "derivations"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), unique=True)
    relation: Mapped[str] = mapped_column(String(32))
    recipe: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The namespaces the web API caller who recorded it could read; NULL: every one (the local Registry, a `*`
    # token). An input known only by its tensor hash links only to versions there, now and when read later.
    linkable_namespaces: Mapped[list[str] | None]

    version: Mapped[Version] = relationship(back_populates="derivation")
    inputs: Mapped[list[DerivationInput]] = relationship(order_by="DerivationInput.position",
                                                         cascade="all, delete-orphan")


class DerivationInput(Base):
    """An input of a derivation: a registered version, or an outside file known by its tensor hash."""

    __tablename__ = "derivation_inputs"

    derivation_id: Mapped[int] = mapped_column(ForeignKey("derivations.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), index=True)
    tensor_hash: Mapped[str] = mapped_column(String(HASH_LEN), index=True)
    label: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(32))
    scale: Mapped[float | None] = mapped_column(Float)
    components: Mapped[list[str] | None]  # the pipeline components it changed; NULL: not recorded

    parent: Mapped[Version | None] = relationship()


class ApiToken(Base):
    """An API token of the web API: only its sha256 is stored. ``namespace`` ``*`` means every namespace."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    token_hash: Mapped[str] = mapped_column(String(HASH_LEN), unique=True)
    namespace: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    scope: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    """A queued merge or export; workers claim it, heartbeat while running, and record the result's reference."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_id", "status", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    namespace: Mapped[str] = mapped_column(String(NAME_LEN), index=True)  # where the result goes
    params: Mapped[dict[str, Any]]
    token_id: Mapped[int | None] = mapped_column(Integer)  # who submitted it (kept if the token is deleted)
    worker: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result_ref: Mapped[str | None] = mapped_column(String(2 * NAME_LEN + 20))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
