"""An S3-compatible :class:`~weightlab.registry.store.BlobStore` (``--store s3://BUCKET[/PREFIX]``), through boto3.

Blobs are objects ``PREFIX/sha256/<2 hex>/<62 hex>``. A put copies the file into a local temp file while hashing
it (so what is uploaded is exactly what was hashed; an upload the web API received and hashed is sent as it is),
then uploads it to its final key: S3 makes an object visible only when its upload completes, so readers never
see half a blob; an interrupted multipart upload leaves only invisible parts, which :meth:`S3BlobStore.sweep_temp`
aborts. Writing an existing blob again freshens its ``LastModified`` (a copy onto itself), which
:meth:`Registry.gc`'s grace period relies on.

Credentials, region and endpoint come from the usual AWS settings: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` for an S3-compatible server
(MinIO, Ceph, moto). Blobs that must be local files (:meth:`local_path`, e.g. to load or merge them) are
downloaded once into ``cache_dir`` and verified.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO, Iterator

from weightlab.errors import HashMismatchError, NotFoundError, RegistryError
from weightlab.files import SHA256
from weightlab.registry.store import _CHUNK, BlobStat, BlobStore, check_digest, inside, sweep_folder


class S3BlobStore(BlobStore):
    """Blobs in an S3 bucket.

    Args:
        url (str): ``s3://BUCKET`` or ``s3://BUCKET/PREFIX``.
        cache_dir (str | PathLike): local folder for downloaded blobs and temp files.
        client (botocore client | None): an S3 client; default one from the AWS settings in the environment.
    Raises:
        RegistryError: the URL names no bucket, or the bucket cannot be reached.
    """

    def __init__(self, url: str, *, cache_dir: str | os.PathLike, client=None):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise RegistryError(f"blob store URL {url!r} names no bucket. Fix: write s3://BUCKET or s3://BUCKET/PREFIX.")
        self.url = url
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        root = Path(cache_dir).expanduser() / "s3" / bucket / self.prefix
        self._cache = root / "sha256"
        self.tmp_dir = root / "tmp"
        self._client = client or _default_client()
        self._check_bucket()

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # botocore raises many types: no credentials, no endpoint, no bucket, denied
            raise RegistryError(
                f"blob store {self.url}: cannot reach bucket {self.bucket!r} ({type(e).__name__}: {e}). Fix: check "
                "WEIGHTLAB_BLOB_STORE, that the bucket exists, the AWS credentials, and AWS_ENDPOINT_URL_S3 for an "
                "S3-compatible server.") from None

    def _key(self, sha256: str) -> str:
        check_digest(sha256)
        return f"{self.prefix}sha256/{sha256[:2]}/{sha256[2:]}"

    def put(self, src, *, sha256=None, trusted=False) -> BlobStat:
        """See :meth:`BlobStore.put`. A trusted file (an upload the web API received) is sent as it is, uncopied."""
        if trusted and sha256 is not None and inside(src, self.tmp_dir):
            return self._upload(src, sha256, os.stat(src).st_size)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="put-", suffix=".part")
        try:
            h = hashlib.sha256()
            size = 0
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
            digest = h.hexdigest()
            if sha256 is not None and digest != sha256:
                raise HashMismatchError(
                    f"{src}: content sha256 is {digest}, but {sha256} was declared. The file is corrupt, "
                    "incomplete, or not the one you meant. Fix: re-download it, or correct the declared hash.")
            return self._upload(tmp, digest, size)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _upload(self, path: str | os.PathLike, digest: str, size: int) -> BlobStat:
        """Upload ``path`` as the blob ``digest``, or freshen the object if the bucket already holds it."""
        key = self._key(digest)
        if self.stat(digest) is not None:  # freshen LastModified: gc's grace period covers the coming commit
            self._client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                     MetadataDirective="REPLACE", Metadata={"sha256": digest})
        else:
            self._client.upload_file(str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
        return BlobStat(digest, size, datetime.now(timezone.utc).timestamp())

    def stat(self, sha256):
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(sha256))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return BlobStat(sha256, head["ContentLength"], head["LastModified"].timestamp())

    def _missing(self, sha256: str) -> NotFoundError:
        return NotFoundError(f"blob {sha256} is missing from the store at {self.url}. "
                             "Fix: run `weightlab registry verify` to see which versions it affects.")

    def open(self, sha256) -> BinaryIO:
        found = self.stat(sha256)
        if found is None:
            raise self._missing(sha256)
        return io.BufferedReader(_S3Reader(self._client, self.bucket, self._key(sha256), found.size), _CHUNK)

    def local_path(self, sha256) -> Path:
        path = self._cache / sha256[:2] / check_digest(sha256)[2:]
        if path.is_file():
            return path
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="get-", suffix=".part")
        try:
            h = hashlib.sha256()
            with self.open(sha256) as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
            if h.hexdigest() != sha256:
                raise HashMismatchError(f"blob {sha256} in {self.url} is corrupt (its content hashes to "
                                        f"{h.hexdigest()}). Fix: run `weightlab registry verify`.")
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    def delete(self, sha256):
        self._client.delete_object(Bucket=self.bucket, Key=self._key(sha256))
        (self._cache / sha256[:2] / sha256[2:]).unlink(missing_ok=True)

    def list(self) -> Iterator[BlobStat]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}sha256/")
        for page in pages:
            for obj in page.get("Contents", []):
                digest = "".join(obj["Key"].rsplit("/", 2)[-2:])
                if SHA256.fullmatch(digest):
                    yield BlobStat(digest, obj["Size"], obj["LastModified"].timestamp())

    def sweep_temp(self, *, older_than):
        """Abort multipart uploads and remove local temp files older than ``older_than`` seconds."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than)
        aborted = 0
        pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for up in page.get("Uploads", []):
                if up["Initiated"] < cutoff:
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
        return aborted + sweep_folder(self.tmp_dir, older_than=older_than)


class _S3Reader(io.RawIOBase):
    """A seekable reader over one object: reads stream from a ranged GET opened at the current position."""

    def __init__(self, client, bucket: str, key: str, size: int):
        self._client, self._bucket, self._key, self._size = client, bucket, key, size
        self._pos = 0
        self._body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        new = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset, io.SEEK_END: self._size + offset}[whence]
        if new < 0:
            raise ValueError(f"negative seek position {new}")
        if new != self._pos:
            self._drop()
            self._pos = new
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._size:
            return 0
        if self._body is None:
            self._body = self._client.get_object(Bucket=self._bucket, Key=self._key,
                                                 Range=f"bytes={self._pos}-")["Body"]
        data = self._body.read(min(len(buffer), self._size - self._pos))
        if not data:
            raise NotFoundError(f"s3://{self._bucket}/{self._key} ended at byte {self._pos} of {self._size} "
                                "(changed or deleted while being read). Fix: retry.")
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop()
        super().close()


def _default_client():
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(max_pool_connections=64,
                                                              retries={"max_attempts": 3, "mode": "standard"}))
