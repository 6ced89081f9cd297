"""Killing ``weightlab serve`` (SIGKILL) in the middle of an upload leaves no partial version, and after ``gc``
no orphan blob and no temp file."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from weightlab.registry import Registry, auth
from weightlab.registry.db import transaction


def test_killing_the_server_mid_upload_leaves_nothing(tmp_path, home, tiny, free_port):
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    with Registry(db, home=home) as reg, transaction(reg.engine, write=True) as s:
        token = auth.create_token(s, spec=auth.TokenCreate(namespace="me", scope="write")).token
    port = free_port()
    server = subprocess.Popen([sys.executable, "-P", "-c", "from weightlab.cli import app; app()", "serve",
                               "--port", str(port), "--db", db, "--job-workers", "0"],
                              env={**os.environ, "WEIGHTLAB_HOME": str(home)}, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        data = tiny.base_ldm.read_bytes()
        halfway, killed, outcome = threading.Event(), threading.Event(), []

        def body():
            yield data[:len(data) // 2]
            halfway.set()
            killed.wait(30)
            yield data[len(data) // 2:]

        def upload():
            try:
                outcome.append(httpx.post(f"{url}/artifacts/me/base/versions", content=body(),
                                          params={"sha256": hashlib.sha256(data).hexdigest()},
                                          headers={"authorization": f"Bearer {token}",
                                                   "content-length": str(len(data))}, timeout=30))
            except httpx.TransportError as e:
                outcome.append(e)

        sender = threading.Thread(target=upload)
        sender.start()
        assert halfway.wait(30)
        spool = home / "blobs" / "tmp"
        deadline = time.monotonic() + 30
        while not any(f.stat().st_size for f in spool.glob("upload-*/*")):  # the server is writing it
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    killed.set()
    sender.join(30)
    assert isinstance(outcome[0], httpx.TransportError)  # the client saw the connection die

    with Registry(db, home=home) as reg:
        assert reg.search(all_versions=True) == []  # no partial version
        assert list(spool.iterdir())  # the half-received upload is still on disk...
        report = reg.gc(grace=0)
        assert report.deleted == [] and report.temp_removed >= 1
        assert list(reg.store.list()) == [] and list(spool.iterdir()) == []  # ...until gc removes it
        assert reg.verify().ok
        assert reg.add(tiny.base_ldm, name="me/base").ref == "me/base@1"  # and the registry works as before
