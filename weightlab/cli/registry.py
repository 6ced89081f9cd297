"""Registry commands: ``add``, ``import``, ``ls``, ``show``, ``alias``, ``tag``, ``lineage``, ``db upgrade``,
``registry verify``, ``registry gc`` and ``registry repair``.

They use the registry that ``$WEIGHTLAB_HOME`` (default ``~/.weightlab``), ``$WEIGHTLAB_DB_URL`` and
``$WEIGHTLAB_BLOB_STORE`` point at, or, with ``--remote URL`` (or ``$WEIGHTLAB_REMOTE``), a registry server
(``weightlab serve``) through :class:`weightlab.Client`, with the token in ``$WEIGHTLAB_TOKEN``.

Example:
    weightlab add style.safetensors --name me/style --tag anime
    weightlab alias me/style@1 prod
    weightlab import hf://wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora.safetensors
    weightlab ls --kind style --json
    weightlab ls --remote http://registry:8000
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from weightlab.cli.common import console, err_console, fail_on_error

_ENV_HELP = "Registry location: $WEIGHTLAB_HOME (default ~/.weightlab), $WEIGHTLAB_DB_URL, $WEIGHTLAB_BLOB_STORE."
# The limits of weightlab.registry.schemas (JSON_LIMITS, check_name, check_label), written out so that `--help`
# does not import the registry; tests/registry/test_registry_limits.py checks that they agree.
LIMITS_HELP = ("Names (ns/name): letters, digits, '.', '_' or '-', at most 100 characters, starting with a letter or "
               "digit; tags and aliases start with a letter. Metadata: a JSON object of at most 65536 bytes, 16 "
               "levels of nesting and 2000 members and elements in all; keys of at most 256 characters, strings of at "
               "most 8192, no NUL characters; numbers finite, integers within 64 bits.")


def _registry(remote: Optional[str] = None):
    """The registry the commands use: a server's (``--remote``/``$WEIGHTLAB_REMOTE``) or the local one."""
    if remote:
        from weightlab.registry.client import Client

        return Client(remote)
    from weightlab.registry.service import Registry

    return Registry()


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            break
    return f"{n:.1f} {unit}"


