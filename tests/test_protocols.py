"""Tests of :mod:`redrec.eval.protocols` and :mod:`redrec.eval.report`.

Hand-built stores pin each protocol's cases (cutoff, targets, prediction time, skipped users); property checks on
a random store verify there is no future leakage; end-to-end runs of :func:`evaluate` with hand-made scorers
pin exclusion, sampled pools, the vector path, results and tables.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_store

from redrec.config import from_dict
from redrec.errors import ConfigError, DataError
from redrec.eval.protocols import (
    EvalCase,
    EvalResult,
    ProtocolConfig,
    case_input_items,
    case_sequence,
    evaluate,
    make_cases,
    sample_pool,
)
from redrec.eval.report import format_table, read_json, write_json
from redrec.mixing import MixingConfig, mix
from redrec.retrieval.exact import max_cosine

HF, ADS = 0, 1




@pytest.fixture
def loo_store(tmp_path):
    return build_store(
        tmp_path,
        [
            [(0, HF, 10), (1, HF, 20), (2, HF, 30), (3, HF, 40)],
            [(4, HF, 5), (4, HF, 6)],  # the target item is also in the history
            [(5, HF, 7)],  # too short for any case
            [(1, HF, 1), (2, HF, 2), (6, HF, 3)],
        ],
        n_items=7,
    )


# user 0 of the redrec store: positions 0..7
REDREC_U0 = [(10, HF, 1), (20, ADS, 2), (11, HF, 3), (21, ADS, 4), (21, ADS, 5), (12, HF, 6), (22, ADS, 7), (23, ADS, 8)]
# ads positions 1, 3, 4, 6, 7 -> targets (next 3 ads events from p, deduplicated) for each cutoff p
REDREC_U0_TARGETS = {1: [20, 21], 3: [21, 22], 4: [21, 22, 23], 6: [22, 23], 7: [23]}


@pytest.fixture
def redrec_store(tmp_path):
    return build_store(
        tmp_path,
        [REDREC_U0, [(1, HF, 1), (2, HF, 2)], [(3, ADS, 1), (4, HF, 2)]],
        n_items=30,
    )


class FixedScores:
    """Every user gets the same scores (``scores[i]`` for item ``i``)."""

    name = "fixed"

    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=np.float64)

    def score_cases(self, store, cases):
        return np.broadcast_to(self.scores, (len(cases), len(self.scores)))


class Oracle:
    """Cheats on purpose: targets score 1, everything else 0."""

    name = "oracle"

    def score_cases(self, store, cases):
        s = np.zeros((len(cases), store.n_items))
        for i, c in enumerate(cases):
            s[i, c.targets] = 1.0
        return s


class AntiOracle(Oracle):
    name = "anti-oracle"

    def score_cases(self, store, cases):
        return -super().score_cases(store, cases)


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------


def test_config_defaults_validation_and_resolution(redrec_store, tmp_path):
    cfg = from_dict(ProtocolConfig, {"name": "redrec", "ks": [10, 20]})
    assert cfg.pool == "full" and cfg.n_targets == 3 and cfg.ks == [10, 20]
    r = cfg.resolved(redrec_store)
    assert r.target_scenario == "ads" and r.exclude_history is False
    assert ProtocolConfig().resolved(redrec_store).exclude_history is True  # loo
    assert ProtocolConfig(name="loo", exclude_history=False).resolved(redrec_store).exclude_history is False
    other = build_store(tmp_path, [[(0, 0, 1), (1, 1, 2)]], 2, scenarios=("feed", "live"), name="other")
    assert ProtocolConfig(name="redrec").resolved(other).target_scenario == "feed"  # no "ads": the first one
    with pytest.raises(ConfigError, match="n_targets"):
        from_dict(ProtocolConfig, {"n_targets": 0})
    with pytest.raises(ConfigError, match="name"):
        from_dict(ProtocolConfig, {"name": "hstu"})
    with pytest.raises(ConfigError, match="ks"):
        from_dict(ProtocolConfig, {"ks": []})
    with pytest.raises(ConfigError, match="unknown scenario 'search'"):
        make_cases(redrec_store, ProtocolConfig(name="redrec", target_scenario="search"))
    assert ProtocolConfig(name="reference").list_size == 1000 and ProtocolConfig().list_size is None


# ---------------------------------------------------------------------------------------------------------------
# loo
# ---------------------------------------------------------------------------------------------------------------


def test_loo_test_and_valid_cases(loo_store):
    cases = make_cases(loo_store, ProtocolConfig(name="loo"))
    assert [(c.user, c.cutoff, c.t_now, c.targets.tolist()) for c in cases] == [
        (0, 3, 40, [3]),
        (1, 1, 6, [4]),
        (3, 2, 3, [6]),
    ]
    valid = make_cases(loo_store, ProtocolConfig(name="loo", split="valid"))
    # user 1 would have an empty input (cutoff 0 < min_history 1)
    assert [(c.user, c.cutoff, c.t_now, c.targets.tolist()) for c in valid] == [(0, 2, 30, [2]), (3, 1, 2, [2])]
    assert [c.user for c in make_cases(loo_store, ProtocolConfig(name="loo", min_history=3))] == [0]
    assert all(c.targets.dtype == np.int64 for c in cases)


def test_loo_excludes_history_but_never_the_target(loo_store):
    cfg = ProtocolConfig(name="loo", ks=[1, 5])
    cases = make_cases(loo_store, cfg)
    scorer = FixedScores([7, 6, 5, 4, 3, 2, 1])  # item 0 best ... item 6 worst
    res = evaluate(loo_store, cases, scorer, cfg, progress=False)
    # user 0: history {0,1,2} excluded -> target 3 is first (rank 1)
    # user 1: history {4} is the target itself: kept; items 0..3 ahead -> rank 5
    # user 3: history {1,2} excluded; candidates 0,3,4,5,6 -> target 6 is 5th
    np.testing.assert_allclose(res.per_user["mrr"], [1, 1 / 5, 1 / 5])
    assert res.metrics["hr@1"] == pytest.approx(1 / 3) and res.metrics["hr@5"] == pytest.approx(1.0)
    assert res.pool_description == "full pool: 7 items, history excluded"
    # without exclusion: ranks 4, 5, 7
    cfg2 = ProtocolConfig(name="loo", ks=[1, 5], exclude_history=False)
    res2 = evaluate(loo_store, cases, scorer, cfg2, progress=False)
    np.testing.assert_allclose(res2.per_user["mrr"], [1 / 4, 1 / 5, 1 / 7])


# ---------------------------------------------------------------------------------------------------------------
# redrec
# ---------------------------------------------------------------------------------------------------------------


def test_redrec_cases_targets_and_seeds(redrec_store):
    seen = set()
    for seed in range(40):
        cfg = ProtocolConfig(name="redrec", seed=seed)
        cases = make_cases(redrec_store, cfg)
        # user 1 has no ads event; user 2's only ads event is at position 0 < min_history
        assert [c.user for c in cases] == [0]
        c = cases[0]
        assert c.cutoff in REDREC_U0_TARGETS
        assert c.targets.tolist() == REDREC_U0_TARGETS[c.cutoff]
        assert c.t_now == REDREC_U0[c.cutoff][2]
        seen.add(c.cutoff)
        again = make_cases(redrec_store, cfg)[0]  # reproducible
        assert (again.cutoff, again.targets.tolist()) == (c.cutoff, c.targets.tolist())
    assert seen == set(REDREC_U0_TARGETS)  # every ads position can be drawn
    late = {make_cases(redrec_store, ProtocolConfig(name="redrec", seed=s, min_history=4))[0].cutoff for s in range(30)}
    assert late == {4, 6, 7}
    one = make_cases(redrec_store, ProtocolConfig(name="redrec", seed=3, n_targets=1))[0]
    assert one.targets.tolist() == [REDREC_U0[one.cutoff][0]]
    hf = make_cases(redrec_store, ProtocolConfig(name="redrec", target_scenario="homefeed", min_history=0))
    assert [c.user for c in hf] == [0, 1, 2]


def random_store(tmp_path, n_users=40, n_items=60, seed=0, with_target=False):
    rng = np.random.default_rng(seed)
    users = []
    for _ in range(n_users):
        n = int(rng.integers(1, 30))
        ts = np.cumsum(rng.integers(0, 3, n)) + 1000  # equal timestamps happen
        tflag = np.zeros(n, int)
        if with_target and rng.random() < 0.8:
            tflag[n - int(rng.integers(1, min(n, 4) + 1)) :] = 1
        users.append([(int(rng.integers(0, n_items)), int(rng.integers(0, 3)), int(t), int(f)) for t, f in zip(ts, tflag, strict=True)])
    if not with_target:
        users = [[e[:3] for e in u] for u in users]
    return build_store(tmp_path, users, n_items, scenarios=("homefeed", "ads", "search"), with_target=with_target, name=f"r{seed}")


@pytest.mark.parametrize("name", ["loo", "redrec", "reference"])
def test_no_future_leakage(tmp_path, name):
    store = random_store(tmp_path, with_target=name == "reference")
    cfg = ProtocolConfig(name=name, seed=5)
    cases = make_cases(store, cfg)
    assert len(cases) > 10
    mixing = MixingConfig(policy="2d", quotas={"homefeed": 5, "ads": 3, "search": 2})
    for c in cases:
        u = store.user(c.user)
        hist = c.input_positions()
        assert (hist < c.cutoff).all() and len(hist) >= cfg.min_history
        seq = case_sequence(u, c, mixing, store.scenarios)
        assert set(seq.index.tolist()) <= set(hist.tolist())
        items_in = case_input_items(store, c)
        np.testing.assert_array_equal(items_in, u.item[hist])
        if name == "reference":
            assert not u.target[hist].any()  # the input has no target event
            tpos = np.flatnonzero(u.target)
            assert c.targets.tolist() == list(dict.fromkeys(u.item[tpos].tolist()))
            assert c.t_now == u.timestamp[tpos[0]]
        else:
            assert c.cutoff < len(u)
            assert (u.timestamp[hist] <= c.t_now).all()
            assert c.t_now == u.timestamp[c.cutoff]
            # every target is the item of an event at or after the cutoff
            assert set(c.targets.tolist()) <= set(u.item[c.cutoff :].tolist())
            if name == "redrec":
                ads = store.scenario_index("ads")
                assert u.scenario[c.cutoff] == ads
                future_ads = np.flatnonzero(u.scenario[c.cutoff :] == ads)[:3] + c.cutoff
                assert c.targets.tolist() == list(dict.fromkeys(u.item[future_ads].tolist()))


def test_max_users_is_a_seeded_subset(tmp_path):
    store = random_store(tmp_path)
    full = {c.user: c for c in make_cases(store, ProtocolConfig(name="redrec", seed=1))}
    sub = make_cases(store, ProtocolConfig(name="redrec", seed=1, max_users=7))
    assert len(sub) == 7 and [c.user for c in sub] == sorted(c.user for c in sub)
    for c in sub:  # a user's cutoff does not depend on who else was drawn
        assert c.cutoff == full[c.user].cutoff and c.targets.tolist() == full[c.user].targets.tolist()
    assert [c.user for c in make_cases(store, ProtocolConfig(name="redrec", seed=1, max_users=7))] == [c.user for c in sub]
    other = make_cases(store, ProtocolConfig(name="redrec", seed=2, max_users=7))
    assert [c.user for c in other] != [c.user for c in sub]


# ---------------------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------------------


def test_reference_uses_target_flags(tmp_path, redrec_store):
    store = build_store(
        tmp_path,
        [
            [(1, HF, 1, 0), (2, ADS, 2, 0), (3, ADS, 3, 1), (4, HF, 4, 0), (3, ADS, 5, 1), (5, ADS, 6, 1)],
            [(1, HF, 1, 0), (2, ADS, 2, 0)],  # no target: skipped
            [(6, ADS, 9, 1)],  # no input event: skipped at min_history 1
        ],
        n_items=8,
        with_target=True,
        name="ref",
    )
    cases = make_cases(store, ProtocolConfig(name="reference"))
    assert len(cases) == 1
    c = cases[0]
    assert c.user == 0 and c.targets.tolist() == [3, 5] and c.t_now == 3
    assert c.history_positions.tolist() == [0, 1, 3] and c.cutoff == 4
    u = store.user(0)
    # mixing runs on the non-target events only and maps back to the user's positions
    seq = case_sequence(u, c, MixingConfig(policy="2d", quotas={"homefeed": 1, "ads": 1}), store.scenarios)
    assert seq.index.tolist() == [1, 3]
    seq = case_sequence(u, c, MixingConfig(policy="timestamp", last_n=2), store.scenarios)
    assert seq.index.tolist() == [1, 3]
    assert [x.user for x in make_cases(store, ProtocolConfig(name="reference", min_history=0))] == [0, 2]
    # history not excluded; reference list size 1000 -> an oracle is perfect
    res = evaluate(store, cases, Oracle(), ProtocolConfig(name="reference"), progress=False)
    assert res.metrics["hr@10"] == 1.0 and res.metrics["ndcg@10"] == 1.0 and res.metrics["mrr"] == 1.0
    assert res.exclude_history is False and res.protocol == "reference"
    with pytest.raises(DataError, match="target"):
        make_cases(redrec_store, ProtocolConfig(name="reference"))


def test_case_sequence_without_history_positions_is_mix():
    u_scen = np.array([0, 1, 0, 1, 1, 0], dtype=np.int8)

    class U:
        scenario = u_scen

    c = EvalCase(user=0, cutoff=4, t_now=0, targets=np.array([1]))
    cfg = MixingConfig(quotas={"a": 1, "b": 1})
    assert case_sequence(U, c, cfg, ["a", "b"]).index.tolist() == mix(u_scen, 4, cfg, ["a", "b"]).index.tolist() == [2, 3]


# ---------------------------------------------------------------------------------------------------------------
# pools and the vector path
# ---------------------------------------------------------------------------------------------------------------


def test_sample_pool():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    t = np.array([7, 3])
    forbid = np.arange(10, 20)
    p = sample_pool(10_000, t, forbid, 50, rng())
    assert len(p) == 52 and set(t) <= set(p) and not set(forbid) & set(p)
    assert (np.diff(p) > 0).all()  # sorted, unique
    np.testing.assert_array_equal(p, sample_pool(10_000, t, forbid, 50, rng()))
    # small catalogue: everything that is allowed
    assert sample_pool(12, t, forbid, 50, rng()).tolist() == list(range(10))
    p = sample_pool(30, t, forbid, 9, rng())  # 18 free items, 9 drawn from the explicit list
    assert len(p) == 11 and not set(forbid) & set(p)


def test_sampled_pool_contains_targets_and_has_the_right_size(tmp_path):
    store = random_store(tmp_path, n_items=3000)
    cfg = ProtocolConfig(name="redrec", pool="sampled", n_sampled=100, ks=[1, 10, 1000], seed=4)
    cases = make_cases(store, cfg)
    good = evaluate(store, cases, Oracle(), cfg, progress=False)
    assert good.metrics["hr@1"] == 1.0 and good.metrics["mrr"] == 1.0 and good.metrics["ndcg@10"] == 1.0
    bad = evaluate(store, cases, AntiOracle(), cfg, progress=False)
    # the targets are the worst candidates: best target rank = 100 sampled + 1, whatever the number of targets
    np.testing.assert_allclose(bad.per_user["mrr"], 1 / 101)
    assert bad.pool_description == "sampled pool: 100 + targets"
    again = evaluate(store, cases, FixedScores(np.arange(3000.0)), cfg, progress=False)
    again2 = evaluate(store, cases, FixedScores(np.arange(3000.0)), cfg, progress=False)
    assert again.metrics == again2.metrics  # pools are seeded per case


class Vectors:
    """User vectors from a fixed table; item vectors dyadic (so float32 dot products are exact)."""

    name = "vectors"

    def __init__(self, n_users, n_items, seed=0):
        rng = np.random.default_rng(seed)
        self.item_vectors = np.eye(8, dtype=np.float32)[rng.integers(0, 8, n_items)] * rng.choice([-1, 1], (n_items, 1))
        self.user_table = rng.standard_normal((n_users, 2, 8)).astype(np.float32)

    def score_cases(self, store, cases):
        return self.user_table[[c.user for c in cases]]


class DenseOf(Vectors):
    name = "dense"

    def score_cases(self, store, cases):
        return max_cosine(super().score_cases(store, cases), self.item_vectors).numpy()


@pytest.mark.parametrize("pool", ["full", "sampled"])
def test_vector_and_dense_scorers_agree(tmp_path, pool):
    store = random_store(tmp_path, n_items=200)
    cfg = ProtocolConfig(name="loo", pool=pool, n_sampled=30, ks=[1, 5, 20])
    cases = make_cases(store, cfg)
    a = evaluate(store, cases, Vectors(store.n_users, 200), cfg, progress=False, batch_size=7)
    b = evaluate(store, cases, DenseOf(store.n_users, 200), cfg, progress=False, batch_size=64)
    for k in a.metrics:
        np.testing.assert_allclose(a.per_user[k], b.per_user[k], err_msg=k)
    assert a.model == "vectors" and b.model == "dense"


def test_bad_scorer_outputs_and_empty_cases(loo_store):
    cfg = ProtocolConfig(name="loo")
    cases = make_cases(loo_store, cfg)

    class Wrong:
        def score_cases(self, store, cases):
            return np.zeros((len(cases), 3))

    with pytest.raises(ValueError, match="n_items=7"):
        evaluate(loo_store, cases, Wrong(), cfg, progress=False)

    class NoItems:
        def score_cases(self, store, cases):
            return np.zeros((len(cases), 2, 4))

    with pytest.raises(ValueError, match="item_vectors"):
        evaluate(loo_store, cases, NoItems(), cfg, progress=False)
    with pytest.raises(DataError, match="no users"):
        evaluate(loo_store, [], Oracle(), cfg, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# results and reports
# ---------------------------------------------------------------------------------------------------------------


def test_result_json_and_tables(loo_store, tmp_path):
    cfg = ProtocolConfig(name="loo", ks=[1, 5])
    cases = make_cases(loo_store, cfg)
    r1 = evaluate(loo_store, cases, FixedScores([7, 6, 5, 4, 3, 2, 1]), cfg, progress=False)
    r2 = evaluate(loo_store, cases, Oracle(), cfg, progress=False)
    d = json.loads(r1.to_json())
    assert d["protocol"] == "loo" and d["n_users"] == 3 and d["config"]["exclude_history"] is True
    assert list(d["metrics"]) == ["hr@1", "hr@5", "ndcg@1", "ndcg@5", "mrr"]
    assert "per_user" not in d and "per_user" in json.loads(r1.to_json(per_user=True))
    back = EvalResult.from_dict(json.loads(r1.to_json(per_user=True)))
    assert back.metrics == r1.metrics and np.allclose(back.per_user["mrr"], r1.per_user["mrr"])

    for style in ("rich", "plain"):
        table = format_table({"pop": r1, "oracle": r2}, style=style)
        title = table.splitlines()[0]
        assert "protocol: loo" in title and "dataset: s" in title
        assert "full pool: 7 items, history excluded" in title and "K = 1, 5" in title
        assert "pop" in table and "oracle" in table and "1.0000" in table and "0.4667" in table  # mrr (1 + .2 + .2) / 3
    # results of several seeds of one model: mean ± std
    seeds = [r1, EvalResult(**{**r1.__dict__, "metrics": {k: 0.0 for k in r1.metrics}})]
    t = format_table(seeds, style="plain")
    assert "runs" in t and "±" in t
    # different protocols: the protocol becomes a column
    other = EvalResult(**{**r1.__dict__, "protocol": "redrec"})
    t = format_table([r1, other], style="plain")
    assert "protocol:" not in t.splitlines()[0] and "redrec" in t

    path = write_json(tmp_path / "out" / "results.json", {"pop": r1, "oracle": r2})
    rs = read_json(path)
    assert [r.model for r in rs] == ["pop", "oracle"] and rs[1].metrics == r2.metrics
