"""Registry references and the pydantic models that cross the registry's boundary (pure pydantic: no database).

These are the whole interface: :class:`weightlab.registry.service.Registry` takes and returns them, the web API
and :class:`weightlab.Client` exchange them as JSON, and errors cross as :class:`ErrorBody`.

A reference is ``ns/name`` (the newest version), ``ns/name@N`` (version number N), ``ns/name@<hex>`` (8 or more
hex digits: a prefix of the version's sha256 or tensor hash; up to 7 plain digits read as a number) or
``ns/name:alias`` (``latest`` is the newest version; other aliases are set with ``alias``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from weightlab import errors
from weightlab.errors import MetadataError, NonFiniteError, RegistryError, WeightlabError
from weightlab.files import SHA256
from weightlab.kinds import ARTIFACT_KINDS as KINDS  # noqa: F401  (a residual's kind, or onnx: an export folder)
from weightlab.kinds import ArtifactKind as Kind
FOLDER_FORMATS = ("diffusers", "onnx")
Relation = Literal["merged_from", "trained_from", "exported_from"]
LATEST = "latest"

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_LABEL = r"[A-Za-z][A-Za-z0-9._-]{0,99}"
# Patterns are applied with fullmatch: `$` alone would also match before a trailing newline ("ok\n").
_REF = re.compile(rf"(?P<ns>{_NAME})/(?P<name>{_NAME})(?:@(?P<version>[0-9a-fA-F]{{1,64}})|:(?P<alias>{_LABEL}))?")
_NAME_RE = re.compile(_NAME)
_LABEL_RE = re.compile(_LABEL)


# Limits of every free-form JSON document the registry stores (version metadata and config, lineage recipes,
# job parameters): what a reader can always list, search and serialise.
JSON_MAX_DEPTH = 16  # nesting levels of objects and arrays ({"a": 1} is one level)
JSON_MAX_ITEMS = 2000  # object members and array elements, counted over the whole document
JSON_MAX_BYTES = 65536  # the document as compact UTF-8 JSON
JSON_MAX_STRING = 8192  # characters of one string value
JSON_MAX_KEY = 256  # characters of one object key
_JSON_MAX_INT = 2**63  # integers in (-2**63, 2**63)
JSON_LIMITS = (f"a JSON object of at most {JSON_MAX_BYTES} bytes, {JSON_MAX_DEPTH} levels of nesting and "
               f"{JSON_MAX_ITEMS} members and elements in all; keys of at most {JSON_MAX_KEY} characters, strings of "
               f"at most {JSON_MAX_STRING}, no NUL characters; numbers finite, integers within 64 bits")
INVALID_JSON_KEY = "weightlab.invalid"  # the placeholder key of a stored document that breaks the limits


def _check_text(text: str, limit: int, where: str) -> None:
    """Refuse text the databases cannot store or a reader cannot serialise: over ``limit``, NUL, lone surrogates."""
    if len(text) > limit:
        raise MetadataError(f"{where} is {len(text)} characters long; the limit is {limit}. Fix: store long text "
                            "as a file of its own.")
    if "\0" in text:
        raise MetadataError(f"{where} holds a NUL character. Fix: remove it.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MetadataError(f"{where} is not valid Unicode (a lone surrogate). Fix: send UTF-8 text.") from None


def check_json(doc: Any, what: str = "metadata") -> dict[str, Any]:
    """Return ``doc`` if it is a JSON object within the registry's limits (see :data:`JSON_LIMITS`).

    Iterative, so any depth is refused cleanly (no ``RecursionError``).

    Raises:
        MetadataError: the first limit it breaks, where (``metadata.a.b[3]``), and the fix.
    """
    if not isinstance(doc, dict):
        raise MetadataError(f"{what} must be a JSON object, not a {type(doc).__name__}. Fix: send an object, e.g. "
                            "{\"author\": \"me\"}.")
    items = 0
    stack: list[tuple[Any, int, str]] = [(doc, 1, what)]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, (dict, list, tuple)):  # a tuple is stored as a JSON array
            if depth > JSON_MAX_DEPTH:
                raise MetadataError(f"{what} nests deeper than {JSON_MAX_DEPTH} levels (at {where[:200]}). Fix: "
                                    "flatten it, e.g. join nested keys with '.'.")
            items += len(value)
            if items > JSON_MAX_ITEMS:
                raise MetadataError(f"{what} has more than {JSON_MAX_ITEMS} members and elements in all. Fix: keep "
                                    "metadata small; store large data as a file of its own.")
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise MetadataError(f"key {key!r} in {where[:200]} is not a string.")
                    _check_text(key, JSON_MAX_KEY, f"a key in {where[:200]}")
                    stack.append((item, depth + 1, f"{where}.{key}"))
            else:
                stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, JSON_MAX_STRING, where[:200])
        elif value is None or isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if not -_JSON_MAX_INT < value < _JSON_MAX_INT:
                raise MetadataError(f"{where[:200]} is an integer beyond 64 bits. Fix: send it as a string.")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise MetadataError(f"{where[:200]} is {value}, not a finite number. Fix: send null or a string "
                                    "instead.")
        else:
            raise MetadataError(f"{where[:200]} is a {type(value).__name__}, not a JSON value.")
    size = len(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())
    if size > JSON_MAX_BYTES:
        raise MetadataError(f"{what} is {size} bytes as JSON; the limit is {JSON_MAX_BYTES}. Fix: keep metadata "
                            "small; store large data as a file of its own.")
    return doc


def parse_json(text: str, what: str = "metadata") -> dict[str, Any]:
    """Parse and check a JSON object sent as text (e.g. the ``metadata`` query value of an upload).

    Raises:
        MetadataError: not JSON, nested beyond what can be parsed, or beyond :data:`JSON_LIMITS`.
    """
    def constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        doc = json.loads(text, parse_constant=constant)
    except RecursionError:
        raise MetadataError(f"{what} nests deeper than {JSON_MAX_DEPTH} levels. Fix: flatten it, e.g. join nested "
                            "keys with '.'.") from None
    except ValueError as e:
        raise MetadataError(f"{what} is not valid JSON ({e}). Fix: send a JSON object, e.g. "
                            "{\"author\": \"me\"}.") from None
    return check_json(doc, what)


def stored_json(doc: dict[str, Any] | None, what: str) -> dict[str, Any] | None:
    """A stored document as readers get it: itself, or (stored before the limits were checked, and breaking them)
    a placeholder that says so, so that one bad row cannot break every listing."""
    if doc is None:
        return None
    try:
        return check_json(doc, what)
    except MetadataError as e:
        return {INVALID_JSON_KEY: f"hidden: {e} Fix: an operator runs `weightlab registry repair`."}


def check_label(value: str, what: str) -> str:
    """Validate an alias or tag: a letter, then letters, digits, ``.``, ``_`` or ``-`` (at most 100)."""
    if not _LABEL_RE.fullmatch(value):
        raise RegistryError(f"invalid {what} {value!r}: use a letter, then letters, digits, '.', '_' or '-' "
                            "(at most 100 characters).")
    return value


def check_finite(info: VersionInfo) -> VersionInfo:
    """Return ``info`` unless it was recorded, when it was added, as holding NaN or Inf values.

    Raises:
        NonFiniteError: naming the version, before anything of it is loaded.
    """
    if info.finite is False:
        raise NonFiniteError(f"{info.ref} holds NaN or Inf values (found when it was added), so it cannot be merged. "
                             "Fix: use another version; the file is damaged or was trained into divergence.")
    return info


def check_registered(recipe: Any) -> Any:
    """Raise ValueError unless every source of ``recipe`` (base and terms) is a registry reference."""
    for source in (recipe.base, *(t.source for t in recipe.terms)):
        if not Ref.is_ref(source):
            raise ValueError(f"recipe source {source!r} is not a registry reference (ns/name[@N|:alias]); the "
                             "server merges only registered versions. Fix: add the file first, then name it")
    return recipe


@dataclass(frozen=True)
class Ref:
    """A parsed reference; at most one of ``number``, ``digest`` and ``alias`` is set."""

    namespace: str
    name: str
    number: int | None = None
    digest: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        """Parse ``ns/name[@version|@hash|:alias]``.

        Raises:
            RegistryError: the text is not a reference (the message shows the accepted forms).
        """
        m = _REF.fullmatch(text.strip())
        if not m:
            raise RegistryError(
                f"{text!r} is not a registry reference. Use ns/name, ns/name@3, ns/name@<8+ hex digits of a hash> "
                "or ns/name:alias (names: letters, digits, '.', '_', '-'; e.g. local/my-style@2).")
        version = m["version"]
        if version is None:
            return cls(m["ns"], m["name"], alias=m["alias"])
        if version.isdigit() and len(version) < 8:
            if int(version) < 1:
                raise RegistryError(f"{text!r}: version numbers start at 1.")
            return cls(m["ns"], m["name"], number=int(version))
        if len(version) < 8:
            raise RegistryError(f"{text!r}: a hash prefix needs at least 8 hex digits.")
        return cls(m["ns"], m["name"], digest=version.lower())

    @classmethod
    def parse_name(cls, text: str) -> Ref:
        """Parse a plain ``ns/name`` (no version or alias), as used to name a new version."""
        ref = cls.parse(text)
        if ref != cls(ref.namespace, ref.name):
            raise RegistryError(f"{text!r}: name a new version as ns/name, without @version or :alias.")
        return ref

    @staticmethod
    def is_ref(text: str) -> bool:
        return bool(_REF.fullmatch(text.strip()))

    @property
    def artifact(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        if self.number is not None:
            return f"{self.artifact}@{self.number}"
        if self.digest is not None:
            return f"{self.artifact}@{self.digest}"
        return f"{self.artifact}:{self.alias}" if self.alias else self.artifact


def check_name(text: str) -> str:
    if not _NAME_RE.fullmatch(text):
        raise RegistryError(f"invalid name {text!r}: use letters, digits, '.', '_' or '-' (at most 100 characters, "
                            "starting with a letter or digit).")
    return text


class FileInfo(BaseModel):
    """One file of a version: its path inside the version, its blob, and (safetensors) its tensor hash."""

    path: str
    sha256: str
    size_bytes: int
    tensor_hash: str | None = None


def manifest_digest(files: list[FileInfo]) -> str:
    """sha256 of the ``sha256sum``-style listing (``<sha256>  <path>``, sorted by path) of a version's files."""
    listing = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(listing.encode()).hexdigest()


