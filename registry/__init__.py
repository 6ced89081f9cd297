"""The registry: a catalog of bases and residuals as immutable, content-addressed versions with lineage.

Layers: ``models`` (ORM tables) and ``alembic/`` (their migrations), ``db`` (engines, transactions, schema
upgrades), ``store`` (blob stores), ``crud`` (all data access, keyword-only functions), ``ingest`` (sources:
local files and folders, ``hf://``), ``checkouts`` (versions laid out as files), ``schemas`` (the models that
cross the boundary) and ``service`` (:class:`Registry`, the facade) and ``client`` (the HTTP client, :class:`Client`).
"""

from weightlab.registry.service import DuplicateVersionError, Registry
from weightlab.registry.schemas import Derivation, LineageInput, LineageNode, Ref, VersionInfo
from weightlab.registry.store import BlobStore, HashMismatchError, LocalBlobStore

__all__ = ["Registry", "DuplicateVersionError", "HashMismatchError", "Derivation", "LineageInput", "LineageNode",
           "Ref", "VersionInfo", "BlobStore", "LocalBlobStore"]
