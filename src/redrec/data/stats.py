"""Summary statistics of an event store (``redrec data stats``), computed in bounded-memory chunks."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from redrec.data.store import EventStore

_CHUNK_EVENTS = 20_000_000


def _user_blocks(store: EventStore) -> list[tuple[int, int]]:
    """User ranges [u0, u1) holding about _CHUNK_EVENTS events each."""
    offs = np.asarray(store.offsets)
    cuts = np.searchsorted(offs, np.arange(0, store.n_events + _CHUNK_EVENTS, _CHUNK_EVENTS), side="right") - 1
    cuts = np.unique(np.clip(np.append(cuts, store.n_users), 0, store.n_users))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=False) if b > a] or [(0, store.n_users)]


def store_stats(store: EventStore) -> dict[str, Any]:
    """Counts of users, items and events, per scenario and per action; history lengths; time span."""
    n_s = len(store.scenarios)
    lengths = store.history_lengths()
    ev_per_s = np.zeros(n_s, np.int64)
    users_per_s = np.zeros(n_s, np.int64)
    item_seen = np.zeros(store.n_items, bool)
    act_counts = np.zeros(len(store.actions_names), np.int64)
    tmin, tmax = None, None
    n_target = 0
    for u0, u1 in _user_blocks(store):
        a, b = int(store.offsets[u0]), int(store.offsets[u1])
        if b == a:
            continue
        sc = np.asarray(store.scenario[a:b])
        ev_per_s += np.bincount(sc, minlength=n_s)[:n_s]
        starts = np.asarray(store.offsets[u0:u1]) - a
        nonempty = lengths[u0:u1] > 0
        for s in range(n_s):
            hit = np.add.reduceat((sc == s).astype(np.int32), starts[nonempty]) > 0
            users_per_s[s] += int(hit.sum())
        item_seen[np.asarray(store.item[a:b])] = True
        acts = np.asarray(store.actions[a:b])
        for bit in range(len(act_counts)):
            act_counts[bit] += int(((acts >> np.uint32(bit)) & 1).sum())
        ts = np.asarray(store.timestamp[a:b])
        tmin = int(ts.min()) if tmin is None else min(tmin, int(ts.min()))
        tmax = int(ts.max()) if tmax is None else max(tmax, int(ts.max()))
        if store.target is not None:
            n_target += int(np.asarray(store.target[a:b]).sum())

    def when(t: int | None) -> Any:
        if t is None or store.time_unit == "ordinal":
            return t
        return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    return {
        "path": str(store.path),
        "users": store.n_users,
        "items": store.n_items,
        "items_with_events": int(item_seen.sum()),
        "events": store.n_events,
        "scenarios": {
            s: {"events": int(ev_per_s[i]), "users": int(users_per_s[i])} for i, s in enumerate(store.scenarios)
        },
        "history_length": {
            "min": int(lengths.min()) if lengths.size else 0,
            "median": float(np.median(lengths)) if lengths.size else 0.0,
            "mean": float(lengths.mean()) if lengths.size else 0.0,
            "p90": float(np.percentile(lengths, 90)) if lengths.size else 0.0,
            "max": int(lengths.max()) if lengths.size else 0,
        },
        "actions": {a: int(c) for a, c in zip(store.actions_names, act_counts, strict=True)},
        "time_unit": store.time_unit,
        "time_span": [when(tmin), when(tmax)],
        "item_fields": store.item_fields,
        "item_vector_dim": store.vector_dim,
        "target_events": n_target if store.target is not None else None,
    }


def format_stats(st: dict[str, Any]) -> str:
    """Human-readable multi-line summary."""
    lines = [
        f"event store {st['path']}",
        f"  users   {st['users']:>14,}",
        f"  items   {st['items']:>14,}   ({st['items_with_events']:,} with events)",
        f"  events  {st['events']:>14,}",
    ]
    if st["target_events"] is not None:
        lines.append(f"  targets {st['target_events']:>14,}   (held-out target events from the source)")
    h = st["history_length"]
    lines.append(f"  events per user: min {h['min']}, median {h['median']:.0f}, mean {h['mean']:.1f}, p90 {h['p90']:.0f}, max {h['max']}")
    lines.append(f"  time ({st['time_unit']}): {st['time_span'][0]} .. {st['time_span'][1]}")
    lines.append("  scenarios:")
    for s, v in st["scenarios"].items():
        lines.append(f"    {s:<16} {v['events']:>14,} events  {v['users']:>10,} users")
    if st["actions"]:
        lines.append("  actions: " + ", ".join(f"{a} {c:,}" for a, c in st["actions"].items()))
    if st["item_fields"]:
        lines.append("  item fields: " + ", ".join(st["item_fields"]))
    if st["item_vector_dim"]:
        lines.append(f"  item vectors: {st['item_vector_dim']}-d")
    return "\n".join(lines)
