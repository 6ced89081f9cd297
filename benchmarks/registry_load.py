"""Load test of the registry's web API, on loopback only, bounded in size and time.

One server (``weightlab serve``) and one catalog seeded with 10,000 versions (written directly through the service
layer), then ``--repeats`` rounds of each mode, interleaved. A round: 32 clients (one ``weightlab.Client`` each)
upload a distinct file and one identical shared file, then download another client's file and the shared one,
verifying every sha256, while two more clients list and search the catalog. Every round uses freshly generated
files, so no upload is a duplicate of an earlier round's.

Throughput is reported two ways. Of the 32 uploads of the shared file, the registry stores one; the others are
answered by its duplicate check, without being validated or stored: they are not upload work, so the headline is the
distinct files' throughput (distinct uploads + distinct downloads over the round's wall time). The figure of the
earlier protocol (every byte sent or received, duplicates included) is shown beside it for comparison only.

Modes (``--modes``): ``procs-paced`` (clients spread over ``--client-procs`` processes, 8 threads each for 32
clients: one Python process is GIL-bound; list+search probes every ``--probe-interval`` s), ``procs-b2b`` (the same,
probes back to back) and ``threads-paced`` (all clients threads of one process, as the earlier protocol). Probes run
in the parent process, clients in child processes. After each round, ``--idle-probes`` list+search pairs run one
after another with the server idle. Afterwards the catalog is checked: every upload is registered once, each round's
shared file is one version and one blob, and every blob re-hashes to its name.

Run (take the benchmark lock; results go to benchmarks/RESULTS.md with --write):
    flock -x /tmp/weightlab_cpu.lock .venv/bin/python -P benchmarks/registry_load.py --write
    .venv/bin/python -P benchmarks/registry_load.py --file-mb 4 --clients 8 --seed-versions 2000 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import multiprocessing as mp
import os
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

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402

KINDS = ("base", "style", "image_accel", "motion", "motion_lora")
MODES = ("procs-paced", "procs-b2b", "threads-paced")
SECTION = "## Registry web API under load (`benchmarks/registry_load.py`)"


def seed_catalog(db_url: str, home: Path, n: int) -> None:
    """``n`` versions over ``n // 20`` artifacts in 10 namespaces, through crud (no files: metadata only)."""
    from weightlab.registry import crud
    from weightlab.registry.service import Registry
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


def make_files(folder: Path, template: Path, n: int, mb: int, seed: int = 0) -> list[tuple[Path, str]]:
    """``n`` valid tiny-family LoRA files of about ``mb`` MB: the LoRA's tensors plus one distinct padding tensor
    (uploaded with strict=False, so the padding is reported as unmatched, as for any lenient add)."""
    import torch
    from safetensors.torch import load_file, save_file

    lora = load_file(str(template))
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        tensors = {**lora, "padding.weight": torch.rand(mb * 262_144, generator=g)}
        path = folder / f"file{i}.safetensors"
        save_file(tensors, str(path))
        out.append((path, hashlib.sha256(path.read_bytes()).hexdigest()))
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def list_and_search(client, rng: random.Random, latencies: dict[str, list[float]]) -> None:
    t = time.perf_counter()
    client.search(limit=100, offset=rng.randrange(0, 400))
    latencies["list"].append(time.perf_counter() - t)
    t = time.perf_counter()
    client.search(kind=rng.choice(KINDS), tag=f"t{rng.randrange(13)}", text=f"run {rng.randrange(97)}", limit=100)
    latencies["search"].append(time.perf_counter() - t)


def probe(client, stop: threading.Event, latencies: dict[str, list[float]], rng: random.Random,
          interval: float) -> None:
    """A list and a search every ``interval`` seconds (at once when late; 0 = back to back) until ``stop``."""
    start = time.perf_counter()
    while not stop.wait(max(0.0, start - time.perf_counter())):
        start += interval
        list_and_search(client, rng, latencies)


