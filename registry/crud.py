"""Data access: every query and write of the registry, as keyword-only functions over a ``Session``.

The caller owns the transaction (:func:`weightlab.registry.db.transaction`); nothing here commits. Writes that
must not race lock the artifact's row first (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's write
transactions are already serialised), so version numbers, aliases, tags and lineage change one writer at a time.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from typing import Collection, TypeVar

from sqlalchemy import Select, String, and_, cast, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from weightlab.errors import MetadataError, NotFoundError, RegistryError
from weightlab.registry.db import UnreadableJSON
from weightlab.registry.models import (Alias, Artifact, Derivation, DerivationInput, Job, Namespace, Version,
                                       VersionFile, VersionTag)
from weightlab.registry.schemas import (INVALID_JSON_KEY, LATEST, Derivation as DerivationSpec, FileInfo,
                                        LineageEdge, LineageNode, Ref, VersionBase, VersionCreate, VersionInfo,
                                        check_json, check_label, stored_json)

M = TypeVar("M", Namespace, Artifact)
# Every field of VersionBase but `files` and `tags` (rows of their own tables) is a column of `versions` of the same
# name; `metadata` is the ORM attribute `meta` (declarative classes reserve `metadata`).
_ATTR = {"metadata": "meta"}
_STORED = [f for f in VersionBase.model_fields if f not in ("files", "tags")] + ["number", "created_at"]
# The columns of a VersionInfo, labelled by its field names (lists of versions are read as rows, not ORM objects).
_INFO_COLUMNS = (Version.id, Namespace.name.label("namespace"), Artifact.name.label("name"),
                 *(getattr(Version, _ATTR.get(f, f)).label(f) for f in _STORED))
_ID_BATCH = 500  # version ids per `IN (...)` when reading the files and labels of many versions


def version_ref(version: Version) -> str:
    return f"{version.artifact.full_name}@{version.number}"


def version_info(version: Version) -> VersionInfo:
    """The public view of a version row."""
    return VersionInfo.model_validate({
        **{f: getattr(version, _ATTR.get(f, f)) for f in _STORED}, "ref": version_ref(version),
        "namespace": version.artifact.namespace.name, "name": version.artifact.name,
        "files": [FileInfo(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes, tensor_hash=f.tensor_hash)
                  for f in version.files],
        "tags": [t.name for t in version.tags], "aliases": [a.name for a in version.aliases],
        "metadata": stored_json(version.meta, "metadata"), "config": stored_json(version.config, "config")})


def _versions_query() -> Select:
    """``SELECT`` of :data:`_INFO_COLUMNS` from versions joined with their artifact and namespace."""
    return select(*_INFO_COLUMNS).select_from(Version).join(Version.artifact).join(Artifact.namespace)


def _version_infos(session: Session, query: Select) -> list[VersionInfo]:
    """The public view of the versions a :func:`_versions_query` selects, in its order.

    Rows instead of ORM objects, and one query per child table for all of them: a page of 100 versions costs a
    few milliseconds instead of ~30.
    """
    rows = session.execute(query).all()
    ids = [row.id for row in rows]
    files: dict[int, list[FileInfo]] = defaultdict(list)
    tags: dict[int, list[str]] = defaultdict(list)
    aliases: dict[int, list[str]] = defaultdict(list)
    for start in range(0, len(ids), _ID_BATCH):
        batch = ids[start:start + _ID_BATCH]
        for f in session.execute(select(VersionFile.__table__).where(VersionFile.version_id.in_(batch))
                                 .order_by(VersionFile.path)):
            files[f.version_id].append(FileInfo(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes,
                                                tensor_hash=f.tensor_hash))
        for version_id, name in session.execute(select(VersionTag.version_id, VersionTag.name)
                                                .where(VersionTag.version_id.in_(batch)).order_by(VersionTag.name)):
            tags[version_id].append(name)
        for version_id, name in session.execute(select(Alias.version_id, Alias.name)
                                                .where(Alias.version_id.in_(batch)).order_by(Alias.name)):
            aliases[version_id].append(name)
    return [VersionInfo.model_validate({
        **row._mapping, "ref": f"{row.namespace}/{row.name}@{row.number}", "files": files[row.id],
        "tags": tags[row.id], "aliases": aliases[row.id],
        "metadata": stored_json(row.metadata, "metadata"), "config": stored_json(row.config, "config")})
        for row in rows]


def _get_or_create(session: Session, model: type[M], **keys) -> M:
    """The row with ``keys``, inserting it if missing; safe when another transaction inserts it concurrently."""
    row = session.scalar(select(model).filter_by(**keys))
    if row is not None:
        return row
    try:
        with session.begin_nested():
            row = model(**keys)
            session.add(row)
    except IntegrityError:  # inserted by a concurrent transaction since our SELECT: use theirs
        row = session.scalar(select(model).filter_by(**keys))
        if row is None:
            raise
    return row


def _lock(session: Session, artifact: Artifact) -> None:
    session.execute(select(Artifact.id).where(Artifact.id == artifact.id).with_for_update())


def find_artifact(session: Session, *, namespace: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).join(Artifact.namespace)
                          .where(Namespace.name == namespace, Artifact.name == name))


def _not_found(session: Session, ref: Ref, *, namespaces: Collection[str] | None = None) -> NotFoundError:
    q = select(Namespace.name, Artifact.name).join(Artifact.namespace)
    if namespaces is not None:
        q = q.where(Namespace.name.in_(sorted(namespaces)))
    names = [f"{ns}/{n}" for ns, n in session.execute(q)]
    close = difflib.get_close_matches(ref.artifact, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else " Fix: `weightlab ls` lists what is registered."
    return NotFoundError(f"no artifact named {ref.artifact} in the registry.{hint}")


def resolve(session: Session, *, ref: Ref) -> Version:
    """The version a reference names.

    Raises:
        NotFoundError: no such artifact, version number, hash prefix or alias (the message suggests close names).
        RegistryError: a hash prefix matches several versions.
    """
    artifact = find_artifact(session, namespace=ref.namespace, name=ref.name)
    if artifact is None:
        raise _not_found(session, ref)
    q = select(Version).where(Version.artifact_id == artifact.id)
    if ref.number is not None:
        version = session.scalar(q.where(Version.number == ref.number))
        what = f"version {ref.number}"
    elif ref.digest is not None:
        prefix = ref.digest + "%"  # hex digits only (Ref.parse checked), so no LIKE wildcards inside
        found = session.scalars(q.where(or_(Version.sha256.like(prefix), Version.tensor_hash.like(prefix))).limit(2)).all()
        if len(found) > 1:
            raise RegistryError(f"{ref}: the hash prefix matches several versions. Fix: give more hex digits.")
        version = found[0] if found else None
        what = f"a version whose sha256 or tensor hash starts with {ref.digest}"
    elif ref.alias is not None and ref.alias != LATEST:
        version = session.scalar(q.join(Alias, Alias.version_id == Version.id)
                                 .where(Alias.artifact_id == artifact.id, Alias.name == ref.alias))
        what = f"an alias {ref.alias!r}"
    else:
        version = session.scalar(q.order_by(Version.number.desc()).limit(1))
        what = "any version"
    if version is None:
        have = session.execute(select(func.max(Version.number)).where(Version.artifact_id == artifact.id)).scalar()
        aliases = session.scalars(select(Alias.name).where(Alias.artifact_id == artifact.id).order_by(Alias.name)).all()
        raise NotFoundError(f"{ref.artifact} has no {what} (versions 1..{have or 0}; aliases: "
                            f"{', '.join(aliases) or 'none'}). Fix: `weightlab show {ref.artifact}`.")
    return version


def create_version(session: Session, *, namespace: str, name: str, new: VersionCreate) -> tuple[Version, bool]:
    """Insert the next version of ``namespace/name`` (created if missing).

    Returns:
        tuple[Version, bool]: the version and True, or the existing version with the same tensor hash and False.
    """
    ns = _get_or_create(session, Namespace, name=namespace)
    artifact = _get_or_create(session, Artifact, namespace_id=ns.id, name=name)
    _lock(session, artifact)
    existing = session.scalar(select(Version).where(Version.artifact_id == artifact.id,
                                                    Version.tensor_hash == new.tensor_hash))
    if existing is not None:
        return existing, False
    last = session.scalar(select(func.max(Version.number)).where(Version.artifact_id == artifact.id))
    version = Version(
        artifact=artifact, number=(last or 0) + 1,
        **{_ATTR.get(f, f): getattr(new, f) for f in VersionBase.model_fields if f not in ("files", "tags")},
        files=[VersionFile(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes, tensor_hash=f.tensor_hash)
               for f in new.files],
        tags=[VersionTag(name=t) for t in new.tags],
    )
    session.add(version)
    session.flush()
    return version, True


def list_versions(session: Session, *, namespace: str, name: str) -> list[VersionInfo]:
    """Every version of the artifact, oldest first."""
    artifact = find_artifact(session, namespace=namespace, name=name)
    if artifact is None:
        raise _not_found(session, Ref(namespace, name))
    return _version_infos(session, _versions_query().where(Version.artifact_id == artifact.id).order_by(Version.number))


def search(session: Session, *, kind: str | None = None, family: str | None = None, tag: str | None = None,
           text: str | None = None, namespace: str | None = None, namespaces: Collection[str] | None = None,
           all_versions: bool = False, limit: int | None = None, offset: int = 0) -> list[VersionInfo]:
    """Versions matching every given filter; by default only the newest matching version of each artifact.

    ``text`` matches (case-insensitively) the namespace, the name, the source and the metadata; ``namespaces``
    restricts the search to those namespaces (the web API passes the ones the caller may read).
    """
    conds = []
    if kind:
        conds.append(Version.kind == kind)
    if family:
        conds.append(Version.family == family)
    if tag:
        conds.append(Version.tags.any(VersionTag.name == tag))
    if namespace:
        conds.append(Namespace.name == namespace)
    if namespaces is not None:
        conds.append(Namespace.name.in_(sorted(namespaces)))
    if text:
        pattern = "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        conds.append(or_(*(func.lower(col).like(pattern, escape="\\") for col in
                           (Namespace.name, Artifact.name, Version.source, cast(Version.meta, String)))))
    q = _versions_query().where(*conds)
    if not all_versions:
        newest = (select(Version.artifact_id, func.max(Version.number).label("number"))
                  .join(Version.artifact).join(Artifact.namespace).where(*conds)
                  .group_by(Version.artifact_id).subquery())
        q = q.join(newest, and_(Version.artifact_id == newest.c.artifact_id, Version.number == newest.c.number))
    q = q.order_by(Namespace.name, Artifact.name, Version.number)
    return _version_infos(session, q.limit(limit).offset(offset) if limit else q.offset(offset))


def set_alias(session: Session, *, version: Version, alias: str) -> None:
    """Point ``alias`` of the version's artifact at ``version`` (creating or moving it)."""
    check_label(alias, "alias")
    if alias == LATEST:
        raise RegistryError(f"`{LATEST}` always names the newest version and cannot be set. Fix: pick another alias.")
    _lock(session, version.artifact)
    row = session.get(Alias, (version.artifact_id, alias))
    if row is None:
        session.add(Alias(artifact_id=version.artifact_id, name=alias, version_id=version.id))
    else:
        row.version_id = version.id
    session.flush()


