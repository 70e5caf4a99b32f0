"""Tests of :mod:`redrec.features`: time-gap buckets, hour of day, action multi-hot, build_features."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redrec.config import from_dict
from redrec.data.store import UserEvents
from redrec.errors import ConfigError
from redrec.features import (
    UNKNOWN_HOUR,
    FeatureConfig,
    action_multihot,
    build_features,
    gap_bucket,
    hour_of_day,
)
from redrec.mixing import MixedSequence, MixingConfig, mix

I64_MIN, I64_MAX = -(2**63), 2**63 - 1

# ---------------------------------------------------------------------------------------------------------------
# gap_bucket
# ---------------------------------------------------------------------------------------------------------------


def ref_bucket(v: int, n_buckets: int) -> int:
    """1 + floor(log2 v) == v.bit_length() for v > 0, clipped to the last bucket; 0 for v <= 0."""
    return min(v.bit_length(), n_buckets - 1) if v > 0 else 0


def test_gap_bucket_small_values_by_hand():
    gaps = np.array([-(2**40), -1, 0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 1023, 1024, 1025])
    want = [0, 0, 0, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 10, 11, 11]
    assert gap_bucket(gaps, 64).tolist() == want
    assert gap_bucket(gaps).dtype == np.int64


@pytest.mark.parametrize("k", range(1, 63))
def test_gap_bucket_around_powers_of_two(k):
    gaps = np.array([2**k - 1, 2**k, 2**k + 1], dtype=np.int64)
    assert gap_bucket(gaps, 100).tolist() == [k, k + 1, k + 1]
    assert gap_bucket(-gaps, 100).tolist() == [0, 0, 0]
    assert gap_bucket(gaps, 32).tolist() == [min(k, 31), min(k + 1, 31), min(k + 1, 31)]


def test_gap_bucket_extremes_and_clipping():
    assert gap_bucket(np.array([I64_MAX, 2**62, 2**62 - 1, I64_MIN]), 100).tolist() == [63, 63, 62, 0]
    assert gap_bucket(np.array([I64_MAX, 2**40, 2**31, 2**30, 2**30 - 1]), 32).tolist() == [
        31,
        31,
        31,
        31,
        30,
    ]
    assert gap_bucket(np.array([0, 1, 2, 10**9]), 2).tolist() == [0, 1, 1, 1]
    assert gap_bucket(np.array([[1, 2], [0, -7]]), 8).tolist() == [[1, 2], [0, 0]]  # shape kept
    assert gap_bucket(np.zeros(0, np.int64)).shape == (0,)


near_powers = st.builds(lambda k, d: 2**k + d, st.integers(0, 62), st.integers(-1, 1))
any_gap = st.one_of(
    st.integers(I64_MIN, I64_MAX), st.integers(-5, 5), near_powers, near_powers.map(lambda x: -x)
)


@settings(max_examples=400, deadline=None)
@given(gaps=st.lists(any_gap, max_size=40), n_buckets=st.integers(2, 70))
def test_gap_bucket_matches_bit_length(gaps, n_buckets):
    got = gap_bucket(np.array(gaps, dtype=np.int64), n_buckets)
    assert got.tolist() == [ref_bucket(g, n_buckets) for g in gaps]
    assert np.all((got >= 0) & (got < n_buckets))


# ---------------------------------------------------------------------------------------------------------------
# hour_of_day
# ---------------------------------------------------------------------------------------------------------------


def ref_hour(t: int, tz: str) -> int:
    return datetime.fromtimestamp(t, tz=ZoneInfo(tz)).hour


def utc(s: str) -> int:
    return int(datetime.fromisoformat(s).replace(tzinfo=timezone.utc).timestamp())


def test_hour_of_day_utc():
    ts = np.array([0, 3599, 3600, 86399, 86400, utc("2024-07-01T13:45:00"), -1, -3600, -3601])
    assert hour_of_day(ts).tolist() == [0, 0, 1, 23, 0, 13, 23, 23, 22]
    assert hour_of_day(ts, "utc").tolist() == hour_of_day(ts, "UTC").tolist()
    assert hour_of_day(ts, "Etc/UTC").tolist() == hour_of_day(ts).tolist()
    assert hour_of_day(ts).dtype == np.int64


def test_hour_of_day_new_york_dst_switches():
    tz = "America/New_York"
    spring = utc("2024-03-10T07:00:00")  # 02:00 EST -> 03:00 EDT
    fall = utc("2024-11-03T06:00:00")  # 02:00 EDT -> 01:00 EST
    ts = np.array(
        [spring - 3601, spring - 1, spring, spring + 3600, fall - 3601, fall - 1, fall, fall + 3600]
    )
    assert hour_of_day(ts, tz).tolist() == [0, 1, 3, 4, 0, 1, 1, 2]
    window = np.concatenate(
        [np.arange(spring - 3 * 3600, spring + 3 * 3600, 60), np.arange(fall - 3 * 3600, fall + 3 * 3600, 60)]
    )
    assert hour_of_day(window, tz).tolist() == [ref_hour(int(t), tz) for t in window]


def test_hour_of_day_fixed_offset_shanghai():
    ts = np.array([0, utc("2024-01-01T15:59:59"), utc("2024-01-01T16:00:00"), utc("2024-07-01T00:30:00")])
    assert hour_of_day(ts, "Asia/Shanghai").tolist() == [8, 23, 0, 8]


def test_hour_of_day_half_hour_zone_dst_switch():
    # Australia/Adelaide (UTC+9:30 / +10:30) switches DST at half past a UTC hour: the offset changes inside
    # a UTC hour, so an offset looked up once per UTC hour is wrong for half of it.
    tz = "Australia/Adelaide"
    start = utc("2024-10-05T16:30:00")  # 02:00 ACST -> 03:00 ACDT
    end = utc("2024-04-06T16:30:00")  # 03:00 ACDT -> 02:00 ACST
    ts = np.array([start - 1, start, start + 1799, start + 3600, end - 1, end, end + 1800])
    assert hour_of_day(ts, tz).tolist() == [1, 3, 3, 4, 2, 2, 2]
    assert hour_of_day(np.array([utc("2024-01-01T00:00:00")]), "Asia/Kolkata").tolist() == [5]
    assert hour_of_day(
        np.array([utc("2024-01-01T00:14:59"), utc("2024-01-01T00:15:00")]), "Asia/Kathmandu"
    ).tolist() == [5, 6]


ZONES = [
    "UTC",
    "America/New_York",
    "Asia/Shanghai",
    "Australia/Adelaide",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Europe/London",
    "America/St_Johns",
    "Pacific/Chatham",
]


@pytest.mark.parametrize("tz", ZONES)
def test_hour_of_day_minute_scan_around_every_2024_transition(tz):
    zone = ZoneInfo(tz)
    hours = np.arange(utc("2024-01-01T00:00:00"), utc("2025-01-01T00:00:00"), 3600)
    offs = [datetime.fromtimestamp(int(h), tz=zone).utcoffset() for h in hours]
    switches = [int(hours[i]) for i in range(1, len(hours)) if offs[i] != offs[i - 1]]
    window = [np.arange(s - 2 * 3600, s + 2 * 3600, 60) for s in switches] or [hours[:100]]
    ts = np.concatenate(window)
    assert hour_of_day(ts, tz).tolist() == [ref_hour(int(t), tz) for t in ts]


@settings(max_examples=150, deadline=None)
@given(ts=st.lists(st.integers(-(2**31), 2**33), max_size=30), tz=st.sampled_from(ZONES))
def test_hour_of_day_matches_datetime(ts, tz):
    got = hour_of_day(np.array(ts, dtype=np.int64), tz)
    assert got.tolist() == [ref_hour(t, tz) for t in ts]


def test_hour_of_day_shapes():
    ts = np.array([[0, 3600], [7200, utc("2024-10-05T16:45:00")]])
    assert hour_of_day(ts, "Australia/Adelaide").tolist() == [[9, 10], [11, 3]]
    assert hour_of_day(np.zeros(0, np.int64), "Asia/Shanghai").shape == (0,)
    assert hour_of_day(np.zeros(0, np.int64)).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# action_multihot
# ---------------------------------------------------------------------------------------------------------------


def test_action_multihot_by_hand():
    masks = np.array([0, 1, 2, 5, 2**31, 2**32 - 1], dtype=np.uint32)
    got = action_multihot(masks, 3)
    assert got.dtype == np.float32 and got.shape == (6, 3)
    assert got.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1]]
    full = action_multihot(masks, 32)
    assert full[4].tolist() == [0.0] * 31 + [1.0]
    assert full[5].sum() == 32
    assert action_multihot(np.zeros(0, np.uint32), 4).shape == (0, 4)
    assert action_multihot(masks, 0).shape == (6, 0)


@settings(max_examples=200, deadline=None)
@given(masks=st.lists(st.integers(0, 2**32 - 1), max_size=20), n_actions=st.integers(0, 32))
def test_action_multihot_bits(masks, n_actions):
    got = action_multihot(np.array(masks, dtype=np.uint32), n_actions)
    assert got.shape == (len(masks), n_actions)
    for row, m in zip(got.tolist(), masks, strict=True):
        assert row == [float((m >> i) & 1) for i in range(n_actions)]


# ---------------------------------------------------------------------------------------------------------------
# build_features
# ---------------------------------------------------------------------------------------------------------------

BASE = utc("2024-01-01T00:00:00")
#                       0     1                 2          3                      4             5
OFFSETS = np.array([0, 5 * 3600 + 59, 13 * 3600, 23 * 3600 + 3599, 86400 + 60, 86400 + 7 * 3600])
SCENARIOS = ["homefeed", "ads"]


def make_user(timestamp: np.ndarray) -> UserEvents:
    return UserEvents(
        user_index=0,
        user_id="u0",
        item=np.array([10, 11, 12, 13, 14, 15], dtype=np.int32),
        scenario=np.array([0, 1, 0, 1, 0, 0], dtype=np.int8),
        timestamp=np.asarray(timestamp, dtype=np.int64),
        actions=np.array([0b1, 0b10, 0b101, 0, 2**31, 0b111], dtype=np.uint32),
        duration=np.full(6, np.nan, dtype=np.float32),
        target=None,
    )


def test_build_features_follows_mixed_order():
    user = make_user(BASE + OFFSETS)
    # naive blocks: homefeed (last 2: events 4, 5) then ads (last 2: events 1, 3)
    seq = mix(user.scenario, 6, MixingConfig(policy="naive", quotas={"homefeed": 2, "ads": 2}), SCENARIOS)
    assert seq.index.tolist() == [4, 5, 1, 3]
    t_now = BASE + 86400 + 7 * 3600 + 1
    f = build_features(user, seq, t_now, n_actions=3)
    assert set(f) == {"item", "scenario", "actions", "hour", "gap_bucket", "position", "timestamp", "age"}
    assert f["item"].tolist() == [14, 15, 11, 13]
    assert f["scenario"].tolist() == [0, 0, 1, 1]
    assert f["actions"].tolist() == [[0, 0, 0], [1, 1, 1], [0, 1, 0], [0, 0, 0]]
    assert f["hour"].tolist() == [0, 7, 5, 23]  # UTC
    # gaps: 25141 s, 1 s, 93542 s, 25202 s -> 1 + floor(log2 gap)
    assert f["gap_bucket"].tolist() == [15, 1, 17, 15]
    assert f["position"].tolist() == [0, 1, 2, 3]
    assert f["timestamp"].tolist() == (BASE + OFFSETS[[4, 5, 1, 3]]).tolist()
    assert f["age"].tolist() == (t_now - f["timestamp"]).tolist()
    for k in ("item", "scenario", "hour", "gap_bucket", "position", "timestamp", "age"):
        assert f[k].dtype == np.int64, k
    assert f["actions"].dtype == np.float32

    shanghai = build_features(user, seq, t_now, n_actions=3, cfg=FeatureConfig(timezone="Asia/Shanghai"))
    assert shanghai["hour"].tolist() == [8, 15, 13, 7]
    small = build_features(user, seq, t_now, n_actions=3, cfg=FeatureConfig(n_gap_buckets=16))
    assert small["gap_bucket"].tolist() == [15, 1, 15, 15]


def test_build_features_chronological_2d():
    user = make_user(BASE + OFFSETS)
    seq = mix(user.scenario, 5, MixingConfig(policy="2d", quotas={"homefeed": 2, "ads": 1}), SCENARIOS)
    assert seq.index.tolist() == [2, 3, 4]  # event 5 is after the cutoff
    f = build_features(user, seq, BASE + OFFSETS[5], n_actions=2)
    assert f["item"].tolist() == [12, 13, 14]
    assert f["position"].tolist() == [0, 1, 2]
    assert f["actions"].tolist() == [[1, 0], [0, 0], [0, 0]]


def test_build_features_disabled_pes_are_zero():
    user = make_user(BASE + OFFSETS)
    t_now = BASE + 86400 + 7 * 3600 + 1
    pos_only = mix(user.scenario, 6, MixingConfig(policy="1d_position", quotas={"homefeed": 3}), SCENARIOS)
    f = build_features(user, pos_only, t_now, n_actions=3)
    assert f["item"].tolist() == [12, 14, 15]
    assert f["position"].tolist() == [0, 1, 2]
    assert f["gap_bucket"].tolist() == [0, 0, 0]
    assert f["gap_bucket"].dtype == np.int64

    gap_only = mix(user.scenario, 6, MixingConfig(policy="1d_timestamp", quotas={"homefeed": 3}), SCENARIOS)
    f = build_features(user, gap_only, t_now, n_actions=3)
    assert f["position"].tolist() == [0, 0, 0]
    assert f["position"].dtype == np.int64
    assert f["gap_bucket"].tolist() == [16, 15, 1]  # gaps 64801, 25141, 1


def test_build_features_ordinal_store():
    user = make_user(np.arange(6))
    seq = MixedSequence(np.array([0, 2, 5], dtype=np.int64), True, True)
    f = build_features(
        user, seq, 6, n_actions=3, time_unit="ordinal", cfg=FeatureConfig(timezone="Asia/Shanghai")
    )
    assert f["hour"].tolist() == [UNKNOWN_HOUR] * 3 == [24, 24, 24]
    assert f["gap_bucket"].tolist() == [3, 3, 1]  # gaps 6, 4, 1 positions
    assert f["position"].tolist() == [0, 1, 2]
    assert f["timestamp"].tolist() == [0, 2, 5]


def test_build_features_empty_sequence():
    user = make_user(BASE + OFFSETS)
    f = build_features(user, MixedSequence(np.zeros(0, np.int64), True, True), BASE, n_actions=3)
    assert all(len(v) == 0 for v in f.values())
    assert f["actions"].shape == (0, 3)


# ---------------------------------------------------------------------------------------------------------------
# FeatureConfig validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "America", "", "../etc/passwd", "Asia/Shanghai/"])
def test_unknown_zone_is_a_config_error(tz):
    with pytest.raises(ConfigError) as e:
        from_dict(FeatureConfig, {"timezone": tz}, source="features.yaml")
    assert e.value.field == "timezone"
    assert "timezone" in str(e.value) and "features.yaml" in str(e.value)


def test_feature_config_validation():
    for tz in ("UTC", "utc", "Etc/UTC", "Asia/Shanghai", "America/New_York"):
        assert from_dict(FeatureConfig, {"timezone": tz}).timezone == tz
    with pytest.raises(ConfigError) as e:
        from_dict(FeatureConfig, {"n_gap_buckets": 1})
    assert e.value.field == "n_gap_buckets"
    with pytest.raises(ConfigError) as e:
        from_dict(FeatureConfig, {"timezone": 8})
    assert e.value.field == "timezone"
