"""HSTU: Hierarchical Sequential Transduction Units, as a backbone of :class:`redrec.model.redrec.RedRec`.

Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for Generative
Recommendations", ICML 2024 (section 3.1).  One layer, for inputs ``X [T, H]``::

    U, V, Q, K = Split(phi_1(f_1(X)))                                     (eq. 1)
    A(X) V(X)  = phi_2(Q K^T + rab^{p,t}) V / n                           (eq. 2)
    Y(X)       = f_2(Norm(A(X) V(X)) * U(X)) + X                          (eq. 3)

with ``phi_1 = phi_2 = SiLU``, ``f_1, f_2`` linear maps, ``Norm`` a LayerNorm and ``*`` the element-wise product.
As in the public implementation (``generative-recommenders``), the layer input is LayerNorm-ed before ``f_1``,
there is no ``1/sqrt(d)`` scaling and no softmax (pointwise aggregated attention), and the relative attention
bias ``rab^{p,t}`` is the sum of

* a learned scalar per relative position ``i - j`` (clamped to ``+-(max_distance - 1)``), and
* a learned scalar per log bucket of the time difference ``|t_i - t_j|``: ``floor(ln(max(|dt|, 1)) / 0.301)``
  (the reference's bucketisation), clamped to ``n_time_buckets``,

one set per layer, shared by the heads.  Times are in the store's unit (seconds); RedRec passes each event's age
``t_now - t_j`` (only differences matter) and 0 for appended query tokens, which sit at ``t_now``.

``n`` normalises the aggregated attention.  The reference divides by the padded sequence length, which would make
outputs depend on how much padding a batch has; here each row is divided by the number of positions it may attend
to (a per-row constant).  Both are per-row scales that the following ``Norm`` almost entirely removes.

Attention masks are given by the caller as a boolean ``allow [B, T, T]``; masked weights are exactly 0, so
padding never reaches a real position and users never mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_TIME_BUCKETS = 128  #: the reference's number of log time buckets


def time_bucket(dt: Tensor, n_buckets: int = N_TIME_BUCKETS) -> Tensor:
    """Log bucket of time differences, ``floor(ln(max(|dt|, 1)) / 0.301)`` clamped to ``[0, n_buckets]``.

    ``dt`` long (any shape, store time units) -> long of the same shape.  Bucket 0 holds ``|dt| <= 1``; each next
    bucket spans a factor ``e^0.301 ~ 1.35``, so 2**31 s (68 years) is bucket 71.
    """
    x = dt.abs().clamp(min=1).double()  # float64: exact enough for any int64 span of seconds
    return (torch.log(x) / 0.301).long().clamp(0, n_buckets)


class RelativeBias(nn.Module):
    """``rab^{p,t}``: learned relative position bias + relative time bias, ``[B, T] x 2 -> [B, T, T]``."""

    def __init__(self, max_distance: int, n_time_buckets: int = N_TIME_BUCKETS):
        super().__init__()
        self.max_distance = max_distance
        self.n_time_buckets = n_time_buckets
        self.pos_bias = nn.Parameter(torch.empty(2 * max_distance - 1).normal_(0.0, 0.02))
        self.time_bias = nn.Parameter(torch.empty(n_time_buckets + 1).normal_(0.0, 0.02))

    def forward(self, position: Tensor, time: Tensor) -> Tensor:
        """``position [B, T]`` long sequence positions, ``time [B, T]`` long times -> bias ``[B, T, T]``."""
        P = self.max_distance
        rel = (position[:, :, None] - position[:, None, :]).clamp(-(P - 1), P - 1) + (P - 1)  # [B, T, T]
        dt = time_bucket(time[:, :, None] - time[:, None, :], self.n_time_buckets)  # [B, T, T]
        return self.pos_bias[rel] + self.time_bias[dt]


class HSTULayer(nn.Module):
    """One HSTU layer (eq. 1-3).  ``x [B, T, H]`` -> ``[B, T, H]``."""

    def __init__(self, hidden: int, heads: int, dropout: float, attn_dropout: float, max_distance: int):
        super().__init__()
        self.heads = heads
        self.f1 = nn.Linear(hidden, 4 * hidden)  # -> U, V, Q, K
        self.f2 = nn.Linear(hidden, hidden)
        self.rab = RelativeBias(max_distance)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = nn.Dropout(attn_dropout)

    def forward(self, x: Tensor, allow: Tensor, position: Tensor, time: Tensor) -> Tensor:
        B, T, H = x.shape
        h, dh = self.heads, H // self.heads
        u, v, q, k = F.silu(self.f1(F.layer_norm(x, (H,), eps=1e-6))).split(H, dim=-1)  # eq. 1, 4 x [B, T, H]
        q, k, v = (t.view(B, T, h, dh).transpose(1, 2) for t in (q, k, v))  # [B, h, T, dh]
        scores = q @ k.transpose(-1, -2) + self.rab(position, time)[:, None].to(q.dtype)  # [B, h, T, T]
        n = allow.sum(-1).clamp(min=1).to(q.dtype)  # [B, T] attended positions per row
        a = F.silu(scores) * (allow / n[..., None])[:, None]  # eq. 2: pointwise, masked weights are exactly 0
        av = (self.attn_dropout(a) @ v).transpose(1, 2).reshape(B, T, H)  # [B, T, H]
        y = F.layer_norm(av, (H,), eps=1e-6) * u  # eq. 3: Norm(A V) * U
        return x + self.f2(self.dropout(y))


class HSTU(nn.Module):
    """The HSTU encoder: input dropout, then ``num_layers`` :class:`HSTULayer` s (no final norm, as in the reference).

    Args:
        hidden, layers, heads: width H, layers, heads (``H % heads == 0``).
        dropout: hidden dropout (input and before ``f_2``); attn_dropout: on the aggregated attention weights.
        max_distance: relative positions are clamped to ``+-(max_distance - 1)``.
    """

    def __init__(self, hidden: int, layers: int, heads: int, dropout: float = 0.0, attn_dropout: float = 0.0,
                 max_distance: int = 1024):
        super().__init__()
        self.hidden_size = hidden
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(HSTULayer(hidden, heads, dropout, attn_dropout, max_distance) for _ in range(layers))

    def forward(self, x: Tensor, allow: Tensor, position: Tensor, time: Tensor) -> Tensor:
        """``x [B, T, H]`` event inputs, ``allow [B, T, T]`` bool, ``position``/``time [B, T]`` long -> ``[B, T, H]``."""
        h = self.dropout(x)
        for layer in self.layers:
            h = layer(h, allow, position, time)
        return h


__all__ = ["HSTU", "HSTULayer", "RelativeBias", "time_bucket"]