def remove_alias(session: Session, *, ref: Ref) -> None:
    """Delete the alias ``ref`` names (``ns/name:alias``)."""
    version = resolve(session, ref=ref)
    _lock(session, version.artifact)
    session.delete(session.get(Alias, (version.artifact_id, ref.alias)))
    session.flush()


def update_tags(session: Session, *, version: Version, add: list[str], remove: list[str]) -> None:
    _lock(session, version.artifact)
    have = {t.name: t for t in version.tags}
    for name in remove:
        if name in have:
            version.tags.remove(have.pop(name))
    for name in add:
        if check_label(name, "tag") not in have:
            have[name] = VersionTag(name=name)
            version.tags.append(have[name])
    session.flush()


def _ancestor_ids(session: Session, version_id: int) -> set[int]:
    seen: set[int] = set()
    frontier = {version_id}
    while frontier:
        parents = set(session.scalars(
            select(DerivationInput.parent_version_id).join(Derivation)
            .where(Derivation.version_id.in_(frontier), DerivationInput.parent_version_id.is_not(None))))
        frontier = parents - seen
        seen |= parents
    return seen


def record_derivation(session: Session, *, version: Version, derivation: DerivationSpec,
                      namespaces: Collection[str] | None = None) -> None:
    """Record how ``version`` was produced. Lineage, like the version, is written once.

    ``namespaces`` (None: every one) are those the recording caller may read: an input given by reference must be
    there, and an input given only by tensor hash links only to a version there (also when read later), so the
    outcome never depends on, nor links to, a version the caller cannot read.

    Raises:
        RegistryError: the version already has lineage, or an input is the version itself or derived from it.
        NotFoundError: an input reference names nothing.
    """
    _lock(session, version.artifact)
    if session.scalar(select(Derivation.id).where(Derivation.version_id == version.id)) is not None:
        raise RegistryError(f"{version_ref(version)} already has lineage; lineage is immutable like the version. "
                            "Fix: register the output as a new version with its lineage.")
    rows = []
    for position, inp in enumerate(derivation.inputs):
        if inp.ref is not None:
            ref = Ref.parse(inp.ref)
            if namespaces is not None and ref.namespace not in namespaces:
                raise _not_found(session, ref, namespaces=namespaces)
            parent = resolve(session, ref=ref)
            if inp.tensor_hash is not None and inp.tensor_hash not in _hashes(parent):
                parent = _holding(session, inp.tensor_hash, artifact_id=parent.artifact_id)
                if parent is None:
                    raise NotFoundError(
                        f"lineage input {inp.ref}: no version of {ref.artifact} holds tensors {inp.tensor_hash[:12]} "
                        "(the ones the merge used). Fix: add that file to the registry first, or pass the "
                        "input's path and tensor hash without a ref.")
            tensor_hash, label = inp.tensor_hash or parent.tensor_hash, inp.ref
        else:
            parent = _holding(session, inp.tensor_hash, namespaces=namespaces)
            tensor_hash, label = inp.tensor_hash, inp.label
        if parent is not None and (parent.id == version.id or version.id in _ancestor_ids(session, parent.id)):
            raise RegistryError(f"{version_ref(version)} cannot be derived from {version_ref(parent)}: that would "
                                "make a cycle in the lineage. Fix: check the inputs.")
        rows.append(DerivationInput(position=position, parent_version_id=parent.id if parent else None,
                                    tensor_hash=tensor_hash, label=label, role=inp.role, scale=inp.scale,
                                    components=inp.components))
    session.add(Derivation(version_id=version.id, relation=derivation.relation, recipe=derivation.recipe, inputs=rows,
                           linkable_namespaces=None if namespaces is None else sorted(namespaces)))
    session.flush()


