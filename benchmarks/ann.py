"""Approximate-index part of the retrieval benchmark: build time, recall@k and single-query latency per index kind.

Used by ``benchmarks/bench_retrieval.py`` (``from ann import ann_report, format_ann_table``); it can also be run
on its own on synthetic clustered data::

    python benchmarks/ann.py --items 778111 --dim 64 --queries 1000 --k 10

For each kind (:mod:`redrec.retrieval.index`) the index is built from the items (``train`` on a sample + ``add``
in chunks, all cores, timed), the batch of queries is searched once (recall@k against the given exact ids, and
batch throughput with all cores), then ``n_latency`` single-query searches run one after another with one
thread (the setting a serving process would use) for the latency percentiles.  Latency includes the Python
wrapper (normalisation, merge, tie ordering), i.e. what a caller of ``Index.search`` sees.

Default configurations (:func:`default_configs`) are sized for ~1M items on 2 CPU cores: IVF
``nlist = 4 sqrt(N)`` (3,528 at 778k) trained on 40 vectors per list, ``nprobe=32``; HNSW ``M=24``,
``efConstruction=40``, ``efSearch=128``; IVF-PQ ``pq_m = d/2`` 8-bit codes (40 bytes per item with its id),
``nprobe=32``.  Measured on 778,111 synthetic clustered 64-d unit vectors, 2 lightly loaded cores: builds
ivf_flat ~11 s, hnsw ~39-52 s (M=32: ~50 s, M=16: ~33 s), ivf_pq ~11 s; recall@10 ~0.98 / ~0.92 / ~0.85,
single-query p50 ~0.2-0.3 ms.  Builds slow down several-fold when other processes compete for the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from redrec.retrieval.index import IndexConfig, build_index, default_nlist, recall_at_k
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from redrec.retrieval.index import IndexConfig, build_index, default_nlist, recall_at_k


def default_configs(n_items: int, dim: int, threads: int | None = None) -> dict[str, IndexConfig]:
    """Benchmark configurations per kind for ``n_items`` vectors of ``dim`` (see the module doc)."""
    nlist = default_nlist(n_items)
    return {
        "flat": IndexConfig(kind="flat", threads=threads),
        "ivf_flat": IndexConfig(kind="ivf_flat", nlist=nlist, nprobe=32, threads=threads),
        "hnsw": IndexConfig(kind="hnsw", hnsw_m=24, ef_construction=40, ef_search=128, threads=threads),
        "ivf_pq": IndexConfig(kind="ivf_pq", nlist=nlist, nprobe=32, pq_nbits=8, threads=threads),
    }


def _params(cfg: IndexConfig) -> str:
    if cfg.kind == "ivf_flat":
        return f"nlist={cfg.nlist} nprobe={cfg.nprobe}"
    if cfg.kind == "ivf_pq":
        return f"nlist={cfg.nlist} nprobe={cfg.nprobe} pq={cfg.pq_m}x{cfg.pq_nbits}b"
    if cfg.kind == "hnsw":
        return f"M={cfg.hnsw_m} efC={cfg.ef_construction} ef={cfg.ef_search}"
    return "exact"


def ann_report(
    items: np.ndarray,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    k: int,
    kinds: Sequence[str] = ("ivf_flat", "hnsw", "ivf_pq"),
    n_latency: int = 1000,
    *,
    configs: dict[str, IndexConfig] | None = None,
    sweep: dict[str, Iterable[int]] | None = None,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Build each index kind over ``items`` and measure it against exact results.

    Args:
        items: float32 ``[N, d]`` item vectors (unit norm; normalised again by the index anyway; a memmap is fine).
        queries: ``[Q, d]`` query vectors (one per user).
        exact_ids: int ``[Q, >=k]`` exact top ids of each query over ``items`` (best first; e.g. from the exact
            engine), the ground truth for recall.
        k: cut-off of recall@k and of every search.
        kinds: index kinds to build, in order (``"flat"`` is allowed as a brute-force baseline).
        n_latency: single-query searches timed (queries cycled if ``n_latency > Q``); 0 skips latency.
        configs: per kind, an :class:`IndexConfig` replacing :func:`default_configs`'s.
        sweep: per kind, search settings to measure after one build (``nprobe`` values for IVF kinds,
            ``ef_search`` for hnsw); one row per value.  Default: the config's own setting only.
        threads: OpenMP threads for builds and the batch search (``None`` = all cores); latency always uses 1.
        log: called with a line of progress per kind (e.g. ``print``).

    Returns:
        one dict per (kind, search setting): ``kind``, ``params`` (str), ``n_items``, ``dim``, ``k``,
        ``n_queries``, ``train_s``, ``add_s``, ``build_s`` (seconds), ``memory_mb`` (index RAM estimate, 1e6 B),
        ``bytes_per_item``, ``recall`` (recall@k, fraction), ``batch_qps`` (queries/s, batch search),
        ``latency_p50_ms`` / ``latency_p99_ms`` / ``latency_mean_ms`` (single query, 1 thread), ``n_latency``,
        and ``config`` (the resolved config as a dict).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    exact_ids = np.asarray(exact_ids)
    if items.ndim != 2 or q.ndim != 2 or q.shape[1] != items.shape[1]:
        raise ValueError(f"items must be [N, d] and queries [Q, d] with the same d, got {items.shape} and {q.shape}")
    if exact_ids.ndim != 2 or exact_ids.shape[0] != q.shape[0] or exact_ids.shape[1] < k:
        raise ValueError(f"exact_ids must be [Q={q.shape[0]}, >={k}], got {exact_ids.shape}")
    n, d = (int(s) for s in items.shape)
    base = default_configs(n, d)
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        if kind not in base:
            raise ValueError(f"unknown index kind {kind!r} (known: {sorted(base)})")
        cfg = dataclasses.replace((configs or {}).get(kind, base[kind]), threads=threads)
        index = build_index(cfg, d)
        t0 = time.perf_counter()
        index.train(items)
        t1 = time.perf_counter()
        index.add(items)
        t2 = time.perf_counter()
        if log:
            log(f"[ann] {kind}: built in {t2 - t0:.1f} s (train {t1 - t0:.1f} s, add {t2 - t1:.1f} s)")
        field = {"ivf_flat": "nprobe", "ivf_pq": "nprobe", "hnsw": "ef_search"}.get(kind)
        values = list((sweep or {}).get(kind, [])) or [None]
        for v in values:
            if v is not None and field is not None:
                index.set_search_params(**{field: int(v)})
            index.set_search_params(threads=threads or 0)  # 0: FAISS's default (all cores)
            tb = time.perf_counter()
            ids, _ = index.search(q, k)
            batch_s = time.perf_counter() - tb
            recall = recall_at_k(ids, exact_ids[:, :k], k)
            lat = np.zeros(0)
            if n_latency > 0:
                index.set_search_params(threads=1)
                index.search(q[:1], k)  # warm-up
                lat = np.empty(n_latency)
                for j in range(n_latency):
                    one = q[j % len(q)][None]
                    ts = time.perf_counter()
                    index.search(one, k)
                    lat[j] = time.perf_counter() - ts
            c = index.config
            mem = index.memory_bytes()
            row = {
                "kind": kind,
                "params": _params(c),
                "n_items": n,
                "dim": d,
                "k": k,
                "n_queries": int(len(q)),
                "train_s": t1 - t0,
                "add_s": t2 - t1,
                "build_s": t2 - t0,
                "memory_mb": mem / 1e6,
                "bytes_per_item": mem / max(n, 1),
                "recall": recall,
                "batch_qps": len(q) / batch_s if batch_s > 0 else float("inf"),
                "latency_p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else float("nan"),
                "latency_p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else float("nan"),
                "latency_mean_ms": float(lat.mean() * 1e3) if lat.size else float("nan"),
                "n_latency": int(lat.size),
                "config": dataclasses.asdict(c),
            }
            rows.append(row)
            if log:
                log(f"[ann] {kind} {row['params']}: recall@{k} {recall:.3f}, p50 {row['latency_p50_ms']:.3f} ms, "
                    f"p99 {row['latency_p99_ms']:.3f} ms, batch {row['batch_qps']:.0f} q/s")
        del index
    return rows


def format_ann_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`ann_report` rows (one line per row, a caption with N, d, k, Q)."""
    if not rows:
        return "(no ANN rows)"
    r0 = rows[0]
    k = r0["k"]
    head = ["kind", "params", "build s", "(train+add)", f"recall@{k}", "batch q/s", "p50 ms", "p99 ms", "MB",
            "B/item"]
    body = [
        [
            r["kind"],
            r["params"],
            f"{r['build_s']:.1f}",
            f"{r['train_s']:.1f}+{r['add_s']:.1f}",
            f"{r['recall']:.3f}",
            f"{r['batch_qps']:.0f}",
            f"{r['latency_p50_ms']:.3f}",
            f"{r['latency_p99_ms']:.3f}",
            f"{r['memory_mb']:.0f}",
            f"{r['bytes_per_item']:.0f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    left = {0, 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    caption = (f"ANN indexes: {r0['n_items']:,} items x {r0['dim']}-d, {r0['n_queries']:,} queries, recall@{k} vs "
               f"exact; latency = single query, 1 thread, {r0['n_latency']} queries; build/batch on all threads")
    return "\n".join([caption, line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


# ---------------------------------------------------------------------------------------------------------------
# stand-alone run on synthetic clustered data
# ---------------------------------------------------------------------------------------------------------------


def synthetic_clustered(n: int, dim: int, n_clusters: int = 2000, seed: int = 0) -> np.ndarray:
    """float32 ``[n, dim]`` unit vectors: Zipf-sized clusters (exponent 0.8) with per-point noise 0.6-1.4."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    p = 1.0 / np.arange(1, n_clusters + 1) ** 0.8
    p /= p.sum()
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 1 << 18):
        b = min(n, a + (1 << 18))
        c = rng.choice(n_clusters, size=b - a, p=p)
        spread = rng.uniform(0.6, 1.4, size=(b - a, 1)).astype(np.float32)
        x = centers[c] + spread * rng.standard_normal((b - a, dim)).astype(np.float32) / np.sqrt(dim)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=778_111)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="ivf_flat,hnsw,ivf_pq")
    ap.add_argument("--n-latency", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    both = synthetic_clustered(args.items + args.queries, args.dim)
    items, queries = both[: args.items], both[args.items:]
    t = time.perf_counter()
    exact = build_index(IndexConfig(kind="flat", threads=args.threads), args.dim)
    exact.add(items)
    exact_ids, _ = exact.search(queries, args.k)
    print(f"[ann] exact top-{args.k} of {len(queries)} queries: {time.perf_counter() - t:.1f} s", flush=True)
    del exact
    rows = ann_report(items, queries, exact_ids, args.k, kinds=args.kinds.split(","), n_latency=args.n_latency,
                      threads=args.threads, log=lambda s: print(s, flush=True))
    print(format_ann_table(rows))


if __name__ == "__main__":
    main()
