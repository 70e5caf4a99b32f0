"""Retrieval: score users' interest vectors against an item pool.

* :mod:`redrec.retrieval.engine` -- the fast exact multi-vector top-k engine (:func:`search`), float64-exact order.
* :mod:`redrec.retrieval.exact` -- simple chunked exact ranking (target ranks for evaluation, dense scores).
* :mod:`redrec.retrieval.index` -- FAISS indexes (flat, IVF-Flat, HNSW, IVF-PQ) behind one :class:`Index`.
"""

from redrec.retrieval.engine import EngineConfig, SearchStats, search
from redrec.retrieval.exact import max_cosine, normalize, score_candidates, target_ranks, topk

__all__ = ["EngineConfig", "SearchStats", "max_cosine", "normalize", "score_candidates", "search", "target_ranks", "topk"]
