"""``redrec`` command line: data synth / import / stats, eval, demo.

Every command reports bad input as ``error: <file>: field '<field>': <problem>`` on stderr with exit code 2,
and never leaves a half-written output behind.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from redrec.errors import RedrecError

app = typer.Typer(
    help="RED-Rec: cross-scenario two-tower recommender. Import data, evaluate, train, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Synthesise, import and inspect event stores.", no_args_is_help=True)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])

FORMATS = ("auto", "events", "redmmu", "reference-json")


def _clean_errors(fn: F) -> F:
    """Turn RedrecError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RedrecError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs (YAML-parsed values) from ``--set``."""
    import yaml

    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise RedrecError(f"--set expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------
@data_app.command("synth")
@_clean_errors
def data_synth(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the RED-MMU-shaped parquet files."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML SynthConfig."),
    users: int | None = typer.Option(None, help="Number of users (overrides the config)."),
    items: int | None = typer.Option(None, help="Number of items (overrides the config)."),
    seed: int | None = typer.Option(None, help="Random seed (overrides the config)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override any config field: key=value."),
) -> None:
    """Write a synthetic RED-MMU-shaped dataset (homefeed, ads, search) with shared latent interests."""
    from redrec.config import from_dict, load_yaml, to_dict
    from redrec.data.synth import SynthConfig, write_synthetic

    ov = _parse_overrides(set_)
    for k, v in (("n_users", users), ("n_items", items), ("seed", seed)):
        if v is not None:
            ov[k] = v
    cfg = load_yaml(SynthConfig, config, ov) if config else from_dict(SynthConfig, {**to_dict(SynthConfig()), **ov})
    summary = write_synthetic(out, cfg)
    typer.echo(json.dumps(summary, indent=2, default=str))


def _detect_format(src: Path) -> str:
    if src.suffix == ".json":
        return "reference-json"
    if src.is_dir():
        names = [p.name for p in src.iterdir()]
        if any(n.startswith("multiscene_lastn") for n in names):
            return "redmmu"
        if any(n.startswith("events.") for n in names):
            return "events"
        if "user_lastn.json" in names:
            return "reference-json"
    if src.is_file() and src.name.startswith("events"):
        return "events"
    raise RedrecError(
        f"{src}: cannot tell the input format (expected a directory with events.csv[.gz]/events.parquet, "
        "RED-MMU multiscene_lastn*.parquet + note_embeddings*.parquet, or a user_lastn.json); pass --format"
    )


@data_app.command("import")
@_clean_errors
def data_import(
    src: Path = typer.Argument(..., help="Dataset directory or file."),
    out: Path = typer.Option(..., "--out", "-o", help="Event store directory to create."),
    format: str = typer.Option("auto", "--format", "-f", help=f"Input format: {', '.join(FORMATS)}."),
    sort_events: bool = typer.Option(False, "--sort-events", help="Sort each user's events by time instead of failing."),
    skip_empty_users: bool = typer.Option(False, "--skip-empty-users", help="Drop users with no history instead of failing."),
    drop_unknown_items: bool = typer.Option(False, "--drop-unknown-items", help="Drop events of unknown items instead of failing."),
    timestamp_unit: str = typer.Option("auto", "--timestamp-unit", help="auto, s, ms or ordinal."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store (only after a successful import)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
) -> None:
    """Import a dataset into a canonical event store and print its statistics."""
    from redrec.data.stats import format_stats, store_stats

    if format not in FORMATS:
        raise RedrecError(f"--format must be one of {FORMATS}, got {format!r}")
    if timestamp_unit not in ("auto", "s", "ms", "ordinal"):
        raise RedrecError(f"--timestamp-unit must be auto, s, ms or ordinal, got {timestamp_unit!r}")
    if not src.exists():
        raise RedrecError(f"{src}: no such file or directory")
    fmt = _detect_format(src) if format == "auto" else format
    if fmt == "events":
        from redrec.data.events import EventsImportConfig, import_events

        cfg = EventsImportConfig(sort_events=sort_events, drop_unknown_items=drop_unknown_items, timestamp_unit=timestamp_unit)  # type: ignore[arg-type]
        store = import_events(src, out, cfg, overwrite=overwrite, progress=progress)
    elif fmt == "redmmu":
        from redrec.data.redmmu import RedMMUImportConfig, import_redmmu

        rcfg = RedMMUImportConfig(
            sort_events=sort_events, skip_empty_users=skip_empty_users, drop_unknown_items=drop_unknown_items,
            timestamp_unit=timestamp_unit,  # type: ignore[arg-type]
        )
        store = import_redmmu(src, out, rcfg, overwrite=overwrite, progress=progress)
    else:
        from redrec.data.reference import import_reference_json

        path = src / "user_lastn.json" if src.is_dir() else src
        store = import_reference_json(
            path, out, timestamp_unit=timestamp_unit, sort_events=sort_events, skip_empty_users=skip_empty_users,
            overwrite=overwrite, progress=progress,
        )
    st = store_stats(store)
    typer.echo(json.dumps(st, indent=2) if as_json else f"imported ({fmt})\n" + format_stats(st))


@data_app.command("stats")
@_clean_errors
def data_stats(
    store: Path = typer.Argument(..., help="Event store directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print an event store's statistics (users, items, events, scenarios, actions, lengths, time span)."""
    from redrec.data.stats import format_stats, store_stats
    from redrec.data.store import EventStore

    st = store_stats(EventStore(store))
    typer.echo(json.dumps(st, indent=2) if as_json else format_stats(st))


