"""RedSeqRec's ``eval/eval.py``, computed on the CPU.

The authors' evaluation (github.com/ariesssxu/RedSeqRec, ``eval/eval.py``) reads three files and needs a GPU:

``base_item_embedding_pr.pkl``
    a pickled list of ``{"id": note_id, "embed": [64 floats], "embed_type": ...}`` (the item pool);
``user_embedding_pr.pkl``
    a pickled list of ``{"id": user_id, "embed": tensor [K*64], "embed_type": ...}``; the released file holds
    bfloat16 tensors pickled on a CUDA device (``generate_user_embedding.py`` stores ``normed_embs.flatten(1, 2)``
    rows: K unit-norm 64-d interest vectors, flattened);
``user_lastn.json``
    ``{user_id: {"homefeed_noteid_lastn": [ev, ...], "ads_click_noteid_lastn": [...],
    "ads_click_noteid_target": [...]}}`` with ``ev = {"note_id": ..., "timestamp": ..., "is_*": ...}``.

:func:`reference_eval` computes what that script prints, on a CPU, in bounded memory:

* users: those of the user pickle, in the order of their first occurrence (a repeated id keeps its first
  position and its *last* embedding: the script fills a dict); users absent from the json, or none of whose
  ``ads_click_noteid_target`` notes is in the item pool, are skipped; json users without an embedding are
  never looked at.  Targets = the target note ids that are in the pool; the metrics use their ``set``.
* vectors: ``torch.tensor(embed, dtype=float16)``, divided by its own ``.norm(dim=-1, keepdim=True)``, in fp16.
  A flattened user embedding is therefore normalised over its whole ``K*64`` vector (every block scaled by
  ``1/sqrt(K)`` for unit-norm blocks), *then* viewed as ``[K, 64]``; an item row is normalised on its own.
* score of item ``i`` for a user = ``max_k`` of the fp16 matmul ``user[K, 64] @ items.T``; top 1000 by
  ``torch.topk``; HR@K (any target in the top K), NDCG@K (DCG of the hits in the top K over the IDCG of
  ``min(K, |targets|)`` hits), MRR (1 / rank of the first hit in the top 1000, else 0); means over users.
  The history is not excluded.

fp16 emulation (exact up to two documented effects):

* inputs are rounded to fp16 as torch does (a float64 value goes through float32 first: ``c10::Half`` is built
  from a float); the norm is accumulated in float32 and rounded to fp16, the quotient computed in float32 and
  rounded to fp16 -- what torch's half kernels do, on the CPU and on CUDA;
* the matmul is a float32 GEMM of the fp16 values, rounded to fp16 -- what a CUDA fp16 GEMM does (fp16
  products are exact in float32, accumulation in float32).  Its summation order is not cuBLAS's, so a score
  can differ from the GPU's by one fp16 ulp when the float32 sum lies within rounding noise of an fp16
  rounding boundary (about 1 score in 2,000); the fp32 norm's summation order has the same (rarer) effect;
* ``torch.topk`` on CUDA leaves the order of equal scores unspecified; here ties are broken by the lower
  item index (the pool order).  fp16 scores tie often (fp16 has 2,048 distinct values in [0.25, 1)), so a
  target tied with other items at a cut-off can land on either side of it on the GPU.

These are the only possible differences; each can move a user's hit across a cut-off (a change of
``1 / n_users`` in HR) only in the rare case where the target sits exactly at the cut-off.

Since fp16 rounding is monotone, ``round(max_k s_k) == max_k round(s_k)``: the max is taken in float32 and only
the candidates are rounded.  Items are scanned in chunks with, per user, the 1000th best score so far as a
threshold (a later item tied with it has a higher index, so it can only enter with a strictly higher score);
the top lists are kept as int64 keys ``(fp16 order << 32) | (2**32 - 1 - index)``.  Several worker threads
each run single-threaded torch GEMMs on their own user batches.

The pickles are unpickled with the standard :mod:`pickle` machinery: only open files you trust (``eval.py``
does the same).  Tensors pickled on a CUDA device are loaded onto the CPU (see :func:`load_embedding_pickle`).
"""

from __future__ import annotations

import io
import pickle
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from redrec.data.reference import read_lastn_json
from redrec.errors import DataError

