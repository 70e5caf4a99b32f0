"""Tests of the zero-parameter baselines (:mod:`redrec.baselines.zero`): hand-computed popularity metrics, counts
that never see a target, mean pooling of normalised item vectors, and a clear error without item vectors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_store

from redrec.baselines import MeanPoolScorer, PopularityScorer
from redrec.errors import DataError
from redrec.eval.protocols import EvalCase, ProtocolConfig, evaluate, make_cases
from redrec.mixing import MixingConfig

HF, ADS = 0, 1




def seq_user(items, scen=HF, t0=1):
    return [(it, scen, t0 + j) for j, it in enumerate(items)]


@pytest.fixture
def pop_store(tmp_path):
    # loo test cases: u0 input [0, 1] -> target 2; u1 input [0, 0] -> target 3; u2 input [1] -> target 4;
    # u3 has one event only: no case, and its event is nobody's input
    return build_store(tmp_path, [seq_user([0, 1, 2]), seq_user([0, 0, 3]), seq_user([1, 4]), seq_user([2])], 5)


def test_popularity_hand_computed_loo(pop_store):
    cfg = ProtocolConfig(name="loo", ks=[1, 3])
    cases = make_cases(pop_store, cfg)
    pop = PopularityScorer()
    res = evaluate(pop_store, cases, pop, cfg, progress=False)
    # counts over the inputs only: item 0: 1 (u0) + 2 (u1) = 3; item 1: 1 (u0) + 1 (u2) = 2; items 2, 3, 4: 0
    # (u0's target 2 and u3's lone event are not inputs: no leakage)
    assert pop.counts.tolist() == [3, 2, 0, 0, 0]
    # ranking 0, 1, 2, 3, 4 (ties 2/3/4 by index); loo excludes each user's history:
    #   u0: {0, 1} excluded -> candidates 2, 3, 4 -> target 2 rank 1
    #   u1: {0} excluded    -> candidates 1, 2, 3, 4 -> target 3 rank 3
    #   u2: {1} excluded    -> candidates 0, 2, 3, 4 -> target 4 rank 4
    np.testing.assert_allclose(res.per_user["mrr"], [1, 1 / 3, 1 / 4])
    assert res.metrics["hr@1"] == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3
    assert res.metrics["hr@3"] == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3
    assert res.metrics["ndcg@1"] == pytest.approx(1 / 3)
    assert res.metrics["ndcg@3"] == pytest.approx(0.5)  # (1/log2(2) + 1/log2(4) + 0) / 3 = (1 + 0.5) / 3
    assert res.metrics["mrr"] == pytest.approx(19 / 36)  # (1 + 1/3 + 1/4) / 3 = 0.527778
    # without exclusion the ranks are 3, 4, 5
    cfg2 = ProtocolConfig(name="loo", ks=[1, 3], exclude_history=False)
    res2 = evaluate(pop_store, cases, PopularityScorer(), cfg2, progress=False)
    assert res2.metrics["hr@3"] == pytest.approx(1 / 3)
    assert res2.metrics["ndcg@3"] == pytest.approx(0.5 / 3)  # only u0: 1/log2(4) = 0.5, over 3 users
    assert res2.metrics["mrr"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 5) / 3)  # 0.261111


def test_popularity_counts_only_the_target_scenario_under_redrec(tmp_path):
    store = build_store(
        tmp_path,
        [
            [(5, HF, 1), (6, ADS, 2), (6, ADS, 3), (7, HF, 4), (8, ADS, 5)],  # ads at 1, 2, 4
            [(6, HF, 1), (9, ADS, 2), (10, HF, 3), (9, ADS, 4), (11, ADS, 5)],  # ads at 1, 3, 4
        ],
        12,
    )
    cfg = ProtocolConfig(name="redrec", min_history=4, ks=[1, 5])  # the only cutoff left is position 4
    cases = make_cases(store, cfg)
    assert [(c.cutoff, c.targets.tolist()) for c in cases] == [(4, [8]), (4, [11])]
    pop = PopularityScorer()
    evaluate(store, cases, pop, cfg, progress=False)
    # ads events among the inputs (positions 0..3): u0 item 6 twice; u1 item 9 twice
    want = np.zeros(12)
    want[[6, 9]] = 2
    np.testing.assert_array_equal(pop.counts, want)
    hf = PopularityScorer(scenario="homefeed")
    hf.prepare(store, cases, cfg)
    want = np.zeros(12)
    want[[5, 7, 6, 10]] = 1  # u0: 5, 7; u1: 6, 10
    np.testing.assert_array_equal(hf.counts, want)
    every = PopularityScorer()
    every.prepare(store, cases, ProtocolConfig(name="loo"))  # not redrec: every scenario counts
    assert every.counts[[5, 6, 7, 9, 10]].tolist() == [1, 3, 1, 2, 1] and every.counts[[8, 11]].tolist() == [0, 0]


def test_popularity_needs_prepare(pop_store):
    with pytest.raises(RuntimeError, match="prepare"):
        PopularityScorer().score_cases(pop_store, [])


VECS = np.array(
    [
        [3, 0, 0, 0],  # item 0
        [0, 1, 0, 0],  # item 1
        [0, 0, 1, 0],  # item 2
        [1, 1, 0, 0],  # item 3: the direction of the mean of the *normalised* vectors of items 0 and 1
        [3, 1, 0, 0],  # item 4: the direction of the raw mean of items 0 and 1 (a wrong implementation's pick)
        [0, 0, 0, 2],  # item 5
    ],
    dtype=np.float32,
)


def test_mean_pool_ranks_the_history_mean_first(tmp_path):
    store = build_store(tmp_path, [seq_user([0, 1, 3]), seq_user([2, 5, 2, 4])], 6, vectors=VECS)
    cfg = ProtocolConfig(name="loo", ks=[1, 2])
    cases = make_cases(store, cfg)
    mp = MeanPoolScorer()
    u = mp.score_cases(store, cases)
    assert u.shape == (2, 1, 4)
    s = np.sqrt(0.5)
    np.testing.assert_allclose(u[0, 0], [s, s, 0, 0], rtol=1e-6)  # normalise(mean([1,0,0,0], [0,1,0,0]))
    res = evaluate(store, cases, mp, cfg, progress=False)
    assert res.per_user["hr@1"][0] == 1.0  # item 3 (cosine 1) beats item 4 (cosine 0.894)
    # with the history kept, item 3 is still first for user 0
    res2 = evaluate(store, cases, MeanPoolScorer(), ProtocolConfig(name="loo", ks=[1], exclude_history=False), progress=False)
    assert res2.per_user["hr@1"][0] == 1.0


def test_mean_pool_weights_events_and_follows_the_mixing(tmp_path):
    store = build_store(tmp_path, [seq_user([2, 5, 2, 4])], 6, vectors=VECS)
    cases = make_cases(store, ProtocolConfig(name="loo"))  # input: items 2, 5, 2
    v = MeanPoolScorer().score_cases(store, cases)[0, 0]
    want = np.array([0, 0, 2, 1]) / np.sqrt(5)  # mean of e3, e4, e3 = [0, 0, 2/3, 1/3], normalised
    np.testing.assert_allclose(v, want, rtol=1e-6)
    last1 = MeanPoolScorer(MixingConfig(policy="timestamp", last_n=1)).score_cases(store, cases)[0, 0]
    np.testing.assert_allclose(last1, [0, 0, 1, 0])  # only the last input event (item 2)
    empty = MeanPoolScorer().score_cases(store, [EvalCase(user=0, cutoff=0, t_now=1, targets=np.array([2]))])
    np.testing.assert_array_equal(empty, 0)  # no input: the zero vector (every item scores 0)


def test_mean_pool_reference_never_sees_target_events(tmp_path):
    # inputs: items 0 and 1; the target event (item 2) sits between them in time
    store = build_store(tmp_path, [[(0, HF, 1, 0), (2, ADS, 2, 1), (1, HF, 3, 0)]], 6, vectors=VECS, with_target=True)
    cfg = ProtocolConfig(name="reference", ks=[1])
    cases = make_cases(store, cfg)
    v = MeanPoolScorer().score_cases(store, cases)[0, 0]
    np.testing.assert_allclose(v, [np.sqrt(0.5), np.sqrt(0.5), 0, 0], rtol=1e-6)  # no component on item 2's axis


def test_mean_pool_without_item_vectors_is_a_clear_error(pop_store):
    cfg = ProtocolConfig(name="loo")
    cases = make_cases(pop_store, cfg)
    with pytest.raises(DataError, match="item vectors") as e:
        evaluate(pop_store, cases, MeanPoolScorer(), cfg, progress=False)
    assert str(pop_store.path) in str(e.value)
    with pytest.raises(DataError, match="MeanPoolScorer"):
        MeanPoolScorer().score_cases(pop_store, cases)
