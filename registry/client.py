"""``weightlab.Client``: a registry server (``weightlab serve``) with the interface of :class:`weightlab.Registry`.

Code written against ``Registry`` works against a ``Client``: both keep
:class:`~weightlab.registry.contract.RegistryProtocol`, with the same arguments, return values
(:class:`~weightlab.registry.schemas.VersionInfo`, :class:`~weightlab.registry.schemas.LineageNode`, ...) and
errors (the server's error is raised again here as the same class, with its message and fields). This module
imports no database code (no SQLAlchemy). ``add`` prepares the file locally, exactly
as ``Registry.add`` does (a pickle is converted with ``allow_pickle``, ``hf://`` sources come through the
local Hugging Face cache), then streams it to the server (a folder as one tar stream), which validates and stores it.
``path`` and ``open`` download the version's files into a local content-addressed cache
(``$WEIGHTLAB_HOME/remote/<server>/``), resuming interrupted downloads with HTTP Range and verifying every
sha256. Uploads and downloads show progress bars on a terminal.

Example:
    >>> client = weightlab.Client("http://registry:8000", token="wl_...")   # doctest: +SKIP
    >>> v = client.add("style.safetensors", name="team/style", tags=["anime"])  # doctest: +SKIP
    >>> client.alias(v.ref, "prod").ref                                       # doctest: +SKIP
    'team/style@1'
    >>> lora = client.open("team/style:prod")                                 # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import quote

import httpx

from pydantic import ValidationError

from weightlab.errors import HashMismatchError, RegistryError, fmt_validation_errors
from weightlab.files import file_sha256
from weightlab.registry import folder_tar
from weightlab.registry.checkouts import Checkouts
from weightlab.registry.config import RegistrySettings
from weightlab.registry.contract import RegistryProtocol
from weightlab.registry.ingest import stage
from weightlab.registry.onnx_artifact import check_residual
from weightlab.registry.schemas import (Derivation, ErrorBody, FileInfo, GcReport, JobCreate, JobPublic, Kind,
                                        LineageNode, NamespacePublic, Ref, Scope, TokenCreate, TokenCreated,
                                        TokenPublic, VerifyReport, VersionInfo, manifest_digest)
from weightlab.registry.store import LocalBlobStore

TOKEN_ENV = "WEIGHTLAB_TOKEN"
_CHUNK = 1024 * 1024
_PAGE = 1000
_RETRIES = 5


class Client(RegistryProtocol):
    """A registry server, used like a local :class:`~weightlab.registry.service.Registry`.

    Args:
        url (str): the server, e.g. ``http://127.0.0.1:8000``.
        token (str | None): API token; default ``$WEIGHTLAB_TOKEN``. Without one, only public namespaces can be read.
        home (str | PathLike | None): where the download cache lives; default ``$WEIGHTLAB_HOME`` (``~/.weightlab``).
        timeout (float, default 60): seconds to wait for the server to answer or send the next bytes.
        progress (bool | None): progress bars for uploads and downloads; default only on a terminal.
        transport (httpx.BaseTransport | None): for tests and custom networking.
    """

    def __init__(self, url: str, *, token: str | None = None, home: str | os.PathLike | None = None,
                 timeout: float = 60.0, progress: bool | None = None, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        token = token or os.environ.get(TOKEN_ENV)
        self._http = httpx.Client(base_url=f"{self.url}/api/v1", timeout=httpx.Timeout(timeout, connect=10.0),
                                  headers={"authorization": f"Bearer {token}"} if token else {}, transport=transport)
        settings = RegistrySettings(**({"home": Path(home)} if home is not None else {}))
        root = settings.home.expanduser() / "remote" / re.sub(r"[^A-Za-z0-9._-]+", "_", self.url.split("://")[-1])
        self._cache = LocalBlobStore(root / "blobs")
        self._checkouts = Checkouts(root / "checkouts", self._cache)
        self._no_progress = None if progress is None else not progress

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections to the server."""
        self._http.close()

    # -- transport ------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise RegistryError(f"cannot reach the registry server at {self.url} ({type(e).__name__}: {e}). Fix: "
                                "check the URL (--remote, $WEIGHTLAB_REMOTE) and that `weightlab serve` runs there.") from None
        if r.is_error:
            _raise(r)
        return r

    def _progress(self, total: int, desc: str, initial: int = 0):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    disable=self._no_progress, leave=False)

    # -- adding ---------------------------------------------------------------------------------------------

    def add(self, source: str | os.PathLike, *, name: str | None = None, kind: Kind | None = None,
            tags: Iterable[str] = (), metadata: dict[str, Any] | None = None, sha256: str | None = None,
            revision: str | None = None, lineage: Derivation | None = None, allow_pickle: bool = False,
            strict: bool = True, exist_ok: bool = True) -> VersionInfo:
        """Upload a file or folder as the next version of ``name`` (see :meth:`Registry.add` for the arguments).

        Every file is hashed here (unless its sha256 is known), streamed (a folder as one tar stream), re-hashed by
        the server as it arrives and validated like a local ``add``; a refused upload stores nothing.
        """
        return self._add(source, name=name, kind=kind, tags=tags, metadata=metadata, sha256=sha256, revision=revision,
                         lineage=lineage, allow_pickle=allow_pickle, strict=strict, exist_ok=exist_ok)

    def register_output(self, path: str | os.PathLike, *, name: str, kind: Kind, derivation: Derivation,
                        tags: Iterable[str] = (), metadata: dict[str, Any] | None = None,
                        source: str | None = None) -> VersionInfo:
        """Upload what a merge, a training run or an export produced, with its lineage (see
        :meth:`Registry.register_output`)."""
        return self._add(path, name=name, kind=kind, tags=tags, metadata=metadata, lineage=derivation,
                         recorded_source=source)

    def _add(self, source: str | os.PathLike, *, name: str | None = None, kind: Kind | None = None,
             tags: Iterable[str] = (), metadata: dict[str, Any] | None = None, sha256: str | None = None,
             revision: str | None = None, lineage: Derivation | None = None, allow_pickle: bool = False,
             strict: bool = True, exist_ok: bool = True, recorded_source: str | None = None) -> VersionInfo:
        with stage(source, revision=revision, allow_pickle=allow_pickle) as staged:
            ref = Ref.parse_name(name or staged.default_name)
            params: dict[str, Any] = {"tag": list(tags), "source": recorded_source or staged.source, "strict": strict,
                                      "exist_ok": exist_ok}
            if kind is not None:
                params["kind"] = kind
            if metadata:
                params["metadata"] = json.dumps(metadata)
            if lineage is not None:
                params["lineage"] = lineage.model_dump_json(exclude_none=True)
            upload = self._upload_folder if staged.folder else self._upload_file
            r = upload(f"/artifacts/{ref.namespace}/{ref.name}", staged, params, sha256)
        return VersionInfo.model_validate_json(r.content)

    def _upload_file(self, artifact: str, staged, params: dict[str, Any], sha256: str | None) -> httpx.Response:
        f = staged.files[0]
        size = f.path.stat().st_size
        params = {**params, "sha256": f.sha256 or sha256 or file_sha256(f.path), "filename": f.relpath}
        with self._progress(size, f"upload {f.relpath}") as bar:
            return self._request("POST", f"{artifact}/versions", params=params, content=_read_chunks(f.path, bar),
                                 headers={"content-length": str(size), "content-type": "application/octet-stream"})

    def _upload_folder(self, artifact: str, staged, params: dict[str, Any], sha256: str | None) -> httpx.Response:
        """One tar stream; ``sha256`` (the folder's manifest digest) is checked by the server when given."""
        files = [(f.path, f.relpath, f.sha256 or file_sha256(f.path)) for f in staged.files]
        listing = [FileInfo(path=rel, sha256=sha, size_bytes=path.stat().st_size) for path, rel, sha in files]
        folder = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(staged.source).name).strip("-.") or "folder"
        params = {**params, "sha256": sha256 or manifest_digest(listing), "folder": folder[:100]}
        size = folder_tar.tar_size(files)
        with self._progress(size, f"upload {folder}/") as bar:
            return self._request("POST", f"{artifact}/folders", params=params,
                                 content=_counted(folder_tar.tar_chunks(files), bar),
                                 headers={"content-length": str(size), "content-type": "application/x-tar"})

    def add_lineage(self, ref: str, derivation: Derivation) -> LineageNode:
        """Record how an existing version was produced (once)."""
        r = self._request("POST", f"{_version_path(ref)}/lineage", content=derivation.model_dump_json(),
                          headers={"content-type": "application/json"})
        return LineageNode.model_validate_json(r.content)

    # -- reading --------------------------------------------------------------------------------------------

    def get(self, ref: str) -> VersionInfo:
        """The version ``ns/name[@version|@hash|:alias]`` names (no suffix: the newest)."""
        return VersionInfo.model_validate_json(self._request("GET", _version_path(ref)).content)

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``ns/name``, oldest first."""
        ref = Ref.parse_name(name)
        r = self._request("GET", f"/artifacts/{ref.namespace}/{ref.name}/versions")
        return [VersionInfo.model_validate(v) for v in r.json()]

    def search(self, *, kind: str | None = None, family: str | None = None, tag: str | None = None,
               text: str | None = None, namespace: str | None = None, all_versions: bool = False,
               limit: int | None = None, offset: int = 0) -> list[VersionInfo]:
        """Versions matching every filter, sorted by name (see :meth:`Registry.search`); only namespaces the
        token may read. Pages through the server's results."""
        filters = {k: v for k, v in dict(kind=kind, family=family, tag=tag, text=text, namespace=namespace).items()
                   if v is not None}
        found: list[VersionInfo] = []
        while limit is None or len(found) < limit:
            page = _PAGE if limit is None else min(_PAGE, limit - len(found))
            r = self._request("GET", "/versions", params={**filters, "all_versions": all_versions, "limit": page,
                                                          "offset": offset + len(found)})
            batch = [VersionInfo.model_validate(v) for v in r.json()]
            found += batch
            if len(batch) < page:
                break
        return found

    def lineage(self, ref: str, *, depth: int | None = None) -> LineageNode:
        """What ``ref`` was derived from, recursively (ancestors you cannot read are shown without details)."""
        params = {"depth": depth} if depth is not None else {}
        return LineageNode.model_validate_json(self._request("GET", f"{_version_path(ref)}/lineage",
                                                             params=params).content)

    def path(self, ref: str) -> Path:
        """A local path with the version's content (downloaded once into the cache, verified)."""
        info = self.get(ref)
        for f in info.files:
            self._fetch(f.sha256, f.size_bytes, f.path)
        return self._checkouts.path(info.files, folder=info.is_folder)

    def open(self, ref: str, **load_kwargs: Any):
        """Download (once) and load the version as a residual, like :meth:`Registry.open`."""
        from weightlab.loading import load

        info = self.get(ref)
        check_residual(info)
        load_kwargs.setdefault("strict", False)
        return load(self.path(info.ref), kind=info.kind, **load_kwargs)

    def download(self, ref: str, dest: str | os.PathLike) -> Path:
        """Copy a single-file version's file to ``dest`` (resumable; its sha256 verified)."""
        info = self.get(ref)
        if info.is_folder:
            raise RegistryError(f"{info.ref} is a folder version. Fix: use path({info.ref!r}), which lays it out.")
        dest = Path(dest)
        f = info.files[0]
        self._download(f.sha256, f.size_bytes, dest.with_name(dest.name + ".part"), f.path)
        os.replace(dest.with_name(dest.name + ".part"), dest)
        return dest

    def _fetch(self, sha256: str, size: int, label: str) -> Path:
        """The blob in the local cache, downloaded (and resumed after an interruption) if missing."""
        if not self._cache.exists(sha256):
            self._cache.tmp_dir.mkdir(parents=True, exist_ok=True)
            part = self._cache.tmp_dir / f"{sha256}.part"
            self._download(sha256, size, part, label)
            self._cache.adopt(part, sha256)
        return self._cache.local_path(sha256)

    def _download(self, sha256: str, size: int, part: Path, label: str) -> None:
        """Download a blob into ``part``, continuing from what ``part`` already holds; verify its sha256.

        Raises:
            HashMismatchError: the bytes do not hash to ``sha256`` (``part`` is removed).
            RegistryError: the connection failed repeatedly (``part`` is kept: calling again resumes).
        """
        h = hashlib.sha256()
        if part.exists() and part.stat().st_size <= size:
            with open(part, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        else:
            part.unlink(missing_ok=True)
        have = part.stat().st_size if part.exists() else 0
        failures = 0
        with open(part, "ab") as out, self._progress(size, f"download {label}", initial=have) as bar:
            while have < size:
                headers = {"range": f"bytes={have}-", "if-range": f'"{sha256}"'} if have else {}
                try:
                    with self._http.stream("GET", f"/blobs/{sha256}", headers=headers) as r:
                        if r.is_error:
                            r.read()
                            _raise(r)
                        if r.status_code == 200 and have:  # the server sent everything: start over
                            out.truncate(0)
                            h, have = hashlib.sha256(), 0
                            bar.reset(total=size)
                        for chunk in r.iter_bytes(_CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            have += len(chunk)
                            bar.update(len(chunk))
                except httpx.TransportError as e:
                    failures += 1
                    if failures > _RETRIES:
                        out.flush()
                        raise RegistryError(
                            f"downloading blob {sha256} from {self.url} failed {failures} times ({type(e).__name__}: "
                            f"{e}); {have} of {size} bytes are kept in {part}. Fix: run it again: it resumes.") from None
                    time.sleep(min(0.2 * 2 ** failures, 5.0))
        if have != size or h.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            raise HashMismatchError(f"blob {sha256} from {self.url} arrived with sha256 {h.hexdigest()} and {have} bytes "
                                    f"(expected {size}); nothing was kept. Fix: download it again.")

    # -- labels ---------------------------------------------------------------------------------------------

    def alias(self, ref: str, alias: str) -> VersionInfo:
        """Point ``alias`` of the artifact at the version ``ref`` names; moves it if it exists."""
        parsed = Ref.parse(ref)
        r = self._request("PUT", f"/artifacts/{parsed.namespace}/{parsed.name}/aliases/{_segment(alias)}",
                          json={"ref": ref})
        return VersionInfo.model_validate_json(r.content)

    def unalias(self, ref: str) -> None:
        """Delete the alias in ``ns/name:alias``."""
        parsed = Ref.parse(ref)
        if parsed.alias is None:
            raise RegistryError(f"{ref!r} names no alias. Fix: write ns/name:alias.")
        self._request("DELETE", f"/artifacts/{parsed.namespace}/{parsed.name}/aliases/{_segment(parsed.alias)}")

    def tag(self, ref: str, add: Iterable[str] = (), *, remove: Iterable[str] = ()) -> VersionInfo:
        """Add and remove tags of a version; returns it with its new tags."""
        r = self._request("PATCH", f"{_version_path(ref)}/tags", json={"add": list(add), "remove": list(remove)})
        return VersionInfo.model_validate_json(r.content)

    # -- maintenance ----------------------------------------------------------------------------------------

    def verify(self, *, remove_corrupt: bool = False) -> VerifyReport:
        """Re-hash every blob on the server (needs an admin token for ``*``)."""
        r = self._request("POST", "/maintenance/verify", params={"remove_corrupt": remove_corrupt}, timeout=None)
        return VerifyReport.model_validate_json(r.content)

    def gc(self, *, grace: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Delete the server's unreferenced blobs (needs an admin token for ``*``)."""
        r = self._request("POST", "/maintenance/gc", params={"grace": grace, "dry_run": dry_run}, timeout=None)
        return GcReport.model_validate_json(r.content)

    # -- jobs ---------------------------------------------------------------------------------------------

    def submit_job(self, kind: str, params: dict[str, Any]) -> JobPublic:
        """Queue a job on the server (see :meth:`Registry.submit_job`); needs write on its output's namespace."""
        r = self._request("POST", "/jobs", content=JobCreate(kind=kind, params=params).model_dump_json(),
                          headers={"content-type": "application/json"})
        return JobPublic.model_validate_json(r.content)

    def job(self, job_id: int) -> JobPublic:
        """The job ``job_id``, if its result goes to a namespace the token may read."""
        return JobPublic.model_validate_json(self._request("GET", f"/jobs/{job_id}").content)

    def jobs(self, *, status: str | None = None, limit: int = 100, offset: int = 0) -> list[JobPublic]:
        """Jobs whose results go to namespaces the token may read, newest first."""
        params: dict[str, Any] = {"limit": limit, "offset": offset} | ({"status": status} if status else {})
        return [JobPublic.model_validate(j) for j in self._request("GET", "/jobs", params=params).json()]

    # -- tokens and namespaces ------------------------------------------------------------------------------

    def create_token(self, *, namespace: str, scope: Scope, name: str = "token",
                     expires_in_days: float | None = None) -> TokenCreated:
        """A new token for a namespace this client's token administers; its secret is shown only here."""
        spec = TokenCreate(name=name, namespace=namespace, scope=scope, expires_in_days=expires_in_days)
        r = self._request("POST", "/tokens", content=spec.model_dump_json(), headers={"content-type": "application/json"})
        return TokenCreated.model_validate_json(r.content)

    def tokens(self) -> list[TokenPublic]:
        """The tokens of the namespace this client's token administers (every token with admin on ``*``)."""
        return [TokenPublic.model_validate(t) for t in self._request("GET", "/tokens").json()]

    def revoke_token(self, token_id: int) -> None:
        """Revoke a token of a namespace this client's token administers (or this client's own token)."""
        self._request("DELETE", f"/tokens/{token_id}")

    def namespaces(self) -> list[NamespacePublic]:
        """The namespaces the token may read, and whether anyone may read them without a token."""
        return [NamespacePublic.model_validate(n) for n in self._request("GET", "/namespaces").json()]

    def set_public(self, namespace: str, public: bool = True) -> NamespacePublic:
        """Let anyone read ``namespace`` without a token (or stop it, with ``public=False``)."""
        r = self._request("PUT", f"/namespaces/{_segment(namespace)}", json={"public": public})
        return NamespacePublic.model_validate_json(r.content)


def _segment(text: str) -> str:
    return quote(text, safe="")


def _version_path(ref: str) -> str:
    """The API path of the version a reference names."""
    r = Ref.parse(ref)
    if r.number is not None:
        selector = str(r.number)
    elif r.digest is not None:
        selector = r.digest
    else:
        selector = ":" + r.alias if r.alias and r.alias != "latest" else "latest"
    return f"/artifacts/{r.namespace}/{r.name}/versions/{_segment(selector)}"


def _counted(chunks: Iterator[bytes], bar) -> Iterator[bytes]:
    for chunk in chunks:
        bar.update(len(chunk))
        yield chunk


def _read_chunks(path: Path, bar) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            bar.update(len(chunk))
            yield chunk


def _raise(r: httpx.Response):
    """Raise the error the server reported, as the same WeightlabError class with its fields (RegistryError if the
    body is not an :class:`ErrorBody`: a request the web framework refused, or not a weightlab server)."""
    try:
        raise ErrorBody.model_validate_json(r.content).exception() from None
    except ValidationError:
        pass
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # request validation (422): [{"loc": [...], "msg": ...}, ...]
        raise RegistryError("invalid request: " + fmt_validation_errors(detail, "request")) from None
    raise RegistryError(detail if isinstance(detail, str) and detail else
                        f"HTTP {r.status_code} from {r.request.method} {r.request.url} ({r.text[:200]!r})") from None
