"""Synthetic RED-MMU-shaped data: the embedded default of the demo and the tests.

:func:`write_synthetic` writes the two parquet files of RED-MMU (``note_embeddings.parquet`` and
``multiscene_lastn.parquet``, see DESIGN.md section 3) from a generative process built so that the things the
paper claims matter *measurably* matter here too: a user's interests are shared across scenarios (so modelling
homefeed helps predict ads), interests drift (so recent events predict better than old ones and a sequence
model beats mean pooling), and popularity explains part but not all of the data (so a popularity baseline is
beatable but not trivial).

Generative process
------------------
Topics.
    ``n_topics`` latent topics with unit centroids ``c_t`` (Gaussian, normalised) and a Zipf-like popularity
    ``pi_t``.
Items (notes).
    Item ``i`` has a topic ``z_i ~ pi`` (every topic gets at least one item), a log-normal popularity ``q_i``, a
    type (``video`` with probability ``video_fraction``, else ``normal``); a random ``ads_item_fraction`` of the
    items are ads notes (ads events only ever show those).  The feature is
    ``note_feature_i = normalise(c_{z_i} + feature_noise * g_i + feature_popularity * log(q_i) / popularity_sigma * e_q
    + feature_ads * [i is ads] * e_a)`` with ``g_i ~ N(0, I/d)`` and fixed random unit directions ``e_q`` ("quality")
    and ``e_a`` ("commercial content"): features carry the topic, some of the popularity and some of the ads-ness
    of a note (as content embeddings do), but not its identity, so a features-only item tower can beat a popularity
    baseline without memorising ids.  ``note_idx`` is a random permutation of ``0..n_items-1`` (so joining by
    ``note_idx`` is not the same as joining by row), ``encrypted_note_id`` a random hex string.
Users.
    Each user has ``1..max_interests`` interest topics (drawn without replacement by topic popularity) plus one
    *emerging* topic.  Interest weights interpolate over the data span from ``w_start`` (emerging weight 0) to
    ``w_end = (1 - drift) * w_start + drift * w_fresh``, where ``w_fresh`` keeps each start interest with
    probability 1/2 (turnover) and gives the emerging topic a large weight: at normalised time
    ``tau in [0, 1]`` the mixture is ``w(tau) = (1 - tau) w_start + tau w_end``.  The same mixture drives every
    scenario.  An activity level shared by the scenarios scales the per-scenario history lengths, which are
    log-normal (``length_sigma``; homefeed >> ads > search, heavy users have thousands of homefeed events when
    ``n_users`` is large), capped at ``max_len``.  Each user has a peak hour of day (evening-heavy) around which
    their sessions start.
Sessions and time.
    Every scenario's events come in sessions (geometric sizes: homefeed ~20, ads ~3, search ~3 events).  A
    session starts on a uniform day of the span at an hour drawn around the user's peak hour; events inside a
    session are seconds to minutes apart (the previous event's dwell plus an exponential gap), sessions are
    hours to days apart.  A share ``ads_in_feed`` of ads sessions happen inside one of the user's homefeed
    sessions (ads shown in the feed) and follow that session's topic: a short-range cross-scenario signal.
Topics of events.
    Each session has a topic drawn from ``w(tau)`` at its start.  Each event takes the session topic with a
    scenario-specific *focus* probability (homefeed 0.4, ads 0.7, search 0.9: a search session is about one
    current interest), else a popular topic ``~ pi`` with probability ``explore`` (homefeed; ads half of it,
    search a tenth: the popularity bias of the feed), else a fresh draw from ``w(tau)``.  The item is drawn
    within the topic proportionally to ``q_i ** popularity_alpha`` from the scenario's pool (ads: the ads notes;
    a topic without ads notes falls back to a popularity-weighted ads topic).
Actions.
    With ``a`` the user's weight on the event's topic relative to their top topic at that time (0 off-interest),
    ``is_click ~ Bernoulli(p0 + p1 a)`` (homefeed 0.2 + 0.6a; ads 0.75 + 0.2a: the ads lists are mostly clicks;
    search 0.55 + 0.35a); like / collect / share / comment / follow / message / click_profile / read_comment /
    videoend (video notes only) are conditional on a click with small rates growing with ``a``; ``is_hide``
    is rare and only on non-clicked events, more likely off-interest.  ``duration`` (seconds) is log-normal:
    ~1.5 s for a non-click, ~20 s times ``e^a`` for a click (longer for videos, shorter for ads).
    ``page_key`` is a small scenario-specific code; ``type`` the note type.

Lists are oldest first; ``timestamp`` is unix **milliseconds** as in the Xiaohongshu logs.  Users are generated
and written in chunks of ``users_per_chunk`` (one parquet row group each) with a random generator seeded by
``(seed, chunk)``, so memory stays flat in ``n_users`` and the output is a pure function of the config.
With ``write_truth`` the latent variables go to ``truth/items.parquet`` and ``truth/users.parquet`` (for
diagnostics and tests; the RED-MMU adapter ignores them).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from redrec.errors import ConfigError

#: Scenario names, in the order of the written list columns.
SYNTH_SCENARIOS = ("homefeed", "ads", "search")

#: Action flag fields written into every event struct (RED-MMU names), in order.
FLAG_FIELDS = (
    "is_click",
    "is_like",
    "is_collect",
    "is_share",
    "is_comment",
    "is_follow",
    "is_message",
    "is_hide",
    "is_click_profile",
    "is_read_comment",
    "is_videoend",
)

#: The event struct type of the ``*_list`` columns.
EVENT_STRUCT = pa.struct(
    [
        pa.field("item_id", pa.int64()),
        pa.field("timestamp", pa.int64()),
        pa.field("duration", pa.float32()),
        *[pa.field(f, pa.int8()) for f in FLAG_FIELDS],
        pa.field("page_key", pa.int32()),
        pa.field("type", pa.string()),
    ]
)

NOTES_FILE = "note_embeddings.parquet"
LASTN_FILE = "multiscene_lastn.parquet"
ITEM_TYPES = ("normal", "video")

# Per-scenario behaviour that is not worth a config knob: mean session size (events), mean gap between events
# of a session (seconds, on top of the previous dwell), session topic focus, exploration relative to
# ``SynthConfig.explore``, click probability p0 + p1 * affinity, dwell scale, page keys and their probabilities.
_SCENARIO = {
    "homefeed": dict(session=20.0, gap=20.0, focus=0.4, explore=1.0, click=(0.20, 0.60), dwell=1.0,
                     pages=((1, 2, 3), (0.8, 0.15, 0.05))),
    "ads": dict(session=3.0, gap=40.0, focus=0.7, explore=0.5, click=(0.75, 0.20), dwell=0.6,
                pages=((10, 11), (0.7, 0.3))),
    "search": dict(session=3.0, gap=15.0, focus=0.9, explore=0.1, click=(0.55, 0.35), dwell=1.0,
                   pages=((20, 21, 22), (0.6, 0.3, 0.1))),
}
# P(flag | click) = base + slope * affinity, for the engagement flags that need a click.
_CLICK_FLAGS = {
    "is_like": (0.04, 0.12),
    "is_collect": (0.02, 0.06),
    "is_share": (0.005, 0.015),
    "is_comment": (0.01, 0.02),
    "is_follow": (0.003, 0.01),
    "is_message": (0.001, 0.002),
    "is_click_profile": (0.02, 0.04),
    "is_read_comment": (0.05, 0.10),
}


@dataclass
class SynthConfig:
    """Size and shape of the synthetic data (defaults: 2,000 users x 8,000 notes, ~0.7M events, a few seconds).

    Attributes:
        n_users, n_items, n_topics: population sizes (``n_items >= n_topics``).
        dim: ``note_feature`` dimension (RED-MMU: 64).
        seed: everything is a pure function of the config.
        scenarios: which list columns to write (a subset of homefeed / ads / search; homefeed is required).
        homefeed_mean_len, ads_mean_len, search_mean_len: mean history length per user and scenario (before the
            ``max_len`` cap; 0 disables a scenario's events but keeps its column).
        length_sigma: log-normal sigma of the history lengths (heavy tail).
        activity_correlation: correlation of a user's log-lengths across scenarios (heavy users are heavy
            everywhere).
        min_homefeed_len: every user has at least this many homefeed events (so no history is empty).
        max_len: cap on each list's length (RED-MMU lists are "last n" snapshots).
        ads_item_fraction: share of the notes that are ads notes.
        max_interests: a user has 1..max_interests interest topics (plus one emerging topic).
        drift: 0 = static interests, 1 = the end-of-span mixture is independent of the start one.
        explore: share of homefeed events drawn from global topic popularity instead of the user's interests.
        ads_in_feed: share of ads sessions placed inside (and on the topic of) a homefeed session.
        popularity_sigma: log-normal sigma of item popularity.
        popularity_alpha: exponent on item popularity when drawing an item within a topic (0 = uniform).
        feature_noise: item noise relative to the topic centroid in ``note_feature`` (cosine to the centroid is
            about ``1 / sqrt(1 + feature_noise**2)``).
        feature_popularity: weight of standardised log-popularity along a shared "quality" direction of the
            features (0: features say nothing about popularity).
        feature_ads: weight of a shared "commercial" direction added to the features of ads notes.
        video_fraction: share of notes of type ``video``.
        start_time: unix seconds of the start of the span (default 2024-01-01 UTC).
        span_days: length of the span in days.
        users_per_chunk: users generated (and written as one parquet row group) at a time.
        write_truth: also write the latent topics / interests under ``truth/``.
    """

    n_users: int = 2000
    n_items: int = 8000
    n_topics: int = 32
    dim: int = 64
    seed: int = 0
    scenarios: list[str] = field(default_factory=lambda: list(SYNTH_SCENARIOS))
    homefeed_mean_len: float = 300.0
    ads_mean_len: float = 30.0
    search_mean_len: float = 12.0
    length_sigma: float = 1.0
    activity_correlation: float = 0.7
    min_homefeed_len: int = 5
    max_len: int = 5000
    ads_item_fraction: float = 0.15
    max_interests: int = 4
    drift: float = 1.0
    explore: float = 0.2
    ads_in_feed: float = 0.6
    popularity_sigma: float = 1.2
    popularity_alpha: float = 1.0
    feature_noise: float = 0.8
    feature_popularity: float = 0.3
    feature_ads: float = 0.3
    video_fraction: float = 0.3
    start_time: int = 1_704_067_200
    span_days: float = 60.0
    users_per_chunk: int = 500
    write_truth: bool = True

    def validate(self, source: str | None = None) -> None:
        def bad(name: str, problem: str) -> ConfigError:
            return ConfigError(source, name, f"{problem}, got {getattr(self, name)!r}")

        for name in ("n_users", "n_items", "n_topics", "dim", "max_len", "max_interests", "users_per_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be an integer >= 1")
        if self.n_items < self.n_topics:
            raise bad("n_items", f"must be >= n_topics ({self.n_topics})")
        if self.n_items >= 2**31 - 1:
            raise bad("n_items", "must be < 2**31 - 1")
        if not self.scenarios or len(set(self.scenarios)) != len(self.scenarios) or "homefeed" not in self.scenarios:
            raise bad("scenarios", f"must be distinct names from {list(SYNTH_SCENARIOS)} including 'homefeed'")
        unknown = [s for s in self.scenarios if s not in SYNTH_SCENARIOS]
        if unknown:
            raise bad("scenarios", f"unknown scenario {unknown[0]!r}; known: {list(SYNTH_SCENARIOS)}")
        for name in ("homefeed_mean_len", "ads_mean_len", "search_mean_len"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a finite number >= 0")
        if self.homefeed_mean_len < 1:
            raise bad("homefeed_mean_len", "must be >= 1")
        if not isinstance(self.min_homefeed_len, int) or not 1 <= self.min_homefeed_len <= self.max_len:
            raise bad("min_homefeed_len", f"must be an integer in [1, max_len={self.max_len}]")
        for name in ("ads_item_fraction",):
            if not 0 < getattr(self, name) <= 1:
                raise bad(name, "must be in (0, 1]")
        if round(self.ads_item_fraction * self.n_items) < 1:
            raise bad("ads_item_fraction", f"gives no ads note out of n_items={self.n_items}")
        for name in ("drift", "explore", "ads_in_feed", "video_fraction", "activity_correlation"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "must be in [0, 1]")
        for name in ("length_sigma", "popularity_sigma", "popularity_alpha", "feature_noise", "feature_popularity",
                     "feature_ads"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a finite number >= 0")
        if not self.span_days > 0:
            raise bad("span_days", "must be > 0")
        if not isinstance(self.start_time, int) or not 0 <= self.start_time < 4_000_000_000:
            raise bad("start_time", "must be unix seconds (an integer in [0, 4e9))")

    def mean_len(self, scenario: str) -> float:
        return float(getattr(self, f"{scenario}_mean_len"))


# -- small vectorised helpers -------------------------------------------------------------------------------------
def _hex_ids(rng: np.random.Generator, n: int, nbytes: int = 12) -> pa.StringArray:
    """``n`` random lowercase hex strings of ``2 * nbytes`` characters, built without a Python loop."""
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    lut = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    chars = np.empty((n, 2 * nbytes), dtype=np.uint8)
    chars[:, 0::2] = lut[raw >> 4]
    chars[:, 1::2] = lut[raw & 15]
    offsets = np.arange(n + 1, dtype=np.int32) * (2 * nbytes)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs`` [n, k] (rows sum to ~1)."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    return np.minimum((u[:, None] >= cdf).sum(axis=1), probs.shape[1] - 1)


def _segment_starts(counts: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return starts


class _PoolSampler:
    """Draws items of a given topic from a pool, proportionally to a weight, vectorised (searchsorted on a CDF).

    A topic with no item in the pool falls back to a topic drawn by the pool's topic mass.
    """

    def __init__(self, pool: np.ndarray, item_topic: np.ndarray, weight: np.ndarray, n_topics: int):
        order = pool[np.argsort(item_topic[pool], kind="stable")]
        self.items = order
        cum = np.cumsum(weight[order].astype(np.float64))
        self.cum = cum
        topics = item_topic[order]
        self.lo = np.searchsorted(topics, np.arange(n_topics), side="left")
        self.hi = np.searchsorted(topics, np.arange(n_topics), side="right")
        base = np.concatenate([[0.0], cum])
        self.mass_lo = base[self.lo]
        self.mass = base[self.hi] - self.mass_lo
        self.topic_p = self.mass / self.mass.sum()

    def sample(self, rng: np.random.Generator, topic: np.ndarray) -> np.ndarray:
        topic = topic.copy()
        empty = self.mass[topic] <= 0
        if empty.any():
            topic[empty] = rng.choice(len(self.mass), size=int(empty.sum()), p=self.topic_p)
        target = self.mass_lo[topic] + rng.random(len(topic)) * self.mass[topic]
        j = np.searchsorted(self.cum, target, side="right")
        j = np.clip(j, self.lo[topic], self.hi[topic] - 1)
        return self.items[j]


@dataclass
class _World:
    """Topics and items (shared by every user chunk)."""

    topic_pop: np.ndarray  # float64 [T]
    centroids: np.ndarray  # float32 [T, d]
    item_topic: np.ndarray  # int64 [N]
    item_pop: np.ndarray  # float64 [N]
    item_type: np.ndarray  # int8 [N] index into ITEM_TYPES
    is_ads: np.ndarray  # bool [N]
    note_idx: np.ndarray  # int64 [N]  note_idx of item row i
    samplers: dict[str, _PoolSampler]


def _make_world(cfg: SynthConfig) -> tuple[_World, pa.StringArray, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, 0])
    T, N, d = cfg.n_topics, cfg.n_items, cfg.dim
    topic_pop = 1.0 / np.arange(1, T + 1) ** 0.8
    topic_pop = rng.permutation(topic_pop / topic_pop.sum())
    centroids = rng.standard_normal((T, d))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    item_topic = np.concatenate([np.arange(T), rng.choice(T, size=N - T, p=topic_pop)])
    item_topic = rng.permutation(item_topic)
    item_pop = rng.lognormal(0.0, cfg.popularity_sigma, size=N)
    item_type = (rng.random(N) < cfg.video_fraction).astype(np.int8)
    n_ads = int(round(cfg.ads_item_fraction * N))
    is_ads = np.zeros(N, dtype=bool)
    is_ads[rng.choice(N, size=n_ads, replace=False)] = True
    note_idx = rng.permutation(N).astype(np.int64)
    ids = _hex_ids(rng, N)
    feats = np.empty((N, d), dtype=np.float32)
    quality, commercial = rng.standard_normal((2, d))
    quality /= np.linalg.norm(quality)
    commercial /= np.linalg.norm(commercial)
    z_pop = np.log(item_pop) / max(cfg.popularity_sigma, 1e-6)  # standardised log-popularity
    step = 200_000
    for a in range(0, N, step):  # bounded memory for very large item counts
        b = min(N, a + step)
        f = centroids[item_topic[a:b]] + cfg.feature_noise * rng.standard_normal((b - a, d)) / np.sqrt(d)
        f += cfg.feature_popularity * z_pop[a:b, None] * quality[None, :]
        f += cfg.feature_ads * is_ads[a:b, None] * commercial[None, :]
        feats[a:b] = f / np.linalg.norm(f, axis=1, keepdims=True)
    weight = item_pop**cfg.popularity_alpha
    samplers = {
        "all": _PoolSampler(np.arange(N), item_topic, weight, T),
        "ads": _PoolSampler(np.flatnonzero(is_ads), item_topic, weight, T),
    }
    world = _World(topic_pop, centroids.astype(np.float32), item_topic, item_pop, item_type, is_ads, note_idx, samplers)
    return world, ids, feats


def _lengths(cfg: SynthConfig, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    shared = rng.standard_normal(n)
    rho = cfg.activity_correlation
    out = {}
    for s in SYNTH_SCENARIOS:
        mean = cfg.mean_len(s)
        if s not in cfg.scenarios or mean <= 0:
            out[s] = np.zeros(n, dtype=np.int64)
            continue
        sig = cfg.length_sigma
        z = rho * shared + np.sqrt(1 - rho**2) * rng.standard_normal(n)
        lens = np.rint(np.exp(np.log(mean) - sig**2 / 2 + sig * z)).astype(np.int64)
        lo = cfg.min_homefeed_len if s == "homefeed" else 0
        out[s] = np.clip(lens, lo, cfg.max_len)
    return out


@dataclass
class _Users:
    topics: np.ndarray  # int64 [U, K+1]   interest topics; last slot = emerging topic
    w_start: np.ndarray  # float64 [U, K+1]
    w_end: np.ndarray  # float64 [U, K+1]
    peak_hour: np.ndarray  # float64 [U]

    def weights(self, user: np.ndarray, tau: np.ndarray) -> np.ndarray:
        return (1 - tau)[:, None] * self.w_start[user] + tau[:, None] * self.w_end[user]


def _make_users(cfg: SynthConfig, world: _World, rng: np.random.Generator, n: int) -> _Users:
    K = cfg.max_interests
    slots = min(K + 1, cfg.n_topics)
    # interest topics without replacement, by popularity (Gumbel top-k)
    keys = np.log(world.topic_pop)[None, :] + rng.gumbel(size=(n, cfg.n_topics))
    topics = np.argsort(-keys, axis=1)[:, :slots]
    n_int = 1 + rng.binomial(K - 1, 0.4, size=n) if K > 1 else np.ones(n, dtype=np.int64)
    n_int = np.minimum(n_int, slots - 1) if slots > 1 else np.ones(n, dtype=np.int64)
    k = np.arange(slots)[None, :]
    active = k < n_int[:, None]
    emerging = np.zeros((n, slots), dtype=bool)
    if slots > 1:
        emerging[:, -1] = True
    w_start = rng.gamma(1.0, size=(n, slots)) * active
    w_start /= w_start.sum(axis=1, keepdims=True)
    # the end mixture keeps each start interest with probability 1/2 (turnover) and adds the emerging topic
    kept = active & (rng.random((n, slots)) < 0.5)
    fresh = rng.gamma(1.0, size=(n, slots)) * kept + rng.gamma(2.0, size=(n, slots)) * emerging
    none = fresh.sum(axis=1) <= 0  # possible only with a single topic: nothing kept, no emerging slot
    fresh[none] = w_start[none]
    fresh /= fresh.sum(axis=1, keepdims=True)
    w_end = (1 - cfg.drift) * w_start + cfg.drift * fresh
    evening = rng.random(n) < 0.7
    peak = np.where(evening, 20.5 + 2.0 * rng.standard_normal(n), rng.uniform(0, 24, n)) % 24
    return _Users(topics, w_start, w_end, peak)


@dataclass
class _Scenario:
    """Flat events of one scenario for a chunk of users (grouped by user, oldest first after :func:`_finish`)."""

    user: np.ndarray
    ts_ms: np.ndarray
    item: np.ndarray
    duration: np.ndarray
    flags: dict[str, np.ndarray]
    page_key: np.ndarray
    session_start: np.ndarray  # per session (seconds)
    session_topic: np.ndarray  # per session
    session_user: np.ndarray  # per session
    counts: np.ndarray  # per user


def _sessions(rng: np.random.Generator, lens: np.ndarray, mean_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each user's events into sessions: returns (event -> session id, session -> user, event user)."""
    n = int(lens.sum())
    user = np.repeat(np.arange(len(lens)), lens)
    start = rng.random(n) < 1.0 / mean_size
    start[_segment_starts(lens)[lens > 0]] = True
    sess = np.cumsum(start) - 1
    return sess, user[start], user


