"""Fast exact multi-vector top-k retrieval on CPU: float32 BLAS tiles, a fused selection kernel, float64 check.

A user is ``K`` interest vectors, an item one vector; the score of item ``i`` for user ``u`` is
``s(u, i) = max_k cos(u_k, v_i)`` (DESIGN.md section 1; paper section 4.2).  :func:`search` returns each user's
``k`` best items over the whole pool, optionally without each user's excluded items (its history), **identical to a
float64 computation**: items ordered by float64 score, descending, the lower item index first among equal scores.

How it is fast (the naive ``matmul + topk`` spends most of its time in top-k selection and memory traffic):

1. *Tiles that stay in cache.*  Users are taken ``user_block`` at a time (``user_block * K`` query rows) and items
   ``item_block`` at a time; one ``[user_block*K, item_block]`` float32 score tile (about 1 MiB by default, the L2
   size of one core) is computed by ``torch.mm(out=...)`` and consumed at once by the selection kernel while it is
   still in cache.  The two cores work on different user blocks (one BLAS thread each), so one core's memory-bound
   selection overlaps the other's compute-bound matmul.
2. *Selection that touches almost nothing.*  Per user and tile the numba kernel folds the tile row into 128
   columns (column ``c`` = the max over the user's K rows and over items ``c, c+128, ...``: element-wise maxima,
   which vectorise) and opens only the columns above the user's threshold.  Survivors are appended, in index
   order, to a per-user buffer (no heap); when the buffer is full it is compacted to its best ``k'`` and the
   threshold rises to the ``k'``-th score.
3. *A good threshold from the start.*  Before the scan, each user's scores on a fixed sample of ``n_sample`` items
   give an estimate of its final ``k'``-th score (a sample quantile chosen so that about twice ``k'`` items are
   expected above it).  The few users whose estimate was too high (fewer than ``k'`` items above it) are scanned
   again from ``-inf``, so the estimate only ever costs time, never exactness.

Why the result is float64-exact: every item the float32 scan did not keep has float32 score ``<= m32`` (the lowest
kept float32 score), so its float64 score is ``<= m32 + eps`` where ``eps`` bounds the float32 error of a cosine
of d-dimensional vectors (normalisation and dot product: ``eps = 4 (d + 4) 2^-24``).  The scan keeps
``k' = k + margin`` candidates, rescores them in float64 and checks that the ``k``-th float64 score is ``> m32 + eps``;
a user for whom it is not (near-ties at the boundary: rare) is recomputed in float64 over the whole pool.

Memory is bounded by the tiles and the per-user buffers (``user_block`` x ``buffer`` entries per worker), never by
the pool: items may be a ``np.memmap`` of 10M+ rows, read one ``item_block`` at a time (and normalised on the fly).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from numba import njit

ArrayLike = np.ndarray | torch.Tensor

_FASTMATH = {"nnan", "nsz", "reassoc"}
_FOLD = 128  # fold width of the scan kernel (items c, c + 128, ... share one column maximum)  # max reductions may be reordered (no NaNs: checked on input)


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EngineConfig:
    """Tuning knobs of :func:`search` (the defaults suit a 2-core AVX-512 machine with 1 MiB L2 per core).

    Attributes:
        threads: worker threads (each runs a one-thread BLAS and the selection kernel); ``0`` = ``os.cpu_count()``.
        blas: which library multiplies the tiles: ``numpy`` (its OpenBLAS, held to one thread per worker with
            threadpoolctl; about 10% faster than torch's MKL on AMD here) or ``torch``.
        user_block: users per tile (``user_block * K`` query rows).
        item_block: items per tile.
        margin: extra candidates kept beyond ``k`` for the float64 check.
        buffer_factor: per-user candidate buffer = ``buffer_factor * (k + margin)`` entries.
        n_sample: items scored up front to estimate each user's threshold (0 = start from ``-inf``).
        sample_ratio: the estimate aims at ``sample_ratio * (k + margin)`` items above the threshold.
        seed: seeds the item sample.
    """

    threads: int = 0
    blas: Literal["numpy", "torch"] = "numpy"
    user_block: int = 64
    item_block: int = 1024
    margin: int = 32
    buffer_factor: int = 4
    n_sample: int = 16384
    sample_ratio: float = 2.0
    seed: int = 0

    def validate(self) -> None:
        for name in ("user_block", "item_block", "buffer_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.buffer_factor < 2:
            raise ValueError(f"EngineConfig.buffer_factor must be >= 2, got {self.buffer_factor}")
        if self.margin < 0 or self.n_sample < 0 or self.threads < 0:
            raise ValueError("EngineConfig.margin, n_sample and threads must be >= 0")
        if self.sample_ratio <= 1.0:
            raise ValueError(f"EngineConfig.sample_ratio must be > 1, got {self.sample_ratio}")


def float32_cosine_error(d: int) -> float:
    """Bound on ``|cos32 - cos64|`` for d-dim vectors normalised and dotted in float32 (with a 2x safety factor)."""
    return 4.0 * (d + 4) * 2.0**-24


# ---------------------------------------------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _compact(buf_s, buf_i, buf_d, n, keep):
    """Keep the best ``keep`` of ``buf[:n]`` (float32 score desc, index asc) in place, in their original order.

    ``buf_d`` (the float64 scores) moves along.

    Returns the new count and the new threshold: the ``keep``-th best score.  Entries are in ascending index
    order (they were appended while scanning items in order), so among scores equal to the threshold the first
    ones seen are the lower indices: they are kept, the later ones dropped.
    """
    thr = np.partition(buf_s[:n], n - keep)[n - keep]
    n_above = 0
    for j in range(n):
        if buf_s[j] > thr:
            n_above += 1
    quota_eq = keep - n_above
    w = 0
    for j in range(n):
        s = buf_s[j]
        if s > thr or (s == thr and quota_eq > 0):
            if s == thr:
                quota_eq -= 1
            buf_s[w] = s
            buf_i[w] = buf_i[j]
            buf_d[w] = buf_d[j]
            w += 1
    return w, thr


@njit(nogil=True, fastmath=_FASTMATH, cache=True, inline="always")
def _cos64(X, row, q):
    """``max_k cos64(q_k, X[row])`` with ``q`` ``[K, d]`` float64 unit rows (the item row normalised in float64)."""
    K, d = q.shape
    nrm = 0.0
    for t in range(d):
        x = np.float64(X[row, t])
        nrm += x * x
    best = -np.inf
    for k in range(K):
        dot = 0.0
        for t in range(d):
            dot += q[k, t] * np.float64(X[row, t])
        best = dot if dot > best else best
    return best / max(np.sqrt(nrm), 1e-300)


@njit(nogil=True, cache=True, inline="always")
def _max_k(S, r0, K, j):
    """``max(S[r0, j], ..., S[r0 + K - 1, j])``: one item's score for one user."""
    v = S[r0, j]
    for k in range(1, K):
        w = S[r0 + k, j]
        v = w if w > v else v
    return v


@njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _scan_tile(S, K, a, thr, buf_s, buf_i, buf_d, cnt, raised, keep, cand, ex_items, ex_ptr, ex_end, X, Q64):
    """Consume one score tile ``S`` ``[b*K, C]`` (rows ``u*K .. u*K+K-1`` are user u; columns are items ``a + j``).

    Per user u: ``thr[u]`` (strict: an item must score above it), the append buffer ``buf_s[u], buf_i[u]`` with
    ``cnt[u]`` entries, ``raised[u]`` set once a compaction raised the threshold, and the user's sorted excluded
    items ``ex_items[ex_ptr[u]:ex_end[u]]`` (``ex_ptr`` advances as the scan moves right).  ``cand`` is an int64
    scratch of at least ``C`` entries.  A survivor's float64 score (``Q64[u]`` against item row ``X[a + j]``, still
    in cache from the tile's matmul) goes to ``buf_d``.

    The tile row of a user is folded into ``_FOLD`` columns: ``col[c] = max over its K rows and over the items
    ``c, c + _FOLD, c + 2 _FOLD, ...`` -- an element-wise max that vectorises (a horizontal max reduction does
    not).  Only the columns above the threshold (a handful) are opened; their survivors are sorted by index and
    appended in that order, which the tie rule of :func:`_compact` relies on.
    """
    b = thr.shape[0]
    C = S.shape[1]
    cap = buf_s.shape[1]
    W = _FOLD
    R = C // W
    col = np.empty(W, np.float32)
    for u in range(b):
        r0 = u * K
        t = thr[u]
        nc = 0
        if R > 0:
            first = S[r0]
            for c in range(W):
                col[c] = first[c]
            for k in range(K):
                row = S[r0 + k]
                for r in range(1 if k == 0 else 0, R):
                    o = r * W
                    for c in range(W):
                        x = row[o + c]
                        col[c] = x if x > col[c] else col[c]
            for c in range(W):
                if col[c] > t:
                    for r in range(R):
                        j = r * W + c
                        if _max_k(S, r0, K, j) > t:
                            cand[nc] = j
                            nc += 1
        for j in range(R * W, C):  # the tail that does not fill a fold row
            if _max_k(S, r0, K, j) > t:
                cand[nc] = j
                nc += 1
        if nc == 0:
            continue
        for q in range(1, nc):  # insertion sort: a handful of survivors, no allocation
            x = cand[q]
            z = q - 1
            while z >= 0 and cand[z] > x:
                cand[z + 1] = cand[z]
                z -= 1
            cand[z + 1] = x
        for q in range(nc):
            j = cand[q]
            v = _max_k(S, r0, K, j)
            if not v > t:  # the threshold may have risen (compaction) since the survivor was found
                continue
            item = a + j
            p = ex_ptr[u]
            while p < ex_end[u] and ex_items[p] < item:
                p += 1
            ex_ptr[u] = p
            if p < ex_end[u] and ex_items[p] == item:
                continue
            n = cnt[u]
            buf_s[u, n] = v
            buf_i[u, n] = item
            buf_d[u, n] = _cos64(X, item, Q64[u])
            n += 1
            if n == cap:
                n, t = _compact(buf_s[u], buf_i[u], buf_d[u], n, keep)
                raised[u] = True
            cnt[u] = n
        thr[u] = t


@njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _sample_thresholds(S, K, rank, sample_ids, ex_items, ex_off, out):
    """Per user, the ``rank``-th best of its (max over K) scores on the sample, excluded items ignored.

    Selection without sorting the sample: the ``rank``-th largest of the fold-column maxima (``_FOLD`` columns,
    as in :func:`_scan_tile`) is a lower bound ``L`` of the answer (those columns hold ``rank`` distinct items
    ``>= L``), so only the few items ``>= L`` are partitioned.
    """
    b = out.shape[0]
    M = S.shape[1]
    W = _FOLD
    m = np.empty(M, np.float32)
    col = np.empty(W, np.float32)
    pick = np.empty(M, np.float32)
    for u in range(b):
        r0 = u * K
        m[:] = S[r0]
        for k in range(1, K):
            row = S[r0 + k]
            for j in range(M):
                m[j] = row[j] if row[j] > m[j] else m[j]
        lo, hi = ex_off[u], ex_off[u + 1]
        if hi > lo:
            pos = np.searchsorted(sample_ids, ex_items[lo:hi])
            for q in range(pos.shape[0]):
                if pos[q] < M and sample_ids[pos[q]] == ex_items[lo + q]:
                    m[pos[q]] = -np.inf
        R = M // W
        if rank > W or R == 0:
            out[u] = np.partition(m, M - rank)[M - rank]
            continue
        col[:] = m[:W]
        for r in range(1, R):
            o = r * W
            for c in range(W):
                col[c] = m[o + c] if m[o + c] > col[c] else col[c]
        L = np.sort(col)[W - rank]
        n = 0
        for j in range(M):
            if m[j] >= L:
                pick[n] = m[j]
                n += 1
        out[u] = np.partition(pick[:n], n - rank)[n - rank]


@njit(nogil=True, cache=True)
def _finish(buf_s, buf_i, buf_d, cnt, keep, k, eps, complete, out_i, out_s, need_fallback):
    """float32 candidates -> the best ``k`` by float64 score (index ascending among equal scores).

    Per user: keep the best ``keep`` float32 candidates, sort them stably by descending float64 score (the
    candidates are in index order, so ties stay in index order) and flag the user for the float64 fallback unless
    the ``k``-th float64 score beats every non-candidate's bound ``m32 + eps`` (or every eligible item is a
    candidate: ``complete[u]``).
    """
    b = cnt.shape[0]
    for u in range(b):
        n = cnt[u]
        if n > keep:
            n, _ = _compact(buf_s[u], buf_i[u], buf_d[u], n, keep)
        if n == 0:
            continue
        m32 = buf_s[u, :n].min()
        s64 = buf_d[u, :n]
        order = np.argsort(-s64, kind="mergesort")  # stable: equal scores keep index order
        kk = min(k, n)
        for r in range(kk):
            out_i[u, r] = buf_i[u, order[r]]
            out_s[u, r] = np.float32(s64[order[r]])
        if not complete[u] and (kk < k or not s64[order[kk - 1]] > m32 + eps):
            need_fallback[u] = True


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _as_f32(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _normalize32(x: np.ndarray) -> np.ndarray:
    """float32 L2 normalisation of the last axis (all-zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.sqrt(np.einsum("...i,...i->...", x, x, dtype=np.float32))[..., None]
    return x / np.maximum(n, np.float32(1e-12))


def _normalize64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.sqrt(np.einsum("...i,...i->...", x, x))[..., None]
    return x / np.maximum(n, 1e-300)


def _exclusion_csr(exclude: Sequence[Sequence[int]] | None, B: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user sorted unique excluded items as CSR (offsets ``[B+1]``, items)."""
    off = np.zeros(B + 1, np.int64)
    if exclude is None:
        return off, np.zeros(0, np.int64)
    if len(exclude) != B:
        raise ValueError(f"{len(exclude)} exclusion rows for {B} users")
    rows = []
    for u, e in enumerate(exclude):
        r = np.unique(np.asarray(e, dtype=np.int64))
        r = r[r >= 0]
        if r.size and r[-1] >= N:
            raise ValueError(f"user {u}: excluded item {int(r[-1])} out of range for {N} items")
        rows.append(r)
        off[u + 1] = off[u] + r.size
    return off, (np.concatenate(rows) if rows else np.zeros(0, np.int64))


def _item_tiles(items: np.ndarray, block: int, normalized: bool):
    """Yield ``(a, e, float32 unit rows [e-a, d] as a tensor)``; rows of normalised C-contiguous items are views."""
    N = items.shape[0]
    whole = None
    if normalized and items.flags.c_contiguous:
        with warnings.catch_warnings():  # a read-only memmap: torch warns that it cannot write to it (it never does)
            warnings.simplefilter("ignore", UserWarning)
            whole = torch.from_numpy(items)
    for a in range(0, N, block):
        e = min(N, a + block)
        yield a, e, (whole[a:e] if whole is not None else torch.from_numpy(_normalize32(items[a:e])))


@dataclass
class SearchStats:
    """What one :func:`search` call did (for benchmarks and curiosity)."""

    users: int = 0
    rescanned: int = 0  #: users whose sampled threshold was too high (scanned again from -inf)
    float64_fallback: int = 0  #: users recomputed in float64 over the whole pool (near-ties at the boundary)


# ---------------------------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------------------------


def search(
    users: ArrayLike,
    items: ArrayLike,
    k: int,
    exclude: Sequence[Sequence[int]] | None = None,
    *,
    config: EngineConfig | None = None,
    items_normalized: bool = False,
    stats: SearchStats | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``max_k cos(u_k, v_i)`` over the whole pool for every user.

    Args:
        users: ``[B, K, d]`` interest vectors (``[B, d]`` = one vector per user); any scale (normalised here).
        items: ``[N, d]`` item vectors: array, ``np.memmap`` (read tile by tile) or tensor.
        k: list length (clamped to the number of eligible items; missing slots are index -1, score -inf).
        exclude: per user, item indices never returned (e.g. the history); ``None`` = none.
        config: tuning (:class:`EngineConfig`).
        items_normalized: the item rows are already float32 unit vectors (skips normalising each tile).
        stats: filled with what happened (rescans, float64 fallbacks).

    Returns:
        ``(indices int64 [B, k], scores float32 [B, k])``, best first; scores are the float64 cosines rounded to
        float32; order = float64 score descending, lower index first among equal scores.
    """
    cfg = config or EngineConfig()
    cfg.validate()
    U = _as_f32(users)
    if U.ndim == 2:
        U = U[:, None, :]
    if U.ndim != 3:
        raise ValueError(f"users must be [B, K, d] or [B, d], got shape {U.shape}")
    if isinstance(items, torch.Tensor):
        items = items.detach().cpu().numpy()
    items = np.asarray(items)
    if items.dtype != np.float32:
        items = items.astype(np.float32)  # a copy: pass float32 (a memmap is read in place)
    X = items.view(np.ndarray) if isinstance(items, np.memmap) else items
    if items.ndim != 2 or items.shape[1] != U.shape[2]:
        raise ValueError(f"items must be [N, d={U.shape[2]}], got shape {tuple(items.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not np.isfinite(U).all():
        raise ValueError("user vectors contain NaN or inf")
    B, K, d = U.shape
    N = int(items.shape[0])
    k = min(k, N)
    st = stats if stats is not None else SearchStats()
    st.users = B
    out_i = np.full((B, k), -1, np.int64)
    out_s = np.full((B, k), -np.inf, np.float32)
    if B == 0 or N == 0:
        return out_i, out_s

    keep = min(N, k + cfg.margin)
    cap = max(cfg.buffer_factor * keep, keep + 1)
    ex_off, ex_items = _exclusion_csr(exclude, B, N)
    Q32 = _normalize32(U).reshape(B * K, d)
    Q64 = _normalize64(U)  # [B, K, d]
    eps = float32_cosine_error(d)

    # the item sample for the threshold estimate (sorted ids: the kernel looks excluded items up by bisection)
    # sample size: enough for a rank-32 quantile (count above it ~ 2 keep +- 18%), at most n_sample and N/16
    M = min(cfg.n_sample, N // 16, int(math.ceil(32 * N / (cfg.sample_ratio * keep))))
    rank = int(math.ceil(cfg.sample_ratio * keep * M / N)) if M > 0 else 0
    use_sample = 0 < rank <= M // 2  # else the pool is too small for a meaningful estimate: start from -inf
    if use_sample:
        rng = np.random.default_rng(cfg.seed)
        sample_ids = np.sort(rng.choice(N, size=M, replace=False)).astype(np.int64)
        sample_vecs = torch.from_numpy(_normalize32(X[sample_ids]))

    n_threads = cfg.threads or (os.cpu_count() or 1)
    lock = threading.Lock()

    def scan(ub: np.ndarray, thr0: np.ndarray) -> tuple[np.ndarray, ...]:
        """Scan every item tile for users ``ub`` starting from thresholds ``thr0``."""
        b = len(ub)
        q = torch.from_numpy(np.ascontiguousarray(Q32.reshape(B, K, d)[ub].reshape(b * K, d)))
        thr = thr0.astype(np.float32).copy()
        buf_s = np.empty((b, cap), np.float32)
        buf_i = np.empty((b, cap), np.int64)
        buf_d = np.empty((b, cap), np.float64)
        q64 = np.ascontiguousarray(Q64[ub])
        cnt = np.zeros(b, np.int64)
        raised = np.zeros(b, np.bool_)
        ex_ptr = ex_off[ub].copy()
        ex_end = ex_off[ub + 1].copy()
        S = torch.empty((b * K, cfg.item_block), dtype=torch.float32)
        Sn, qn = S.numpy(), q.numpy()
        cand = np.empty(cfg.item_block, np.int64)
        for a, e, x in _item_tiles(X, cfg.item_block, items_normalized):
            if use_numpy:  # np.dot wants a C-contiguous output: the last, narrower tile gets its own
                s = Sn if e - a == cfg.item_block else np.empty((b * K, e - a), np.float32)
                np.dot(qn, x.numpy().T, out=s)
            else:
                s = S[:, : e - a]
                torch.mm(q, x.T, out=s)
                s = s.numpy()
            _scan_tile(s, K, a, thr, buf_s, buf_i, buf_d, cnt, raised, keep, cand, ex_items, ex_ptr, ex_end, X, q64)
        return buf_s, buf_i, buf_d, cnt, raised

    def finish(ub: np.ndarray, buf_s: np.ndarray, buf_i: np.ndarray, buf_d: np.ndarray, cnt: np.ndarray) -> None:
        """float32 candidates -> float64 order and exactness check (numba); float64 fallback where needed."""
        eligible = N - (ex_off[ub + 1] - ex_off[ub])
        complete = cnt >= eligible  # every eligible item is a candidate
        bi = np.full((len(ub), k), -1, np.int64)
        bs = np.full((len(ub), k), -np.inf, np.float32)
        fallback = np.zeros(len(ub), np.bool_)
        _finish(buf_s, buf_i, buf_d, cnt, keep, k, eps, complete, bi, bs, fallback)
        for r in np.flatnonzero(fallback):
            u = ub[r]
            with lock:
                st.float64_fallback += 1
            ci, s64 = _float64_user(Q64[u], X, k, ex_items[ex_off[u] : ex_off[u + 1]])
            bi[r], bs[r] = -1, -np.inf
            bi[r, : len(ci)], bs[r, : len(ci)] = ci, s64
        out_i[ub], out_s[ub] = bi, bs

    def work(u0: int, u1: int) -> None:
        ub = np.arange(u0, u1)
        b = len(ub)
        thr0 = np.full(b, -np.inf, np.float32)
        if use_sample:
            S = torch.empty((b * K, M), dtype=torch.float32)
            q = torch.from_numpy(np.ascontiguousarray(Q32[u0 * K : u1 * K]))
            torch.mm(q, sample_vecs.T, out=S)
            _sample_thresholds(S.numpy(), K, rank, sample_ids, ex_items, ex_off[u0 : u1 + 1] - ex_off[u0], thr0)
            thr0 = np.where(np.isneginf(thr0), -np.inf, thr0).astype(np.float32)
        buf_s, buf_i, buf_d, cnt, raised = scan(ub, thr0)
        # a user whose estimate was too high (fewer than `keep` items beat it, no compaction): scan from -inf
        redo = np.flatnonzero((cnt < keep) & ~raised & ~np.isneginf(thr0))
        if redo.size:
            with lock:
                st.rescanned += int(redo.size)
            rs, ri, rd, rc, _ = scan(ub[redo], np.full(redo.size, -np.inf, np.float32))
            buf_s[redo], buf_i[redo], buf_d[redo], cnt[redo] = rs, ri, rd, rc
        finish(ub, buf_s, buf_i, buf_d, cnt)

    blocks = [(u0, min(B, u0 + cfg.user_block)) for u0 in range(0, B, cfg.user_block)]
    prev = torch.get_num_threads()
    use_numpy = cfg.blas == "numpy"
    limiter = contextlib.nullcontext()
    if use_numpy:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(1, user_api="blas")
    try:
        torch.set_num_threads(1)  # one BLAS thread per worker: the workers are the parallelism
        limiter.__enter__()
        if n_threads == 1 or len(blocks) == 1:
            for u0, u1 in blocks:
                work(u0, u1)
        else:
            with ThreadPoolExecutor(max_workers=n_threads) as ex:
                for f in [ex.submit(work, u0, u1) for u0, u1 in blocks]:
                    f.result()
    finally:
        limiter.__exit__(None, None, None)
        torch.set_num_threads(prev)
    return out_i, out_s


def _float64_user(q64: np.ndarray, items: np.ndarray, k: int, excluded: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 top-k of one user ``[K, d]`` over the whole pool (the rare fallback)."""
    N = int(items.shape[0])
    best_i = np.zeros(0, np.int64)
    best_s = np.zeros(0, np.float64)
    for a in range(0, N, chunk):
        e = min(N, a + chunk)
        s = (_normalize64(np.asarray(items[a:e])) @ q64.T).max(axis=1)
        lo, hi = np.searchsorted(excluded, [a, e])
        s[excluded[lo:hi] - a] = -np.inf
        ids = np.concatenate([best_i, np.arange(a, e)])
        sc = np.concatenate([best_s, s])
        o = np.lexsort((ids, -sc))[:k]
        best_i, best_s = ids[o], sc[o]
    ok = ~np.isneginf(best_s)
    return best_i[ok], best_s[ok]


def reference_topk(users: ArrayLike, items: ArrayLike, k: int, exclude: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Plain float64 top-k (the definition :func:`search` must match; for tests and benchmarks on small data)."""
    U = _as_f32(users)
    if U.ndim == 2:
        U = U[:, None, :]
    X = items.detach().cpu().numpy() if isinstance(items, torch.Tensor) else np.asarray(items)
    B = U.shape[0]
    k = min(k, X.shape[0])
    out_i = np.full((B, k), -1, np.int64)
    out_s = np.full((B, k), -np.inf, np.float32)
    q = _normalize64(U)
    off, ex = _exclusion_csr(exclude, B, X.shape[0])
    for u in range(B):
        ci, cs = _float64_user(q[u], X, k, ex[off[u] : off[u + 1]])
        out_i[u, : len(ci)] = ci
        out_s[u, : len(ci)] = cs
    return out_i, out_s