BLOCK = 64  #: eval.py views a user embedding as [-1, 64]
LIST_SIZE = 1000  #: eval.py ranks a top-1000 list
KS: tuple[int, ...] = (10, 100, 1000)  #: the cut-offs eval.py prints
TARGET_KEY = "ads_click_noteid_target"

_EMPTY = -1  # key of an empty top-list slot (every real key is >= 0)
_IDX_BITS = 32
_IDX_MASK = (1 << _IDX_BITS) - 1


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def _load_storage_on_cpu(b: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)


class _CpuUnpickler(pickle.Unpickler):
    """An unpickler that maps every pickled torch storage to the CPU.

    A pickled tensor stores its storage as ``torch.storage._load_from_bytes(torch.save bytes)``, and
    ``_load_from_bytes`` calls ``torch.load`` without ``map_location``: on a machine without CUDA a tensor
    pickled on a GPU fails to load.  This unpickler routes that call to ``torch.load(..., map_location="cpu")``.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_on_cpu
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "not a regular file")
    try:
        with open(path, "rb") as f:
            return _CpuUnpickler(f).load()
    except EOFError as e:
        raise DataError(path, None, f"the pickle ends too early (truncated file?): {e or 'EOF'}") from e
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError) as e:
        raise DataError(path, None, f"not a readable pickle (truncated or corrupt file?): {e}") from e
    except (ModuleNotFoundError, AttributeError) as e:
        raise DataError(path, None, f"the pickle refers to code that is not available here: {e}",
                        hint="embeddings must be lists, numpy arrays or torch tensors") from e
    except RuntimeError as e:  # torch.load of a storage
        raise DataError(path, None, f"a pickled tensor could not be loaded: {e}") from e


def _embed_to_numpy(e: Any) -> np.ndarray:
    """float32 array of one embedding (a torch tensor on any device, a numpy array, a nested list)."""
    mod = type(e).__module__
    if mod.startswith("torch"):
        import torch

        if isinstance(e, torch.Tensor):
            # bfloat16 / float16 -> float32 is exact; float64 -> float32 is what torch does before fp16
            return e.detach().to(device="cpu", dtype=torch.float32).numpy()
    a = np.asarray(e)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"not numeric (dtype {a.dtype})")
    return a.astype(np.float32)


def load_embedding_pickle(path: str | Path) -> tuple[list, np.ndarray]:
    """Read an ``eval.py`` embedding pickle: a list of ``{"id": ..., "embed": ..., ...}`` dicts.

    ``embed`` may be a list of floats, a numpy array or a torch tensor (any dtype, any device: tensors pickled
    on a GPU are loaded onto the CPU).  Values are converted to float32 (float64 -> float32 is the first step of
    torch's own float64 -> float16 conversion, so nothing is lost for the fp16 evaluation).

    Returns:
        ``(ids, vectors)``: the ids in file order (``str``, or ``int`` when the file has integer ids; never
        converted, so they compare as ``eval.py`` compares them) and float32 ``[n, D]`` vectors for 1-D
        embeddings (``[n, R, C]`` when every embedding is an ``[R, C]`` matrix).

    Raises:
        DataError: missing / truncated / unreadable file, not a list, an element that is not a dict or lacks
            ``id`` / ``embed``, an id that is not a str or int, a non-numeric embedding, embeddings of different
            shapes, NaN or infinite values.
    """
    path = Path(path)
    data = _unpickle(path)
    if not isinstance(data, (list, tuple)):
        raise DataError(path, None, f"expected a list of {{'id', 'embed'}} dicts, got {type(data).__name__}")
    if not data:
        raise DataError(path, None, "the list of embeddings is empty")
    ids: list = []
    out: np.ndarray | None = None
    shape: tuple[int, ...] = ()
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(path, None, f"element {i} is a {type(rec).__name__}, expected a dict with 'id' and 'embed'")
        for key in ("id", "embed"):
            if key not in rec:
                raise DataError(path, key, f"element {i} has no key '{key}' (keys: {sorted(map(str, rec))})")
        rid = rec["id"]
        if isinstance(rid, np.generic):
            rid = rid.item()
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise DataError(path, "id", f"element {i}: id {rid!r} is a {type(rid).__name__}, expected a str")
        try:
            v = _embed_to_numpy(rec["embed"])
        except (TypeError, ValueError) as e:
            raise DataError(path, "embed", f"element {i} (id {rid!r}): not a numeric vector: {e}") from e
        if out is None:
            shape = v.shape
            if v.ndim not in (1, 2) or v.size == 0:
                raise DataError(path, "embed", f"element {i} (id {rid!r}): expected a vector, got shape {v.shape}")
            out = np.empty((len(data), *shape), dtype=np.float32)
        elif v.shape != shape:
            raise DataError(
                path, "embed",
                f"element {i} (id {rid!r}) has shape {v.shape} but element 0 has shape {shape}",
                hint="all embeddings of a file must have the same length",
            )
        out[i] = v
        ids.append(rid)
    assert out is not None
    finite = np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise DataError(path, "embed", f"element {bad} (id {ids[bad]!r}) has NaN or infinite values "
                        f"({int((~finite).sum())} embeddings in all)")
    return ids, out


@dataclass
class UserLastN:
    """``user_lastn.json``: per user, its target note ids and its event lists.

    Attributes:
        path: the file.
        targets: user id -> note ids of its ``ads_click_noteid_target`` events, in file order (duplicates kept).
        events: user id -> ``{list name: [event dict, ...]}`` for every list of the user (targets included).
    """

    path: str
    targets: dict[str, list]
    events: dict[str, dict[str, list[dict]]] = field(repr=False)

    def history(self, user: str, key: str = "homefeed_noteid_lastn") -> list:
        """Note ids of one of the user's event lists (``[]`` when the user or the list is absent)."""
        return [ev["note_id"] for ev in self.events.get(user, {}).get(key, [])]

    def __len__(self) -> int:
        return len(self.targets)


def load_user_lastn(path: str | Path) -> UserLastN:
    """Read ``user_lastn.json``.

    Every user needs an ``ads_click_noteid_target`` list of events with a ``note_id`` (``eval.py`` reads it for
    every user of the file); the other lists are kept as they are (lists of dicts with a ``note_id``).

    Raises:
        DataError: missing file, invalid JSON, not an object of objects, a user without the target list, an
            event that is not an object or has no ``note_id``.
    """
    path = Path(path)
    data = read_lastn_json(path)
    targets: dict[str, list] = {}
    events: dict[str, dict[str, list[dict]]] = {}
    for uid, rec in data.items():
        if not isinstance(rec, dict):
            raise DataError(path, None, f"user {uid!r}: expected an object of event lists, got {type(rec).__name__}")
        if TARGET_KEY not in rec:
            raise DataError(path, TARGET_KEY, f"user {uid!r} has no '{TARGET_KEY}' list (keys: {sorted(rec)})")
        lists: dict[str, list[dict]] = {}
        for key, evs in rec.items():
            if not isinstance(evs, list):
                raise DataError(path, key, f"user {uid!r}: expected a list of events, got {type(evs).__name__}")
            for j, ev in enumerate(evs):
                if not isinstance(ev, dict) or "note_id" not in ev:
                    what = "has no 'note_id'" if isinstance(ev, dict) else f"is a {type(ev).__name__}, not an object"
                    raise DataError(path, key, f"user {uid!r}: event {j} {what}")
            lists[key] = evs
        events[uid] = lists
        targets[uid] = [ev["note_id"] for ev in lists[TARGET_KEY]]
    return UserLastN(str(path), targets, events)


# ---------------------------------------------------------------------------------------------------------------
# fp16 emulation
# ---------------------------------------------------------------------------------------------------------------


def fp16_normalize(x: np.ndarray) -> np.ndarray:
    """``t = torch.tensor(x, dtype=float16); t / t.norm(dim=-1, keepdim=True)``, returned as float32 values.

    ``x`` is float32 (float64 input is first rounded to float32, as torch does before float16).  The norm is the
    fp16 rounding of the exact norm of the fp16 values (torch accumulates it in float32 in an order of its own:
    the two can differ by one fp16 ulp when the norm lies within float32 noise of an fp16 rounding boundary);
    the quotient of the two fp16 numbers is rounded to fp16 (as torch's half division does, exactly).  A zero
    vector gives NaN, as in torch.
    """
    h = _round16(np.ascontiguousarray(x, dtype=np.float32))
    h64 = h.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        # sum of squares of fp16 values: exact in float64; sqrt then float64 -> float16: correctly rounded
        n = np.sqrt(np.einsum("...i,...i->...", h64, h64)).astype(np.float16).astype(np.float32)
    del h64
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _round16(h / n[..., None])


def _fp16_order(v: np.ndarray) -> np.ndarray:
    """int64 rank of fp16 values (given as float32 values exactly representable in fp16): larger = larger."""
    import torch

    h = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32) + np.float32(0)).to(torch.float16)  # -0 -> +0
    bits = h.view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    return np.where(bits >= 0x8000, 0xFFFF - bits, bits + 0x8000)