def _hashes(version: Version) -> set[str]:
    return {version.tensor_hash} | {f.tensor_hash for f in version.files if f.tensor_hash}


def _holding(session: Session, tensor_hash: str, *, artifact_id: int | None = None,
             namespaces: Collection[str] | None = None) -> Version | None:
    """The oldest version (in ``namespaces``; None: any) whose identity, or one of whose files, has this tensor hash."""
    q = select(Version).where(or_(Version.tensor_hash == tensor_hash,
                                  Version.files.any(VersionFile.tensor_hash == tensor_hash)))
    if artifact_id is not None:
        q = q.where(Version.artifact_id == artifact_id)
    if namespaces is not None:
        q = q.join(Version.artifact).join(Artifact.namespace).where(Namespace.name.in_(sorted(namespaces)))
    return session.scalar(q.order_by(Version.id).limit(1))


def _within(*scopes: Collection[str] | None) -> set[str] | None:
    """The intersection of namespace sets, None standing for every namespace."""
    given = [set(s) for s in scopes if s is not None]
    return set.intersection(*given) if given else None


def lineage(session: Session, *, version: Version, depth: int | None = None,
            namespaces: Collection[str] | None = None) -> LineageNode:
    """The ancestry tree of ``version``, ``depth`` levels deep (None: all). A node met twice is shown once.

    An input recorded by tensor hash alone, with no version holding it then, links to one registered since, among
    the namespaces its recorder could read and ``namespaces`` (the reader's; None: every one).
    """
    expanded: set[int] = set()

    def node(v: Version, level: int) -> LineageNode:
        out = LineageNode(label=version_ref(v), tensor_hash=v.tensor_hash, version=version_info(v))
        d = v.derivation
        if d is None:
            return out
        if v.id in expanded or (depth is not None and level >= depth):
            out.truncated = True
            return out
        expanded.add(v.id)
        out.relation, out.recipe = d.relation, stored_json(d.recipe, "recipe")
        linkable = _within(d.linkable_namespaces, namespaces)
        for inp in d.inputs:
            parent = inp.parent or (_holding(session, inp.tensor_hash, namespaces=linkable)
                                    if linkable is None or linkable else None)
            child = (node(parent, level + 1) if parent is not None
                     else LineageNode(label=inp.label or inp.tensor_hash, tensor_hash=inp.tensor_hash))
            out.inputs.append(LineageEdge(role=inp.role, scale=inp.scale, components=inp.components, node=child))
        return out

    return node(version, 0)


