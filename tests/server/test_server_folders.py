"""Folder uploads (one tar stream): a folder added through the API is the version a local add makes, and hostile
tar streams get a clear 4xx while the store and the database stay unchanged."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from weightlab.registry.folder_tar import SHA256_RECORD
from weightlab.registry.schemas import FileInfo, manifest_digest

LIMIT = 3_000_000


def test_folder_upload_is_the_local_add(db_url, serve, tiny, tmp_path):
    from weightlab.registry import Registry

    live = serve(db_url)
    c = live.client(live.admin)
    motion = c.add(tiny.motion_dir, name="me/motion", tags=["video"])
    base = c.add(tiny.base_dir, name="me/base")
    with Registry(f"sqlite:///{tmp_path / 'local.db'}", home=tmp_path / "local") as local:
        for remote, folder in ((motion, tiny.motion_dir), (base, tiny.base_dir)):
            here = local.add(folder, name=remote.artifact)
            assert (remote.kind, remote.format, remote.tensor_hash, remote.sha256, remote.files) == \
                   (here.kind, here.format, here.tensor_hash, here.sha256, here.files)
    assert motion.kind == "motion" and motion.tags == ["video"] and motion.source == str(tiny.motion_dir)
    assert c.add(tiny.motion_dir, name="me/motion").ref == "me/motion@1"  # the same folder: the same version
    got = c.path(base.ref)
    for f in base.files:
        assert (got / f.path).read_bytes() == (tiny.base_dir / f.path).read_bytes()


def _tar(members, *, pax=True) -> bytes:
    """A tar stream from ``(TarInfo kwargs, data)`` pairs; each regular file declares its sha256 unless told not to."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for spec, data in members:
            spec = dict(spec)
            info = tarfile.TarInfo(spec.pop("name"))
            declared = spec.pop("sha256", hashlib.sha256(data or b"").hexdigest())
            for k, v in spec.items():
                setattr(info, k, v)
            if info.isreg():
                info.size = len(data)
                if pax and declared:
                    info.pax_headers = {SHA256_RECORD: declared}
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _digest(members) -> str:
    return manifest_digest([FileInfo(path=s["name"], sha256=hashlib.sha256(d).hexdigest(), size_bytes=len(d))
                            for s, d in members])


@pytest.fixture
def live(serve, sqlite_url):
    return serve(sqlite_url, max_upload_bytes=LIMIT)


def _post(live, body: bytes, sha256: str, *, content_type="application/x-tar", **params):
    with live.http(live.admin) as http:
        return http.post("/artifacts/me/x/folders", params={"sha256": sha256, **params}, content=body,
                         headers={"content-type": content_type})