def _order_to_value(o: np.ndarray) -> np.ndarray:
    bits = np.where(o >= 0x8000, o - 0x8000, 0xFFFF - o).astype(np.uint16)
    return bits.view(np.float16).astype(np.float32)


class _TopL:
    """Per-user running top-``L`` of (fp16 score desc, item index asc) as int64 keys, with a candidate buffer."""

    def __init__(self, n_users: int, L: int, width: int):
        self.L = L
        self.keys = np.full((n_users, L + width), _EMPTY, dtype=np.int64)
        self.fill = np.zeros(n_users, dtype=np.int64)  # buffered candidates per user
        self.thr = np.full(n_users, -np.inf, dtype=np.float32)  # fp16 value of the L-th best so far
        self.width = width
        self.n_merges = 0

    def add(self, rows: np.ndarray, idx: np.ndarray, vals: np.ndarray) -> None:
        """Buffer candidates (``rows`` ascending, one chunk at most ``width`` per user)."""
        counts = np.bincount(rows, minlength=len(self.fill))
        if (self.fill + counts).max() > self.width:
            self.merge()
        start = np.cumsum(counts) - counts
        col = self.L + self.fill[rows] + (np.arange(len(rows)) - start[rows])
        self.keys[rows, col] = (_fp16_order(vals) << _IDX_BITS) | (_IDX_MASK - idx)
        self.fill += counts

    def merge(self) -> None:
        if not self.fill.any():
            return
        import torch

        self.n_merges += 1
        k = torch.from_numpy(self.keys)
        top = torch.topk(k, self.L, dim=1, sorted=False).values
        k[:, : self.L] = top
        k[:, self.L :] = _EMPTY
        self.fill[:] = 0
        worst = self.keys[:, : self.L].min(axis=1)
        self.thr = np.where(worst >= 0, _order_to_value(worst >> _IDX_BITS), -np.inf).astype(np.float32)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [n, L] int64, scores [n, L] float32)``, best first; empty slots: index -1, score -inf."""
        self.merge()
        top = -np.sort(-self.keys[:, : self.L], axis=1)
        idx = np.where(top >= 0, _IDX_MASK - (top & _IDX_MASK), -1)
        val = np.where(top >= 0, _order_to_value(np.maximum(top, 0) >> _IDX_BITS), -np.inf).astype(np.float32)
        return idx, val


def _exact_scores(users: np.ndarray, items: np.ndarray, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``round_fp16(max_k users[rows, k] . items[idx])`` with float64 dot products (exact for fp16 unit vectors)."""
    u = users[rows].astype(np.float64)  # [n, K, d]
    v = items[idx].astype(np.float64)  # [n, d]
    # numpy rounds float64 -> float16 directly (torch would round to float32 first: double rounding)
    return np.einsum("nkd,nd->nk", u, v).max(axis=1).astype(np.float16).astype(np.float32)


