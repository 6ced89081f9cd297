"""The registry: a catalog of bases and residuals as immutable, content-addressed versions with lineage.

Layers: ``models`` (ORM tables) and ``alembic/`` (their migrations), ``db`` (engines, transactions, schema
upgrades), ``store`` (blob stores), ``crud`` (all data access, keyword-only functions), ``ingest`` (sources:
local files and folders, ``hf://``), ``checkouts`` (versions laid out as files), ``schemas`` (the wire types: every
model that crosses the boundary), ``contract`` (:class:`RegistryProtocol`, the one interface), ``service``
(:class:`Registry`, the facade over the database) and ``client`` (:class:`Client`, the same interface over HTTP;
it imports no SQLAlchemy, so neither does this package until ``Registry`` is used).
"""

_LAZY = {
    "Registry": "weightlab.registry.service", "Client": "weightlab.registry.client",
    "RegistryProtocol": "weightlab.registry.contract",
    "Derivation": "weightlab.registry.schemas", "LineageInput": "weightlab.registry.schemas",
    "LineageNode": "weightlab.registry.schemas", "Ref": "weightlab.registry.schemas",
    "VersionInfo": "weightlab.registry.schemas",
    "BlobStore": "weightlab.registry.store", "LocalBlobStore": "weightlab.registry.store",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'weightlab.registry' has no attribute {name!r}")
