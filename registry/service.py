"""``weightlab.Registry``: the catalog of bases and residuals, as immutable content-addressed versions.

Storage: metadata in any SQLAlchemy database (default SQLite at ``$WEIGHTLAB_HOME/registry.db``, created on
first use), bytes in a content-addressed blob store (default ``$WEIGHTLAB_HOME/blobs``). A version is one file or
a whole folder (a diffusers ``MotionAdapter`` or pipeline folder): every file of it is a blob, and
:meth:`Registry.path` lays the version out again under ``$WEIGHTLAB_HOME/checkouts`` exactly as it was added.

Identity: a version's ``tensor_hash`` ignores the safetensors header (editing ``__metadata__`` keeps it); for a
folder it is the sha256 of each file's identity (tensor hash for ``.safetensors``, sha256 otherwise) by path.
Adding a name's existing identity again returns the existing version (``exist_ok=False`` refuses instead).

Crash safety: ``add`` checks every declared hash, then writes blobs (temp file + rename), then commits the version
in one transaction; a crash in between leaves only an unreferenced blob, which :meth:`Registry.gc` removes.

Example:
    >>> reg = Registry()                                               # doctest: +SKIP
    >>> v = reg.add("style.safetensors", name="me/style", tags=["anime"])  # doctest: +SKIP
    >>> reg.alias(v.ref, "prod").ref                                   # doctest: +SKIP
    'me/style@1'
    >>> lora = reg.open("me/style:prod")                               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import Engine

from weightlab.errors import (DuplicateVersionError, HashMismatchError, NotFoundError, RegistryError,
                              UnmatchedKeysError, fmt_keys)
from weightlab.files import file_sha256, tensor_hash
from weightlab.registry import auth, crud
from weightlab.registry.checkouts import Checkouts
from weightlab.registry.config import RegistrySettings
from weightlab.registry.contract import RegistryProtocol
from weightlab.registry.db import ensure_schema, make_engine, transaction
from weightlab.registry.ingest import SourceFile, Staged, stage
from weightlab.registry.jobs import queue as job_queue
from weightlab.registry.onnx_artifact import check_residual, describe_onnx, is_onnx_export
from weightlab.registry.schemas import (BlobProblem, Derivation, FileInfo, GcReport, JobCreate, JobPublic, Kind,
                                        LineageNode, NamespacePublic, Ref, Scope, TokenCreate, TokenCreated,
                                        TokenPublic, VerifyReport, VersionBase, VersionCreate, VersionInfo, check_json,
                                        check_label, check_name, manifest_digest)
from weightlab.registry.store import BlobStore, LocalBlobStore, inside

log = logging.getLogger(__name__)
GC_GRACE_SECONDS = 3600.0
_CHUNK = 8 * 1024 * 1024


class Registry(RegistryProtocol):
    """A registry: database + blob store. It keeps :class:`~weightlab.registry.contract.RegistryProtocol`, as
    :class:`weightlab.Client` does for a registry server.

    Args:
        url (str | None): SQLAlchemy database URL; default ``$WEIGHTLAB_DB_URL``, else SQLite at
            ``home/registry.db``. A fresh database gets the schema; an outdated one needs ``weightlab db upgrade``.
        home (str | Path | None): default ``$WEIGHTLAB_HOME`` or ``~/.weightlab``.
        store (BlobStore | str | None): blob store or its location; default ``$WEIGHTLAB_BLOB_STORE``, else
            ``home/blobs``.
    """

    def __init__(self, url: str | None = None, *, home: str | os.PathLike | None = None,
                 store: BlobStore | str | None = None):
        settings = RegistrySettings(**({"home": Path(home)} if home is not None else {}))
        self.url = url or settings.db_url
        self._engine = make_engine(self.url)
        ensure_schema(self._engine)
        self.store = store if isinstance(store, BlobStore) else open_store(store or settings.blob_store_url,
                                                                           cache_dir=settings.home / "cache")
        self._checkouts = Checkouts(settings.checkout_dir, self.store)

    def __repr__(self) -> str:
        return f"Registry({self._engine.url.render_as_string(hide_password=True)!r}, store={self.store.url!r})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release database connections."""
        self._engine.dispose()

    @property
    def engine(self) -> Engine:
        """The database engine (the web API keeps its tokens and job queue in the same database)."""
        return self._engine

    # -- adding ---------------------------------------------------------------------------------------------

    def add(self, source: str | os.PathLike, *, name: str | None = None, kind: Kind | None = None,
            tags: Iterable[str] = (), metadata: dict[str, Any] | None = None, sha256: str | None = None,
            revision: str | None = None, lineage: Derivation | None = None, allow_pickle: bool = False,
            strict: bool = True, exist_ok: bool = True) -> VersionInfo:
        """Register a file or folder as the next version of ``name``.

        Args:
            source (str | PathLike): a ``.safetensors`` file, a diffusers folder, a pickle checkpoint (with
                ``allow_pickle``), or ``hf://ORG/REPO[/PATH][@REVISION]``.
            name (str | None): ``ns/name``; default ``local/<file stem>``, or ``<org>/<stem>`` for hub sources.
            kind (str | None): declare the role (``base``, ``style``, ``image_accel``, ``motion``, ``motion_lora``);
                detected when None. E.g. a full fine-tune declared ``style`` is stored as a dense residual.
                An ONNX export folder (``weightlab export onnx``) is kind ``onnx``, checked by its manifest.
            tags (Iterable[str], default ()): labels for :meth:`search`.
            metadata (dict | None): free-form JSON stored with the version, within ``schemas.JSON_LIMITS`` (at most
                64 KiB as JSON, 16 levels deep, 2000 members and elements; else MetadataError, nothing stored).
            sha256 (str | None): declared sha256 of the file (or the folder's manifest digest). It is checked, and so
                is the sha256 the hub cache declares for each file, before anything is stored: a mismatch stores
                nothing.
            revision (str | None): hub revision (branch, tag or commit) for ``hf://`` sources.
            lineage (Derivation | None): how the file was produced, committed together with the version
                (e.g. ``Derivation.from_recipe(recipe, ...)`` for a merge output).
            allow_pickle (bool, default False): convert a pickle checkpoint (weights only, in a child process).
            strict (bool, default True): refuse files with keys that map to no module of the family.
            exist_ok (bool, default True): when ``name`` already holds these tensors, return that version;
                False raises :class:`DuplicateVersionError`.
        Returns:
            VersionInfo: the new (or existing) version.
        """
        return self._add(source, name=name, kind=kind, tags=tags, metadata=metadata, sha256=sha256, revision=revision,
                         lineage=lineage, allow_pickle=allow_pickle, strict=strict, exist_ok=exist_ok)

    def register_output(self, path: str | os.PathLike, *, name: str, kind: Kind, derivation: Derivation,
                        tags: Iterable[str] = (), metadata: dict[str, Any] | None = None,
                        source: str | None = None) -> VersionInfo:
        """Register what a merge, a training run, an export or a job produced, with its lineage.

        Args:
            path (str | PathLike): the output file or folder.
            name (str): ``ns/name`` of the output.
            kind (str): its role (a merge output is a ``base``, an export ``onnx``).
            derivation (Derivation): how it was produced, e.g. ``Derivation.from_merged_file(path)`` for a merge
                output, or a ``trained_from`` derivation naming the training inputs.
            tags, metadata: as for :meth:`add`.
            source (str | None): what to record as where it came from (e.g. ``job:7``); default the path.
        Returns:
            VersionInfo: the new version (or the existing one holding the same tensors).
        Example:
            >>> reg.register_output("out.safetensors", name="me/anim", kind="base",                  # doctest: +SKIP
            ...                     derivation=Derivation.from_merged_file("out.safetensors"))
        """
        return self._add(path, name=name, kind=kind, tags=tags, metadata=metadata, lineage=derivation,
                         recorded_source=source)

    def _add(self, source: str | os.PathLike, *, name: str | None = None, kind: Kind | None = None,
             tags: Iterable[str] = (), metadata: dict[str, Any] | None = None, sha256: str | None = None,
             revision: str | None = None, lineage: Derivation | None = None, allow_pickle: bool = False,
             strict: bool = True, exist_ok: bool = True, recorded_source: str | None = None,
             sha256_trusted: bool = False, namespaces: Iterable[str] | None = None) -> VersionInfo:
        """:meth:`add`, with what only the registry's own producers set: ``recorded_source`` (recorded instead of
        the path), ``sha256_trusted`` (``source`` lies in the store's ``tmp_dir`` and ``sha256`` was computed from its
        bytes as they were written there: it is stored without hashing it again) and ``namespaces`` (those the
        caller may read: ``lineage`` inputs given only by tensor hash link to versions there only; None: every one).
        """
        metadata, tags = check_json(metadata or {}), [check_label(t, "tag") for t in tags]  # before storing anything
        with stage(source, revision=revision, allow_pickle=allow_pickle) as staged, \
                (self._spool() if staged.folder else contextlib.nullcontext()) as spool:
            if recorded_source is not None:
                staged = dataclasses.replace(staged, source=recorded_source)
            ref = Ref.parse_name(name or staged.default_name)
            if staged.folder:  # every hash is checked before the first blob is stored
                sources, trusted = self._checked_folder(staged, sha256, spool), True
            else:  # one file: put checks the declared hash (the caller's, else the hub cache's) before storing it
                sources = [dataclasses.replace(staged.files[0], sha256=sha256 or staged.files[0].sha256)]
                trusted = sha256_trusted
            files = [self._put(f.path, f.sha256, f.relpath, trusted=trusted) for f in sources]
            new = self._describe(files, staged, kind=kind, tags=tags, metadata=metadata, strict=strict)
            with transaction(self._engine, write=True) as s:
                version, created = crud.create_version(s, namespace=ref.namespace, name=ref.name, new=new)
                if lineage is not None and version.derivation is None:
                    crud.record_derivation(s, version=version, derivation=lineage,
                                           namespaces=_set(namespaces))
                info = crud.version_info(version)
            for f, src in zip(files, sources):  # a gc between our blob write and commit may have taken it
                if not self.store.exists(f.sha256):
                    self._put(src.path, f.sha256, f.path, trusted=trusted)
        if not created:
            if not exist_ok:
                raise duplicate(info)
            log.info("%s", duplicate(info))
        return info

    def _spool(self) -> tempfile.TemporaryDirectory:
        """A private folder in the store's ``tmp_dir`` (``gc`` sweeps it if the process dies)."""
        self.store.tmp_dir.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(dir=self.store.tmp_dir, prefix="add-")

    def _checked_folder(self, staged: Staged, sha256: str | None, spool: str) -> list[SourceFile]:
        """A folder's files, each hashed and checked against the hash the hub cache declares for it, and the
        folder's manifest digest checked against ``sha256``, before anything is stored.

        Each file is copied into ``spool`` as it is hashed, so the store takes exactly the checked bytes without
        hashing them again; a file already in the store's ``tmp_dir`` (an upload the web API received, which
        nothing else writes) is hashed where it lies.
        """
        checked = []
        for i, f in enumerate(staged.files):
            if inside(f.path, self.store.tmp_dir):
                path, digest = f.path, file_sha256(f.path)
            else:
                path = Path(spool, str(i))
                digest = _copy_hashing(f.path, path)
            if f.sha256 is not None and digest != f.sha256:
                raise HashMismatchError(
                    f"{staged.source}: {f.relpath} hashes to {digest}, but {f.sha256} was declared (its name in the "
                    f"Hugging Face cache), so the cached file is corrupt; nothing was stored. Fix: delete "
                    f"{f.path.resolve()} and download it again.")
            checked.append(SourceFile(f.relpath, path, digest))
        digest = manifest_digest([FileInfo(path=f.relpath, sha256=f.sha256, size_bytes=f.path.stat().st_size)
                                  for f in checked])
        if sha256 is not None and digest != sha256:
            raise HashMismatchError(f"{staged.source}: the folder's files ({len(checked)}) have manifest digest "
                                    f"{digest}, but {sha256} was declared; nothing was stored. Fix: correct the "
                                    "declared hash (schemas.manifest_digest of exactly these files).")
        return checked

    def _put(self, path: Path, sha256: str | None, relpath: str, *, trusted: bool = False) -> FileInfo:
        blob = self.store.put(path, sha256=sha256, trusted=trusted)
        return FileInfo(path=relpath, sha256=blob.sha256, size_bytes=blob.size)

    def _describe(self, files: list[FileInfo], staged: Staged, *, kind: str | None, tags: Iterable[str],
                  metadata: dict[str, Any] | None, strict: bool) -> VersionCreate:
        """Inspect the stored copy (what was stored is what gets described) and build the version record."""
        from weightlab.inspect import inspect_path, weights_file
        from weightlab.loading import load

        path = self._checkouts.path(files, folder=staged.folder)
        if kind == "onnx" or is_onnx_export(path):
            return self._describe_onnx(path, files, staged, kind=kind, tags=tags, metadata=metadata)
        weights = weights_file(path).relative_to(path).as_posix() if staged.folder else files[0].path
        info = inspect_path(path, file_sha256=next((f.sha256 for f in files if f.path == weights), None))
        if info.skipped and strict:
            raise UnmatchedKeysError(
                f"{staged.source}: {len(info.skipped)} key(s) map to no {info.family} module: {fmt_keys(info.skipped)}. "
                "Fix: use a residual made for this family, or pass strict=False (CLI: --lenient) to register it "
                "anyway (`open` then reports those keys in `.skipped`).", info.skipped)
        if kind is not None and kind != info.kind_guess:
            load(path, kind=kind, strict=strict)  # raises if the file cannot play that role
        if staged.folder:
            files = [f.model_copy(update={"tensor_hash": tensor_hash(path / f.path)}) if f.path.endswith(".safetensors")
                     else f for f in files]
            identity = _folder_identity(files)
        else:
            files = [files[0].model_copy(update={"tensor_hash": info.tensor_hash})]
            identity = info.tensor_hash
        inspected = {f: getattr(info, f) for f in VersionBase.model_fields.keys() & type(info).model_fields.keys()}
        return VersionCreate(**{  # every field the inspection has under the version's field name, then these
            **inspected, "sha256": manifest_digest(files) if staged.folder else files[0].sha256,
            "tensor_hash": identity, "size_bytes": sum(f.size_bytes for f in files), "kind": kind or info.kind_guess,
            "metadata": metadata or {}, "source": staged.source, "files": files, "tags": list(tags)})

    @staticmethod
    def _describe_onnx(path: Path, files: list[FileInfo], staged: Staged, *, kind: str | None, tags: Iterable[str],
                       metadata: dict[str, Any] | None) -> VersionCreate:
        """The version record of an ONNX export folder (checked by its manifest and the ONNX checker)."""
        if not staged.folder or kind not in (None, "onnx"):
            what = "a single file" if not staged.folder else f"an ONNX export, so it cannot be registered as {kind!r}"
            raise RegistryError(f"{staged.source} is {what}. Fix: register the folder `weightlab export onnx` wrote, "
                                "with kind onnx (or no kind).")
        summary = describe_onnx(path)
        return VersionCreate(
            sha256=manifest_digest(files), tensor_hash=_folder_identity(files), size_bytes=sum(f.size_bytes for f in files),
            format="onnx", family=summary.family, kind="onnx", representation="graph", dtypes=summary.dtypes,
            n_params=summary.n_params, n_targets=summary.n_graphs, config=summary.config, metadata=metadata or {},
            source=staged.source, files=files, tags=list(tags))

    def add_lineage(self, ref: str, derivation: Derivation, *, namespaces: Iterable[str] | None = None) -> LineageNode:
        """Record how an existing version was produced (once; lineage never changes afterwards).

        Args:
            namespaces (Iterable[str] | None): the namespaces the caller may read (the web API): inputs given only
                by tensor hash link to versions there only. None: every namespace.
        Returns:
            LineageNode: the version with its recorded inputs.
        """
        readable = _set(namespaces)
        with transaction(self._engine, write=True) as s:
            version = crud.resolve(s, ref=Ref.parse(ref))
            crud.record_derivation(s, version=version, derivation=derivation, namespaces=readable)
            return crud.lineage(s, version=version, depth=1, namespaces=readable)

    # -- reading --------------------------------------------------------------------------------------------

    def get(self, ref: str) -> VersionInfo:
        """The version ``ns/name[@version|@hash|:alias]`` names (no suffix: the newest)."""
        with transaction(self._engine) as s:
            return crud.version_info(crud.resolve(s, ref=Ref.parse(ref)))

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``ns/name``, oldest first."""
        ref = Ref.parse_name(name)
        with transaction(self._engine) as s:
            return crud.list_versions(s, namespace=ref.namespace, name=ref.name)

    def search(self, *, kind: str | None = None, family: str | None = None, tag: str | None = None,
               text: str | None = None, namespace: str | None = None, all_versions: bool = False,
               limit: int | None = None, offset: int = 0,
               namespaces: Iterable[str] | None = None) -> list[VersionInfo]:
        """Versions matching every given filter, sorted by name.

        Args:
            kind, family, tag (str | None): exact matches.
            text (str | None): case-insensitive substring of the namespace, name, source or metadata.
            namespace (str | None): only this namespace.
            all_versions (bool, default False): every matching version, not just the newest per artifact.
            limit (int | None): at most this many.
            offset (int, default 0): skip this many first (with ``limit``: one page of the results).
            namespaces (Iterable[str] | None): only these namespaces (the web API: those the caller may read).
        """
        with transaction(self._engine) as s:
            return crud.search(s, kind=kind, family=family, tag=tag, text=text, namespace=namespace,
                               all_versions=all_versions, limit=limit, offset=offset,
                               namespaces=_set(namespaces))

    def lineage(self, ref: str, *, depth: int | None = None, namespaces: Iterable[str] | None = None) -> LineageNode:
        """What ``ref`` was derived from, recursively: relation, recipe, and each input's role and scale.

        ``namespaces`` (the web API: those the caller may read; None: every one) bounds the versions that inputs
        recorded by tensor hash alone are linked to when read.
        """
        with transaction(self._engine) as s:
            return crud.lineage(s, version=crud.resolve(s, ref=Ref.parse(ref)), depth=depth,
                                namespaces=_set(namespaces))

    def path(self, ref: str) -> Path:
        """A local path with the version's content: its file, or its folder laid out as it was added."""
        info = self.get(ref)
        return self._checkouts.path(info.files, folder=info.is_folder)

    def open(self, ref: str, **load_kwargs: Any):
        """Load the version as a residual (``weightlab.load`` with the registered kind).

        Keys were checked when the version was added, so loading is lenient by default (``strict=False``): a
        version registered with ``strict=False`` opens with its unmatched keys reported in ``.skipped``.

        Returns:
            Residual: a ``Base``, ``Dense``, ``LoRA`` or ``MotionModule``.
        """
        from weightlab.loading import load

        info = self.get(ref)
        check_residual(info)
        load_kwargs.setdefault("strict", False)
        return load(self._checkouts.path(info.files, folder=info.is_folder), kind=info.kind, **load_kwargs)

    # -- labels ---------------------------------------------------------------------------------------------

    def alias(self, ref: str, alias: str) -> VersionInfo:
        """Point ``alias`` (e.g. ``prod``) of the artifact at the version ``ref`` names; moves it if it exists."""
        with transaction(self._engine, write=True) as s:
            version = crud.resolve(s, ref=Ref.parse(ref))
            crud.set_alias(s, version=version, alias=alias)
            s.refresh(version)
            return crud.version_info(version)

    def unalias(self, ref: str) -> None:
        """Delete the alias in ``ns/name:alias``."""
        parsed = Ref.parse(ref)
        if parsed.alias is None:
            raise RegistryError(f"{ref!r} names no alias. Fix: write ns/name:alias.")
        with transaction(self._engine, write=True) as s:
            crud.remove_alias(s, ref=parsed)

    def tag(self, ref: str, add: Iterable[str] = (), *, remove: Iterable[str] = ()) -> VersionInfo:
        """Add and remove tags of a version; returns it with its new tags."""
        with transaction(self._engine, write=True) as s:
            version = crud.resolve(s, ref=Ref.parse(ref))
            crud.update_tags(s, version=version, add=list(add), remove=list(remove))
            return crud.version_info(version)

    # -- jobs (run by the job workers of `weightlab serve` or `weightlab worker` on this database) -------------

    def submit_job(self, kind: str, params: dict[str, Any]) -> JobPublic:
        """Queue a job, e.g. ``submit_job("merge", {"recipe": recipe.model_dump(), "output": "team/anim"})`` or
        ``submit_job("export", {"source": "team/anim@1", "output": "team/anim-onnx", "dtype": "float16"})``.

        Raises:
            JobSpecError: unknown kind, or parameters it does not accept.
        """
        with transaction(self._engine, write=True) as s:
            return job_queue.public(job_queue.enqueue(s, spec=JobCreate(kind=kind, params=params), token_id=None))

    def job(self, job_id: int, *, namespaces: Iterable[str] | None = None) -> JobPublic:
        """The job ``job_id`` (``namespaces``: only if its result goes to one of them; None: any)."""
        with transaction(self._engine) as s:
            return job_queue.public(job_queue.get_job(s, job_id=job_id, namespaces=_set(namespaces)))

    def jobs(self, *, status: str | None = None, limit: int = 100, offset: int = 0,
             namespaces: Iterable[str] | None = None) -> list[JobPublic]:
        """Jobs (whose results go to ``namespaces``; None: any), newest first."""
        with transaction(self._engine) as s:
            return [job_queue.public(j) for j in job_queue.list_jobs(s, namespaces=_set(namespaces), status=status,
                                                                     limit=limit, offset=offset)]

    # -- tokens and namespaces of the web API -----------------------------------------------------------------

    def create_token(self, *, namespace: str, scope: Scope, name: str = "token",
                     expires_in_days: float | None = None) -> TokenCreated:
        """A new API token granting ``scope`` on ``namespace`` (``*``: every one); its secret is shown only here."""
        spec = TokenCreate(name=name, namespace=namespace, scope=scope, expires_in_days=expires_in_days)
        with transaction(self._engine, write=True) as s:
            return auth.create_token(s, spec=spec)

    def tokens(self, *, namespaces: Iterable[str] | None = None) -> list[TokenPublic]:
        """API tokens (never their secrets): those of ``namespaces``, or every one (None)."""
        with transaction(self._engine) as s:
            return auth.list_tokens(s, namespaces=_set(namespaces))

    def revoke_token(self, token_id: int) -> None:
        """Revoke an API token: requests that send it are refused from now on.

        Raises:
            NotFoundError: no token with that id.
        """
        with transaction(self._engine, write=True) as s:
            auth.delete_token(s, token_id=token_id)

    def namespaces(self, *, namespaces: Iterable[str] | None = None) -> list[NamespacePublic]:
        """The namespaces (among ``namespaces``; None: all), and whether anyone may read them without a token."""
        allowed = _set(namespaces)
        with transaction(self._engine) as s:
            return [NamespacePublic(name=ns.name, public=ns.public) for ns in crud.list_namespaces(s)
                    if allowed is None or ns.name in allowed]

    def set_public(self, namespace: str, public: bool = True) -> NamespacePublic:
        """Let anyone read ``namespace`` through the web API without a token (or stop it, ``public=False``)."""
        check_name(namespace)
        with transaction(self._engine, write=True) as s:
            ns = crud.set_namespace_public(s, namespace=namespace, public=public)
            return NamespacePublic(name=ns.name, public=ns.public)

    # -- maintenance ----------------------------------------------------------------------------------------

    def repair(self, *, dry_run: bool = False) -> list[str]:
        """Replace stored JSON documents that break :data:`~weightlab.registry.schemas.JSON_LIMITS` (written before
        they were checked) with the placeholder readers are shown; returns one line per document found."""
        with transaction(self._engine, write=not dry_run) as s:
            return crud.repair_stored_json(s, dry_run=dry_run)

    def verify(self, *, remove_corrupt: bool = False) -> VerifyReport:
        """Re-hash every blob; report corrupt blobs and blobs that versions need but the store lacks.

        Args:
            remove_corrupt (bool, default False): delete corrupt blobs, so that adding the original file again
                restores them.
        """
        from tqdm import tqdm

        with transaction(self._engine) as s:
            users = crud.blob_users(s)
        problems: list[BlobProblem] = []
        removed: list[str] = []
        present = set()
        blobs = list(self.store.list())
        for blob in tqdm(blobs, desc="verify", unit="blob", disable=None):
            present.add(blob.sha256)
            actual = self.store.rehash(blob.sha256)
            if actual != blob.sha256:
                problems.append(BlobProblem(sha256=blob.sha256, problem="corrupt", actual_sha256=actual,
                                            versions=users.get(blob.sha256, [])))
                if remove_corrupt:
                    self.store.delete(blob.sha256)
                    removed.append(blob.sha256)
        problems += [BlobProblem(sha256=sha, problem="missing", versions=refs)
                     for sha, refs in sorted(users.items()) if sha not in present]
        return VerifyReport(checked=len(blobs), problems=problems, removed=removed)

    def gc(self, *, grace: float = GC_GRACE_SECONDS, dry_run: bool = False) -> GcReport:
        """Delete blobs no version references, and stale temp files and checkouts.

        Args:
            grace (float, default 3600): keep anything modified in the last ``grace`` seconds (an ``add`` in
                progress writes its blobs before it commits).
            dry_run (bool, default False): report without deleting.
        """
        cutoff = time.time() - grace
        candidates = [b for b in self.store.list() if b.mtime < cutoff]  # list before reading references
        with transaction(self._engine) as s:
            referenced = set(crud.blob_users(s))
            keep = crud.all_file_lists(s)
        doomed = [b for b in candidates if b.sha256 not in referenced]
        if not dry_run:
            for b in doomed:
                self.store.delete(b.sha256)
        return GcReport(
            deleted=[b.sha256 for b in doomed], freed_bytes=sum(b.size for b in doomed),
            kept=len(referenced), temp_removed=0 if dry_run else self.store.sweep_temp(older_than=grace),
            checkouts_removed=self._checkouts.sweep(keep=keep, older_than=grace, dry_run=dry_run), dry_run=dry_run,
        )