def _round16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to fp16 (nearest, ties to even), returned as float32.

    torch's conversion (about 6x faster than numpy's); only for float32 input: torch rounds float64 to float32
    first.
    """
    assert x.dtype == np.float32
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float16).to(torch.float32).numpy()


def reference_topk(
    users: np.ndarray,
    items: np.ndarray,
    list_size: int = LIST_SIZE,
    *,
    user_chunk: int = 256,
    item_chunk: int = 1024,
    threads: int | None = None,
    progress: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``list_size`` items per user by ``round_fp16(max_k users[u, k] . items[i])``.

    The score is the fp16 rounding of the exact dot product of the fp16 inputs (float64 sums of fp16 products
    are exact for vectors of norm <= 1), whatever the chunk sizes, thread count or BLAS: a float32 GEMM gives
    every score to within a proven bound ``eps`` (``d * 2**-24 * max|u| * max|v|``, doubled), and only the
    scores whose ``[s - eps, s + eps]`` interval straddles an fp16 rounding boundary are recomputed in float64.

    Args:
        users: float32 ``[n_users, K, d]`` (fp16 values, already normalised as ``eval.py`` does).
        items: float32 ``[n_items, d]`` (fp16 values, normalised).
        list_size: length of each ranked list (at most ``n_items``).
        user_chunk / item_chunk: block sizes; memory is about ``threads * user_chunk * (K * item_chunk * 4 +
            (list_size + 2 * max(list_size, item_chunk)) * 8)`` bytes besides the inputs.
        threads: worker threads (default: torch's thread count); each runs single-threaded GEMMs.
        progress: optional callable(n_users_done) called after each user batch.

    Returns:
        ``(indices [n_users, list_size] int64, scores [n_users, list_size] float32)``, best first; equal fp16
        scores are ordered by the lower item index.
    """
    import torch

    users = np.ascontiguousarray(users, dtype=np.float32)
    items = np.ascontiguousarray(items, dtype=np.float32)
    if users.ndim != 3 or items.ndim != 2 or users.shape[2] != items.shape[1]:
        raise ValueError(f"users must be [n, K, d] and items [N, d], got {users.shape} and {items.shape}")
    if not (np.isfinite(users).all() and np.isfinite(items).all()):
        raise ValueError("users and items must be finite")
    n_u, K, d = users.shape
    N = items.shape[0]
    L = int(list_size)
    if not 1 <= L <= N:
        raise ValueError(f"list_size must be in [1, n_items={N}], got {L}")
    if N > _IDX_MASK:
        raise ValueError(f"at most {_IDX_MASK} items, got {N}")
    out_idx = np.empty((n_u, L), dtype=np.int64)
    out_val = np.empty((n_u, L), dtype=np.float32)
    if n_u == 0:
        return out_idx, out_val
    # |float32 sum - exact sum| <= gamma_{d-1} * sum|u_i v_i| <= gamma_{d-1} * |u| |v|, for any summation order
    max_u = float(np.sqrt(np.einsum("nkd,nkd->nk", users, users, dtype=np.float64).max()))
    max_v = float(np.sqrt(np.einsum("nd,nd->n", items, items, dtype=np.float64).max()))
    unit = 2.0**-24
    eps = np.float32(2.0 * (d * unit / (1 - d * unit)) * max_u * max_v * 1.0001 + 2.0**-126)
    user_chunk = max(1, int(user_chunk))
    C = max(1, min(int(item_chunk), N))
    width = 2 * max(L, C)
    items_t = torch.from_numpy(items)
    lock = threading.Lock()

    def run(b0: int) -> None:
        b1 = min(n_u, b0 + user_chunk)
        B = b1 - b0
        ub_np = users[b0:b1]
        ub = torch.from_numpy(np.ascontiguousarray(ub_np.transpose(1, 0, 2).reshape(K * B, d)))
        p_buf = torch.empty(K * B, C)
        m_buf = np.empty((B, C), dtype=np.float32)
        mask = np.empty((B, C), dtype=bool)
        top = _TopL(B, L, width)
        checked = False
        merge_at = B * max(1, L // 4)  # merge when a quarter list per user is buffered
        for c0 in range(0, N, C):
            c1 = min(N, c0 + C)
            w = c1 - c0
            if w == C:
                p = torch.mm(ub, items_t[c0:c1].T, out=p_buf).numpy()
                m, mk = m_buf, mask
            else:
                p = torch.mm(ub, items_t[c0:c1].T).numpy()
                m, mk = np.empty((B, w), dtype=np.float32), np.empty((B, w), dtype=bool)
            if not checked:  # the GEMM must honour the float32 error bound (no reduced-precision mode)
                r = np.arange(min(K * B, 64)) % (K * B)
                c = np.arange(len(r)) % w
                exact = np.einsum("nd,nd->n", ub_np.transpose(1, 0, 2).reshape(K * B, d)[r].astype(np.float64),
                                  items[c0 + c].astype(np.float64))
                if np.abs(p[r, c] - exact).max() > eps:
                    raise RuntimeError("the float32 matmul is less precise than IEEE float32 summation allows "
                                       "(torch float32 matmul precision must be 'highest')")
                checked = True
            if K == 1:
                np.copyto(m, p)
            else:
                np.maximum(p[:B], p[B : 2 * B], out=m)
                for k in range(2, K):
                    np.maximum(m, p[k * B : (k + 1) * B], out=m)
            # a score whose exact value rounds above thr has a float32 value above thr - eps
            np.greater(m, (top.thr - eps)[:, None], out=mk)
            flat = np.flatnonzero(mk)
            if flat.size == 0:
                continue
            rows = flat // w
            mv = m.reshape(-1)[flat]
            hi = _round16(mv + eps)  # the exact score rounds to at most hi, at least lo
            keep = hi > top.thr[rows]
            if not keep.all():
                flat, rows, mv, hi = flat[keep], rows[keep], mv[keep], hi[keep]
                if flat.size == 0:
                    continue
            cols = flat - rows * w + c0
            vals = _round16(mv - eps)
            unsure = vals != hi
            if unsure.any():
                vals[unsure] = _exact_scores(ub_np, items, rows[unsure], cols[unsure])
                keep = vals > top.thr[rows]
                if not keep.all():
                    rows, cols, vals = rows[keep], cols[keep], vals[keep]
                    if rows.size == 0:
                        continue
            top.add(rows, cols, vals)
            if top.fill.sum() >= merge_at:  # a fresher threshold means fewer candidates
                top.merge()
        idx, val = top.result()
        out_idx[b0:b1] = idx
        out_val[b0:b1] = val
        if progress is not None:
            with lock:
                progress(B)

    n_threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
    starts = list(range(0, n_u, user_chunk))
    old_threads = torch.get_num_threads()
    old_precision = torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    try:
        if n_threads == 1 or len(starts) == 1:
            for b0 in starts:
                run(b0)
        else:
            with ThreadPoolExecutor(max_workers=min(n_threads, len(starts))) as ex:
                for f in [ex.submit(run, b0) for b0 in starts]:
                    f.result()
    finally:
        torch.set_num_threads(old_threads)
        torch.set_float32_matmul_precision(old_precision)
    return out_idx, out_val


# ---------------------------------------------------------------------------------------------------------------
# metrics and the whole evaluation
# ---------------------------------------------------------------------------------------------------------------


def _user_metrics(hit_pos: np.ndarray, n_targets: int, ks: Sequence[int]) -> dict[str, float]:
    """eval.py's per-user metrics from the 0-based positions (ascending) of the hits in the ranked list."""
    pos = [int(p) for p in hit_pos]
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = 1.0 if pos and pos[0] < k else 0.0
    for k in ks:  # summed in eval.py's order (a generator over positions, from int 0)
        dcg = sum(1.0 / np.log2(p + 2) for p in pos if p < k)
        idcg = sum(1.0 / np.log2(i + 2) for i in range(min(k, n_targets)))
        out[f"ndcg@{k}"] = float(dcg / idcg) if idcg > 0 else 0.0
    out["mrr"] = 1.0 / (pos[0] + 1) if pos else 0.0
    return out


@dataclass
class ReferenceResult:
    """What :func:`reference_eval` measured.

    Attributes:
        metrics: means over the evaluated users: ``hr@K`` / ``ndcg@K`` for every K, ``mrr``.
        n_users: users evaluated.
        n_items: items in the pool (rows of the item pickle).
        ks: the cut-offs.
        list_size: length of each ranked list (eval.py: 1000).
        skipped: users of the user pickle that were not evaluated, by reason.
        info: other counts (json users without an embedding, duplicate ids, target events outside the pool).
        users: ids of the evaluated users, in evaluation order.
        per_user: per-user metric arrays aligned with ``users``.
        n_targets: per-user number of distinct targets in the pool.
        top_items: ``[n_users, list_size]`` ranked item indices (rows of the item pickle), if kept.
        wall_time_s: seconds, loading included; ``timings`` splits it.
        files: the three input paths.
    """

    metrics: dict[str, float]
    n_users: int
    n_items: int
    ks: tuple[int, ...]
    list_size: int
    skipped: dict[str, int]
    info: dict[str, int]
    users: list = field(repr=False)
    per_user: dict[str, np.ndarray] = field(repr=False)
    n_targets: np.ndarray = field(repr=False)
    top_items: np.ndarray | None = field(default=None, repr=False)
    wall_time_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    def to_eval_result(self, model: str | None = None) -> Any:
        """A :class:`redrec.eval.protocols.EvalResult` (protocol ``reference``, full pool, no exclusion)."""
        from redrec.eval.protocols import EvalResult

        user_pkl = self.files.get("user_embeddings", "")
        return EvalResult(
            model=model or f"embeddings ({Path(user_pkl).name})",
            protocol="reference",
            dataset=self.files.get("lastn", ""),
            n_users=self.n_users,
            pool="full",
            pool_size=self.n_items,
            exclude_history=False,
            ks=list(self.ks),
            metrics=dict(self.metrics),
            mean_targets=float(self.n_targets.mean()) if len(self.n_targets) else float("nan"),
            wall_time_s=self.wall_time_s,
            config={
                "name": "reference",
                "source": "RedSeqRec eval/eval.py (fp16 emulated on CPU)",
                "list_size": self.list_size,
                "files": dict(self.files),
                "skipped": dict(self.skipped),
                "info": dict(self.info),
            },
            per_user={k: np.asarray(v) for k, v in self.per_user.items()},
            users=np.asarray(self.users, dtype=object),
        )


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="reference eval", unit="user", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def reference_eval(
    item_pkl: str | Path,
    user_pkl: str | Path,
    lastn_json: str | Path,
    *,
    ks: Sequence[int] = KS,
    list_size: int = LIST_SIZE,
    user_chunk: int = 256,
    item_chunk: int = 1024,
    threads: int | None = None,
    progress: bool = True,
    keep_top_items: bool = False,
) -> ReferenceResult:
    """Evaluate embedding pickles exactly as RedSeqRec's ``eval/eval.py`` does, on the CPU.

    Args:
        item_pkl: ``base_item_embedding_pr.pkl`` (64-d item embeddings).
        user_pkl: ``user_embedding_pr.pkl`` (``K*64``-d user embeddings).
        lastn_json: ``user_lastn.json`` (the targets).
        ks: cut-offs of HR@K / NDCG@K (eval.py: 10, 100, 1000).
        list_size: length of the ranked list (eval.py: 1000; metrics only see this list).
        user_chunk / item_chunk / threads: see :func:`reference_topk` (memory stays in the tens of MB per thread
            besides the embeddings themselves).
        progress: show a progress bar on stderr.
        keep_top_items: keep the ranked lists in the result.

    Raises:
        DataError: unreadable or malformed files, item embeddings that are not 64-d, user embeddings whose length
            is not a multiple of 64, zero vectors, ``list_size`` larger than the pool (``torch.topk`` fails in
            eval.py), or no user to evaluate (no user id of the pickle has a target in the pool).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    item_pkl, user_pkl, lastn_json = Path(item_pkl), Path(user_pkl), Path(lastn_json)

    lastn_targets = load_user_lastn(lastn_json).targets  # the event lists are dropped: memory peaks next
    item_ids, item_vecs = load_embedding_pickle(item_pkl)
    user_ids, user_vecs = load_embedding_pickle(user_pkl)
    timings["load_s"] = time.perf_counter() - t0

    if item_vecs.ndim != 2 or item_vecs.shape[1] != BLOCK:
        raise DataError(item_pkl, "embed", f"item embeddings must be {BLOCK}-d vectors, got shape "
                        f"{item_vecs.shape[1:]}", hint="eval.py multiplies [K, 64] user blocks by the item matrix")
    flat_dim = int(np.prod(user_vecs.shape[1:]))
    if flat_dim % BLOCK:
        raise DataError(user_pkl, "embed", f"user embeddings have {flat_dim} values, not a multiple of {BLOCK}",
                        hint="eval.py views each user embedding as [-1, 64]")
    n_items = len(item_ids)
    L = int(list_size)
    if not 1 <= L <= n_items:
        raise DataError(item_pkl, None, f"the pool has {n_items} items, fewer than the list size {L} "
                        "(torch.topk would fail in eval.py)", hint="pass a smaller list_size")

    # eval.py: userid2embed = {id: embed} (first position, last embedding); valid users in that dict's order
    last_row: dict[Any, int] = {}
    for row, uid in enumerate(user_ids):
        last_row[uid] = row
    item_code: dict[Any, int] = {}
    codes = np.empty(n_items, dtype=np.int64)
    for i, nid in enumerate(item_ids):
        codes[i] = item_code.setdefault(nid, len(item_code))
    skipped = {"not in user_lastn.json": 0, "no target event": 0, "no target in the item pool": 0}
    users: list = []
    rows: list[int] = []
    targets: list[np.ndarray] = []
    n_target_events = n_outside = 0
    for uid, row in last_row.items():
        raw = lastn_targets.get(uid)
        if raw is None:
            skipped["not in user_lastn.json"] += 1
            continue
        if not raw:
            skipped["no target event"] += 1
            continue
        valid = [item_code[t] for t in raw if _hashable(t) and t in item_code]
        n_target_events += len(raw)
        n_outside += len(raw) - len(valid)
        if not valid:
            skipped["no target in the item pool"] += 1
            continue
        users.append(uid)
        rows.append(row)
        targets.append(np.unique(np.asarray(valid, dtype=np.int64)))
    emb_ids = set(last_row)
    info = {
        "user_embeddings": len(user_ids),
        "duplicate_user_ids": len(user_ids) - len(last_row),
        "duplicate_item_ids": n_items - len(item_code),
        "lastn_users": len(lastn_targets),
        "lastn_users_without_embedding": sum(1 for u in lastn_targets if u not in emb_ids),
        "target_events_of_candidates": n_target_events,
        "target_events_outside_pool": n_outside,
    }
    if not users:
        example = next(iter(last_row), None)
        raise DataError(
            lastn_json, TARGET_KEY,
            f"no user of {user_pkl.name} has a target note in {item_pkl.name} "
            f"(skipped: {', '.join(f'{v} {k}' for k, v in skipped.items() if v)})",
            hint=f"do the files belong together? e.g. user id {example!r} of the pickle",
        )

    t1 = time.perf_counter()
    items_n = fp16_normalize(item_vecs)
    del item_vecs
    bad = ~np.isfinite(items_n).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(item_pkl, "embed", f"element {i} (id {item_ids[i]!r}) has norm 0 (or overflows fp16): "
                        f"its normalised fp16 vector is NaN ({int(bad.sum())} items in all)")
    # normalise each embedding over its own last dimension (the whole K*64 vector when it is flat), then view
    users_n = fp16_normalize(user_vecs[np.asarray(rows)]).reshape(len(rows), -1, BLOCK)
    bad = ~np.isfinite(users_n.reshape(len(rows), -1)).all(axis=1)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise DataError(user_pkl, "embed", f"user {users[j]!r} has norm 0 (or overflows fp16): its normalised fp16 "
                        f"vector is NaN ({int(bad.sum())} users in all)")
    timings["normalize_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    bar = _Progress(len(users), progress)
    try:
        top, _ = reference_topk(users_n, items_n, L, user_chunk=user_chunk, item_chunk=item_chunk,
                                threads=threads, progress=bar)
    finally:
        bar.close()
    timings["rank_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    names = [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
    per_user = {m: np.zeros(len(users), dtype=np.float64) for m in names}
    top_codes = codes[top]
    n_targets = np.array([len(t) for t in targets], dtype=np.int64)
    for j, tg in enumerate(targets):
        hits = np.flatnonzero(np.isin(top_codes[j], tg))
        for m, v in _user_metrics(hits, len(tg), ks).items():
            per_user[m][j] = v
    metrics = {m: float(per_user[m].mean()) for m in names}
    timings["metrics_s"] = time.perf_counter() - t3

    return ReferenceResult(
        metrics=metrics, n_users=len(users), n_items=n_items, ks=ks, list_size=L,
        skipped={k: v for k, v in skipped.items() if v}, info=info, users=users, per_user=per_user,
        n_targets=n_targets, top_items=top if keep_top_items else None,
        wall_time_s=time.perf_counter() - t0, timings=timings,
        files={"items": str(item_pkl), "user_embeddings": str(user_pkl), "lastn": str(lastn_json)},
    )


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


__all__ = [
    "BLOCK",
    "KS",
    "LIST_SIZE",
    "ReferenceResult",
    "UserLastN",
    "fp16_normalize",
    "load_embedding_pickle",
    "load_user_lastn",
    "reference_eval",
    "reference_topk",
]
