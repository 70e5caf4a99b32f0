"""Serving benchmark: a bounded load test of ``redrec serve`` over loopback, 1M indexed items, the default model.

Set-up (cached in ``--work``; each step in a child process, like a user would run it):

1. ``redrec data synth`` with ``--items`` items (default 1,000,000) and ``--users`` users, imported into a store;
2. the DEFAULT model config (``TrainConfig()``; only the data-dependent fields filled), saved untrained with a fixed
   seed -- latency does not depend on the weights' values;
3. ``redrec embed items`` (all items) and a FAISS IVF index over them (``IndexConfig(kind=--index-kind)``, default
   ``ivf_flat``; ``ivf_fp16`` halves the bytes scanned per probed list);
4. ``redrec serve`` started as a second process on 127.0.0.1 with a SQLite history store; ``--history-users``
   users' histories are posted through ``POST /v1/events``.  ``--servers N`` starts N instances on N ports sharing
   that one history database (a deployment behind a load balancer; each instance loads its own model and index),
   the clients split evenly between them (client ``i`` talks to instance ``i mod N``).

Load: for each concurrency level ``c``, ``c`` client tasks (this process; one keep-alive connection each, a minimal
HTTP/1.1 client sending pre-encoded requests, so the generator's own CPU cost stays small) send
``POST /v1/recommend {"user": ..., "k": --k, "exclude_seen": true}`` back to back for ``--seconds`` seconds after a
short warm-up.  Latency is measured by the client (send to full response).  Printed per level: requests, errors,
throughput, p50 / p99 / max latency, the server's mean batch size, and the share of the server's model time spent
in the user tower vs the index (from ``/metrics``); and, as a reference for the host's speed at that moment (a
shared host runs the same code up to ~1.5x slower at times), the GFLOP/s of a one-thread float32 matmul measured in
this process just before the level starts, with the server idle.  It measures compute only: a slow spell in memory
or cache (other tenants) can leave it unchanged, so compare the server's own tower / index times too.

    python benchmarks/bench_serving.py                              # 1M items, concurrency 1 2 4 8 16
    python benchmarks/bench_serving.py --items 100000 --seconds 5 --concurrency 1 8
    python benchmarks/bench_serving.py --servers 2 --concurrency 8 --serve-args="--threads 1 --search-threads 1"
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def run(cmd: list[str]) -> None:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "redrec.cli", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"redrec {' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    print(f"  redrec {cmd[0]} {cmd[1] if len(cmd) > 1 else ''}: {time.perf_counter() - t:.1f} s", flush=True)


def setup(work: Path, items: int, users: int, index_kind: str = "ivf_flat") -> dict[str, Path]:
    """Synthetic store, default untrained model, item embeddings and an IVF index (reused when present)."""
    import torch

    from redrec.config import save_yaml
    from redrec.data.store import EventStore
    from redrec.model.redrec import RedRec
    from redrec.train import TrainConfig, resolve_model_config

    raw, store, run_dir, emb = work / "raw", work / "store", work / "run", work / "items"
    index = work / ("index" if index_kind == "ivf_flat" else f"index-{index_kind}")
    work.mkdir(parents=True, exist_ok=True)
    if not (store / "meta.json").exists():
        run(["data", "synth", "--out", str(raw), "--users", str(users), "--items", str(items)])
        run(["data", "import", str(raw), "--out", str(store), "--no-progress", "--overwrite"])
    if not (run_dir / "model" / "model.safetensors").exists():
        cfg = TrainConfig(store=str(store), out=str(run_dir))
        torch.manual_seed(0)
        model = RedRec(resolve_model_config(cfg, EventStore(store)))
        model.save_pretrained(run_dir / "model")
        save_yaml(cfg, run_dir / "config.yaml")
        print(f"  default model saved ({model.num_parameters():,} parameters, untrained)", flush=True)
    if not (emb / "embeddings.npy").exists():
        run(["embed", "items", "--run", str(run_dir), "--out", str(emb), "--no-progress"])
    if not (index / "index.json").exists():
        from redrec.embed import load_embeddings
        from redrec.retrieval.index import IndexConfig, build_index

        t = time.perf_counter()
        vec = np.asarray(load_embeddings(emb).vectors)
        build_index(IndexConfig(kind=index_kind), vec.shape[1]).fit(vec).save(index)
        print(f"  {index_kind} index over {len(vec):,} items: {time.perf_counter() - t:.1f} s", flush=True)
    return {"store": store, "run": run_dir, "items": emb, "index": index}


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its threads (Linux ``/proc``; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_gflops(n: int = 1024, reps: int = 15) -> float:
    """Median GFLOP/s of a one-thread ``n x n`` float32 matmul (``torch.mm`` into a preallocated output): the
    host's speed right now, to read the latencies of one level against."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        torch.mm(a, b, out=out)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            ts.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / float(np.median(ts)) / 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(client, url: str) -> dict[str, float]:
    """``name{labels} value`` lines of /metrics -> {name{labels}: value} (sums over nothing; the caller picks)."""
    out: dict[str, float] = {}
    for line in client.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            try:
                out[key] = float(val)
            except ValueError:
                pass
    return out


