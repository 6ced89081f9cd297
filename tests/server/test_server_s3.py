"""The S3-compatible blob store, against moto's S3 server started on loopback (no network, no AWS account)."""

from __future__ import annotations

import hashlib
import time

import pytest

from weightlab.errors import HashMismatchError, NotFoundError, RegistryError
from weightlab.registry.service import open_store


@pytest.fixture(scope="module")
def moto_endpoint(free_port):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch, request):
    """A fresh bucket; the AWS settings point at the moto server. Returns ``s3://bucket/prefix``."""
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL_S3": moto_endpoint}.items():
        monkeypatch.setenv(key, value)
    bucket = f"b-{request.node.name.lower().replace('_', '-')[:40]}-{time.monotonic_ns() % 10**6}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/registry"


def test_s3_store_contract(s3, tmp_path, tiny):
    store = open_store(s3, cache_dir=tmp_path / "cache")
    src = tiny.style_lora_kohya
    data = src.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert store.stat(digest) is None
    with pytest.raises(HashMismatchError, match="was declared"):
        store.put(src, sha256="0" * 64)
    assert list(store.list()) == []
    first = store.put(src, sha256=digest)
    assert (first.sha256, first.size) == (digest, len(data))
    assert [b.sha256 for b in store.list()] == [digest]
    old = store.stat(digest).mtime
    deadline = time.monotonic() + 10
    store.put(src)  # the same bytes again: one object, freshened
    while store.stat(digest).mtime <= old:  # S3 times have one-second resolution: a put in old's second looks as old
        assert time.monotonic() < deadline, "putting the same bytes again never freshened the object"
        time.sleep(0.05)
        store.put(src)
    assert [b.sha256 for b in store.list()] == [digest]
    with store.open(digest) as f:
        assert f.read() == data
        f.seek(100)
        assert f.read(10) == data[100:110]
        f.seek(-5, 2)
        assert f.read() == data[-5:]
    assert store.rehash(digest) == digest
    local = store.local_path(digest)
    assert local.read_bytes() == data and store.local_path(digest) == local
    assert list(store.tmp_dir.iterdir()) == []
    store.delete(digest)
    assert store.stat(digest) is None and not local.exists()
    with pytest.raises(NotFoundError, match="registry verify"):
        store.open(digest)


def test_s3_sweep_aborts_stale_multipart_uploads(s3, tmp_path):
    import boto3

    store = open_store(s3, cache_dir=tmp_path / "cache")
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    (store.tmp_dir / "put-dead.part").write_bytes(b"x")
    assert store.sweep_temp(older_than=3600) == 0  # recent: an upload may still be writing it
    client = boto3.client("s3")
    client.create_multipart_upload(Bucket=store.bucket, Key=f"{store.prefix}sha256/ab/{'c' * 62}")
    assert store.sweep_temp(older_than=0) == 2  # (moto dates every multipart upload 2010, so no age check here)
    assert client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_unreachable_bucket_is_reported(s3, tmp_path):
    with pytest.raises(RegistryError, match="cannot reach bucket 'no-such-bucket'.*WEIGHTLAB_BLOB_STORE"):
        open_store("s3://no-such-bucket/x", cache_dir=tmp_path)
    with pytest.raises(RegistryError, match="names no bucket"):
        open_store("s3://", cache_dir=tmp_path)


def test_server_on_s3(s3, serve, sqlite_url, tiny, tmp_path):
    live = serve(sqlite_url, store=s3)
    c = live.client(live.admin)
    v = c.add(tiny.style_lora_kohya, name="me/style")
    assert [b.sha256 for b in live.registry.store.list()] == [v.sha256]
    data = tiny.style_lora_kohya.read_bytes()
    assert c.path(v.ref).read_bytes() == data
    with live.http(live.admin) as http:
        r = http.get(f"/blobs/{v.sha256}", headers={"range": "bytes=1000-1999"})
        assert r.status_code == 206 and r.content == data[1000:2000]
    assert c.open(v.ref).kind == "style"  # the server loads it from its S3 cache when asked to merge or inspect
    assert c.verify().ok
    c.add(tiny.accel_lora, name="me/lcm")
    assert c.gc(grace=0).deleted == []
    assert live.registry.store.tmp_dir.is_dir() and list(live.registry.store.tmp_dir.iterdir()) == []
