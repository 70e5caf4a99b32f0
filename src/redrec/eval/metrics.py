"""Ranking metrics from exact target ranks (pure numpy).

Every metric here is a function of the **1-based ranks** of a user's (deduplicated) target items in the ranked
candidate list.  Ranks come from :func:`rank_of_targets` (a dense score matrix) or from
:func:`redrec.retrieval.exact.target_ranks` (user and item vectors, chunked); both use one tie rule::

    rank(t) = 1 + #{candidates j : s_j > s_t} + #{candidates j : s_j == s_t and j < t}

i.e. a stable ranking by score, descending, the lower item index first among equal scores.  Excluded items are
not candidates; the *other targets are* (a target's rank is its position in the one ranked list, as RedSeqRec's
``eval/eval.py`` reads it off its top-k list), so the targets of one user always have distinct ranks.

Ranks are passed around as an int64 matrix ``[B, T]`` padded with 0 (``T`` = the largest number of targets of a
user in the batch); a rank <= 0 means "no target in this slot".  A ragged list of 1-D rank arrays is accepted too.

Definitions (binary gains, as in the paper section 4.3 and RedSeqRec):

* ``HR@K``   = 1 if any target has rank <= K.
* ``NDCG@K`` = sum over targets with rank <= K of ``1 / log2(rank + 1)``, divided by
  ``IDCG@K = sum_{i=1..min(K, n_targets)} 1 / log2(i + 1)``.
* ``MRR``    = ``1 / (best target rank)``; with ``cutoff`` (the reference ranks a top-1000 list) 0 beyond it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (10, 50, 100, 200, 1000)

RankInput = np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]]


# ---------------------------------------------------------------------------------------------------------------
# ragged helpers
# ---------------------------------------------------------------------------------------------------------------


def unique_in_order(items: np.ndarray | Sequence[int]) -> np.ndarray:
    """int64 unique values of ``items`` in order of first occurrence (negative values, i.e. padding, dropped)."""
    a = np.asarray(items, dtype=np.int64).reshape(-1)
    a = a[a >= 0]
    if a.size <= 1:
        return a.copy()
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)]


def as_ragged(rows: np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]] | None, n: int | None = None) -> list[np.ndarray]:
    """A list of 1-D int64 arrays from a ragged sequence or from a 2-D array padded with negative values.

    ``None`` gives ``n`` empty rows.  Values are deduplicated in order of first occurrence; negatives are dropped.
    """
    if rows is None:
        return [np.zeros(0, np.int64) for _ in range(n or 0)]
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        return [unique_in_order(r) for r in rows]
    return [unique_in_order(r) for r in rows]


def pad_ragged(rows: Sequence[np.ndarray], fill: int = -1, width: int | None = None, dtype=np.int64) -> np.ndarray:
    """Stack 1-D arrays into a ``[len(rows), width]`` matrix, right-padded with ``fill``."""
    w = max((len(r) for r in rows), default=0) if width is None else width
    out = np.full((len(rows), w), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _rank_matrix(ranks: RankInput) -> np.ndarray:
    """int64 ``[B, T]`` ranks with 0 padding from a padded matrix or a ragged list."""
    if isinstance(ranks, np.ndarray) and ranks.ndim == 2:
        r = ranks.astype(np.int64, copy=False)
    else:
        r = pad_ragged([np.asarray(x, dtype=np.int64).reshape(-1) for x in ranks], fill=0)
    return np.where(r > 0, r, 0)


# ---------------------------------------------------------------------------------------------------------------
# ranks from a dense score matrix
# ---------------------------------------------------------------------------------------------------------------


def rank_of_targets(
    scores: np.ndarray,
    targets: np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]],
    excluded: np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]] | None = None,
    *,
    chunk_elems: int = 1 << 22,
) -> np.ndarray:
    """Exact 1-based ranks of each row's targets among the columns of ``scores`` (higher score = better).

    Args:
        scores: ``[B, N]`` scores of every candidate column (any real dtype; a broadcast view is fine).
        targets: per row, the target column indices (ragged list, or ``[B, T]`` padded with -1).
            Duplicates are removed (first occurrence kept).
        excluded: per row, columns that are not candidates (e.g. the user's history).  A target is always
            ranked, even when it is also listed here (the protocols never exclude a target).
        chunk_elems: columns are processed in blocks of about ``chunk_elems / B`` to bound memory.

    Returns:
        int64 ``[B, T]`` ranks (``T`` = most targets of a row after deduplication), 0 in padding slots.
        ``rank(t) = 1 + #{j: s_j > s_t} + #{j: s_j == s_t, j < t}`` over candidate columns ``j != t``
        (the other targets included).

    Raises:
        ValueError: a target index is out of range or a target's score is NaN.
    """
    S = np.asarray(scores)
    if S.ndim != 2:
        raise ValueError(f"scores must be [B, N], got shape {S.shape}")
    B, N = S.shape
    tgt = as_ragged(targets)
    if len(tgt) != B:
        raise ValueError(f"{len(tgt)} target rows for {B} score rows")
    exc = as_ragged(excluded, B)
    if len(exc) != B:
        raise ValueError(f"{len(exc)} exclusion rows for {B} score rows")
    T = pad_ragged(tgt, fill=-1)  # [B, Tm]
    if T.size and T.max() >= N:
        raise ValueError(f"target index {int(T.max())} out of range for {N} candidates")
    valid = T >= 0
    rows = np.arange(B)[:, None]
    st = np.where(valid, S[rows, np.where(valid, T, 0)], 0).astype(np.float64 if S.dtype.kind != "f" else S.dtype)
    if np.isnan(st[valid]).any():
        raise ValueError("a target's score is NaN")
    # excluded (row, column) pairs, targets removed, sorted by column for per-block lookup
    er, ec = _pairs([np.setdiff1d(e, t, assume_unique=True) for e, t in zip(exc, tgt, strict=True)])
    order = np.argsort(ec, kind="stable")
    er, ec = er[order], ec[order]

    counts = np.zeros(T.shape, dtype=np.int64)
    step = max(1, chunk_elems // max(B, 1))
    for a in range(0, N, step):
        b = min(N, a + step)
        blk = np.array(S[:, a:b], dtype=st.dtype)  # a copy we may write into
        lo, hi = np.searchsorted(ec, [a, b])
        if hi > lo:
            blk[er[lo:hi], ec[lo:hi] - a] = -np.inf
        cols = np.arange(a, b)
        for k in range(T.shape[1]):
            s = st[:, k : k + 1]
            t = T[:, k : k + 1]
            c = (blk > s).sum(1) + ((blk == s) & (cols[None, :] < t)).sum(1)
            # the target itself is never its own competitor
            own = valid[:, k] & (T[:, k] >= a) & (T[:, k] < b)
            if own.any():
                r = np.flatnonzero(own)
                c[r] -= blk[r, T[r, k] - a] > st[r, k]
            counts[:, k] += c
    return np.where(valid, counts + 1, 0)


def _pairs(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Flatten a ragged list into (row index, value) arrays."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if lens.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.repeat(np.arange(len(rows)), lens), np.concatenate([np.asarray(r, np.int64) for r in rows])


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------


def _inv_log2(n: int) -> np.ndarray:
    """``1 / log2(i + 1)`` for i = 1..n (index 0 holds i = 1)."""
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))


def hit_rate(ranks: RankInput, k: int) -> np.ndarray:
    """float64 ``[B]``: 1 where any target has rank <= k."""
    r = _rank_matrix(ranks)
    return ((r > 0) & (r <= k)).any(axis=1).astype(np.float64)


def ndcg(ranks: RankInput, k: int) -> np.ndarray:
    """float64 ``[B]``: binary-gain NDCG@k; IDCG over ``min(k, n_targets)`` (0 for a row without targets)."""
    r = _rank_matrix(ranks)
    hit = (r > 0) & (r <= k)
    dcg = np.where(hit, 1.0 / np.log2(np.where(hit, r, 1) + 1.0), 0.0).sum(axis=1)
    n_t = (r > 0).sum(axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(_inv_log2(min(k, r.shape[1]) if r.shape[1] else 0))])
    idcg = ideal[np.minimum(n_t, k)]
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def mrr(ranks: RankInput, cutoff: int | None = None) -> np.ndarray:
    """float64 ``[B]``: ``1 / best target rank``; 0 for rows without targets and, with ``cutoff``, beyond it."""
    r = _rank_matrix(ranks)
    best = np.where(r > 0, r, np.iinfo(np.int64).max).min(axis=1, initial=np.iinfo(np.int64).max)
    ok = best < np.iinfo(np.int64).max
    if cutoff is not None:
        ok &= best <= cutoff
    return np.where(ok, 1.0 / np.where(ok, best, 1), 0.0)


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Column names in report order: ``hr@K`` for every K, ``ndcg@K`` for every K, then ``mrr``."""
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]


