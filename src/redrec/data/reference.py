"""Adapter for RedSeqRec's evaluation file ``user_lastn.json``.

Format (DESIGN.md section 3)::

    {user_id: {"homefeed_noteid_lastn": [ev, ...],      # history, oldest first
               "ads_click_noteid_lastn": [ev, ...],     # history, oldest first
               "ads_click_noteid_target": [ev, ...]}}   # held-out targets

with ``ev = {"note_id": str, "timestamp": int, "is_click": 0/1, ...}``.  Every key ending in ``_lastn`` is a
history list and every key ending in ``_target`` a target list; the scenario is the key's first word
(``homefeed``, ``ads``, ``search``, ...).  Target events are stored with ``target = 1`` so the ``reference``
evaluation protocol uses exactly them as targets and everything else as input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from redrec.data.schema import KNOWN_ACTIONS
from redrec.data.store import EventStore, EventStoreWriter, check_output
from redrec.errors import DataError


def _list_keys(data: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for rec in data.values():
        if isinstance(rec, dict):
            for k in rec:
                if (k.endswith("_lastn") or k.endswith("_target")) and k not in keys:
                    keys.append(k)
    return keys


def read_lastn_json(path: str | Path) -> dict:
    """The parsed ``user_lastn.json`` object ``{user_id: {list name: [event, ...]}}`` (shape not checked further).

    Raises:
        DataError: missing file, truncated or invalid JSON, not UTF-8, not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, None, f"invalid JSON (truncated file?): {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text: {e}") from None
    if not isinstance(data, dict):
        raise DataError(path, None, f"expected an object {{user_id: {{...}}}}, got a JSON {type(data).__name__}")
    return data


def import_reference_json(
    path: str | Path,
    out: str | Path,
    *,
    timestamp_unit: str = "auto",
    sort_events: bool = False,
    skip_empty_users: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> EventStore:
    """Import ``user_lastn.json`` into an event store (targets flagged in the ``target`` column)."""
    path = Path(path)
    check_output(out, overwrite)
    data = read_lastn_json(path)
    keys = _list_keys(data)
    if not any(k.endswith("_lastn") for k in keys):
        raise DataError(path, "homefeed_noteid_lastn", "no history list found (no key ending in '_lastn')")
    scen_of = {k: k.split("_")[0] for k in keys}
    scenarios: list[str] = []
    for k in keys:
        if scen_of[k] not in scenarios:
            scenarios.append(scen_of[k])
    # actions: every is_* flag seen in the first events (known ones first, in the canonical order)
    flags: set[str] = set()
    for rec in list(data.values())[:1000]:
        for k in keys:
            for ev in (rec.get(k) or [])[:50] if isinstance(rec, dict) else []:
                if isinstance(ev, dict):
                    flags.update(f[3:] for f in ev if f.startswith("is_"))
    actions = [a for a in KNOWN_ACTIONS if a in flags] + sorted(flags - set(KNOWN_ACTIONS))

    note_ids: dict[str, int] = {}
    uids: list[str] = []
    counts: list[int] = []
    cols: dict[str, list] = {"item": [], "scenario": [], "timestamp": [], "actions": [], "target": []}
    for uid, rec in tqdm(data.items(), desc=f"read {path.name}", disable=not progress):
        if not isinstance(rec, dict):
            raise DataError(path, str(uid), f"user {uid!r}: expected an object of lists, got {type(rec).__name__}")
        evs: list[tuple[int, int, int, int, int, int]] = []  # (ts, order, item, scen, actions, target)
        n_hist = 0
        for k in keys:
            lst = rec.get(k) or []
            if not isinstance(lst, list):
                raise DataError(path, k, f"user {uid!r}: expected a list, got {type(lst).__name__}")
            is_target = int(k.endswith("_target"))
            prev = None
            for j, ev in enumerate(lst):
                if not isinstance(ev, dict) or "note_id" not in ev:
                    raise DataError(path, f"{k}[{j}].note_id", f"user {uid!r}: event has no note_id")
                if "timestamp" not in ev:
                    raise DataError(path, f"{k}[{j}].timestamp", f"user {uid!r}: event has no timestamp")
                try:
                    ts = int(ev["timestamp"])
                except (TypeError, ValueError):
                    raise DataError(path, f"{k}[{j}].timestamp", f"user {uid!r}: not an integer: {ev['timestamp']!r}") from None
                if prev is not None and ts < prev and not sort_events:
                    raise DataError(
                        path, f"{k}[{j}].timestamp",
                        f"user {uid!r}: list is not oldest-first ({prev} then {ts})",
                        hint="pass --sort-events to sort it",
                    )
                prev = ts
                nid = str(ev["note_id"])
                item = note_ids.setdefault(nid, len(note_ids))
                mask = 0
                for b, a in enumerate(actions):
                    if ev.get(f"is_{a}"):
                        mask |= 1 << b
                evs.append((ts, len(evs), item, scenarios.index(scen_of[k]), mask, is_target))
                n_hist += 1 - is_target
        if n_hist == 0:
            if skip_empty_users:
                continue
            raise DataError(path, "history", f"user {uid!r} has an empty history (no *_lastn events)", hint="pass --skip-empty-users")
        evs.sort()  # chronological; ties keep the key order then list order
        uids.append(str(uid))
        counts.append(len(evs))
        for e in evs:
            cols["timestamp"].append(e[0])
            cols["item"].append(e[2])
            cols["scenario"].append(e[3])
            cols["actions"].append(e[4])
            cols["target"].append(e[5])

    ts = np.asarray(cols["timestamp"], dtype=np.int64)
    unit = timestamp_unit
    if unit == "auto":
        unit = "ms" if ts.size and np.median(ts) > 1e11 else "s"
    if unit == "ms":
        ts = ts // 1000
    source = {"adapter": "reference-json", "path": str(path), "keys": keys, "timestamp_unit": unit}
    with EventStoreWriter(
        out, scenarios=scenarios, actions=actions, time_unit="ordinal" if unit == "ordinal" else "seconds",
        source=source, overwrite=overwrite, sort_events=True, skip_empty_users=skip_empty_users,
        with_target=True, source_path=path,
    ) as w:
        w.add_items(pa.array(list(note_ids), pa.string()))
        w.add_users(
            pa.array(uids, pa.string()), counts, np.asarray(cols["item"], np.int64), np.asarray(cols["scenario"], np.int8),
            ts, np.asarray(cols["actions"], np.uint32), None, np.asarray(cols["target"], np.uint8),
        )
        return w.commit()
