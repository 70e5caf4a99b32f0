"""Import benchmark: time and peak memory of building an event store from 1M users x 100 events.

Writes a synthetic dataset in two source layouts, then imports each in a fresh child process and reports
wall time, events/s and the child's peak resident memory.  The reference measured in the same run is a plain
``pyarrow.parquet.read_table`` of the same source (the I/O + decode floor), so the printed ratio is
machine-independent-ish on this shared, noisy host.

    python benchmarks/bench_import.py                      # 1,000,000 users x 100 events, both layouts
    python benchmarks/bench_import.py --users 50000        # quick run
    python benchmarks/bench_import.py --format redmmu
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
kind, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "read":
    import pyarrow.parquet as pq, pathlib
    n = 0
    for f in sorted(pathlib.Path(src).glob("*.parquet")):
        n += pq.read_table(f).num_rows
elif kind == "events":
    from redrec.data.events import import_events
    n = import_events(src, out, progress=False).n_events
else:
    from redrec.data.redmmu import import_redmmu
    n = import_redmmu(src, out, progress=False).n_events
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "rows": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_events(d: Path, n_users: int, per_user: int, n_items: int, seed: int) -> int:
    """events.parquet with user_id, item_id, timestamp, scenario, click, like (users grouped, time-sorted)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scen = pa.array(["homefeed", "ads", "search"])
    writer = None
    step = 100_000
    for u0 in range(0, n_users, step):
        nu = min(step, n_users - u0)
        n = nu * per_user
        users = np.repeat(np.arange(u0, u0 + nu, dtype=np.int64), per_user)
        ts = 1_600_000_000 + np.cumsum(rng.integers(1, 3600, n)).astype(np.int64)
        t = pa.table({
            "user_id": users,
            "item_id": rng.integers(0, n_items, n),
            "timestamp": ts,
            "scenario": pa.DictionaryArray.from_arrays(pa.array(rng.choice(3, n, p=[0.8, 0.15, 0.05]).astype(np.int8)), scen),
            "click": rng.integers(0, 2, n).astype(np.int8),
            "like": (rng.random(n) < 0.05).astype(np.int8),
        })
        if writer is None:
            writer = pq.ParquetWriter(d / "events.parquet", t.schema)
        writer.write_table(t)
    assert writer is not None
    writer.close()
    return n_users * per_user


def write_redmmu(d: Path, n_users: int, per_user: int, n_items: int, seed: int) -> int:
    """RED-MMU-shaped note_embeddings.parquet + multiscene_lastn.parquet (homefeed 80%, ads 15%, search 5%)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal((n_items, 64), dtype=np.float32)
    pq.write_table(
        pa.table({
            "encrypted_note_id": pa.array([f"n{i}" for i in range(n_items)]),
            "note_idx": np.arange(n_items, dtype=np.int64),
            "note_feature": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 64).cast(pa.list_(pa.float32())),
        }),
        d / "note_embeddings.parquet",
    )
    shares = {"homefeed_list": 0.80, "ads_list": 0.15, "search_list": 0.05}
    writer = None
    step = 50_000
    for u0 in range(0, n_users, step):
        nu = min(step, n_users - u0)
        cols = {"encrypted_user_id": pa.array([f"u{u}" for u in range(u0, u0 + nu)]), "user_idx": np.arange(u0, u0 + nu)}
        for name, share in shares.items():
            k = max(1, int(per_user * share))
            n = nu * k
            ts = (1_600_000_000_000 + np.cumsum(rng.integers(1, 3_600_000, n))).astype(np.int64)
            st = pa.StructArray.from_arrays(
                [pa.array(rng.integers(0, n_items, n)), pa.array(ts), pa.array(rng.integers(0, 2, n).astype(np.int8)),
                 pa.array((rng.random(n) * 60).astype(np.float32))],
                names=["item_id", "timestamp", "is_click", "duration"],
            )
            cols[name] = pa.ListArray.from_arrays(pa.array(np.arange(0, n + 1, k, dtype=np.int32)), st)
        t = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(d / "multiscene_lastn.parquet", t.schema)
        writer.write_table(t)
    assert writer is not None
    writer.close()
    return n_users * sum(max(1, int(per_user * s)) for s in shares.values())


def run_child(kind: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--events-per-user", type=int, default=100)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--format", choices=["events", "redmmu", "both"], default="both")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write sources and stores (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="redrec-bench-import-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for kind in (["events", "redmmu"] if args.format == "both" else [args.format]):
            src = work / f"src-{kind}"
            t0 = time.perf_counter()
            writer = write_events if kind == "events" else write_redmmu
            n_events = writer(src, args.users, args.events_per_user, args.items, args.seed)
            gen = time.perf_counter() - t0
            ref = run_child("read", src, work / "unused")
            imp = run_child(kind, src, work / f"store-{kind}")
            assert imp["rows"] == n_events, (imp["rows"], n_events)
            size = sum(p.stat().st_size for p in (work / f"store-{kind}").rglob("*") if p.is_file())
            rows.append((kind, n_events, gen, ref, imp, size))
            if not args.keep:
                shutil.rmtree(work / f"store-{kind}", ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nimport benchmark: {args.users:,} users x {args.events_per_user} events, {args.items:,} items")
    print(f"{'source':<8} {'events':>13} {'import s':>9} {'Mev/s':>7} {'peak MB':>8} {'read s':>7} {'read MB':>8} "
          f"{'import/read':>11} {'store MB':>9}")
    for kind, n, _gen, ref, imp, size in rows:
        print(f"{kind:<8} {n:>13,} {imp['seconds']:>9.1f} {n / imp['seconds'] / 1e6:>7.2f} {imp['peak_rss_mb']:>8.0f} "
              f"{ref['seconds']:>7.1f} {ref['peak_rss_mb']:>8.0f} {imp['seconds'] / ref['seconds']:>11.2f} {size / 2**20:>9.0f}")
    print("read = pyarrow.parquet.read_table of the same source in a fresh process (reference measured in this run)")


if __name__ == "__main__":
    main()
