"""Joint IVF probing for multi-vector users: one scan of a user's lists, every candidate scored by all K vectors.

FAISS searches an IVF index one query vector at a time.  A RED-Rec user has ``K`` interest vectors (9 with the
default 3 queries x 3 scenarios) and scores an item by ``max_k cos(u_k, v)`` (paper section 4.2), so the FAISS way
is ``K`` separate searches of ``nprobe`` lists each, ``K`` heaps, then a merge: ``K * nprobe`` list scans per user,
each item compared with one vector at a time.

Joint probing ranks the coarse lists once per *user*, by ``max_k cos(u_k, centroid_l)``, takes the best
``user_nprobe`` of them, and scans each chosen list once, scoring every item in it by the max over all ``K``
vectors (one ``[n, d] x [d, K]`` BLAS product per list, then the max over K) into a single top-``k`` heap that skips the
user's excluded items.  Per scanned item the arithmetic is the same as FAISS's (``K d`` multiply-adds), but there
are ``user_nprobe`` scans instead of ``K * nprobe``, and every candidate gets its exact max-over-K score instead of
the score of only the vectors that happened to probe its list.  For ``K = 1`` it is the ordinary IVF search with
``nprobe = user_nprobe``.

Scores are float32 dot products of L2-normalised vectors (as FAISS's); results are ordered by score, descending,
the lower item id first among equal scores; missing slots are id ``-1`` / score ``-inf``.

The lists are copied out of the FAISS ``IndexIVFFlat`` once (:meth:`JointIVF.from_faiss`) into one contiguous
``[N, d]`` float32 array ordered by list (``4 d + 8`` bytes per item again: the FAISS index is kept for saving and
for the per-vector search).  The scan runs in numba (``nogil``), users split over ``threads`` worker threads.

``precision="bfloat16"`` scans a bfloat16 copy of the lists (``2 d`` more bytes per item) with MKL's
``gemm_bf16bf16f32`` (the MKL inside torch's x86-64 builds; AMX / AVX512-BF16 where the CPU has them), the queries
rounded to bfloat16 too, keeping the ``2 k`` best candidates by those scores; the candidates are then re-scored in
float32 from the float32 lists and the best ``k`` returned, so returned scores are the float32 ones.  Scores of
items off by the rounding (at most ~1e-3 for unit vectors) can change which items reach the ``2 k`` candidates.
Measured here on the serving benchmark's lists (1M items, 4,000 lists, 64 per user, 9 vectors): the scoring of 8
users' lists took 2.0 ms instead of 3.7 ms on one thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

from redrec.retrieval.index import reset_interests

_FASTMATH = {"nnan", "nsz", "reassoc", "contract"}  # the dot products may be reordered (inputs are finite)


# OpenBLAS runs an sgemm on several threads once m * n * k exceeds 65536 * GEMM_MULTITHREAD_THRESHOLD (4 in its
# builds); those threads busy-wait after each call and take the cores from the scan's own threads, so every
# product here stays below that size.
_BLAS_SINGLE_THREAD_MNK = 65536 * 4

# the bfloat16 scan keeps this many times k candidates for the float32 re-scoring
_BF16_CANDIDATES = 2


@njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _score_rows(qT, codes, a, b, dots, out, step):  # pragma: no cover - compiled
    """``out[j - a] = max_k qT[:, k] . codes[j]`` for rows ``a <= j < b``: BLAS ``sgemm`` s of ``step`` rows with
    the ``[d, K]`` queries into ``dots`` (``[>= step, K]``), then the max over K (the scan is memory-bound: BLAS
    keeps up with the rows' arrival where a dot product per (row, vector) did not)."""
    K = qT.shape[1]
    for c0 in range(a, b, step):
        c1 = min(c0 + step, b)
        blk = dots[: c1 - c0]
        np.dot(codes[c0:c1], qT, blk)
        for j in range(c1 - c0):
            best = blk[j, 0]
            for kk in range(1, K):
                if blk[j, kk] > best:
                    best = blk[j, kk]
            out[c0 - a + j] = best


@njit(nogil=True, cache=True)
def _worse(s1, i1, s2, i2):  # pragma: no cover - compiled
    """Entry (s1, i1) ranks below (s2, i2): lower score, or equal score and higher id."""
    return s1 < s2 or (s1 == s2 and i1 > i2)


@njit(nogil=True, cache=True)
def _sift_down(hs, hi, n, s, i):  # pragma: no cover - compiled
    """Put (s, i) at the root of the min-heap ``hs/hi[:n]`` (worst entry at the root) and restore the order."""
    c = 0
    while True:
        left = 2 * c + 1
        if left >= n:
            break
        m = left
        if left + 1 < n and _worse(hs[left + 1], hi[left + 1], hs[left], hi[left]):
            m = left + 1
        if _worse(hs[m], hi[m], s, i):
            hs[c] = hs[m]
            hi[c] = hi[m]
            c = m
        else:
            break
    hs[c] = s
    hi[c] = i


@njit(nogil=True, cache=True)
def _push(hs, hi, n, k, s, i):  # pragma: no cover - compiled
    """Offer (s, i) to the top-``k`` min-heap holding ``n`` entries; returns the new count."""
    if n < k:
        c = n
        while c > 0:
            par = (c - 1) >> 1
            if _worse(s, i, hs[par], hi[par]):
                hs[c] = hs[par]
                hi[c] = hi[par]
                c = par
            else:
                break
        hs[c] = s
        hi[c] = i
        return n + 1
    if _worse(hs[0], hi[0], s, i):
        _sift_down(hs, hi, n, s, i)
    return n


@njit(nogil=True, cache=True)
def _pop_into(hs, hi, n, out_s, out_i):  # pragma: no cover - compiled
    """Empty the min-heap ``hs/hi[:n]`` into ``out_s/out_i[:n]``, best first (worst popped first, filled from the
    back)."""
    m = n
    while m > 0:
        out_s[m - 1] = hs[0]
        out_i[m - 1] = hi[0]
        m -= 1
        if m > 0:
            _sift_down(hs, hi, m, hs[m], hi[m])


@njit(nogil=True, cache=True)
def _set_marks(mark, exc_ids, a, b, value):  # pragma: no cover - compiled
    """``mark[e] = value`` for the item ids ``exc_ids[a:b]`` in range."""
    for j in range(a, b):
        e = exc_ids[j]
        if 0 <= e < mark.size:
            mark[e] = value


@njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _joint_scan(q, lists, n_lists, codes, ids, offsets, k, exc_ptr, exc_ids, mark, dots, scratch,
                out_i, out_s, step):  # pragma: no cover - compiled
    """Per user ``b``: the top ``k`` of the items in lists ``lists[b, :n_lists[b]]`` by ``max_k q[b, k] . v``,
    without ``exc_ids[exc_ptr[b]:exc_ptr[b + 1]]``.  ``mark`` (uint8, one per item) is zero on entry and on exit;
    ``dots`` (``[step, K]``) and ``scratch`` (``[longest list]``) hold the dot products of ``step`` rows and one
    list's scores."""
    B = q.shape[0]
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    for b in range(B):
        _set_marks(mark, exc_ids, exc_ptr[b], exc_ptr[b + 1], 1)
        qT = np.ascontiguousarray(q[b].T)
        n = 0
        for p in range(n_lists[b]):
            lst = lists[b, p]
            a0 = offsets[lst]
            a1 = offsets[lst + 1]
            _score_rows(qT, codes, a0, a1, dots, scratch, step)
            for j in range(a1 - a0):
                s = scratch[j]
                if n == k and s < hs[0]:  # the common case: below the k-th best so far
                    continue
                i = ids[a0 + j]
                if mark[i] != 0:
                    continue
                n = _push(hs, hi, n, k, s, i)
        _pop_into(hs, hi, n, out_s[b], out_i[b])
        _set_marks(mark, exc_ids, exc_ptr[b], exc_ptr[b + 1], 0)


@functools.cache
def _mkl() -> tuple[Any, Any] | None:
    """``(gemm_bf16bf16f32_, MKL_Set_Num_Threads_Local)`` of the MKL bundled with torch, or ``None`` (no such build,
    e.g. torch for ARM).  Both are plain C functions called through ctypes (from numba for the GEMM)."""
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        gemm = lib.gemm_bf16bf16f32_
        local_threads = lib.MKL_Set_Num_Threads_Local
    except (ImportError, OSError, AttributeError):
        return None
    gemm.argtypes = [ctypes.c_int64] * 13  # Fortran interface: every argument by address
    gemm.restype = None
    local_threads.argtypes = [ctypes.c_int]
    local_threads.restype = ctypes.c_int
    return gemm, local_threads


def bf16_available() -> bool:
    """Whether the bfloat16 joint scan can run here (MKL's bfloat16 GEMM found in torch's library)."""
    return _mkl() is not None


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16, round to nearest even; torch's conversion)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


@functools.cache
def _bf16_kernel() -> Callable[..., None]:
    """The bfloat16 scan (compiled on first use; not cached on disk: it calls MKL through a process address)."""
    mkl = _mkl()
    if mkl is None:
        raise RuntimeError("the bfloat16 joint scan needs MKL's gemm_bf16bf16f32 (torch's x86-64 builds bundle it)")
    gemm = mkl[0]

    @njit(nogil=True, fastmath=_FASTMATH)
    def scan(q, q16, lists, n_lists, codes16, codes, ids, offsets, k, k2, exc_ptr, exc_ids, mark, dots,
             out_i, out_s, out_w, want_w, ints, flts, chars):  # pragma: no cover - compiled
        """As :func:`_joint_scan` (all ``K`` vectors score every list), in two passes: bfloat16 scores of the lists
        (``q16`` ``[B, K, d]`` and ``codes16`` uint16 bit patterns, one MKL GEMM per list into ``dots``) keep the
        ``k2`` best rows, which are re-scored in float32 (``q``, ``codes``) for the top ``k``; with ``want_w``,
        ``out_w`` gets the winning vector of each returned item (argmax over K of those float32 scores).
        ``ints`` (int32 [6]), ``flts`` (float32 [2]) and ``chars`` (uint8 [2]) hold the GEMM's by-address
        arguments.  They come from the caller, which keeps them alive for the whole call: arrays made in here
        would be freed by numba after their last use in the code (their addresses are used later), and an
        allocation in the loop could then reuse their memory (found when one did: MKL "Parameter 1 was
        incorrect")."""
        B, K, d = q.shape
        hs = np.empty(k2, np.float32)
        hr = np.empty(k2, np.int64)
        cand_w = np.empty(k2, np.int64)  # the re-scoring's winning vector and item id of each candidate
        cand_id = np.empty(k2, np.int64)
        fs = np.empty(k, np.float32)
        fi = np.empty(k, np.int64)
        ip, fp, cp = ints.ctypes.data, flts.ctypes.data, chars.ctypes.data
        for b in range(B):
            _set_marks(mark, exc_ids, exc_ptr[b], exc_ptr[b + 1], 1)
            qT16 = np.ascontiguousarray(q16[b].T)  # [d, K]: column-major [K, d]
            n = 0
            for p in range(n_lists[b]):
                lst = lists[b, p]
                a0 = offsets[lst]
                m = offsets[lst + 1] - a0
                if m == 0:
                    continue
                # column-major: dots^T [K, m] = qT16^T [K, d] x codes16[a0:a0 + m]^T [d, m]
                ints[0] = K
                ints[1] = m
                ints[2] = d
                ints[3] = K
                ints[4] = d
                ints[5] = K
                gemm(cp, cp + 1, ip, ip + 4, ip + 8, fp, qT16.ctypes.data, ip + 12,
                     codes16.ctypes.data + a0 * d * 2, ip + 16, fp + 4, dots.ctypes.data, ip + 20)
                for j in range(m):
                    s = dots[j, 0]
                    for kk in range(1, K):
                        if dots[j, kk] > s:
                            s = dots[j, kk]
                    if n == k2 and s < hs[0]:
                        continue
                    if mark[ids[a0 + j]] != 0:
                        continue
                    n = _push(hs, hr, n, k2, s, a0 + j)
            # float32 re-scoring of the candidates, best k by (score, lower id)
            nf = 0
            for t in range(n):
                r = hr[t]
                best = -np.inf
                w = 0
                for kk in range(K):
                    acc = np.float32(0.0)
                    for c in range(d):
                        acc += q[b, kk, c] * codes[r, c]
                    if acc > best:
                        best = acc
                        w = kk
                cand_w[t] = w
                cand_id[t] = ids[r]
                nf = _push(fs, fi, nf, k, np.float32(best), ids[r])
            _pop_into(fs, fi, nf, out_s[b], out_i[b])
            if want_w:  # k x n comparisons (an item is in one list only: its id is one candidate's)
                for j in range(nf):
                    for t in range(n):
                        if cand_id[t] == out_i[b, j]:
                            out_w[b, j] = cand_w[t]
                            break
            _set_marks(mark, exc_ids, exc_ptr[b], exc_ptr[b + 1], 0)

    return scan


class _Workers:
    """``n`` persistent daemon threads, each with its own queue: :meth:`run` hands task ``i`` to thread ``i`` (the
    caller runs the last one) and waits for all.  (A ``ThreadPoolExecutor`` reuses one idle worker for tasks
    submitted back to back, so two tasks may run one after the other; here each task has its own thread.)"""

    def __init__(self, n: int, name: str):
        self.n = n
        self._queues: list[queue.SimpleQueue] = []
        for w in range(n):
            q: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._loop, args=(q,), name=f"{name}-{w}", daemon=True).start()
            self._queues.append(q)

    @staticmethod
    def _loop(q: queue.SimpleQueue) -> None:
        while True:
            task = q.get()
            if task is None:
                return
            fn, done, errors = task
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)
            finally:
                done.release()
            del task, fn  # the task's closure holds its JointIVF: let it be collected (and stop this thread)

    def run(self, tasks: list[Callable[[], None]]) -> None:
        if len(tasks) > self.n + 1:
            raise ValueError(f"{len(tasks)} tasks for {self.n} workers + the caller")
        done = threading.Semaphore(0)
        errors: list[BaseException] = []
        for q, fn in zip(self._queues, tasks[:-1], strict=False):
            q.put((fn, done, errors))
        try:
            tasks[-1]()
        finally:
            for _ in tasks[:-1]:
                done.acquire()
        if errors:
            raise errors[0]

    def close(self) -> None:
        for q in self._queues:
            q.put(None)