def compute_metrics(
    ranks: RankInput,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    mrr_cutoff: int | None = None,
    list_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-user HR@K, NDCG@K (every K in ``ks``) and MRR.

    Args:
        ranks: ``[B, T]`` 1-based target ranks, 0 = padding (or a ragged list).
        ks: cut-offs.
        mrr_cutoff: MRR is 0 when the best rank exceeds it.
        list_size: the ranked list has only this many entries (RedSeqRec ranks a top-1000 list): ranks beyond it
            count for no metric, so HR/NDCG@K for K > list_size equal those at list_size, and MRR is cut too.

    Returns:
        ``{"hr@K": [B], "ndcg@K": [B], ..., "mrr": [B]}`` float64 arrays, in :func:`metric_names` order.
    """
    r = _rank_matrix(ranks)
    if list_size is not None:
        # a target outside the list is still a target (it counts in IDCG): keep the slot, mark it "not retrieved"
        r = np.where(r > list_size, np.iinfo(np.int32).max, r)
        mrr_cutoff = list_size if mrr_cutoff is None else min(mrr_cutoff, list_size)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(r, k)
    for k in ks:
        out[f"ndcg@{k}"] = ndcg(r, k)
    out["mrr"] = mrr(r, mrr_cutoff)
    return out


def mean_metrics(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """Average every per-user metric (NaN for an empty batch)."""
    return {k: (float(np.mean(v)) if len(v) else float("nan")) for k, v in per_user.items()}