class VersionBase(BaseModel):
    """What is recorded about a version when it is added. A new field here (with a default), a column of the same
    name in ``models.Version`` and a migration are all it takes to store and serve it."""

    sha256: str = Field(description="the file's sha256; for a folder, manifest_digest(files)")
    tensor_hash: str = Field(description="identity: header-independent (metadata edits keep it)")
    size_bytes: int
    format: str
    family: str
    kind: Kind
    representation: str
    ranks: list[int] = []
    alphas: list[float | None] = Field([], description="LoRA alphas; None where the stored alpha is NaN or Inf")
    dtypes: list[str] = []
    n_params: int = 0
    n_targets: int = 0
    config: dict[str, Any] | None = None
    metadata: dict[str, Any] = {}
    source: str | None = None
    files: list[FileInfo]
    tags: list[str] = []
    finite: bool | None = Field(None, description="whether every tensor value is finite, checked when it was added "
                                "(False: it holds NaN or Inf, and merges refuse it); None: not checked (an ONNX "
                                "export, or added before weightlab recorded it)")


class VersionCreate(VersionBase):
    """Everything stored about a new version (the ingest step fills it from the stored files), checked."""

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        return sorted({check_label(t, "tag") for t in tags})

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, alphas: list[float | None]) -> list[float | None]:
        return [a if a is not None and math.isfinite(a) else None for a in alphas]  # JSON (PostgreSQL's) has no NaN

    @field_validator("metadata", "config")
    @classmethod
    def _json(cls, doc: dict[str, Any] | None, info) -> dict[str, Any] | None:
        return doc if doc is None else check_json(doc, info.field_name)  # MetadataError is no ValueError: raised as is

    @field_validator("source")
    @classmethod
    def _source(cls, source: str | None) -> str | None:
        if source is not None:
            _check_text(source, 4096, "source")
        return source