CONFIG = ({"name": "config.json"}, b"{}")
HOSTILE = {
    "dotdot": ([({"name": "../evil.json"}, b"{}")], 400, "each part a plain name"),
    "dotdot_inside": ([({"name": "a/../../evil.json"}, b"{}")], 400, "no '..'"),
    "absolute": ([({"name": "/etc/cron.d/evil"}, b"x")], 400, "relative"),
    "backslash": ([({"name": "a\\..\\evil"}, b"x")], 400, "'/'-separated"),
    "hidden": ([({"name": ".git/config"}, b"x")], 400, "hidden files"),
    "symlink": ([({"name": "link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, None)], 400,
                "is a symbolic link; only regular files"),
    "hardlink": ([CONFIG, ({"name": "link", "type": tarfile.LNKTYPE, "linkname": "config.json"}, None)], 400,
                 "is a hard link"),
    "device": ([({"name": "dev", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, None)], 400,
               "is a character device"),
    "fifo": ([({"name": "pipe", "type": tarfile.FIFOTYPE}, None)], 400, "is a FIFO"),
    "folder_entry": ([({"name": "unet", "type": tarfile.DIRTYPE}, None)], 400, "is a folder entry"),
    "duplicate": ([CONFIG, CONFIG], 400, "appears twice"),
    "file_and_folder": ([({"name": "a"}, b"x"), ({"name": "a/b"}, b"y")], 400, "clashes with another member"),
    "no_declared_hash": ([({"name": "config.json", "sha256": None}, b"{}")], 400, "declares no sha256"),
    "wrong_declared_hash": ([({"name": "config.json", "sha256": "0" * 64}, b"{}")], 400, "header declares 0000"),
    "pickle_inside": ([({"name": "model.bin"}, b"\x80\x02}q\x00.")], 415, "pickle"),
    "not_a_model": ([({"name": "config.json"}, b"{}"), ({"name": "model.safetensors"}, b"garbage" * 20)], 422,
                    "not safetensors"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_streams_are_refused(live, case):
    members, status, words = HOSTILE[case]
    before = live.snapshot()
    regular = [(s, d) for s, d in members if d is not None]
    r = _post(live, _tar(members), _digest(regular) if regular else "0" * 64)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert live.snapshot() == before


def test_undeclared_and_missing_files_change_the_manifest_digest(serve, sqlite_url, tiny):
    live = serve(sqlite_url)
    declared = [({"name": "config.json"}, (tiny.motion_dir / "config.json").read_bytes()),
                ({"name": "diffusion_pytorch_model.safetensors"},
                 (tiny.motion_dir / "diffusion_pytorch_model.safetensors").read_bytes())]
    before = live.snapshot()
    for sent in (declared + [({"name": "extra.txt"}, b"undeclared")], declared[:1]):
        r = _post(live, _tar(sent), _digest(declared))
        assert r.status_code == 400 and "manifest digest" in r.json()["detail"], r.text
    assert live.snapshot() == before
    assert _post(live, _tar(declared), _digest(declared)).status_code == 201  # the honest upload goes through


@pytest.mark.parametrize("body, content_type, status, words", [
    (b"this is not a tar stream at all" * 40, "application/x-tar", 400, "not a complete, uncompressed tar stream"),
    (None, "application/gzip", 415, "uncompressed tar stream sent as application/x-tar"),
    (b"", "application/x-tar", 400, "not a complete, uncompressed tar stream"),
])
def test_not_a_tar(live, body, content_type, status, words):
    import gzip

    before = live.snapshot()
    data = body if body is not None else gzip.compress(_tar([CONFIG]))
    r = _post(live, data, "0" * 64, content_type=content_type)
    assert r.status_code == status and words in r.json()["detail"], r.text
    assert live.snapshot() == before


def test_oversized_folder(live):
    big = [({"name": "a.txt"}, b"x" * (LIMIT // 2)), ({"name": "b.txt"}, b"y" * (LIMIT // 2))]
    before = live.snapshot()
    body = _tar(big)

    def stream():  # no Content-Length: the server counts what arrives
        yield from (body[i:i + 65536] for i in range(0, len(body), 65536))

    with live.http(live.admin) as http:
        for content in (body, stream()):
            r = http.post("/artifacts/me/x/folders", params={"sha256": _digest(big)}, content=content,
                          headers={"content-type": "application/x-tar"})
            assert r.status_code == 413 and "limit of 3000000 bytes" in r.json()["detail"], r.text
    assert live.snapshot() == before


def test_interrupted_folder_upload_leaves_nothing(serve, sqlite_url, tiny):
    import time

    import httpx

    live = serve(sqlite_url)

    members = [({"name": "diffusion_pytorch_model.safetensors"},
                (tiny.motion_dir / "diffusion_pytorch_model.safetensors").read_bytes())]
    body = _tar(members)
    before = live.snapshot()

    def dies_halfway():
        yield body[: len(body) // 2]
        raise RuntimeError("client crashed")

    with live.http(live.admin) as http, pytest.raises((RuntimeError, httpx.HTTPError)):
        http.post("/artifacts/me/x/folders", params={"sha256": _digest(members)}, content=dies_halfway(),
                  headers={"content-type": "application/x-tar", "content-length": str(len(body))})
    deadline = time.monotonic() + 10
    while live.snapshot() != before and time.monotonic() < deadline:  # the server notices the disconnect
        time.sleep(0.05)
    assert live.snapshot() == before
