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


class ServerSettings(RegistrySettings):
    """Settings of ``weightlab serve`` and ``weightlab worker`` (env ``WEIGHTLAB_*``, e.g. ``WEIGHTLAB_MAX_UPLOAD_BYTES``).

    Args:
        max_upload_bytes (int, default 20 GB): largest request body an upload may have (larger: HTTP 413).
        job_workers (int, default 1): job worker threads in each server process (0: run ``weightlab worker``
            processes instead).
        job_poll_seconds (float, default 2.0): how often an idle worker looks for queued jobs.
        job_lease_seconds (float, default 300): a running job whose worker sent no heartbeat for this long is
            taken over by another worker (its worker died).
        job_max_attempts (int, default 3): runs of a job before it is failed for good.
    """

    max_upload_bytes: int = Field(default=20_000_000_000, gt=0)
    job_workers: int = Field(default=1, ge=0)
    job_poll_seconds: float = Field(default=2.0, gt=0)
    job_lease_seconds: float = Field(default=300.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
