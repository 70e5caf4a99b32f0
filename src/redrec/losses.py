"""Training losses of RED-Rec: the next-item sampled softmax (paper eq. 6) and the window multi-interest loss
(paper appendix, eq. A5/A6).

Both losses score a *user vector* against *item vectors* in the shared retrieval space, where every vector is
L2-normalised, so a dot product is a cosine in [-1, 1].  Logits are ``scale * cosine`` with a learnable inverse
temperature :class:`LogitScale` (CLIP-style: init 1/0.07, capped at 100).

* :func:`nce_loss` -- InfoNCE / sampled softmax (eq. 6).  Row ``n`` has one positive (``query[n]``,
  ``pos_vec[n]``); its negatives are a pool shared by all rows (e.g. uniformly sampled items) plus, optionally,
  the other rows' positives (in-batch negatives).  Negatives that are the positive item itself, or a
  near-duplicate of it (cosine above ``dup_threshold``, the reference's ``nce_thres``), are masked out.
* :func:`window_interest_loss` -- the last ``W`` events are held out as targets; per user and scenario group
  they are clustered by cosine k-means (:func:`cosine_kmeans`), the cluster centroids are matched one-to-one to
  the group's interest vectors by the Hungarian algorithm (:func:`match_interests`), and every target is then a
  positive of its matched interest vector in one batched :func:`nce_loss` call.  Interest vectors of group
  :data:`SHARED_GROUP` (-1) belong to no scenario: targets of every scenario without queries of its own are
  clustered together and matched to them (``query_scope: shared``, readout ``last``).

Logits and log-softmax are always computed in float32 (inputs may be bfloat16; gradients flow back to them).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from redrec.model.config import SHARED_GROUP

__all__ = [
    "LogitScale",
    "nce_loss",
    "negative_mask",
    "cosine_kmeans",
    "match_interests",
    "window_assignments",
    "window_interest_loss",
    "SHARED_GROUP",
    "effective_groups",
]


# ---------------------------------------------------------------------------------------------------------------
# temperature
# ---------------------------------------------------------------------------------------------------------------


class LogitScale(nn.Module):
    """Learnable inverse temperature ``s`` of the softmax (logits are ``s * cosine``).

    The parameter is ``log_scale`` (unconstrained, initialised to ``log(init)``, i.e. ``log(1/0.07)``);
    :meth:`forward` returns ``exp(log_scale)`` clamped to at most ``max_scale`` (100), as in CLIP.  Above the
    cap the clamp passes no gradient, so the parameter stops growing on its own.
    """

    def __init__(self, init: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        if init <= 0 or max_scale <= 0:
            raise ValueError(f"init and max_scale must be > 0, got {init}, {max_scale}")
        self.max_scale = float(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init), dtype=torch.float32))

    def forward(self) -> Tensor:
        """Scalar float32 tensor: the current inverse temperature, at most ``max_scale``."""
        return self.log_scale.exp().clamp(max=self.max_scale)

    def extra_repr(self) -> str:
        return f"max_scale={self.max_scale}"


# ---------------------------------------------------------------------------------------------------------------
# sampled softmax (eq. 6)
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs; float64 stays float64 (for gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def negative_mask(
    pos_item: Tensor,
    pos_vec: Tensor,
    cand_item: Tensor,
    cand_vec: Tensor,
    dup_threshold: float | None,
) -> Tensor:
    """Which candidate negatives to drop for each row.

    Args:
        pos_item: [N] long, item id of each row's positive.
        pos_vec: [N, d] unit vectors of the positives.
        cand_item: [C] long, item ids of the candidate negatives.
        cand_vec: [C, d] unit vectors of the candidates.
        dup_threshold: drop candidates whose cosine with the row's positive is *strictly* above this
            (None: no near-duplicate masking).

    Returns:
        [N, C] bool, True where the candidate must not be used as a negative of the row: it is the same item
        as the row's positive, or a near-duplicate of it.  Callers un-mask the row's own positive.
    """
    mask = cand_item[None, :] == pos_item[:, None]
    if dup_threshold is not None and cand_vec.shape[0] > 0:
        ct = _compute_dtype(pos_vec)
        mask |= (pos_vec.to(ct) @ cand_vec.to(ct).T) > dup_threshold
    return mask


def nce_loss(
    query: Tensor,
    pos_item: Tensor,
    pos_vec: Tensor,
    neg_item: Tensor,
    neg_vec: Tensor,
    scale: Tensor | float,
    *,
    in_batch: bool = True,
    dup_threshold: float | None = 0.98,
    log_q: Tensor | None = None,
    reduction: str = "mean",
    row_group: Tensor | None = None,
    neg_group: Tensor | None = None,
) -> Tensor:
    """Sampled-softmax (InfoNCE) loss of paper eq. 6, one positive per row.

    For row ``n`` with user vector ``q_n`` and positive item vector ``p_n``::

        loss_n = -log( exp(s cos(q_n, p_n) - lq_n) / sum_{c in {p_n} + negatives(n)} exp(s cos(q_n, c) - lq_c) )

    where ``s = scale`` and ``lq`` is the optional logQ correction (0 without it).  The columns are

    * ``in_batch=True``:  ``[p_0 .. p_{N-1}, pool_0 .. pool_{M-1}]``; row ``n``'s positive is column ``n``
      (the diagonal) and the other rows' positives are its in-batch negatives;
    * ``in_batch=False``: ``[p_n, pool_0 .. pool_{M-1}]``; the positive is column 0.

    A candidate negative of row ``n`` is masked (logit ``-inf``, so it adds exactly nothing) when its item id
    equals ``pos_item[n]`` (the same item as another row's positive or in the pool), when its cosine with
    ``p_n`` is above ``dup_threshold``, or (``row_group`` given, in-batch columns only) when its row belongs to
    the same group as row ``n`` (e.g. the same user: its other positives are not negatives).  The row's own
    positive is never masked, so every row has a finite loss even when all its negatives are masked (loss 0).

    Vectors are taken as given (expected unit-norm, dot product = cosine); nothing is re-normalised here.
    The logits and the log-softmax are computed in float32 (float64 for float64 inputs, e.g. gradcheck);
    gradients flow back to ``query``, ``pos_vec``, ``neg_vec`` (and ``scale``) in their own dtypes.  Rows only
    interact through the in-batch columns.

    Args:
        query: [N, d] unit user vectors, one per positive.
        pos_item: [N] long item ids of the positives.
        pos_vec: [N, d] unit item vectors of the positives.
        neg_item: [M] long item ids of the shared pool negatives (M may be 0).
        neg_vec: [M, d] unit item vectors of the pool negatives.
        scale: scalar inverse temperature (e.g. ``LogitScale()()``), unitless.
        in_batch: also use the other rows' positives as negatives.
        dup_threshold: mask negatives whose cosine with the row's positive exceeds this (None: off).
        log_q: [N + M] log sampling probability (natural log) of each column's item, in the column order
            ``[positives..., pool...]``; subtracted from the logits (logQ correction, applied to every column
            including the positive).  With ``in_batch=False`` entry ``n`` corrects row ``n``'s positive column.
        reduction: ``"mean"`` (over rows), ``"sum"`` or ``"none"`` ([N] float32 per-row losses).
        row_group: [N] long, optional group of each row (e.g. user index); in-batch columns of the same group
            as the row are masked.
        neg_group: [M] long, optional group of each pool negative (-1 = none); with ``row_group``, pool columns
            of the row's own group are masked (e.g. in-batch positives passed as pool columns: a user's own
            future items are not its negatives).

    Returns:
        float32 scalar (or [N] for ``reduction="none"``); float64 for float64 inputs.
    """
    n, d = query.shape
    m = neg_vec.shape[0]
    if pos_vec.shape != (n, d) or pos_item.shape != (n,):
        raise ValueError(f"query {tuple(query.shape)}, pos_vec {tuple(pos_vec.shape)}, pos_item {tuple(pos_item.shape)} disagree")
    if neg_item.shape != (m,) or (m > 0 and neg_vec.shape[1] != d):
        raise ValueError(f"neg_item {tuple(neg_item.shape)} and neg_vec {tuple(neg_vec.shape)} disagree with d={d}")
    if log_q is not None and log_q.shape != (n + m,):
        raise ValueError(f"log_q must have shape [N + M] = [{n + m}], got {tuple(log_q.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    ct = _compute_dtype(query)
    scale = torch.as_tensor(scale, device=query.device).to(ct)

    q = query.to(ct) * scale  # [N, d] (scaling the queries is the same as scaling the logits, and cheaper)
    p = pos_vec.to(ct)  # [N, d]
    neg = neg_vec.to(ct).reshape(m, d)  # [M, d]
    rows = torch.arange(n, device=query.device)

    if in_batch:
        cand_vec = torch.cat([p, neg], dim=0)  # [N+M, d]
        cand_item = torch.cat([pos_item, neg_item.to(pos_item.dtype)], dim=0)  # [N+M]
        logits = q @ cand_vec.T  # [N, N+M]
        if log_q is not None:
            logits = logits - log_q.to(ct)[None, :]
        mask = negative_mask(pos_item, p, cand_item, cand_vec, dup_threshold)  # [N, N+M]
        if row_group is not None:
            mask[:, :n] |= row_group[:, None] == row_group[None, :]
            if neg_group is not None:
                mask[:, n:] |= row_group[:, None] == neg_group[None, :]
        mask[rows, rows] = False  # the row's own positive is never masked
        target = rows  # positive on the diagonal
    else:
        pos_logit = (q * p).sum(dim=-1, keepdim=True)  # [N, 1]
        logits = torch.cat([pos_logit, q @ neg.T], dim=1)  # [N, 1+M]
        if log_q is not None:
            lq = log_q.to(ct)
            logits = logits - torch.cat([lq[:n, None], lq[None, n:].expand(n, m)], dim=1)
        neg_mask = negative_mask(pos_item, p, neg_item, neg, dup_threshold)  # [N, M]
        if row_group is not None and neg_group is not None:
            neg_mask |= row_group[:, None] == neg_group[None, :]
        mask = torch.cat([neg_mask.new_zeros(n, 1), neg_mask], dim=1)  # [N, 1+M]
        target = torch.zeros_like(rows)  # positive in column 0

    logits = logits.masked_fill_(mask, float("-inf"))  # in place: logits is a fresh tensor no backward needs
    if n == 0 and reduction != "none":  # empty batch: a zero that is still connected to the inputs
        return (q.sum() + p.sum()) * 0.0
    # -log softmax at the target: finite, because the target column is never masked (masked columns get
    # probability exactly 0 and gradient exactly 0).  float32 (float64 for float64 inputs).
    return F.cross_entropy(logits, target, reduction=reduction)


# ---------------------------------------------------------------------------------------------------------------
# clustering and matching (no grad)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def cosine_kmeans(x: Tensor, k: int, iters: int = 10) -> tuple[Tensor, Tensor]:
    """Spherical k-means: cluster unit vectors by cosine similarity.

    Deterministic: the first centroid is ``x[0]``, each next one is the point farthest (lowest max-cosine) from
    the centroids chosen so far (ties: lowest index).  Each iteration assigns every point to its most similar
    centroid, re-seeds empty clusters, and sets each centroid to the normalised mean of its points.  An empty
    cluster is re-seeded with the point least similar to its own centroid among clusters with more than one
    point, so every cluster ends non-empty.  Stops early once the assignment no longer changes.  The returned
    ``assign`` is the one the returned centroids are the (normalised) means of.

    Args:
        x: [n, d] unit vectors (any float dtype; computed in float32, no grad).
        k: number of clusters; clipped to ``[1, n]`` (``n == 0`` gives empty outputs).
        iters: maximum number of assign/update rounds (at least one is run).

    Returns:
        ``(assign, centroids)``: [n] long cluster index in ``[0, k)``, and [k, d] float32 unit centroids,
        on ``x``'s device.
    """
    x = x.detach().float()
    n, d = x.shape
    k = min(int(k), n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0, d)

    # farthest-point initialisation from x[0]
    chosen = [0]
    best_sim = x @ x[0]  # [n] max cosine to the chosen centroids
    for _ in range(1, k):
        i = int(torch.argmin(best_sim))
        chosen.append(i)
        best_sim = torch.maximum(best_sim, x @ x[i])
    centroids = x[chosen].clone()  # [k, d]

    prev = None
    for _ in range(max(int(iters), 1)):
        sim = x @ centroids.T  # [n, k]
        assign = sim.argmax(dim=1)  # [n]
        counts = torch.bincount(assign, minlength=k)
        for c in torch.nonzero(counts == 0).flatten().tolist():  # re-seed empty clusters (rare, k is small)
            own_sim = sim.gather(1, assign[:, None]).squeeze(1)  # [n] cosine to the own centroid
            own_sim = own_sim.masked_fill(counts[assign] <= 1, float("inf"))  # never empty another cluster
            i = int(torch.argmin(own_sim))
            counts[assign[i]] -= 1
            counts[c] += 1
            assign[i] = c
            sim[i] = float("-inf")
            sim[i, c] = float("inf")
        if prev is not None and torch.equal(assign, prev):
            break  # converged: the centroids are already the means of this assignment
        prev = assign
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # [k, d]
        norms = sums.norm(dim=1, keepdim=True)
        centroids = torch.where(norms > 1e-6, sums / norms.clamp_min(1e-12), centroids)  # keep if members cancel
    return assign, centroids


@torch.no_grad()
def match_interests(centroids: Tensor, interests: Tensor) -> Tensor:
    """One-to-one matching of ``k`` cluster centroids to ``K >= k`` interest vectors (Hungarian algorithm).

    Maximises the total cosine ``sum_j cos(centroid_j, interest_{match_j})`` with
    :func:`scipy.optimize.linear_sum_assignment`; inputs are cast to float32 numpy first (scipy has no
    bfloat16).  The match is not differentiable (no grad).

    Args:
        centroids: [k, d] unit vectors.
        interests: [K, d] unit vectors, K >= k.

    Returns:
        [k] long: index into ``interests`` of the interest matched to each centroid (all distinct), on
        ``centroids``' device.
    """
    k, big_k = centroids.shape[0], interests.shape[0]
    if k > big_k:
        raise ValueError(f"cannot match {k} centroids to only {big_k} interests")
    sim = (centroids.detach().float() @ interests.detach().float().to(centroids.device).T).cpu().numpy()
    rows, cols = linear_sum_assignment(sim.astype(np.float32), maximize=True)
    match = np.empty(k, dtype=np.int64)
    match[rows] = cols
    return torch.from_numpy(match).to(centroids.device)


# ---------------------------------------------------------------------------------------------------------------
# window multi-interest loss (eq. A5/A6)
# ---------------------------------------------------------------------------------------------------------------


def effective_groups(target_group: Tensor, query_group: Tensor) -> Tensor:
    """The query group each target is matched within: its own scenario when that scenario has queries, else
    :data:`SHARED_GROUP` when there are shared queries (else its own scenario, which has no queries: unmatched).

    ``target_group`` [...] long, ``query_group`` [K] long -> [...] long on ``target_group``'s device.
    """
    qg = query_group.to(target_group.device)
    if not bool((qg == SHARED_GROUP).any()):
        return target_group
    return torch.where(torch.isin(target_group, qg), target_group, torch.full_like(target_group, SHARED_GROUP))



@torch.no_grad()
def window_assignments(
    interests: Tensor,
    query_group: Tensor,
    targets: Tensor,
    target_group: Tensor,
    target_mask: Tensor,
    *,
    kmeans_iters: int = 10,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Which interest vector each held-out target is the positive of (the no-grad half of eq. A5/A6).

    For every user ``b`` and scenario group ``g``: the valid targets of group ``g`` are clustered into
    ``min(#queries of g, #targets)`` clusters by :func:`cosine_kmeans`, the centroids are matched to the
    interests of the queries of group ``g`` by :func:`match_interests`, and each target gets the interest
    matched to its cluster.  Targets of a scenario without queries of its own join the shared group
    :data:`SHARED_GROUP` when some queries are shared (:func:`effective_groups`), else they are left out
    (counted in the stats).

    Everything runs on float32 CPU copies (one device-to-host transfer per call; ``B * groups`` is small).

    Args:
        interests: [B, K, d] interest vectors (user tower).
        query_group: [K] long scenario group of each query (:data:`SHARED_GROUP`: any scenario).
        targets: [B, W] + [d] item-tower vectors of the held-out events.
        target_group: [B, W] long scenario group of each target.
        target_mask: [B, W] bool, valid targets.
        kmeans_iters: k-means rounds.

    Returns:
        ``(b_idx, k_idx, w_idx, stats)``: three [R] long tensors on ``interests``' device -- row ``r`` says that
        target ``targets[b_idx[r], w_idx[r]]`` is the positive of ``interests[b_idx[r], k_idx[r]]`` -- and a
        dict of Python numbers: ``n_targets`` (R), ``n_users`` (users with >= 1 used target),
        ``mean_clusters`` (mean number of clusters over (user, group) pairs with targets), ``n_unmatched``
        (valid targets of groups without queries).
    """
    b_sz, big_k, _ = interests.shape
    if query_group.shape != (big_k,):
        raise ValueError(f"query_group must have shape [K] = [{big_k}], got {tuple(query_group.shape)}")
    if target_group.shape != target_mask.shape or targets.shape[:2] != target_mask.shape:
        raise ValueError(f"targets {tuple(targets.shape)}, target_group {tuple(target_group.shape)}, target_mask {tuple(target_mask.shape)} disagree")
    t_cpu = targets.detach().float().cpu()  # [B, W, d]
    i_cpu = interests.detach().float().cpu()  # [B, K, d]
    mask_cpu = target_mask.detach().bool().cpu()  # [B, W]
    qg_cpu = query_group.detach().long().cpu()  # [K]
    grp_cpu = effective_groups(target_group.detach().long().cpu(), qg_cpu)  # [B, W]
    queries_of = {g: torch.nonzero(qg_cpu == g).flatten() for g in qg_cpu.unique().tolist()}

    b_list, k_list, w_list, n_clusters = [], [], [], []
    n_unmatched = 0
    for b in range(b_sz):
        valid = mask_cpu[b]
        if not bool(valid.any()):
            continue
        for g in grp_cpu[b][valid].unique().tolist():
            w_idx = torch.nonzero(valid & (grp_cpu[b] == g)).flatten()  # this user's targets of group g
            q_idx = queries_of.get(g)
            if q_idx is None:
                n_unmatched += len(w_idx)
                continue
            assign, centroids = cosine_kmeans(t_cpu[b, w_idx], min(len(q_idx), len(w_idx)), kmeans_iters)
            match = match_interests(centroids, i_cpu[b, q_idx])  # [k] index into q_idx
            b_list.append(torch.full_like(w_idx, b))
            k_list.append(q_idx[match[assign]])
            w_list.append(w_idx)
            n_clusters.append(centroids.shape[0])

    dev = interests.device
    if b_list:
        b_idx, k_idx, w_idx = (torch.cat(v).to(dev) for v in (b_list, k_list, w_list))
    else:
        b_idx = k_idx = w_idx = torch.zeros(0, dtype=torch.long, device=dev)
    stats = {
        "n_targets": int(b_idx.numel()),
        "n_users": len({int(v[0]) for v in b_list}),
        "mean_clusters": float(np.mean(n_clusters)) if n_clusters else 0.0,
        "n_unmatched": n_unmatched,
    }
    return b_idx, k_idx, w_idx, stats