def _gen_scenario(
    cfg: SynthConfig, world: _World, users: _Users, rng: np.random.Generator, name: str, lens: np.ndarray,
    feed: _Scenario | None,
) -> _Scenario:
    p = _SCENARIO[name]
    span_s = cfg.span_days * 86400.0
    sess, sess_user, user = _sessions(rng, lens, p["session"])
    n_sess = len(sess_user)
    n = len(user)

    # session start: a uniform day of the span at an hour around the user's peak hour
    day = np.floor(rng.random(n_sess) * cfg.span_days)
    hour = (users.peak_hour[sess_user] + 2.5 * rng.standard_normal(n_sess)) % 24
    start = cfg.start_time + day * 86400.0 + hour * 3600.0
    start = np.minimum(start, cfg.start_time + span_s - 1)
    tau = np.clip((start - cfg.start_time) / span_s, 0.0, 1.0)
    w_sess = users.weights(sess_user, tau)
    topic_sess = users.topics[sess_user, _categorical(rng, w_sess)]
    if name == "ads" and feed is not None and cfg.ads_in_feed > 0 and len(feed.session_user):
        # ads inside one of the user's homefeed sessions, on that session's topic
        f_counts = np.bincount(feed.session_user, minlength=len(lens))
        f_first = _segment_starts(f_counts)
        in_feed = (rng.random(n_sess) < cfg.ads_in_feed) & (f_counts[sess_user] > 0)
        pick = f_first[sess_user] + np.floor(rng.random(n_sess) * f_counts[sess_user]).astype(np.int64)
        pick = np.minimum(pick, len(feed.session_user) - 1)
        start = np.where(in_feed, feed.session_start[pick] + rng.uniform(0, 300, n_sess), start)
        topic_sess = np.where(in_feed, feed.session_topic[pick], topic_sess)
        tau = np.clip((start - cfg.start_time) / span_s, 0.0, 1.0)

    # event topics: session focus / popularity exploration / fresh interest draw
    tau_ev = tau[sess]
    w_ev = users.weights(user, tau_ev)
    r = rng.random(n)
    explore = cfg.explore * p["explore"]
    focus = r < p["focus"]
    pop = (~focus) & (r < p["focus"] + (1 - p["focus"]) * explore)
    topic = users.topics[user, _categorical(rng, w_ev)]
    topic = np.where(focus, topic_sess[sess], topic)
    if pop.any():
        topic[pop] = rng.choice(cfg.n_topics, size=int(pop.sum()), p=world.topic_pop)
    item = world.samplers["ads" if name == "ads" else "all"].sample(rng, topic)
    topic = world.item_topic[item]  # the ads fallback may have changed it

    # affinity of the event's topic to the user now, relative to their top topic
    match = users.topics[user] == topic[:, None]
    aff = (w_ev * match).sum(axis=1) / np.maximum(w_ev.max(axis=1), 1e-12)

    click = rng.random(n) < p["click"][0] + p["click"][1] * aff
    flags = {"is_click": click}
    for f, (b, s) in _CLICK_FLAGS.items():
        flags[f] = click & (rng.random(n) < b + s * aff)
    video = world.item_type[item] == 1
    flags["is_videoend"] = click & video & (rng.random(n) < 0.25 + 0.35 * aff)
    flags["is_hide"] = (~click) & (rng.random(n) < 0.002 + 0.03 * (1 - aff))
    mu = np.where(click, np.log(20.0) + aff + 0.5 * video, np.log(1.5))
    sig = np.where(click, 0.7, 0.5)
    duration = np.minimum(np.exp(mu + sig * rng.standard_normal(n)) * p["dwell"], 3600.0)

    # time inside a session: previous dwell + exponential gap
    gap = np.empty(n)
    gap[0:1] = 0.0
    gap[1:] = duration[:-1] + 1.0 + rng.exponential(p["gap"], max(n - 1, 0))
    first = np.ones(n, dtype=bool)
    first[1:] = sess[1:] != sess[:-1]
    gap[first] = 0.0
    csum = np.cumsum(gap)
    offset = csum - csum[np.flatnonzero(first)][sess]
    ts_ms = np.rint((start[sess] + offset) * 1000.0).astype(np.int64)

    keys, probs = p["pages"]
    page_key = np.asarray(keys, dtype=np.int32)[rng.choice(len(keys), size=n, p=probs)]
    return _Scenario(user, ts_ms, item, duration.astype(np.float32), flags, page_key, start, topic_sess, sess_user,
                     lens)


