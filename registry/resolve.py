"""Recipe sources -> local paths, by the registry: the resolvers that the entry points (the CLI, the job runners,
the demo) pass to the merge engine as ``resolve=``. The engine itself resolves paths only
(:func:`weightlab.merge.resolve_path`), so the core never opens a registry.

Example:
    >>> with LocalResolver() as resolve:                                            # doctest: +SKIP
    ...     merge_to_file(Recipe(base="sd/base:prod", terms=terms), "out.safetensors", resolve=resolve)
"""

from __future__ import annotations

import os
from pathlib import Path

from weightlab.errors import UnresolvedSourceError
from weightlab.registry.contract import RegistryProtocol
from weightlab.registry.schemas import Ref, check_finite


def version_path(registry: RegistryProtocol, ref: str) -> Path:
    """The local path of a registered version (references only: what a job runner resolves).

    Raises:
        NotFoundError: no such version.
        NonFiniteError: the version was recorded as holding NaN or Inf when it was added; nothing of it is read.
    """
    return registry.path(check_finite(registry.get(ref)).ref)


class LocalResolver:
    """Resolve recipe sources: an existing path as itself, a registry reference (``ns/name[@N|@hash|:alias]``) as
    its version's path in the local registry (:func:`version_path`).

    The registry is opened at the first reference (merging local files creates no registry) and closed by
    :meth:`close` or on leaving the ``with`` block.

    Args:
        home (str | PathLike | None, default None): the registry's home; ``$WEIGHTLAB_HOME`` (default ``~/.weightlab``)
            when None.
    """

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = home
        self._registry = None

    def __call__(self, source: str) -> Path:
        """The path ``source`` names.

        Raises:
            UnresolvedSourceError: neither an existing path nor a registry reference.
            NotFoundError, NonFiniteError: see :func:`version_path`.
        """
        path = Path(source).expanduser()
        if path.exists():
            return path
        if not Ref.is_ref(source):
            raise UnresolvedSourceError(f"{source!r}: no such file or folder, and not a registry reference "
                                        "(ns/name@version, ns/name:alias). Fix: check the path or the reference.")
        if self._registry is None:
            from weightlab.registry.service import Registry  # SQLAlchemy: only once a reference needs it

            self._registry = Registry(home=self.home)
        return version_path(self._registry, source)

    def close(self) -> None:
        """Close the registry, if a reference opened it."""
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    def __enter__(self) -> LocalResolver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