@data_app.command("cold-split")
@_clean_errors
def data_cold_split(
    store: Path = typer.Argument(..., help="Event store directory (the full store)."),
    out: Path = typer.Option(..., "--out", "-o", help="Training store to create (with cold_items.txt inside)."),
    fraction: float = typer.Option(0.1, help="Fraction of the items with events held out as cold items."),
    seed: int = typer.Option(0, help="Seed of the cold item draw."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output store."),
) -> None:
    """Cold-start split: a training store without the cold items' events and without each user's last event.

    Train on OUT, then evaluate on the full STORE under loo with --target-items OUT/cold_items.txt
    (--target-items-mode include: cold targets; exclude: warm targets).
    """
    from redrec.data.splits import COLD_ITEMS_FILE, cold_start_split
    from redrec.data.store import EventStore

    full = EventStore(store)
    new = cold_start_split(full, out, fraction=fraction, seed=seed, overwrite=overwrite)
    n_cold = sum(1 for line in (new.path / COLD_ITEMS_FILE).read_text().splitlines() if line.strip())
    typer.echo(f"wrote {new.path}: {new.n_users:,} users, {new.n_events:,} of {full.n_events:,} events; "
               f"{n_cold:,} cold items in {new.path / COLD_ITEMS_FILE}")


# --------------------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------------------
@app.command("eval")
@_clean_errors
def eval_cmd(
    store: Path | None = typer.Option(None, "--store", "-s", help="Event store directory."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML EvalConfig (store, protocol, mixing, models)."),
    protocol: str | None = typer.Option(None, "--protocol", "-p", help="redrec, loo or reference."),
    model: list[str] | None = typer.Option(None, "--model", "-m", help="popularity, meanpool or auto (repeatable; default auto, or none when a checkpoint or embeddings are given)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="A training run directory (RUN/model + RUN/config.yaml) or a model directory."),
    item_embeddings: Path | None = typer.Option(None, "--item-embeddings", help="Merged `redrec embed items` directory (with --user-embeddings)."),
    user_embeddings: Path | None = typer.Option(None, "--user-embeddings", help="Merged `redrec embed users` directory, embedded under the same protocol."),
    queries: str | None = typer.Option(None, help="Interest vectors that score: auto, all or target_scenario."),
    ref_items: Path | None = typer.Option(None, "--ref-items", help="reference protocol without a store: RedSeqRec's base_item_embedding_pr.pkl."),
    ref_users: Path | None = typer.Option(None, "--ref-users", help="reference protocol without a store: RedSeqRec's user_embedding_pr.pkl."),
    lastn: Path | None = typer.Option(None, "--lastn", help="reference protocol without a store: RedSeqRec's user_lastn.json."),
    target_scenario: str | None = typer.Option(None, help="redrec protocol: the target scenario (default ads)."),
    pool: str | None = typer.Option(None, help="full or sampled candidate pool."),
    n_sampled: int | None = typer.Option(None, help="Sampled pool size (besides the targets)."),
    max_users: int | None = typer.Option(None, help="Evaluate a seeded random subset of users."),
    target_items: Path | None = typer.Option(None, "--target-items", help="Keep only cases whose targets are listed in this file (item ids, one per line; e.g. a cold-start split's cold_items.txt)."),
    target_items_mode: str | None = typer.Option(None, "--target-items-mode", help="include (targets all listed: cold items) or exclude (none listed: warm items)."),
    seed: int | None = typer.Option(None, help="Seed of cutoffs, user subsets and sampled pools."),
    policy: str | None = typer.Option(None, help="Mixing policy for history-based models (2d, timestamp, naive, 1d_position, 1d_timestamp)."),
    last_n: int | None = typer.Option(None, help="Sequence budget of the mixing policy."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override any config field: key=value (dotted keys)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the results as JSON here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Evaluate models under a named protocol and print a metrics table (protocol, dataset, pool, K in its title).

    Models: zero-parameter baselines (--model), a trained model (--checkpoint RUN), precomputed embeddings
    (--item-embeddings DIR --user-embeddings DIR), or RedSeqRec's released pickles under the reference protocol
    (--protocol reference --ref-items ... --ref-users ... --lastn ..., no store needed).
    """
    from redrec.config import load_config
    from redrec.eval.report import format_table, write_json
    from redrec.eval.run import EvalConfig, run_eval

    ov = _parse_overrides(set_)
    for key, val in (
        ("store", str(store) if store else None), ("protocol.name", protocol), ("protocol.target_scenario", target_scenario),
        ("protocol.pool", pool), ("protocol.n_sampled", n_sampled), ("protocol.max_users", max_users),
        ("protocol.target_items", str(target_items) if target_items else None),
        ("protocol.target_items_mode", target_items_mode), ("protocol.seed", seed), ("mixing.policy", policy), ("mixing.last_n", last_n), ("models", list(model) if model else None),
        ("checkpoint", str(checkpoint) if checkpoint else None), ("queries", queries),
        ("item_embeddings", str(item_embeddings) if item_embeddings else None),
        ("user_embeddings", str(user_embeddings) if user_embeddings else None),
        ("reference.items", str(ref_items) if ref_items else None), ("reference.users", str(ref_users) if ref_users else None),
        ("reference.lastn", str(lastn) if lastn else None),
    ):
        if val is not None:
            ov[key] = val
    if not model and "models" not in ov and (checkpoint or item_embeddings or ref_items):
        ov["models"] = []  # only what was given
    if ref_items and protocol is None:
        ov["protocol.name"] = "reference"
    cfg = load_config(EvalConfig, config, ov)
    results = run_eval(cfg, progress=progress)
    typer.echo(format_table(results, style="plain"))
    if out:
        write_json(out, results)
        typer.echo(f"wrote {out}")


# --------------------------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------------------------
embed_app = typer.Typer(
    help="Embed items and users with a trained model: batched, sharded (--rank/--world-size or torchrun), "
    "resumable; then `redrec embed merge DIR`.",
    no_args_is_help=True,
)
app.add_typer(embed_app, name="embed")


def _embed_config(set_: list[str] | None, batch_size: int | None, part_rows: int | None, device: str | None,
                  progress: bool) -> tuple[Any, dict[str, Any]]:
    """EmbedConfig from the flags and the non-dotted ``--set`` keys; returns it and the dotted (protocol./mixing./
    features.) overrides."""
    from redrec.config import load_config
    from redrec.embed import EmbedConfig

    ov = _parse_overrides(set_)
    dotted = {k: v for k, v in ov.items() if "." in k}
    flat = {k: v for k, v in ov.items() if "." not in k}
    for k, v in (("batch_size", batch_size), ("part_rows", part_rows), ("device", device)):
        if v is not None:
            flat[k] = v
    flat["progress"] = progress
    return load_config(EmbedConfig, None, flat), dotted


def _embed_done(res: Any, merge: bool | None) -> None:
    from redrec.embed import merge_embeddings

    typer.echo(f"rank {res.rank}/{res.world_size}: rows [{res.row_start:,}, {res.row_end:,}) in {res.n_parts} parts "
               f"({res.parts_written} written, {res.parts_skipped} already there) -> {res.shard_dir}")
    if merge is None:
        merge = res.world_size == 1
    if merge:
        path = merge_embeddings(res.out, progress=False)
        typer.echo(f"merged -> {path} + {res.out / 'ids.parquet'}")
    else:
        typer.echo(f"when all {res.world_size} ranks are done: redrec embed merge {res.out}")


_RUN_HELP = "Training run directory (uses RUN/model and RUN/config.yaml). Under torchrun write --run-dir or -r (torchrun takes --run for its --run-path)."
_RANK_HELP = "This process's shard (default: $RANK, else 0)."
_WORLD_HELP = "Number of shards (default: $WORLD_SIZE, else 1)."
_MERGE_HELP = "Merge after this rank finishes (default: only when world size is 1)."


@embed_app.command("items")
@_clean_errors
def embed_items_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Embeddings directory (shared by all ranks)."),
    run: Path | None = typer.Option(None, "--run", "--run-dir", "-r", help=_RUN_HELP),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model directory (config.yaml + model.safetensors) instead of --run."),
    store: Path | None = typer.Option(None, "--store", "-s", help="Event store (default: the run's)."),
    rank: int | None = typer.Option(None, "--rank", help=_RANK_HELP),
    world_size: int | None = typer.Option(None, "--world-size", help=_WORLD_HELP),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Items per forward pass (default 8192)."),
    part_rows: int | None = typer.Option(None, "--part-rows", help="Rows per part file (the unit of resume)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    set_: list[str] | None = typer.Option(None, "--set", help="Any EmbedConfig field: key=value."),
    merge: bool | None = typer.Option(None, "--merge/--no-merge", help=_MERGE_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Unit vectors [n_items, d] of every item of the store."""
    from redrec.embed import embed_items

    if (run is None) == (model is None):
        raise RedrecError("give exactly one of --run RUN_DIR or --model MODEL_DIR")
    cfg, dotted = _embed_config(set_, batch_size, part_rows, device, progress)
    if dotted:
        raise RedrecError(f"--set {next(iter(dotted))}: items take EmbedConfig fields only")
    res = embed_items(run or model, store, out, cfg, rank=rank, world_size=world_size)  # type: ignore[arg-type]
    _embed_done(res, merge)


@embed_app.command("users")
@_clean_errors
def embed_users_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Embeddings directory (shared by all ranks)."),
    run: Path = typer.Option(..., "--run", "--run-dir", "-r", help=_RUN_HELP),
    store: Path | None = typer.Option(None, "--store", "-s", help="Event store (default: the run's)."),
    protocol: str = typer.Option("latest", "--protocol", "-p", help="latest (whole history; serving), loo, redrec or reference (one row per evaluation case)."),
    rank: int | None = typer.Option(None, "--rank", help=_RANK_HELP),
    world_size: int | None = typer.Option(None, "--world-size", help=_WORLD_HELP),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Users per forward pass (default 256)."),
    part_rows: int | None = typer.Option(None, "--part-rows", help="Rows per part file (the unit of resume)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    set_: list[str] | None = typer.Option(None, "--set", help="protocol.*, mixing.*, features.* or EmbedConfig fields: key=value."),
    merge: bool | None = typer.Option(None, "--merge/--no-merge", help=_MERGE_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """All K interest vectors [n_rows, K, d] per user (latest) or per evaluation case (loo, redrec, reference)."""
    from redrec.embed import embed_users

    cfg, dotted = _embed_config(set_, batch_size, part_rows, device, progress)
    res = embed_users(run, store, out, protocol, cfg, overrides=dotted, rank=rank, world_size=world_size)
    _embed_done(res, merge)


@embed_app.command("merge")
@_clean_errors
def embed_merge_cmd(
    out: Path = typer.Argument(..., help="Embeddings directory."),
    store: Path | None = typer.Option(None, "--store", "-s", help="Event store for the external ids (default: the manifest's)."),
    remove_shards: bool = typer.Option(False, "--remove-shards", help="Delete the shard directories after merging."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Merge every rank's shard into DIR/embeddings.npy + DIR/ids.parquet (fails on missing or corrupt shards)."""
    from redrec.embed import load_embeddings, merge_embeddings

    merge_embeddings(out, store=store, remove_shards=remove_shards, progress=progress)
    e = load_embeddings(out)
    typer.echo(f"merged {len(e):,} {e.kind} rows {tuple(e.vectors.shape)} -> {out / 'embeddings.npy'} + {out / 'ids.parquet'}")


# --------------------------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------------------------
@app.command("serve")
@_clean_errors
def serve_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Training run directory (RUN/model + RUN/config.yaml)."),
    store: Path | None = typer.Option(None, "--store", "-s", help="Event store (default: the run's)."),
    index: Path | None = typer.Option(None, "--index", help="FAISS index directory over the store's items (default: exact engine)."),
    exact: bool = typer.Option(False, "--exact", help="Exact multi-vector engine over all items (the default without --index)."),
    item_embeddings: Path | None = typer.Option(None, "--item-embeddings", help="Merged `redrec embed items` directory of this model (default: computed at start-up)."),
    history: str = typer.Option(":memory:", "--history", help="History store: sqlite:///abs/path.db, sqlite://rel.db, :memory: or redis://host:port/db."),
    history_per_scenario: int | None = typer.Option(None, "--history-per-scenario", help="Events kept per user and scenario (default: the run's mixing budget)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most requests per micro-batch (one user-tower forward)."),
    max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", help="Longest wait for a micro-batch to fill (ms)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Most waiting requests; beyond, 503 with Retry-After."),
    max_history: int = typer.Option(10_000, "--max-history", help="Most events in an inline history (413 above)."),
    max_events: int = typer.Option(10_000, "--max-events", help="Most events per POST /v1/events (413 above)."),
    device: str = typer.Option("cpu", "--device", help="Torch device of the user tower: cpu, cuda, cuda:N, or auto (cuda when a GPU is visible)."),
    precision: str = typer.Option("float32", "--precision", help="User tower compute: float32, or bfloat16 (autocast: weights stay float32; faster on CPUs with AMX / AVX512-BF16, e.g. 6.6 -> 6.2 ms for 8 users of the default model here; forward of 8 users with --compile: 3.0-3.2 ms)."),
    threads: int | None = typer.Option(None, "--threads", help="Torch threads of the user tower (default: all cores)."),
    compile_model: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the user tower (inductor with freezing; needs a C++ compiler; compiles for ~25-60 s at start-up; default model here, 8 users: 6.6 -> 4.8 ms in float32 before freezing took effect; bfloat16 forward 3.7-4.2 -> 3.0-3.2 ms with it)."),
    search_threads: int = typer.Option(0, "--search-threads", help="Threads of each index search (0: all cores for the joint probe, 1 for FAISS)."),
    index_probe: str = typer.Option("per_vector", "--index-probe", help="How the K interest vectors search an IVF index: per_vector (FAISS: K searches merged) or joint (ivf_flat: each user's best lists scanned once with all K vectors; another speed/recall trade-off, see benchmarks/bench_joint_probe.py)."),
    index_nprobe: int | None = typer.Option(None, "--index-nprobe", help="IVF lists scanned per user (joint) or per vector (per_vector); default: the index's nprobe (joint: 4 x it)."),
    index_precision: str = typer.Option("float32", "--index-precision", help="Joint probe's scan: float32, or bfloat16 (a bfloat16 copy of the lists scored with MKL's bfloat16 GEMM, the 2k best re-scored in float32: same lists here, scan of 8 users 3.2 -> 2.5 ms on 2 threads; needs torch's x86-64 MKL)."),
    precompute_items: bool | None = typer.Option(None, "--precompute-items/--no-precompute-items", help="Run the item tower once over every item at start-up and give each forward its history's rows (H values per item: 256 MB per million items of the default model in bfloat16; its compiled bfloat16 forward of 8 users 2.9 -> 2.5 ms here). Default: on with --precision bfloat16, unless the item tower runs a text encoder per item."),
    admin_token: str | None = typer.Option(None, "--admin-token", envvar="REDREC_ADMIN_TOKEN", help="Require 'Authorization: Bearer TOKEN' on /v1/admin/*."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    access_log: bool = typer.Option(False, "--access-log/--no-access-log", help="Log every request."),
    batch_delay_ms: float = typer.Option(0.0, "--batch-delay-ms", hidden=True, help="Testing: sleep per batch."),
) -> None:
    """Serve recommendations over HTTP (FastAPI): /v1/events, /v1/recommend, /v1/embed/user, /metrics, hot reload."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        # GNU OpenMP (torch's CPU threads) spins ~300k iterations after each parallel region by default; right after
        # the user tower those spinning threads take the cores the index search runs on, and the search's threads
        # then stall the next forward (user-tower times of 40-90 ms in a third of the batches, in-process).
        # Compiled (few, fused parallel regions): no spin at all; the fast serving options measured p99
        # 7.4 / 7.8 / 10.7 / 18.1 / 30.2 ms at concurrency 1 / 2 / 4 / 8 / 16 against 7.9 / 9.2 / 14.1 / 20.7 /
        # 34.4 ms with a spin of 100,000.  Eager (many small regions, each waking the threads): a shorter spin,
        # whose p99 at concurrency 4 / 8 / 16 was 22.1 / 38.1 / 66.9 ms against 30.9 / 42.4 / 72.2 ms with none.
        os.environ.setdefault("GOMP_SPINCOUNT", "0" if compile_model else "100000")
    # OpenBLAS on one thread, including scipy's, loaded later by the joint probe's products (threadpoolctl in serve()
    # reaches only the libraries loaded when it runs)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from redrec.serve.app import ServeConfig, serve

    if exact and index is not None:
        raise RedrecError("give --index INDEX_DIR or --exact, not both")
    cfg = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_history=max_history,
                      max_events=max_events, admin_token=admin_token, batch_delay_ms=batch_delay_ms)
    serve(checkpoint, store=store, index=index, item_embeddings=item_embeddings, history=history,
          history_per_scenario=history_per_scenario, host=host, port=port, config=cfg, device=device,
          log_level=log_level, access_log=access_log, precision=precision, threads=threads,
          search_threads=search_threads, index_probe=index_probe, index_nprobe=index_nprobe, compile=compile_model,
          index_precision=index_precision, precompute_items=precompute_items)


# --------------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------------
@app.command("train")
@_clean_errors
def train_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML TrainConfig (see configs/)."),
    store: str | None = typer.Option(None, "--store", "-s", help="Event store (overrides the config)."),
    out: str | None = typer.Option(None, "--out", "-o", help="Run directory (overrides the config)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override any config field: key=value (dotted keys)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over even if the run directory has a checkpoint."),
) -> None:
    """Train RED-Rec (one process, or data parallel under torchrun) and evaluate it on the test split."""
    from redrec.eval.report import format_table
    from redrec.train import load_train_config, train

    ov = _parse_overrides(set_)
    if store:
        ov["store"] = store
    if out:
        ov["out"] = out
    if no_resume:
        ov["resume"] = False
    cfg = load_train_config(config, ov)
    summary = train(cfg)
    if "test_result" in summary:
        typer.echo(format_table([summary["test_result"]], style="plain"))
    if "valid" in summary:
        typer.echo(f"valid ({cfg.protocol.name}): " + ", ".join(f"{k} {v:.4f}" for k, v in summary["valid"].items() if k in ("hr@10", "ndcg@10", "mrr")))
    typer.echo(f"{summary['steps']} steps in {summary['train_seconds']:.0f} s; model, checkpoint and logs in {cfg.out}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_after_distributed_run()


def _exit_after_distributed_run() -> None:
    """End a finished ``torchrun`` rank without the interpreter's teardown.

    With torch 2.13 on CPU, gloo's threads (``gloo_tcp_loop``, ``pt_gloo_runloop``) are still running after
    ``destroy_process_group`` (no Python object holds the group any more), and destroying them during the
    interpreter's exit aborted a rank now and then ("terminate called without an active exception", exit -6,
    about 1 in 20 runs of the test suite) after a complete, saved run.  Everything is written and closed by then
    (:func:`redrec.train.train` closes its files and destroys the group): flush the standard streams and the
    logging handlers, and exit 0 at once."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


# --------------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------------
bench_app = typer.Typer(
    help="Benchmarks: train and evaluate models or ablation presets over several seeds (mean ± std, JSON, "
    "plots); write the markdown report.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("run")
@_clean_errors
def bench_run_cmd(
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Event store, or a dataset folder (events.csv[.gz] / events.parquet, or `redrec data synth` output) imported once into OUT/store."),
    preset: str | None = typer.Option(None, "--preset", "-p", help="Ablation preset: cross_scenario, mixing, interests, seq_len or baselines."),
    models: str | None = typer.Option(None, "--models", "-m", help="Comma-separated models (besides the preset's): popularity, meanpool, redrec, sasrec, hstu, hllm, morec, or a variant of --bench-config."),
    seeds: int | None = typer.Option(None, "--seeds", help="Number of seeds, 0 .. n-1 (default 3)."),
    config: str | None = typer.Option(None, "--config", "-c", help="Base TrainConfig YAML of every trained variant (see configs/bench/)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a base config field for every variant: key=value (dotted keys; applied after a baseline preset's overrides; a field an ablation preset varies is an error)."),
    bench_config: Path | None = typer.Option(None, "--bench-config", "-b", help="YAML BenchConfig (dataset, config, preset, models, variants, seeds, ...); flags override it."),
    out: str | None = typer.Option(None, "--out", "-o", help="Bench directory (runs, bench.json, plots; default bench_out). A rerun skips finished runs."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Progress bars of every run's training and evaluation (default off)."),
) -> None:
    """Train and evaluate every variant for every seed; print mean ± std per metric; write OUT/bench.json and PNG plots."""
    from redrec.bench import argv_command, load_bench_config, run_bench
    from redrec.bench_report import format_bench

    ov: dict[str, Any] = {}
    for k, v in (("dataset", dataset), ("preset", preset), ("seeds", seeds), ("config", config), ("out", out), ("progress", progress)):
        if v is not None:
            ov[k] = v
    if models is not None:
        ov["models"] = [m.strip() for m in models.split(",") if m.strip()]
    cfg = load_bench_config(bench_config, ov, _parse_overrides(set_))
    bench = run_bench(cfg, command=argv_command(), log=typer.echo)
    typer.echo("")
    typer.echo(format_bench(bench))
    new = sum(not r["skipped"] for r in bench["runs"])
    typer.echo(f"\n{len(bench['runs'])} runs ({new} run now, {len(bench['runs']) - new} read back) in "
               f"{bench['total_wall_time_s'] / 60:.1f} min; {Path(cfg.out) / 'bench.json'}, plots {', '.join(bench['plots'])}")


@bench_app.command("report")
@_clean_errors
def bench_report_cmd(
    benches: list[Path] = typer.Argument(..., help="Bench directories (each with the bench.json of `redrec bench run`)."),
    out: Path = typer.Option(Path("docs/results.md"), "--out", "-o", help="Markdown file; the plots are drawn beside it into a folder of its name (docs/results/<bench>/)."),
    summary: Path | None = typer.Option(None, "--summary", help="Hand-written markdown (the overall reading across benches) placed after the header."),
) -> None:
    """Write the markdown report: per bench its command, seeds, machine, mean ± std table, plots and reading."""
    from redrec.bench import argv_command
    from redrec.bench_report import write_report

    path = write_report(benches, out, command=argv_command(), summary=summary)
    typer.echo(f"wrote {path}")


# --------------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------------
@app.command("demo")
@_clean_errors
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Working directory (data, store, run, results)."),
    dataset: Path | None = typer.Option(None, "--dataset", "-d", help="Instead of synthetic data: a dataset folder in the neutral layout (events.csv.gz + items.csv, e.g. ../shared/datasets/ml-1m). Items with titles get the bundled all-MiniLM-L6-v2 text item tower."),
    users: int = typer.Option(2000, help="Synthetic users."),
    items: int = typer.Option(8000, help="Synthetic items."),
    epochs: int = typer.Option(6, help="Training epochs of RED-Rec (0 = baselines only)."),
    seed: int = typer.Option(0, help="Seed of the data, the split and the training."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """End to end: synthesise (or import --dataset), train RED-Rec, compare with zero-parameter baselines."""
    import time

    from redrec.baselines import MeanPoolScorer, PopularityScorer
    from redrec.config import from_dict, to_dict
    from redrec.data.stats import format_stats, store_stats
    from redrec.eval.protocols import evaluate
    from redrec.eval.report import format_table, write_json
    from redrec.train import load_train_config, make_split, train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        from redrec.data.redmmu import import_redmmu
        from redrec.data.synth import SynthConfig, write_synthetic

        scfg = from_dict(SynthConfig, {**to_dict(SynthConfig()), "n_users": users, "n_items": items, "seed": seed})
        typer.echo(f"[1/4] synthesising RED-MMU-shaped data: {users:,} users, {items:,} items -> {out / 'redmmu'}")
        write_synthetic(out / "redmmu", scfg)
        typer.echo(f"[2/4] importing into an event store -> {out / 'store'}")
        store = import_redmmu(out / "redmmu", out / "store", overwrite=True, progress=progress)
        typer.echo(format_stats(store_stats(store)))
        overrides: dict[str, Any] = {"protocol.name": "redrec", "protocol.target_scenario": "ads"}
        what = "protocol redrec, target scenario ads"
    else:
        from redrec.data.events import import_events

        if not (dataset / "events.csv.gz").exists() and not (dataset / "events.parquet").exists():
            raise RedrecError(f"{dataset}: no events.csv.gz or events.parquet (the neutral dataset layout)")
        typer.echo(f"[1/4] importing {dataset} -> {out / 'store'}")
        store = import_events(dataset, out / "store", overwrite=True, progress=progress)
        typer.echo(format_stats(store_stats(store)))
        overrides, what = _demo_dataset_overrides(store)
        typer.echo(f"[2/4] {what}")
    cfg = load_train_config(None, {
        **overrides, "store": str(out / "store"), "out": str(out / "run"), "seed": seed, "epochs": max(1, epochs),
        "protocol.seed": seed, "n_valid_users": min(200, store.n_users // 10), "resume": False, "progress": progress,
        "test_at_end": epochs > 0,
    })
    # mean-pooled history needs precomputed item vectors (the synthetic RED-MMU data has them)
    baselines = [PopularityScorer()] + ([MeanPoolScorer(cfg.mixing)] if store.vector_dim else [])
    split = make_split(store, cfg.protocol, cfg.n_valid_users, cfg.seed)
    typer.echo(f"[3/4] baselines on the {len(split.test):,} test users ({what.split(';')[0]})")
    results = [evaluate(store, split.test, s, cfg.protocol, progress=False, keep_per_user=False) for s in baselines]
    if epochs > 0:
        typer.echo(f"[4/4] training RED-Rec ({epochs} epochs) -> {out / 'run'}")
        summary = train(cfg)
        results.append(summary["test_result"])
    typer.echo("")
    typer.echo(format_table(results, style="plain"))
    write_json(out / "results.json", results)
    typer.echo(f"\nresults: {out / 'results.json'}   total {time.perf_counter() - t0:.0f} s")


def _demo_dataset_overrides(store: Any) -> tuple[dict[str, Any], str]:
    """Train-config overrides for ``redrec demo --dataset``: protocol, mixing and item tower from the data.

    One scenario: ``loo``, the last 50 events.  Several: ``redrec`` on the first scenario, 2-D mixing over 32.
    Items with a ``title``: the frozen all-MiniLM-L6-v2 text tower (mean pooling), plus a zero-initialised id
    embedding when fewer than 90% of the items have a title (items without text are then still told apart).
    No titles: the id tower.
    """
    import pyarrow.compute as pc

    ov: dict[str, Any] = {
        "model.user_tower.hidden_size": 64, "model.user_tower.num_layers": 2, "model.user_tower.num_heads": 2,
        "model.user_tower.num_kv_heads": 1, "model.user_tower.intermediate_size": 256,
        "batch_size": max(8, min(128, store.n_users // 8)),  # small datasets still get several steps per epoch
        "data.n_negatives": 1024, "optim.warmup_steps": 100,
    }
    if len(store.scenarios) == 1:
        ov.update({"protocol.name": "loo", "mixing.policy": "timestamp", "mixing.last_n": 50,
                   "data.window_mode": "last", "data.window": 3, "data.random_cutoff": 0.0})
        proto = "protocol loo (full ranking, history excluded)"
    else:
        ov.update({"protocol.name": "redrec", "protocol.target_scenario": store.scenarios[0], "mixing.policy": "2d",
                   "mixing.last_n": 32, "data.window": 3})
        proto = f"protocol redrec, target scenario {store.scenarios[0]}"
    if "title" in store.item_fields:
        col = store.items_table(["title"]).column(0)
        missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(col), ""), True)  # null or blank title
        coverage = 1.0 - (pc.sum(missing).as_py() or 0) / max(1, len(col))
        ov.update({"model.item_tower.kind": "text", "model.item_tower.text.model_path": "minilm",
                   "model.item_tower.text.fields": {"title": 200}, "model.item_tower.text.pooling": "mean",
                   "model.item_tower.text.max_tokens": 48, "model.item_tower.text.id_embedding": coverage < 0.9})
        tower = f"text item tower: all-MiniLM-L6-v2 over titles ({coverage:.0%} of items have one)" + (
            " + id embedding" if coverage < 0.9 else "")
    else:
        ov["model.item_tower.kind"] = "id"
        tower = "id item tower (the items have no titles)"
    return ov, f"{proto}; {tower}"


# --------------------------------------------------------------------------------------------------------------
# convert-reference
# --------------------------------------------------------------------------------------------------------------
@app.command("convert-reference")
@_clean_errors
def convert_reference_cmd(
    ckpt: Path = typer.Argument(..., help="RedSeqRec checkpoint: .bin/.pt, .safetensors, *.index.json, or a DeepSpeed ZeRO directory."),
    base_model: Path = typer.Option(..., "--base-model", help="Base Qwen2 directory of the item LLM (config.json + tokenizer), e.g. Qwen2.5-1.5B."),
    out: Path = typer.Option(..., "--out", "-o", help="Output redrec model directory (config.yaml, model.safetensors, reference_conversion.json)."),
    user_base_model: Path | None = typer.Option(None, "--user-base-model", help="Base directory of the user LLM (default: --base-model)."),
    store: Path | None = typer.Option(None, "--store", "-s", help="Event store the model is built for: its items (text fields title/content/ocr), scenarios and action flags."),
    tag: str | None = typer.Option(None, "--tag", help="DeepSpeed tag directory to read instead of the one 'latest' names."),
    strict: bool = typer.Option(True, "--strict/--no-strict", help="Fail on missing, unexpected or mis-shaped keys (default), or load anyway and list them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Load the published RedSeqRec checkpoint (Red-Mmu-Rec-Multiscene-Qwen2.5-1.5b) into a redrec model directory."""
    from redrec.model.reference_ckpt import convert_reference

    rep = convert_reference(ckpt, base_model, out, user_base_model_dir=user_base_model, store=store, strict=strict,
                            tag=tag, overwrite=overwrite)
    typer.echo(rep.summary())
    typer.echo(f"wrote {out} (key report: {out / 'reference_conversion.json'})")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
