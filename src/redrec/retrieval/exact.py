"""Exact multi-vector retrieval on CPU (torch float32 matmul), chunked over users and items.

A user is ``K`` interest vectors, an item one vector; the score of item ``i`` for user ``u`` is
``max_k cos(u_k, v_i)`` (paper section 4.2: "score = max over the user's K vectors").  Inputs need not be
normalised (they are L2-normalised here; an all-zero vector scores 0 against everything).

Ranking rule, shared with :func:`redrec.eval.metrics.rank_of_targets`: items are ordered by score, descending,
the lower item index first among equal scores::

    rank(t) = 1 + #{j : s_j > s_t} + #{j : s_j == s_t and j < t}     (j over the non-excluded items, j != t)

Memory is bounded: users are processed ``user_chunk`` at a time and items ``item_chunk`` at a time, so a
``[B, N]`` score matrix is never built for a large item pool.

Exactness: scores are float32.  CPU BLAS may round one (user, item) dot product differently in two matmul calls
of different shapes, so a target's score is recomputed *inside every item block's matmul* (its vector is appended
to the block): each comparison is between numbers from the same matmul, and items whose vectors equal the target's
always tie with it.  This is a straightforward engine; a fast one (FAISS, GPU) lives elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from redrec.eval.metrics import as_ragged, pad_ragged

ArrayLike = np.ndarray | torch.Tensor

_BLOCK_ELEMS = 1 << 24  # float32 entries of one [user_chunk * K, item_chunk] block (64 MiB)
_TARGET_COLS = 4096  # target_ranks: at most this many target columns appended to each block


def _tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32)
    a = np.ascontiguousarray(x, dtype=np.float32)
    if not a.flags.writeable:  # a read-only memory map: torch wants its own (block-sized) copy
        a = a.copy()
    return torch.from_numpy(a)


def normalize(x: ArrayLike, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last dimension (float32 CPU tensor); all-zero vectors stay zero."""
    t = _tensor(x)
    return t / t.norm(dim=-1, keepdim=True).clamp_min(eps)


def _user_tensor(user_vecs: ArrayLike) -> torch.Tensor:
    u = _tensor(user_vecs)
    if u.ndim != 3:
        raise ValueError(f"user vectors must be [B, K, d] (use [B, 1, d] for one vector per user), got {tuple(u.shape)}")
    return normalize(u)


def _check_dims(u: torch.Tensor, item_vecs: ArrayLike) -> int:
    if item_vecs.ndim != 2:
        raise ValueError(f"item vectors must be [N, d], got shape {tuple(item_vecs.shape)}")
    if item_vecs.shape[1] != u.shape[2]:
        raise ValueError(f"user vectors have d={u.shape[2]} but item vectors have d={item_vecs.shape[1]}")
    return int(item_vecs.shape[0])


def _item_block(item_vecs: ArrayLike, a: int, b: int) -> torch.Tensor:
    return normalize(item_vecs[a:b])


def _gather_items(item_vecs: ArrayLike, idx: np.ndarray) -> torch.Tensor:
    """Normalised vectors of item indices ``idx`` (any shape, -1 = padding -> zero vector)."""
    flat = np.asarray(idx, dtype=np.int64).reshape(-1)
    ok = flat >= 0
    d = int(item_vecs.shape[1])
    out = torch.zeros((flat.size, d), dtype=torch.float32)
    if ok.any():
        pos = flat[ok]
        if isinstance(item_vecs, torch.Tensor):
            rows = item_vecs[torch.from_numpy(pos)]
        else:
            order = np.argsort(pos, kind="stable")  # sorted reads are kinder to a memory-mapped file
            rows_sorted = np.asarray(item_vecs[pos[order]])
            rows = np.empty_like(rows_sorted)
            rows[order] = rows_sorted
        out[torch.from_numpy(np.flatnonzero(ok))] = normalize(rows)
    return out.reshape(*np.shape(idx), d)