def client_process(ids: list[int], url: str, token: str, files: list, shared: tuple, prefix: str,
                   uploaded: list, go, timeout: float, down: Path, results) -> None:
    """Run the clients ``ids`` as threads of this process; put one record per client on ``results``."""
    from weightlab.registry.client import Client

    n = len(files)

    def run(i: int) -> dict:
        rec = {"i": i, "up_distinct": 0, "up_shared": 0, "down_distinct": 0, "down_shared": 0, "downloads": [],
               "error": None}
        c = Client(url, token=token, progress=False, timeout=300)
        try:
            for (path, digest), name, key in ((files[i], f"{prefix}/file{i}", "up_distinct"),
                                              (shared, f"{prefix}/shared", "up_shared")):
                v = c.add(path, name=name, sha256=digest, strict=False)
                assert v.sha256 == digest, f"{name}: registered sha256 {v.sha256} != {digest}"
                rec[key] += path.stat().st_size
            rec["t_uploaded"] = time.perf_counter()
            uploaded[i].set()
            j = (i + 1) % n
            if not uploaded[j].wait(timeout):
                raise TimeoutError(f"client {j} never uploaded")
            for name, digest, key in ((f"{prefix}/file{j}", files[j][1], "down_distinct"),
                                      (f"{prefix}/shared", shared[1], "down_shared")):
                dest = down / f"{i}-{name.replace('/', '_')}.safetensors"
                c.download(name, dest)  # verifies the sha256 as it arrives; checked again by the parent, untimed
                rec["downloads"].append((str(dest), digest))
                rec[key] += dest.stat().st_size
        except Exception as e:  # report every failure, keep the others running
            rec["error"] = f"client {i}: {type(e).__name__}: {e}"
            uploaded[i].set()
        finally:
            c.close()
        rec["t_done"] = time.perf_counter()
        return rec

    go.wait()  # a barrier with the parent
    with ThreadPoolExecutor(len(ids)) as pool:
        for rec in pool.map(run, ids):
            results.put(rec)


def run_round(args, ctx, url: str, token: str, work: Path, r: int, mode: str, template: Path) -> dict:
    """One round of ``mode``: fresh files, the clients in child processes, probes here; returns its figures."""
    from weightlab.registry.client import Client

    procs_n = 1 if mode.startswith("threads") else args.client_procs
    interval = 0.0 if mode.endswith("b2b") else args.probe_interval
    folder = work / f"round{r}-{mode}"
    folder.mkdir()
    files = make_files(folder, template, args.clients + 1, args.file_mb, seed=100_000 * (r + 1) + 1000 * MODES.index(mode))
    shared, distinct = files[0], files[1:]
    down = folder / "down"
    down.mkdir()
    uploaded = [ctx.Event() for _ in range(args.clients)]
    go, results = ctx.Barrier(procs_n + 1), ctx.Queue()
    prefix = f"load{r}{mode.replace('-', '')}"
    procs = [ctx.Process(target=client_process, args=(list(range(k, args.clients, procs_n)), url, token, distinct,
                                                      shared, prefix, uploaded, go, args.timeout, down, results))
             for k in range(procs_n)]
    for p in procs:
        p.start()
    latencies: dict[str, list[float]] = {"list": [], "search": []}
    stop = threading.Event()
    probes = [threading.Thread(target=probe, args=(Client(url, token=token, progress=False), stop, latencies,
                                                    random.Random(100 * r + k), interval)) for k in range(2)]
    for p in probes:
        p.start()
    go.wait()  # every client process is ready: start-up is not part of the timed round
    t0 = time.perf_counter()
    recs = [results.get(timeout=args.timeout) for _ in range(args.clients)]
    wall = time.perf_counter() - t0
    stop.set()
    for p in probes + procs:
        p.join()
    errors = [rec["error"] for rec in recs if rec["error"]]
    for rec in recs:
        for dest, digest in rec["downloads"]:
            if hashlib.sha256(Path(dest).read_bytes()).hexdigest() != digest:
                errors.append(f"{dest}: downloaded bytes do not match {digest}")
    idle: dict[str, list[float]] = {"list": [], "search": []}
    prober, rng = Client(url, token=token, progress=False), random.Random(7 + r)
    for _ in range(args.idle_probes):
        list_and_search(prober, rng, idle)
    shutil.rmtree(folder)
    tot = {k: sum(rec[k] for rec in recs) for k in ("up_distinct", "up_shared", "down_distinct", "down_shared")}
    up_end = max((rec.get("t_uploaded", t0) for rec in recs), default=t0) - t0
    return dict(mode=mode, round=r, wall=wall, up_phase=up_end, errors=errors, prefix=prefix, **tot,
                distinct_mbs=(tot["up_distinct"] + tot["down_distinct"]) / 1e6 / wall,
                all_mbs=sum(tot.values()) / 1e6 / wall,
                up_distinct_mbs=tot["up_distinct"] / 1e6 / up_end if up_end > 0 else float("nan"),
                load=latencies, idle=idle, loadavg=os.getloadavg()[0])


