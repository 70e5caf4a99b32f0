"""Item towers ``E_item: item -> hidden vector`` and the shared projection head.

Every item tower maps item ids (plus, for content towers, their precomputed content vectors) to vectors of the
user tower's width H.  The same hidden vector is (a) the item part of the user tower's event input and (b),
through the shared :class:`ProjectionHead`, the item's retrieval vector (paper section 4.2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from redrec.errors import ConfigError
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


def _projection(kind: str, dim: int, mlp_hidden: int, hidden: int, dropout: float) -> nn.Module:
    """Text width D -> user tower width H: ``mlp``, ``linear`` or ``none`` (needs D == H)."""
    if kind == "none":
        if dim != hidden:
            raise ConfigError(None, "item_tower.text.projection",
                              f"'none' needs the text encoder width ({dim}) = the user tower width ({hidden})")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(dim, hidden)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp_hidden, hidden))


class TextItemTower(nn.Module):
    """A pretrained language model over the item's text (paper section 4.2; :mod:`redrec.model.text`).

    ``ids [...] -> [..., H]`` = projection(text vector of each item); items without any text get a learned
    ``no_text`` vector instead.  With ``text.id_embedding`` a zero-initialised per-item embedding is added
    (text + id: items without text still become distinguishable as training sees them).

    ``frozen`` mode: the ``[n_items, D]`` text vectors are a buffer (computed once by
    :func:`redrec.model.text.frozen_text_vectors`, set with :meth:`set_text_vectors`, saved with the model so a
    saved model needs neither the encoder nor the item texts).  Only the projection trains.

    ``finetune`` mode: the encoder is a submodule; the token ids of every item are a buffer (:meth:`set_tokens`).
    Each forward encodes the *distinct* items of its input once, in micro-batches of ``text.micro_batch`` with
    gradient checkpointing, so positives and negatives are re-encoded with the current weights every step.

    Ids only: the tower needs no per-batch features, and ranks items never seen in training (cold start) as
    long as they have text.
    """

    needs_features = False

    def __init__(self, cfg: ItemTowerConfig, hidden: int, pretrained_weights: bool = True):
        super().__init__()
        t = cfg.text
        t.validate()
        if cfg.n_items < 1 or t.dim < 1:
            raise ValueError("ItemTowerConfig.n_items and text.dim must be set for the text tower")
        self.cfg = cfg
        self.finetune = t.mode == "finetune"
        self.register_buffer("has_text", torch.zeros(cfg.n_items, dtype=torch.bool))
        if self.finetune:
            from redrec.model.text import ItemTokenizer, load_encoder

            tok = ItemTokenizer(t)
            self.slot_id = tok.slot_id
            self.encoder = load_encoder(t, len(tok), pretrained_weights)
            if t.gradient_checkpointing:  # transformers >= 5 renamed it
                enable = getattr(self.encoder, "activation_checkpointing_enable", None) or self.encoder.gradient_checkpointing_enable
                enable()
            self.register_buffer("tokens", torch.zeros(cfg.n_items, 1, dtype=torch.long))
            self.register_buffer("lengths", torch.ones(cfg.n_items, dtype=torch.long))
        else:
            self.register_buffer("text_vec", torch.zeros(cfg.n_items, t.dim))
        self.proj = _projection(t.projection, t.dim, t.mlp_hidden, hidden, cfg.dropout)
        self.no_text = nn.Parameter(torch.zeros(hidden))
        nn.init.normal_(self.no_text, std=0.02)
        # optional per-item id embedding added to the text vector; zero at init, so an item training never saw
        # (cold start) is represented by its text alone
        self.id_emb = nn.Embedding(cfg.n_items, hidden) if t.id_embedding else None
        if self.id_emb is not None:
            nn.init.zeros_(self.id_emb.weight)

    # -- filled from the data before training (saved with the model afterwards) --------------------------------
    def set_text_vectors(self, vectors: np.ndarray, has_text: np.ndarray) -> None:
        """Frozen mode: ``[n_items, D]`` float vectors and ``[n_items]`` bool has-text flags."""
        if self.finetune:
            raise ValueError("set_text_vectors is for the frozen mode")
        v = torch.as_tensor(np.asarray(vectors, np.float32))
        if tuple(v.shape) != tuple(self.text_vec.shape):
            raise ValueError(f"text vectors have shape {tuple(v.shape)}, expected {tuple(self.text_vec.shape)}")
        self.text_vec = v.to(self.text_vec.device)
        self.has_text = torch.as_tensor(np.asarray(has_text, bool)).to(self.has_text.device)

    def set_tokens(self, ids: np.ndarray, lengths: np.ndarray, has_text: np.ndarray) -> None:
        """Finetune mode: right-padded ``[n_items, T]`` token ids and their lengths (slot included)."""
        if not self.finetune:
            raise ValueError("set_tokens is for the finetune mode")
        dev = self.tokens.device
        self.tokens = torch.as_tensor(np.asarray(ids, np.int64)).to(dev)
        self.lengths = torch.as_tensor(np.asarray(lengths, np.int64)).to(dev)
        self.has_text = torch.as_tensor(np.asarray(has_text, bool)).to(dev)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # the token table's width T depends on the data: take the saved shape
        key = prefix + "tokens"
        if self.finetune and key in state_dict:
            self.tokens = torch.empty_like(state_dict[key], device=self.tokens.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward --------------------------------------------------------------------------------------------------
    def text_vectors(self, ids: Tensor) -> Tensor:
        """``[n]`` distinct item ids -> ``[n, D]`` text vectors (frozen: a lookup; finetune: the encoder)."""
        if not self.finetune:
            return self.text_vec[ids]
        from redrec.model.text import encode_tokens

        pooling, mb = self.cfg.text.pooling, self.cfg.text.micro_batch
        chunks = [encode_tokens(self.encoder, self.tokens[c], self.lengths[c], pooling) for c in ids.split(mb)]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.cfg.text.dim, device=ids.device)

    def forward(self, ids: Tensor, features: Tensor | None = None) -> Tensor:
        flat = ids.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)
        h = self.proj(self.text_vectors(uniq).to(self.no_text.dtype))
        h = torch.where(self.has_text[uniq][:, None], h, self.no_text.to(h.dtype)[None])
        if self.id_emb is not None:
            h = h + self.id_emb(uniq).to(h.dtype)
        return h[inv].reshape(*ids.shape, -1)


class MultimodalItemTower(nn.Module):
    """Text vector fused with a projected precomputed image vector (e.g. CLIP ViT-B/16 features).

    ``ids [...]`` + ``features [..., F]`` (the store's item vectors, taken as image features) -> ``[..., H]``::

        h = has_text * T(text) + has_image * P(image) + (neither) * e_none

    where ``T`` is a :class:`TextItemTower` (frozen or fine-tuned) and ``P`` an MLP.  An image row that is all
    zeros or not finite counts as missing, so an item with only text, or only an image, still gets a vector
    from what it has (the text-only / image-only fallback).
    """

    needs_features = True

    def __init__(self, cfg: ItemTowerConfig, hidden: int, pretrained_weights: bool = True):
        super().__init__()
        if cfg.feature_dim < 1:
            raise ValueError("ItemTowerConfig.feature_dim (the image vector width) must be set for the multimodal tower")
        self.text = TextItemTower(cfg, hidden, pretrained_weights)
        self.image = nn.Sequential(
            nn.LayerNorm(cfg.feature_dim), nn.Linear(cfg.feature_dim, cfg.mlp_hidden), nn.GELU(),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.mlp_hidden, hidden),
        )
        self.none = nn.Parameter(torch.zeros(hidden))
        nn.init.normal_(self.none, std=0.02)

    def forward(self, ids: Tensor, features: Tensor | None = None) -> Tensor:
        if features is None:
            raise ValueError("the multimodal item tower needs the items' image vectors (the store's item vectors)")
        finite = torch.isfinite(features).all(-1)
        img = torch.where(finite[..., None], features, torch.zeros_like(features))
        has_img = finite & (img.abs().sum(-1) > 0)
        has_txt = self.text.has_text[ids]
        t = self.text(ids)  # items without text already get the text tower's learned no-text vector
        i = self.image(img.to(t.dtype))
        h = torch.where(has_txt[..., None], t, torch.zeros_like(t)) + torch.where(has_img[..., None], i, torch.zeros_like(i))
        return torch.where((has_txt | has_img)[..., None], h, self.none.to(h.dtype))


def build_item_tower(cfg: ItemTowerConfig, hidden: int, pretrained_weights: bool = True) -> nn.Module:
    """The item tower of ``cfg.kind``; ``pretrained_weights=False`` skips reading a text encoder's weights."""
    if cfg.kind == "id":
        return IdItemTower(cfg, hidden)
    if cfg.kind == "features":
        return FeatureItemTower(cfg, hidden)
    if cfg.kind == "text":
        return TextItemTower(cfg, hidden, pretrained_weights)
    if cfg.kind == "multimodal":
        return MultimodalItemTower(cfg, hidden, pretrained_weights)
    raise ValueError(f"unknown item tower kind {cfg.kind!r}")


def text_tower(model: nn.Module) -> TextItemTower | None:
    """The text part of a model's item tower (``text`` or ``multimodal``), else ``None``."""
    tower = getattr(model, "item_tower", None)
    if isinstance(tower, MultimodalItemTower):
        return tower.text
    return tower if isinstance(tower, TextItemTower) else None


def prepare_text_tower(model: nn.Module, store: Any, progress: bool = False, device: str | torch.device = "cpu") -> None:
    """Fill a fresh model's text tower from ``store``'s item table: the cached frozen vectors, or the token ids
    (finetune).  A no-op for other towers.  Call before training; saved models carry what this sets."""
    tower = text_tower(model)
    if tower is None:
        return
    from redrec.model.text import ItemTokenizer, frozen_text_vectors, item_prompts

    t = tower.cfg.text
    if tower.finetune:
        prompts, has = item_prompts(store, t)
        ids, lengths = ItemTokenizer(t)(prompts)
        tower.set_tokens(ids, lengths, has)
    else:
        vec, has = frozen_text_vectors(store, t, progress=progress, device=device)
        tower.set_text_vectors(vec, has)


def l2norm(x: Tensor) -> Tensor:
    """Unit vectors along the last dim, computed in float32 for stability."""
    return F.normalize(x.float(), dim=-1).to(x.dtype)


__all__ = [
    "FeatureItemTower", "IdItemTower", "MultimodalItemTower", "ProjectionHead", "TextItemTower", "build_item_tower",
    "l2norm", "prepare_text_tower", "text_tower",
]