def _json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _parse_meta(items: list[str], metadata_json: Optional[str]) -> dict:
    from weightlab.errors import RegistryError
    from weightlab.registry.schemas import parse_json

    meta = parse_json(metadata_json, "--metadata-json") if metadata_json else {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RegistryError(f"--meta {item!r}: write KEY=VALUE.")
        meta[key] = value
    return meta


def _summary(v) -> str:
    ranks = f", rank {'/'.join(map(str, v.ranks))}" if v.ranks else ""
    return (f"{v.ref} ({v.kind}, {v.representation}{ranks}, {v.family}, {_size(v.size_bytes)}, "
            f"tensor hash {v.tensor_hash[:12]})")


def _add(source: str, name: Optional[str], kind: Optional[str], tags: list[str], meta: list[str],
         metadata_json: Optional[str], sha256: Optional[str], revision: Optional[str], allow_pickle: bool,
         lenient: bool, as_json: bool, remote: Optional[str]) -> None:
    from weightlab.errors import DuplicateVersionError

    with fail_on_error():
        reg = _registry(remote)
        try:
            v = reg.add(source, name=name, kind=kind, tags=tags, metadata=_parse_meta(meta, metadata_json),
                        sha256=sha256, revision=revision, allow_pickle=allow_pickle, strict=not lenient,
                        exist_ok=False)
            message = f"added {_summary(v)}"
        except DuplicateVersionError as e:
            v, message = e.version, f"{e.version.ref} already holds these tensors; nothing added."
    if as_json:
        _json(v.model_dump(mode="json"))
    else:
        console.print(message, highlight=False)


_KIND = typer.Option(None, "--kind", help="Declare the role: base, style, image_accel, motion, motion_lora, onnx (detected if omitted).")
_TAG = typer.Option([], "--tag", "-t", help="Tag (repeatable): a letter, then letters, digits, '.', '_' or '-' "
                                            "(at most 100 characters).")
_META = typer.Option([], "--meta", help="Metadata KEY=VALUE (repeatable).")
_META_JSON = typer.Option(None, "--metadata-json", help="Metadata as a JSON object (limits below).")
_SHA = typer.Option(None, "--sha256", help="Expected sha256 of the file; a mismatch stores nothing.")
_PICKLE = typer.Option(False, "--allow-pickle", help="Convert a .ckpt/.pt/.bin (weights only, child process). Only for files you trust.")
_LENIENT = typer.Option(False, "--lenient", help="Register files with keys that match no module (they are ignored when loaded).")
_JSON = typer.Option(False, "--json", help="Print JSON.")
_REMOTE = typer.Option(None, "--remote", envvar="WEIGHTLAB_REMOTE",
                       help="Use the registry server at this URL (token: $WEIGHTLAB_TOKEN) instead of the local registry.")


def add_cmd(
    source: str = typer.Argument(..., help="A .safetensors file, a diffusers folder, or hf://ORG/REPO\\[/PATH]\\[@REV]."),
    name: str = typer.Option(..., "--name", "-n", help="ns/name of the artifact, e.g. me/anime-style."),
    kind: Optional[str] = _KIND, tags: list[str] = _TAG, meta: list[str] = _META,
    metadata_json: Optional[str] = _META_JSON, sha256: Optional[str] = _SHA, allow_pickle: bool = _PICKLE,
    lenient: bool = _LENIENT, as_json: bool = _JSON, remote: Optional[str] = _REMOTE,
) -> None:
    """Register a file or folder as the next version of NAME (a name's existing tensors are not added twice)."""
    _add(source, name, kind, tags, meta, metadata_json, sha256, None, allow_pickle, lenient, as_json, remote)


def import_cmd(
    source: str = typer.Argument(..., help="hf://ORG/REPO\\[/FILE|/FOLDER]\\[@REV], or a local file or folder."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="ns/name; default ORG/<file stem> (hub) or local/<stem>."),
    revision: Optional[str] = typer.Option(None, "--revision", "-r", help="Hub branch, tag or commit."),
    kind: Optional[str] = _KIND, tags: list[str] = _TAG, meta: list[str] = _META,
    metadata_json: Optional[str] = _META_JSON, sha256: Optional[str] = _SHA, allow_pickle: bool = _PICKLE,
    lenient: bool = _LENIENT, as_json: bool = _JSON, remote: Optional[str] = _REMOTE,
) -> None:
    """Import from the Hugging Face Hub (through its cache; HF_HUB_OFFLINE=1 uses the cache only) or a local path."""
    _add(source, name, kind, tags, meta, metadata_json, sha256, revision, allow_pickle, lenient, as_json, remote)


def ls_cmd(
    kind: Optional[str] = typer.Option(None, "--kind", help="Only this kind."),
    family: Optional[str] = typer.Option(None, "--family", help="Only this family (e.g. sd15)."),
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="Only versions with this tag."),
    text: Optional[str] = typer.Option(None, "--text", "-q", help="Substring of name, source or metadata."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Only this namespace."),
    all_versions: bool = typer.Option(False, "--all", "-a", help="Every version, not just the newest of each name."),
    as_json: bool = _JSON, remote: Optional[str] = _REMOTE,
) -> None:
    """List registered versions (the newest matching version of each name)."""
    from rich.table import Table

    with fail_on_error():
        found = _registry(remote).search(kind=kind, family=family, tag=tag, text=text, namespace=namespace,
                                   all_versions=all_versions)
    if as_json:
        _json([v.model_dump(mode="json") for v in found])
        return
    if not found:
        err_console.print("nothing registered matches. " + _ENV_HELP, highlight=False)
        return
    table = Table(show_edge=False)
    table.add_column("ref", no_wrap=True)
    for col in ("kind", "repr", "family", "ranks", "size", "tags", "aliases"):
        table.add_column(col, overflow="fold")
    for v in found:
        table.add_row(v.ref, v.kind, v.representation, v.family, ",".join(map(str, v.ranks)) or "-",
                      _size(v.size_bytes), ",".join(v.tags), ",".join(v.aliases))
    console.print(table)


def show_cmd(ref: str = typer.Argument(..., help="ns/name[@version|:alias]."), as_json: bool = _JSON,
             remote: Optional[str] = _REMOTE) -> None:
    """Show one version: hashes, detection results, files, tags, aliases, source and lineage."""
    with fail_on_error():
        reg = _registry(remote)
        v = reg.get(ref)
        node = reg.lineage(v.ref, depth=1)
    if as_json:
        _json({**v.model_dump(mode="json"), "lineage": node.model_dump(mode="json", exclude={"version"})})
        return
    rows = [("ref", v.ref), ("kind", v.kind), ("representation", v.representation), ("family", v.family),
            ("format", v.format), ("ranks", ", ".join(map(str, v.ranks)) or "-"),
            ("alphas", ", ".join("nan" if a is None else f"{a:g}" for a in v.alphas) or "-"), ("targets", str(v.n_targets)),
            ("params", f"{v.n_params:,}"), ("dtypes", ", ".join(v.dtypes)), ("size", _size(v.size_bytes)),
            ("sha256", v.sha256), ("tensor hash", v.tensor_hash), ("tags", ", ".join(v.tags) or "-"),
            ("aliases", ", ".join(v.aliases) or "-"), ("source", v.source or "-"), ("created", str(v.created_at)),
            ("finite", {True: "yes", False: "NO: holds NaN or Inf (merges refuse it)", None: "not checked"}[v.finite]),
            ("metadata", json.dumps(v.metadata) if v.metadata else "-")]
    if node.relation:
        inputs = ", ".join(f"{e.role} {e.node.label}" + (f" x{e.scale:g}" if e.scale is not None else "")
                           for e in node.inputs)
        rows.append((node.relation, inputs))
    for key, value in rows:
        console.print(f"[bold]{key:>15}[/]  {value}", highlight=False)
    for f in v.files:
        console.print(f"{'file':>15}  {f.path}  {_size(f.size_bytes)}  {f.sha256[:12]}", highlight=False)


def alias_cmd(
    ref: str = typer.Argument(..., help="The version: ns/name@N (or any ref); with --delete, ns/name:alias."),
    alias: Optional[str] = typer.Argument(None, help="Alias to set or move, e.g. prod."),
    delete: bool = typer.Option(False, "--delete", help="Delete the alias REF names (ns/name:alias)."),
    remote: Optional[str] = _REMOTE,
) -> None:
    """Point an alias at a version (moving it if it exists), or delete an alias. Versions never change."""
    with fail_on_error():
        reg = _registry(remote)
        if delete:
            reg.unalias(ref)
            console.print(f"deleted alias {ref}", highlight=False)
            return
        if not alias:
            raise typer.BadParameter("give the ALIAS to set, or --delete.")
        v = reg.alias(ref, alias)
    console.print(f"{v.artifact}:{alias} -> {v.ref}", highlight=False)


def tag_cmd(
    ref: str = typer.Argument(..., help="ns/name[@version|:alias]."),
    tags: list[str] = typer.Argument(None, help="Tags to add."),
    remove: list[str] = typer.Option([], "--remove", "-r", help="Tag to remove (repeatable)."),
    remote: Optional[str] = _REMOTE,
) -> None:
    """Add or remove tags of a version."""
    with fail_on_error():
        v = _registry(remote).tag(ref, tags or [], remove=remove)
    console.print(f"{v.ref}: {', '.join(v.tags) or 'no tags'}", highlight=False)


def lineage_cmd(
    ref: str = typer.Argument(..., help="ns/name[@version|:alias]."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Levels to show (default: all)."),
    as_json: bool = _JSON, remote: Optional[str] = _REMOTE,
) -> None:
    """Show what a version was derived from, as a tree (merges: the base and every term with its scale)."""
    from weightlab.registry.render import lineage_tree

    with fail_on_error():
        node = _registry(remote).lineage(ref, depth=depth)
    if as_json:
        _json(node.model_dump(mode="json"))
        return
    console.print(lineage_tree(node))


db_app = typer.Typer(help="Registry database schema.", no_args_is_help=True)
registry_app = typer.Typer(help="Registry maintenance: verify blobs, collect garbage, repair stored metadata.",
                            no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade_cmd(revision: str = typer.Option("head", "--revision", help="Target schema revision.")) -> None:
    """Upgrade the registry database schema (back it up first). A new database is created at head on first use."""
    from weightlab.registry import db
    from weightlab.registry.config import RegistrySettings

    settings = RegistrySettings()
    with fail_on_error():
        engine = db.make_engine(settings.db_url)
        try:
            with engine.connect() as conn:
                before = db.current_revision(conn)
            after = db.upgrade(engine, revision)
        finally:
            engine.dispose()
    url = engine.url.render_as_string(hide_password=True)
    console.print(f"{url}: schema {before or 'empty'} -> {after}" if before != after
                  else f"{url}: schema already at {after}", highlight=False)


@registry_app.command("verify")
def verify_cmd(
    remove_corrupt: bool = typer.Option(False, "--remove-corrupt", help="Delete corrupt blobs (re-adding the original file restores them)."),
    as_json: bool = _JSON, remote: Optional[str] = _REMOTE,
) -> None:
    """Re-hash every blob; exit 1 if any is corrupt or missing."""
    with fail_on_error():
        report = _registry(remote).verify(remove_corrupt=remove_corrupt)
    if as_json:
        _json(report.model_dump(mode="json"))
    else:
        for p in report.problems:
            used = ", ".join(p.versions) or "no version"
            err_console.print(f"[red]{p.problem}[/] blob {p.sha256}"
                              + (f" (content hashes to {p.actual_sha256})" if p.actual_sha256 else "")
                              + f"; used by {used}", highlight=False)
        if report.problems:
            err_console.print("Fix: add the original files again (`weightlab add FILE --name NS/NAME`) after "
                              "`weightlab registry verify --remove-corrupt`, or restore the blobs from a backup.",
                              highlight=False)
        console.print(f"checked {report.checked} blob(s): {len(report.problems)} problem(s)", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@registry_app.command("gc")
def gc_cmd(
    grace: float = typer.Option(3600.0, "--grace", help="Keep anything modified in the last GRACE seconds (adds in progress)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be deleted."),
    as_json: bool = _JSON, remote: Optional[str] = _REMOTE,
) -> None:
    """Delete blobs that no version references, and stale temp files and checkouts."""
    with fail_on_error():
        report = _registry(remote).gc(grace=grace, dry_run=dry_run)
    if as_json:
        _json(report.model_dump(mode="json"))
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {len(report.deleted)} blob(s) ({_size(report.freed_bytes)}), {report.temp_removed} temp "
                  f"file(s), {report.checkouts_removed} checkout(s); {report.kept} referenced blob(s) kept",
                  highlight=False)


@registry_app.command("repair", epilog=LIMITS_HELP)
def repair_cmd(
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be replaced."),
    as_json: bool = _JSON,
) -> None:
    """Replace stored metadata, configs, lineage recipes and job parameters that break the limits (written before
    weightlab checked them) with a note saying so. Readers are already shown that note instead; this rewrites the
    rows themselves. Runs on the database directly ($WEIGHTLAB_DB_URL), like `db upgrade`."""
    with fail_on_error():
        from weightlab.registry.service import Registry

        with Registry() as reg:
            found = reg.repair(dry_run=dry_run)
    if as_json:
        _json({"replaced": [] if dry_run else found, "found": found, "dry_run": dry_run})
        return
    for line in found:
        err_console.print(line, highlight=False, soft_wrap=True)
    verb = "would replace" if dry_run else "replaced"
    console.print(f"{verb} {len(found)} stored document(s) that break the limits", highlight=False)


def register(app: typer.Typer) -> None:
    for name, fn in (("add", add_cmd), ("import", import_cmd), ("ls", ls_cmd), ("show", show_cmd),
                     ("alias", alias_cmd), ("tag", tag_cmd), ("lineage", lineage_cmd)):
        app.command(name, epilog=LIMITS_HELP if name in ("add", "import", "tag", "alias") else None)(fn)
    app.add_typer(db_app, name="db")
    app.add_typer(registry_app, name="registry")