def _finish(sc: _Scenario) -> None:
    """Sort each user's events chronologically (sessions may overlap)."""
    order = np.lexsort((sc.ts_ms, sc.user))
    sc.user, sc.ts_ms, sc.item, sc.duration, sc.page_key = (
        a[order] for a in (sc.user, sc.ts_ms, sc.item, sc.duration, sc.page_key)
    )
    sc.flags = {k: v[order] for k, v in sc.flags.items()}


_TYPE_DICT = pa.array(list(ITEM_TYPES), type=pa.string())


def _list_column(sc: _Scenario, world: _World) -> pa.ListArray:
    n = len(sc.item)
    children = [
        pa.array(world.note_idx[sc.item], type=pa.int64()),
        pa.array(sc.ts_ms, type=pa.int64()),
        pa.array(sc.duration, type=pa.float32()),
        *[pa.array(sc.flags[f].astype(np.int8), type=pa.int8()) for f in FLAG_FIELDS],
        pa.array(sc.page_key, type=pa.int32()),
        _TYPE_DICT.take(pa.array(world.item_type[sc.item].astype(np.int32))) if n else pa.array([], pa.string()),
    ]
    values = pa.StructArray.from_arrays(children, fields=list(EVENT_STRUCT))
    offsets = np.zeros(len(sc.counts) + 1, dtype=np.int32)
    np.cumsum(sc.counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


@contextlib.contextmanager
def _atomic_parquet(path: Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A ParquetWriter on a temporary sibling of ``path``, renamed onto ``path`` only if the block succeeds."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with pq.ParquetWriter(tmp, schema) as w:
            yield w
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_synthetic(out_dir: str | Path, cfg: SynthConfig | None = None) -> dict[str, Any]:
    """Write RED-MMU-shaped parquet files into ``out_dir`` (created if needed; existing files are replaced).

    Files: ``note_embeddings.parquet`` (``encrypted_note_id: string, note_idx: int64, note_feature:
    list<float32>[dim]``) and ``multiscene_lastn.parquet`` (``encrypted_user_id: string, user_idx: int64`` and one
    ``<scenario>_list: list<struct>`` column per scenario, struct fields as :data:`EVENT_STRUCT`, oldest first,
    ``timestamp`` in unix milliseconds), plus ``truth/items.parquet`` and ``truth/users.parquet`` when
    ``cfg.write_truth``.  Each file is written under a temporary name and renamed into place when complete.

    Returns:
        a summary: ``paths``, ``n_users``, ``n_items``, ``n_ads_items``, ``events`` per scenario, ``n_events``,
        ``row_groups``, ``seconds``.
    """
    cfg = cfg or SynthConfig()
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world, note_ids, feats = _make_world(cfg)

    paths = {"notes": str(out / NOTES_FILE), "lastn": str(out / LASTN_FILE)}
    notes_schema = pa.schema(
        [("encrypted_note_id", pa.string()), ("note_idx", pa.int64()), ("note_feature", pa.list_(pa.float32()))]
    )
    with _atomic_parquet(out / NOTES_FILE, notes_schema) as w:
        step = 250_000
        for a in range(0, cfg.n_items, step):
            b = min(cfg.n_items, a + step)
            flat = pa.array(feats[a:b].reshape(-1), type=pa.float32())
            offs = pa.array(np.arange(b - a + 1, dtype=np.int32) * cfg.dim, type=pa.int32())
            w.write_table(pa.table(
                [note_ids.slice(a, b - a), pa.array(world.note_idx[a:b]), pa.ListArray.from_arrays(offs, flat)],
                schema=notes_schema,
            ))

    scen = [s for s in SYNTH_SCENARIOS if s in cfg.scenarios]
    lastn_schema = pa.schema(
        [("encrypted_user_id", pa.string()), ("user_idx", pa.int64())]
        + [(f"{s}_list", pa.list_(EVENT_STRUCT)) for s in scen]
    )
    users_schema = pa.schema([
        ("user_idx", pa.int64()), ("interest_topics", pa.list_(pa.int64())), ("w_start", pa.list_(pa.float64())),
        ("w_end", pa.list_(pa.float64())), ("peak_hour", pa.float64()),
    ])
    truth_dir = out / "truth"
    if cfg.write_truth:
        truth_dir.mkdir(exist_ok=True)
    else:  # never leave latent variables of another config next to this data
        for name in ("items.parquet", "users.parquet"):
            (truth_dir / name).unlink(missing_ok=True)
    events = dict.fromkeys(scen, 0)
    n_chunks = 0
    with contextlib.ExitStack() as stack:
        w = stack.enter_context(_atomic_parquet(out / LASTN_FILE, lastn_schema))
        uw = stack.enter_context(_atomic_parquet(truth_dir / "users.parquet", users_schema)) if cfg.write_truth else None
        for c, u0 in enumerate(range(0, cfg.n_users, cfg.users_per_chunk)):
            u1 = min(cfg.n_users, u0 + cfg.users_per_chunk)
            rng = np.random.default_rng([cfg.seed, 1, c])
            n = u1 - u0
            lens = _lengths(cfg, rng, n)
            users = _make_users(cfg, world, rng, n)
            uid = _hex_ids(rng, n)
            cols: list[pa.Array] = [uid, pa.array(np.arange(u0, u1, dtype=np.int64))]
            feed = None
            for s in scen:
                sc = _gen_scenario(cfg, world, users, rng, s, lens[s], feed)
                if s == "homefeed":
                    feed = sc
                _finish(sc)
                cols.append(_list_column(sc, world))
                events[s] += len(sc.item)
            w.write_table(pa.table(cols, schema=lastn_schema))
            n_chunks += 1
            if uw is not None:
                k = users.topics.shape[1]
                offs = pa.array(np.arange(n + 1, dtype=np.int32) * k)
                uw.write_table(pa.table([
                    pa.array(np.arange(u0, u1, dtype=np.int64)),
                    pa.ListArray.from_arrays(offs, pa.array(users.topics.reshape(-1).astype(np.int64))),
                    pa.ListArray.from_arrays(offs, pa.array(users.w_start.reshape(-1))),
                    pa.ListArray.from_arrays(offs, pa.array(users.w_end.reshape(-1))),
                    pa.array(users.peak_hour),
                ], schema=users_schema))
    if cfg.write_truth:
        items = pa.table({
            "note_idx": world.note_idx,
            "topic": world.item_topic.astype(np.int64),
            "popularity": world.item_pop,
            "is_ads": world.is_ads,
            "type": _TYPE_DICT.take(pa.array(world.item_type.astype(np.int32))),
        })
        with _atomic_parquet(truth_dir / "items.parquet", items.schema) as iw:
            iw.write_table(items)
        paths["truth_items"] = str(truth_dir / "items.parquet")
        paths["truth_users"] = str(truth_dir / "users.parquet")
    return {
        "out_dir": str(out),
        "paths": paths,
        "n_users": cfg.n_users,
        "n_items": cfg.n_items,
        "n_ads_items": int(world.is_ads.sum()),
        "events": events,
        "n_events": int(sum(events.values())),
        "row_groups": n_chunks,
        "seconds": round(time.perf_counter() - t0, 3),
    }