class VersionKey(BaseModel):
    """Which version a :class:`VersionInfo` is (its fields come first in its JSON)."""

    ref: str = Field(description="canonical reference, ns/name@N")
    namespace: str
    name: str
    number: int


class VersionInfo(VersionBase, VersionKey):
    """A registered version. Immutable except for its labels (``tags``, ``aliases``)."""

    aliases: list[str]
    created_at: datetime

    @property
    def artifact(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def is_folder(self) -> bool:
        return self.format in FOLDER_FORMATS


class LineageInput(BaseModel):
    """One input of a derivation: a registered version, or an outside file known by its tensor hash.

    Args:
        ref (str | None): ``ns/name[@version|:alias]``; recorded as the exact version it resolves to. With
            ``tensor_hash`` too, the version of that artifact holding those tensors (an alias may have moved
            since the merge ran).
        tensor_hash (str | None): the input's tensor hash (of the file, or of the weights file in a folder).
            Alone, for an input that is not registered (e.g. a recipe term given as a path): linked to a
            registered version holding those tensors if there is one.
        label (str | None): how to show an unregistered input (its path).
        role (str, default "term"): ``base``, a kind (``style``, ``image_accel``, ...) or another word.
        scale (float | None): the input's scale in the merge (α, β, γ).
        components (list[str] | None): the pipeline components the input changed in the output (``unet``,
            ``text_encoder``; empty: none); None: not recorded.
    """

    model_config = ConfigDict(frozen=True)
    ref: str | None = None
    tensor_hash: str | None = None
    label: str | None = None
    role: str = "term"
    scale: float | None = None
    components: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> LineageInput:
        if self.ref is None and self.tensor_hash is None:
            raise ValueError("give `ref` (a registered version), `tensor_hash` (an outside file), or both")
        if self.tensor_hash is not None and not SHA256.fullmatch(self.tensor_hash):
            raise ValueError(f"tensor_hash {self.tensor_hash!r} is not a sha256 digest (64 lowercase hex digits)")
        check_label(self.role, "role")
        for component in self.components or ():
            check_label(component, "component")
        if self.label is not None:
            _check_text(self.label, 1024, "lineage input label")
        return self


class Derivation(BaseModel):
    """How a version was produced: the relation, its ordered inputs and (for merges) the recipe as JSON."""

    model_config = ConfigDict(frozen=True)
    relation: Relation
    inputs: list[LineageInput] = Field(min_length=1, max_length=1000)
    recipe: dict[str, Any] | None = None

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, recipe: dict[str, Any] | None) -> dict[str, Any] | None:
        return recipe if recipe is None else check_json(recipe, "recipe")

    @classmethod
    def from_recipe(cls, recipe: Any, *, input_hashes: dict[str, str] | None = None,
                    components: dict[str, list[str]] | None = None) -> Derivation:
        """A ``merged_from`` derivation of a :class:`weightlab.recipe.Recipe`: the base, then every term with its scale
        and the pipeline components it changed.

        Args:
            recipe (Recipe): the merge's recipe; its JSON is recorded.
            input_hashes (dict[str, str] | None): source -> tensor hash, as the merge engine writes into the
                output's ``weightlab.inputs`` metadata. Needed for sources that are paths; for registry
                references it pins the exact version that was merged.
            components (dict[str, list[str]] | None): source -> the components the term changed; a term not in it
                records the components it names (None when it names none: not known without its file).

        Example:
            >>> Derivation.from_recipe(recipe, input_hashes={"/tmp/style.safetensors": "ab12..."})  # doctest: +SKIP
        """
        hashes = {k: v for k, v in (input_hashes or {}).items() if v}

        touched = components or {}

        def one(source: str, role: str, scale: float | None, parts: Any = None) -> LineageInput:
            parts = None if parts is None else list(parts)
            if Ref.is_ref(source):
                return LineageInput(ref=source, tensor_hash=hashes.get(source), role=role, scale=scale, components=parts)
            if source not in hashes:
                raise RegistryError(f"recipe input {source!r} is a path, not a registry reference, and no tensor hash "
                                    "was given for it. Fix: pass input_hashes={path: tensor_hash}, or name it ns/name@N.")
            return LineageInput(tensor_hash=hashes[source], label=source, role=role, scale=scale, components=parts)

        inputs = [one(recipe.base, "base", None)] + [one(t.source, t.kind, t.scale, touched.get(t.source, t.components))
                                                     for t in recipe.terms]
        return cls(relation="merged_from", inputs=inputs, recipe=recipe.model_dump(mode="json"))

    @classmethod
    def from_merged_file(cls, path: str | os.PathLike, *, resolve: Callable[[str], Path] | None = None) -> Derivation:
        """The derivation a merge output carries: ``weightlab.recipe`` and ``weightlab.inputs`` in its header, and
        the components each term changed in it (see :func:`_touched`).

        Args:
            path (str | PathLike): a file from ``weightlab.merge_to_file``, or a folder from ``merge_to_folder``.
            resolve (Callable[[str], Path] | None, default None): turns the recipe's sources into paths, to read
                which components each term carries; None: paths only (a reference's components are then recorded
                only where the term names them).
        Raises:
            RegistryError: the file holds no weightlab merge metadata.
        Example:
            >>> reg.add("out.safetensors", name="me/anim", lineage=Derivation.from_merged_file("out.safetensors"))  # doctest: +SKIP
        """
        import json

        from weightlab.files import read_header
        from weightlab.inspect import weights_file
        from weightlab.recipe import Recipe

        meta = read_header(weights_file(Path(path))).metadata
        if "weightlab.recipe" not in meta:
            raise RegistryError(f"{path}: no `weightlab.recipe` in its safetensors metadata; it is not a weightlab "
                                "merge output. Fix: pass lineage=Derivation.from_recipe(recipe, ...) yourself.")
        recipe = Recipe.model_validate_json(meta["weightlab.recipe"])
        return cls.from_recipe(recipe, input_hashes=json.loads(meta.get("weightlab.inputs", "{}")),
                               components=_touched(recipe, Path(path), resolve))


