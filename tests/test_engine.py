"""The fast exact engine (redrec.retrieval.engine.search) equals a plain float64 top-k, ties and exclusions included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from redrec.retrieval.engine import EngineConfig, SearchStats, reference_topk, search


def clustered(B: int, K: int, N: int, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    cent = g.standard_normal((20, d)).astype(np.float32)
    X = cent[g.integers(0, 20, N)] + 0.3 * g.standard_normal((N, d)).astype(np.float32)
    Q = cent[g.integers(0, 20, B * K)] + 0.5 * g.standard_normal((B * K, d)).astype(np.float32)
    return Q.reshape(B, K, d), X * g.uniform(0.5, 2.0, (N, 1)).astype(np.float32)  # unnormalised on purpose


SMALL = EngineConfig(user_block=5, item_block=300, margin=4, n_sample=600, threads=2)


@pytest.mark.parametrize("cfg", [SMALL, EngineConfig(n_sample=0, threads=1, item_block=97), EngineConfig(),
                                 EngineConfig(blas="torch", user_block=4, item_block=512)],
                         ids=["small-tiles", "no-sample", "defaults", "torch-blas"])
def test_equals_float64_reference(cfg: EngineConfig) -> None:
    Q, X = clustered(23, 3, 5000)
    st = SearchStats()
    i, s = search(Q, X, 50, config=cfg, stats=st)
    ri, rs = reference_topk(Q, X, 50)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)
    assert st.users == 23


def test_exclusion_and_padding() -> None:
    Q, X = clustered(9, 2, 400)
    g = np.random.default_rng(1)
    exclude = [g.choice(400, size=int(n), replace=False) for n in g.integers(0, 390, 9)]
    exclude[0] = np.arange(395)  # only 5 eligible items: the rest of the list is padding
    i, s = search(Q, X, 20, exclude, config=SMALL)
    ri, rs = reference_topk(Q, X, 20, exclude)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)
    assert (i[0, 5:] == -1).all() and np.isneginf(s[0, 5:]).all()
    for u in range(9):
        assert not set(i[u][i[u] >= 0]) & set(exclude[u].tolist())


def test_ties_broken_by_lower_index_and_fallback_is_exact() -> None:
    """Many exact duplicates straddle the top-k boundary: the float64 check must fail and the fallback decide."""
    g = np.random.default_rng(2)
    base = g.standard_normal((30, 8)).astype(np.float32)
    X = base[g.integers(0, 30, 3000)]  # every vector repeated ~100 times
    Q = g.standard_normal((6, 2, 8)).astype(np.float32)
    st = SearchStats()
    i, s = search(Q, X, 150, config=SMALL, stats=st)
    ri, rs = reference_topk(Q, X, 150)
    np.testing.assert_array_equal(i, ri)
    assert st.float64_fallback > 0
    for u in range(6):  # within a run of equal scores, indices ascend
        eq = s[u, 1:] == s[u, :-1]
        assert (i[u, 1:][eq] > i[u, :-1][eq]).all()


def test_sample_estimate_too_high_is_rescanned() -> None:
    """A threshold estimate with fewer than k items above it: those users are scanned again from -inf."""
    Q, X = clustered(8, 1, 4000, seed=3)
    # sample_ratio ~1: the estimate aims at exactly k items above it, so about half the users fall short
    cfg = EngineConfig(user_block=2, item_block=500, margin=0, n_sample=3000, sample_ratio=1.0001, threads=1)
    st = SearchStats()
    i, _ = search(Q, X, 1000, config=cfg, stats=st)
    np.testing.assert_array_equal(i, reference_topk(Q, X, 1000)[0])
    assert st.rescanned > 0
    # exclusions are honoured by the estimate too: excluding each user's best items changes nothing in exactness
    exclude = [np.argsort(-(X @ Q[u, 0]))[:300] for u in range(8)]
    i, _ = search(Q, X, 100, exclude, config=cfg)
    np.testing.assert_array_equal(i, reference_topk(Q, X, 100, exclude)[0])


def test_memmap_items_tensor_users_and_single_vector(tmp_path) -> None:
    Q, X = clustered(7, 1, 1500)
    path = tmp_path / "items.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    i, s = search(torch.from_numpy(Q[:, 0]), ro, 30, config=SMALL)  # [B, d] users
    ri, rs = reference_topk(Q, X, 30)
    np.testing.assert_array_equal(i, ri)


def test_k_larger_than_pool_and_bad_input() -> None:
    Q, X = clustered(3, 2, 40)
    i, s = search(Q, X, 100)
    assert i.shape == (3, 40)
    np.testing.assert_array_equal(i, reference_topk(Q, X, 100)[0])
    with pytest.raises(ValueError, match="k must be"):
        search(Q, X, 0)
    with pytest.raises(ValueError, match="items must be"):
        search(Q, X[:, :3], 5)
    bad = Q.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        search(bad, X, 5)
    with pytest.raises(ValueError, match="out of range"):
        search(Q, X, 5, [[41], [], []])