def blob_users(session: Session) -> dict[str, list[str]]:
    """sha256 -> references of every version with a file in that blob."""
    users: dict[str, list[str]] = {}
    rows = session.execute(select(VersionFile.sha256, Namespace.name, Artifact.name, Version.number)
                           .join(Version, VersionFile.version_id == Version.id).join(Version.artifact)
                           .join(Artifact.namespace))
    for sha, ns, name, number in rows.all():
        users.setdefault(sha, []).append(f"{ns}/{name}@{number}")
    return {sha: sorted(refs) for sha, refs in users.items()}


def all_file_lists(session: Session) -> list[list[FileInfo]]:
    """The file list of every version (for finding which checkouts are still wanted)."""
    lists: dict[int, list[FileInfo]] = {}
    for f in session.scalars(select(VersionFile)):
        lists.setdefault(f.version_id, []).append(FileInfo(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes))
    return list(lists.values())


def blob_namespaces(session: Session, *, sha256: str) -> set[str]:
    """The namespaces of the versions that have a file in blob ``sha256``."""
    return set(session.scalars(select(Namespace.name).distinct()
                               .join(Artifact, Artifact.namespace_id == Namespace.id)
                               .join(Version, Version.artifact_id == Artifact.id)
                               .join(VersionFile, VersionFile.version_id == Version.id)
                               .where(VersionFile.sha256 == sha256)))


