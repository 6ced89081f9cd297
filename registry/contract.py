"""The registry's one interface, kept by the local :class:`~weightlab.registry.service.Registry` and the HTTP
:class:`~weightlab.registry.client.Client` alike (``tests/registry/test_contract.py`` runs the same checks on both).

Arguments and results are the wire types of :mod:`weightlab.registry.schemas`; errors are those of
:mod:`weightlab.errors`, raised as the same class with the same fields on both sides. The local registry adds one
keyword to a few read methods, ``namespaces`` (what a web API caller may read), which the server passes.

Example:
    >>> def publish(registry: RegistryProtocol, path) -> str:   # a Registry or a Client
    ...     return registry.alias(registry.add(path, name="team/style").ref, "prod").ref
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

from weightlab.errors import RegistryError
from weightlab.registry.schemas import (Derivation, GcReport, JobPublic, Kind, LineageNode, NamespacePublic, Scope,
                                        TokenCreated, TokenPublic, VerifyReport, VersionInfo)


class RegistryProtocol(Protocol):
    """Versions, lineage, jobs, tokens and namespaces; see :class:`~weightlab.registry.service.Registry` for each
    method's documentation."""

    # -- versions -------------------------------------------------------------------------------------------

    def add(self, source: str | os.PathLike, *, name: str | None = None, kind: Kind | None = None,
            tags: Iterable[str] = (), metadata: dict[str, Any] | None = None, sha256: str | None = None,
            revision: str | None = None, lineage: Derivation | None = None, allow_pickle: bool = False,
            strict: bool = True, exist_ok: bool = True) -> VersionInfo: ...

    def register_output(self, path: str | os.PathLike, *, name: str, kind: Kind, derivation: Derivation,
                        tags: Iterable[str] = (), metadata: dict[str, Any] | None = None,
                        source: str | None = None) -> VersionInfo: ...

    def get(self, ref: str) -> VersionInfo: ...

    def versions(self, name: str) -> list[VersionInfo]: ...

    def search(self, *, kind: str | None = None, family: str | None = None, tag: str | None = None,
               text: str | None = None, namespace: str | None = None, all_versions: bool = False,
               limit: int | None = None, offset: int = 0) -> list[VersionInfo]: ...

    def path(self, ref: str) -> Path: ...

    def open(self, ref: str, **load_kwargs: Any): ...

    def alias(self, ref: str, alias: str) -> VersionInfo: ...

    def unalias(self, ref: str) -> None: ...

    def tag(self, ref: str, add: Iterable[str] = (), *, remove: Iterable[str] = ()) -> VersionInfo: ...

    # -- lineage --------------------------------------------------------------------------------------------

    def add_lineage(self, ref: str, derivation: Derivation) -> LineageNode: ...

    def lineage(self, ref: str, *, depth: int | None = None) -> LineageNode: ...

    # -- maintenance ----------------------------------------------------------------------------------------

    def verify(self, *, remove_corrupt: bool = False) -> VerifyReport: ...

    def gc(self, *, grace: float = 3600.0, dry_run: bool = False) -> GcReport: ...

    # -- jobs -----------------------------------------------------------------------------------------------

    def submit_job(self, kind: str, params: dict[str, Any]) -> JobPublic: ...

    def job(self, job_id: int) -> JobPublic: ...

    def jobs(self, *, status: str | None = None, limit: int = 100, offset: int = 0) -> list[JobPublic]: ...

    def wait_job(self, job_id: int, *, timeout: float = 600.0, poll: float = 0.5) -> JobPublic:
        """Poll until the job succeeded or failed.

        Raises:
            RegistryError: still not done after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not (job := self.job(job_id)).done:
            if time.monotonic() > deadline:
                raise RegistryError(f"job {job_id} is still {job.status} after {timeout:g} s. Fix: poll it later "
                                    "(`job(id)`), or check that job workers run (`weightlab serve`, `weightlab "
                                    "worker`).")
            time.sleep(poll)
        return job

    # -- tokens ---------------------------------------------------------------------------------------------

    def create_token(self, *, namespace: str, scope: Scope, name: str = "token",
                     expires_in_days: float | None = None) -> TokenCreated: ...

    def tokens(self) -> list[TokenPublic]: ...

    def revoke_token(self, token_id: int) -> None: ...

    # -- namespaces -----------------------------------------------------------------------------------------

    def namespaces(self) -> list[NamespacePublic]: ...

    def set_public(self, namespace: str, public: bool = True) -> NamespacePublic: ...

    def close(self) -> None: ...
