"""Retrieval: score users' interest vectors against an item pool (exact CPU engine; fast indexes come later)."""

from redrec.retrieval.exact import max_cosine, normalize, score_candidates, target_ranks, topk

__all__ = ["max_cosine", "normalize", "score_candidates", "target_ranks", "topk"]
