"""Evaluation protocols: which events are a user's input, which items are its targets, which items compete.

Three named protocols (DESIGN.md section 4); every printed number names its protocol:

``redrec`` (paper section 4.3)
    Per user, a random (seeded) cutoff ``p`` chosen uniformly among the positions of the user's
    target-scenario events with ``p >= min_history``.  Input = all events before ``p`` (every scenario);
    targets = the next ``n_targets`` target-scenario events from ``p`` on (deduplicated; fewer when the user has
    fewer left).  The whole item pool competes; the history is *not* excluded by default (the paper re-recommends).
``loo`` (leave-one-out: SASRec / HSTU / HLLM literature)
    Test: the last event is the target, the events before it the input; ``split="valid"``: the second to last
    event is the target and the events before it the input.  Full ranking with the user's input items excluded,
    except that a target item is never excluded (a re-consumed item stays rankable: excluding it would make the
    case unwinnable).  ``target_scenario`` is ignored (the last event of any scenario).
``reference`` (RedSeqRec ``eval/eval.py``)
    Needs a store whose events carry the source's target flag (the reference-json importer).  Input = the user's
    non-target events, targets = the items of its target events (deduplicated); users without a target are
    skipped.  History not excluded; the reference ranks a top-1000 list, so every metric (MRR included) counts
    only ranks <= 1000.

:func:`make_cases` turns a store into :class:`EvalCase` s; :func:`case_sequence` is the one way to build a case's
model input (it calls :func:`redrec.mixing.mix`, as training and serving do); :func:`evaluate` scores the cases
with any :class:`Scorer` and computes exact-rank metrics (:mod:`redrec.eval.metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from redrec.config import to_dict
from redrec.data.store import EventStore, UserEvents
from redrec.errors import ConfigError, DataError
from redrec.eval.metrics import (
    DEFAULT_KS,
    compute_metrics,
    mean_metrics,
    pad_ragged,
    rank_of_targets,
    unique_in_order,
)
from redrec.mixing import MixedSequence, MixingConfig, mix

PROTOCOLS: tuple[str, ...] = ("redrec", "loo", "reference")
REFERENCE_LIST_SIZE = 1000  #: RedSeqRec's eval.py ranks a top-1000 list


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ProtocolConfig:
    """How cases are drawn and scored.

    Attributes:
        name: ``redrec``, ``loo`` or ``reference`` (see the module docstring).
        target_scenario: ``redrec`` only: the scenario whose next events are the targets
            (default ``"ads"`` when the store has it, else the store's first scenario).
        n_targets: ``redrec``: target events per user (before deduplication).
        min_history: the fewest input events a case may have (users below it are skipped).
        seed: seeds the ``redrec`` cutoffs, the user subsample and the sampled pools.
        pool: ``full`` (every item competes) or ``sampled`` (targets + ``n_sampled`` random non-target items).
        n_sampled: sampled-pool size besides the targets.
        exclude_history: drop the user's input items from the candidates (targets excepted).
            ``None``: True for ``loo``, False for ``redrec`` and ``reference``.
        ks: cut-offs K of HR@K / NDCG@K.
        max_users: evaluate a seeded random subset of at most this many eligible users.
        split: ``loo`` only: ``test`` (last event) or ``valid`` (second to last).
        target_items: a file of item ids (one per line) that restricts the cases by their targets, e.g. the
            ``cold_items.txt`` of a cold-start split (:mod:`redrec.data.splits`).
        target_items_mode: ``include``: keep the cases whose targets are all listed (cold items);
            ``exclude``: keep the cases whose targets are none of them (warm items).
    """

    name: Literal["redrec", "loo", "reference"] = "loo"
    target_scenario: str | None = None
    n_targets: int = 3
    min_history: int = 1
    seed: int = 0
    pool: Literal["full", "sampled"] = "full"
    n_sampled: int = 1000
    exclude_history: bool | None = None
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    max_users: int | None = None
    split: Literal["test", "valid"] = "test"
    target_items: str | None = None
    target_items_mode: Literal["include", "exclude"] = "include"

    def validate(self, source: str | None = None) -> None:
        if self.name not in PROTOCOLS:
            raise ConfigError(source, "name", f"must be one of {list(PROTOCOLS)}, got {self.name!r}")
        if self.n_targets < 1:
            raise ConfigError(source, "n_targets", f"must be >= 1, got {self.n_targets}")
        if self.min_history < 0:
            raise ConfigError(source, "min_history", f"must be >= 0, got {self.min_history}")
        if self.pool not in ("full", "sampled"):
            raise ConfigError(source, "pool", f"must be 'full' or 'sampled', got {self.pool!r}")
        if self.n_sampled < 1:
            raise ConfigError(source, "n_sampled", f"must be >= 1, got {self.n_sampled}")
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise ConfigError(source, "ks", f"must be a non-empty list of positive integers, got {self.ks!r}")
        if self.max_users is not None and self.max_users < 1:
            raise ConfigError(source, "max_users", f"must be >= 1 or null, got {self.max_users}")
        if self.split not in ("test", "valid"):
            raise ConfigError(source, "split", f"must be 'test' or 'valid', got {self.split!r}")
        if self.target_items_mode not in ("include", "exclude"):
            raise ConfigError(source, "target_items_mode", f"must be 'include' or 'exclude', got {self.target_items_mode!r}")

    def resolved(self, store: EventStore) -> ProtocolConfig:
        """A copy with the defaults that depend on the store filled in (target scenario, history exclusion).

        Raises:
            ConfigError: invalid values, or a target scenario the store does not have.
            DataError: ``reference`` on a store without target flags.
        """
        self.validate()
        scen = self.target_scenario
        if scen is None and self.name == "redrec":
            scen = "ads" if "ads" in store.scenarios else store.scenarios[0]
        if scen is not None and scen not in store.scenarios:
            raise ConfigError(None, "target_scenario", f"unknown scenario {scen!r}; the store has {store.scenarios}")
        if self.name == "reference" and store.target is None:
            raise DataError(
                store.path, "target",
                "the reference protocol needs events flagged as held-out targets, and this store has none",
                hint="import the reference user_lastn.json with `redrec data import` (reference-json adapter)",
            )
        excl = self.exclude_history if self.exclude_history is not None else self.name == "loo"
        return dataclasses.replace(self, target_scenario=scen, exclude_history=excl, ks=[int(k) for k in self.ks])

    @property
    def list_size(self) -> int | None:
        """Length of the ranked list the protocol reads metrics from (``None`` = the whole pool)."""
        return REFERENCE_LIST_SIZE if self.name == "reference" else None


# ---------------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EvalCase:
    """One user's prediction point.

    Attributes:
        user: user index in the store.
        cutoff: events ``[0, cutoff)`` of the user are the input (the future starts at ``cutoff``).
        t_now: prediction time: the timestamp of the first target event.
        targets: int64 unique target item indices (order of first occurrence).
        history_positions: int64 sorted input event positions when the input is not simply ``[0, cutoff)``
            (``reference``: the non-target events); all are ``< cutoff``.
    """

    user: int
    cutoff: int
    t_now: int
    targets: np.ndarray
    history_positions: np.ndarray | None = None

    def input_positions(self) -> np.ndarray:
        """int64 positions of the input events (the eligible history)."""
        if self.history_positions is not None:
            return np.asarray(self.history_positions, dtype=np.int64)
        return np.arange(self.cutoff, dtype=np.int64)

    @property
    def n_input(self) -> int:
        return len(self.history_positions) if self.history_positions is not None else int(self.cutoff)


def make_cases(store: EventStore, cfg: ProtocolConfig) -> list[EvalCase]:
    """The evaluation cases of ``store`` under ``cfg``, sorted by user index (see the module docstring).

    Users without a valid case (too short, no target-scenario event after ``min_history``, no target flag) are
    skipped.  With ``max_users`` a seeded random subset of the eligible users is kept.  Deterministic given
    ``cfg.seed``; a user's ``redrec`` cutoff depends only on the seed and the user index.
    """
    cfg = cfg.resolved(store)
    n_users = store.n_users
    if cfg.max_users is not None and cfg.max_users < n_users:
        order: np.ndarray = np.random.default_rng([cfg.seed, 1]).permutation(n_users)
    else:
        order = np.arange(n_users)
    limit = cfg.max_users if cfg.max_users is not None else n_users
    full = n_users if cfg.target_items else limit  # a target filter is applied before the user limit

    if cfg.name == "loo":
        cases = _loo_cases(store, cfg, order, full)
    elif cfg.name == "redrec":
        cases = _collect(order, full, _redrec_case_fn(store, cfg))
    else:
        cases = _collect(order, full, _reference_case_fn(store, cfg))
    if cfg.target_items:
        from redrec.data.splits import read_item_list

        listed = read_item_list(cfg.target_items, store)
        want = cfg.target_items_mode == "include"
        cases = [c for c in cases if (np.isin(c.targets, listed).all() if want else not np.isin(c.targets, listed).any())]
        rank = np.empty(n_users, np.int64)
        rank[order] = np.arange(len(order))
        cases = sorted(cases, key=lambda c: rank[c.user])[:limit]
    cases.sort(key=lambda c: c.user)
    return cases


def _collect(order: np.ndarray, limit: int, case_fn) -> list[EvalCase]:
    cases: list[EvalCase] = []
    for u in order:
        c = case_fn(int(u))
        if c is not None:
            cases.append(c)
            if len(cases) >= limit:
                break
    return cases


def _loo_cases(store: EventStore, cfg: ProtocolConfig, order: np.ndarray, limit: int) -> list[EvalCase]:
    back = 1 if cfg.split == "test" else 2  # the target is the back-th event from the end
    offs = np.asarray(store.offsets, dtype=np.int64)
    n = np.diff(offs)
    cutoff = n - back
    ok = (cutoff >= cfg.min_history) & (cutoff >= 0)
    chosen = order[ok[order]][:limit]
    pos = offs[chosen] + cutoff[chosen]  # global index of each target event
    items = np.asarray(store.item[pos], dtype=np.int64) if pos.size else np.zeros(0, np.int64)
    ts = np.asarray(store.timestamp[pos], dtype=np.int64) if pos.size else np.zeros(0, np.int64)
    return [
        EvalCase(int(u), int(cutoff[u]), int(t), np.array([it], dtype=np.int64))
        for u, it, t in zip(chosen, items, ts, strict=True)
    ]


def _redrec_case_fn(store: EventStore, cfg: ProtocolConfig):
    s = store.scenario_index(cfg.target_scenario)  # type: ignore[arg-type]
    draws = np.random.default_rng([cfg.seed, 0]).random(store.n_users)  # one uniform number per user index
    offs = store.offsets

    def case(u: int) -> EvalCase | None:
        a, b = int(offs[u]), int(offs[u + 1])
        tpos = np.flatnonzero(np.asarray(store.scenario[a:b]) == s)  # target-scenario event positions
        first = int(np.searchsorted(tpos, cfg.min_history))  # candidates p >= min_history
        m = len(tpos) - first
        if m <= 0:
            return None
        j = first + min(int(draws[u] * m), m - 1)
        p = int(tpos[j])
        tgt = tpos[j : j + cfg.n_targets]
        items = unique_in_order(np.asarray(store.item[a + tgt]))
        return EvalCase(u, p, int(store.timestamp[a + p]), items)

    return case


def _reference_case_fn(store: EventStore, cfg: ProtocolConfig):
    offs = store.offsets
    flags = store.target
    assert flags is not None

    def case(u: int) -> EvalCase | None:
        a, b = int(offs[u]), int(offs[u + 1])
        is_t = np.asarray(flags[a:b]) != 0
        tpos = np.flatnonzero(is_t)
        hist = np.flatnonzero(~is_t).astype(np.int64)
        if tpos.size == 0 or hist.size < cfg.min_history:
            return None
        items = unique_in_order(np.asarray(store.item[a + tpos]))
        cutoff = int(hist[-1]) + 1 if hist.size else 0
        return EvalCase(u, cutoff, int(store.timestamp[a + tpos[0]]), items, history_positions=hist)

    return case


def case_sequence(user: UserEvents, case: EvalCase, mixing_cfg: MixingConfig, scenarios: Sequence[str]) -> MixedSequence:
    """The model input of ``case``: :func:`redrec.mixing.mix` over the case's input events.

    Returns a :class:`MixedSequence` whose ``index`` are positions into ``user``'s events.  With explicit
    ``history_positions`` (``reference``), mix runs on those events only and its indices are mapped back.
    """
    if case.history_positions is None:
        return mix(user.scenario, case.cutoff, mixing_cfg, scenarios)
    hp = np.asarray(case.history_positions, dtype=np.int64)
    sub = mix(np.asarray(user.scenario)[hp], len(hp), mixing_cfg, scenarios)
    return MixedSequence(hp[sub.index], sub.use_position, sub.use_time_gap)


def case_input_items(store: EventStore, case: EvalCase) -> np.ndarray:
    """int64 item indices of the case's input events (all of them, not only the mixed sequence)."""
    a = int(store.offsets[case.user])
    if case.history_positions is None:
        return np.asarray(store.item[a : a + case.cutoff], dtype=np.int64)
    return np.asarray(store.item[a + np.asarray(case.history_positions, dtype=np.int64)], dtype=np.int64)


def sample_pool(
    n_items: int, targets: np.ndarray, forbidden: np.ndarray | None, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted int64 candidate items: ``targets`` plus ``n`` uniform draws (without replacement) from the items
    that are neither targets nor ``forbidden`` (all of them when fewer are left)."""
    t = np.unique(np.asarray(targets, dtype=np.int64))
    bad = t if forbidden is None or len(forbidden) == 0 else np.union1d(t, np.asarray(forbidden, dtype=np.int64))
    bad = bad[(bad >= 0) & (bad < n_items)]
    free = n_items - len(bad)
    m = min(n, free)
    if m <= 0:
        return t
    if 2 * m >= free:  # small catalogue: choose among the explicit free list
        pool = np.setdiff1d(np.arange(n_items, dtype=np.int64), bad, assume_unique=True)
        picked = rng.choice(pool, size=m, replace=False)
    else:  # large catalogue: rejection sampling, O(m) memory
        picked = np.zeros(0, np.int64)
        while len(picked) < m:
            draw = rng.integers(0, n_items, size=2 * (m - len(picked)) + 16, dtype=np.int64)
            draw = draw[~np.isin(draw, bad)]
            picked = unique_in_order(np.concatenate([picked, draw]))
        picked = picked[:m]
    return np.union1d(t, picked)


# ---------------------------------------------------------------------------------------------------------------
# scorers and results
# ---------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Scorer(Protocol):
    """Anything :func:`evaluate` can rank items with.

    ``score_cases(store, cases)`` returns, for a batch of ``B`` cases, either

    * a score matrix ``[B, n_items]`` (higher = better; ``np.broadcast_to`` views are welcome), or
    * user interest vectors ``[B, K, d]`` (``K`` >= 1; one vector per user is ``[B, 1, d]``), scored by
      ``max_k cos(u_k, v_i)`` against the scorer's ``item_vectors`` attribute ``[n_items, d]``.

    Optional: ``prepare(store, cases, cfg)`` is called once with *all* cases before scoring (e.g. to count
    popularity over every case's input) and ``name`` labels the model in reports.  A scorer must build a
    case's input from :meth:`EvalCase.input_positions` / :func:`case_sequence` only (never from events at or
    after ``cutoff``).
    """

    def score_cases(self, store: EventStore, cases: Sequence[EvalCase]) -> Any: ...


@dataclass
class EvalResult:
    """Metrics of one model under one protocol on one store.

    Attributes:
        model: the model's name.
        protocol: protocol name (``redrec`` / ``loo`` / ``reference``), plus ``/valid`` for the loo valid split.
        dataset: the store path.
        n_users: users evaluated (one case each).
        pool: ``full`` or ``sampled``.
        pool_size: candidates per user before exclusion: ``n_items`` (full) or ``n_sampled`` (sampled; the
            targets come on top).
        exclude_history: whether the users' input items were removed from the candidates.
        ks: the K values.
        metrics: ``{"hr@10": ..., "ndcg@10": ..., "mrr": ...}`` means over users.
        mean_targets: average number of (unique) targets per user.
        wall_time_s: seconds spent in :func:`evaluate`.
        config: the resolved :class:`ProtocolConfig` as a dict.
        per_user: per-user metric arrays (not written to JSON unless asked).
        users: user indices, aligned with ``per_user``.
    """

    model: str
    protocol: str
    dataset: str
    n_users: int
    pool: str
    pool_size: int
    exclude_history: bool
    ks: list[int]
    metrics: dict[str, float]
    mean_targets: float = float("nan")
    wall_time_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    per_user: dict[str, np.ndarray] | None = field(default=None, repr=False)
    users: np.ndarray | None = field(default=None, repr=False)

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def pool_description(self) -> str:
        """E.g. ``full pool: 12,345 items, history excluded`` or ``sampled pool: 1,000 + targets``."""
        if self.pool == "sampled":
            s = f"sampled pool: {self.pool_size:,} + targets"
        else:
            s = f"full pool: {self.pool_size:,} items"
        return s + (", history excluded" if self.exclude_history else "")

    def to_dict(self, per_user: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model,
            "protocol": self.protocol,
            "dataset": self.dataset,
            "n_users": self.n_users,
            "pool": self.pool,
            "pool_size": self.pool_size,
            "exclude_history": self.exclude_history,
            "ks": list(self.ks),
            "metrics": dict(self.metrics),
            "mean_targets": self.mean_targets,
            "wall_time_s": self.wall_time_s,
            "config": self.config,
        }
        if per_user and self.per_user is not None:
            d["per_user"] = {k: np.asarray(v).tolist() for k, v in self.per_user.items()}
            d["users"] = None if self.users is None else np.asarray(self.users).tolist()
        return d

    def to_json(self, indent: int | None = 2, per_user: bool = False) -> str:
        return json.dumps(self.to_dict(per_user=per_user), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        per_user = d.get("per_user")
        users = d.get("users")
        return cls(
            model=d["model"], protocol=d["protocol"], dataset=d["dataset"], n_users=int(d["n_users"]),
            pool=d["pool"], pool_size=int(d["pool_size"]), exclude_history=bool(d["exclude_history"]),
            ks=[int(k) for k in d["ks"]], metrics={k: float(v) for k, v in d["metrics"].items()},
            mean_targets=float(d.get("mean_targets", float("nan"))), wall_time_s=float(d.get("wall_time_s", 0.0)),
            config=dict(d.get("config", {})),
            per_user=None if per_user is None else {k: np.asarray(v, dtype=np.float64) for k, v in per_user.items()},
            users=None if users is None else np.asarray(users, dtype=np.int64),
        )


def _batches(seq: Sequence[EvalCase], n: int) -> Iterator[Sequence[EvalCase]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _model_name(scorer: Any) -> str:
    return str(getattr(scorer, "name", None) or type(scorer).__name__)


def evaluate(
    store: EventStore,
    cases: Sequence[EvalCase],
    scorer: Scorer,
    cfg: ProtocolConfig,
    *,
    progress: bool = True,
    batch_size: int = 256,
    name: str | None = None,
    keep_per_user: bool = True,
) -> EvalResult:
    """Score ``cases`` with ``scorer`` and compute HR@K, NDCG@K and MRR from exact target ranks.

    Args:
        store: the event store the cases come from.
        cases: from :func:`make_cases` with the same ``cfg``.
        scorer: see :class:`Scorer`.
        cfg: the protocol config (pool, exclusion, K values, list size).
        progress: show a tqdm bar.
        batch_size: cases per ``score_cases`` call.
        name: model name in the result (default: ``scorer.name`` or its class name).
        keep_per_user: keep per-user metric arrays in the result.

    Candidates: ``full``: every item, minus the user's input items when ``exclude_history`` (targets are never
    excluded).  ``sampled``: the targets plus ``n_sampled`` items drawn uniformly, seeded per case, from the
    items that are not targets (nor input items when ``exclude_history``).  Ties are broken by item index.
    """
    from tqdm.auto import tqdm

    from redrec.retrieval import exact

    cfg = cfg.resolved(store)
    if len(cases) == 0:
        raise DataError(store.path, None, f"no users to evaluate under protocol {cfg.name!r} (every user was skipped)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = name or _model_name(scorer)
    t0 = time.perf_counter()
    prepare = getattr(scorer, "prepare", None)
    if callable(prepare):
        prepare(store, cases, cfg)
    n_items = store.n_items

    rank_rows: list[np.ndarray] = []
    bar = tqdm(total=len(cases), desc=f"eval {model} [{cfg.name}]", unit="user", disable=not progress)
    try:
        for batch in _batches(cases, batch_size):
            out = _as_output(scorer.score_cases(store, batch), len(batch), n_items, scorer)
            targets = [np.asarray(c.targets, dtype=np.int64) for c in batch]
            excluded = [case_input_items(store, c) for c in batch] if cfg.exclude_history else None
            if cfg.pool == "full":
                if out.ndim == 2:
                    ranks = rank_of_targets(out, targets, excluded)
                else:
                    ranks = exact.target_ranks(out, scorer.item_vectors, targets, excluded)  # type: ignore[attr-defined]
            else:
                cands = [
                    sample_pool(n_items, t, None if excluded is None else excluded[i], cfg.n_sampled,
                                np.random.default_rng([cfg.seed, 2, c.user, c.cutoff]))
                    for i, (c, t) in enumerate(zip(batch, targets, strict=True))
                ]
                C = pad_ragged(cands, fill=-1)  # sorted item ids: column order == item order, so ties stay by index
                if out.ndim == 2:
                    sc = np.take_along_axis(out, np.maximum(C, 0), axis=1).astype(np.float64, copy=False)
                    sc = np.where(C >= 0, sc, -np.inf)
                else:
                    sc = exact.score_candidates(out, scorer.item_vectors, C)  # type: ignore[attr-defined]
                tpos = [np.searchsorted(cand, np.unique(t)) for cand, t in zip(cands, targets, strict=True)]
                ranks = rank_of_targets(sc, tpos)
            rank_rows.extend(list(ranks))
            bar.update(len(batch))
    finally:
        bar.close()

    ranks_all = pad_ragged([r[r > 0] for r in rank_rows], fill=0)
    per_user = compute_metrics(ranks_all, cfg.ks, list_size=cfg.list_size)
    protocol = cfg.name + ("/valid" if cfg.name == "loo" and cfg.split == "valid" else "")
    return EvalResult(
        model=model,
        protocol=protocol,
        dataset=str(store.path),
        n_users=len(cases),
        pool=cfg.pool,
        pool_size=n_items if cfg.pool == "full" else cfg.n_sampled,
        exclude_history=bool(cfg.exclude_history),
        ks=list(cfg.ks),
        metrics=mean_metrics(per_user),
        mean_targets=float(np.mean([len(c.targets) for c in cases])),
        wall_time_s=time.perf_counter() - t0,
        config=to_dict(cfg),
        per_user=per_user if keep_per_user else None,
        users=np.array([c.user for c in cases], dtype=np.int64) if keep_per_user else None,
    )


def _as_output(out: Any, b: int, n_items: int, scorer: Any) -> Any:
    """Check a scorer's output: a ``[B, n_items]`` score matrix (numpy) or ``[B, K, d]`` vectors."""
    if hasattr(out, "detach"):  # torch tensor
        out = out.detach().cpu()
        if out.ndim == 2:
            out = out.float().numpy() if out.dtype.is_floating_point else out.numpy()
    shape = tuple(out.shape)
    if len(shape) == 2:
        if shape != (b, n_items):
            raise ValueError(f"{_model_name(scorer)}: score matrix must be [B={b}, n_items={n_items}], got {shape}")
        return np.asarray(out)
    if len(shape) == 3:
        iv = getattr(scorer, "item_vectors", None)
        if iv is None:
            raise ValueError(f"{_model_name(scorer)} returned user vectors but has no item_vectors attribute")
        if shape[0] != b or tuple(iv.shape) != (n_items, shape[2]):
            raise ValueError(
                f"{_model_name(scorer)}: user vectors {shape} and item vectors {tuple(iv.shape)} do not match "
                f"B={b}, n_items={n_items}"
            )
        return out
    raise ValueError(f"{_model_name(scorer)}: score_cases must return [B, n_items] scores or [B, K, d] vectors, got {shape}")
