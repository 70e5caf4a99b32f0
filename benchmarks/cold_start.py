"""Cold-start items: HR@K on items training never saw vs items it did, for id, text and text+id item towers.

    python benchmarks/cold_start.py --dataset ../shared/datasets/amazon-beauty --out bench_out/cold_beauty

Steps (each skipped when its output exists, so a killed run continues):
1. import the dataset (neutral layout: events.csv.gz + items.csv with titles) into ``OUT/store``;
2. ``redrec data cold-split``: a seeded ``--fraction`` of the items becomes cold; the training store drops their
   events and every user's last event (``OUT/cold``);
3. train each tower under ``loo`` on the training store (``configs/train_beauty_text.yaml`` + the tower's
   overrides), text towers with the bundled all-MiniLM-L6-v2 (frozen, mean pooling);
4. evaluate every model on the *full* store under ``loo`` (full ranking, history excluded), once on the cases whose
   target is a cold item and once on the warm ones; print a table and write ``OUT/cold_start.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TOWERS = {
    "id": {"model.item_tower.kind": "id"},
    "text": {"model.item_tower.kind": "text"},
    "text+id": {"model.item_tower.kind": "text", "model.item_tower.text.id_embedding": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "amazon-beauty"))
    ap.add_argument("--out", default="bench_out/cold_beauty")
    ap.add_argument("--config", default=str(ROOT / "configs" / "train_beauty_text.yaml"))
    ap.add_argument("--towers", default=",".join(TOWERS))
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    from redrec.config import from_dict, set_dotted, to_dict
    from redrec.data.events import import_events
    from redrec.data.splits import COLD_ITEMS_FILE, cold_start_split
    from redrec.data.store import EventStore
    from redrec.eval.run import EvalConfig, run_eval
    from redrec.train import load_train_config, train

    ds, out = Path(args.dataset), Path(args.out)
    if not (ds / "events.csv.gz").exists():
        sys.exit(f"{ds}: no events.csv.gz (pass --dataset, e.g. ../shared/datasets/amazon-beauty)")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "store" / "meta.json").exists():
        import_events(ds, out / "store", overwrite=True)
    full = EventStore(out / "store")
    if not (out / "cold" / "meta.json").exists():
        cold_start_split(full, out / "cold", fraction=args.fraction, seed=args.seed, overwrite=True)
    cold_file = out / "cold" / COLD_ITEMS_FILE
    n_cold = sum(1 for s in cold_file.read_text().splitlines() if s.strip())
    print(f"{ds.name}: {full.n_users:,} users, {full.n_items:,} items, {full.n_events:,} events; "
          f"{n_cold:,} cold items ({args.fraction:.0%} of the items with events, seed {args.seed})")

    rows = []
    for name in args.towers.split(","):
        run = out / f"run_{name.replace('+', '_')}"
        ov = {**TOWERS[name], "store": str(out / "cold"), "out": str(run), "seed": args.seed, "test_at_end": False}
        if args.epochs:
            ov["epochs"] = args.epochs
        if args.threads:
            ov["num_threads"] = args.threads
        t0 = time.perf_counter()
        if not (run / "model" / "model.safetensors").exists():
            train(load_train_config(args.config, ov))
        wall = time.perf_counter() - t0
        for mode in ("include", "exclude"):
            d = to_dict(EvalConfig())
            for k, v in {"store": str(out / "store"), "checkpoint": str(run), "models": [], "protocol.name": "loo",
                         "protocol.target_items": str(cold_file), "protocol.target_items_mode": mode}.items():
                set_dotted(d, k, v)
            r = run_eval(from_dict(EvalConfig, d), progress=False)[0]
            rows.append({"tower": name, "targets": "cold" if mode == "include" else "warm", "n_cases": r.n_users,
                         "train_seconds": round(wall, 1), **{k: r.metrics[k] for k in r.metrics}})
            print(json.dumps(rows[-1]))

    ks = [k for k in rows[0] if k.startswith(("hr@", "ndcg@"))]
    print(f"\nprotocol loo (full ranking over {full.n_items:,} items, history excluded), dataset {ds.name}, "
          f"seed {args.seed}")
    print("| tower | targets | cases | " + " | ".join(ks) + " |")
    print("|---|---|---|" + "---|" * len(ks))
    for r in rows:
        print(f"| {r['tower']} | {r['targets']} | {r['n_cases']:,} | " + " | ".join(f"{r[k]:.4f}" for k in ks) + " |")
    (out / "cold_start.json").write_text(json.dumps({
        "dataset": str(ds), "fraction": args.fraction, "seed": args.seed, "config": args.config, "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "command": " ".join(sys.argv),
    }, indent=2))


if __name__ == "__main__":
    main()
