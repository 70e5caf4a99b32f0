"""Typed configuration of the RED-Rec two-tower model (saved as ``config.yaml`` next to every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from redrec.errors import ConfigError


@dataclass
class ItemTowerConfig:
    """Item tower ``E_item: item -> hidden vector`` (width = the user tower's hidden size).

    Attributes:
        kind: ``id`` (a learned embedding per item) or ``features`` (precomputed item vectors, e.g. RED-MMU's
            64-d ``note_feature``, through an MLP). ``text`` and ``multimodal`` towers share this interface.
        n_items: item vocabulary size (filled from the data).
        feature_dim: width of the precomputed vectors (filled from the data; ``features`` only).
        mlp_hidden: hidden width of the feature MLP.
        dropout: dropout inside the feature MLP / after the id embedding.
    """

    kind: Literal["id", "features"] = "features"
    n_items: int = 0
    feature_dim: int = 0
    mlp_hidden: int = 256
    dropout: float = 0.0


@dataclass
class UserTowerConfig:
    """User tower ``E_user``: a decoder-only HF transformer run on ``inputs_embeds``.

    Attributes:
        backbone: ``qwen2`` or ``llama`` when built from scratch (ignored with ``pretrained_path``).
        pretrained_path: local directory of a pretrained HF decoder (e.g. Qwen2.5-0.5B); loaded offline.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: from-scratch sizes.
        attention_dropout: attention dropout of the backbone.
        attn_implementation: ``sdpa`` or ``eager``.
        max_positions: size of the sequence-position table ``PE_seq`` (>= the longest input).
        n_gap_buckets: size of the time-gap table ``PE_gap`` (log2 buckets, see :mod:`redrec.features`).
        use_item, use_actions, use_hour, use_scenario, use_position, use_time_gap: switch each addend of the
            event input off for ablations (the mixing policy may also switch the position PEs off).
        queries_per_scenario: K learnable interest queries per scenario (paper: 3).
        queries_see_each_other: whether the interest queries attend to each other (default: no; each query
            sees the whole history and itself, so the K interests are computed independently).
        gradient_checkpointing: trade compute for memory in the backbone.
    """

    backbone: Literal["qwen2", "llama"] = "qwen2"
    pretrained_path: str | None = None
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    attention_dropout: float = 0.0
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    max_positions: int = 1024
    n_gap_buckets: int = 32
    use_item: bool = True
    use_actions: bool = True
    use_hour: bool = True
    use_scenario: bool = True
    use_position: bool = True
    use_time_gap: bool = True
    queries_per_scenario: int = 3
    queries_see_each_other: bool = False
    gradient_checkpointing: bool = False


@dataclass
class ModelConfig:
    """The two-tower model.

    Attributes:
        item_tower, user_tower: the towers.
        embed_dim: retrieval space width d (paper: 64).
        head_dropout: dropout in the shared projection head.
        scenarios: scenario names (filled from the data; the queries are grouped by scenario).
        n_actions: number of action flags (filled from the data).
    """

    item_tower: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    user_tower: UserTowerConfig = field(default_factory=UserTowerConfig)
    embed_dim: int = 64
    head_dropout: float = 0.0
    scenarios: list[str] = field(default_factory=list)
    n_actions: int = 0

    def validate(self, source: str | None = None) -> None:
        u = self.user_tower
        if u.pretrained_path is None and u.hidden_size % u.num_heads:
            raise ConfigError(source, "user_tower.hidden_size", f"{u.hidden_size} is not divisible by num_heads={u.num_heads}")
        if u.num_heads % u.num_kv_heads:
            raise ConfigError(source, "user_tower.num_kv_heads", f"num_heads={u.num_heads} is not a multiple of {u.num_kv_heads}")
        if u.queries_per_scenario < 1:
            raise ConfigError(source, "user_tower.queries_per_scenario", "must be >= 1")
        if self.embed_dim < 1:
            raise ConfigError(source, "embed_dim", "must be >= 1")

    @property
    def n_queries(self) -> int:
        return self.user_tower.queries_per_scenario * max(1, len(self.scenarios))