def msum(m: dict[str, float], pattern: str) -> float:
    rx = re.compile(pattern)
    return sum(v for k, v in m.items() if rx.fullmatch(k))


class _Conn:
    """One keep-alive HTTP/1.1 connection sending pre-encoded requests (a minimal client, like ``wrk``'s: the
    load generator shares the 2 cores with the server, so its own cost per request must stay small; httpx costs
    about 1 ms of CPU per request, which at a few hundred requests per second takes a core from the server)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        m = _CONTENT_LENGTH.search(head)
        if m is None:
            raise ValueError(f"response without Content-Length: {head[:200]!r}")
        return status, await self.reader.readexactly(int(m.group(1)))


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def encode_post(path: str, body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def load(ports: list[int], users: list[str], conc: int, seconds: float, k: int, warmup: float,
               server_pids: list[int]) -> tuple[list[float], int, float, float, float]:
    """``conc`` closed-loop clients (one connection each; client ``w`` to ``ports[w % len(ports)]``) for
    ``warmup + seconds``; returns latencies (s) after warm-up, errors (non-200 status, a broken connection, or -- on
    every 20th response, parsed -- a list that is not ``k`` items long), the measured wall time, and the CPU seconds
    the server processes and this process used during it."""
    reqs = [encode_post("/v1/recommend", {"user": u, "k": k, "exclude_seen": True}) for u in users]
    lat: list[float] = []
    errors = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds
    cpu0: list[float] = []

    async def mark() -> None:  # CPU counters at the start of the measured window
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        cpu0.extend([sum(proc_cpu(p) for p in server_pids), time.process_time()])

    async def worker(w: int) -> None:
        nonlocal errors
        port = ports[w % len(ports)]
        conn = _Conn(*await asyncio.open_connection("127.0.0.1", port))
        i = w
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                raw = reqs[i % len(reqs)]
                i += conc
                try:
                    status, body = await conn.request(raw)
                    ok = status == 200 and (i % 20 or len(json.loads(body)["items"]) == k)
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    ok = False
                    conn.writer.close()
                    conn = _Conn(*await asyncio.open_connection("127.0.0.1", port))
                t1 = time.perf_counter()
                if t0 >= t_measure:
                    lat.append(t1 - t0)
                    errors += not ok
        finally:
            conn.writer.close()

    await asyncio.gather(mark(), *(worker(w) for w in range(conc)))
    wall = time.perf_counter() - t_measure
    return lat, errors, wall, sum(proc_cpu(p) for p in server_pids) - cpu0[0], time.process_time() - cpu0[1]


def served_recall(client, items_dir: Path, users: list[str], k: int) -> float:
    """Mean recall@k of ``POST /v1/recommend`` (``exclude_seen: false``) against the exact top-k of the same
    user's interest vectors (``POST /v1/embed/user``) over all item embeddings (:func:`redrec.retrieval.engine.search`)."""
    from redrec.embed import load_embeddings
    from redrec.retrieval.engine import search

    emb = load_embeddings(items_dir)
    vecs, served = [], []
    for u in users:
        vecs.append(client.post("/v1/embed/user", json={"user": u}).json()["vectors"])
        got = client.post("/v1/recommend", json={"user": u, "k": k, "exclude_seen": False}).json()["items"]
        served.append({it["id"] for it in got})
    rows, _ = search(np.asarray(vecs, np.float32), np.asarray(emb.vectors), k, items_normalized=True)
    ids = np.asarray(emb.ids)
    return float(np.mean([len(s & set(ids[r].tolist())) / k for s, r in zip(served, rows, strict=True)]))


