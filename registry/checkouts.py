"""Versions laid out as ordinary files, for loaders that want a path (``weightlab.load``, diffusers).

A checkout is ``<root>/<manifest digest>/<path of each file>``, each file a symlink to its blob (copied where
the filesystem has no symlinks). It appears atomically (built aside, then renamed) and is rebuilt if one of its
blobs went missing, so it always shows what the store holds. A folder version (a diffusers ``MotionAdapter`` or
pipeline folder) comes back as the same folder; a single-file version as its file, under its original name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

from weightlab.errors import RegistryError
from weightlab.registry.schemas import FileInfo, manifest_digest
from weightlab.registry.store import BlobStore


def check_relpath(path: str) -> str:
    """A version file path must stay inside its version: relative, ``/``-separated, no ``..``."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path:
        raise RegistryError(f"file path {path!r} is not a relative path inside the version.")
    return path


class Checkouts:
    """Materialise versions from a :class:`BlobStore` under ``root``."""

    def __init__(self, root: str | os.PathLike, store: BlobStore):
        self.root = Path(root).expanduser()
        self.store = store

    def path(self, files: list[FileInfo], *, folder: bool) -> Path:
        """The local path of a version with these files: the folder, or the single file.

        Raises:
            NotFoundError: a blob is missing from the store (run ``weightlab registry verify``).
        """
        dest = self.root / manifest_digest(files)
        if not all((dest / f.path).exists() for f in files):
            self._build(dest, files)
        return dest if folder else dest / files[0].path

    def _build(self, dest: Path, files: list[FileInfo]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".build-"))
        try:
            for f in files:
                target = tmp / check_relpath(f.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                blob = self.store.local_path(f.sha256)
                try:
                    os.symlink(blob, target)
                except OSError:
                    shutil.copyfile(blob, target)
            if all((dest / f.path).exists() for f in files):  # another thread or process built it meanwhile
                return
            if dest.exists():  # stale (a blob was missing): move it aside, then replace it
                stale = Path(tempfile.mkdtemp(dir=self.root, prefix=".stale-"))
                os.replace(dest, stale / "old")
                shutil.rmtree(stale)
            try:
                os.replace(tmp, dest)
            except OSError:
                if not dest.is_dir():  # not a concurrent build that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def sweep(self, *, keep: list[list[FileInfo]], older_than: float, dry_run: bool = False) -> int:
        """Remove checkouts of no registered version and interrupted builds older than ``older_than`` seconds."""
        if not self.root.is_dir():
            return 0
        wanted = {manifest_digest(files) for files in keep}
        cutoff = time.time() - older_than
        removed = 0
        for entry in self.root.iterdir():
            if entry.name not in wanted and entry.lstat().st_mtime < cutoff:
                if not dry_run:
                    shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
