"""Evaluation: exact-rank metrics, the ``redrec`` / ``loo`` / ``reference`` protocols, and result tables.

Names are imported lazily (PEP 562) so that :mod:`redrec.retrieval` can use :mod:`redrec.eval.metrics`
without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_KS": "metrics",
    "compute_metrics": "metrics",
    "hit_rate": "metrics",
    "mean_metrics": "metrics",
    "metric_names": "metrics",
    "mrr": "metrics",
    "ndcg": "metrics",
    "rank_of_targets": "metrics",
    "EvalCase": "protocols",
    "EvalResult": "protocols",
    "ProtocolConfig": "protocols",
    "Scorer": "protocols",
    "case_sequence": "protocols",
    "evaluate": "protocols",
    "make_cases": "protocols",
    "format_table": "report",
    "read_json": "report",
    "write_json": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'redrec.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"redrec.eval.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
