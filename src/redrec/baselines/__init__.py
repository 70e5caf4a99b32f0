"""Baselines: zero-parameter scorers now (popularity, mean pooling); trained ones (SASRec, HSTU, ...) later."""

from redrec.baselines.zero import MeanPoolScorer, PopularityScorer

__all__ = ["MeanPoolScorer", "PopularityScorer"]
