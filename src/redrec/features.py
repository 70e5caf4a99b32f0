"""Event -> model inputs: item index, scenario id, action multi-hot, hour of day, time-gap bucket, position.

The user tower's input for event ``j`` (paper section 4.2) is the sum of an item vector and of embeddings of
the event's actions, hour of day, scenario and 2-D position ``PE_seq(j) + PE_gap(bucket(t_now - t_j))``.
This module computes the integer/multi-hot features; the embeddings live in the model.

Hours are computed in UTC unless a time zone is configured (the reference silently uses the host's zone).
Stores whose time unit is ``ordinal`` have no clock: their hour is the dedicated value :data:`UNKNOWN_HOUR`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from redrec.data.store import UserEvents
from redrec.errors import ConfigError
from redrec.mixing import MixedSequence

UNKNOWN_HOUR = 24  #: hour id for events without a wall-clock time (ordinal stores); the hour vocabulary is 25


@dataclass
class FeatureConfig:
    """Feature settings.

    Attributes:
        timezone: IANA zone name used for hour of day (``"UTC"`` default; e.g. ``"Asia/Shanghai"``).
        n_gap_buckets: number of log2 time-gap buckets. Bucket 0 is a gap <= 0; bucket b >= 1 holds gaps in
            ``[2**(b-1), 2**b)`` units (seconds, or positions for ordinal stores); the last bucket is open-ended.
    """

    timezone: str = "UTC"
    n_gap_buckets: int = 32

    def validate(self, source: str | None = None) -> None:
        try:
            _zone(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a zoneinfo directory such as 'America'
            raise ConfigError(source, "timezone", f"unknown time zone {self.timezone!r}") from None
        if self.n_gap_buckets < 2:
            raise ConfigError(source, "n_gap_buckets", f"must be >= 2, got {self.n_gap_buckets}")


@lru_cache(maxsize=16)
def _zone(name: str) -> ZoneInfo | None:
    return None if name.upper() == "UTC" else ZoneInfo(name)


def _utc_offset(t: int, zone: ZoneInfo) -> int:
    """UTC offset in seconds of zone ``zone`` at unix second ``t``."""
    off = datetime.fromtimestamp(t, tz=timezone.utc).astimezone(zone).utcoffset()
    return int(off.total_seconds()) if off is not None else 0


def hour_of_day(timestamp: np.ndarray, tz: str = "UTC") -> np.ndarray:
    """int64 hour in [0, 24) of unix-second timestamps in zone ``tz`` (DST-aware for IANA zones)."""
    ts = np.asarray(timestamp, dtype=np.int64)
    zone = _zone(tz)
    if zone is None:
        return (ts // 3600) % 24
    flat = ts.ravel()
    # One zone lookup per distinct UTC hour.  The offset is usually constant within a UTC hour, but not
    # always: zones with half-hour offsets switch DST at half past a UTC hour (Australia/Adelaide: 16:30 UTC).
    # Hours whose offset differs between their first and last second are resolved per timestamp.
    uniq, inv = np.unique(flat // 3600, return_inverse=True)
    inv = inv.ravel()
    start = np.array([_utc_offset(int(h) * 3600, zone) for h in uniq], dtype=np.int64)
    end = np.array([_utc_offset(int(h) * 3600 + 3599, zone) for h in uniq], dtype=np.int64)
    offs = start[inv]
    for i in np.flatnonzero((start != end)[inv]):
        offs[i] = _utc_offset(int(flat[i]), zone)
    return (((flat + offs) // 3600) % 24).reshape(ts.shape)


def gap_bucket(gap: np.ndarray, n_buckets: int = 32) -> np.ndarray:
    """Log-scale bucket of non-negative gaps: 0 for gap <= 0, else ``min(1 + floor(log2 gap), n_buckets - 1)``."""
    g = np.asarray(gap, dtype=np.int64)
    out = np.zeros(g.shape, dtype=np.int64)
    pos = g > 0
    out[pos] = np.minimum(1 + _floor_log2(g[pos]), n_buckets - 1)
    return out


def _floor_log2(x: np.ndarray) -> np.ndarray:
    """Exact ``floor(log2(x))`` of positive int64 values (``int.bit_length() - 1``): ``frexp``'s exponent below 2**53
    (where float64 holds every integer), a binary search on shifts above.

    Float ``log2`` misrounds near powers of two, and above 2**62 its correction overflowed the int64 shift.
    """
    x = np.asarray(x, dtype=np.int64)
    # below 2**53 the float64 conversion is exact, and frexp's exponent is bit_length
    r = np.frexp(x.astype(np.float64))[1].astype(np.int64) - 1
    huge = np.flatnonzero(x >= 2**53)
    if len(huge):
        y = x[huge].copy()
        e = np.zeros(len(huge), dtype=np.int64)
        for s in (32, 16, 8, 4, 2, 1):
            big = (y >> s) > 0
            e[big] += s
            y[big] >>= s
        r[huge] = e
    return r


def action_multihot(mask: np.ndarray, n_actions: int) -> np.ndarray:
    """float32 [L, n_actions] multi-hot from uint32 bit masks (bit i = action i)."""
    m = np.asarray(mask, dtype=np.uint32)
    bits = (m[:, None] >> np.arange(n_actions, dtype=np.uint32)[None, :]) & 1
    return bits.astype(np.float32)


def build_features(
    user: UserEvents,
    seq: MixedSequence,
    t_now: int,
    *,
    n_actions: int,
    time_unit: str = "seconds",
    cfg: FeatureConfig | None = None,
) -> dict[str, np.ndarray]:
    """Model inputs of one user's mixed sequence.

    Args:
        user: the user's events (oldest first).
        seq: the selected events (:func:`redrec.mixing.mix`).
        t_now: prediction time (unix seconds, or the ordinal of the prediction point for ordinal stores).
        n_actions: the store's number of action flags.
        time_unit: the store's time unit (``"seconds"`` or ``"ordinal"``).
        cfg: feature settings.

    Returns:
        dict of arrays, each of length L = ``len(seq)``:
        ``item`` int64 item index; ``scenario`` int64; ``actions`` float32 [L, n_actions] multi-hot;
        ``hour`` int64 in [0, 24] (24 = unknown); ``gap_bucket`` int64 in [0, n_gap_buckets) (all 0 when the
        policy has no time-gap PE); ``position`` int64 0..L-1 oldest first (all 0 when the policy has no
        position PE); ``timestamp`` int64 raw times (for diagnostics, not a model input); ``age`` int64
        ``t_now - t_j`` in store time units (the HSTU backbone's relative time bias reads its differences).
    """
    cfg = cfg or FeatureConfig()
    idx = seq.index
    L = len(idx)
    ts = np.asarray(user.timestamp[idx], dtype=np.int64)
    if time_unit == "ordinal":
        hour = np.full(L, UNKNOWN_HOUR, dtype=np.int64)
    else:
        hour = hour_of_day(ts, cfg.timezone)
    gap = gap_bucket(int(t_now) - ts, cfg.n_gap_buckets) if seq.use_time_gap else np.zeros(L, np.int64)
    position = np.arange(L, dtype=np.int64) if seq.use_position else np.zeros(L, np.int64)
    return {
        "item": np.asarray(user.item[idx], dtype=np.int64),
        "scenario": np.asarray(user.scenario[idx], dtype=np.int64),
        "actions": action_multihot(user.actions[idx], n_actions),
        "hour": hour,
        "gap_bucket": gap,
        "position": position,
        "timestamp": ts,
        "age": int(t_now) - ts,
    }