def _touched(recipe: Any, output: Path, resolve: Callable[[str], Path] | None) -> dict[str, list[str]]:
    """source -> the components each term of ``recipe`` changed in the merge ``output``: those its file carries and
    the term names (all when it names none) that the output holds (the UNet; in a folder, ``<component>/`` where the
    merge wrote one). A term whose file cannot be read here counts as carrying what it names; if it names none, it
    is left out (not known)."""
    from weightlab.loading import load
    from weightlab.merge import resolve_path

    out = {}
    for t in recipe.terms:
        try:
            carries = load((resolve or resolve_path)(t.source), kind=t.kind).components
        except WeightlabError:  # moved or deleted since the merge, or a reference without a resolver
            if t.components is None:
                continue
            carries = t.components
        out[t.source] = [c for c in carries if (t.components is None or c in t.components)
                         and (c == "unet" or (output / c).is_dir())]
    return out


class LineageEdge(BaseModel):
    role: str
    scale: float | None
    components: list[str] | None = Field(None, description="the pipeline components the input changed; None: not recorded")
    node: LineageNode


class LineageNode(BaseModel):
    """A version (or an unregistered input) and, recursively, what it was derived from."""

    label: str = Field(description="canonical reference, or the recorded label of an unregistered input")
    tensor_hash: str
    version: VersionInfo | None = None
    relation: Relation | None = None
    recipe: dict[str, Any] | None = None
    inputs: list[LineageEdge] = []
    truncated: bool = Field(False, description="inputs not expanded (depth limit, or already shown above)")


