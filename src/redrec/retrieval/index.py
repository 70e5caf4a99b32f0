"""Flat and approximate (ANN) item indexes through FAISS behind one small :class:`Index` interface.

The caller never sees FAISS objects: it builds an index from an :class:`IndexConfig`, ``train``\\ s it (IVF kinds
only), ``add``\\ s item vectors, ``search``\\ es with single- or multi-vector users, and ``save``\\ s / ``load``\\ s it::

    index = build_index(IndexConfig(kind="ivf_pq", pq_m=16), dim=64)
    index.fit(item_vecs)                       # train on a sample + add in chunks (a memmap streams)
    ids, scores = index.search(user_vecs, k=100, exclude=seen)   # user_vecs [B, K, 64] or [B, 64]
    index.save("out/items.index")
    index = load_index("out/items.index")

Conventions (shared with :mod:`redrec.retrieval.exact`):

* vectors are L2-normalised here (an all-zero vector stays zero and scores 0); the metric is the inner product,
  so a score is a cosine (an approximate one for ``ivf_pq``, whose scores come from the compressed codes);
* items are numbered ``0 .. ntotal - 1`` in the order they were added;
* a user with ``K`` vectors scores an item by ``max_k cos(u_k, v)``; each of the K vectors is searched for
  ``k + max(len(exclude))`` items (IVF kinds: ``k`` items, the user's excluded ids skipped inside the list scan)
  and the K lists are merged by max score per item -- or, for ``ivf_flat`` with ``probe="joint"``
  (:mod:`redrec.retrieval.ivf_joint`), the user's best ``user_nprobe`` lists are scanned once and every item in
  them is scored by all K vectors (fewer list scans, and exact max-over-K scores for every candidate);
* results are ordered by score, descending, the lower item id first among equal scores; slots that cannot be
  filled (fewer eligible items found than ``k``) hold id ``-1`` and score ``-inf``.

Kinds and memory per item (``d`` = dim, FAISS in-memory layout; add the fixed parts listed):

==========  ==========================================================  ============================
kind        per item                                                    fixed
==========  ==========================================================  ============================
flat        ``4 d`` bytes (256 B at d=64); exact brute force            --
ivf_flat    ``4 d + 8`` bytes (vector + int64 id; 264 B at d=64)        ``nlist * 4 d`` centroids
ivf_fp16    ``2 d + 8`` bytes (float16 vector + id; 136 B at d=64);     ``nlist * 4 d`` centroids
            half the memory traffic of ivf_flat per probed list
ivf_sq8     ``d + 8`` bytes (8-bit scalar-quantised vector + id;         ``nlist * 4 d`` centroids +
            72 B at d=64)                                               ``8 d`` ranges
hnsw        ``4 d + ~8 hnsw_m`` bytes (vector + level-0 links;          --
            ~512 B at d=64, M=32)
ivf_pq      ``pq_m * pq_nbits / 8 + 8`` bytes (PQ code + int64 id;      ``nlist * 4 d`` centroids +
            40 B at pq_m=32, 8 bits: 100M items ~ 4.0 GB;               ``4 d 2^pq_nbits`` codebooks
            24 B at pq_m=16: ~ 2.4 GB, lower recall)
==========  ==========================================================  ============================

Large pools: ``train`` reads only a random sample of ``train_size`` rows (a memory-mapped ``[N, d]`` array is
fine), ``add`` streams the vectors ``add_chunk`` rows at a time, so a 100M-item IVF-PQ index needs about
``N * (pq_m + 8)`` bytes of RAM plus one chunk.  For ``nlist`` in the tens of thousands (100M+ items) use
``quantizer="hnsw"``: assigning every added vector to its list is then a graph search instead of a scan of all
``nlist`` centroids.

Threads: ``IndexConfig.threads`` (default: FAISS's default, all cores) is applied around each FAISS call and the
previous OpenMP setting restored afterwards.  Single-query search is fastest with ``threads=1`` (thread start-up
costs more than the work); large batches and builds want all cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numba import njit

from redrec.config import from_dict, to_dict
from redrec.errors import ConfigError, DataError
from redrec.eval.metrics import as_ragged
from redrec.fileio import sha256_file

IndexKind = Literal["flat", "ivf_flat", "ivf_fp16", "ivf_sq8", "hnsw", "ivf_pq"]
KINDS: tuple[str, ...] = ("flat", "ivf_flat", "ivf_fp16", "ivf_sq8", "hnsw", "ivf_pq")
_IVF_KINDS = ("ivf_flat", "ivf_fp16", "ivf_sq8", "ivf_pq")
_SQ_TYPES = {"ivf_fp16": "QT_fp16", "ivf_sq8": "QT_8bit"}  # FAISS ScalarQuantizer codes of the IVF-SQ kinds

FORMAT = "redrec.faiss_index"
FORMAT_VERSION = 1
META_FILE = "index.json"
INDEX_FILE = "index.faiss"

_SEARCH_ELEMS = 1 << 20  # result entries (rows * k') per FAISS search call: bounds the merge's memory
_SOURCE = "IndexConfig"
_FAISS_CLASS = {"flat": ("IndexFlatIP", "IndexFlat"), "ivf_flat": ("IndexIVFFlat",), "hnsw": ("IndexHNSWFlat",),
                "ivf_pq": ("IndexIVFPQ",), "ivf_fp16": ("IndexIVFScalarQuantizer",),
                "ivf_sq8": ("IndexIVFScalarQuantizer",)}


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("redrec.retrieval.index needs FAISS: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------


def default_nlist(n: int) -> int:
    """Default number of IVF lists for ``n`` items: ``round(4 sqrt(n))``, at least 1 (3,528 for 778,111 items)."""
    return max(1, int(round(4.0 * math.sqrt(max(n, 1)))))


def default_train_size(nlist: int, pq_nbits: int | None = None) -> int:
    """Default k-means sample: 40 vectors per list (and per PQ centroid, ``40 * 2**pq_nbits``).

    FAISS warns below 39 per centroid; more than ~40 costs training time (linear) for little recall.
    """
    n = 40 * nlist
    if pq_nbits is not None:
        n = max(n, 40 * (1 << pq_nbits))
    return n


@dataclass
class IndexConfig:
    """What index to build and how to search it.

    Attributes:
        kind: ``"flat"`` (exact), ``"ivf_flat"``, ``"ivf_fp16"`` / ``"ivf_sq8"`` (IVF over float16 / 8-bit
            scalar-quantised vectors: less memory and memory traffic, scores rounded accordingly), ``"hnsw"`` or
            ``"ivf_pq"``.
        nlist: IVF lists (coarse centroids); ``None`` = :func:`default_nlist` of the row count given to ``train``
            (the resolved value is stored in the index's config).  Must not exceed the training sample.
        nprobe: IVF lists visited per query vector (clamped to ``nlist``); recall vs latency.
        quantizer: IVF coarse quantizer: ``"flat"`` (exact scan of the centroids) or ``"hnsw"`` (graph over the
            centroids, for ``nlist`` >~ 16k, i.e. 100M+ items).
        hnsw_m: HNSW links per node (memory ~ ``8 * hnsw_m`` bytes per item).
        ef_construction: HNSW build beam width (build time vs graph quality).
        ef_search: HNSW search beam width (``k'`` when larger); recall vs latency.
        pq_m: IVF-PQ sub-quantizers = code bytes per item at 8 bits; must divide ``dim``.  ``None`` = ``dim / 2``
            (32 at d=64, i.e. 2-d sub-vectors; the largest divisor of ``dim`` not above ``dim / 2`` otherwise).
            ``dim / 4`` halves the codes at a clear recall cost (recall@10 ~0.54 vs ~0.85 on clustered 64-d data).
        pq_nbits: bits per sub-quantizer code (8 is FAISS's fast path).
        train_size: rows sampled (without replacement, ``seed``) to train an IVF index; ``None`` =
            :func:`default_train_size`.  Clamped to the rows given to ``train``.
        train_iters: k-means iterations of the coarse quantizer.
        add_chunk: rows normalised and added per FAISS call (bounds the extra memory of ``add``).
        seed: sampling and k-means seed.
        threads: OpenMP threads for FAISS calls (and worker threads of the joint probe); ``None`` = FAISS's
            default (all cores).
        probe: how a multi-vector user searches an IVF index: ``"per_vector"`` (FAISS: each of the K vectors
            visits its ``nprobe`` lists, the K lists are merged) or ``"joint"`` (``ivf_flat`` only: the user's
            ``user_nprobe`` best lists by ``max_k cos(u_k, centroid)`` are scanned once, each item scored by all K
            vectors; see :mod:`redrec.retrieval.ivf_joint`; holds a second copy of the lists in memory).
        user_nprobe: lists scanned per user with ``probe="joint"``; ``None`` = ``4 * nprobe`` (clamped to
            ``nlist``).
        joint_precision: arithmetic of the joint probe's scan: ``"float32"``, or ``"bfloat16"`` (a bfloat16 copy of
            the lists scored with MKL's bfloat16 GEMM, the ``2 k`` best re-scored in float32; half the bytes read,
            a second copy of the lists in memory; see :mod:`redrec.retrieval.ivf_joint`).
    """

    kind: IndexKind = "flat"
    nlist: int | None = None
    nprobe: int = 32
    quantizer: Literal["flat", "hnsw"] = "flat"
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    pq_m: int | None = None
    pq_nbits: int = 8
    train_size: int | None = None
    train_iters: int = 10
    add_chunk: int = 65_536
    seed: int = 0
    threads: int | None = None
    probe: Literal["per_vector", "joint"] = "per_vector"
    user_nprobe: int | None = None
    joint_precision: Literal["float32", "bfloat16"] = "float32"

    def validate(self, source: str | None = None) -> None:
        """Raise :class:`~redrec.errors.ConfigError` naming the first bad field."""
        src = source or _SOURCE
        if self.kind not in KINDS:
            raise ConfigError(src, "kind", f"must be one of {list(KINDS)}, got {self.kind!r}")
        if self.quantizer not in ("flat", "hnsw"):
            raise ConfigError(src, "quantizer", f"must be 'flat' or 'hnsw', got {self.quantizer!r}")
        for name, lo in (("nprobe", 1), ("hnsw_m", 2), ("ef_construction", 1), ("ef_search", 1), ("train_iters", 1),
                         ("add_chunk", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(src, name, f"must be an integer >= {lo}, got {v!r}")
        if self.probe not in ("per_vector", "joint"):
            raise ConfigError(src, "probe", f"must be 'per_vector' or 'joint', got {self.probe!r}")
        if self.probe == "joint" and self.kind != "ivf_flat":
            raise ConfigError(src, "probe", f"'joint' probing needs kind 'ivf_flat' (this index is {self.kind!r}); "
                              "use probe='per_vector'")
        if self.joint_precision not in ("float32", "bfloat16"):
            raise ConfigError(src, "joint_precision", f"must be 'float32' or 'bfloat16', got {self.joint_precision!r}")
        if self.joint_precision != "float32" and self.probe != "joint":
            raise ConfigError(src, "joint_precision", f"{self.joint_precision!r} applies to probe='joint' only "
                              f"(this index probes {self.probe!r})")
        for name in ("nlist", "pq_m", "train_size", "threads", "user_nprobe"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(src, name, f"must be a positive integer or null, got {v!r}")
        if isinstance(self.pq_nbits, bool) or not isinstance(self.pq_nbits, int) or not 1 <= self.pq_nbits <= 16:
            raise ConfigError(src, "pq_nbits", f"must be an integer in [1, 16], got {self.pq_nbits!r}")

    def check_dim(self, dim: int, source: str | None = None) -> None:
        """Checks that need the vector dimension (``dim >= 1``; for ``ivf_pq``: ``dim % pq_m == 0``)."""
        self.validate(source)
        src = source or _SOURCE
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ConfigError(src, "dim", f"must be a positive integer, got {dim!r}")
        if self.kind == "ivf_pq" and self.pq_m is not None and dim % self.pq_m:
            divisors = [m for m in range(1, dim + 1) if dim % m == 0]
            raise ConfigError(src, "pq_m", f"must divide dim={dim}, got {self.pq_m} (divisors of {dim}: {divisors})")

    def resolved_user_nprobe(self) -> int:
        """Lists scanned per user by the joint probe: ``user_nprobe`` or ``4 * nprobe``."""
        return self.user_nprobe if self.user_nprobe is not None else 4 * self.nprobe

    def resolved_pq_m(self, dim: int) -> int:
        """``pq_m``, or its default for ``dim``: the largest divisor of ``dim`` that is at most ``dim / 2``."""
        if self.pq_m is not None:
            return self.pq_m
        return max(m for m in range(1, max(1, dim // 2) + 1) if dim % m == 0)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _omp_threads(n: int | None) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads, restoring the previous setting afterwards."""
    if n is None:
        yield
        return
    faiss = _faiss()
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


def _normalized(x: Any, eps: float = 1e-12) -> np.ndarray:
    """C-contiguous float32 copy of ``x`` with L2-normalised rows (last axis); zero rows stay zero."""
    a = np.array(x, dtype=np.float32, copy=True, order="C")
    if not np.isfinite(a).all():
        raise ValueError("vectors contain NaN or infinite values")
    n = np.linalg.norm(a, axis=-1, keepdims=True)
    a /= np.maximum(n, eps)
    return a


def _shape2(vectors: Any, dim: int, what: str) -> tuple[Any, int]:
    """``vectors`` as a 2-D array-like (not copied: memmaps stay lazy) with its row count, dim checked."""
    if not hasattr(vectors, "shape") or not hasattr(vectors, "__getitem__"):
        vectors = np.asarray(vectors, dtype=np.float32)
    shape = tuple(vectors.shape)
    if len(shape) != 2:
        raise ValueError(f"{what} must be [N, d], got shape {shape}")
    if shape[1] != dim:
        raise ValueError(f"{what} have d={shape[1]} but the index has dim={dim}")
    return vectors, int(shape[0])


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of ``|approx top-k  &  exact top-k| / |exact top-k|``.

    Args:
        approx_ids: int ``[Q, >=k]`` ids from an approximate index, best first (-1 = padding, ignored).
        exact_ids: int ``[Q, >=k]`` exact ids, best first (-1 = padding; a query whose exact list is all padding
            is left out of the mean).
        k: the cut-off.

    Returns:
        recall in ``[0, 1]`` (``nan`` when no query has an exact neighbour).
    """
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(f"approx_ids and exact_ids must be [Q, k] with the same Q, got {a.shape} and {e.shape}")
    if k < 1 or a.shape[1] < k or e.shape[1] < k:
        raise ValueError(f"k={k} must be >= 1 and at most both widths ({a.shape[1]}, {e.shape[1]})")
    a, e = a[:, :k], e[:, :k]
    ev = e >= 0
    hit = (e[:, :, None] == a[:, None, :]).any(axis=2) & ev  # [Q, k]: exact neighbour found
    n = ev.sum(axis=1)
    ok = n > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(hit.sum(axis=1)[ok] / n[ok]))


@njit(nogil=True, cache=True)
def _merge_kernel(ids, scores, k, exc_ptr, exc_ids, mark, out_i, out_s):  # pragma: no cover - compiled
    """Per row ``r``: the ``k`` best distinct ids of ``ids[r]`` (max score per id; ties -> lower id), leaving out
    ``exc_ids[exc_ptr[r]:exc_ptr[r + 1]]`` and ids < 0.  ``mark`` is a zeroed uint8 scratch of ``n_items``
    entries, zeroed again on return (so a row costs O(M log M), nothing proportional to the item count)."""
    b, m = ids.shape
    n_items = mark.size
    for r in range(b):
        for j in range(exc_ptr[r], exc_ptr[r + 1]):
            e = exc_ids[j]
            if 0 <= e < n_items:
                mark[e] = 1
        order = np.argsort(-scores[r], kind="mergesort")
        n = 0
        j = 0
        while j < m and n < k:
            s = scores[r, order[j]]
            g = j + 1
            while g < m and scores[r, order[g]] == s:
                g += 1
            if g - j > 1:  # equal scores: the lower id first
                grp = order[j:g].copy()
                o2 = np.argsort(ids[r][grp], kind="mergesort")
                for t in range(g - j):
                    order[j + t] = grp[o2[t]]
            for t in range(j, g):
                if n >= k:
                    break
                i = ids[r, order[t]]
                if i < 0 or i >= n_items or mark[i] != 0:
                    continue
                mark[i] = 2
                out_i[r, n] = i
                out_s[r, n] = s
                n += 1
            j = g
        for t in range(n):
            mark[out_i[r, t]] = 0
        for j in range(exc_ptr[r], exc_ptr[r + 1]):
            e = exc_ids[j]
            if 0 <= e < n_items:
                mark[e] = 0


_SCRATCH = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A zeroed uint8 array of ``n`` entries, one per thread and kept (the merge leaves it zeroed): allocating
    and first-touching 1M entries per search would cost more than the merge itself."""
    a = getattr(_SCRATCH, "mark", None)
    if a is None or a.size < n:
        a = _SCRATCH.mark = np.zeros(max(n, 1), dtype=np.uint8)
    return a[:n]


def _merge(ids: np.ndarray, scores: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None,
           n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``[b, M]`` candidate lists (the K searched lists of each user side by side) into the top ``k`` per
    row: max score per item, excluded items and padding (-1) left out, ties -> lower id; ``(-1, -inf)`` pads."""
    b = ids.shape[0]
    out_i = np.full((b, k), -1, dtype=np.int64)
    out_s = np.full((b, k), -np.inf, dtype=np.float32)
    if exclude is None:
        ptr = np.zeros(b + 1, dtype=np.int64)
        exc = np.zeros(0, dtype=np.int64)
    else:
        ptr = np.zeros(b + 1, dtype=np.int64)
        ptr[1:] = np.cumsum([len(e) for e in exclude])
        exc = np.concatenate([np.asarray(e, dtype=np.int64).reshape(-1) for e in exclude]) if b else np.zeros(0, np.int64)
    _merge_kernel(np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(scores, dtype=np.float32), int(k),
                  ptr, exc, _scratch(n_items), out_i, out_s)
    return out_i, out_s


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# the index
# ---------------------------------------------------------------------------------------------------------------


def reset_interests(interests: np.ndarray | None, B: int, k: int) -> None:
    """Check an ``interests`` output array (int64 ``[B, k]``) of a search and fill it with -1 (not computed)."""
    if interests is None:
        return
    if interests.shape != (B, k) or interests.dtype != np.int64:
        raise ValueError(f"interests must be an int64 array of shape {(B, k)}, got {interests.dtype} {interests.shape}")
    interests.fill(-1)


class Index:
    """An item index (FAISS inside).  Build with :func:`build_index`, load with :meth:`load` / :func:`load_index`.

    ``flat`` and ``hnsw`` indexes accept ``add`` right away; the IVF kinds need ``train`` first
    (or use :meth:`fit` = train + add).
    """

    def __init__(self, config: IndexConfig, dim: int, _faiss_index: Any = None):
        config.check_dim(dim)
        self._config = config
        self._dim = int(dim)
        self._index = _faiss_index
        self._joint: Any = None  # ivf_joint.JointIVF, built on the first joint search
        self._joint_lock = threading.Lock()
        if self._index is None and config.kind not in _IVF_KINDS:
            self._index = self._new_faiss_index(config.nlist or 1)
        if self._index is not None:
            self._apply_search_params()

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def config(self) -> IndexConfig:
        """The configuration (``nlist`` / ``pq_m`` resolved once trained); a copy."""
        return dataclasses.replace(self._config)

    @property
    def dim(self) -> int:
        """Vector dimension ``d``."""
        return self._dim

    @property
    def ntotal(self) -> int:
        """Number of items added (their ids are ``0 .. ntotal - 1``)."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def kind(self) -> str:
        return self._config.kind

    @property
    def is_trained(self) -> bool:
        """Whether ``add`` / ``search`` may be called (always true for flat and hnsw)."""
        return self._index is not None and bool(self._index.is_trained)

    def __len__(self) -> int:
        return self.ntotal

    def memory_bytes(self) -> int:
        """Approximate RAM held by the index, in bytes (the data structures of the table in the module doc)."""
        if self._index is None:
            return 0
        n, d, idx = self.ntotal, self._dim, self._index
        if self.kind == "flat":
            return n * 4 * d
        if self.kind == "hnsw":
            h = idx.hnsw
            return n * 4 * d + 4 * int(h.neighbors.size()) + 4 * int(h.levels.size()) + 8 * int(h.offsets.size())
        fixed = int(idx.nlist) * 4 * d
        if self.kind == "ivf_flat":
            return n * (4 * d + 8) + fixed + (self._joint.memory_bytes() if self._joint is not None else 0)
        if self.kind in _SQ_TYPES:
            return n * (int(idx.code_size) + 8) + fixed
        return n * (int(idx.code_size) + 8) + fixed + 4 * d * (1 << int(idx.pq.nbits))

    def __repr__(self) -> str:
        c = self._config
        ivf = f", nlist={c.nlist}, nprobe={c.nprobe}"
        joint = f", probe='joint', user_nprobe={c.resolved_user_nprobe()}" if c.probe == "joint" else ""
        extra = {"ivf_flat": ivf + joint, "ivf_fp16": ivf, "ivf_sq8": ivf,
                 "ivf_pq": f", nlist={c.nlist}, nprobe={c.nprobe}, pq_m={c.pq_m}, pq_nbits={c.pq_nbits}",
                 "hnsw": f", hnsw_m={c.hnsw_m}, ef_search={c.ef_search}", "flat": ""}[c.kind]
        return f"Index(kind={c.kind!r}, dim={self._dim}, ntotal={self.ntotal}{extra})"

    # ---- construction -----------------------------------------------------------------------------------------
    def _new_faiss_index(self, nlist: int) -> Any:
        faiss = _faiss()
        c, d, ip = self._config, self._dim, faiss.METRIC_INNER_PRODUCT
        if c.kind == "flat":
            return faiss.IndexFlatIP(d)
        if c.kind == "hnsw":
            idx = faiss.IndexHNSWFlat(d, c.hnsw_m, ip)
            idx.hnsw.efConstruction = c.ef_construction
            return idx
        quant = faiss.IndexFlatIP(d) if c.quantizer == "flat" else faiss.IndexHNSWFlat(d, 32, ip)
        if c.kind == "ivf_flat":
            idx = faiss.IndexIVFFlat(quant, d, nlist, ip)
        elif c.kind in _SQ_TYPES:  # codes of the vectors themselves (not residuals): one table scan per list
            qtype = getattr(faiss.ScalarQuantizer, _SQ_TYPES[c.kind])
            idx = faiss.IndexIVFScalarQuantizer(quant, d, nlist, qtype, ip, False)
        else:
            idx = faiss.IndexIVFPQ(quant, d, nlist, c.resolved_pq_m(d), c.pq_nbits, ip)
            idx.pq.cp.seed = c.seed
        idx.cp.seed = c.seed
        idx.cp.niter = c.train_iters
        idx.cp.spherical = True  # unit-norm centroids for the inner product
        idx.cp.max_points_per_centroid = 1 << 30  # the sample size is ours (train_size), FAISS must not subsample
        return idx

    def _apply_search_params(self) -> None:
        faiss = _faiss()
        c, idx = self._config, self._index
        if c.kind in _IVF_KINDS:
            idx.nprobe = min(c.nprobe, int(idx.nlist))
            q = faiss.downcast_index(idx.quantizer)
            if isinstance(q, faiss.IndexHNSW):
                q.hnsw.efSearch = max(64, 2 * idx.nprobe)
        elif c.kind == "hnsw":
            idx.hnsw.efSearch = c.ef_search

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None,
                          threads: int | None = None, probe: str | None = None,
                          user_nprobe: int | None = None, joint_precision: str | None = None) -> None:
        """Change search-time settings (kept in :attr:`config` and saved).

        Args:
            nprobe: IVF lists visited per query vector (IVF kinds only; clamped to ``nlist``).
            ef_search: HNSW beam width (``hnsw`` only).
            threads: OpenMP threads for later FAISS calls (any kind; 1 is best for single queries; 0 = back to
                FAISS's default, all cores).
            probe: ``"per_vector"`` or ``"joint"`` (``ivf_flat`` only; see :class:`IndexConfig`).
            joint_precision: ``"float32"`` or ``"bfloat16"`` (joint probe only; see :class:`IndexConfig`).
            user_nprobe: lists per user of the joint probe (0 = back to ``4 * nprobe``).
        """
        c = self._config
        if nprobe is not None and c.kind not in _IVF_KINDS:
            raise ConfigError(_SOURCE, "nprobe", f"only IVF indexes ({', '.join(_IVF_KINDS)}) use nprobe (this one is {c.kind})")
        if ef_search is not None and c.kind != "hnsw":
            raise ConfigError(_SOURCE, "ef_search", f"only hnsw indexes use ef_search (this one is {c.kind})")
        new = dataclasses.replace(c, nprobe=c.nprobe if nprobe is None else nprobe,
                                  ef_search=c.ef_search if ef_search is None else ef_search,
                                  threads=c.threads if threads is None else (threads or None),
                                  probe=c.probe if probe is None else probe,
                                  joint_precision=c.joint_precision if joint_precision is None else joint_precision,
                                  user_nprobe=c.user_nprobe if user_nprobe is None else (user_nprobe or None))
        new.validate()
        if new.joint_precision == "bfloat16":
            from redrec.retrieval.ivf_joint import bf16_available

            if not bf16_available():
                raise ConfigError(_SOURCE, "joint_precision", "'bfloat16' needs MKL's bfloat16 GEMM, which torch's "
                                  "x86-64 builds bundle and this one does not; use 'float32'")
        self._config = new
        if self._index is not None:
            self._apply_search_params()

    # ---- train / add ------------------------------------------------------------------------------------------
    def train(self, vectors: Any) -> None:
        """Train the coarse quantizer (and PQ codebooks) of an IVF index; a no-op for flat and hnsw.

        Args:
            vectors: ``[N, d]`` item vectors (array or memory map: only ``train_size`` random rows are read).
                Pass the whole item set: with ``nlist=None`` the list count is :func:`default_nlist` of ``N``.

        Raises:
            ConfigError: ``nlist`` (or ``2**pq_nbits``) exceeds the number of training vectors.
            RuntimeError: the index already holds items.
        """
        c = self._config
        vectors, n = _shape2(vectors, self._dim, "training vectors")
        if c.kind not in _IVF_KINDS:
            return
        if self.ntotal:
            raise RuntimeError(f"cannot retrain an index that holds {self.ntotal} items (build a new one)")
        if n == 0:
            raise ValueError("no training vectors")
        nlist = c.nlist if c.nlist is not None else default_nlist(n)
        want = c.train_size if c.train_size is not None else default_train_size(
            nlist, c.pq_nbits if c.kind == "ivf_pq" else None)
        n_train = min(n, want)
        if c.nlist is None:
            nlist = min(nlist, max(1, n_train // 39))  # FAISS wants >= 39 points per centroid
        if nlist > n_train:
            raise ConfigError(_SOURCE, "nlist", f"nlist={nlist} exceeds the {n_train} training vectors "
                              f"({n} given, train_size={c.train_size}); lower nlist or give more vectors")
        if c.kind == "ivf_pq" and (1 << c.pq_nbits) > n_train:
            raise ConfigError(_SOURCE, "pq_nbits", f"2**pq_nbits={1 << c.pq_nbits} PQ centroids exceed the {n_train} "
                              "training vectors; lower pq_nbits or give more vectors")
        rng = np.random.default_rng(c.seed)
        rows = np.arange(n) if n_train == n else np.sort(rng.choice(n, size=n_train, replace=False))
        x = np.empty((n_train, self._dim), dtype=np.float32)
        step = c.add_chunk
        for a in range(0, n_train, step):  # sorted, chunked reads: kind to a memory-mapped file
            x[a:a + step] = _normalized(_as_numpy(vectors[rows[a:a + step]] if n_train < n else vectors[a:a + step]))
        self._config = dataclasses.replace(c, nlist=nlist, pq_m=c.resolved_pq_m(self._dim) if c.kind == "ivf_pq" else c.pq_m)
        faiss = _faiss()
        idx = self._new_faiss_index(nlist)
        keep = None
        if c.quantizer == "hnsw":  # k-means with an exact assignment; the centroids then go into the HNSW graph
            keep = faiss.IndexFlatIP(self._dim)
            idx.clustering_index = keep
        with _omp_threads(c.threads):
            idx.train(x)
        if keep is not None:
            idx.clustering_index = None
        self._index = idx
        self._apply_search_params()

    def add(self, vectors: Any) -> None:
        """Append items (ids ``ntotal .. ntotal + N - 1``), ``add_chunk`` rows at a time.

        Args:
            vectors: ``[N, d]`` float vectors (array, memory map or tensor); L2-normalised here.
        """
        vectors, n = _shape2(vectors, self._dim, "item vectors")
        self._require_trained("add")
        self._joint = None  # the joint-probe copy of the lists is rebuilt on the next joint search
        step = self._config.add_chunk
        with _omp_threads(self._config.threads):
            for a in range(0, n, step):
                self._index.add(_normalized(_as_numpy(vectors[a:a + step])))

    def fit(self, vectors: Any) -> Index:
        """``train(vectors)`` then ``add(vectors)``; returns self."""
        self.train(vectors)
        self.add(vectors)
        return self

    def _require_trained(self, what: str) -> None:
        if not self.is_trained:
            raise RuntimeError(f"this {self.kind} index is not trained: call train(vectors) (or fit(vectors)) "
                               f"before {what}")

    # ---- search -----------------------------------------------------------------------------------------------
    def search(self, queries: Any, k: int,
               exclude: np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]] | None = None,
               interests: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items per user, best first.

        Args:
            queries: ``[B, d]`` (one vector per user) or ``[B, K, d]`` (K interest vectors; score = max over K).
            k: list length (>= 1); slots beyond what the index finds are padded.
            exclude: per user, item ids never returned (ragged list or ``[B, E]`` padded with -1).
            interests: an int64 ``[B, k]`` array for the winning vector of each returned item: filled by the
                joint probe's bfloat16 scan (which computes it anyway), else with -1 (not computed).

        Returns:
            ``(ids int64 [B, k], scores float32 [B, k])``; score = (max over K) cosine, approximate for
            ``ivf_pq``; padding is id -1 / score ``-inf``.  Each of the K vectors is searched for
            ``k + max exclusion length`` items (IVF kinds: ``k`` items with the user's exclusions skipped during
            the scan), so the result is exact for ``flat`` (up to ties at the cut).  With ``probe="joint"`` the
            user's ``user_nprobe`` best lists are scanned once with all K vectors instead.
        """
        q = _as_numpy(queries)
        if q.ndim == 2:
            q = q[:, None, :]
        if q.ndim != 3:
            raise ValueError(f"queries must be [B, d] or [B, K, d], got shape {q.shape}")
        if q.shape[2] != self._dim:
            raise ValueError(f"queries have d={q.shape[2]} but the index has dim={self._dim}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self._require_trained("search")
        B, K, d = q.shape
        k = int(k)
        out_i = np.full((B, k), -1, dtype=np.int64)
        out_s = np.full((B, k), -np.inf, dtype=np.float32)
        n_items = self.ntotal
        reset_interests(interests, B, k)
        if B == 0 or K == 0 or n_items == 0:
            return out_i, out_s
        exc = as_ragged(exclude, B)
        if len(exc) != B:
            raise ValueError(f"{len(exc)} exclusion rows for {B} users")
        elens = np.fromiter((len(e) for e in exc), dtype=np.int64, count=B)
        if self._config.probe == "joint":
            ex = [np.asarray(e, dtype=np.int64) for e in exc] if exclude is not None and elens.any() else None
            return self._joint_index().search(_normalized(q), k, self._config.resolved_user_nprobe(), ex,
                                              threads=self._config.threads, precision=self._config.joint_precision,
                                              interests=interests)
        q = _normalized(q).reshape(B * K, d)
        if exclude is not None and self.kind in _IVF_KINDS and elens.any():
            # IVF: each user's exclusion list filters its own scan (FAISS IDSelector), so k' = k, not k + |excl|
            with _omp_threads(self._config.threads):
                for u in range(B):
                    s, i = self._faiss_search(q[u * K:(u + 1) * K], min(n_items, k), exc[u] if elens[u] else None)
                    out_i[u:u + 1], out_s[u:u + 1] = _merge(i.reshape(1, -1), s.reshape(1, -1), k, None, n_items)
            return out_i, out_s
        with _omp_threads(self._config.threads):
            step = max(1, _SEARCH_ELEMS // (K * min(n_items, k + int(elens.max()))))
            for u0 in range(0, B, step):
                u1 = min(B, u0 + step)
                b = u1 - u0
                kp = min(n_items, k + int(elens[u0:u1].max()))
                s, i = self._faiss_search(q[u0 * K:u1 * K], kp)
                ex = exc[u0:u1] if exclude is not None and elens[u0:u1].any() else None
                out_i[u0:u1], out_s[u0:u1] = _merge(i.reshape(b, K * kp), s.reshape(b, K * kp), k, ex, n_items)
        return out_i, out_s

    def _joint_index(self) -> Any:
        """The lists in the joint-probe layout (copied from the FAISS index on first use)."""
        with self._joint_lock:
            if self._joint is None or self._joint.n_items != self.ntotal:
                from redrec.retrieval.ivf_joint import JointIVF

                self._joint = JointIVF.from_faiss(self._index)
            return self._joint

    def _faiss_search(self, x: np.ndarray, kp: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if exclude is not None:  # IVF kinds only: the excluded ids are skipped during the list scan
            faiss = _faiss()
            ids = np.ascontiguousarray(exclude, dtype=np.int64)
            excluded = faiss.IDSelectorBatch(ids)  # kept referenced until the search returns
            keep = faiss.IDSelectorNot(excluded)
            params = faiss.SearchParametersIVF(sel=keep, nprobe=int(self._index.nprobe))
            return self._index.search(x, kp, params=params)
        if self.kind == "hnsw" and kp > self._config.ef_search:  # HNSW returns at most ef_search results
            params = _faiss().SearchParametersHNSW()
            params.efSearch = kp
            return self._index.search(x, kp, params=params)
        return self._index.search(x, kp)

    # ---- persistence ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the index to directory ``path`` (``index.faiss`` + ``index.json``), atomically.

        The files are written to a temporary sibling directory which then replaces ``path``; an existing ``path``
        is replaced only when it is a saved index (or an empty directory).

        Returns:
            the directory.
        """
        self._require_trained("save")
        faiss = _faiss()
        path = Path(path)
        if path.exists() and not (path / META_FILE).is_file() and (not path.is_dir() or any(path.iterdir())):
            raise DataError(path, None, "exists and is not a saved index; refusing to overwrite it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = path.parent / f".{path.name}.tmp-{tag}"
        tmp.mkdir()
        try:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            _fsync(tmp / INDEX_FILE)
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "kind": self.kind,
                "dim": self._dim,
                "ntotal": self.ntotal,
                "config": to_dict(self._config),
                "index_file": INDEX_FILE,
                "index_bytes": (tmp / INDEX_FILE).stat().st_size,
                "index_sha256": sha256_file(tmp / INDEX_FILE),
                "faiss_version": getattr(faiss, "__version__", "unknown"),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            _fsync(tmp / META_FILE)
            if path.exists():
                old = path.parent / f".{path.name}.old-{tag}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = False) -> Index:
        """Read an index written by :meth:`save`.

        Args:
            path: the index directory.
            verify: also check the SHA-256 of ``index.faiss`` (reads the whole file once more); its size is
                always checked.

        Raises:
            DataError: missing directory or file, not a redrec index, newer format, truncated / corrupt file,
                or FAISS index inconsistent with ``index.json``.
            ConfigError: bad ``config`` in ``index.json``.
        """
        faiss = _faiss()
        path = Path(path)
        if not path.exists():
            raise DataError(path, None, "index directory does not exist")
        if not path.is_dir():
            raise DataError(path, None, f"is a file; expected an index directory written by Index.save "
                            f"(with {META_FILE} and {INDEX_FILE})")
        mpath = path / META_FILE
        if not mpath.is_file():
            raise DataError(path, META_FILE, "missing: not an index directory written by Index.save")
        try:
            meta = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(mpath, None, f"not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise DataError(mpath, "format", f"expected {FORMAT!r}, got {got!r}: not a redrec index")
        ver = meta.get("version")
        if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1:
            raise DataError(mpath, "version", f"expected a positive integer, got {ver!r}")
        if ver > FORMAT_VERSION:
            raise DataError(mpath, "version", f"format version {ver} is newer than this redrec reads "
                            f"({FORMAT_VERSION})", hint="upgrade redrec")
        for key in ("dim", "ntotal", "index_bytes"):
            v = meta.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "dim" else 0):
                raise DataError(mpath, key, f"expected a {'positive' if key == 'dim' else 'non-negative'} "
                                f"integer, got {v!r}")
        config = from_dict(IndexConfig, meta.get("config"), source=f"{mpath}: config")
        dim, ntotal = meta["dim"], meta["ntotal"]
        config.check_dim(dim, source=f"{mpath}: config")
        fpath = path / str(meta.get("index_file", INDEX_FILE))
        if not fpath.is_file():
            raise DataError(fpath, None, "FAISS index file is missing")
        size = fpath.stat().st_size
        if size != meta["index_bytes"]:
            raise DataError(fpath, None, f"truncated or modified: {size} bytes, {META_FILE} says "
                            f"{meta['index_bytes']}")
        if verify and meta.get("index_sha256") and sha256_file(fpath) != meta["index_sha256"]:
            raise DataError(fpath, None, f"corrupt: SHA-256 differs from the one in {META_FILE}")
        try:
            idx = faiss.read_index(str(fpath))
        except Exception as e:  # FAISS raises RuntimeError with a C++ message
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(fpath, None, f"corrupt or unreadable FAISS index ({msg})") from None
        want = _FAISS_CLASS[config.kind]
        if type(idx).__name__ not in want or idx.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise DataError(fpath, None, f"holds a {type(idx).__name__} (metric {idx.metric_type}); "
                            f"{META_FILE} says kind={config.kind!r} ({want[0]}, inner product)")
        if idx.d != dim or idx.ntotal != ntotal:
            raise DataError(fpath, None, f"holds d={idx.d}, ntotal={idx.ntotal}; {META_FILE} says d={dim}, "
                            f"ntotal={ntotal}")
        if config.kind in _IVF_KINDS and idx.nlist != config.nlist:
            raise DataError(fpath, None, f"has nlist={idx.nlist}; {META_FILE} says {config.nlist}")
        return cls(config, dim, _faiss_index=idx)


def build_index(config: IndexConfig, dim: int) -> Index:
    """An empty index of ``config.kind`` for ``dim``-dimensional vectors (validates the config)."""
    return Index(config, dim)


def load_index(path: str | Path, *, verify: bool = False) -> Index:
    """:meth:`Index.load`."""
    return Index.load(path, verify=verify)


IVF_KINDS = _IVF_KINDS  # the kinds with coarse lists (nprobe)

__all__ = [
    "FORMAT_VERSION",
    "IVF_KINDS",
    "KINDS",
    "Index",
    "IndexConfig",
    "build_index",
    "default_nlist",
    "default_train_size",
    "load_index",
    "recall_at_k",
]