def run_loop(coro):
    """``asyncio.run`` on uvloop when installed (a cheaper event loop for the load generator)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "redrec_bench_serving")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--history-users", type=int, default=500, help="users whose histories are posted and queried")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--index-kind", default="ivf_flat", choices=["ivf_flat", "ivf_fp16", "ivf_sq8"])
    ap.add_argument("--serve-args", default="", help="extra `redrec serve` arguments, e.g. '--serve-args=--compile'")
    ap.add_argument("--servers", type=int, default=1, help="`redrec serve` instances sharing the history database, "
                    "the clients split evenly between them")
    ap.add_argument("--recall-users", type=int, default=100, help="users whose served lists are checked against "
                    "the exact search")
    args = ap.parse_args()

    import httpx

    from redrec.data.store import EventStore

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; server and load generator share them")
    print("set-up:", flush=True)
    paths = setup(args.work / f"items{args.items}", args.items, args.users, args.index_kind)
    store = EventStore(paths["store"])

    if args.servers < 1:
        raise SystemExit("--servers must be >= 1")
    ports = [free_port() for _ in range(args.servers)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    db = args.work / f"history-{ports[0]}.db"
    servers = [subprocess.Popen(
        [sys.executable, "-m", "redrec.cli", "serve", "--checkpoint", str(paths["run"]), "--store", str(paths["store"]),
         "--index", str(paths["index"]), "--item-embeddings", str(paths["items"]), "--history", f"sqlite:///{db}",
         "--host", "127.0.0.1", "--port", str(p), *args.serve_args.split()],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in ports]
    pids = [s.pid for s in servers]
    try:
        clients = [httpx.Client(base_url=u, timeout=30.0) for u in urls]
        client = clients[0]
        t = time.perf_counter()
        for server, c in zip(servers, clients, strict=True):
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"server exited:\n{server.stdout.read()[-4000:]}")
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t > 600:
                    raise SystemExit("server not ready after 600 s")
                time.sleep(0.5)
        print(f"  {len(servers)} server{'s' * (len(servers) > 1)} ready in {time.perf_counter() - t:.1f} s "
              f"({', '.join(urls)})", flush=True)

        # histories: the first --history-users users of the store, posted as events
        item_ids, scen, actions = store.item_ids, store.scenarios, store.actions_names
        users = []
        n_events = 0
        t = time.perf_counter()
        for u in range(min(args.history_users, store.n_users)):
            ev = store.user(u)
            uid = str(store.user_ids[u])
            events = [{"user": uid, "item": str(item_ids[int(ev.item[j])]), "scenario": scen[int(ev.scenario[j])],
                       "timestamp": int(ev.timestamp[j]),
                       "actions": [a for b, a in enumerate(actions) if int(ev.actions[j]) >> b & 1],
                       "duration": float(ev.duration[j])} for j in range(len(ev))]
            for a in range(0, len(events), 1000):
                r = client.post("/v1/events", json={"events": events[a : a + 1000]})
                if r.status_code != 200:
                    raise SystemExit(f"POST /v1/events failed: {r.status_code} {r.text[:500]}")
            users.append(uid)
            n_events += len(events)
        print(f"  posted {n_events:,} events of {len(users)} users in {time.perf_counter() - t:.1f} s", flush=True)
        # every instance reads the histories posted through the first one (one shared database)
        seen = [c.post("/v1/embed/user", json={"user": users[0]}).json()["n_history"] for c in clients]
        if min(seen) <= 0 or len(set(seen)) != 1:
            raise SystemExit(f"instances see different histories of user {users[0]}: n_history {seen}")

        gc.collect()
        gc.freeze()  # the load generator's own full GC passes (it holds the store) would show as latency spikes
        rows = []
        for conc in args.concurrency:
            gflops = host_gflops()
            m0 = [scrape(c, u) for c, u in zip(clients, urls, strict=True)]
            lat, errors, wall, cpu_server, cpu_client = run_loop(
                load(ports, users, conc, args.seconds, args.k, args.warmup, pids))
            m1 = [scrape(c, u) for c, u in zip(clients, urls, strict=True)]
            d: dict[str, float] = {}  # counters summed over the instances
            for a0, a1 in zip(m0, m1, strict=True):
                for key in a1:
                    d[key] = d.get(key, 0.0) + a1[key] - a0.get(key, 0.0)
            tower = msum(d, r"redrec_user_tower_seconds_sum.*")
            index = msum(d, r"redrec_index_seconds_sum.*")
            batches = msum(d, r"redrec_batch_size_count.*")
            batched = msum(d, r"redrec_batch_size_sum.*")
            fetch = msum(d, r"redrec_history_fetch_seconds_sum.*")
            qwait = msum(d, r"redrec_queue_wait_seconds_sum.*") / max(1.0, msum(d, r"redrec_queue_wait_seconds_count.*"))
            a = np.asarray(lat) * 1e3
            rows.append({
                "concurrency": conc, "requests": len(lat), "errors": errors, "rps": len(lat) / wall,
                "p50_ms": float(np.percentile(a, 50)) if len(a) else float("nan"),
                "p99_ms": float(np.percentile(a, 99)) if len(a) else float("nan"),
                "max_ms": float(a.max()) if len(a) else float("nan"),
                "mean_batch": batched / batches if batches else float("nan"),
                "tower_share": tower / (tower + index) if tower + index > 0 else float("nan"),
                "history_ms_per_batch": 1e3 * fetch / batches if batches else float("nan"),
                "tower_ms_per_batch": 1e3 * tower / batches if batches else float("nan"),
                "index_ms_per_batch": 1e3 * index / batches if batches else float("nan"),
                "queue_wait_ms": 1e3 * qwait,
                "server_cpu_ms_per_req": 1e3 * cpu_server / max(1, len(lat)),
                "client_cpu_ms_per_req": 1e3 * cpu_client / max(1, len(lat)),
                "host_gflops": gflops,
            })
            r = rows[-1]
            print(f"  c={conc}: {r['requests']} requests, {r['errors']} errors, {r['rps']:.0f} req/s, "
                  f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms (host: {gflops:.0f} GFLOP/s)", flush=True)
        recall = served_recall(client, paths["items"], users[: args.recall_users], args.k)
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        for suffix in ("", "-wal", "-shm"):  # this run's history database (the cached set-up stays)
            Path(f"{db}{suffix}").unlink(missing_ok=True)

    inst = f", {args.servers} instances sharing the history database, clients split evenly" if args.servers > 1 else ""
    print(f"\n`redrec serve {args.serve_args}`".replace(" `", "`") + inst, f"{store.n_items:,} items ({args.index_kind}), "
          f"default model (untrained), k={args.k}, "
          f"exclude_seen, {len(users)} users with stored histories, {args.seconds:.0f} s per level after "
          f"{args.warmup:.0f} s warm-up; client latency over loopback")
    print("server time per batch: history read, user tower (input conversion + forward), index search (+ result "
          "lists); queue wait per request")
    print("CPU ms per request: the server process(es) and the load generator (2 cores = 2,000 CPU ms per second); "
          "batch figures summed over the instances; host GFLOP/s: a one-thread 1024^3 float32 matmul just before "
          "the level (the host's speed then)")
    print("| concurrency | requests | errors | req/s | p50 ms | p99 ms | max ms | mean batch | history ms | tower ms "
          "| index ms | tower / (tower + index) | queue wait ms | server CPU ms/req | client CPU ms/req | host GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['mean_batch']:.2f} | {r['history_ms_per_batch']:.1f} | "
              f"{r['tower_ms_per_batch']:.1f} | {r['index_ms_per_batch']:.1f} | {r['tower_share']:.0%} | "
              f"{r['queue_wait_ms']:.1f} | {r['server_cpu_ms_per_req']:.2f} | {r['client_cpu_ms_per_req']:.2f} | "
              f"{r['host_gflops']:.0f} |")
    print(f"recall@{args.k} of the served lists against the exact search over all items (same interest vectors "
          f"from /v1/embed/user, seen items not excluded), {len(users[: args.recall_users])} users: {recall:.3f}")
    goal = [r for r in rows if r["concurrency"] == 8]
    if goal:
        g = goal[0]
        print(f"goal (p99 <= 15 ms at concurrency 8, no errors): p99 {g['p99_ms']:.1f} ms, {g['errors']} errors -> "
              f"{'met' if g['p99_ms'] <= 15 and g['errors'] == 0 else 'NOT met'}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
