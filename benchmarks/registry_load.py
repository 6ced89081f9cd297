"""Load test of the registry's web API, on loopback only, bounded in size and time.

32 concurrent clients (threads, one ``weightlab.Client`` each) upload a distinct file and one identical shared
file, then download another client's file and the shared one, verifying every sha256, while two more clients
list and search (a pair every 0.2 s each) a catalog seeded with 10,000 versions (written directly through the
service layer). Afterwards the catalog is checked: every upload is registered once, the shared file is one
version and one blob, and every blob re-hashes to its name. Reports aggregate throughput (MB/s) and p50/p99 latency
of list and search, under load and idle. Results are printed as a Markdown section for ``benchmarks/RESULTS.md``.

Run:
    .venv/bin/python -P benchmarks/registry_load.py                 # 32 clients x (2 up + 2 down) x 24 MB
    .venv/bin/python -P benchmarks/registry_load.py --file-mb 8 --clients 8 --seed-versions 2000   # quick
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KINDS = ("base", "style", "image_accel", "motion", "motion_lora")


def seed_catalog(db_url: str, home: Path, n: int) -> None:
    """``n`` versions over ``n // 20`` artifacts in 10 namespaces, through crud (no files: metadata only)."""
    from weightlab.registry import crud
    from weightlab.registry.api import Registry
    from weightlab.registry.db import transaction
    from weightlab.registry.schemas import FileInfo, VersionCreate

    rng = random.Random(0)
    with Registry(db_url, home=home) as reg:
        for start in range(0, n, 1000):
            with transaction(reg.engine, write=True) as s:
                for i in range(start, min(start + 1000, n)):
                    digest = hashlib.sha256(f"seed-{i}".encode()).hexdigest()
                    new = VersionCreate(
                        sha256=digest, tensor_hash=digest, size_bytes=1 << 20, format="safetensors", family="sd15",
                        kind=rng.choice(KINDS), representation="lora", ranks=[rng.choice((4, 8, 16))], alphas=[1.0],
                        dtypes=["float32"], n_params=1000, n_targets=10, metadata={"seed": i, "note": f"run {i % 97}"},
                        source=f"seed://{i}", files=[FileInfo(path="model.safetensors", sha256=digest, size_bytes=1 << 20)],
                        tags=[f"t{i % 13}"])
                    crud.create_version(s, namespace=f"bench{i % 10}", name=f"artifact-{i // 20 % (n // 200 or 1)}-{i % 20}",
                                        new=new)


