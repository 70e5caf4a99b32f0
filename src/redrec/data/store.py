"""The canonical event store: columnar event files with per-user offsets, memory-mapped on read.

Layout of a store directory (every array is raw little-endian binary, dtype and length in ``meta.json``)::

    meta.json             counts, scenario names, action names (bit order), time unit, source, item fields
    users.parquet         user_id (string); row u is user index u
    offsets.i64           int64 [n_users + 1]; user u owns events offsets[u]:offsets[u+1]
    events/item.i32       int32 [n_events]   item index (row of items.parquet)
    events/scenario.i8    int8  [n_events]   index into meta.scenarios
    events/timestamp.i64  int64 [n_events]   unix seconds, or an ordinal when time_unit == "ordinal"
    events/actions.u32    uint32 [n_events]  bit i set <=> action meta.actions[i] happened
    events/duration.f32   float32 [n_events] dwell seconds, NaN when unknown
    events/target.u8      uint8 [n_events]   (optional) 1 = held-out target from the source (reference json)
    items.parquet         item_id (string) + optional text fields
    item_vectors.f32      float32 [n_items, vector_dim] (optional) precomputed item vectors

Within a user, events are in chronological order (non-decreasing timestamp).  Stores are written by
:class:`EventStoreWriter` into a temporary sibling directory that is renamed into place on commit, so a
failed import never leaves a half-written store and never touches an existing one.  Appends stream to
disk in bounded chunks: memory stays flat whatever the number of events (RED-MMU: ~700M).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from redrec.data.schema import MAX_ACTIONS, TIME_UNITS
from redrec.errors import DataError

FORMAT = "redrec-event-store"
VERSION = 1

EVENT_COLUMNS: dict[str, np.dtype] = {
    "item": np.dtype("<i4"),
    "scenario": np.dtype("i1"),
    "timestamp": np.dtype("<i8"),
    "actions": np.dtype("<u4"),
    "duration": np.dtype("<f4"),
}
TARGET_DTYPE = np.dtype("u1")
_SUFFIX = {"<i4": "i32", "|i1": "i8", "<i8": "i64", "<u4": "u32", "<f4": "f32", "|u1": "u8"}


def _colfile(name: str, dtype: np.dtype) -> str:
    return f"events/{name}.{_SUFFIX[dtype.str]}"


def _memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


@dataclass
class UserEvents:
    """One user's events, oldest first (array views into the store; do not write)."""

    user_index: int
    user_id: str
    item: np.ndarray  # int32 [n]
    scenario: np.ndarray  # int8 [n]
    timestamp: np.ndarray  # int64 [n]
    actions: np.ndarray  # uint32 [n]
    duration: np.ndarray  # float32 [n]
    target: np.ndarray | None  # uint8 [n] or None

    def __len__(self) -> int:
        return int(self.item.shape[0])