def window_interest_loss(
    interests: Tensor,
    query_group: Tensor,
    targets: Tensor,
    target_items: Tensor,
    target_group: Tensor,
    target_mask: Tensor,
    neg_item: Tensor,
    neg_vec: Tensor,
    scale: Tensor | float,
    *,
    kmeans_iters: int = 10,
    dup_threshold: float | None = 0.98,
    in_batch: bool = True,
    mask_same_user: bool = True,
) -> tuple[Tensor, dict]:
    """Window multi-interest loss (paper eq. A5/A6).

    The last ``W`` events of each user are dropped from the input and used as targets.  Per user and scenario
    group the targets are clustered (cosine k-means) and the clusters matched to the group's interest vectors
    (Hungarian), see :func:`window_assignments` -- both without gradient.  Then each valid target is one row of
    a single batched :func:`nce_loss`: query = its matched interest vector, positive = the target's item
    vector, negatives = the shared pool (+ the other rows' targets when ``in_batch``).  Gradients reach both
    ``interests`` (user tower) and ``targets`` (item tower); interests matched to no target get zero gradient.

    ``targets`` must be the **item tower's** vectors of the held-out events (the reference mistakenly uses
    user-tower outputs here).

    Args:
        interests: [B, K, d] unit interest vectors (the K query outputs through the head).
        query_group: [K] long scenario group of each query (e.g. ``[0, 0, 0, 1, 1, 1]``; ``[-1, -1, -1]``:
            shared queries, matched to the targets of every scenario).
        targets: [B, W, d] unit item vectors of the W held-out events.
        target_items: [B, W] long item ids.
        target_group: [B, W] long scenario group of each target; matched only to queries of the same group
            (or to the shared queries, see :func:`effective_groups`).
        target_mask: [B, W] bool, valid targets (padding False).
        neg_item: [M] long pool negative ids; neg_vec: [M, d] their unit vectors.
        scale: scalar inverse temperature.
        kmeans_iters: k-means rounds.
        dup_threshold: near-duplicate masking threshold passed to :func:`nce_loss`.
        in_batch: use the other targets in the batch as negatives.
        mask_same_user: with ``in_batch``, do not use a user's own other targets as its negatives (they are
            that user's future positives too; masking them keeps the interests of one user from being pushed
            away from each other's items).  Targets of other users are still negatives.

    Returns:
        ``(loss, stats)``: float32 scalar mean over all used targets, and the stats of
        :func:`window_assignments`.  With no usable target the loss is a zero still connected to
        ``interests``, ``targets`` and ``scale`` (so DDP sees every parameter used).
    """
    if target_items.shape != target_mask.shape:
        raise ValueError(f"target_items {tuple(target_items.shape)} and target_mask {tuple(target_mask.shape)} disagree")
    b_idx, k_idx, w_idx, stats = window_assignments(
        interests, query_group, targets, target_group, target_mask, kmeans_iters=kmeans_iters
    )
    if b_idx.numel() == 0:
        scale = torch.as_tensor(scale, device=interests.device)
        zero = (interests.float().sum() + targets.float().sum() + scale.float()) * 0.0
        return zero, stats
    loss = nce_loss(
        interests[b_idx, k_idx],  # [R, d]
        target_items[b_idx, w_idx],  # [R]
        targets[b_idx, w_idx],  # [R, d]
        neg_item,
        neg_vec,
        scale,
        in_batch=in_batch,
        dup_threshold=dup_threshold,
        row_group=b_idx if mask_same_user else None,
    )
    return loss, stats
