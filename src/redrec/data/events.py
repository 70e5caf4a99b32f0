"""Adapter for flat event logs: ``events.csv[.gz]`` or ``events.parquet`` (+ optional ``items.csv``/``items.parquet``).

This is the neutral layout of ``../shared/datasets``: one row per interaction with columns
``user_id, item_id, timestamp`` and optionally ``scenario``, action flags (``click``, ``is_like``, ...) and
``duration``; the item table has ``item_id`` and text fields (``title``, ``genres``, ...).

Rows need not be grouped by user.  The import streams the log in blocks, maps ids to dense indices, spills
the rows into ``n_buckets`` user-hashed bucket files, then sorts one bucket at a time by (user, input row):
memory is bounded by the largest bucket, so 100M+ events import on one machine.  Each user's events must be
in chronological order in the input (checked; ``sort_events`` sorts them instead).
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from redrec.data.schema import KNOWN_ACTIONS, MAX_ACTIONS
from redrec.data.store import EventStore, EventStoreWriter, check_output
from redrec.errors import DataError

EVENT_FILES = ("events.parquet", "events.csv.gz", "events.csv")
ITEM_FILES = ("items.parquet", "items.csv.gz", "items.csv")

_COLS = {"i8": np.dtype("<i8"), "i4": np.dtype("<i4"), "i1": np.dtype("i1"), "u4": np.dtype("<u4"), "f4": np.dtype("<f4")}
_BUCKET_COLUMNS = {"user": "i8", "row": "i8", "item": "i4", "scenario": "i1", "timestamp": "i8", "actions": "u4", "duration": "f4"}


@dataclass
class EventsImportConfig:
    """Options of the flat event-log import.

    Attributes:
        user_column, item_column, time_column, scenario_column: input column names.
        default_scenario: scenario name when the log has no scenario column.
        timestamp_unit: ``auto`` (``ordinal`` if every timestamp < 1e8, i.e. positions not dates; ``ms`` if the
            median > 1e11; else ``s``), ``s``, ``ms`` or ``ordinal`` (order only).
        sort_events: sort each user's events by time instead of rejecting out-of-order input.
        drop_unknown_items: drop events whose item is not in the item table instead of failing.
        n_buckets: spill buckets (0 = automatic from the input size, ~20M events each).
        block_size: bytes per CSV read block.
    """

    user_column: str = "user_id"
    item_column: str = "item_id"
    time_column: str = "timestamp"
    scenario_column: str = "scenario"
    default_scenario: str = "default"
    timestamp_unit: Literal["auto", "s", "ms", "ordinal"] = "auto"
    sort_events: bool = False
    drop_unknown_items: bool = False
    n_buckets: int = 0
    block_size: int = 64 << 20


def find_files(src: str | Path) -> tuple[Path, Path | None]:
    """(events file, items file or None) of a dataset directory, or of an events file path."""
    src = Path(src)
    if src.is_file():
        items = next((src.parent / f for f in ITEM_FILES if (src.parent / f).exists()), None)
        return src, items
    if not src.is_dir():
        raise DataError(src, None, "no such file or directory")
    events = next((src / f for f in EVENT_FILES if (src / f).exists()), None)
    if events is None:
        raise DataError(src, None, f"no event log found (looked for {', '.join(EVENT_FILES)})")
    items = next((src / f for f in ITEM_FILES if (src / f).exists()), None)
    return events, items


def _is_parquet(path: Path) -> bool:
    return path.suffix == ".parquet"


def _read_schema(path: Path) -> list[str]:
    try:
        if _is_parquet(path):
            return list(pq.read_schema(path).names)
        with pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 20)) as r:
            return list(r.schema.names)
    except (pa.ArrowInvalid, OSError, EOFError) as e:
        raise DataError(path, None, f"cannot read file: {e}") from None


def _batches(
    path: Path, columns: list[str], types: dict[str, pa.DataType], block_size: int, file_columns: list[str]
) -> Iterator[pa.RecordBatch]:
    try:
        if _is_parquet(path):
            pf = pq.ParquetFile(path)
            for b in pf.iter_batches(batch_size=1 << 20, columns=columns):
                yield pa.RecordBatch.from_arrays(
                    [b.column(c).cast(types[c]) if c in types else b.column(c) for c in columns], names=columns
                )
        else:
            ro = pacsv.ReadOptions(block_size=block_size)
            co = pacsv.ConvertOptions(include_columns=columns, column_types=types, strings_can_be_null=False)
            with pacsv.open_csv(path, read_options=ro, convert_options=co) as reader:
                yield from reader
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, EOFError) as e:
        msg = str(e)
        m = re.search(r"CSV column #(\d+)", msg)
        field = file_columns[int(m.group(1))] if m and int(m.group(1)) < len(file_columns) else None
        field = field or next((c for c in columns if f"'{c}'" in msg or f" {c}:" in msg), None)
        raise DataError(path, field, f"cannot read: {msg.splitlines()[0]}") from None


class _GrowingIndex:
    """Dense int ids for string keys in order of first appearance (hash lookups in pyarrow, no Python dict)."""

    def __init__(self) -> None:
        self.keys: list[pa.Array] = []
        self._all: pa.Array = pa.array([], pa.string())
        self.size = 0

    def lookup(self, values: pa.Array, grow: bool = True) -> np.ndarray:
        idx = pc.index_in(values, value_set=self._all)
        if grow and idx.null_count:
            new = pc.unique(values.filter(pc.is_null(idx)))
            self.keys.append(new)
            self._all = pa.concat_arrays([self._all, new])
            self.size += len(new)
            idx = pc.index_in(values, value_set=self._all)
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def array(self) -> pa.Array:
        return self._all


def _time_scale(unit: str, sample: np.ndarray) -> tuple[str, int]:
    """(store time unit, divisor) for the configured unit and a sample of raw timestamps."""
    if unit == "auto":
        if sample.size == 0 or sample.max() < 100_000_000:
            unit = "ordinal"
        elif np.median(sample) > 1e11:
            unit = "ms"
        else:
            unit = "s"
    return ("ordinal", 1) if unit == "ordinal" else ("seconds", 1000 if unit == "ms" else 1)


def import_events(
    src: str | Path,
    out: str | Path,
    cfg: EventsImportConfig | None = None,
    *,
    items_path: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EventStore:
    """Import a flat event log (CSV or Parquet) and its optional item table into an event store at ``out``."""
    cfg = cfg or EventsImportConfig()
    check_output(out, overwrite)
    events_path, found_items = find_files(src)
    items_file = Path(items_path) if items_path else found_items
    names = _read_schema(events_path)
    for need in (cfg.user_column, cfg.item_column, cfg.time_column):
        if need not in names:
            raise DataError(events_path, need, f"required column is missing (columns present: {names})")
    has_scen = cfg.scenario_column in names
    action_cols = [c for c in names if c in KNOWN_ACTIONS or (c.startswith("is_") and c != "is_target")]
    action_names = [c[3:] if c.startswith("is_") else c for c in action_cols]
    if len(action_cols) > MAX_ACTIONS:
        raise DataError(events_path, action_cols[MAX_ACTIONS], f"more than {MAX_ACTIONS} action columns")
    has_dur = "duration" in names
    used = [cfg.user_column, cfg.item_column, cfg.time_column] + ([cfg.scenario_column] if has_scen else [])
    used += action_cols + (["duration"] if has_dur else [])
    ignored = [c for c in names if c not in used]
    types = {cfg.user_column: pa.string(), cfg.item_column: pa.string(), cfg.time_column: pa.int64()}
    if has_scen:
        types[cfg.scenario_column] = pa.string()
    for c in action_cols:
        types[c] = pa.int64()
    if has_dur:
        types["duration"] = pa.float64()

    # Items first (they fix the item index), streamed into the writer.
    item_index = _GrowingIndex()
    item_table: pa.Table | None = None
    if items_file is not None:
        try:
            item_table = pq.read_table(items_file) if _is_parquet(items_file) else pacsv.read_csv(
                items_file, convert_options=pacsv.ConvertOptions(column_types={cfg.item_column: pa.string()}, strings_can_be_null=True)
            )
        except (pa.ArrowInvalid, OSError, EOFError) as e:
            raise DataError(items_file, None, f"cannot read item table: {str(e).splitlines()[0]}") from None
        if cfg.item_column not in item_table.column_names:
            raise DataError(items_file, cfg.item_column, f"required column is missing (columns present: {item_table.column_names})")
        ids = pc.cast(item_table.column(cfg.item_column).combine_chunks(), pa.string())
        if ids.null_count:
            raise DataError(items_file, cfg.item_column, f"{ids.null_count} rows have no item id")
        if pc.count_distinct(ids).as_py() != len(ids):
            vc = pc.value_counts(ids)
            dup = vc.filter(pc.greater(vc.field("counts"), 1))[0]["values"].as_py()
            raise DataError(items_file, cfg.item_column, f"item id {dup!r} appears more than once")
        item_index.lookup(ids)

    n_buckets = cfg.n_buckets or max(1, math.ceil(events_path.stat().st_size / (200 << 20)))
    spill = Path(tempfile.mkdtemp(prefix=".redrec-spill-", dir=Path(out).parent if Path(out).parent.exists() else None))
    try:
        users = _GrowingIndex()
        scen_names: list[str] = [] if has_scen else [cfg.default_scenario]
        files = {(b, c): open(spill / f"{b}.{c}", "wb") for b in range(n_buckets) for c in _BUCKET_COLUMNS}
        row0 = 0
        dropped = 0
        time_unit, divisor = None, 1
        bar = tqdm(unit=" rows", unit_scale=True, desc=f"read {events_path.name}", disable=not progress)
        for batch in _batches(events_path, used, types, cfg.block_size, names):
            n = batch.num_rows
            if n == 0:
                continue
            for c in (cfg.user_column, cfg.item_column, cfg.time_column):
                col = batch.column(c)
                if col.null_count:
                    r = row0 + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                    raise DataError(events_path, c, f"missing value at data row {r + 1}")
            u = users.lookup(batch.column(cfg.user_column))
            it = item_index.lookup(batch.column(cfg.item_column), grow=item_table is None)
            keep = np.ones(n, bool)
            if (it < 0).any():
                bad = np.flatnonzero(it < 0)
                if not cfg.drop_unknown_items:
                    raise DataError(
                        events_path, cfg.item_column,
                        f"unknown item id {batch.column(cfg.item_column)[int(bad[0])].as_py()!r} at data row {row0 + int(bad[0]) + 1} "
                        f"(not in {items_file.name if items_file else 'the item table'})",
                        hint="pass --drop-unknown-items to drop such events",
                    )
                keep[bad] = False
                dropped += len(bad)
            ts = batch.column(cfg.time_column).to_numpy(zero_copy_only=False).astype(np.int64)
            if time_unit is None:
                time_unit, divisor = _time_scale(cfg.timestamp_unit, ts)
            if divisor != 1:
                ts = ts // divisor
            if has_scen:
                sc_col = batch.column(cfg.scenario_column)
                if sc_col.null_count:
                    r = row0 + int(np.flatnonzero(sc_col.is_null().to_numpy(zero_copy_only=False))[0])
                    raise DataError(events_path, cfg.scenario_column, f"missing value at data row {r + 1}")
                for s in pc.unique(sc_col).to_pylist():
                    if s not in scen_names:
                        scen_names.append(s)
                if len(scen_names) > 127:
                    raise DataError(events_path, cfg.scenario_column, "more than 127 distinct scenarios")
                sc = pc.index_in(sc_col, value_set=pa.array(scen_names)).to_numpy(zero_copy_only=False).astype(np.int8)
            else:
                sc = np.zeros(n, np.int8)
            acts = np.zeros(n, np.uint32)
            for bit, c in enumerate(action_cols):
                a = batch.column(c).fill_null(0).to_numpy(zero_copy_only=False)
                acts |= (a != 0).astype(np.uint32) << np.uint32(bit)
            dur = (
                batch.column("duration").to_numpy(zero_copy_only=False).astype(np.float32)
                if has_dur else np.full(n, np.nan, np.float32)
            )
            cols = {"user": u, "row": np.arange(row0, row0 + n, dtype=np.int64), "item": it, "scenario": sc,
                    "timestamp": ts, "actions": acts, "duration": dur}
            bucket = u % n_buckets
            for b in range(n_buckets):
                m = keep & (bucket == b)
                if m.any():
                    for c, dt in _BUCKET_COLUMNS.items():
                        cols[c][m].astype(_COLS[dt], copy=False).tofile(files[(b, c)])
            row0 += n
            bar.update(n)
        bar.close()
        for f in files.values():
            f.close()
        if row0 == 0:
            raise DataError(events_path, None, "the event log has no rows")

        # scenarios were numbered in order of appearance; store them sorted by name (stable across inputs)
        sorted_names = sorted(scen_names)
        remap = np.array([sorted_names.index(s) for s in scen_names], dtype=np.int8)
        source = {
            "adapter": "events", "events": str(events_path), "items": str(items_file) if items_file else None,
            "config": cfg.__dict__, "dropped_unknown_item_events": dropped, "ignored_columns": ignored,
            "raw_rows": row0,
        }
        with EventStoreWriter(
            out, scenarios=sorted_names, actions=action_names, time_unit=time_unit or "seconds", source=source,
            overwrite=overwrite, sort_events=cfg.sort_events, source_path=events_path,
        ) as w:
            if item_table is not None:
                fields = {c: item_table.column(c) for c in item_table.column_names if c != cfg.item_column}
                w.add_items(item_index.array(), fields={k: v.combine_chunks() for k, v in fields.items()})
            else:
                w.add_items(item_index.array())
            user_keys = users.array()
            for b in tqdm(range(n_buckets), desc="sort users", disable=not progress or n_buckets == 1):
                cols = {c: np.fromfile(spill / f"{b}.{c}", dtype=_COLS[dt]) for c, dt in _BUCKET_COLUMNS.items()}
                if cols["user"].size == 0:
                    continue
                order = np.lexsort((cols["row"], cols["user"]))
                cols = {c: v[order] for c, v in cols.items()}
                uniq, counts = np.unique(cols["user"], return_counts=True)
                w.add_users(
                    user_keys.take(pa.array(uniq)), counts, cols["item"], remap[cols["scenario"]], cols["timestamp"],
                    cols["actions"], cols["duration"],
                )
                del cols, order
            return w.commit()
    finally:
        shutil.rmtree(spill, ignore_errors=True)