def public_namespaces(session: Session) -> set[str]:
    """Names of the namespaces anyone may read through the web API."""
    return set(session.scalars(select(Namespace.name).where(Namespace.public.is_(True))))


def list_namespaces(session: Session) -> list[Namespace]:
    return list(session.scalars(select(Namespace).order_by(Namespace.name)))


def set_namespace_public(session: Session, *, namespace: str, public: bool) -> Namespace:
    """Make a namespace (created if missing) readable by anyone, or by token holders only."""
    ns = _get_or_create(session, Namespace, name=namespace)
    ns.public = public
    session.flush()
    return ns


def repair_stored_json(session: Session, *, dry_run: bool = False) -> list[str]:
    """Find the stored JSON documents that break :data:`~weightlab.registry.schemas.JSON_LIMITS` (written before
    they were checked) and replace each with the placeholder readers are shown instead (see ``stored_json``).

    Returns:
        list[str]: one line per document: where it is and what is wrong with it.
    """
    targets = [(Version, Version.meta, "metadata", lambda r: f"{r.namespace}/{r.name}@{r.number}"),
               (Version, Version.config, "config", lambda r: f"{r.namespace}/{r.name}@{r.number}"),
               (Derivation, Derivation.recipe, "recipe", lambda r: f"lineage of {r.namespace}/{r.name}@{r.number}"),
               (Job, Job.params, "params", lambda r: f"job {r.id}")]
    found = []
    for model, column, what, where in targets:
        if model is Job:
            q = select(Job.id, column.label("doc"))
        else:
            q = select(model.id, Namespace.name.label("namespace"), Artifact.name.label("name"), Version.number,
                       column.label("doc")).select_from(model)
            if model is Derivation:
                q = q.join(Version, Version.id == Derivation.version_id)
            q = q.join(Version.artifact).join(Artifact.namespace)
        for row in session.execute(q.order_by(model.id)).all():
            if row.doc is None:  # SQL NULL, or JSON null
                continue
            try:
                if isinstance(row.doc, UnreadableJSON):
                    raise MetadataError(f"{what} nests too deep to parse.")
                check_json(row.doc, what)
            except MetadataError as e:
                found.append(f"{where(row)}: {e}")
                if not dry_run:
                    note = {INVALID_JSON_KEY: f"replaced by `weightlab registry repair`: {e}"}
                    session.execute(update(model).where(model.id == row.id).values({column: note}))
    return found