def _max_over_k(scores: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """``[b*K, n]`` -> ``[b, n]`` max over each user's K rows."""
    return scores.view(b, k, -1).amax(dim=1)


def _item_chunk(item_chunk: int | None, rows: int, extra: int = 0) -> int:
    if item_chunk is not None:
        if item_chunk < 1:
            raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
        return item_chunk
    return max(1024, _BLOCK_ELEMS // max(rows, 1) - extra)


def _excluded_pairs(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs sorted by item, for per-block lookup with searchsorted."""
    lens = [len(r) for r in rows]
    if sum(lens) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    r = np.repeat(np.arange(len(rows)), lens)
    c = np.concatenate([np.asarray(x, np.int64) for x in rows])
    o = np.argsort(c, kind="stable")
    return r[o], c[o]


# ---------------------------------------------------------------------------------------------------------------
# dense scores (small pools)
# ---------------------------------------------------------------------------------------------------------------


def max_cosine(user_vecs: ArrayLike, item_vecs: ArrayLike) -> torch.Tensor:
    """Dense float32 ``[B, N]`` scores ``max_k cos(u_k, v_i)``; for small pools and tests (builds ``[B*K, N]``)."""
    u = _user_tensor(user_vecs)
    _check_dims(u, item_vecs)
    B, K, d = u.shape
    return _max_over_k(u.reshape(B * K, d) @ normalize(item_vecs).T, B, K)


def score_candidates(user_vecs: ArrayLike, item_vecs: ArrayLike, candidates: np.ndarray) -> np.ndarray:
    """float32 ``[B, C]`` scores of per-user candidate items (a sampled pool).

    Args:
        user_vecs: ``[B, K, d]``.
        item_vecs: ``[N, d]`` (array, memmap or tensor).
        candidates: int64 ``[B, C]`` item indices, -1 = padding (scored ``-inf``).
    """
    u = _user_tensor(user_vecs)
    _check_dims(u, item_vecs)
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != u.shape[0]:
        raise ValueError(f"candidates must be [B={u.shape[0]}, C], got shape {cand.shape}")
    v = _gather_items(item_vecs, cand)  # [B, C, d]
    s = torch.bmm(u, v.transpose(1, 2)).amax(dim=1).numpy()  # one matmul per user: target and rivals together
    s[cand < 0] = -np.inf
    return s


# ---------------------------------------------------------------------------------------------------------------
# exact ranks of targets over the full pool
# ---------------------------------------------------------------------------------------------------------------


def target_ranks(
    user_vecs: ArrayLike,
    item_vecs: ArrayLike,
    targets: np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]],
    exclude: np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]] | None = None,
    *,
    user_chunk: int = 256,
    item_chunk: int | None = None,
) -> np.ndarray:
    """Exact 1-based ranks of each user's targets among all items, without building ``[B, N]``.

    Args:
        user_vecs: ``[B, K, d]`` interest vectors.
        item_vecs: ``[N, d]`` item vectors (a memory-mapped array is read block by block).
        targets: per user, target item indices (ragged list or ``[B, T]`` padded with -1); deduplicated.
        exclude: per user, items that are not candidates (targets are never excluded, even when listed).
        user_chunk: users per block (fewer when users have many targets).
        item_chunk: items per block (default: about 16M scores per block).

    Returns:
        int64 ``[B, T]`` ranks (0 = padding), same rule as :func:`redrec.eval.metrics.rank_of_targets`.
    """
    u_all = _user_tensor(user_vecs)
    N = _check_dims(u_all, item_vecs)
    B, K, d = u_all.shape
    tgt = as_ragged(targets)
    exc = as_ragged(exclude, B)
    if len(tgt) != B or len(exc) != B:
        raise ValueError(f"need one target row and one exclusion row per user ({B}), got {len(tgt)} and {len(exc)}")
    T_all = pad_ragged(tgt, fill=-1)
    if T_all.size and T_all.max() >= N:
        raise ValueError(f"target item {int(T_all.max())} out of range for {N} items")
    out = np.zeros(T_all.shape, dtype=np.int64)
    Tm = T_all.shape[1]
    if Tm == 0:
        return out

    # every block's matmul also scores the chunk's b * Tm target vectors: keep that overhead small when users
    # have many targets
    uc = max(1, min(user_chunk, _TARGET_COLS // Tm))
    for u0 in range(0, B, uc):
        u1 = min(B, u0 + uc)
        b = u1 - u0
        U = u_all[u0:u1].reshape(b * K, d)
        T = T_all[u0:u1]  # [b, Tm]
        valid = T >= 0
        tvec = _gather_items(item_vecs, T).reshape(b * Tm, d)  # appended to every item block
        er, ec = _excluded_pairs([np.setdiff1d(e, t, assume_unique=True) for e, t in zip(exc[u0:u1], tgt[u0:u1], strict=True)])
        counts = torch.zeros((b, Tm), dtype=torch.int64)
        Tt = torch.from_numpy(T)  # [b, Tm]
        rows_b = torch.arange(b)
        step = _item_chunk(item_chunk, b * K, b * Tm)
        for a in range(0, N, step):
            e = min(N, a + step)
            S = _max_over_k(U @ torch.cat([tvec, _item_block(item_vecs, a, e)]).T, b, K)  # [b, b*Tm + n]
            st = S[:, : b * Tm].reshape(b, b, Tm)[rows_b, rows_b]  # [b, Tm]: each user's own targets
            S = S[:, b * Tm :]
            lo, hi = np.searchsorted(ec, [a, e])
            if hi > lo:
                S[torch.from_numpy(er[lo:hi]), torch.from_numpy(ec[lo:hi] - a)] = -torch.inf
            cols = torch.arange(a, e)
            for k in range(Tm):
                s = st[:, k : k + 1]
                t = Tt[:, k : k + 1]
                c = (S > s).sum(1) + ((S == s) & (cols[None, :] < t)).sum(1)
                own = np.flatnonzero(valid[:, k] & (T[:, k] >= a) & (T[:, k] < e))
                if own.size:  # the target's own column is never a competitor
                    r = torch.from_numpy(own)
                    c[r] -= (S[r, torch.from_numpy(T[own, k] - a)] > st[r, k]).long()
                counts[:, k] += c
        out[u0:u1] = np.where(valid, counts.numpy() + 1, 0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# top-k
# ---------------------------------------------------------------------------------------------------------------


def topk(
    user_vecs: ArrayLike,
    item_vecs: ArrayLike,
    k: int,
    exclude: np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]] | None = None,
    *,
    user_chunk: int = 256,
    item_chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items per user, best first, ties broken by the lower item index.

    Args:
        user_vecs: ``[B, K, d]``; item_vecs: ``[N, d]``.
        k: list length (clamped to N).
        exclude: per user, item indices never returned.

    Returns:
        ``(indices int64 [B, k], scores float32 [B, k])``; slots left when fewer than k items are eligible
        hold index -1 and score ``-inf``.
    """
    u_all = _user_tensor(user_vecs)
    N = _check_dims(u_all, item_vecs)
    B, Kq, d = u_all.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, N)
    exc = as_ragged(exclude, B)
    if len(exc) != B:
        raise ValueError(f"{len(exc)} exclusion rows for {B} users")
    out_i = np.full((B, k), -1, dtype=np.int64)
    out_s = np.full((B, k), -np.inf, dtype=np.float32)
    for u0 in range(0, B, user_chunk):
        u1 = min(B, u0 + user_chunk)
        b = u1 - u0
        U = u_all[u0:u1].reshape(b * Kq, d)
        er, ec = _excluded_pairs(exc[u0:u1])
        best_s = torch.full((b, 0), -torch.inf)
        best_i = torch.zeros((b, 0), dtype=torch.int64)
        step = _item_chunk(item_chunk, b * Kq)
        for a in range(0, N, step):
            e = min(N, a + step)
            S = _max_over_k(U @ _item_block(item_vecs, a, e).T, b, Kq)
            lo, hi = np.searchsorted(ec, [a, e])
            if hi > lo:
                S[torch.from_numpy(er[lo:hi]), torch.from_numpy(ec[lo:hi] - a)] = -torch.inf
            # running best (all indices < a, ordered best first) then this block (ascending index): a stable sort
            # by descending score keeps the lower index first among equal scores
            cand_s = torch.cat([best_s, S], dim=1)
            cand_i = torch.cat([best_i, torch.arange(a, e).expand(b, -1)], dim=1)
            order = torch.sort(-cand_s, dim=1, stable=True).indices[:, :k]
            best_s = torch.gather(cand_s, 1, order)
            best_i = torch.gather(cand_i, 1, order)
        bi, bs = best_i.numpy(), best_s.numpy()
        bi = np.where(np.isneginf(bs), -1, bi)
        out_i[u0:u1], out_s[u0:u1] = bi, bs
    return out_i, out_s