def make_files(folder: Path, template: Path, n: int, mb: int) -> list[tuple[Path, str]]:
    """``n`` valid tiny-family LoRA files of about ``mb`` MB: the LoRA's tensors plus one distinct padding tensor
    (uploaded with strict=False, so the padding is reported as unmatched, as for any lenient add)."""
    import torch
    from safetensors.torch import load_file, save_file

    lora = load_file(str(template))
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {**lora, "padding.weight": torch.rand(mb * 262_144, generator=g)}
        path = folder / f"file{i}.safetensors"
        save_file(tensors, str(path))
        out.append((path, hashlib.sha256(path.read_bytes()).hexdigest()))
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def probe(client, stop: threading.Event, latencies: dict[str, list[float]], rng: random.Random,
          interval: float) -> None:
    """A list and a search every ``interval`` seconds (at once when late) until ``stop``; record each call's latency
    (seconds). Paced, like users: back-to-back probes would load the server more the faster it answers them."""
    start = time.perf_counter()
    while not stop.wait(max(0.0, start - time.perf_counter())):
        start += interval
        t = time.perf_counter()
        client.search(limit=100, offset=rng.randrange(0, 400))
        latencies["list"].append(time.perf_counter() - t)
        t = time.perf_counter()
        client.search(kind=rng.choice(KINDS), tag=f"t{rng.randrange(13)}", text=f"run {rng.randrange(97)}", limit=100)
        latencies["search"].append(time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--file-mb", type=int, default=24, help="size of each file (MB)")
    parser.add_argument("--seed-versions", type=int, default=10_000)
    parser.add_argument("--server-workers", type=int, default=2, help="uvicorn processes")
    parser.add_argument("--db", default=None, help="database URL (default: SQLite in the work folder)")
    parser.add_argument("--idle-probes", type=int, default=200)
    parser.add_argument("--probe-interval", type=float, default=0.2,
                        help="seconds between the list+search pairs of each of the 2 probing clients under load")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    args = parser.parse_args()

    import httpx

    from weightlab.client import Client
    from weightlab.registry import auth
    from weightlab.registry.api import Registry
    from weightlab.registry.db import transaction
    from weightlab.testing import build_tiny_family

    work = Path(tempfile.mkdtemp(prefix="weightlab-load-"))
    home = work / "home"
    server_log = work / "server.log"
    db_url = args.db or f"sqlite:///{work / 'registry.db'}"
    server = None
    try:
        t0 = time.perf_counter()
        seed_catalog(db_url, home, args.seed_versions)
        seed_s = time.perf_counter() - t0
        with Registry(db_url, home=home) as reg, transaction(reg.engine, write=True) as s:
            token = auth.create_token(s, spec=auth.TokenCreate(namespace="*", scope="admin")).token
        tiny = build_tiny_family(work / "tiny")
        files = make_files(work, tiny.style_lora_kohya, args.clients + 1, args.file_mb)
        shared, distinct = files[0], files[1:]

        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "WEIGHTLAB_HOME": str(home)}
        server = subprocess.Popen([sys.executable, "-P", "-c", "from weightlab.cli import app; app()", "serve",
                                   "--port", str(port), "--db", db_url, "--workers", str(args.server_workers),
                                   "--job-workers", "0", "--no-access-log"], env=env,
                                  stdout=server_log.open("wb"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
        warm = [Client(url, token=token, progress=False) for _ in range(2 * args.server_workers)]
        with ThreadPoolExecutor(len(warm)) as pool:  # every server process imports torch once, before timing
            list(pool.map(lambda c: c.add(tiny.style_lora_kohya, name="warm/up"), warm))

        errors: list[str] = []
        downloads: list[tuple[Path, str]] = []
        uploaded: dict[int, threading.Event] = {i: threading.Event() for i in range(args.clients)}
        moved = {"up": 0, "down": 0}
        lock = threading.Lock()

        def client_run(i: int) -> None:
            c = Client(url, token=token, progress=False, timeout=300)
            try:
                for path, digest, name in ((distinct[i][0], distinct[i][1], f"load/file{i}"),
                                           (shared[0], shared[1], "load/shared")):
                    v = c.add(path, name=name, sha256=digest, strict=False)
                    assert v.sha256 == digest, f"{name}: registered sha256 {v.sha256} != {digest}"
                    with lock:
                        moved["up"] += path.stat().st_size
                uploaded[i].set()
                j = (i + 1) % args.clients
                if not uploaded[j].wait(args.timeout):
                    raise TimeoutError(f"client {j} never uploaded")
                for name, digest in ((f"load/file{j}", distinct[j][1]), ("load/shared", shared[1])):
                    dest = work / "down" / f"{i}-{name.replace('/', '_')}.safetensors"
                    c.download(name, dest)  # verifies the sha256 as it arrives; checked again below, untimed
                    downloads.append((dest, digest))
                    with lock:
                        moved["down"] += dest.stat().st_size
            except Exception as e:  # report every failure, keep the others running
                errors.append(f"client {i}: {type(e).__name__}: {e}")
                uploaded[i].set()
            finally:
                c.close()

        (work / "down").mkdir()
        latencies: dict[str, list[float]] = {"list": [], "search": []}
        stop = threading.Event()
        probes = [threading.Thread(target=probe, args=(Client(url, token=token, progress=False), stop, latencies,
                                                        random.Random(k), args.probe_interval)) for k in range(2)]
        for p in probes:
            p.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client_run, range(args.clients)))
        wall = time.perf_counter() - t0
        stop.set()
        for p in probes:
            p.join()
        loaded = {k: list(v) for k, v in latencies.items()}
        for dest, digest in downloads:
            if hashlib.sha256(dest.read_bytes()).hexdigest() != digest:
                errors.append(f"{dest}: downloaded bytes do not match {digest}")
            dest.unlink()
        idle: dict[str, list[float]] = {"list": [], "search": []}
        prober = Client(url, token=token, progress=False)
        rng = random.Random(7)
        for _ in range(args.idle_probes):
            stop.clear()
            t = time.perf_counter()
            prober.search(limit=100, offset=rng.randrange(0, 400))
            idle["list"].append(time.perf_counter() - t)
            t = time.perf_counter()
            prober.search(kind=rng.choice(KINDS), tag=f"t{rng.randrange(13)}", text=f"run {rng.randrange(97)}", limit=100)
            idle["search"].append(time.perf_counter() - t)
        n_catalog = len(prober.search(all_versions=True))
        server.terminate()
        server.wait(30)
        server = None

        with Registry(db_url, home=home) as reg:  # nothing lost, nothing doubled
            refs = {v.ref for v in reg.search(namespace="load", all_versions=True)}
            expected = {f"load/file{i}@1" for i in range(args.clients)} | {"load/shared@1"}
            lost = expected - refs
            problems = [p for p in reg.verify().problems if not all(r.startswith("bench") for r in p.versions)]
            blobs = len(list(reg.store.list()))  # the seeded versions are metadata only: their blobs are "missing"
        mb = 1e6
        stack = ", ".join(name if importlib.util.find_spec(name) else f"no {name}" for name in ("httptools", "uvloop"))
        print(f"\n## Registry web API under load (`benchmarks/registry_load.py`)\n")
        print(f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}, shared with other "
              f"jobs), 24 GB; loopback only; server `weightlab serve --workers {args.server_workers}` "
              f"(uvicorn, {stack}), {'SQLite' if db_url.startswith('sqlite') else 'PostgreSQL'}, local blob store; "
              f"clients are threads of one process on the same 2 cores.\n")
        print(f"- Catalog: {args.seed_versions:,} seeded versions ({seed_s:.1f} s through the service layer), "
              f"{n_catalog:,} at the end.")
        print(f"- {args.clients} clients, each: upload a distinct {args.file_mb} MB file and the shared one, then "
              f"download another client's file and the shared one (sha256 verified). Moved "
              f"{moved['up'] / mb:,.0f} MB up + {moved['down'] / mb:,.0f} MB down in {wall:.1f} s.")
        print(f"- Aggregate throughput: **{(moved['up'] + moved['down']) / mb / wall:,.0f} MB/s** "
              f"(upload {moved['up'] / mb / wall:,.0f} MB/s + download {moved['down'] / mb / wall:,.0f} MB/s "
              "over the same wall time). Target: >= 300 MB/s.")
        print(f"- Probes: 2 more clients, each a list and a search every {args.probe_interval:g} s during the "
              f"transfers; then {args.idle_probes} of each, one after another, with the server idle.")
        print(f"- Failures: {len(errors)}; lost versions: {len(lost)}; the shared file: "
              f"{sum(r.startswith('load/shared') for r in refs)} version; blobs in the store: {blobs}; "
              f"verify of the uploaded blobs: {'ok' if not problems else problems}.")
        print("\n| list/search (page of 100) | calls | p50 ms | p99 ms |\n|---|---|---|---|")
        for phase, data in (("under load", loaded), ("idle", idle)):
            for op in ("list", "search"):
                values = data[op]
                if values:
                    print(f"| {op}, {phase} | {len(values)} | {statistics.median(values) * 1e3:.1f} | "
                          f"{percentile(values, 99) * 1e3:.1f} |")
        print("\nTarget: search p99 <= 50 ms at 10,000 versions.")
        for e in errors:
            print(f"- error: {e}")
        if errors or lost or problems:
            raise SystemExit(1)
    except BaseException:
        if server_log.exists():
            print("\nServer log (end):\n" + server_log.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