def open_store(url: str, *, cache_dir: str | os.PathLike | None = None) -> BlobStore:
    """The blob store at ``url``: a local folder (a path or ``file://``), or ``s3://BUCKET[/PREFIX]``.

    Args:
        url (str): where the blobs live. S3 credentials, region and endpoint come from the usual AWS settings
            (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL_S3`` for an S3-compatible server, ...).
        cache_dir (str | PathLike | None): local folder of a remote store (blobs opened as files, temp files);
            default ``~/.weightlab/cache``.
    Raises:
        RegistryError: the URL's scheme is not supported.
    """
    if url.startswith("s3://"):
        from weightlab.registry.s3 import S3BlobStore

        return S3BlobStore(url, cache_dir=cache_dir or Path.home() / ".weightlab" / "cache")
    if "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0]
        raise RegistryError(f"blob store URL {url!r}: scheme {scheme!r} is not supported (supported: a local path, "
                            "file://, s3://BUCKET/PREFIX). Fix: set WEIGHTLAB_BLOB_STORE to one of those.")
    return LocalBlobStore(url.removeprefix("file://"))


def duplicate(info: VersionInfo) -> DuplicateVersionError:
    """The error for adding, with ``exist_ok=False``, tensors that ``info``'s artifact already holds."""
    return DuplicateVersionError(f"{info.ref} already holds these tensors (tensor hash {info.tensor_hash[:12]}); "
                                 "nothing added. Fix: to register it again, use another name.", info)