class JointIVF:
    """The lists of an IVF-Flat index laid out for joint probing.

    Attributes:
        centroids: float32 ``[nlist, d]`` coarse centroids.
        codes: float32 ``[N, d]`` item vectors, list by list (list ``l`` = rows ``offsets[l]:offsets[l + 1]``).
        ids: int64 ``[N]`` item id of each row.
        offsets: int64 ``[nlist + 1]``.
        n_items: item ids are ``0 .. n_items - 1``.
    """

    def __init__(self, centroids: np.ndarray, codes: np.ndarray, ids: np.ndarray, offsets: np.ndarray, n_items: int):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self._centroids_t = np.ascontiguousarray(self.centroids.T)  # [d, nlist]: a faster product than .T (0.18
        # against 0.31 ms for 72 vectors x 4,000 lists)
        self.codes = codes
        self.ids = ids
        self.offsets = offsets
        self.n_items = int(n_items)
        sizes = np.diff(offsets)
        self._max_list = int(sizes.max()) if len(sizes) else 0
        self.codes16: np.ndarray | None = None  # bfloat16 bit patterns of ``codes``, made on first bfloat16 search
        self._codes16_lock = threading.Lock()
        self._local = threading.local()
        self._workers: _Workers | None = None
        self._workers_lock = threading.Lock()

    @classmethod
    def from_faiss(cls, index: Any) -> JointIVF:
        """Copy the lists of a FAISS ``IndexIVFFlat`` (inner product) into the joint layout."""
        import faiss

        ivf = faiss.extract_index_ivf(index)
        invlists = ivf.invlists
        nlist, d = int(ivf.nlist), int(ivf.d)
        sizes = np.fromiter((invlists.list_size(lst) for lst in range(nlist)), dtype=np.int64, count=nlist)
        offsets = np.zeros(nlist + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        n = int(offsets[-1])
        codes = np.empty((n, d), dtype=np.float32)
        ids = np.empty(n, dtype=np.int64)
        for lst in np.flatnonzero(sizes):
            a, b = int(offsets[lst]), int(offsets[lst + 1])
            faiss.memcpy(faiss.swig_ptr(codes[a:b]), invlists.get_codes(int(lst)), (b - a) * d * 4)
            faiss.memcpy(faiss.swig_ptr(ids[a:b]), invlists.get_ids(int(lst)), (b - a) * 8)
        centroids = ivf.quantizer.reconstruct_n(0, nlist)
        return cls(centroids, codes, ids, offsets, int(ivf.ntotal))

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    def memory_bytes(self) -> int:
        """Bytes held by the copied lists (float32, and bfloat16 once made) and centroids."""
        extra = self.codes16.nbytes if self.codes16 is not None else 0
        return int(self.codes.nbytes + self.ids.nbytes + self.offsets.nbytes + 2 * self.centroids.nbytes + extra)

    def probe(self, q: np.ndarray, user_nprobe: int) -> np.ndarray:
        """int64 ``[B, P]`` lists to scan per user (``P = min(user_nprobe, nlist)``): the best ``P`` lists by
        ``max_k cos(q[b, k], centroid)``, best first.  (Scanned in that order, the top-k heap fills with good
        items early and later lists push fewer: 6,089 against 9,009 pushes for 8 users of the serving benchmark,
        whose bfloat16 scan took 2.9 instead of 3.2 ms.)"""
        B, K, d = q.shape
        P = min(int(user_nprobe), self.nlist)
        cs = (q.reshape(B * K, d) @ self._centroids_t).reshape(B, K, self.nlist).max(axis=1)
        top = np.argpartition(-cs, P - 1, axis=1)[:, :P] if P < self.nlist else np.broadcast_to(
            np.arange(self.nlist), (B, P))
        order = np.argsort(-np.take_along_axis(cs, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1).astype(np.int64)

    def _scratch(self, K: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-thread (mark, dots ``[rows, K]``, scores) scratch for ``K`` vectors per user; ``mark`` is left
        zeroed by the kernels."""
        loc = self._local
        if getattr(loc, "mark", None) is None or loc.mark.size < self.n_items:
            loc.mark = np.zeros(max(1, self.n_items), dtype=np.uint8)
            loc.scores = np.empty(max(1, self._max_list), dtype=np.float32)
        if getattr(loc, "dots", None) is None or loc.dots.shape != (rows, K):
            loc.dots = np.empty((rows, K), dtype=np.float32)
        return loc.mark, loc.dots, loc.scores

    def _step(self, K: int) -> int:
        """Rows per BLAS call: below OpenBLAS's multithreading size, at most the longest list."""
        d = self.centroids.shape[1]
        return max(1, min(max(1, self._max_list), _BLAS_SINGLE_THREAD_MNK // max(1, d * K) - 1))

    def _run(self, tasks: list[Callable[[], None]]) -> None:
        """Run ``tasks`` in parallel (the caller takes one); one search at a time uses the workers, a concurrent
        one runs its tasks in its own thread."""
        if len(tasks) == 1 or not self._workers_lock.acquire(blocking=False):
            for fn in tasks:
                fn()
            return
        try:
            if self._workers is None or self._workers.n < len(tasks) - 1:
                if self._workers is not None:
                    self._workers.close()
                self._workers = _Workers(len(tasks) - 1, "redrec-ivf")
                # stop the threads when this layout is dropped (Index.add, a hot reload), not at exit only
                weakref.finalize(self, self._workers.close)
            self._workers.run(tasks)
        finally:
            self._workers_lock.release()

    def search(self, q: np.ndarray, k: int, user_nprobe: int, exclude: list[np.ndarray] | None = None,
               threads: int | None = None, precision: str = "float32",
               interests: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` per user of unit ``q`` ``[B, K, d]`` (float32, C order); ``exclude``: per user, item ids never
        returned; ``precision``: ``float32`` or ``bfloat16`` (see the module docstring).  Returns
        ``(ids int64 [B, k], scores float32 [B, k])``, padded with ``-1`` / ``-inf``.

        ``interests``: an int64 ``[B, k]`` array that the bfloat16 scan fills with the winning vector of each
        returned item (the argmax over K of its float32 re-scoring; -1 where no item); the float32 scan fills it
        with -1 (not computed)."""
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        B = q.shape[0]
        out_i = np.full((B, k), -1, dtype=np.int64)
        out_s = np.full((B, k), -np.inf, dtype=np.float32)
        want_w = interests is not None and precision == "bfloat16"
        reset_interests(interests, B, k)
        out_w = interests if want_w else np.empty((0, 0), np.int64)
        if B == 0 or self.nlist == 0:
            return out_i, out_s
        ptr = np.zeros(B + 1, dtype=np.int64)
        if exclude is not None:
            ptr[1:] = np.cumsum([len(e) for e in exclude])
            exc = (np.concatenate([np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude])
                   if ptr[-1] else np.zeros(0, np.int64))
        else:
            exc = np.zeros(0, dtype=np.int64)
        n_threads = max(1, min(int(threads or os.cpu_count() or 1), B))
        if precision == "bfloat16":
            kernel = _bf16_kernel()
            codes16 = self._codes16()
            q16 = to_bf16(q)
            set_local_threads = _mkl()[1]  # type: ignore[index]

        # rows of one product: a whole list (MKL, bfloat16), or chunks below OpenBLAS's multithreading size
        rows = max(1, self._max_list) if precision == "bfloat16" else self._step(q.shape[1])

        def run(u0: int, u1: int) -> None:  # each thread ranks the lists of its own users, then scans them
            mark, dots, scratch = self._scratch(q.shape[1], rows)
            lists = self.probe(q[u0:u1], user_nprobe)
            n_lists = np.full(u1 - u0, lists.shape[1], dtype=np.int64)
            if precision == "bfloat16":
                # this thread's MKL calls on one thread (per-list products), then its previous setting again (the
                # caller's thread may run torch next)
                prev = set_local_threads(1)
                # the GEMM's by-address arguments, one set per thread: M, N, K, lda, ldb, ldc; alpha, beta;
                # transa, transb ("N", "N")
                gemm_args = (np.empty(6, np.int32), np.array([1.0, 0.0], np.float32), np.array([78, 78], np.uint8))
                try:
                    kernel(q[u0:u1], q16[u0:u1], lists, n_lists, codes16, self.codes, self.ids, self.offsets,
                           int(k), int(min(_BF16_CANDIDATES * k, self.n_items) or 1), ptr[u0:u1 + 1] - ptr[u0],
                           exc[ptr[u0]:ptr[u1]], mark, dots, out_i[u0:u1], out_s[u0:u1],
                           out_w[u0:u1] if want_w else out_w, want_w, *gemm_args)
                finally:
                    set_local_threads(prev)
                return
            _joint_scan(q[u0:u1], lists, n_lists, self.codes, self.ids, self.offsets, int(k),
                        ptr[u0:u1 + 1] - ptr[u0], exc[ptr[u0]:ptr[u1]], mark, dots, scratch, out_i[u0:u1],
                        out_s[u0:u1], len(dots))

        bounds = np.linspace(0, B, n_threads + 1).astype(int)
        self._run([lambda a=int(a), b=int(b): run(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a])
        return out_i, out_s

    def _codes16(self) -> np.ndarray:
        """The bfloat16 copy of the lists (made once, in chunks: no float32 temporary of the whole array)."""
        with self._codes16_lock:
            if self.codes16 is None:
                out = np.empty(self.codes.shape, dtype=np.uint16)
                for a in range(0, len(out), 1 << 18):
                    out[a : a + (1 << 18)] = to_bf16(self.codes[a : a + (1 << 18)])
                self.codes16 = out
            return self.codes16

    def close(self) -> None:
        """Stop the worker threads (a later search starts them again)."""
        with self._workers_lock:
            if self._workers is not None:
                self._workers.close()
                self._workers = None
