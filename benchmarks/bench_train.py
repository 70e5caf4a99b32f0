"""Training benchmark: throughput and peak memory of the default RED-Rec training loop.

Runs :func:`redrec.train.train` with the DEFAULT ``TrainConfig`` / ``ModelConfig`` (only the batch size, device and
bookkeeping options -- no validation, no test, no checkpoints, a log record every step -- can change) on the
default synthetic dataset (``redrec data synth``: 2,000 users x 8,000 notes) for ``--warmup`` + ``--steps``
optimizer steps, and reports over the ``--steps`` steps after warm-up:

* sequences/s and tokens/s, tokens = real input events + interest queries of every sequence;
* peak memory: the process's peak RSS (``resource.getrusage``) and, on GPU, ``torch.cuda.max_memory_allocated``.

The step times come from the run's own ``log.jsonl`` (its cumulative ``seqs_per_s``), so the whole real loop is
measured: batch building (mixing, features, padding), both towers, both losses (k-means + Hungarian of the window
loss), clipping, AdamW, logging.  The reference, measured in the same run: the same number of forward + backward
passes (and AdamW steps) of the bare HF backbone alone on random ``inputs_embeds`` of exactly the same shapes
``[B, L + K, H]`` (the same batches' padded lengths) with the same attention mask and precision; the ratio
train / reference is the cost of everything around the transformer.

    python benchmarks/bench_train.py                          # 2,000 users, 3 warm-up + 20 steps, auto device
    python benchmarks/bench_train.py --steps 50 --device cuda
    python benchmarks/bench_train.py --users 500 --batch-size 16 --steps 5
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_store(work: Path, users: int) -> Path:
    """The default synthetic dataset (only ``n_users`` changed) imported into an event store, in child processes
    (so that their memory does not count in this process's peak RSS)."""
    raw, store = work / "raw", work / "store"
    if not (store / "meta.json").exists():
        for cmd in (["data", "synth", "--out", str(raw), "--users", str(users)],
                    ["data", "import", str(raw), "--out", str(store), "--no-progress", "--overwrite"]):
            r = subprocess.run([sys.executable, "-m", "redrec.cli", *cmd], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"redrec {' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return store


def step_batches(cfg, store_path: str, n_steps: int) -> list[list[dict[str, torch.Tensor]]]:
    """The micro-batches of the first ``n_steps`` optimizer steps, exactly as ``train`` draws them (one process)."""
    from redrec.data.batching import TrainExamples
    from redrec.data.store import EventStore
    from redrec.train import make_split

    store = EventStore(store_path)
    split = make_split(store, cfg.protocol, cfg.n_valid_users, cfg.seed)
    with_feat = cfg.model.item_tower.kind == "features"
    ex = TrainExamples(store, split.bounds, cfg.mixing, cfg.features, cfg.data, with_features=with_feat)
    per_epoch = ex.n_batches(cfg.batch_size) // cfg.grad_accum * cfg.grad_accum
    steps: list[list[dict[str, torch.Tensor]]] = []
    epoch = 0
    while len(steps) < n_steps:
        group: list[dict[str, torch.Tensor]] = []
        for i, b in enumerate(ex.batches(cfg.batch_size, epoch, cfg.seed)):
            if i >= per_epoch or len(steps) >= n_steps:
                break
            group.append({k: b[k] for k in ("mask",)})
            if len(group) == cfg.grad_accum:
                steps.append(group)
                group = []
        epoch += 1
    return steps


def step_seconds(log: Path, seqs_per_step: int) -> dict[int, float]:
    """Elapsed loop time at the end of each logged step, from the log's cumulative ``seqs_per_s``."""
    out = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        if "seqs_per_s" in r:
            out[int(r["step"])] = r["step"] * seqs_per_step / r["seqs_per_s"]
    return out


def reference(model_cfg, steps: list[list[dict[str, torch.Tensor]]], warmup: int, device: torch.device,
              use_bf16: bool, lr: float) -> list[float]:
    """Seconds of each timed step for the bare backbone: forward + backward on random inputs_embeds of the same
    shapes and attention mask, an AdamW step per optimizer step."""
    from redrec.model.redrec import RedRec

    model = RedRec(model_cfg).to(device)  # for its backbone and its attention-mask construction
    model.train()
    bb = model.backbone
    H, K = model.hidden_size, model_cfg.n_queries
    opt = torch.optim.AdamW([p for p in bb.parameters() if p.requires_grad], lr=lr)
    times = []
    for s, group in enumerate(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in group:
            mask = b["mask"].to(device)
            B, L = mask.shape
            h = torch.randn(B, L + K, H, device=device)
            lengths = mask.sum(1)
            pos = torch.cat([torch.arange(L, device=device)[None].expand(B, L), lengths[:, None].expand(B, K)], 1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                attn = model.attention_mask(mask, h.dtype)
                out = bb(inputs_embeds=h, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
                loss = out.float().square().mean()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    ap.add_argument("--batch-size", type=int, default=None, help="users per step (default: TrainConfig's)")
    ap.add_argument("--users", type=int, default=2000, help="synthetic users (default dataset: 2,000)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--store", type=Path, default=None, help="use this event store instead of synthesising one")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write data and the run (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1")

    from redrec.config import to_dict
    from redrec.data.store import EventStore
    from redrec.model.redrec import RedRec
    from redrec.train import TrainConfig, resolve_model_config, train

    work = args.workdir or Path(tempfile.mkdtemp(prefix="redrec-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        store = args.store or make_store(work, args.users)
        cfg = TrainConfig(store=str(store), out=str(work / "run"))
        defaults = to_dict(cfg)
        if args.batch_size:
            cfg.batch_size = args.batch_size
        cfg.max_steps = args.warmup + args.steps
        cfg.n_valid_users, cfg.test_at_end, cfg.eval_every, cfg.ckpt_every = 0, False, 0, 0
        cfg.log_every, cfg.progress, cfg.resume, cfg.device, cfg.num_threads = 1, False, False, args.device, args.threads
        shutil.rmtree(work / "run", ignore_errors=True)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if args.device == "auto" else args.device))
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

        n_steps = args.warmup + args.steps
        steps = step_batches(cfg, str(store), n_steps)
        timed = steps[args.warmup:]
        model_cfg = resolve_model_config(cfg, EventStore(store))
        K = model_cfg.n_queries
        n_params = RedRec(model_cfg).num_parameters()
        seqs = sum(int(b["mask"].shape[0]) for g in timed for b in g)
        tokens = sum(int(b["mask"].sum()) + K * int(b["mask"].shape[0]) for g in timed for b in g)

        # -- the real training loop ------------------------------------------------------------------------------
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        summary = train(cfg)
        rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
        gpu_train = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        if summary["steps"] != n_steps:
            raise SystemExit(f"train ran {summary['steps']} steps, expected {n_steps}")
        el = step_seconds(work / "run" / "log.jsonl", cfg.batch_size * cfg.grad_accum)
        train_steps = [el[s + 1] - el[s] for s in range(args.warmup, n_steps)]

        # -- the reference: the bare backbone on the same shapes, twice (before and after this point's noise) -----
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [reference(model_cfg, steps, args.warmup, device, use_bf16, cfg.optim.lr) for _ in range(2)]
        ref_steps = [min(ts) for ts in zip(*runs, strict=True)]  # per step, the less disturbed of the two
        gpu_ref = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        t_train, t_ref = sum(train_steps), sum(ref_steps)

        u = model_cfg.user_tower
        changed = {k: v for k, v in to_dict(cfg).items() if k in defaults and v != defaults[k] and not isinstance(v, dict)}
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(f"redrec training benchmark  device: {dev}  torch {torch.__version__}  python {platform.python_version()}")
        print(f"data: {store}  ({EventStore(store).n_users:,} users, {EventStore(store).n_items:,} items)")
        print(f"model: {u.backbone} {u.num_layers} x {u.hidden_size} (heads {u.num_heads}/{u.num_kv_heads}), "
              f"item tower {model_cfg.item_tower.kind}, K = {K} queries, last_n {cfg.mixing.last_n}, "
              f"batch {cfg.batch_size} x accum {cfg.grad_accum}, {'bf16' if use_bf16 else 'fp32'}, "
              f"negatives {cfg.data.n_negatives} pool + {cfg.loss.in_batch_max} in-batch, {n_params / 1e6:.2f}M parameters")
        print(f"non-default settings: {changed}")
        print(f"timed: {args.steps} steps after {args.warmup} warm-up = {seqs:,} sequences, {tokens:,} tokens "
              f"(mean {tokens / seqs:.1f} tokens per sequence)")
        print()
        hdr = (f"{'':28} {'seconds':>8} {'ms/step':>8} {'median':>8} {'seq/s':>8} {'tokens/s':>9} "
               f"{'peak RSS MiB':>13} {'peak GPU MiB':>13}")
        print(hdr)
        print("-" * len(hdr))
        rows = (("redrec train() loop", train_steps, gpu_train), ("bare backbone fwd+bwd+AdamW", ref_steps, gpu_ref))
        for name, ts, gpu in rows:
            t = sum(ts)
            rss = f"{rss_train:13.0f}" if name.startswith("redrec") else f"{'-':>13}"
            g = f"{gpu:13.0f}" if gpu is not None else f"{'-':>13}"
            print(f"{name:28} {t:8.2f} {1000 * t / len(ts):8.1f} {1000 * statistics.median(ts):8.1f} {seqs / t:8.1f} "
                  f"{tokens / t:9.0f} {rss} {g}")
        per_step = statistics.median(a / b for a, b in zip(train_steps, ref_steps, strict=True))
        print(f"\nratio train / bare backbone: {t_train / t_ref:.2f}x over the timed steps, median per step "
              f"{per_step:.2f}x (so {100 * (1 - 1 / per_step):.0f}% of a step is spent outside the transformer)")
        print("(per-step times: train from the run's log.jsonl; backbone: the faster of two passes per step)")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
