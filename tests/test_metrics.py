"""Tests of :mod:`redrec.eval.metrics` and of the exact ranking in :mod:`redrec.retrieval.exact`.

Hand-computed examples pin the metric definitions (binary-gain NDCG with IDCG over min(K, n_targets), MRR with a
cut-off) and the tie rule: rank(t) = 1 + #{s_j > s_t} + #{s_j == s_t, j < t}, excluded items not candidates,
the other targets competitors.  Randomised checks compare the chunked multi-vector engine with a float64 numpy
brute force on data where float32 arithmetic is exact (dyadic unit vectors), so exact ties are real ties.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from redrec.eval.metrics import (
    compute_metrics,
    hit_rate,
    mean_metrics,
    metric_names,
    mrr,
    ndcg,
    rank_of_targets,
)
from redrec.retrieval.exact import max_cosine, score_candidates, target_ranks, topk


def L(r: int) -> float:
    """Discount 1 / log2(rank + 1)."""
    return 1.0 / np.log2(r + 1)


# ---------------------------------------------------------------------------------------------------------------
# metrics from ranks
# ---------------------------------------------------------------------------------------------------------------


def test_single_target():
    m = compute_metrics([[3]], ks=[1, 3, 10])
    assert m["hr@1"][0] == 0.0  # rank 3 > 1
    assert m["hr@3"][0] == 1.0
    assert m["ndcg@1"][0] == 0.0
    # DCG = 1/log2(3+1) = 0.5, IDCG = 1/log2(2) = 1
    assert m["ndcg@3"][0] == pytest.approx(0.5)
    assert m["ndcg@10"][0] == pytest.approx(0.5)
    assert m["mrr"][0] == pytest.approx(1 / 3)


def test_three_targets_ranks_1_4_20():
    r = [[1, 4, 20]]
    # K=10: DCG = 1/log2(2) + 1/log2(5) = 1 + 0.430677 = 1.430677
    #       IDCG = 1/log2(2) + 1/log2(3) + 1/log2(4) = 1 + 0.630930 + 0.5 = 2.130930  -> 0.671386
    assert ndcg(r, 10)[0] == pytest.approx((1 + L(4)) / (1 + L(2) + L(3)))
    assert ndcg(r, 10)[0] == pytest.approx(0.671386, abs=1e-6)
    # K=50: DCG adds 1/log2(21) = 0.227670 -> 1.658347 / 2.130930 = 0.778227
    assert ndcg(r, 50)[0] == pytest.approx(0.778227, abs=1e-6)
    # K=2: DCG = 1 (rank 1 only), IDCG over min(2, 3) = 2 slots = 1 + 0.630930 -> 0.613147
    assert ndcg(r, 2)[0] == pytest.approx(1 / (1 + L(2)))
    assert ndcg(r, 2)[0] == pytest.approx(0.613147, abs=1e-6)
    assert hit_rate(r, 1)[0] == 1.0
    assert mrr(r)[0] == 1.0


def test_targets_outside_top_k():
    r = [[12, 30]]
    assert hit_rate(r, 10)[0] == 0.0
    assert ndcg(r, 10)[0] == 0.0
    # K=50: DCG = 1/log2(13) + 1/log2(31) = 0.270238 + 0.201849 = 0.472087; IDCG = 1 + 0.630930 = 1.630930 -> 0.289459
    assert ndcg(r, 50)[0] == pytest.approx((L(12) + L(30)) / (1 + L(2)))
    assert ndcg(r, 50)[0] == pytest.approx(0.289459, abs=1e-6)
    assert mrr(r)[0] == pytest.approx(1 / 12)


def test_all_targets_on_top_is_perfect():
    # ranks (1, 2, 3) at K=2: DCG = 1 + 1/log2(3) = IDCG over min(2, 3) = 2 slots -> 1.0
    assert ndcg([[1, 2, 3]], 2)[0] == pytest.approx(1.0)
    assert ndcg([[2, 1, 3]], 10)[0] == pytest.approx(1.0)


def test_padded_and_ragged_inputs_agree_and_empty_row_is_zero():
    ragged = [np.array([1, 4, 20]), np.array([7]), np.array([], dtype=np.int64)]
    padded = np.array([[1, 4, 20], [7, 0, 0], [0, 0, 0]])
    a = compute_metrics(ragged, ks=[5, 10])
    b = compute_metrics(padded, ks=[5, 10])
    assert list(a) == metric_names([5, 10]) == ["hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"]
    for k in a:
        np.testing.assert_allclose(a[k], b[k])
        assert a[k][2] == 0.0  # no target: every metric 0
    # row 1: single target at rank 7: HR@5 0, HR@10 1, NDCG@10 = 1/log2(8) = 1/3, MRR 1/7
    assert (a["hr@5"][1], a["hr@10"][1]) == (0.0, 1.0)
    assert a["ndcg@10"][1] == pytest.approx(1 / 3)
    assert a["mrr"][1] == pytest.approx(1 / 7)
    means = mean_metrics(a)
    # HR@10 over 3 users: (1 + 1 + 0) / 3
    assert means["hr@10"] == pytest.approx(2 / 3)


def test_mrr_cutoff_and_list_size():
    r = [[1500], [999, 1200], [1001]]
    assert mrr(r, cutoff=1000).tolist() == [0.0, pytest.approx(1 / 999), 0.0]
    assert mrr(r).tolist() == pytest.approx([1 / 1500, 1 / 999, 1 / 1001])
    # the reference reads a top-1000 list: a rank beyond it counts for nothing, even at K=2000 ...
    m = compute_metrics(r, ks=[1000, 2000], list_size=1000)
    assert m["hr@2000"].tolist() == [0.0, 1.0, 0.0]
    assert m["hr@1000"].tolist() == [0.0, 1.0, 0.0]
    assert m["mrr"].tolist() == [0.0, pytest.approx(1 / 999), 0.0]
    # ... but is still a target: user 1's IDCG@1000 spans 2 slots: NDCG = (1/log2 1000) / (1 + 1/log2 3)
    assert m["ndcg@1000"][1] == pytest.approx(L(999) / (1 + L(2)))
    # without a list size, K=2000 sees rank 1500
    assert compute_metrics(r, ks=[2000])["hr@2000"].tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# ranks from scores: ties, duplicates, exclusion, K > pool
# ---------------------------------------------------------------------------------------------------------------


def test_rank_of_targets_ties_duplicates_exclusion():
    #               item: 0    1    2    3    4    5
    S = np.array([[0.5, 0.9, 0.5, 0.1, 0.5, 0.7]])
    # targets 2 and 0 (2 listed twice: deduplicated); item 1 excluded.
    # candidates: 0 (.5), 2 (.5), 3 (.1), 4 (.5), 5 (.7)
    # target 2: greater = {5} -> 1; ties with lower index = {0} (a target too: it competes) -> 1; rank 3
    # target 0: greater = {5} -> 1; no lower-index tie -> rank 2
    r = rank_of_targets(S, [[2, 0, 2]], [[1]])
    assert r.tolist() == [[3, 2]]
    # without exclusion, item 1 (.9) is ahead of both
    assert rank_of_targets(S, [[2, 0]]).tolist() == [[4, 3]]
    # a target listed in the exclusions is still ranked (and still competes)
    assert rank_of_targets(S, [[2, 0]], [[0, 1]]).tolist() == [[3, 2]]


def test_rank_of_targets_padded_rows_and_k_larger_than_pool():
    S = np.array([[3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    # row 0: target 4 is last of 5 -> rank 5; row 1: all tied, target 3 has 3 lower-index ties -> rank 4
    r = rank_of_targets(S, np.array([[4, -1], [3, 1]]))
    # row 1 also has target 1: 1 lower-index tie (item 0) -> rank 2
    assert r.tolist() == [[5, 0], [4, 2]]
    m = compute_metrics(r, ks=[10])  # K = 10 > pool of 5: every target is inside
    assert m["hr@10"].tolist() == [1.0, 1.0]
    # row 0: 1/log2(6) / 1 = 0.386853; row 1: (1/log2 5 + 1/log2 3) / (1 + 1/log2 3) = 1.061606 / 1.630930
    assert m["ndcg@10"].tolist() == pytest.approx([L(5), (L(4) + L(2)) / (1 + L(2))])


def test_rank_of_targets_chunking_and_broadcast_view():
    counts = np.array([5.0, 1.0, 5.0, 2.0, 2.0, 0.0, 5.0])
    S = np.broadcast_to(counts, (3, 7))
    tg = [[6], [3, 4], [5]]
    ex = [[0], [], [1, 2]]
    # row 0: cand {1..6}: target 6 (5.0): tie with 2 (lower) -> rank 2
    # row 1: target 3 (2.0): greater {0,2,6} -> 3, tie none lower -> 4; target 4: greater 3, tie {3} -> 5
    # row 2: cand {0,3,4,5,6}: target 5 (0.0): greater {0,3,4,6} -> rank 5
    want = [[2, 0], [4, 5], [5, 0]]
    assert rank_of_targets(S, tg, ex).tolist() == want
    assert rank_of_targets(S, tg, ex, chunk_elems=3).tolist() == want  # one column per block


def test_rank_of_targets_rejects_nan_and_bad_index():
    with pytest.raises(ValueError, match="NaN"):
        rank_of_targets(np.array([[np.nan, 1.0]]), [[0]])
    with pytest.raises(ValueError, match="out of range"):
        rank_of_targets(np.zeros((1, 3)), [[3]])


# ---------------------------------------------------------------------------------------------------------------
# the multi-vector engine against a float64 brute force
# ---------------------------------------------------------------------------------------------------------------


def dyadic_unit_vectors(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    """Unit vectors whose dot products are exact in float32: 1, 4 or 16 entries of +-1, +-1/2, +-1/4.

    The space is small, so there are many duplicate vectors and many exactly tied scores.
    """
    out = np.zeros((n, d), dtype=np.float64)
    for i in range(n):
        nnz = rng.choice([1, 4, 16])
        pos = rng.choice(d, size=nnz, replace=False)
        out[i, pos] = rng.choice([-1.0, 1.0], size=nnz) / np.sqrt(nnz)
    return out


def brute_force_ranks(U: np.ndarray, V: np.ndarray, targets, excluded) -> np.ndarray:
    """float64 ranks by sorting every candidate: key (-score, item index)."""
    Un = U / np.linalg.norm(U, axis=-1, keepdims=True)
    Vn = V / np.linalg.norm(V, axis=-1, keepdims=True)
    S = np.einsum("bkd,nd->bkn", Un, Vn).max(axis=1)
    T = max(len(set(t)) for t in targets)
    out = np.zeros((len(U), T), dtype=np.int64)
    for b in range(len(U)):
        tg = list(dict.fromkeys(targets[b]))
        ex = set(excluded[b]) - set(tg)
        cand = np.array([j for j in range(len(V)) if j not in ex])
        order = cand[np.lexsort((cand, -S[b, cand]))]
        pos = {int(j): p + 1 for p, j in enumerate(order)}
        out[b, : len(tg)] = [pos[t] for t in tg]
    return out


def random_case(seed: int, B: int = 23, K: int = 3, N: int = 301, d: int = 16, max_targets: int = 4):
    rng = np.random.default_rng(seed)
    U = dyadic_unit_vectors(rng, B * K, d).reshape(B, K, d) * 2.0 ** rng.integers(-2, 3, size=(B, K, 1))
    V = dyadic_unit_vectors(rng, N, d) * 2.0 ** rng.integers(-2, 3, size=(N, 1))
    V[rng.integers(0, N, 30)] = V[rng.integers(0, N, 30)]  # extra exact duplicates
    targets = [rng.integers(0, N, size=rng.integers(1, max_targets + 1)).tolist() for _ in range(B)]
    targets[0] = targets[0] + targets[0]  # duplicated targets
    excluded = [rng.integers(0, N, size=rng.integers(0, 40)).tolist() for _ in range(B)]
    excluded[1] = excluded[1] + targets[1]  # exclusions that name targets (ignored for targets)
    return U, V, targets, excluded


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_target_ranks_equal_float64_brute_force(seed):
    U, V, targets, excluded = random_case(seed)
    want = brute_force_ranks(U, V, targets, excluded)
    for uc, ic in [(256, None), (5, 37), (1, 1000), (7, 3)]:
        got = target_ranks(U.astype(np.float32), V.astype(np.float32), targets, excluded, user_chunk=uc, item_chunk=ic)
        np.testing.assert_array_equal(got, want, err_msg=f"user_chunk={uc} item_chunk={ic}")
    # the dense path (score matrix + numpy ranking) agrees too
    S = max_cosine(U.astype(np.float32), V.astype(np.float32)).numpy()
    np.testing.assert_array_equal(rank_of_targets(S, targets, excluded, chunk_elems=1000), want)


def test_many_targets_per_user():
    # ~200 targets per user: fewer users per block (their target vectors ride along in every block's matmul)
    U, V, targets, excluded = random_case(9, B=30, max_targets=400)
    want = brute_force_ranks(U, V, targets, excluded)
    np.testing.assert_array_equal(target_ranks(U, V, targets, excluded, item_chunk=100), want)


def test_ties_are_real_ties_in_the_brute_force_data():
    U, V, targets, _ = random_case(0)
    S = max_cosine(U.astype(np.float32), V.astype(np.float32)).numpy()
    tied = sum(int((S[b] == S[b, t]).sum()) - 1 for b in range(len(U)) for t in targets[b])
    assert tied > 50  # the check above exercises the lower-index tie rule a lot


def test_target_ranks_on_continuous_data_away_from_near_ties():
    rng = np.random.default_rng(7)
    B, K, N, d = 16, 4, 2000, 32
    U = rng.standard_normal((B, K, d)).astype(np.float32)
    V = rng.standard_normal((N, d)).astype(np.float32)
    V[100:110] = V[5]  # exact duplicates of item 5, which is a target of user 0
    targets = [[5, 1999]] + [rng.integers(0, N, 3).tolist() for _ in range(B - 1)]
    excluded = [rng.integers(0, N, 20).tolist() for _ in range(B)]
    want = brute_force_ranks(U.astype(np.float64), V.astype(np.float64), targets, excluded)
    got = target_ranks(U, torch.from_numpy(V), targets, excluded, user_chunk=6, item_chunk=300)
    # duplicates of item 5 have larger indices: they never pass it (exact ties in one matmul)
    assert got[0, 0] == want[0, 0]
    # elsewhere, float32 may order two items whose float64 scores are within rounding: allow off-by-a-few only
    # where such near-ties exist, and demand equality everywhere else
    Un = U / np.linalg.norm(U, axis=-1, keepdims=True)
    Vn = V / np.linalg.norm(V, axis=-1, keepdims=True)
    S = np.einsum("bkd,nd->bkn", Un.astype(np.float64), Vn.astype(np.float64)).max(axis=1)
    for b in range(B):
        for j, t in enumerate(dict.fromkeys(targets[b])):
            near = int((np.abs(S[b] - S[b, t]) < 1e-5).sum()) - 1 - int((V == V[t]).all(axis=1).sum() - 1)
            assert abs(int(got[b, j]) - int(want[b, j])) <= max(near, 0)


def test_topk_matches_brute_force_order():
    U, V, _, excluded = random_case(3, B=9, N=120)
    Un = U / np.linalg.norm(U, axis=-1, keepdims=True)
    Vn = V / np.linalg.norm(V, axis=-1, keepdims=True)
    S = np.einsum("bkd,nd->bkn", Un, Vn).max(axis=1)
    for ic in (None, 13, 1):
        idx, sc = topk(U, V.astype(np.float32), 25, excluded, user_chunk=4, item_chunk=ic)
        assert idx.shape == (9, 25)
        for b in range(9):
            cand = np.array([j for j in range(len(V)) if j not in set(excluded[b])])
            want = cand[np.lexsort((cand, -S[b, cand]))][:25]
            np.testing.assert_array_equal(idx[b], want)
            np.testing.assert_allclose(sc[b], S[b, want], atol=1e-6)


def test_topk_consistent_with_target_ranks_and_short_pool():
    U, V, _, _ = random_case(4, B=6, N=50)
    idx, _ = topk(U, V, 10)
    # the item at position p of the top-k list has rank p + 1
    ranks = target_ranks(U, V, [row.tolist() for row in idx])
    np.testing.assert_array_equal(ranks, np.tile(np.arange(1, 11), (6, 1)))
    # k above the pool is clamped; excluded slots beyond the eligible items are -1 / -inf
    idx, sc = topk(U[:1], V[:4], 10, exclude=[[0, 1]])
    assert idx.shape == (1, 4)
    assert sorted(idx[0, :2].tolist()) == [2, 3] and idx[0, 2:].tolist() == [-1, -1]
    assert np.isneginf(sc[0, 2:]).all()


def test_score_candidates_matches_dense_scores():
    U, V, _, _ = random_case(5, B=4, N=40)
    dense = max_cosine(U, V).numpy()
    cand = np.array([[0, 5, 39, -1], [1, 2, 3, 4], [7, -1, -1, -1], [39, 38, 0, 1]])
    s = score_candidates(U, V, cand)
    for b in range(4):
        for c in range(4):
            if cand[b, c] < 0:
                assert s[b, c] == -np.inf
            else:
                assert s[b, c] == pytest.approx(dense[b, cand[b, c]], abs=1e-6)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[B, K, d\]"):
        target_ranks(np.zeros((2, 4)), np.zeros((3, 4)), [[0], [1]])
    with pytest.raises(ValueError, match="d=4"):
        target_ranks(np.zeros((2, 1, 4)), np.zeros((3, 5)), [[0], [1]])
