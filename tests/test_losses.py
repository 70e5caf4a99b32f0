"""Tests of :mod:`redrec.losses`: the sampled softmax of eq. 6 and the window multi-interest loss of eq. A5/A6.

The NCE cases are 2-d unit vectors at known angles, so every expected loss is written out by hand as
``-log(e^{s cos+} / sum e^{s cos})``.  The window-loss case is built so that the right interest for every
target is known (and a group-agnostic or greedy matching would pick a wrong one).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from redrec.losses import (
    LogitScale,
    cosine_kmeans,
    match_interests,
    nce_loss,
    window_assignments,
    window_interest_loss,
)

S = 10.0  # inverse temperature of the hand-built cases


def v(deg: float, dtype=torch.float32) -> torch.Tensor:
    """Unit 2-d vector at ``deg`` degrees."""
    r = math.radians(deg)
    return torch.tensor([math.cos(r), math.sin(r)], dtype=dtype)


def cos(a: float, b: float) -> float:
    """Cosine between the unit vectors at ``a`` and ``b`` degrees."""
    return math.cos(math.radians(a - b))


def ce(pos: float, others: list[float]) -> float:
    """-log(e^{pos} / (e^{pos} + sum e^{others})) in plain Python."""
    return -pos + math.log(math.exp(pos) + sum(math.exp(o) for o in others))


# Two rows: queries at 0 and 90 degrees, positives at 20 and 120; pool negatives at 200 (id 10) and 60 (id 11).
Q_DEG, P_DEG, POOL_DEG = [0.0, 90.0], [20.0, 120.0], [200.0, 60.0]


def case(dtype=torch.float32, pool_deg=POOL_DEG, pool_ids=(10, 11), pos_ids=(1, 2)):
    query = torch.stack([v(a, dtype) for a in Q_DEG])
    pos_vec = torch.stack([v(a, dtype) for a in P_DEG])
    neg_vec = torch.stack([v(a, dtype) for a in pool_deg]) if pool_deg else torch.zeros(0, 2, dtype=dtype)
    return query, torch.tensor(pos_ids), pos_vec, torch.tensor(list(pool_ids), dtype=torch.long), neg_vec


# ---------------------------------------------------------------------------------------------------------------
# nce_loss: closed forms
# ---------------------------------------------------------------------------------------------------------------


def test_nce_pool_only_matches_closed_form():
    query, pos_item, pos_vec, neg_item, neg_vec = case()
    got = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, torch.tensor(S), in_batch=False, reduction="none")
    want = [ce(S * cos(Q_DEG[n], P_DEG[n]), [S * cos(Q_DEG[n], c) for c in POOL_DEG]) for n in range(2)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    mean = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, torch.tensor(S), in_batch=False)
    assert mean.item() == pytest.approx(sum(want) / 2, rel=1e-5)


def test_nce_in_batch_matches_closed_form():
    query, pos_item, pos_vec, neg_item, neg_vec = case()
    got = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, S, in_batch=True, reduction="none")
    # row 0: positive 20 deg; negatives: the other row's positive (120) and the pool (200, 60)
    want0 = ce(S * cos(0, 20), [S * cos(0, 120), S * cos(0, 200), S * cos(0, 60)])
    want1 = ce(S * cos(90, 120), [S * cos(90, 20), S * cos(90, 200), S * cos(90, 60)])
    torch.testing.assert_close(got, torch.tensor([want0, want1]), rtol=1e-5, atol=1e-5)
    assert nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, S, reduction="sum").item() == pytest.approx(
        want0 + want1, rel=1e-5
    )


def test_nce_log_q_correction_matches_closed_form():
    query, pos_item, pos_vec, neg_item, neg_vec = case()
    lq = [math.log(0.5), math.log(0.1), math.log(0.01), math.log(0.2)]  # columns [pos0, pos1, pool0, pool1]
    log_q = torch.tensor(lq)
    got = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, S, log_q=log_q, reduction="none")
    cols = P_DEG + POOL_DEG
    want = [ce(S * cos(Q_DEG[n], cols[n]) - lq[n], [S * cos(Q_DEG[n], cols[j]) - lq[j] for j in range(4) if j != n]) for n in range(2)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    # without in-batch negatives, entry n corrects row n's own positive column, entries N.. the pool
    got = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, S, log_q=log_q, in_batch=False, reduction="none")
    want = [ce(S * cos(Q_DEG[n], P_DEG[n]) - lq[n], [S * cos(Q_DEG[n], POOL_DEG[j]) - lq[2 + j] for j in range(2)]) for n in range(2)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_nce_masks_duplicate_item_id_in_pool_and_in_batch():
    # pool item 11 (at 60 deg) is row 0's positive item: removed for row 0 only
    query, pos_item, pos_vec, neg_item, neg_vec = case(pos_ids=(11, 2))
    got = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, S, in_batch=False, reduction="none")
    want0 = ce(S * cos(0, 20), [S * cos(0, 200)])
    want1 = ce(S * cos(90, 120), [S * cos(90, 200), S * cos(90, 60)])
    torch.testing.assert_close(got, torch.tensor([want0, want1]), rtol=1e-5, atol=1e-5)

    # both rows have the same positive item: neither uses the other's positive as a negative
    query, pos_item, pos_vec, neg_item, neg_vec = case(pos_ids=(7, 7))
    got = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, S, in_batch=True, reduction="none")
    want0 = ce(S * cos(0, 20), [S * cos(0, 200), S * cos(0, 60)])
    want1 = ce(S * cos(90, 120), [S * cos(90, 200), S * cos(90, 60)])
    torch.testing.assert_close(got, torch.tensor([want0, want1]), rtol=1e-5, atol=1e-5)


def test_nce_masks_near_duplicate_vector_and_masked_column_is_inert():
    # an extra pool item (id 12) at 25 deg: cos(20, 25) = 0.996 > 0.98 -> masked for row 0, kept for row 1
    query, pos_item, pos_vec, neg_item, neg_vec = case(pool_deg=POOL_DEG + [25.0], pool_ids=(10, 11, 12))
    got = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, S, in_batch=True, reduction="none")
    want0 = ce(S * cos(0, 20), [S * cos(0, 120), S * cos(0, 200), S * cos(0, 60)])
    want1 = ce(S * cos(90, 120), [S * cos(90, 20), S * cos(90, 200), S * cos(90, 60), S * cos(90, 25)])
    torch.testing.assert_close(got, torch.tensor([want0, want1]), rtol=1e-5, atol=1e-5)
    # with the threshold off the column counts for row 0 as well
    got = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, S, dup_threshold=None, reduction="none")
    assert got[0].item() == pytest.approx(ce(S * cos(0, 20), [S * cos(0, x) for x in (120, 200, 60, 25)]), rel=1e-5)

    # the masked column gets no gradient from the row it is masked for
    neg_vec = neg_vec.clone().requires_grad_(True)
    nce_loss(query[:1], pos_item[:1], pos_vec[:1], neg_item, neg_vec, S, in_batch=False).backward()
    assert torch.all(neg_vec.grad[2] == 0) and torch.all(neg_vec.grad[:2].abs().sum(-1) > 0)


def test_nce_all_negatives_masked_is_zero_not_nan():
    query, pos_item, pos_vec, _, _ = case(pos_ids=(5, 5))
    query.requires_grad_(True)
    pool_ids, pool_vec = torch.tensor([5, 5]), torch.stack([v(200), v(60)])  # every pool item is the positive item
    for in_batch in (True, False):
        loss = nce_loss(query, pos_item, pos_vec, pool_ids, pool_vec, S, in_batch=in_batch, reduction="none")
        assert torch.all(loss == 0), loss
        loss.sum().backward()
        assert torch.isfinite(query.grad).all()
        query.grad = None
    # no pool at all and no in-batch negatives: still a finite zero
    empty = nce_loss(query, pos_item, pos_vec, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), S, in_batch=False)
    assert empty.item() == 0.0


def test_nce_rows_are_independent():
    torch.manual_seed(0)
    n, m, d = 6, 5, 8
    q = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(m, d), dim=-1)
    ids, neg_ids = torch.arange(n), torch.arange(100, 100 + m)
    base = nce_loss(q, ids, p, neg_ids, neg, 5.0, reduction="none")
    q2 = q.clone()
    q2[3] = -q2[3]  # another row's query changes: row 3's loss alone may change
    moved = nce_loss(q2, ids, p, neg_ids, neg, 5.0, reduction="none")
    keep = torch.arange(n) != 3
    torch.testing.assert_close(moved[keep], base[keep])
    assert moved[3] != base[3]


def test_nce_bfloat16_matches_float32_and_grads_flow():
    query, pos_item, pos_vec, neg_item, neg_vec = case()
    ref = nce_loss(query, pos_item, pos_vec, neg_item, neg_vec, S)
    qb, pb, nb = (t.bfloat16().requires_grad_(True) for t in (query, pos_vec, neg_vec))
    got = nce_loss(qb, pos_item, pb, neg_item, nb, torch.tensor(S))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)
    got.backward()
    for t in (qb, pb, nb):
        assert t.grad is not None and t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all()
        assert t.grad.abs().sum() > 0


def test_nce_gradcheck_float64():
    torch.manual_seed(1)
    n, m, d = 3, 2, 4
    q = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1).requires_grad_(True)
    p = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1).requires_grad_(True)
    neg = torch.nn.functional.normalize(torch.randn(m, d, dtype=torch.float64), dim=-1).requires_grad_(True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    ids, neg_ids = torch.tensor([0, 1, 0]), torch.tensor([1, 9])  # repeated ids: some columns are masked
    log_q = torch.log(torch.rand(n + m, dtype=torch.float64))
    for in_batch in (True, False):

        def f(q, p, neg, scale, in_batch=in_batch):
            return nce_loss(q, ids, p, neg_ids, neg, scale, in_batch=in_batch, log_q=log_q)

        assert torch.autograd.gradcheck(f, (q, p, neg, scale))


# ---------------------------------------------------------------------------------------------------------------
# LogitScale
# ---------------------------------------------------------------------------------------------------------------


def test_logit_scale_init_and_cap():
    ls = LogitScale()
    assert ls().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert ls.log_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    with torch.no_grad():
        ls.log_scale.fill_(math.log(1000.0))
    out = ls()
    assert out.item() == pytest.approx(100.0)
    assert ls.log_scale.item() == pytest.approx(math.log(1000.0))  # the parameter itself is not clamped
    out.backward()
    assert ls.log_scale.grad.item() == 0.0  # above the cap: no gradient pushes it further
    assert LogitScale(init=5.0, max_scale=3.0)().item() == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------------------------
# k-means and Hungarian matching
# ---------------------------------------------------------------------------------------------------------------


def three_clusters(seed: int = 0, per: int = 10, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    centers = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:3]  # 3 orthonormal directions
    truth = torch.arange(3).repeat_interleave(per)
    x = centers[truth] + 0.05 * torch.randn(3 * per, d, generator=g)
    perm = torch.randperm(3 * per, generator=g)
    return torch.nn.functional.normalize(x[perm], dim=-1), truth[perm], centers


def test_cosine_kmeans_recovers_separated_clusters_deterministically():
    x, truth, centers = three_clusters()
    assign, cent = cosine_kmeans(x, 3)
    assert assign.dtype == torch.long and assign.shape == (30,) and cent.shape == (3, 8)
    labels = [set(assign[truth == c].tolist()) for c in range(3)]
    assert all(len(s) == 1 for s in labels) and len(set.union(*labels)) == 3  # a relabelling of the truth
    torch.testing.assert_close(cent.norm(dim=-1), torch.ones(3))
    for c in range(3):
        assert float(cent[next(iter(labels[c]))] @ centers[c]) > 0.99
    assign2, cent2 = cosine_kmeans(x.clone(), 3)
    assert torch.equal(assign, assign2) and torch.equal(cent, cent2)


def test_cosine_kmeans_clips_k_and_reseeds_empty_clusters():
    x, _, _ = three_clusters()
    assign, cent = cosine_kmeans(x[:4], 10)  # k clipped to n = 4: one point per cluster
    assert cent.shape == (4, 8) and sorted(assign.tolist()) == [0, 1, 2, 3]
    dup = torch.cat([x[:1].repeat(5, 1), x[1:2]])  # only 2 distinct points, k = 3: no cluster may stay empty
    assign, cent = cosine_kmeans(dup, 3)
    assert torch.bincount(assign, minlength=3).min() >= 1
    assert torch.isfinite(cent).all()
    assign, cent = cosine_kmeans(torch.zeros(0, 8), 3)
    assert assign.shape == (0,) and cent.shape == (0, 8)


def test_match_interests_is_hungarian_not_greedy():
    # cos(c0, i0) = cos 20 = .94, cos(c0, i1) = cos 40 = .77, cos(c1, i0) = cos 40 = .77, cos(c1, i1) = cos 100 < 0
    # greedy (take the best pair first) gives c0-i0, c1-i1 = .77 total; Hungarian gives c0-i1, c1-i0 = 1.53.
    centroids = torch.stack([v(20), v(-40)])
    interests = torch.stack([v(0), v(60), v(180)])  # a third, useless interest: K > k
    match = match_interests(centroids, interests)
    assert match.tolist() == [1, 0]
    sim = centroids @ interests.T
    best = max(float(sim[0, a] + sim[1, b]) for a, b in itertools.permutations(range(3), 2))
    assert float(sim[0, match[0]] + sim[1, match[1]]) == pytest.approx(best)
    greedy0 = int(sim[0].argmax())
    assert greedy0 != int(match[0])  # the case really separates greedy from Hungarian
    assert match_interests(centroids.bfloat16(), interests.bfloat16()).tolist() == [1, 0]
    with pytest.raises(ValueError):
        match_interests(interests, centroids)  # more centroids than interests


# ---------------------------------------------------------------------------------------------------------------
# window multi-interest loss
# ---------------------------------------------------------------------------------------------------------------

D = 6
E = torch.eye(D)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def window_case(dtype=torch.float32):
    """2 users, 6 queries (3 for group 0, 3 for group 1), W = 8 targets.

    User 0, group 0: three clusters of two targets near e0, e1, e3; its group-0 interests are (e3, e0, e1) up to
    noise, so the clusters must use interests 1, 2, 0.  User 0, group 1: one target near e2; its group-1
    interests are (-e2, e2, e0) so the target must use interest 4 -- and never interest 5 (exactly e0) for the
    group-0 targets near e0, although it is closer to them than interest 1.  One padding slot.
    User 1: two group-0 targets (near e4, e5); no group-1 target, so its interests 3..5 get no gradient.
    """
    g = torch.Generator().manual_seed(3)
    noise = lambda *s: 0.05 * torch.randn(*s, D, generator=g)  # noqa: E731
    q_group = torch.tensor([0, 0, 0, 1, 1, 1])
    interests = torch.zeros(2, 6, D)
    interests[0] = unit(torch.stack([E[3], E[0] + E[5] * 0.3, E[1], -E[2], E[2], E[0]]) + noise(6))
    interests[0, 5] = E[0]
    interests[1] = unit(torch.stack([E[4], E[5], E[0], E[1], E[2], E[3]]) + noise(6))
    targets = torch.zeros(2, 8, D)
    targets[0, :7] = unit(torch.stack([E[0], E[1], E[3], E[0], E[1], E[3], E[2]]) + noise(7))
    targets[1, :2] = unit(torch.stack([E[5], E[4]]) + noise(2))
    targets[1, 2:] = unit(torch.randn(6, D, generator=g))  # padding content must not matter
    t_group = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    t_mask = torch.zeros(2, 8, dtype=torch.bool)
    t_mask[0, :7] = True
    t_mask[1, :2] = True
    t_items = torch.arange(16).reshape(2, 8) + 100
    neg_vec = unit(torch.randn(5, D, generator=g))
    neg_item = torch.arange(5)
    # expected interest per valid target (b, w) -> k
    expected = {(0, 0): 1, (0, 1): 2, (0, 2): 0, (0, 3): 1, (0, 4): 2, (0, 5): 0, (0, 6): 4, (1, 0): 1, (1, 1): 0}
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(interests), q_group, cast(targets), t_items, t_group, t_mask, neg_item, cast(neg_vec), expected


def test_window_assignments_use_closest_interest_of_own_group():
    interests, q_group, targets, _, t_group, t_mask, _, _, expected = window_case()
    b_idx, k_idx, w_idx, stats = window_assignments(interests, q_group, targets, t_group, t_mask)
    got = {(int(b), int(w)): int(k) for b, k, w in zip(b_idx, k_idx, w_idx, strict=True)}
    assert got == expected
    assert all(int(q_group[k]) == int(t_group[b, w]) for (b, w), k in got.items())  # never across groups
    assert stats["n_targets"] == 9 and stats["n_users"] == 2 and stats["n_unmatched"] == 0
    assert stats["mean_clusters"] == pytest.approx((3 + 1 + 2) / 3)


def test_window_targets_of_group_without_queries_are_skipped():
    interests, q_group, targets, _, t_group, t_mask, _, _, _ = window_case()
    t_group = t_group.clone()
    t_group[0, 6] = 7  # no query of group 7
    b_idx, k_idx, w_idx, stats = window_assignments(interests, q_group, targets, t_group, t_mask)
    assert stats["n_unmatched"] == 1 and stats["n_targets"] == 8
    assert not ((b_idx == 0) & (w_idx == 6)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_loss_value_and_gradients(dtype):
    interests, q_group, targets, t_items, t_group, t_mask, neg_item, neg_vec, expected = window_case(dtype)
    interests.requires_grad_(True)
    targets.requires_grad_(True)
    scale = LogitScale()
    loss, stats = window_interest_loss(interests, q_group, targets, t_items, t_group, t_mask, neg_item, neg_vec, scale())
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and stats["n_targets"] == 9

    # the same pairs through nce_loss by hand (other users' targets are in-batch negatives, own ones are not)
    bw = sorted(expected)
    b = torch.tensor([x[0] for x in bw])
    w = torch.tensor([x[1] for x in bw])
    k = torch.tensor([expected[x] for x in bw])
    with torch.no_grad():
        want = nce_loss(interests[b, k], t_items[b, w], targets[b, w], neg_item, neg_vec, scale(), row_group=b)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)

    loss.backward()
    gi, gt = interests.grad.float(), targets.grad.float()
    assert interests.grad.dtype == dtype and targets.grad.dtype == dtype
    used = torch.zeros(2, 6, dtype=torch.bool)
    used[b, k] = True
    assert (gi[used].abs().sum(-1) > 0).all()  # every matched interest learns
    assert (gi[~used] == 0).all()  # unmatched ones (user 1's group-1 interests, user 0's interests 3, 5) do not
    assert (gt[t_mask].abs().sum(-1) > 0).all()  # the item tower learns from every valid target
    assert (gt[~t_mask] == 0).all()  # padding does not
    assert scale.log_scale.grad is not None


def test_window_loss_without_targets_is_connected_zero():
    interests, q_group, targets, t_items, t_group, t_mask, neg_item, neg_vec, _ = window_case()
    interests.requires_grad_(True)
    scale = LogitScale()
    loss, stats = window_interest_loss(
        interests, q_group, targets, t_items, t_group, torch.zeros_like(t_mask), neg_item, neg_vec, scale()
    )
    assert loss.item() == 0.0 and loss.requires_grad and stats["n_targets"] == 0
    loss.backward()
    assert interests.grad is not None and (interests.grad == 0).all()
    assert scale.log_scale.grad is not None


def test_neg_group_masks_pool_columns_of_the_rows_own_group():
    """A pool column whose group equals the row's group (e.g. the same user's other positive) is not a negative."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    nv = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=-1)
    nv[0], nv[2] = q[0], q[2]  # the masked columns would be strong negatives of their rows
    ni = torch.tensor([10, 11, 12, 13, 14])
    pi = torch.tensor([0, 1, 2])
    rows = torch.tensor([7, 8, 9])
    groups = torch.tensor([7, -1, 9, -1, -1])  # column 0 belongs to row 0's user, column 2 to row 2's
    got = nce_loss(q, pi, p, ni, nv, 10.0, in_batch=False, dup_threshold=None, reduction="none",
                   row_group=rows, neg_group=groups)
    for r, drop in ((0, 0), (1, None), (2, 2)):
        keep = [c for c in range(5) if c != drop]
        want = nce_loss(q[r : r + 1], pi[r : r + 1], p[r : r + 1], ni[keep], nv[keep], 10.0, in_batch=False,
                        dup_threshold=None, reduction="none")
        assert torch.allclose(got[r], want[0], atol=1e-6), r
    plain = nce_loss(q, pi, p, ni, nv, 10.0, in_batch=False, dup_threshold=None, reduction="none")
    assert not torch.allclose(plain[0], got[0]) and torch.allclose(plain[1], got[1])