def register_upload(registry: Registry, path: Path, *, name: str, source: str, sha256: str, trusted: bool,
                    kind: Kind | None, tags: list[str], metadata: dict[str, Any], lineage: Derivation | None,
                    strict: bool, namespaces: Iterable[str] | None) -> VersionInfo:
    """The web API's entry point: register an upload the server received into the store's ``tmp_dir`` and checked
    against ``sha256`` (a file's sha256, or a folder's manifest digest), recording ``source`` as where it came from.

    Cheapest first: the same content again (a retry, or many clients) raises :class:`DuplicateVersionError` at once;
    then the checks ``add`` runs on the stored copy (ingest rules, family, kind, unmatched keys, the config within
    the limits) run on the upload, so that a refused upload stores nothing; then it is added.

    Args:
        trusted (bool): ``sha256`` was computed from the file's bytes as they were written (a single file).
        namespaces (Iterable[str] | None): those the uploader may read; ``lineage`` inputs given only by tensor hash
            link to versions there only.
    """
    if lineage is None:
        try:
            found = registry.get(f"{name}@{sha256}")
        except NotFoundError:
            found = None
        if found is not None and found.sha256 == sha256:
            raise duplicate(found)
    _check_before_storing(path, kind=kind, strict=strict)
    return registry._add(path, name=name, kind=kind, tags=tags, metadata=metadata, sha256=sha256, lineage=lineage,
                         strict=strict, exist_ok=False, recorded_source=source, sha256_trusted=trusted,
                         namespaces=namespaces)


def _check_before_storing(path: Path, *, kind: Kind | None, strict: bool) -> None:
    """Run the checks ``add`` runs on the stored copy on ``path`` itself. Loading memory-maps: nothing is copied."""
    from weightlab.loading import load

    if path.is_dir():
        with stage(path):  # the ingest rules: no pickles, sound safetensors headers
            pass
    if kind == "onnx" or is_onnx_export(path):
        config = describe_onnx(path).config
    else:
        config = getattr(load(path, kind=kind, strict=strict), "config", None)
    if config:
        check_json(config, "config")


def _set(namespaces: Iterable[str] | None) -> set[str] | None:
    return None if namespaces is None else set(namespaces)


def _copy_hashing(src: Path, dest: Path) -> str:
    """Copy ``src`` to ``dest``; returns the sha256 of the bytes written."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
    return h.hexdigest()


def _folder_identity(files: list[FileInfo]) -> str:
    """sha256 over ``<identity>  <path>`` lines: tensor hash for safetensors files, sha256 for the rest."""
    lines = "".join(f"{f.tensor_hash or f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()