class EventStore:
    """Read-only view of an event store directory.  Arrays are memory-mapped; nothing is loaded eagerly.

    Attributes:
        path: the store directory.
        meta: the parsed ``meta.json``.
        offsets: int64 [n_users + 1].
        item, scenario, timestamp, actions, duration: per-event columns (see module docstring).
        target: uint8 [n_events] or ``None``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise DataError(self.path, None, "not an event store (no meta.json); build one with `redrec data import`")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(meta_path, None, f"corrupt meta.json: {e}") from None
        if self.meta.get("format") != FORMAT:
            raise DataError(meta_path, "format", f"expected {FORMAT!r}, got {self.meta.get('format')!r}")
        n_u, n_e = self.n_users, self.n_events
        self.offsets = _memmap(self.path / "offsets.i64", np.dtype("<i8"), (n_u + 1,))
        if n_u == 0:
            self.offsets = np.zeros(1, dtype=np.int64)
        for name, dt in EVENT_COLUMNS.items():
            setattr(self, name, _memmap(self.path / _colfile(name, dt), dt, (n_e,)))
        self.target = (
            _memmap(self.path / _colfile("target", TARGET_DTYPE), TARGET_DTYPE, (n_e,)) if self.meta.get("has_target") else None
        )

    @classmethod
    def open(cls, path: str | Path) -> EventStore:
        return cls(path)

    # -- sizes and names ---------------------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return int(self.meta["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def n_events(self) -> int:
        return int(self.meta["n_events"])

    @property
    def scenarios(self) -> list[str]:
        return list(self.meta["scenarios"])

    @property
    def actions_names(self) -> list[str]:
        return list(self.meta["actions"])

    @property
    def time_unit(self) -> str:
        return str(self.meta["time_unit"])

    @property
    def item_fields(self) -> list[str]:
        return list(self.meta.get("item_fields", []))

    @property
    def vector_dim(self) -> int:
        return int(self.meta.get("item_vector_dim") or 0)

    def scenario_index(self, name: str) -> int:
        try:
            return self.scenarios.index(name)
        except ValueError:
            raise DataError(self.path, "scenario", f"unknown scenario {name!r}; this store has {self.scenarios}") from None

    # -- users and items ---------------------------------------------------------------------------------------
    @cached_property
    def user_ids(self) -> np.ndarray:
        """object array of user id strings, index = user index."""
        return pq.read_table(self.path / "users.parquet", columns=["user_id"]).column(0).to_numpy(zero_copy_only=False)

    @cached_property
    def item_ids(self) -> np.ndarray:
        """object array of item id strings, index = item index."""
        return pq.read_table(self.path / "items.parquet", columns=["item_id"]).column(0).to_numpy(zero_copy_only=False)

    def items_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        return pq.read_table(self.path / "items.parquet", columns=list(columns) if columns else None)

    @cached_property
    def item_vectors(self) -> np.ndarray | None:
        """float32 [n_items, vector_dim] memory-map, or ``None`` when the store has no item vectors."""
        if not self.vector_dim:
            return None
        return _memmap(self.path / "item_vectors.f32", np.dtype("<f4"), (self.n_items, self.vector_dim))

    @cached_property
    def _user_lookup(self) -> pa.Array:
        return pa.array(self.user_ids, type=pa.string())

    def user_index(self, user_ids: str | Sequence[str]) -> np.ndarray:
        """Indices of ``user_ids`` (-1 for unknown ids)."""
        ids = [user_ids] if isinstance(user_ids, str) else list(user_ids)
        idx = pc.index_in(pa.array(ids, type=pa.string()), value_set=self._user_lookup)
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    @cached_property
    def _item_lookup(self) -> pa.Array:
        return pa.array(self.item_ids, type=pa.string())

    def item_index(self, item_ids: Sequence[str]) -> np.ndarray:
        """Indices of ``item_ids`` (-1 for unknown ids)."""
        idx = pc.index_in(pa.array([str(i) for i in item_ids], type=pa.string()), value_set=self._item_lookup)
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def history_lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    def user(self, u: int) -> UserEvents:
        """Events of user index ``u`` (views, oldest first)."""
        if not 0 <= u < self.n_users:
            raise IndexError(f"user index {u} out of range [0, {self.n_users})")
        a, b = int(self.offsets[u]), int(self.offsets[u + 1])
        return UserEvents(
            user_index=u,
            user_id=str(self.user_ids[u]),
            item=self.item[a:b],
            scenario=self.scenario[a:b],
            timestamp=self.timestamp[a:b],
            actions=self.actions[a:b],
            duration=self.duration[a:b],
            target=None if self.target is None else self.target[a:b],
        )

    def __len__(self) -> int:
        return self.n_users

    def __repr__(self) -> str:
        return (
            f"EventStore({str(self.path)!r}, users={self.n_users:,}, items={self.n_items:,}, "
            f"events={self.n_events:,}, scenarios={self.scenarios})"
        )


def check_output(out: str | Path, overwrite: bool) -> None:
    """Fail fast (before any reading) when ``out`` exists and may not be replaced."""
    if Path(out).exists() and not overwrite:
        raise DataError(out, None, "output already exists", hint="pass --overwrite to replace it")


class EventStoreWriter:
    """Streams users' events and an item table into a new store, atomically.

    Usage::

        with EventStoreWriter(out, scenarios=["homefeed", "ads"], actions=["click", "like"]) as w:
            w.add_items(["n1", "n2"], fields={"title": ["a", "b"]}, vectors=np.zeros((2, 64), "f4"))
            w.add_users(["u1"], counts=[2], item=[0, 1], scenario=[0, 1], timestamp=[10, 20])
            store = w.commit()

    Leaving the ``with`` block without :meth:`commit` (e.g. on an exception) deletes everything written.

    Args:
        out: final store directory.  Must not exist unless ``overwrite``.
        scenarios: scenario names; event ``scenario`` values index this list.
        actions: action names in bit order (at most 32).
        time_unit: ``"seconds"`` (unix) or ``"ordinal"`` (order only).
        source: provenance recorded in ``meta.json`` (adapter name, input path, options).
        sort_events: sort each user's events by time instead of rejecting out-of-order input.
        skip_empty_users: drop users with no events instead of rejecting them.
        with_target: the source marks held-out target events (``target`` column).
        source_path: the input file named in error messages.
        chunk_events: events buffered in memory before a flush to disk.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        scenarios: Sequence[str],
        actions: Sequence[str] = (),
        time_unit: str = "seconds",
        source: dict[str, Any] | None = None,
        overwrite: bool = False,
        sort_events: bool = False,
        skip_empty_users: bool = False,
        with_target: bool = False,
        source_path: str | Path | None = None,
        chunk_events: int = 4_000_000,
    ):
        self.out = Path(out)
        check_output(self.out, overwrite)
        if time_unit not in TIME_UNITS:
            raise ValueError(f"time_unit must be one of {TIME_UNITS}, got {time_unit!r}")
        if len(actions) > MAX_ACTIONS:
            raise DataError(source_path, "actions", f"{len(actions)} action flags; at most {MAX_ACTIONS} are supported")
        if not scenarios or len(scenarios) > 127:
            raise DataError(source_path, "scenario", f"need 1..127 scenarios, got {len(scenarios)}")
        self.scenarios = list(scenarios)
        self.actions = list(actions)
        self.time_unit = time_unit
        self.source = dict(source or {})
        self.overwrite = overwrite
        self.sort_events = sort_events
        self.skip_empty_users = skip_empty_users
        self.with_target = with_target
        self.source_path = source_path
        self.chunk_events = chunk_events

        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        (self.tmp / "events").mkdir(parents=True)
        self._files = {name: open(self.tmp / _colfile(name, dt), "wb") for name, dt in EVENT_COLUMNS.items()}
        if with_target:
            self._files["target"] = open(self.tmp / _colfile("target", TARGET_DTYPE), "wb")
        self._counts: list[np.ndarray] = []
        self._user_ids: list[pa.Array] = []
        self._n_events = 0
        self._n_skipped_empty = 0
        self._n_sorted_users = 0
        self._items_writer: pq.ParquetWriter | None = None
        self._item_schema: pa.Schema | None = None
        self._vec_file = None
        self._vector_dim = 0
        self._n_items = 0
        self._item_fields: list[str] = []
        self._done = False

    # -- items ------------------------------------------------------------------------------------------------
    def add_items(
        self,
        item_ids: Sequence[Any] | pa.Array,
        fields: dict[str, Sequence[Any] | pa.Array] | None = None,
        vectors: np.ndarray | None = None,
    ) -> None:
        """Append items (in index order).  Ids are stored as strings; fields must be the same in every call."""
        ids = pa.array(item_ids) if not isinstance(item_ids, (pa.Array, pa.ChunkedArray)) else item_ids
        ids = pc.cast(ids, pa.string()) if ids.type != pa.string() else ids
        n = len(ids)
        cols = {"item_id": ids}
        for k, v in (fields or {}).items():
            arr = v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v)
            if arr.type == pa.null():
                arr = arr.cast(pa.string())
            cols[k] = arr
        table = pa.table(cols)
        if self._items_writer is None:
            self._item_schema = table.schema
            self._item_fields = [k for k in cols if k != "item_id"]
            self._items_writer = pq.ParquetWriter(self.tmp / "items.parquet", table.schema)
        else:
            table = table.cast(self._item_schema)
        self._items_writer.write_table(table)
        if vectors is not None:
            v = np.ascontiguousarray(vectors, dtype="<f4")
            if v.ndim != 2 or v.shape[0] != n:
                raise ValueError(f"vectors must be [n_items={n}, d], got {v.shape}")
            if self._vec_file is None:
                if self._n_items:
                    raise ValueError("vectors must be given for every item batch or none")
                self._vector_dim = v.shape[1]
                self._vec_file = open(self.tmp / "item_vectors.f32", "wb")
            elif v.shape[1] != self._vector_dim:
                raise ValueError(f"vector dim changed from {self._vector_dim} to {v.shape[1]}")
            v.tofile(self._vec_file)
        elif self._vec_file is not None:
            raise ValueError("vectors must be given for every item batch or none")
        self._n_items += n

    # -- events -----------------------------------------------------------------------------------------------
    def add_users(
        self,
        user_ids: Sequence[Any] | pa.Array,
        counts: Sequence[int] | np.ndarray,
        item: np.ndarray | Sequence[int],
        scenario: np.ndarray | Sequence[int],
        timestamp: np.ndarray | Sequence[int],
        actions: np.ndarray | Sequence[int] | None = None,
        duration: np.ndarray | Sequence[float] | None = None,
        target: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        """Append users whose events are concatenated in user order (``counts[k]`` events for user k).

        Events of a user must be oldest first unless the writer was made with ``sort_events=True``.
        Item indices must already be resolved (``0 <= item < n_items`` is checked at commit).
        """
        counts = np.asarray(counts, dtype=np.int64)
        n = int(counts.sum())
        cols = {
            "item": np.asarray(item, dtype=np.int64),
            "scenario": np.asarray(scenario),
            "timestamp": np.asarray(timestamp, dtype=np.int64),
            "actions": np.zeros(n, np.uint32) if actions is None else np.asarray(actions, dtype=np.uint32),
            "duration": np.full(n, np.nan, np.float32) if duration is None else np.asarray(duration, dtype=np.float32),
        }
        for k, v in cols.items():
            if v.shape != (n,):
                raise ValueError(f"column {k} has shape {v.shape}, expected ({n},) from counts")
        if self.with_target:
            cols["target"] = np.zeros(n, np.uint8) if target is None else np.asarray(target, dtype=np.uint8)
        uids = user_ids if isinstance(user_ids, pa.Array) else pa.array([str(u) for u in user_ids], type=pa.string())
        if len(uids) != len(counts):
            raise ValueError("user_ids and counts differ in length")

        empty = counts == 0
        if empty.any():
            if not self.skip_empty_users:
                k = int(np.flatnonzero(empty)[0])
                raise DataError(
                    self.source_path, "history", f"user {uids[k].as_py()!r} has an empty history (no events)",
                    hint="pass --skip-empty-users to drop such users",
                )
            self._n_skipped_empty += int(empty.sum())
            uids = uids.filter(pa.array(~empty))
            counts = counts[~empty]
        if len(counts) == 0:
            return
        if (cols["scenario"] < 0).any() or (cols["scenario"] >= len(self.scenarios)).any():
            raise ValueError("scenario index out of range")

        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ts = cols["timestamp"]
        if n > 1:
            back = np.flatnonzero(np.diff(ts) < 0) + 1  # position j with ts[j] < ts[j-1]
            if back.size:
                is_start = np.zeros(n, bool)
                is_start[starts] = True
                back = back[~is_start[back]]  # a drop across a user boundary is fine
            if back.size:
                if not self.sort_events:
                    j = int(back[0])
                    k = int(np.searchsorted(starts, j, side="right") - 1)
                    raise DataError(
                        self.source_path, "timestamp",
                        f"user {uids[k].as_py()!r}: events are not in chronological order at event {j - starts[k]} "
                        f"(timestamp {ts[j - 1]} then {ts[j]})",
                        hint="pass --sort-events to sort each user's events by time",
                    )
                seg = np.repeat(np.arange(len(counts)), counts)
                order = np.lexsort((np.arange(n), ts, seg))  # stable: by user, then time, then input order
                self._n_sorted_users += int(np.unique(seg[back]).size)
                cols = {k: v[order] for k, v in cols.items()}

        for k, v in cols.items():
            dt = TARGET_DTYPE if k == "target" else EVENT_COLUMNS[k]
            if k == "item":
                if v.size and (v.min() < 0 or v.max() > np.iinfo(np.int32).max):
                    raise ValueError("item index out of int32 range")
            v.astype(dt, copy=False).tofile(self._files[k])
        self._counts.append(counts)
        self._user_ids.append(uids)
        self._n_events += n
        self._item_max = max(getattr(self, "_item_max", -1), int(cols["item"].max()))

    # -- finish -----------------------------------------------------------------------------------------------
    def commit(self) -> EventStore:
        """Validate, write ``meta.json`` and the offsets, and move the store into place atomically."""
        for f in self._files.values():
            f.close()
        if self._vec_file is not None:
            self._vec_file.close()
        if self._items_writer is None:
            self.add_items([], fields={})
        assert self._items_writer is not None
        self._items_writer.close()
        if getattr(self, "_item_max", -1) >= self._n_items:
            raise DataError(self.source_path, "item", f"event refers to item index {self._item_max} but the item table has {self._n_items} items")
        counts = np.concatenate(self._counts) if self._counts else np.zeros(0, np.int64)
        offsets = np.zeros(len(counts) + 1, dtype="<i8")
        np.cumsum(counts, out=offsets[1:])
        offsets.tofile(self.tmp / "offsets.i64")
        uids = pa.concat_arrays(self._user_ids) if self._user_ids else pa.array([], pa.string())
        if len(uids) and pc.count_distinct(uids).as_py() != len(uids):
            vc = pc.value_counts(uids)
            first = vc.filter(pc.greater(vc.field("counts"), 1))[0]["values"].as_py()
            raise DataError(self.source_path, "user_id", f"user {first!r} appears more than once")
        pq.write_table(pa.table({"user_id": uids}), self.tmp / "users.parquet")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "n_users": int(len(counts)),
            "n_items": int(self._n_items),
            "n_events": int(self._n_events),
            "scenarios": self.scenarios,
            "actions": self.actions,
            "time_unit": self.time_unit,
            "has_target": self.with_target,
            "item_fields": self._item_fields,
            "item_vector_dim": self._vector_dim,
            "skipped_empty_users": self._n_skipped_empty,
            "sorted_users": self._n_sorted_users,
            "source": self.source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return EventStore(self.out)

    def abort(self) -> None:
        """Delete everything written so far (the final directory is never touched)."""
        for f in self._files.values():
            f.close()
        if self._vec_file is not None:
            self._vec_file.close()
        if self._items_writer is not None:
            try:
                self._items_writer.close()
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> EventStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()