class BlobProblem(BaseModel):
    sha256: str
    problem: Literal["corrupt", "missing"]
    actual_sha256: str | None = None
    versions: list[str] = Field(description="references of the versions that use this blob")


class VerifyReport(BaseModel):
    """Result of re-hashing every blob."""

    checked: int
    problems: list[BlobProblem]
    removed: list[str] = Field(default_factory=list, description="corrupt blobs deleted (remove_corrupt=True)")

    @property
    def ok(self) -> bool:
        return not self.problems


class GcReport(BaseModel):
    """Result of a garbage collection."""

    deleted: list[str]
    freed_bytes: int
    kept: int
    temp_removed: int
    checkouts_removed: int
    dry_run: bool


LineageEdge.model_rebuild()


# -- tokens and namespaces (the web API's access control) -----------------------------------------------------

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
ALL = "*"  # a token's namespace that stands for every namespace


class TokenBase(BaseModel):
    name: str = Field("token", min_length=1, max_length=100, description="a label: who or what uses it")
    namespace: str = Field(description="the namespace it grants access to; * for every namespace")
    scope: Scope

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return value if value == ALL else check_name(value)


class TokenCreate(TokenBase):
    name: str = Field("token", min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$",
                      description="a label: who or what uses it (printable text, no control characters)")
    expires_in_days: float | None = Field(None, gt=0, le=36500, description="none: never expires")


