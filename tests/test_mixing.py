"""Tests of :mod:`redrec.mixing`: scenario quotas + merge policies (paper eq. 4 and the Table 3 ablations).

Property tests generate random users (1..4 scenarios, 0..300 events, any cutoff, any quotas) and check the
contracts every policy must keep: quotas, order, no future event, no event lost or duplicated, PE flags.
Example tests pin one hand-worked user per policy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redrec.config import from_dict, to_dict
from redrec.errors import ConfigError
from redrec.mixing import POLICIES, MixedSequence, MixingConfig, mix

QUOTA_POLICIES = ("2d", "naive", "1d_position", "1d_timestamp")
NAMES = ("homefeed", "ads", "search", "live")


# ---------------------------------------------------------------------------------------------------------------
# strategies and a pure-Python reference
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def scenarios_and_events(draw):
    n_scen = draw(st.integers(1, 4))
    scenarios = list(NAMES[:n_scen])
    events = draw(st.lists(st.integers(0, n_scen - 1), min_size=0, max_size=300))
    return scenarios, np.asarray(events, dtype=np.int8)


@st.composite
def mixing_configs(draw, scenarios, policies=POLICIES):
    """A config whose quotas (when given) name a random subset of ``scenarios`` in a random order."""
    policy = draw(st.sampled_from(policies))
    last_n = draw(st.integers(1, 200))
    fill = draw(st.booleans())
    if draw(st.booleans()):
        quotas = None
    else:
        named = draw(st.permutations(scenarios))
        named = named[: draw(st.integers(0, len(named)))]
        quotas = {s: draw(st.one_of(st.just(0), st.integers(0, 40), st.integers(0, 400))) for s in named}
    return MixingConfig(policy=policy, last_n=last_n, quotas=quotas, fill_unused=fill)


def clamp(cutoff: int, n: int) -> int:
    return min(max(cutoff, 0), n)


def quota_list(cfg: MixingConfig, scenarios: list[str]) -> list[int]:
    """Quota per scenario index, computed independently of :meth:`MixingConfig.resolve_quotas`."""
    if cfg.quotas is None:
        k = len(scenarios)
        return [cfg.last_n // k + (1 if i < cfg.last_n % k else 0) for i in range(k)]
    return [cfg.quotas.get(s, 0) for s in scenarios]


def reference_selection(events: np.ndarray, cutoff: int, cfg: MixingConfig, scenarios: list[str]) -> set[int]:
    """The set of positions a quota policy selects, by the definition (plain Python lists)."""
    c = clamp(cutoff, len(events))
    past = [int(s) for s in events[:c]]
    quotas = quota_list(cfg, scenarios)
    chosen: set[int] = set()
    unused = 0
    for s, q in enumerate(quotas):
        if q <= 0:
            continue
        pos = [j for j, x in enumerate(past) if x == s]
        take = pos[max(0, len(pos) - q) :]
        chosen.update(take)
        unused += q - len(take)
    if cfg.fill_unused and unused > 0:
        rest = [j for j, x in enumerate(past) if quotas[x] > 0 and j not in chosen]
        chosen.update(rest[max(0, len(rest) - unused) :])
    return chosen


def counts_by_scenario(idx: np.ndarray, events: np.ndarray, n_scen: int) -> list[int]:
    return [int(np.sum(events[idx] == s)) for s in range(n_scen)]


# ---------------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------------

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(data=st.data(), user=scenarios_and_events(), cutoff=st.integers(-20, 330))
def test_no_future_no_duplicates_and_pe_flags(data, user, cutoff):
    scenarios, events = user
    cfg = data.draw(mixing_configs(scenarios))
    seq = mix(events, cutoff, cfg, scenarios)
    c = clamp(cutoff, len(events))
    assert isinstance(seq, MixedSequence)
    assert seq.index.dtype == np.int64 and seq.index.ndim == 1
    assert len(seq) == seq.index.shape[0]
    # no event from the future (cutoff beyond n or negative is clamped)
    assert np.all(seq.index >= 0)
    assert np.all(seq.index < c)
    # no event duplicated
    assert len(np.unique(seq.index)) == len(seq)
    # position-embedding flags
    expected_flags = {
        "2d": (True, True),
        "timestamp": (True, True),
        "naive": (True, True),
        "1d_position": (True, False),
        "1d_timestamp": (False, True),
    }[cfg.policy]
    assert (seq.use_position, seq.use_time_gap) == expected_flags


@PROPS
@given(data=st.data(), user=scenarios_and_events(), cutoff=st.integers(-20, 330))
def test_quotas_respected_and_no_gaps(data, user, cutoff):
    scenarios, events = user
    cfg = data.draw(mixing_configs(scenarios, policies=QUOTA_POLICIES))
    seq = mix(events, cutoff, cfg, scenarios)
    c = clamp(cutoff, len(events))
    past = events[:c]
    quotas = quota_list(cfg, scenarios)
    available = [int(np.sum(past == s)) for s in range(len(scenarios))]
    counts = counts_by_scenario(seq.index, events, len(scenarios))

    for s, q in enumerate(quotas):
        if q == 0:
            assert counts[s] == 0, "a scenario with quota 0 (or not named) is left out"
        if cfg.fill_unused:
            assert counts[s] >= min(q, available[s])
        else:
            assert counts[s] <= q
            assert counts[s] == min(q, available[s])
    if cfg.fill_unused:
        assert len(seq) <= sum(quotas)
        # the unused slots are filled as far as the quota'd scenarios have events
        assert len(seq) == min(sum(quotas), sum(a for a, q in zip(available, quotas, strict=True) if q > 0))

    # no gaps: a scenario's selected events are exactly its most recent ones before the cutoff
    chosen = set(seq.index.tolist())
    for s in range(len(scenarios)):
        pos = np.flatnonzero(past == s).tolist()
        mine = sorted(j for j in chosen if events[j] == s)
        assert mine == pos[len(pos) - len(mine) :]

    assert chosen == reference_selection(events, cutoff, cfg, scenarios)


@PROPS
@given(data=st.data(), user=scenarios_and_events(), cutoff=st.integers(-20, 330))
def test_order(data, user, cutoff):
    scenarios, events = user
    cfg = data.draw(mixing_configs(scenarios))
    idx = mix(events, cutoff, cfg, scenarios).index
    c = clamp(cutoff, len(events))
    if cfg.policy == "timestamp":
        np.testing.assert_array_equal(idx, np.arange(c - min(cfg.last_n, c), c))
    elif cfg.policy == "naive":
        # blocks in quota order (the quotas dict's order, else the data's scenario order), each chronological
        block_names = list(cfg.quotas) if cfg.quotas is not None else scenarios
        rank = {scenarios.index(name): r for r, name in enumerate(block_names)}
        labels = [int(events[j]) for j in idx]
        ranks = [rank[s] for s in labels]
        assert ranks == sorted(ranks), "blocks out of quota order"
        for s in set(labels):
            block = [j for j in idx.tolist() if events[j] == s]
            assert all(a < b for a, b in zip(block, block[1:], strict=False))
            # a block is contiguous in the output
            where = [i for i, x in enumerate(labels) if x == s]
            assert where == list(range(where[0], where[0] + len(where)))
    else:
        assert np.all(np.diff(idx) > 0), "2d / 1d_* output must be strictly chronological"


@PROPS
@given(data=st.data(), user=scenarios_and_events(), cutoff=st.integers(-20, 330))
def test_quota_policies_select_the_same_events(data, user, cutoff):
    scenarios, events = user
    base = data.draw(mixing_configs(scenarios, policies=("2d",)))
    results = {}
    for policy in QUOTA_POLICIES:
        cfg = MixingConfig(
            policy=policy, last_n=base.last_n, quotas=base.quotas, fill_unused=base.fill_unused
        )
        results[policy] = mix(events, cutoff, cfg, scenarios).index
    # only the order (and the PE flags) differ between quota policies
    for policy in ("1d_position", "1d_timestamp"):
        np.testing.assert_array_equal(results[policy], results["2d"])
    np.testing.assert_array_equal(np.sort(results["naive"]), results["2d"])


@PROPS
@given(user=scenarios_and_events(), cutoff=st.integers(-20, 330), data=st.data())
def test_large_quotas_keep_every_past_event(user, cutoff, data):
    scenarios, events = user
    c = clamp(cutoff, len(events))
    named = data.draw(st.permutations(scenarios))
    named = named[: data.draw(st.integers(1, len(named)))]
    quotas = {s: int(np.sum(events[:c] == scenarios.index(s))) + data.draw(st.integers(0, 5)) for s in named}
    policy = data.draw(st.sampled_from(QUOTA_POLICIES))
    cfg = MixingConfig(policy=policy, quotas=quotas, fill_unused=data.draw(st.booleans()))
    got = set(mix(events, cutoff, cfg, scenarios).index.tolist())
    wanted = {j for j in range(c) if scenarios[events[j]] in quotas and quotas[scenarios[events[j]]] > 0}
    assert got == wanted


@PROPS
@given(user=scenarios_and_events(), cutoff=st.integers(-20, 330), last_n=st.integers(1, 400))
def test_timestamp_is_global_last_n(user, cutoff, last_n):
    scenarios, events = user
    c = clamp(cutoff, len(events))
    # quotas are ignored by the timestamp policy
    cfg = MixingConfig(policy="timestamp", last_n=last_n, quotas={scenarios[0]: 0}, fill_unused=True)
    idx = mix(events, cutoff, cfg, scenarios).index
    assert idx.tolist() == list(range(max(0, c - last_n), c))


@settings(max_examples=100, deadline=None)
@given(user=scenarios_and_events(), cutoff=st.integers(0, 300))
def test_scenario_array_dtype_does_not_matter(user, cutoff):
    scenarios, events = user
    cfg = MixingConfig(policy="naive", quotas={s: 7 for s in reversed(scenarios)}, fill_unused=True)
    ref = mix(events, cutoff, cfg, scenarios).index
    for dt in (np.int64, np.int32, np.uint8):
        np.testing.assert_array_equal(mix(events.astype(dt), cutoff, cfg, scenarios).index, ref)
    np.testing.assert_array_equal(mix(events.tolist(), cutoff, cfg, tuple(scenarios)).index, ref)


# ---------------------------------------------------------------------------------------------------------------
# hand-worked examples
# ---------------------------------------------------------------------------------------------------------------

SCEN = ["homefeed", "ads", "search"]
#                 0  1  2  3  4  5  6  7  8  9
EVENTS = np.array([0, 1, 0, 0, 1, 2, 0, 1, 1, 0], dtype=np.int8)  # h a h h a s h a a h
# before cutoff 9: homefeed at 0 2 3 6, ads at 1 4 7 8, search at 5; event 9 (homefeed) is the future.
QUOTAS = {"ads": 2, "homefeed": 3}  # search left out; ads named first (naive block order)


@pytest.mark.parametrize(
    "policy, expected, flags",
    [
        ("2d", [2, 3, 6, 7, 8], (True, True)),
        ("naive", [7, 8, 2, 3, 6], (True, True)),
        ("1d_position", [2, 3, 6, 7, 8], (True, False)),
        ("1d_timestamp", [2, 3, 6, 7, 8], (False, True)),
        ("timestamp", [5, 6, 7, 8], (True, True)),
    ],
)
def test_hand_worked_each_policy(policy, expected, flags):
    cfg = MixingConfig(policy=policy, last_n=4, quotas=QUOTAS)
    seq = mix(EVENTS, 9, cfg, SCEN)
    assert seq.index.tolist() == expected
    assert (seq.use_position, seq.use_time_gap) == flags


@pytest.mark.parametrize(
    "policy, expected",
    [
        # homefeed has 4 of its 6 slots filled: the 2 unused go to the most recent remaining ads events (4, 7)
        ("2d", [0, 2, 3, 4, 6, 7, 8]),
        ("naive", [0, 2, 3, 6, 4, 7, 8]),
        ("1d_position", [0, 2, 3, 4, 6, 7, 8]),
        ("1d_timestamp", [0, 2, 3, 4, 6, 7, 8]),
    ],
)
def test_hand_worked_fill_unused(policy, expected):
    quotas = {"homefeed": 6, "ads": 1}
    assert (
        mix(EVENTS, 9, MixingConfig(policy=policy, quotas=quotas, fill_unused=True), SCEN).index.tolist()
        == expected
    )
    without = mix(EVENTS, 9, MixingConfig(policy=policy, quotas=quotas), SCEN).index.tolist()
    assert without == [0, 2, 3, 6, 8]  # homefeed first in quota order, so naive happens to be chronological


@pytest.mark.parametrize(
    "policy, expected",
    [
        # no quotas: last_n = 5 split over 3 scenarios as 2, 2, 1 (data order)
        ("2d", [3, 5, 6, 7, 8]),
        ("naive", [3, 6, 7, 8, 5]),
        ("1d_position", [3, 5, 6, 7, 8]),
        ("1d_timestamp", [3, 5, 6, 7, 8]),
        ("timestamp", [4, 5, 6, 7, 8]),
    ],
)
def test_hand_worked_even_split(policy, expected):
    assert mix(EVENTS, 9, MixingConfig(policy=policy, last_n=5), SCEN).index.tolist() == expected


def test_hand_worked_zero_quota_and_cutoffs():
    cfg = MixingConfig(policy="naive", quotas={"ads": 0, "search": 5})
    assert mix(EVENTS, 9, cfg, SCEN).index.tolist() == [5]
    cfg = MixingConfig(policy="2d", quotas={"homefeed": 2, "ads": 1})
    assert mix(EVENTS, 100, cfg, SCEN).index.tolist() == [6, 8, 9]  # cutoff beyond n: all events are past
    assert mix(EVENTS, 10, cfg, SCEN).index.tolist() == [6, 8, 9]
    assert mix(EVENTS, 0, cfg, SCEN).index.tolist() == []
    assert mix(EVENTS, -3, cfg, SCEN).index.tolist() == []  # negative cutoff: nothing is past
    assert mix(EVENTS, 4, cfg, SCEN).index.tolist() == [1, 2, 3]
    assert mix(np.zeros(0, np.int8), 5, cfg, SCEN).index.tolist() == []
    assert mix(EVENTS, 9, MixingConfig(quotas={}), SCEN).index.tolist() == []


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------


def test_config_from_dict_roundtrip():
    cfg = from_dict(MixingConfig, {"policy": "naive", "last_n": 64, "quotas": {"ads": 32, "homefeed": 96}})
    assert cfg.policy == "naive" and list(cfg.quotas) == ["ads", "homefeed"]
    assert from_dict(MixingConfig, to_dict(cfg)) == cfg
    assert cfg.block_order(SCEN) == [1, 0]
    assert cfg.resolve_quotas(SCEN) == [96, 32, 0]


@pytest.mark.parametrize(
    "data, field",
    [
        ({"policy": "3d"}, "policy"),
        ({"policy": "Timestamp"}, "policy"),
        ({"last_n": 0}, "last_n"),
        ({"last_n": -5}, "last_n"),
        ({"quotas": {"ads": -1}}, "quotas.ads"),
        ({"quotas": {"ads": 1.5}}, "quotas"),  # a type error inside Optional[...] is reported on "quotas"
        ({"fill_unused": "yes"}, "fill_unused"),
        ({"quota": {"ads": 1}}, "quota"),
    ],
)
def test_config_errors(data, field):
    with pytest.raises(ConfigError) as e:
        from_dict(MixingConfig, data, source="mix.yaml")
    assert e.value.field.startswith(field)
    assert "mix.yaml" in str(e.value)


@pytest.mark.parametrize("policy", QUOTA_POLICIES)
def test_unknown_scenario_in_quotas(policy):
    cfg = from_dict(MixingConfig, {"policy": policy, "quotas": {"homefeed": 3, "video": 2}})
    with pytest.raises(ConfigError) as e:
        mix(EVENTS, 9, cfg, SCEN)
    assert e.value.field == "quotas.video"
    assert "homefeed" in e.value.problem
