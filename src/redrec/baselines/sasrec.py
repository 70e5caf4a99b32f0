"""SASRec: the self-attentive sequential recommender's encoder, as a backbone of :class:`redrec.model.redrec.RedRec`.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (section III).  The paper's input is
``E_hat = M_s + P`` (item embedding + learned absolute position, eq. 1); here RedRec's event input supplies both
(item tower + ``pos_emb`` with ``use_position``).  Then, with pre-LayerNorm residual blocks (section III-B/C;
the public implementation normalises before attention and before the feed-forward net)::

    h_0 = Dropout(E_hat)
    a_b = h_{b-1} + Dropout(Attn(LN(h_{b-1})))                 causal multi-head self-attention (eq. 2-3)
    h_b = a_b + Dropout(W_2 Dropout(GELU(W_1 LN(a_b))))       point-wise feed-forward net (eq. 4)
    out = LN(h_N)

Training is RedRec's: the next-item sampled softmax over the states ``out[t]`` (eq. 6 of RED-Rec, with shared
uniform plus in-batch negatives -- the "sampled softmax" SASRec rows of the HSTU paper), not SASRec's original
binary cross-entropy with one negative.

Attention masks are given by the caller as a boolean ``allow [B, T, T]`` (True = row may attend to column);
RedRec builds it causal over each user's real events, with padding rows attending to themselves only, so padding
never reaches a real position and users never mix.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SASRecBlock(nn.Module):
    """One pre-LN transformer block: ``x + Attn(LN(x))`` then ``+ FFN(LN(.))``.  Shapes ``[B, T, H] -> [B, T, H]``."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allow: Tensor) -> Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(H, dim=-1)  # 3 x [B, T, H]
        q, k, v = (t.view(B, T, self.heads, H // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, h, T, H/h]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allow[:, None],
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, H)))
        return x + self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(self.ln2(x))))))


class SASRec(nn.Module):
    """The SASRec encoder: input dropout, ``num_layers`` :class:`SASRecBlock` s, final LayerNorm.

    Args:
        hidden, layers, heads, ffn: width H, blocks, attention heads, feed-forward width.
        dropout: hidden dropout (input, residual branches, FFN); attn_dropout: on the attention weights.
    """

    def __init__(self, hidden: int, layers: int, heads: int, ffn: int, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.hidden_size = hidden
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(hidden, heads, ffn, dropout, attn_dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, allow: Tensor, position: Tensor | None = None, time: Tensor | None = None) -> Tensor:
        """``x [B, T, H]`` event inputs (positions already added), ``allow [B, T, T]`` bool -> ``[B, T, H]``.

        ``position`` and ``time`` are accepted for a common backbone signature and unused (SASRec's positions are
        the absolute embeddings already in ``x``).  Every row of ``allow`` must allow at least one column.
        """
        h = self.dropout(x)
        for block in self.blocks:
            h = block(h, allow)
        return self.ln_f(h)


__all__ = ["SASRec", "SASRecBlock"]
