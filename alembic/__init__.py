"""Database migrations of the registry (import name ``weightlab.registry.migrations``).

Applied by ``weightlab db upgrade`` or :func:`weightlab.registry.db.upgrade`; a fresh database is created at
head on first use. To write a new migration, change ``registry/models.py``, then from an up-to-date database:
``alembic -c alembic/alembic.ini -x url=sqlite:////tmp/dev.db revision --autogenerate -m "what changed"``.
"""

import sys


def _load_alembic_library() -> None:
    """Put the Alembic library into ``sys.modules["alembic"]`` in place of this folder.

    This folder has the library's name. When the repository root is on ``sys.path`` (``python -m pytest`` or
    ``python -c`` run from a checkout), a plain ``import alembic`` finds the folder first.
    """
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("alembic", path)
    if spec is None or spec.loader is None:
        raise ImportError("the Alembic library is not installed. Fix: pip install -e . (it is a dependency).")
    module = importlib.util.module_from_spec(spec)
    sys.modules["alembic"] = module
    spec.loader.exec_module(module)


if __name__ == "alembic":
    _load_alembic_library()
