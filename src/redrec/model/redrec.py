"""RED-Rec: the two-tower model (paper section 4.2, appendix E).

    item tower   E_item(i)                      -> hidden h_i  [H]
    event input  x_j = h_{i_j} + A(actions_j) + E_hour(hour_j) + E_scen(s_j) + PE_seq(j) + PE_gap(gap_j)
    user tower   decoder LLM over [x_1 .. x_L, q_1 .. q_K]     (causal over the history; queries see it all)
                 (or a baseline encoder: SASRec, HSTU -- ``user_tower.backbone``)
    head         shared ProjectionHead H -> d, then L2 normalisation
    outputs      seq   [B, L, d]  causal user state after each event (next-item NCE, eq. 6)
                 interests [B, K, d]  one vector per query (K = queries_per_scenario x n_scenarios;
                                      window multi-interest loss, eq. A5/A6; retrieval = max over them)
                                      readout ``last``: no queries, K = 1, the state at the last real event
                 item vectors [N, d]  E_item through the same head

A batch is a dict of tensors built by :mod:`redrec.data.batching` (the same code for training, evaluation and
serving): ``item [B,L]``, ``item_feat [B,L,F]`` (features tower), ``scenario``, ``actions [B,L,A]``,
``hour``, ``gap``, ``position``, ``time`` (event ages, HSTU only), ``mask [B,L]`` (True = real event; right
padding).

``query_group [K]`` is the scenario index of each interest vector, or :data:`SHARED_GROUP` (-1) for a vector tied
to no scenario (``query_scope: shared``, readout ``last``): it serves, and is trained on, every scenario.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from redrec.baselines.hstu import HSTU
from redrec.baselines.sasrec import SASRec
from redrec.config import from_dict, save_yaml
from redrec.errors import DataError
from redrec.features import UNKNOWN_HOUR
from redrec.model.config import SHARED_GROUP, ModelConfig
from redrec.model.item_towers import ProjectionHead, build_item_tower, l2norm


def build_backbone(cfg: ModelConfig, pretrained_weights: bool = True) -> nn.Module:
    """The user tower's backbone: an HF decoder (built from a config, or loaded offline from a local path), or a
    baseline encoder (``sasrec``, ``hstu``) built from the config's sizes.  ``pretrained_weights=False`` builds a
    pretrained path's architecture without reading its weights (a saved model's state dict follows)."""
    u = cfg.user_tower
    if u.backbone == "sasrec":
        return SASRec(u.hidden_size, u.num_layers, u.num_heads, u.intermediate_size, u.dropout, u.attention_dropout)
    if u.backbone == "hstu":
        return HSTU(u.hidden_size, u.num_layers, u.num_heads, u.dropout, u.attention_dropout, u.max_positions)
    from transformers import AutoModel, LlamaConfig, Qwen2Config

    if u.pretrained_path:
        path = Path(u.pretrained_path)
        if not path.exists():
            raise DataError(path, "user_tower.pretrained_path", "no such directory (pretrained models load from a local path)")
        if pretrained_weights:
            model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=u.attn_implementation)
        else:
            from transformers import AutoConfig

            model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True),
                                          attn_implementation=u.attn_implementation)
    else:
        common = dict(
            vocab_size=2,  # unused: the tower runs on inputs_embeds
            hidden_size=u.hidden_size,
            intermediate_size=u.intermediate_size,
            num_hidden_layers=u.num_layers,
            num_attention_heads=u.num_heads,
            num_key_value_heads=u.num_kv_heads,
            max_position_embeddings=max(4096, u.max_positions + 64),
            attention_dropout=u.attention_dropout,
        )
        hf_cfg = Qwen2Config(**common) if u.backbone == "qwen2" else LlamaConfig(**common)
        hf_cfg._attn_implementation = u.attn_implementation
        model = AutoModel.from_config(hf_cfg)
    # the token embedding is never used (inputs_embeds); freezing it keeps DDP from waiting for its gradient
    model.get_input_embeddings().weight.requires_grad_(False)
    if u.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


# HF decoder layers of the pre-norm form ``h + attn(norm(h))`` then ``h + mlp(norm(h))`` (their forward, written
# out in _backbone_last_rows); other layer types run whole
_QUERY_ROWS_LAYERS = ("Qwen2DecoderLayer", "LlamaDecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer")


def _query_rows_layers(backbone: nn.Module) -> bool:
    """``backbone`` is an HF decoder whose last layer can run its MLP on some rows only."""
    layers = getattr(backbone, "layers", None)
    cfg = getattr(backbone, "config", None)
    if not layers or cfg is None or getattr(backbone, "has_sliding_layers", False):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])):
        return False
    return all(type(layer).__name__ in _QUERY_ROWS_LAYERS for layer in layers[: cfg.num_hidden_layers])


def _backbone_last_rows(backbone: nn.Module, h: Tensor, attn: Tensor, pos: Tensor, K: int) -> Tensor:
    """The final hidden states of the last ``K`` rows of ``h`` ``[B, T, H]`` (``attn``: the additive mask
    ``[B, 1, T, T]``; ``pos``: position ids ``[B, T]``) -- the backbone's ``last_hidden_state[:, -K:]``, computed
    without the last layer's queries, attention output and MLP on the other rows, which nothing reads at inference
    (in the default tower that MLP alone is about 40% of the forward's multiply-adds).  Every earlier layer runs
    whole, and the last layer's keys and values cover every row."""
    layers = backbone.layers[: backbone.config.num_hidden_layers]
    pos_emb = backbone.rotary_emb(h, pos)
    for layer in layers[:-1]:
        h = layer(h, attention_mask=attn, position_ids=pos, position_embeddings=pos_emb)
        h = h[0] if isinstance(h, tuple) else h  # transformers 4.x layers return tuples
    last = layers[-1]
    x = last.input_layernorm(h)
    a = _attention_last_rows(last.self_attn, x, attn, pos_emb, K)
    if a is None:  # an attention module of another form: all rows, then the last K
        a = last.self_attn(hidden_states=x, attention_mask=attn, position_ids=pos, position_embeddings=pos_emb)[0]
        a = a[:, -K:]
    x = h[:, -K:] + a
    x = x + last.mlp(last.post_attention_layernorm(x))
    return backbone.norm(x)


def _attention_last_rows(attn_mod: nn.Module, x: Tensor, mask: Tensor, pos_emb: tuple[Tensor, Tensor],
                         K: int) -> Tensor | None:
    """The output of an HF Qwen2 / Llama / Mistral attention module for the last ``K`` rows of ``x`` ``[B, T, H]``
    only (queries of those rows, keys and values of all): the module's own projections, its model's rotary
    embedding and its configured attention function (``sdpa`` / ``eager``), so the result equals the module's
    output rows to float rounding.  ``None`` for any other module (e.g. Qwen3's per-head norms)."""
    if type(attn_mod).__name__ not in ("Qwen2Attention", "LlamaAttention", "MistralAttention"):
        return None
    family = sys.modules.get(type(attn_mod).__module__)
    rotary = getattr(family, "apply_rotary_pos_emb", None)
    impl = getattr(attn_mod.config, "_attn_implementation", "eager")
    if impl == "eager":
        fn = getattr(family, "eager_attention_forward", None)
    else:
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        except ImportError:
            return None
        fn = ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else None
    if rotary is None or fn is None:
        return None
    B, T, _ = x.shape
    hd = attn_mod.head_dim
    xq = x[:, -K:]
    q = attn_mod.q_proj(xq).view(B, K, -1, hd).transpose(1, 2)
    k = attn_mod.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
    v = attn_mod.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    cos, sin = pos_emb
    q, _ = rotary(q, q, cos[:, -K:], sin[:, -K:])
    k, _ = rotary(k, k, cos, sin)
    out, _ = fn(attn_mod, q, k, v, mask[:, :, -K:, :], dropout=0.0, scaling=attn_mod.scaling,
                sliding_window=getattr(attn_mod, "sliding_window", None))
    return attn_mod.o_proj(out.reshape(B, K, -1).contiguous())


class RedRec(nn.Module):
    """The RED-Rec two-tower model.  See the module docstring for the data flow."""

    def __init__(self, cfg: ModelConfig, pretrained_weights: bool = True):
        """``pretrained_weights=False``: pretrained towers get their architecture only (no weight file is read;
        :meth:`from_pretrained` loads a saved state dict over them)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        u = cfg.user_tower
        self.backbone = build_backbone(cfg, pretrained_weights)
        H = int(self.backbone.hidden_size if cfg.custom_backbone else self.backbone.config.hidden_size)
        self.hidden_size = H
        self.item_tower = build_item_tower(cfg.item_tower, H, pretrained_weights)
        n_scen = max(1, len(cfg.scenarios))
        self.action_emb = nn.Linear(max(1, cfg.n_actions), H, bias=False)  # multi-hot @ W = sum of flag embeddings
        self.hour_emb = nn.Embedding(UNKNOWN_HOUR + 1, H)
        self.scenario_emb = nn.Embedding(n_scen, H)
        self.pos_emb = nn.Embedding(u.max_positions, H)
        self.gap_emb = nn.Embedding(u.n_gap_buckets, H)
        # K query tokens (none with readout `last`) and the scenario group of each interest vector:
        # [0,0,0,1,1,1,...] (scope `scenario`), all SHARED_GROUP (scope `shared`, readout `last`)
        self.queries = nn.Embedding(cfg.n_queries, H) if u.readout == "queries" else None
        if u.readout == "queries" and u.query_scope == "scenario":
            group = torch.arange(n_scen).repeat_interleave(u.queries_per_scenario)
        else:
            group = torch.full((cfg.n_queries,), SHARED_GROUP, dtype=torch.long)
        self.register_buffer("query_group", group, persistent=False)
        self.head = ProjectionHead(H, cfg.embed_dim, cfg.head_dropout)
        for emb in (self.hour_emb, self.scenario_emb, self.pos_emb, self.gap_emb, self.queries):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.action_emb.weight, std=0.02)

    # -- item side ---------------------------------------------------------------------------------------------
    def item_hidden(self, ids: Tensor, features: Tensor | None = None) -> Tensor:
        """``[...]`` ids (+ ``[..., F]`` features) -> ``[..., H]``."""
        return self.item_tower(ids, features)

    def item_vectors(self, ids: Tensor, features: Tensor | None = None) -> Tensor:
        """Unit retrieval vectors of items: ``[...] -> [..., d]``."""
        return l2norm(self.head(self.item_hidden(ids, features)))

    # -- user side ---------------------------------------------------------------------------------------------
    def event_inputs(self, batch: dict[str, Tensor], item_h: Tensor | None = None) -> Tensor:
        """Sum of the event addends, ``[B, L, H]`` (each switchable in :class:`UserTowerConfig`)."""
        u = self.cfg.user_tower
        if item_h is None:
            item_h = self.item_hidden(batch["item"], batch.get("item_feat"))
        x = item_h if u.use_item else torch.zeros_like(item_h)
        if u.use_actions and self.cfg.n_actions:
            x = x + self.action_emb(batch["actions"].to(x.dtype))
        if u.use_hour:
            x = x + self.hour_emb(batch["hour"])
        if u.use_scenario:
            x = x + self.scenario_emb(batch["scenario"])
        if u.use_position:
            x = x + self.pos_emb(batch["position"].clamp(max=u.max_positions - 1))
        if u.use_time_gap:
            x = x + self.gap_emb(batch["gap"].clamp(max=u.n_gap_buckets - 1))
        return x

    @property
    def n_query_tokens(self) -> int:
        """Query tokens appended after the history: K with readout ``queries``, 0 with ``last``."""
        return self.cfg.n_queries if self.queries is not None else 0

    def attention_allow(self, mask: Tensor) -> Tensor:
        """Boolean ``[B, T, T]`` (``T = L + query tokens``): True where row may attend to column.

        History rows attend causally to real history events; query rows attend to every real history event and to
        themselves (and to the other queries when ``queries_see_each_other``, or to the earlier ones when
        ``queries_causal``); padding rows attend to themselves
        only (no all-masked row, so no NaN).
        """
        B, L = mask.shape
        K = self.n_query_tokens
        T = L + K
        dev = mask.device
        allow = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        allow[:, :L, :L] = causal[None] & mask[:, None, :] & mask[:, :, None]
        allow[:, L:, :L] = mask[:, None, :]
        if self.cfg.user_tower.queries_causal:
            allow[:, L:, L:] = torch.ones(K, K, dtype=torch.bool, device=dev).tril()
        elif self.cfg.user_tower.queries_see_each_other:
            allow[:, L:, L:] = True
        eye = torch.eye(T, dtype=torch.bool, device=dev)
        return allow | eye[None]

    def attention_mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """:meth:`attention_allow` as the additive float mask ``[B, 1, T, T]`` of HF decoders (0 = may attend,
        dtype-min = may not).  HF eager attention ignores boolean 4-D masks: this one is float."""
        allow = self.attention_allow(mask)
        out = torch.zeros(allow.shape[0], 1, *allow.shape[1:], dtype=dtype, device=mask.device)
        out.masked_fill_(~allow[:, None], torch.finfo(dtype).min)
        return out

    def forward(self, batch: dict[str, Tensor], seq: bool = True) -> dict[str, Tensor]:
        """Run the user tower.

        Args:
            batch: a collated batch (:func:`redrec.data.batching.collate`).
            seq: also project the history states (``seq``); ``False`` (inference: embeddings, serving) puts only
                the K interest rows through the head.

        Returns:
            ``seq`` [B, L, d] unit causal states (row t has seen events 0..t; only with ``seq=True``),
            ``interests`` [B, K, d] unit interest vectors (readout ``last``: K = 1, the state at each user's last
            real event), ``item_h`` [B, L, H] the history items' hidden vectors (reusable by losses).
        """
        u = self.cfg.user_tower
        mask = batch["mask"]
        B, L = mask.shape
        K = self.n_query_tokens
        item_h = batch.get("item_h")  # precomputed by a caller (serving), else the item tower's
        if item_h is None:
            item_h = self.item_hidden(batch["item"], batch.get("item_feat"))
        h = self.event_inputs(batch, item_h)
        if self.queries is not None:
            q = self.queries.weight[None].expand(B, K, -1)
            if u.use_scenario and u.query_scope == "scenario":
                q = q + self.scenario_emb(self.query_group)[None]
            h = torch.cat([h, q.to(h.dtype)], dim=1)
        lengths = mask.sum(1)
        # positions (RoPE, HSTU's relative bias): history 0..L-1, every query right after the user's last event
        # (``query_positions: sequential``: query k at that position + k)
        qpos = lengths[:, None].expand(B, K)
        if u.query_positions == "sequential":
            qpos = qpos + torch.arange(K, device=mask.device)[None]
        pos = torch.cat([torch.arange(L, device=mask.device)[None].expand(B, L), qpos], 1)
        if self.cfg.custom_backbone:
            time = batch.get("time")
            if time is None and u.backbone == "hstu":
                raise DataError(None, "time", "the hstu backbone needs the batch's event times (redrec.data.batching.collate)")
            # query tokens sit at t_now: age 0
            time = torch.cat([time, time.new_zeros(B, K)], 1) if time is not None else None
            out = self.backbone(h, self.attention_allow(mask), pos, time)
        elif not seq and not self.training and K and _query_rows_layers(self.backbone):
            # inference: the backbone's final states of the K query rows only; nothing else is read
            out = _backbone_last_rows(self.backbone, h, self.attention_mask(mask, h.dtype), pos, K)  # [B, K, H]
        else:
            attn = self.attention_mask(mask, h.dtype)
            out = self.backbone(inputs_embeds=h, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
        if self.queries is not None:
            rows = out[:, -K:]
        else:  # the causal state at the last real event (row 0, a padding state, for an empty history)
            rows = out[torch.arange(B, device=out.device), (lengths - 1).clamp(min=0)][:, None]
        result = {"interests": l2norm(self.head(rows)), "item_h": item_h}
        if seq:
            result["seq"] = l2norm(self.head(out[:, :L]))
        return result

    # -- save / load -------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """``model.safetensors`` + ``config.yaml`` in ``path`` (written to temp files, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path / ".model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(path / "model.safetensors")
        save_yaml(self.cfg, path / ".config.yaml.tmp")
        (path / ".config.yaml.tmp").replace(path / "config.yaml")

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu") -> RedRec:
        """Load a model saved by :meth:`save_pretrained`; missing or unexpected keys are an error."""
        import yaml
        from safetensors.torch import load_file

        path = Path(path)
        for f in ("config.yaml", "model.safetensors"):
            if not (path / f).exists():
                raise DataError(path / f, None, "missing: not a redrec model directory")
        cfg = from_dict(ModelConfig, yaml.safe_load((path / "config.yaml").read_text()), source=path / "config.yaml")
        model = cls(cfg, pretrained_weights=False)  # every weight comes from the saved state dict
        state = load_file(str(path / "model.safetensors"), device=map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DataError(path / "model.safetensors", None, f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