def report(args, rounds: list[dict], seed_s: float, n_catalog: int, checks: str, db_url: str) -> str:
    """The Markdown section: per mode, median [min–max] over rounds."""
    stack = ", ".join(name if importlib.util.find_spec(name) else f"no {name}" for name in ("httptools", "uvloop"))
    modes = list(dict.fromkeys(r["mode"] for r in rounds))
    by = {m: [r for r in rounds if r["mode"] == m] for m in modes}
    mb = args.file_mb
    describe = {"procs-paced": f"clients in {args.client_procs} processes, probes paced ({args.probe_interval:g} s)",
                "procs-b2b": f"clients in {args.client_procs} processes, probes back to back",
                "threads-paced": f"clients threads of 1 process, probes paced ({args.probe_interval:g} s)"}
    lines = [SECTION, "",
             f"Run {H.now()}. Machine: {H.machine()}. Loopback only; server `weightlab serve --workers "
             f"{args.server_workers} --no-access-log` (uvicorn, {stack}), "
             f"{'SQLite (WAL)' if db_url.startswith('sqlite') else 'PostgreSQL'}, local blob store; clients and "
             "server share the same cores.", "",
             f"- Catalog: {args.seed_versions:,} seeded versions ({seed_s:.1f} s through the service layer), "
             f"{n_catalog:,} at the end.",
             f"- Each round: {args.clients} clients, each uploads a distinct {mb} MB tiny-family LoRA file (padded; "
             f"`strict=False`) and the round's shared identical file, then downloads another client's file and the "
             f"shared one (sha256 verified). {args.repeats} rounds per mode, modes interleaved; fresh files every "
             f"round. Probes: 2 clients in the benchmark's parent process, a list and a search each; after each "
             f"round {args.idle_probes} pairs with the server idle.",
             f"- Checks: {checks}.", "",
             "Figures are median [min–max] over the rounds. **Distinct-file throughput** = bytes of the distinct "
             f"files uploaded and downloaded / the round's wall time (the {args.clients - 1} duplicate uploads of the "
             "shared file in a round are answered by the duplicate check, neither validated nor stored, and are not counted; the "
             "shared file's downloads are not counted either). Upload phase: distinct upload bytes / time until the "
             "last client's uploads returned. \"All bytes moved\" is the earlier protocol's figure (duplicates "
             "included), shown only to compare with it.", "",
             "| mode | rounds | distinct-file MB/s | distinct uploads, upload phase MB/s | all bytes moved MB/s "
             "(earlier definition) | wall s |", "|---|---|---|---|---|---|"]
    for m in modes:
        rs = by[m]
        lines.append(f"| {describe.get(m, m)} | {len(rs)} | **{H.mr([r['distinct_mbs'] for r in rs], '{:.0f}')}** | "
                     f"{H.mr([r['up_distinct_mbs'] for r in rs], '{:.0f}')} | "
                     f"{H.mr([r['all_mbs'] for r in rs], '{:.0f}')} | {H.mr([r['wall'] for r in rs], '{:.1f}')} |")
    lines += ["", "| list/search (page of 100) at "
              f"{n_catalog:,} versions | mode | calls (all rounds) | p50 ms | p99 ms per round: median [min–max] | "
              "p99 ms, all rounds' calls pooled |", "|---|---|---|---|---|---|"]
    for phase in ("load", "idle"):
        for op in ("list", "search"):
            for m in modes:
                if phase == "idle" and m != modes[0]:
                    pooled_modes = []
                else:
                    pooled_modes = [m] if phase == "load" else modes
                if not pooled_modes:
                    continue
                rs = [r for r in rounds if r["mode"] in pooled_modes]
                pooled = [x for r in rs for x in r[phase][op]]
                if not pooled:
                    continue
                p99s = [percentile(r[phase][op], 99) * 1e3 for r in rs if r[phase][op]]
                what = describe.get(m, m) if phase == "load" else "server idle, after every round"
                lines.append(f"| {op}, {'under the transfer load' if phase == 'load' else 'idle'} | {what} | "
                             f"{len(pooled)} | {statistics.median(pooled) * 1e3:.1f} | {H.mr(p99s, '{:.1f}')} | "
                             f"{percentile(pooled, 99) * 1e3:.1f} |")
    lines += ["", "Targets: aggregate >= 300 MB/s; search p99 <= 50 ms at 10,000 versions."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--client-procs", type=int, default=4, help="processes the clients are spread over")
    parser.add_argument("--file-mb", type=int, default=24, help="size of each file (MB)")
    parser.add_argument("--seed-versions", type=int, default=10_000)
    parser.add_argument("--server-workers", type=int, default=2, help="uvicorn processes")
    parser.add_argument("--db", default=None, help="database URL (default: SQLite in the work folder)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per mode (interleaved)")
    parser.add_argument("--modes", default="procs-paced,procs-b2b,threads-paced")
    parser.add_argument("--idle-probes", type=int, default=100, help="idle list+search pairs after each round")
    parser.add_argument("--probe-interval", type=float, default=0.2,
                        help="seconds between the list+search pairs of each probing client in the paced modes")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    parser.add_argument("--notes", type=Path, default=None, help="Markdown appended to the section")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"unknown mode(s) {bad}; choose from procs-paced, procs-b2b, threads-paced")

    import httpx

    from weightlab.registry.client import Client
    from weightlab.registry import auth
    from weightlab.registry.service import Registry
    from weightlab.registry.db import transaction
    from weightlab.testing import build_tiny_family

    ctx = mp.get_context("fork")  # children inherit the events; forked before any thread of this round starts
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

        rounds = []
        for r in range(args.repeats):
            for mode in modes:
                res = run_round(args, ctx, url, token, work, r, mode, tiny.style_lora_kohya)
                rounds.append(res)
                print(f"round {r + 1}/{args.repeats} {mode:<14} distinct {res['distinct_mbs']:.0f} MB/s, all bytes "
                      f"{res['all_mbs']:.0f} MB/s, wall {res['wall']:.1f} s, search p99 under load "
                      f"{percentile(res['load']['search'], 99) * 1e3:.0f} ms, errors {len(res['errors'])}", flush=True)
        n_catalog = len(Client(url, token=token, progress=False).search(all_versions=True))
        server.terminate()
        server.wait(30)
        server = None

        with Registry(db_url, home=home) as reg:  # nothing lost, nothing doubled
            refs = {v.ref for v in reg.search(all_versions=True) if v.ref.startswith("load")}
            expected = {f"{res['prefix']}/file{i}@1" for res in rounds for i in range(args.clients)}
            expected |= {f"{res['prefix']}/shared@1" for res in rounds}
            lost, extra = expected - refs, refs - expected
            problems = [p for p in reg.verify().problems if not all(v.startswith("bench") for v in p.versions)]
        errors = [e for res in rounds for e in res["errors"]]
        checks = (f"{len(errors)} failed requests; {len(lost)} versions lost, {len(extra)} unexpected (each round's "
                  f"shared file is 1 version); every download's sha256 matched; `verify` of the uploaded blobs: "
                  f"{'ok' if not problems else problems}")
        md = report(args, rounds, seed_s, n_catalog, checks, db_url)
        if args.notes:
            md += "\n" + args.notes.read_text().strip() + "\n"
        print("\n" + md)
        for e in errors:
            print(f"- error: {e}")
        if args.write:
            H.write_section(md)
        if errors or lost or extra or problems:
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
