"""One evaluation run from a typed config: ``redrec eval`` is a thin wrapper over :func:`run_eval`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from redrec.config import to_dict
from redrec.data.store import EventStore
from redrec.errors import ConfigError
from redrec.eval.protocols import EvalResult, ProtocolConfig, evaluate, make_cases
from redrec.mixing import MixingConfig

#: zero-parameter models usable before any training (trained models come with checkpoints)
ZERO_PARAMETER_MODELS = ("popularity", "meanpool")


@dataclass
class EvalConfig:
    """What ``redrec eval`` runs.

    Attributes:
        store: event store directory.
        protocol: the evaluation protocol (:class:`ProtocolConfig`).
        mixing: how history-based models build their input (:class:`MixingConfig`).
        models: model names; ``auto`` = popularity, plus mean pooling when the store has item vectors.
        batch_size: users scored per batch.
    """

    store: str = ""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    models: list[str] = field(default_factory=lambda: ["auto"])
    batch_size: int = 256

    def validate(self, source: str | None = None) -> None:
        for i, m in enumerate(self.models):
            if m not in (*ZERO_PARAMETER_MODELS, "auto"):
                raise ConfigError(source, f"models[{i}]", f"unknown model {m!r}; known: auto, {', '.join(ZERO_PARAMETER_MODELS)}")
        if self.batch_size < 1:
            raise ConfigError(source, "batch_size", f"must be >= 1, got {self.batch_size}")


def _scorers(cfg: EvalConfig, store: EventStore) -> list:
    from redrec.baselines import MeanPoolScorer, PopularityScorer

    names: list[str] = []
    for m in cfg.models:
        if m == "auto":
            names += ["popularity"] + (["meanpool"] if store.vector_dim else [])
        elif m not in names:
            names.append(m)
    return [PopularityScorer() if n == "popularity" else MeanPoolScorer(cfg.mixing) for n in names]


def run_eval(cfg: EvalConfig, *, progress: bool = True) -> list[EvalResult]:
    """Evaluate every model of ``cfg`` on the same cases; the resolved config is kept in each result."""
    if not cfg.store:
        raise ConfigError(None, "store", "no event store given (--store PATH)")
    store = EventStore(Path(cfg.store))
    cases = make_cases(store, cfg.protocol)
    results = []
    for scorer in _scorers(cfg, store):
        r = evaluate(store, cases, scorer, cfg.protocol, progress=progress, batch_size=cfg.batch_size)
        r.config = {**(r.config or {}), "eval": to_dict(cfg)}
        results.append(r)
    return results
