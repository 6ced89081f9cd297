"""Where the registry keeps its database and blobs; read from the environment (``WEIGHTLAB_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RegistrySettings(BaseSettings):
    """Registry locations.

    Args:
        home (Path, default ``~/.weightlab``; env ``WEIGHTLAB_HOME``): root of everything below.
        database_url (str | None; env ``WEIGHTLAB_DB_URL``): any SQLAlchemy URL; default SQLite at
            ``home/registry.db``.
        blob_store (str | None; env ``WEIGHTLAB_BLOB_STORE``): blob store location; default ``home/blobs``.
    """

    model_config = SettingsConfigDict(env_prefix="WEIGHTLAB_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".weightlab")
    database_url: str | None = Field(default=None, validation_alias="WEIGHTLAB_DB_URL")
    blob_store: str | None = None

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home.expanduser() / 'registry.db'}"

    @property
    def blob_store_url(self) -> str:
        return self.blob_store or str(self.home.expanduser() / "blobs")

    @property
    def checkout_dir(self) -> Path:
        return self.home.expanduser() / "checkouts"
