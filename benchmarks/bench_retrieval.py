"""Retrieval benchmark: the exact multi-vector engine against faiss IndexFlatIP and the bare matmul floor; ANN indexes.

The job (default = RED-MMU evaluation scale): ``--users`` users x ``--vectors`` interest vectors each, ``--items``
items, ``--dim``-d, top-``--k`` by ``max_k cos(u_k, v_i)`` over the whole pool.  Data: synthetic clustered unit
vectors (``--clusters`` Gaussian clusters; users drawn near the same centres), seeded.

Measured in the same run, interleaved over ``--rounds`` rounds (the host is shared and noisy: compare within a
round; the summary uses each method's fastest round):

* ``engine``: :func:`redrec.retrieval.engine.search` (exact; float64-identical order).
* ``faiss-flat``: ``faiss.IndexFlatIP`` searching all ``users x vectors`` query vectors for the top-k each
  (``faiss search``), plus the per-user max-merge of its K lists that makes it the same job (``faiss job``).
* ``matmul floor``: computing every ``[users*vectors, items]`` score and nothing else, into preallocated outputs --
  the fastest of (a) ``torch.mm(out=...)`` with all threads over large tiles and (b) the engine's own tiling (one
  BLAS thread per worker thread, cache-sized tiles) with numpy's OpenBLAS and with torch's MKL.  No selection, no
  max over K: a lower bound of any exact method that computes all scores with these BLAS libraries.

Checks: the engine's lists equal a float64 reference on ``--check-users`` users and faiss's merged lists on all
(up to float32 near-ties, counted).  Then, unless ``--no-ann``, the FAISS ANN indexes (IVF-Flat, HNSW, IVF-PQ) are
built on the same items and report recall@k against the engine's exact lists and single-query latency p50/p99.

    python benchmarks/bench_retrieval.py                       # 7,811 x 3 x 778,111 x 64, top-1000
    python benchmarks/bench_retrieval.py --users 1000 --rounds 1 --no-ann
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_data(users: int, vectors: int, items: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors: items ``[N, d]`` and users ``[B, K, d]`` (float32)."""
    g = np.random.default_rng(seed)
    cent = g.standard_normal((clusters, dim)).astype(np.float32)
    X = np.empty((items, dim), np.float32)
    for a in range(0, items, 1 << 18):
        e = min(items, a + (1 << 18))
        X[a:e] = cent[g.integers(0, clusters, e - a)] + 0.5 * g.standard_normal((e - a, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = cent[g.integers(0, clusters, users * vectors)] + 0.7 * g.standard_normal((users * vectors, dim)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    return Q.reshape(users, vectors, dim), X


def floor_big_tiles(Q: np.ndarray, X: np.ndarray, rows: int = 768, cols: int = 8192) -> float:
    """All scores with ``torch.mm(out=...)``, all threads, large tiles; returns seconds."""
    q = torch.from_numpy(Q.reshape(-1, Q.shape[-1]))
    x = torch.from_numpy(X)
    S = torch.empty((rows, cols))
    t = time.perf_counter()
    for r in range(0, q.shape[0], rows):
        qb = q[r : r + rows]
        for a in range(0, x.shape[0], cols):
            xb = x[a : a + cols]
            torch.mm(qb, xb.T, out=S[: qb.shape[0], : xb.shape[0]])
    return time.perf_counter() - t


def floor_engine_tiles(Q: np.ndarray, X: np.ndarray, user_block: int, item_block: int, threads: int, blas: str) -> float:
    """All scores with the engine's tiling (one BLAS thread per worker thread, cache-sized tiles); returns seconds."""
    from threadpoolctl import threadpool_limits

    B, K, d = Q.shape
    x = torch.from_numpy(X)
    blocks = [(u, min(B, u + user_block)) for u in range(0, B, user_block)]

    def work(u0: int, u1: int) -> None:
        q = torch.from_numpy(np.ascontiguousarray(Q[u0:u1].reshape(-1, d)))
        S = torch.empty((q.shape[0], item_block))
        Sn, qn = S.numpy(), q.numpy()
        for a in range(0, x.shape[0], item_block):
            xb = x[a : a + item_block]
            if blas == "numpy":
                np.dot(qn, xb.numpy().T, out=Sn if xb.shape[0] == item_block else np.empty((qn.shape[0], xb.shape[0]), np.float32))
            else:
                torch.mm(q, xb.T, out=S[:, : xb.shape[0]])

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            t = time.perf_counter()
            with ThreadPoolExecutor(threads) as ex:
                for f in [ex.submit(work, *b) for b in blocks]:
                    f.result()
            return time.perf_counter() - t
    finally:
        torch.set_num_threads(prev)


def faiss_flat(Q: np.ndarray, X: np.ndarray, k: int, threads: int) -> tuple[float, float, np.ndarray]:
    """faiss IndexFlatIP over all query vectors, then max-merge per user; (search s, job s, ids [B, k])."""
    import faiss

    faiss.omp_set_num_threads(threads)
    B, K, d = Q.shape
    index = faiss.IndexFlatIP(d)
    index.add(X)
    t = time.perf_counter()
    D, ids = index.search(np.ascontiguousarray(Q.reshape(-1, d)), k)
    t_search = time.perf_counter() - t
    D, ids = D.reshape(B, K * k), ids.reshape(B, K * k)
    out = np.empty((B, k), np.int64)
    for u in range(B):  # an item's score = its best over the K lists; order: score desc, index asc
        o = np.lexsort((ids[u], -D[u]))
        _, first = np.unique(ids[u][o], return_index=True)
        keep = np.sort(first)[:k]
        out[u] = ids[u][o][keep]
    return t_search, time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=7811)
    ap.add_argument("--vectors", type=int, default=3, help="interest vectors per user (K)")
    ap.add_argument("--items", type=int, default=778111)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--check-users", type=int, default=20, help="users checked against the float64 reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ann", action="store_true", help="skip the ANN indexes")
    ap.add_argument("--ann-latency-queries", type=int, default=1000)
    args = ap.parse_args()

    from redrec.retrieval.engine import EngineConfig, SearchStats, reference_topk, search

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads")
    print(f"job: {args.users:,} users x {args.vectors} vectors x {args.items:,} items x {args.dim}-d, top-{args.k}, "
          f"score = max over vectors of cosine; synthetic clustered data ({args.clusters} clusters, seed {args.seed})")
    t = time.perf_counter()
    Q, X = make_data(args.users, args.vectors, args.items, args.dim, args.clusters, args.seed)
    print(f"data generated in {time.perf_counter() - t:.1f} s")
    cfg = EngineConfig(threads=args.threads)
    search(Q[:2], X[:5000], 10, config=cfg)  # numba compile / cache load outside the timings

    rows = []
    eng_ids = None
    for r in range(args.rounds):
        fb = floor_big_tiles(Q, X)
        fe = min(floor_engine_tiles(Q, X, cfg.user_block, cfg.item_block, args.threads, blas) for blas in ("numpy", "torch"))
        st = SearchStats()
        t = time.perf_counter()
        eng_ids, _ = search(Q, X, args.k, config=cfg, items_normalized=True, stats=st)
        te = time.perf_counter() - t
        fs, fj, faiss_ids = faiss_flat(Q, X, args.k, args.threads)
        floor = min(fb, fe)
        rows.append((te, fs, fj, fb, fe, floor))
        print(f"round {r + 1}: engine {te:.2f} s | faiss-flat search {fs:.2f} s, job {fj:.2f} s | matmul floor "
              f"{floor:.2f} s (torch big tiles {fb:.2f}, engine tiles {fe:.2f}) | engine/faiss-search {te / fs:.2f}, "
              f"engine/floor {te / floor:.2f} | rescanned users {st.rescanned}, float64 fallbacks {st.float64_fallback}",
              flush=True)
    te, fs, fj = (min(x[i] for x in rows) for i in range(3))
    floor = min(x[5] for x in rows)
    print("\nsummary (fastest round of each):")
    print("| method | seconds | vs matmul floor |")
    print("|---|---|---|")
    for name, v in (("matmul floor (scores only)", floor), ("redrec engine (exact)", te),
                    ("faiss IndexFlatIP search", fs), ("faiss IndexFlatIP search + max-merge", fj)):
        print(f"| {name} | {v:.2f} | {v / floor:.2f}x |")
    print(f"engine / faiss-flat search = {te / fs:.2f} (goal <= 1.0); engine / matmul floor = {te / floor:.2f} "
          f"(goal <= 1.3); per-round ratios: " + ", ".join(f"{x[0] / x[1]:.2f}/{x[0] / x[5]:.2f}" for x in rows))

    # exactness
    cu = min(args.check_users, args.users)
    ref, _ = reference_topk(Q[:cu], X, args.k)
    print(f"engine == float64 reference on {cu} users: {bool((ref == eng_ids[:cu]).all())}")
    same = np.mean([np.array_equal(a, b) for a, b in zip(eng_ids, faiss_ids, strict=True)])
    overlap = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(eng_ids, faiss_ids, strict=True)])
    print(f"engine vs faiss-flat (float32): identical lists {same:.4f}, mean overlap {overlap:.6f}")

    if not args.no_ann:
        from ann import ann_report, format_ann_table

        nq = min(args.users * args.vectors, 2000)
        qv = np.ascontiguousarray(Q.reshape(-1, args.dim)[:nq])
        kk = min(args.k, 100)
        exact, _ = search(qv[:, None, :], X, kk, config=cfg, items_normalized=True)
        print()
        print(format_ann_table(ann_report(X, qv, exact, kk, n_latency=args.ann_latency_queries)))


if __name__ == "__main__":
    main()
