"""Joint vs per-vector IVF probing of multi-interest users: recall@k against the exact search, and time.

Synthetic clustered unit vectors (seed 0): ``--items`` items around ``--centers`` random centres with noise
``--item-noise``; ``--users`` users with ``K = 9`` interest vectors (3 topics x 3 vectors, each a noisy copy of a
topic centre with noise ``--user-noise``; ``--spread 0`` puts all 9 near one topic, like the concentrated vectors
of an untrained model).  One IVF-Flat index (``--nlist`` lists) is searched with

* ``per_vector`` (FAISS): each of the 9 vectors visits its ``nprobe`` lists, the 9 lists are merged;
* ``joint`` (:mod:`redrec.retrieval.ivf_joint`): the user's ``user_nprobe`` best lists (by the max over its vectors
  of the centroid score) are scanned once, every item scored by all 9 vectors,
  in float32 and, where torch's MKL has a bfloat16 GEMM, with the bfloat16 scan (a bfloat16 copy of the lists, the
  ``2 k`` best re-scored in float32),

for ``k`` items with no exclusion, on one thread (time per 8 users, the median of 5 runs), and each list is compared
with the exact top-k (:func:`redrec.retrieval.engine.search`).

    python benchmarks/bench_joint_probe.py                 # 1M items, diverse interests
    python benchmarks/bench_joint_probe.py --spread 0      # concentrated interests
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--centers", type=int, default=2000)
    ap.add_argument("--item-noise", type=float, default=1.4)
    ap.add_argument("--user-noise", type=float, default=1.0)
    ap.add_argument("--spread", type=int, default=1, help="1: 3 topics per user; 0: one topic for all 9 vectors")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--nlist", type=int, default=4000)
    ap.add_argument("--k", type=int, default=100)
    args = ap.parse_args()

    from threadpoolctl import threadpool_limits

    from redrec.retrieval.engine import search as exact_search
    from redrec.retrieval.index import IndexConfig, build_index, recall_at_k

    rng = np.random.default_rng(0)
    d, K, B = 64, 9, args.users
    centers = unit(rng.standard_normal((args.centers, d)))
    c = rng.integers(0, args.centers, args.items)
    items = unit(centers[c] + args.item_noise * rng.standard_normal((args.items, d)).astype(np.float32) / np.sqrt(d))
    topics = rng.integers(0, args.centers, (B, 3 if args.spread else 1))
    users = unit(centers[np.repeat(topics, K // topics.shape[1], axis=1)]
                 + args.user_noise * rng.standard_normal((B, K, d)).astype(np.float32) / np.sqrt(d))
    t = time.perf_counter()
    index = build_index(IndexConfig(kind="ivf_flat", nlist=args.nlist, threads=1), d).fit(items)
    print(f"{args.items:,} items, {B} users x {K} vectors, nlist {args.nlist}, k {args.k}; "
          f"index built in {time.perf_counter() - t:.1f} s", flush=True)
    exact, _ = exact_search(users, items, args.k, items_normalized=True)
    threadpool_limits(1, user_api="blas")

    def per_8_users_ms() -> float:
        index.search(users, args.k)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            index.search(users, args.k)
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts)) * 8 / B

    rows = []
    for nprobe in (8, 16, 32):
        index.set_search_params(probe="per_vector", nprobe=nprobe, joint_precision="float32")
        rows.append((f"per_vector, nprobe {nprobe}", K * nprobe,
                     recall_at_k(index.search(users, args.k)[0], exact, args.k), per_8_users_ms()))
    from redrec.retrieval.ivf_joint import bf16_available

    precisions = ("float32", "bfloat16") if bf16_available() else ("float32",)
    for p in (32, 64, 128, 256):
        for prec in precisions:  # bfloat16: the scan of a bfloat16 copy, 2k candidates re-scored in float32
            index.set_search_params(probe="joint", user_nprobe=p, joint_precision=prec)
            rows.append((f"joint, user_nprobe {p}" + (", bfloat16 scan" if prec == "bfloat16" else ""), p,
                         recall_at_k(index.search(users, args.k)[0], exact, args.k), per_8_users_ms()))
    print(f"\n| probe | list scans per user | recall@{args.k} | ms per 8 users (1 thread) |")
    print("|---|---:|---:|---:|")
    for name, scans, r, ms in rows:
        print(f"| {name} | {scans} | {r:.3f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
