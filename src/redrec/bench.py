"""Benchmarks: train and evaluate several models (or ablation variants) over several seeds, then aggregate.

    redrec bench run --dataset data/synth --preset mixing --seeds 3 --config configs/bench/synth.yaml -o bench/mixing
    redrec bench run --dataset stores/ml-1m --models popularity,redrec --config configs/bench/ml1m.yaml -o bench/ml1m
    redrec bench report bench/mixing bench/ml1m -o docs/results.md

A bench is a list of **variants**, each run once per seed on the same store under the same protocol:

* a *zero-parameter* model (``popularity``, ``meanpool``): evaluated, never trained;
* a *trained* variant: the base :class:`~redrec.train.TrainConfig` (``--config`` + ``--set``) plus the variant's
  dotted overrides, trained and tested by :func:`redrec.train.train`.  ``redrec`` is the base config itself; the
  trained baselines (``sasrec``, ``hstu``, ...) are :data:`redrec.baselines.MODEL_PRESETS`; the ablation presets
  (:data:`ABLATIONS`) expand to the paper's ablations.

Seed ``k`` sets ``TrainConfig.seed``: the initialisation, the batch order and negatives, *and* which users are
validation users (:func:`redrec.train.make_split`), so the test users of two seeds differ by the validation draw.
Every variant of one seed is tested on exactly the same cases, zero-parameter models included (they are evaluated
on each seed's split, so their spread is that of the test split alone).  The protocol's cutoffs
(``protocol.seed``) stay those of the base config.

Layout of the bench directory ``OUT``::

    OUT/store/                       the event store, when --dataset is a raw dataset folder (imported once)
    OUT/runs/<variant>/seed<k>/      a training run (config.yaml, model/, log.jsonl, results.json, ...) or, for a
                                     zero-parameter model, results.json; plus bench_run.json (the bench's record)
    OUT/bench_config.yaml            the resolved BenchConfig (``redrec bench run --bench-config`` reruns it)
    OUT/bench.json                   every per-seed result, the aggregates, the resolved configs, the machine
    OUT/metrics_at_k.png             HR@K and NDCG@K vs K per variant (error bars: std over seeds)
    OUT/training_curves.png          training loss and validation HR@10 vs step (mean over seeds)

A run whose ``results.json`` exists is skipped, so a killed bench continues where it stopped (an unfinished
training run resumes from its checkpoint).  A run directory made with a different config is an error, never
silently reused.  Tables, plots and the markdown report: :mod:`redrec.bench_report`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from redrec.bench_report import DEFAULT_TABLE_METRICS, write_plots
from redrec.config import load_config, save_yaml, to_dict
from redrec.data.store import EventStore
from redrec.errors import ConfigError, DataError
from redrec.eval.protocols import EvalResult, ProtocolConfig
from redrec.eval.run import ZERO_PARAMETER_MODELS
from redrec.mixing import POLICIES
from redrec.train import TrainConfig

#: the trained baseline presets another module provides (redrec.baselines.MODEL_PRESETS)
TRAINED_BASELINES = ("sasrec", "hstu", "hllm", "morec")
#: run-config fields that may change between a bench and its continuation (they do not change the result)
_RESUME_INSENSITIVE = ("progress", "resume", "num_threads")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")

Log = Callable[[str], None]


def model_presets() -> dict[str, dict[str, Any]]:
    """``redrec.baselines.MODEL_PRESETS`` (trained baselines as dotted TrainConfig overrides), or ``{}`` when this
    installation does not define it yet."""
    try:
        from redrec.baselines import MODEL_PRESETS  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return dict(MODEL_PRESETS)


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One row of a bench.

    Attributes:
        name: row name and run directory name (letters, digits, ``_ . + -``).
        overrides: dotted :class:`TrainConfig` overrides on top of the base config (trained variants).
        zero_parameter: ``popularity`` or ``meanpool``: evaluated on each seed's test cases, not trained.
        pinned: the overrides are what an ablation compares: a bench-wide ``--set`` of the same field is an error
            (otherwise ``--set`` comes after the variant's overrides, as for the trained baseline presets).
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    zero_parameter: str | None = None
    pinned: bool = False

    @property
    def kind(self) -> str:
        return "zero-param" if self.zero_parameter else "trained"


@dataclass
class BenchConfig:
    """What ``redrec bench run`` runs (YAML-loadable; the command-line flags override the file).

    Attributes:
        dataset: an event store directory, or a raw dataset folder (``events.csv[.gz]``/``events.parquet`` +
            ``items.csv``, or RED-MMU parquet as written by ``redrec data synth``) imported once into ``OUT/store``.
        out: the bench directory (see the module docstring).
        config: base TrainConfig YAML (``configs/bench/*.yaml``); ``None`` = the TrainConfig defaults.
        overrides: dotted TrainConfig overrides applied to every variant (``--set``; after a trained baseline
            preset's own overrides; an error on a field an ablation preset varies).
        protocol: ProtocolConfig fields applied to every variant (e.g. ``{name: redrec, target_scenario: food}``).
        preset: an ablation preset of :data:`ABLATIONS` (``cross_scenario``, ``mixing``, ``interests``,
            ``seq_len``, ``baselines``).
        models: further variants by name: ``popularity``, ``meanpool``, ``redrec``, a trained baseline preset
            (``sasrec``, ``hstu``, ``hllm``, ``morec``) or a key of ``variants``.
        variants: ad-hoc trained variants ``{name: {dotted key: value}}``; all of them run.
        seeds: number of seeds; seeds ``first_seed .. first_seed + seeds - 1``.
        first_seed: the first seed.
        table_metrics: metric columns of the printed table.
        progress: show each run's training / evaluation progress bars.
    """

    dataset: str = ""
    out: str = "bench_out"
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    models: list[str] = field(default_factory=list)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: int = 3
    first_seed: int = 0
    table_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_TABLE_METRICS))
    progress: bool = False

    def validate(self, source: str | None = None) -> None:
        if not self.dataset:
            raise ConfigError(source, "dataset", "no dataset given (an event store or a dataset folder: --dataset PATH)")
        if self.seeds < 1:
            raise ConfigError(source, "seeds", f"must be >= 1, got {self.seeds}")
        if self.first_seed < 0:
            raise ConfigError(source, "first_seed", f"must be >= 0, got {self.first_seed}")
        if self.preset is not None and self.preset not in ABLATIONS:
            raise ConfigError(source, "preset", f"unknown preset {self.preset!r}; known: {', '.join(ABLATIONS)}")
        if self.preset is None and not self.models and not self.variants:
            raise ConfigError(source, "models", "nothing to run: give a preset (--preset), models (--models) or variants")
        for name in self.variants:
            if not _NAME_RE.match(name):
                raise ConfigError(source, f"variants.{name}", "variant names may hold letters, digits and _ . + - only")
            if name in (*ZERO_PARAMETER_MODELS, "redrec"):
                raise ConfigError(source, f"variants.{name}", f"{name!r} is a built-in model; pick another name")
        known = known_models(self)
        for i, m in enumerate(self.models):
            if m not in known:
                if m in TRAINED_BASELINES:
                    raise ConfigError(source, f"models[{i}]", f"model {m!r} is a trained baseline preset of "
                                      "redrec.baselines.MODEL_PRESETS, which this installation does not define")
                raise ConfigError(source, f"models[{i}]", f"unknown model {m!r}; known: {', '.join(known)}")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


def known_models(cfg: BenchConfig | None = None) -> list[str]:
    """Model names ``--models`` accepts (the trained baselines only once MODEL_PRESETS exists)."""
    names = [*ZERO_PARAMETER_MODELS, "redrec", *model_presets(), *((cfg.variants if cfg else {}) or {})]
    return list(dict.fromkeys(names))


def load_bench_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                      train_overrides: dict[str, Any] | None = None) -> BenchConfig:
    """A BenchConfig from YAML (or the defaults) with BenchConfig-field ``overrides``; ``train_overrides`` (the
    ``--set`` values) are merged into the file's ``overrides`` rather than replacing them."""
    cfg = load_config(BenchConfig, path, overrides)
    if train_overrides:
        cfg.overrides = {**cfg.overrides, **train_overrides}
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# ablation presets
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ablation:
    """A named ablation: a function from the base config and the store to the variants it compares.

    Attributes:
        name: the preset name (``--preset``).
        description: what is compared (shown in the report).
        reference: the variant the automatic reading compares the others with.
        expand: ``(base TrainConfig, store) -> variants``.
    """

    name: str
    description: str
    reference: str
    expand: Callable[[TrainConfig, EventStore], list[Variant]]


def _budget(base: TrainConfig) -> int:
    """Total input events of the base mixing (its quotas' sum, else ``last_n``)."""
    return sum(base.mixing.quotas.values()) if base.mixing.quotas else base.mixing.last_n


def _scaled_quotas(quotas: dict[str, int], n: int) -> dict[str, int]:
    """``quotas`` scaled to sum to ``n`` (rounded; the largest absorbs the rounding)."""
    total = sum(quotas.values())
    out = {s: int(round(q * n / total)) for s, q in quotas.items()}
    big = max(out, key=lambda s: out[s])
    out[big] += n - sum(out.values())
    return out


def _cross_scenario(base: TrainConfig, store: EventStore) -> list[Variant]:
    proto = base.protocol.resolved(store)
    if proto.name != "redrec":
        raise ConfigError(None, "protocol.name", f"the cross_scenario preset evaluates one target scenario and needs "
                          f"protocol 'redrec', got {proto.name!r}")
    if len(store.scenarios) < 2:
        raise DataError(store.path, "scenario", f"the cross_scenario preset needs >= 2 scenarios; the store has {store.scenarios}")
    if base.mixing.policy == "timestamp":
        raise ConfigError(None, "mixing.policy", "the cross_scenario preset needs a quota policy (2d, naive, 1d_*), not 'timestamp'")
    target = str(proto.target_scenario)
    return [
        Variant("popularity", zero_parameter="popularity"),
        Variant(f"single_{target}", {"mixing.quotas": {target: _budget(base)}}),
        Variant("cross", {}),
    ]


def _mixing(base: TrainConfig, store: EventStore) -> list[Variant]:
    out = []
    for p in POLICIES:
        ov: dict[str, Any] = {"mixing.policy": p}
        if p == "timestamp" and base.mixing.quotas:
            ov["mixing.last_n"] = _budget(base)  # the same number of input events as the quota policies
        out.append(Variant(p, ov))
    return out


def _interests(base: TrainConfig, store: EventStore) -> list[Variant]:
    k = base.model.user_tower.queries_per_scenario
    if k < 2:
        raise ConfigError(None, "model.user_tower.queries_per_scenario", f"the interests preset compares K = {k} "
                          "with K = 1 and needs K >= 2 in the base config")
    out = [Variant("multi_interest", {}), Variant("single_interest", {"model.user_tower.queries_per_scenario": 1})]
    if hasattr(base.model.user_tower, "query_scope"):  # one query tied to no scenario: one vector for everything
        out.append(Variant("single_shared", {"model.user_tower.queries_per_scenario": 1,
                                             "model.user_tower.query_scope": "shared"}))
    return out


def _seq_len(base: TrainConfig, store: EventStore) -> list[Variant]:
    out = []
    for n in (32, 64, 128):
        ov: dict[str, Any] = {"mixing.last_n": n}
        if base.mixing.quotas:
            ov["mixing.quotas"] = _scaled_quotas(base.mixing.quotas, n)
        out.append(Variant(f"seq{n}", ov))
    return out


def _baselines(base: TrainConfig, store: EventStore) -> list[Variant]:
    presets = {n: ov for n, ov in model_presets().items() if n != "redrec"}
    if not presets:
        raise ConfigError(None, "preset", "the baselines preset needs redrec.baselines.MODEL_PRESETS (sasrec, hstu, "
                          "hllm, morec), which this installation does not define")
    out = [Variant("popularity", zero_parameter="popularity")]
    if store.vector_dim:
        out.append(Variant("meanpool", zero_parameter="meanpool"))
    for n, ov in presets.items():
        tc = dict(ov)
        if tc.get("model.item_tower.kind", base.model.item_tower.kind) == "features" and not store.vector_dim:
            continue  # e.g. MoRec: content vectors, which this store does not have (resolve_variants says so)
        out.append(Variant(n, tc))
    return [*out, Variant("redrec", {})]


ABLATIONS: dict[str, Ablation] = {a.name: a for a in (
    Ablation("cross_scenario", "single-scenario input (the target scenario's events only, same budget) vs "
             "cross-scenario input, evaluated on the target scenario (paper Table 2)", "cross", _cross_scenario),
    Ablation("mixing", "mixing policies: 2d (quotas + chronological merge + 2-D PEs) vs timestamp, naive, "
             "1d_position, 1d_timestamp (paper Table 3, bottom)", "2d", _mixing),
    Ablation("interests", "multi-interest (the base config's K queries per scenario) vs single-interest: one "
             "query per scenario (one user vector per target scenario) or one shared query (one vector for all) "
             "(paper Table 3, top)", "multi_interest", _interests),
    Ablation("seq_len", "input sequence length 32 / 64 / 128 (quotas scaled alike) (paper Table 3, top)", "seq128", _seq_len),
    Ablation("baselines", "zero-parameter floors and trained baselines (MODEL_PRESETS) vs RED-Rec", "redrec", _baselines),
)}


def resolve_variants(cfg: BenchConfig, base: TrainConfig, store: EventStore, log: Log | None = None) -> list[Variant]:
    """The preset's variants, then ``models``, then the ad-hoc ``variants`` (each name once)."""
    out: list[Variant] = []
    if cfg.preset:
        out += [dataclasses.replace(v, pinned=cfg.preset != "baselines") for v in ABLATIONS[cfg.preset].expand(base, store)]
        if cfg.preset == "baselines" and log:
            left = [n for n in ("meanpool", *model_presets()) if n != "redrec" and all(v.name != n for v in out)]
            if left:
                log(f"note: the store {store.path} has no item vectors: {', '.join(left)} left out of the baselines")
    presets = model_presets()
    names = list(cfg.models) + [n for n in cfg.variants if n not in cfg.models]
    for m in names:
        if m in ZERO_PARAMETER_MODELS:
            if m == "meanpool" and not store.vector_dim:
                raise ConfigError(None, "models", f"meanpool needs item vectors and the store {store.path} has none")
            v = Variant(m, zero_parameter=m)
        elif m == "redrec":
            v = Variant("redrec", {})
        elif m in cfg.variants:
            v = Variant(m, dict(cfg.variants[m]))
        else:
            v = Variant(m, dict(presets[m]))
        if any(o.name == v.name for o in out):
            if log:
                log(f"note: {v.name!r} is already a variant of preset {cfg.preset!r}; running it once")
            continue
        out.append(v)
    return out


# ----------------------------------------------------------------------------------------------------------------
# store, configs, machine
# ----------------------------------------------------------------------------------------------------------------
def prepare_store(dataset: str | Path, out: Path, log: Log = print) -> Path:
    """The event store of ``dataset``: the directory itself when it is a store, else ``out/store``, imported from
    the raw folder once (a later call with the same folder reuses it)."""
    src = Path(dataset)
    if (src / "meta.json").exists():
        return src
    if not src.exists():
        raise DataError(src, None, "no such dataset (expected an event store or a dataset folder)")
    names = [p.name for p in src.iterdir()] if src.is_dir() else []
    if any(n.startswith("multiscene_lastn") for n in names):
        fmt = "redmmu"
    elif any(n.startswith("events.") for n in names):
        fmt = "events"
    else:
        raise DataError(src, None, "neither an event store (meta.json) nor a dataset folder (events.csv[.gz] / "
                        "events.parquet, or RED-MMU multiscene_lastn*.parquet)", hint="`redrec data import` other formats first")
    store, stamp = out / "store", out / "store_source.json"
    source = {"dataset": str(src.resolve()), "format": fmt}
    if (store / "meta.json").exists():
        old = json.loads(stamp.read_text()) if stamp.exists() else None
        if old != source:
            raise DataError(store, None, f"this bench directory's store was imported from {old and old['dataset']}, "
                            f"not {source['dataset']}", hint="use another --out")
        return store
    log(f"importing {src} ({fmt}) -> {store}")
    if fmt == "redmmu":
        from redrec.data.redmmu import import_redmmu

        import_redmmu(src, store, overwrite=True, progress=False)
    else:
        from redrec.data.events import import_events

        import_events(src, store, overwrite=True, progress=False)
    stamp.write_text(json.dumps(source, indent=2) + "\n")
    return store


def train_config(cfg: BenchConfig, variant: Variant | None, seed: int, store: Path) -> TrainConfig:
    """The TrainConfig of one run: base YAML <- the variant's overrides <- ``overrides`` (``--set``) <- ``protocol``
    <- the bench's own fields (store, run directory, seed, resume, test at the end).

    Raises:
        ConfigError: a bad field (naming the variant), or a ``--set`` of a field a pinned (ablation) variant sets.
    """
    name = variant.name if variant else "base"
    bench_ov = {**cfg.overrides, **{f"protocol.{k}": v for k, v in cfg.protocol.items()}}
    if variant is not None and variant.pinned:
        for k in bench_ov:
            hit = next((o for o in variant.overrides if k == o or o.startswith(k + ".") or k.startswith(o + ".")), None)
            if hit:
                raise ConfigError(None, f"overrides.{k}", f"--set {k} would override {hit}, which bench variant "
                                  f"{name!r} of preset {cfg.preset!r} varies; leave it out")
    ov = {**(variant.overrides if variant else {}), **bench_ov,
          "store": str(store), "out": str(Path(cfg.out) / "runs" / name / f"seed{seed}"), "seed": seed,
          "resume": True, "test_at_end": True, "progress": cfg.progress}
    try:
        return load_config(TrainConfig, cfg.config, ov)
    except ConfigError as e:
        if variant is None:
            raise
        raise ConfigError(e.source, e.field, f"{e.problem} (in bench variant {variant.name!r})") from None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU, versions and the git commit of the code (where available)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    commit = None
    try:
        repo = Path(__file__).resolve().parents[2]
        r = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5)
        commit = r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    from redrec import __version__

    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "redrec": __version__, "git": commit,
    }


# ----------------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------------
def _config_diff(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted field where two plain config dicts differ (paths compared resolved), else None.  A field
    only one side has (added or removed by a code change since the run) is not a difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) & set(b), key=str):
            if not prefix and k in _RESUME_INSENSITIVE:
                continue
            d = _config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    if prefix in ("store.", "out.") and isinstance(a, str) and isinstance(b, str):
        a, b = str(Path(a).resolve()), str(Path(b).resolve())
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} here, {b!r} in the run directory"


def _check_same_config(run_dir: Path, tc: TrainConfig) -> None:
    """Refuse to continue a run directory made with another config (its results would be mixed in)."""
    old: Any = None
    rec, yml = run_dir / "bench_run.json", run_dir / "config.yaml"
    if rec.exists():
        old = json.loads(rec.read_text()).get("config")
    elif yml.exists():
        import yaml

        old = yaml.safe_load(yml.read_text())
    if old is None:
        return
    diff = _config_diff(to_dict(tc), old)
    if diff:
        raise ConfigError(run_dir, diff.split(":")[0], f"this run directory was made with another config ({diff}); "
                          "use another --out or delete the directory")


#: curves kept from a run's log.jsonl: {curve name: log key}
CURVES = {"loss": "loss", "loss_next": "loss_next", "valid_hr@10": "valid/hr@10"}


def _curves(run_dir: Path) -> dict[str, dict[str, list[float]]]:
    """``{curve: {"step": [...], "value": [...]}}`` of :data:`CURVES` from a run's ``log.jsonl``."""
    out: dict[str, dict[str, list[float]]] = {c: {"step": [], "value": []} for c in CURVES}
    log = run_dir / "log.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        for c, key in CURVES.items():
            v = r.get(key)
            if isinstance(v, (int, float)) and v == v:
                out[c]["step"].append(r["step"])
                out[c]["value"].append(float(v))
    return out


def _load_avg() -> float | None:
    """The host's 1-minute load average (wall times on a shared host include waiting for other jobs)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _record(variant: Variant, seed: int, run_dir: Path, out: Path, result: EvalResult, wall: float,
            train_seconds: float | None, steps: int | None, skipped: bool, load_avg: float | None) -> dict[str, Any]:
    return {
        "variant": variant.name, "kind": variant.kind, "seed": seed, "dir": str(run_dir.relative_to(out)),
        "skipped": skipped, "wall_time_s": wall, "load_avg": load_avg, "train_seconds": train_seconds,
        "eval_seconds": result.wall_time_s,
        "steps": steps, "n_users": result.n_users, "pool": result.pool, "pool_size": result.pool_size,
        "pool_description": result.pool_description, "exclude_history": result.exclude_history,
        "protocol": result.protocol, "ks": list(result.ks), "metrics": dict(result.metrics),
        "curves": _curves(run_dir) if variant.kind == "trained" else None,
    }


def run_one(variant: Variant, seed: int, tc: TrainConfig, store: EventStore, out: Path) -> dict[str, Any]:
    """Train (or evaluate) one variant for one seed, or read the finished run back; returns its record."""
    from redrec.eval.report import read_json, write_json

    run_dir = Path(tc.out)
    _check_same_config(run_dir, tc)  # run_bench checked before the first run; a direct call checks here
    results = run_dir / "results.json"
    if results.exists():
        result = read_json(results)[0]
        rec_path = run_dir / "bench_run.json"
        old = json.loads(rec_path.read_text()) if rec_path.exists() else {}
        summ_path = run_dir / "summary.json"
        summ = json.loads(summ_path.read_text()) if summ_path.exists() else {}
        wall = old.get("wall_time_s", summ.get("train_seconds", 0.0) + result.wall_time_s)
        return _record(variant, seed, run_dir, out, result, wall, old.get("train_seconds", summ.get("train_seconds")),
                       old.get("steps", summ.get("steps")), skipped=True, load_avg=old.get("load_avg"))

    t0 = time.perf_counter()
    train_seconds: float | None = None
    steps: int | None = None
    if variant.zero_parameter:
        from redrec.baselines import MeanPoolScorer, PopularityScorer
        from redrec.eval.protocols import evaluate
        from redrec.train import make_split

        split = make_split(store, tc.protocol, tc.n_valid_users, tc.seed)
        scorer = PopularityScorer() if variant.zero_parameter == "popularity" else MeanPoolScorer(tc.mixing)
        proto = ProtocolConfig(**{**to_dict(tc.protocol), "max_users": None})  # the split already subsampled
        result = evaluate(store, split.test, scorer, proto, progress=tc.progress, name=variant.name, keep_per_user=False)
        result.config = {**result.config, "train": to_dict(tc)}
        write_json(results, [result])
    else:
        from redrec.train import train

        summary = train(tc)
        if not results.exists():
            raise DataError(run_dir, "results.json", "training finished without test results (no test users?)")
        result = read_json(results)[0]
        train_seconds, steps = float(summary["train_seconds"]), int(summary["steps"])
    wall, load = time.perf_counter() - t0, _load_avg()
    result.model = variant.name
    (run_dir / "bench_run.json").write_text(json.dumps({
        "variant": variant.name, "seed": seed, "kind": variant.kind, "wall_time_s": wall, "load_avg": load,
        "train_seconds": train_seconds, "steps": steps, "config": to_dict(tc)}, indent=2) + "\n")
    return _record(variant, seed, run_dir, out, result, wall, train_seconds, steps, skipped=False, load_avg=load)


# ----------------------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1; None for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant (in order of appearance): seeds, mean and sample std of every metric and of the wall time,
    the test users of each seed, and the mean training curves over the seeds."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["variant"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in by.items():
        metrics = [m for m in rs[0]["metrics"] if all(m in r["metrics"] for r in rs)]
        stats = {m: _mean_std([r["metrics"][m] for r in rs]) for m in metrics}
        wall = _mean_std([r["wall_time_s"] for r in rs])
        out[name] = {
            "kind": rs[0]["kind"], "n": len(rs), "seeds": [r["seed"] for r in rs],
            "mean": {m: s[0] for m, s in stats.items()}, "std": {m: s[1] for m, s in stats.items()},
            "wall_time_s": {"mean": wall[0], "std": wall[1]},
            "n_users": sorted({r["n_users"] for r in rs}),
            "curves": _mean_curves([r["curves"] for r in rs if r.get("curves")]),
        }
    return out


def _mean_curves(curves: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per curve, the mean over the runs at the steps that every run logged."""
    if not curves:
        return None
    out = {}
    for c in CURVES:
        series = [dict(zip(r[c]["step"], r[c]["value"], strict=True)) for r in curves if r.get(c)]
        steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
        out[c] = {"step": steps, "value": [float(np.mean([s[t] for s in series])) for t in steps]}
    return out


# ----------------------------------------------------------------------------------------------------------------
# the bench
# ----------------------------------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, *, command: str | None = None, log: Log = print) -> dict[str, Any]:
    """Run every variant x seed of ``cfg`` (finished runs are read back), aggregate, write ``OUT/bench.json`` and
    the plots; returns the bench dict (what ``bench.json`` holds).

    Every run's config is built (and checked) before the first run starts, so a bad variant fails at once.
    """
    cfg.validate()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = prepare_store(cfg.dataset, out, log)
    store = EventStore(store_path)
    base = train_config(cfg, None, cfg.first_seed, store_path)
    protocol = base.protocol.resolved(store)
    variants = resolve_variants(cfg, base, store, log)
    plan = [(v, s, train_config(cfg, v, s, store_path)) for s in cfg.seed_list for v in variants]
    from redrec.train import resolve_model_config

    for v, _, tc in plan[: len(variants)]:
        if not v.zero_parameter:
            try:
                resolve_model_config(tc, store)
            except ConfigError as e:
                raise ConfigError(e.source, e.field, f"{e.problem} (in bench variant {v.name!r})") from None
    for _, _, tc in plan:
        _check_same_config(Path(tc.out), tc)
    save_yaml(cfg, out / "bench_config.yaml")

    bench: dict[str, Any] = {
        "command": command or f"redrec bench run --bench-config {out / 'bench_config.yaml'}",
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "dataset": cfg.dataset, "dataset_name": Path(cfg.dataset).resolve().name, "store": str(store_path),
        "store_stats": {"n_users": store.n_users, "n_items": store.n_items, "n_events": store.n_events,
                        "scenarios": list(store.scenarios), "item_vectors": store.vector_dim or None},
        "preset": cfg.preset,
        "description": ABLATIONS[cfg.preset].description if cfg.preset else None,
        "reference": ABLATIONS[cfg.preset].reference if cfg.preset else None,
        "seeds": cfg.seed_list, "protocol": to_dict(protocol), "ks": list(protocol.ks),
        "machine": {**machine_info(), "num_threads": base.num_threads or None},
        "bench_config": to_dict(cfg), "base_config": to_dict(base),
        "variants": [{"name": v.name, "kind": v.kind, "zero_parameter": v.zero_parameter, "overrides": v.overrides,
                      "config": to_dict(tc)} for v, _, tc in plan[: len(variants)]],
        "runs": [], "aggregates": {},
    }
    log(f"bench: {len(variants)} variants x {cfg.seeds} seeds = {len(plan)} runs -> {out}")
    for i, (v, seed, tc) in enumerate(plan, 1):
        rec = run_one(v, seed, tc, store, out)
        bench["runs"].append(rec)
        bench["aggregates"] = aggregate(bench["runs"])
        bench["total_wall_time_s"] = time.perf_counter() - t_start
        _write_json(out / "bench.json", bench)
        m = rec["metrics"]
        how = "done before, read back" if rec["skipped"] else f"{rec['wall_time_s']:.0f} s"
        log(f"[{i}/{len(plan)}] {v.name} seed {seed}: hr@10 {m.get('hr@10', float('nan')):.4f}, "
            f"ndcg@10 {m.get('ndcg@10', float('nan')):.4f}, mrr {m.get('mrr', float('nan')):.4f} ({how})")
    bench["plots"] = write_plots(bench, out)
    bench["total_wall_time_s"] = time.perf_counter() - t_start
    bench["run_wall_time_s"] = float(sum(r["wall_time_s"] for r in bench["runs"]))
    bench["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    _write_json(out / "bench.json", bench)
    return bench


def _write_json(path: Path, data: Any) -> None:
    """Strict JSON (NaN / inf become null), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_plain(data), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def _plain(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, (np.integer, np.floating)):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def argv_command() -> str | None:
    """The command line of this process as ``redrec ...`` when it is the redrec CLI, else None."""
    prog = Path(sys.argv[0]) if sys.argv else Path()
    if prog.name == "redrec" or (prog.name == "cli.py" and prog.parent.name == "redrec"):  # or python -m redrec.cli
        import shlex

        return shlex.join(["redrec", *sys.argv[1:]])
    return None
