"""Retrieval: score users' interest vectors against an item pool.

* :mod:`redrec.retrieval.engine` -- the fast exact multi-vector top-k engine (:func:`search`), float64-exact order.
* :mod:`redrec.retrieval.exact` -- simple chunked exact ranking (target ranks for evaluation, dense scores).
* :mod:`redrec.retrieval.index` -- FAISS indexes (flat, IVF-Flat, HNSW, IVF-PQ) behind one :class:`Index`.

Names are imported lazily (PEP 562): numba and faiss load only when the engine or an index is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EngineConfig": "engine", "SearchStats": "engine", "search": "engine",
    "max_cosine": "exact", "normalize": "exact", "score_candidates": "exact", "target_ranks": "exact", "topk": "exact",
    "Index": "index", "IndexConfig": "index", "build_index": "index", "load_index": "index", "recall_at_k": "index",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'redrec.retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"redrec.retrieval.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