class TokenPublic(TokenBase):
    id: int
    created_at: datetime
    expires_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="the secret; shown only now. Send it as `Authorization: Bearer <token>`")


class NamespaceBase(BaseModel):
    public: bool = Field(False, description="anyone may read it, without a token")


class NamespaceUpdate(NamespaceBase):
    pass


class NamespacePublic(NamespaceBase):
    name: str


# -- request bodies of the web API -------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class AliasUpdate(BaseModel):
    ref: str = Field(description="the version to point the alias at: ns/name@N, ns/name@<hash>, ns/name:other-alias")


class TagsUpdate(BaseModel):
    add: list[str] = Field(default_factory=list, max_length=100)
    remove: list[str] = Field(default_factory=list, max_length=100)


# -- errors ------------------------------------------------------------------------------------------------------


def error_classes() -> dict[str, type[WeightlabError]]:
    """Every WeightlabError class by name (they all live in :mod:`weightlab.errors`)."""
    found, todo = {}, [WeightlabError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return found


class ErrorBody(BaseModel):
    """Every error of the web API: what went wrong and how to fix it, the error's class, and its fields.

    The HTTP status is the class's ``http_status``. :meth:`exception` rebuilds the error on the client's side.
    """

    detail: str
    error: str = Field(description="the weightlab error class, e.g. NotFoundError")
    fields: dict[str, Any] = Field({}, description="the error's fields besides its message, e.g. `version` (the "
                                   "version that exists) of a DuplicateVersionError, `keys` of an UnmatchedKeysError")

    @classmethod
    def of(cls, error: WeightlabError) -> ErrorBody:
        return cls(detail=str(error), error=type(error).__name__,
                   fields={name: getattr(error, name) for name in error.field_names})

    def exception(self) -> WeightlabError:
        """The error as the same class with the same fields (a RegistryError if this side does not know it)."""
        cls = error_classes().get(self.error)
        if cls is None or not set(cls.field_names) <= self.fields.keys():
            return RegistryError(self.detail)
        hints = get_type_hints(cls.__init__, vars(errors), globals())  # annotations name the wire types above
        return cls(self.detail, **{name: TypeAdapter(hints[name]).validate_python(self.fields[name])
                                   for name in cls.field_names})



# -- jobs (the queue and its runners: weightlab.registry.jobs) --------------------------------------------------

JobStatus = Literal["queued", "running", "succeeded", "failed"]


class JobBase(BaseModel):
    kind: str = Field(description="what to run: merge or export (more kinds plug in with register_runner)")
    params: dict[str, Any] = Field(description="the kind's parameters, e.g. for merge: recipe, output, tags, metadata; "
                                               "for export: source or recipe, output, dtype, opset, verify, tags, metadata")


class JobCreate(JobBase):
    pass


class JobPublic(JobBase):
    id: int
    status: JobStatus
    namespace: str = Field(description="where the result is registered")
    result_ref: str | None = Field(description="the registered result, once succeeded")
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")
