"""Bad input and hostile clients: each gets the right 4xx with a clear message, and the store and the database
are unchanged (versions, blobs, and temp files compared before and after)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct

import httpx
import pytest

from weightlab.errors import WeightlabError


def safetensors_bytes(tensors: dict, *, data: bytes | None = None, header_pad: int = 0) -> bytes:
    """A safetensors file from a header dict (written as given, so it may break the rules) and its data."""
    header = json.dumps(tensors).encode()
    header += b" " * header_pad
    return struct.pack("<Q", len(header)) + header + (data if data is not None else b"")


def _f32(n: int) -> bytes:
    return struct.pack(f"<{n}f", *range(n))


def _torch_pickle() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


LIMIT = 3_000_000
BAD_FILES = {
    "not_safetensors": (b"hello, this is not a weights file at all" * 10, 422, "not safetensors"),
    "not_json": (struct.pack("<Q", 12) + b"hello world!", 422, "not valid JSON"),
    "torch_zip_pickle": (None, 415, "pickle"),
    "raw_pickle": (pickle.dumps({"w": [1.0, 2.0]}, protocol=2), 415, "pickle"),
    "huge_header_length": (struct.pack("<Q", 2**40) + b"{}", 422, "exceeds"),
    "offsets_outside_file": (safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                               data=_f32(2)), 422, "truncated"),
    "overlapping_offsets": (safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                               "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
                                              data=_f32(6)), 422, "overlaps"),
    "bad_dtype": (safetensors_bytes({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                                    data=b"\0" * 16), 422, "unsupported dtype"),
    "empty_body": (b"", 422, "too short"),
    "keys_of_no_family": (safetensors_bytes({"hello.world": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                            data=_f32(2)), 422, "not a recognised UNet"),
}


@pytest.fixture
def live(serve, sqlite_url):
    return serve(sqlite_url, max_upload_bytes=LIMIT)


def upload(live, body: bytes, *, token: str | None = "admin", name: str = "me/x", sha256: str | None = None,
           headers: dict | None = None, **params) -> httpx.Response:
    token = live.admin if token == "admin" else token
    params = {"sha256": sha256 or hashlib.sha256(body).hexdigest(), "filename": "x.safetensors", **params}
    with live.http(token) as http:
        return http.post(f"/artifacts/{name}/versions", params=params, content=body,
                         headers={"content-type": "application/octet-stream", **(headers or {})})


def refused(live, response: httpx.Response, status: int, words: str, before) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert words.lower() in str(body["detail"]).lower(), body
    assert live.snapshot() == before, "a refused request changed the registry"
    return body


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused(live, case):
    body, status, words = BAD_FILES[case]
    body = _torch_pickle() if body is None else body
    before = live.snapshot()
    got = refused(live, upload(live, body), status, words, before)
    assert got["error"] in ("FileFormatError", "UnsafeFileError", "UnmatchedKeysError")
    assert "/tmp" not in got["detail"] and got["detail"].startswith("x.safetensors")  # no server paths


def test_declared_hash_mismatch(live, tiny):
    before = live.snapshot()
    body = refused(live, upload(live, tiny.style_lora_kohya.read_bytes(), sha256="0" * 64), 400, "was declared", before)
    assert body["error"] == "HashMismatchError" and "nothing was stored" in body["detail"]


def test_oversized_body_declared(live):
    before = live.snapshot()
    refused(live, upload(live, b"\0" * (LIMIT + 1)), 413, f"limit of {LIMIT} bytes", before)


def test_oversized_body_streamed_without_length(live):
    def chunks():
        for _ in range(40):
            yield b"\0" * 100_000  # 4 MB, chunked: the server counts as it reads

    before = live.snapshot()
    with live.http(live.admin) as http:
        r = http.post("/artifacts/me/x/versions", params={"sha256": "0" * 64}, content=chunks())
    refused(live, r, 413, "WEIGHTLAB_MAX_UPLOAD_BYTES", before)


def test_wrong_content_type(live, tiny):
    before = live.snapshot()
    r = upload(live, tiny.style_lora_kohya.read_bytes(), headers={"content-type": "multipart/form-data; boundary=x"})
    refused(live, r, 415, "application/octet-stream", before)


@pytest.mark.parametrize("path", ["/artifacts/../x/versions", "/artifacts/%2e%2e/x/versions",
                                  "/artifacts/me/..%2F..%2Fetc/versions", "/artifacts/me/a%2Fb/versions",
                                  "/artifacts/me/.hidden/versions", "/artifacts/me/-x/versions",
                                  "/artifacts/me/" + "a" * 101 + "/versions"])
def test_name_tricks_in_the_path(live, tiny, path):
    before = live.snapshot()
    data = tiny.style_lora_kohya.read_bytes()
    with live.http(live.admin) as http:
        r = http.post(path, params={"sha256": hashlib.sha256(data).hexdigest()}, content=data)
    assert r.status_code in (404, 422), r.text  # no such route, or a name that breaks the pattern
    if r.status_code == 422:
        assert "pattern" in r.text
    assert live.snapshot() == before


@pytest.mark.parametrize("filename", ["../../etc/passwd.safetensors", "a/b.safetensors", ".hidden.safetensors", "..",
                                      "x" * 101 + ".safetensors", "model.pt", "model.safetensors/"])
def test_name_tricks_in_the_filename(live, tiny, filename):
    before = live.snapshot()
    r = upload(live, tiny.style_lora_kohya.read_bytes(), filename=filename)
    assert r.status_code == 422 and "filename" in r.text and "pattern" in r.text
    assert live.snapshot() == before


@pytest.mark.parametrize("ref", ["me/..", "../me", "me/x/../y", "/etc/passwd", "me/x\u0000", "other/x@1"])
def test_name_tricks_in_references(live, ref):
    before = live.snapshot()
    with live.http(live.admin) as http:
        r = http.put("/artifacts/me/x/aliases/prod", json={"ref": ref})
    assert r.status_code == 400 and ("not a registry reference" in r.text or "not a version of me/x" in r.text)
    assert live.snapshot() == before


def test_missing_token(live, tiny):
    before = live.snapshot()
    body = refused(live, upload(live, tiny.style_lora_kohya.read_bytes(), token=None), 401, "needs a token", before)
    assert body["error"] == "AuthenticationError" and "Authorization: Bearer" in body["detail"]


def test_unknown_and_malformed_tokens(live, tiny):
    before = live.snapshot()
    refused(live, upload(live, tiny.style_lora_kohya.read_bytes(), token="wl_forged"), 401, "not valid", before)
    r = upload(live, tiny.style_lora_kohya.read_bytes(), token=None, headers={"authorization": "Basic dXNlcjpwdw=="})
    refused(live, r, 401, "Bearer <token>", before)
    assert r.headers["www-authenticate"] == "Bearer"


def test_expired_token(live, tiny):
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import update

    from weightlab.registry.db import transaction
    from weightlab.registry.models import ApiToken

    token = live.token("me", "write", expires_in_days=1)
    with transaction(live.registry.engine, write=True) as s:  # a day has passed
        s.execute(update(ApiToken).values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    before = live.snapshot()
    refused(live, upload(live, tiny.style_lora_kohya.read_bytes(), token=token), 401, "expired", before)


def test_wrong_scope_token(live, tiny):
    reader = live.token("me", "read")
    before = live.snapshot()
    body = refused(live, upload(live, tiny.style_lora_kohya.read_bytes(), token=reader), 403,
                   "does not allow write on namespace 'me'", before)
    assert body["error"] == "PermissionDeniedError" and "--scope write" in body["detail"]


def test_another_namespaces_token(live, tiny):
    theirs = live.token("them", "admin")
    before = live.snapshot()
    refused(live, upload(live, tiny.style_lora_kohya.read_bytes(), token=theirs), 403, "namespace 'me'", before)


def test_another_namespaces_private_artifact(live, tiny, tmp_path):
    from weightlab.registry import Derivation, LineageInput

    admin = live.client(live.admin)
    secret = admin.add(tiny.style_lora_kohya, name="secret/style")
    mine = live.token("me", "write")
    me = live.client(mine)
    derived = admin.add(tiny.accel_lora, name="me/lcm", lineage=Derivation(
        relation="trained_from", inputs=[LineageInput(ref=secret.ref)]))
    before = live.snapshot()
    for call, words in ((lambda: me.get("secret/style"), "does not allow read on namespace 'secret'"),
                        (lambda: me.versions("secret/style"), "does not allow read"),
                        (lambda: me.path("secret/style"), "does not allow read"),
                        (lambda: me.search(namespace="secret"), "does not allow read"),
                        (lambda: me.tag("secret/style", ["mine"]), "does not allow write"),
                        (lambda: me.alias("secret/style@1", "prod"), "does not allow write"),
                        (lambda: me.add(tiny.motion_lora, name="me/x", lineage=Derivation(
                            relation="trained_from", inputs=[LineageInput(ref=secret.ref)])), "does not allow read")):
        with pytest.raises(WeightlabError, match=words):
            call()
    with live.http(mine) as http:  # by hash: as if it did not exist
        r = http.get(f"/blobs/{secret.files[0].sha256}")
        assert r.status_code == 404 and "no version you can read" in r.json()["detail"]
    assert me.search() == [admin.get(derived.ref)]  # search lists only what the token may read
    hidden = me.lineage(derived.ref).inputs[0].node  # lineage shows that there is an input, not what it is
    assert hidden.label == "(a version you cannot read)" and hidden.version is None
    assert hidden.tensor_hash == secret.tensor_hash
    assert live.snapshot() == before


def test_public_namespaces_are_readable_anonymously_and_nothing_more(live, tiny):
    admin = live.client(live.admin)
    v = admin.add(tiny.style_lora_kohya, name="open/style")
    anon = live.client()
    with pytest.raises(WeightlabError, match="not public"):
        anon.get(v.ref)
    ns_admin = live.client(live.token("open", "admin"))
    ns_admin.set_public("open")
    assert anon.get(v.ref) == v and anon.path(v.ref).read_bytes() == tiny.style_lora_kohya.read_bytes()
    assert [x.ref for x in anon.search()] == [v.ref]
    before = live.snapshot()
    for call in (lambda: anon.tag(v.ref, ["x"]), lambda: anon.add(tiny.accel_lora, name="open/lcm"),
                 lambda: anon.create_token(namespace="open", scope="read"), lambda: anon.gc(grace=0)):
        with pytest.raises(WeightlabError, match="token"):
            call()
    assert live.snapshot() == before
    ns_admin.set_public("open", False)
    with pytest.raises(WeightlabError, match="not public"):
        anon.get(v.ref)


def test_header_of_640_bytes_is_not_mistaken_for_a_pickle(live, tiny, tmp_path):
    """A valid safetensors file whose 8-byte header length (640 = 0x280) starts like pickle protocol 2."""
    from safetensors.torch import load_file

    from weightlab.registry.ingest import stage

    from safetensors.torch import save

    lora = load_file(str(tiny.style_lora_kohya))
    module = sorted(lora)[0].split(".")[0]  # one kohya target: lora_down, lora_up, alpha
    small = save({k: v for k, v in lora.items() if k.split(".")[0] == module}, metadata={"pad": ""})
    n = struct.unpack("<Q", small[:8])[0]
    header = json.loads(small[8:8 + n])
    header["__metadata__"]["pad"] = "x" * (640 - len(json.dumps(header, separators=(",", ":"))))
    doc = json.dumps(header, separators=(",", ":")).encode()
    assert len(doc) == 640, len(doc)
    body = struct.pack("<Q", len(doc)) + doc + small[8 + n:]
    assert body[:2] == b"\x80\x02"  # pickle's PROTO 2 opcode
    path = tmp_path / "style.weights"  # not named .safetensors: only the content tells
    path.write_bytes(body)
    assert len(load_file(str(path))) == 3
    with stage(path) as staged:  # not refused as a pickle
        assert [f.path for f in staged.files] == [path]
    r = upload(live, body, filename="style.safetensors")
    assert r.status_code == 201 and r.json()["kind"] == "style"
