"""Item towers ``E_item: item -> hidden vector`` and the shared projection head.

Every item tower maps item ids (plus, for content towers, their precomputed content vectors) to vectors of the
user tower's width H.  The same hidden vector is (a) the item part of the user tower's event input and (b),
through the shared :class:`ProjectionHead`, the item's retrieval vector (paper section 4.2).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from redrec.model.config import ItemTowerConfig


class ProjectionHead(nn.Module):
    """Shared head hidden -> d of both towers (paper appendix E; RedSeqRec's ``note_embedding_head`` layout).

    ``h1 = W1 x``; ``h = h1 + Dropout(W2 GELU(h1))``; ``out = LayerNorm(h)``.  The caller L2-normalises.

    Shapes: ``[..., H] -> [..., d]``.
    """

    def __init__(self, hidden: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h1 = self.fc1(x)
        return self.norm(h1 + self.dropout(self.fc2(F.gelu(h1))))


class IdItemTower(nn.Module):
    """A learned embedding per item (baselines, ablations, datasets without content).  ``[...] -> [..., H]``.

    ``LayerNorm(E[i])``: the norm makes the tower's output scale independent of the embedding's, so a small init
    (std 0.02) moves quickly under AdamW, and items start apart (without it the head's bias dominates tiny inputs,
    every item starts with nearly the same vector and the near-duplicate mask discards almost every negative).
    """

    needs_features = False

    def __init__(self, cfg: ItemTowerConfig, hidden: int):
        super().__init__()
        if cfg.n_items < 1:
            raise ValueError("ItemTowerConfig.n_items must be set for the id tower")
        self.emb = nn.Embedding(cfg.n_items, hidden)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, features: Tensor | None = None) -> Tensor:
        return self.dropout(self.norm(self.emb(ids)))


class FeatureItemTower(nn.Module):
    """Precomputed item vectors (e.g. RED-MMU ``note_feature``, frozen text-model outputs) through an MLP.

    ``features [..., F] -> [..., H]``: LayerNorm -> Linear(F, m) -> GELU -> Dropout -> Linear(m, H).
    The ids are unused: the tower generalises to items never seen in training (cold start).
    """

    needs_features = True

    def __init__(self, cfg: ItemTowerConfig, hidden: int):
        super().__init__()
        if cfg.feature_dim < 1:
            raise ValueError("ItemTowerConfig.feature_dim must be set for the features tower")
        self.mlp = nn.Sequential(
            nn.LayerNorm(cfg.feature_dim),
            nn.Linear(cfg.feature_dim, cfg.mlp_hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_hidden, hidden),
        )

    def forward(self, ids: Tensor, features: Tensor | None = None) -> Tensor:
        if features is None:
            raise ValueError("the features item tower needs the items' precomputed vectors")
        return self.mlp(features)


def build_item_tower(cfg: ItemTowerConfig, hidden: int) -> nn.Module:
    if cfg.kind == "id":
        return IdItemTower(cfg, hidden)
    if cfg.kind == "features":
        return FeatureItemTower(cfg, hidden)
    raise ValueError(f"unknown item tower kind {cfg.kind!r}")


def l2norm(x: Tensor) -> Tensor:
    """Unit vectors along the last dim, computed in float32 for stability."""
    return F.normalize(x.float(), dim=-1).to(x.dtype)


__all__ = ["FeatureItemTower", "IdItemTower", "ProjectionHead", "build_item_tower", "l2norm"]
