"""One evaluation run from a typed config: ``redrec eval`` is a thin wrapper over :func:`run_eval`.

What can be evaluated, all under the same protocol and cases (the store's):

* zero-parameter models (``popularity``, ``meanpool``);
* a trained model from its run directory or model directory (``checkpoint``): the user tower runs on each case's
  input, built exactly as in training (:class:`redrec.model.scorer.ModelScorer`);
* embedding files written by ``redrec embed items`` / ``redrec embed users`` (``item_embeddings`` +
  ``user_embeddings``): the user file must hold one row per case of the same protocol (same user and cutoff).

The ``reference`` protocol can also run without a store, straight on RedSeqRec's released pickles and
``user_lastn.json`` (``reference.items`` / ``reference.users`` / ``reference.lastn``), computing what its
``eval/eval.py`` computes (:mod:`redrec.eval.reference`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from redrec.config import to_dict
from redrec.data.store import EventStore
from redrec.errors import ConfigError, DataError
from redrec.eval.protocols import EvalCase, EvalResult, ProtocolConfig, evaluate, make_cases
from redrec.mixing import MixingConfig
from redrec.model.config import SHARED_GROUP

#: zero-parameter models usable before any training (trained models come with checkpoints)
ZERO_PARAMETER_MODELS = ("popularity", "meanpool")


@dataclass
class ReferenceFiles:
    """RedSeqRec's released evaluation files (``--protocol reference`` without a store).

    Attributes:
        items: ``base_item_embedding_pr.pkl`` (list of ``{id, embed, embed_type}``, 64-d per note).
        users: ``user_embedding_pr.pkl`` (K x 64 flattened per user; CUDA tensors are loaded on CPU).
        lastn: ``user_lastn.json`` (its ``ads_click_noteid_target`` lists are the targets).
    """

    items: str = ""
    users: str = ""
    lastn: str = ""

    def given(self) -> bool:
        return bool(self.items or self.users or self.lastn)


@dataclass
class EvalConfig:
    """What ``redrec eval`` runs.

    Attributes:
        store: event store directory.
        protocol: the evaluation protocol (:class:`ProtocolConfig`).
        mixing: how history-based models build their input (:class:`MixingConfig`; a checkpoint from a run
            directory uses the run's own mixing and feature configs instead).
        models: zero-parameter model names; ``auto`` = popularity, plus mean pooling when the store has item
            vectors; an empty list = none (only the checkpoint / embeddings).
        checkpoint: a training run directory (``RUN/model`` + ``RUN/config.yaml``) or a model directory.
        item_embeddings, user_embeddings: merged ``redrec embed`` output directories (both or neither).
        queries: which interest vectors score: ``all``, ``target_scenario`` (the protocol's target scenario's
            queries), or ``auto`` (the run's ``eval_queries`` for a checkpoint, ``target_scenario`` otherwise).
        reference: RedSeqRec files for ``--protocol reference`` without a store (:class:`ReferenceFiles`).
        batch_size: users scored per batch.
    """

    store: str = ""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    models: list[str] = field(default_factory=lambda: ["auto"])
    checkpoint: str = ""
    item_embeddings: str = ""
    user_embeddings: str = ""
    queries: Literal["auto", "all", "target_scenario"] = "auto"
    reference: ReferenceFiles = field(default_factory=ReferenceFiles)
    batch_size: int = 256

    def validate(self, source: str | None = None) -> None:
        for i, m in enumerate(self.models):
            if m not in (*ZERO_PARAMETER_MODELS, "auto"):
                raise ConfigError(source, f"models[{i}]", f"unknown model {m!r}; known: auto, {', '.join(ZERO_PARAMETER_MODELS)}")
        if self.batch_size < 1:
            raise ConfigError(source, "batch_size", f"must be >= 1, got {self.batch_size}")
        if bool(self.item_embeddings) != bool(self.user_embeddings):
            missing = "user_embeddings" if self.item_embeddings else "item_embeddings"
            raise ConfigError(source, missing, "item and user embeddings go together: give both directories")
        if self.queries not in ("auto", "all", "target_scenario"):
            raise ConfigError(source, "queries", f"must be auto, all or target_scenario, got {self.queries!r}")
        if self.reference.given():
            for name in ("items", "users", "lastn"):
                if not getattr(self.reference, name):
                    raise ConfigError(source, f"reference.{name}", "the reference files go together: items, users and lastn")
            if self.protocol.name != "reference":
                raise ConfigError(source, "protocol.name", f"RedSeqRec's files are evaluated under the reference protocol, not {self.protocol.name!r}")


class EmbeddingScorer:
    """Scores cases with precomputed embeddings (``redrec embed``): the user row of each (user, cutoff) case.

    Args:
        items_dir, users_dir: merged embedding directories.
        queries: ``all`` or ``target_scenario`` (select the target scenario's interest vectors by the users
            manifest's ``query_group``; all of them when the protocol has no target scenario).
    """

    name = "embeddings"

    def __init__(self, items_dir: str | Path, users_dir: str | Path, queries: Literal["all", "target_scenario"] = "target_scenario"):
        from redrec.embed import load_embeddings

        self.items_dir, self.users_dir = Path(items_dir), Path(users_dir)
        self.items = load_embeddings(items_dir)
        self.users = load_embeddings(users_dir)
        for emb, path, kind in ((self.items, self.items_dir, "items"), (self.users, self.users_dir, "users")):
            if emb.kind != kind:
                raise DataError(path / "manifest.json", "kind", f"holds {emb.kind} embeddings, expected {kind}")
        if self.items.vectors.shape[-1] != self.users.vectors.shape[-1]:
            raise DataError(self.users_dir / "manifest.json", "dim",
                            f"user vectors are {self.users.vectors.shape[-1]}-d, item vectors {self.items.vectors.shape[-1]}-d")
        self.queries = queries
        self.item_vectors: np.ndarray | None = None
        self._rows: dict[tuple[int, int], int] = {}
        self._qidx: np.ndarray | None = None

    def prepare(self, store: EventStore, cases: Sequence[EvalCase], cfg: ProtocolConfig | None = None) -> None:
        idx = self.items.index
        if len(idx) != store.n_items or not np.array_equal(np.sort(idx), np.arange(store.n_items)):
            raise DataError(self.items_dir / "ids.parquet", "index",
                            f"{len(idx):,} item rows do not cover the store's {store.n_items:,} items exactly once",
                            hint="embed the items of this store: `redrec embed items --store ...`")
        iv = self.items.vectors
        self.item_vectors = iv if np.array_equal(idx, np.arange(len(idx))) else np.asarray(iv)[np.argsort(idx)]
        cut = self.users.cutoff
        self._rows = {(int(u), int(c)): r for r, (u, c) in enumerate(zip(self.users.index, cut, strict=True))}
        missing = [c for c in cases if (c.user, c.cutoff) not in self._rows]
        if missing:
            c = missing[0]
            proto = self.users.manifest.get("protocol")
            pname = proto.get("name") if isinstance(proto, dict) else proto
            raise DataError(
                self.users_dir / "ids.parquet", "cutoff",
                f"{len(missing):,} of {len(cases):,} cases have no user row (e.g. user {store.user_ids[c.user]!r} "
                f"with cutoff {c.cutoff}); the file was embedded under protocol {pname!r}",
                hint="embed the users under the same protocol settings: `redrec embed users --protocol <name> --set protocol.<field>=...`",
            )
        self._qidx = None
        if self.queries == "target_scenario" and cfg is not None:
            scen = cfg.resolved(store).target_scenario
            groups = self.users.query_group
            scenarios = self.users.manifest.get("scenarios") or list(store.scenarios)
            if scen is not None and groups is not None and scen in scenarios:
                # the scenario's own queries and the shared ones (group -1, they serve every scenario)
                self._qidx = np.flatnonzero((groups == scenarios.index(scen)) | (groups == SHARED_GROUP))

    def score_cases(self, store: EventStore, cases: Sequence[EvalCase]) -> np.ndarray:
        rows = np.array([self._rows[(c.user, c.cutoff)] for c in cases], dtype=np.int64)
        order = np.argsort(rows)  # sorted reads from the memory map
        v = np.empty((len(rows), *self.users.vectors.shape[1:]), np.float32)
        v[order] = self.users.vectors[rows[order]]
        return v if self._qidx is None else v[:, self._qidx]


def checkpoint_scorer(path: str | Path, mixing: MixingConfig, queries: str = "auto"):
    """A :class:`ModelScorer` for a run directory (its own mixing / feature configs) or a bare model directory."""
    from redrec.embed import resolve_source
    from redrec.features import FeatureConfig
    from redrec.model.redrec import RedRec
    from redrec.model.scorer import ModelScorer

    model_dir, run_dir = resolve_source(path)
    features = FeatureConfig()
    q = "target_scenario" if queries == "auto" else queries
    if run_dir is not None and (run_dir / "config.yaml").exists():
        from redrec.train import load_train_config

        tc = load_train_config(run_dir / "config.yaml")
        mixing, features = tc.mixing, tc.features
        if queries == "auto":
            q = tc.eval_queries
    return ModelScorer(RedRec.from_pretrained(model_dir), mixing, features, queries=q)  # type: ignore[arg-type]


def _scorers(cfg: EvalConfig, store: EventStore) -> list:
    from redrec.baselines import MeanPoolScorer, PopularityScorer

    names: list[str] = []
    for m in cfg.models:
        if m == "auto":
            names += ["popularity"] + (["meanpool"] if store.vector_dim else [])
        elif m not in names:
            names.append(m)
    out: list = [PopularityScorer() if n == "popularity" else MeanPoolScorer(cfg.mixing) for n in dict.fromkeys(names)]
    if cfg.checkpoint:
        out.append(checkpoint_scorer(cfg.checkpoint, cfg.mixing, cfg.queries))
    if cfg.item_embeddings:
        q = "target_scenario" if cfg.queries == "auto" else cfg.queries
        out.append(EmbeddingScorer(cfg.item_embeddings, cfg.user_embeddings, q))  # type: ignore[arg-type]
    return out


def run_eval(cfg: EvalConfig, *, progress: bool = True) -> list[EvalResult]:
    """Evaluate every model of ``cfg`` on the same cases; the resolved config is kept in each result."""
    cfg.validate()
    if cfg.reference.given():
        from redrec.eval.reference import reference_eval

        r = reference_eval(cfg.reference.items, cfg.reference.users, cfg.reference.lastn, progress=progress).to_eval_result()
        r.config = {**(r.config or {}), "eval": to_dict(cfg)}
        return [r]
    if not cfg.store:
        raise ConfigError(None, "store", "no event store given (--store PATH)")
    store = EventStore(Path(cfg.store))
    cases = make_cases(store, cfg.protocol)
    results = []
    scorers = _scorers(cfg, store)
    if not scorers:
        raise ConfigError(None, "models", "nothing to evaluate: no model, checkpoint or embeddings given")
    for scorer in scorers:
        r = evaluate(store, cases, scorer, cfg.protocol, progress=progress, batch_size=cfg.batch_size)
        r.config = {**(r.config or {}), "eval": to_dict(cfg)}
        results.append(r)
    return results
