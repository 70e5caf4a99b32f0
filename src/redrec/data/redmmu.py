"""RED-MMU parquet adapter: ``note_embeddings`` + ``multiscene_lastn`` -> the canonical event store.

Input (DESIGN.md section 3)::

    note_embeddings*.parquet   encrypted_note_id: string, note_idx: int, note_feature: list<float> (d-dim)
    multiscene_lastn*.parquet  encrypted_user_id: string, user_idx: int,
                               homefeed_list, ads_list[, search_list]: list<struct<item_id, timestamp, is_*, ...>>

Each input may be one file, several part files matching the prefix, or a directory of part files.  Everything
is streamed (``ParquetFile.iter_batches``) and vectorised per batch with pyarrow/numpy, so memory stays
linear in the number of notes (one int64 key + one int32 row per note for the join) and flat in the number of
events.

Mapping:

* Items: one per note row, in file order.  ``item_id`` = ``encrypted_note_id``; ``note_idx`` is kept as an item
  field; ``note_feature`` becomes the store's item vectors (every vector must have the same length and be finite).
* Users: one per ``multiscene_lastn`` row; ``user_id`` = ``encrypted_user_id`` (``user_idx`` when that column is
  absent).
* Events: every scenario list of a user (scenario = the key of ``scenario_columns``; auto: ``homefeed_list``,
  ``ads_list``, ``search_list``, whichever are present), joined to the notes through the struct's join field
  (auto: ``note_idx``, ``item_idx`` or ``item_id``, the first present; it holds ``note_idx`` values), merged
  chronologically.  Ties keep the scenario-column order, then the list order.  A list that is not itself
  chronological is an error unless ``sort_events``.
* Time: ``timestamp`` integer/float unix seconds or milliseconds (``auto``: milliseconds when the median of the
  first batch's timestamps exceeds 1e11), or an arrow timestamp type; stored as unix seconds (floored).
* No ``timestamp`` field (or ``timestamp_unit="ordinal"``): the store's time unit is ``ordinal`` and an event's
  "timestamp" is its position in its own list.  The true order across scenarios is then unknown; the lists are
  "last n" snapshots taken at the same moment, so by default (``ordinal_align="end"``) the lists are aligned at
  their ends: ``ordinal = position + (longest list of the user - length of this list)``, i.e. the k-th most recent
  events of all scenarios share an ordinal.  ``ordinal_align="start"`` uses the plain position (aligned at the
  oldest event).  Either way the cross-scenario interleaving is a convention, not data, and time-gap features
  are meaningless for such a store.
* Actions: whichever ``is_*`` struct fields are present (nonzero = set), in :data:`redrec.data.schema.KNOWN_ACTIONS`
  order, then any other ``is_*`` fields in order of appearance; a flag missing from one list is 0 there.
  ``duration`` (seconds) when present, NaN otherwise.  Other struct fields (``page_key``, ``type``, ...) are
  ignored and listed in the store's ``meta.source.ignored_fields``.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from redrec.config import to_dict
from redrec.data.schema import KNOWN_ACTIONS
from redrec.data.store import EventStore, EventStoreWriter
from redrec.errors import ConfigError, DataError

ADAPTER = "redmmu"
NOTES_PREFIX = "note_embeddings"
LASTN_PREFIX = "multiscene_lastn"
DEFAULT_SCENARIO_COLUMNS = {"homefeed": "homefeed_list", "ads": "ads_list", "search": "search_list"}
ITEM_FIELD_CANDIDATES = ("note_idx", "item_idx", "item_id")
NOTE_ID, NOTE_IDX, NOTE_FEATURE = "encrypted_note_id", "note_idx", "note_feature"
USER_ID_COLUMNS = ("encrypted_user_id", "user_idx")
MS_THRESHOLD = 1e11  # a unix time above this is in milliseconds (1e11 s is the year 5138)


@dataclass
class RedMMUImportConfig:
    """Options of :func:`import_redmmu`.

    Attributes:
        scenario_columns: ``{scenario name: list column}``, in scenario order.  ``None``: ``homefeed_list``,
            ``ads_list`` and ``search_list``, those present.
        item_field: struct field holding the note's ``note_idx``.  ``None``: the first of ``note_idx``,
            ``item_idx``, ``item_id`` present in the struct.
        timestamp_unit: unit of the struct ``timestamp``: ``auto`` (ms when the median is > 1e11, else s), ``s``,
            ``ms``, or ``ordinal`` (ignore timestamps, order by list position).  Without a ``timestamp`` field
            ``auto`` means ``ordinal``.
        ordinal_align: how lists are aligned when ordering by position (see the module docstring).
        sort_events: sort each list by time instead of rejecting a list that is out of order.
        skip_empty_users: drop users with no events instead of rejecting them.
        drop_unknown_items: drop events whose note is not in the note table (counted in ``meta.source``) instead
            of rejecting them.
        batch_rows: ``multiscene_lastn`` rows (users) read per batch.
        note_batch_rows: ``note_embeddings`` rows read per batch.
    """

    scenario_columns: dict[str, str] | None = None
    item_field: str | None = None
    timestamp_unit: Literal["auto", "s", "ms", "ordinal"] = "auto"
    ordinal_align: Literal["end", "start"] = "end"
    sort_events: bool = False
    skip_empty_users: bool = False
    drop_unknown_items: bool = False
    batch_rows: int = 1024
    note_batch_rows: int = 262_144

    def validate(self, source: str | None = None) -> None:
        if self.timestamp_unit not in ("auto", "s", "ms", "ordinal"):
            raise ConfigError(source, "timestamp_unit", f"must be auto, s, ms or ordinal, got {self.timestamp_unit!r}")
        if self.ordinal_align not in ("end", "start"):
            raise ConfigError(source, "ordinal_align", f"must be end or start, got {self.ordinal_align!r}")
        if self.scenario_columns is not None:
            if not self.scenario_columns:
                raise ConfigError(source, "scenario_columns", "must name at least one scenario")
            cols = list(self.scenario_columns.values())
            if len(set(cols)) != len(cols):
                raise ConfigError(source, "scenario_columns", f"a column is used twice: {self.scenario_columns}")
            if len(cols) > 127:
                raise ConfigError(source, "scenario_columns", f"at most 127 scenarios, got {len(cols)}")
        for name in ("batch_rows", "note_batch_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(source, name, f"must be an integer >= 1, got {getattr(self, name)!r}")


# -- input files --------------------------------------------------------------------------------------------------
def _parquet_in_dir(d: Path) -> list[Path]:
    return sorted(
        p for p in d.rglob("*.parquet")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(d).parts)
    )


def _resolve(src: Path | None, explicit: Any, prefix: str) -> list[Path]:
    """Parquet files of one input: explicit path(s) / glob(s) / directories, else ``src/prefix*``."""
    files: list[Path] = []
    if explicit is not None:
        for p in [explicit] if isinstance(explicit, (str, Path)) else list(explicit):
            p = Path(p)
            if p.is_dir():
                found = _parquet_in_dir(p)
                if not found:
                    raise DataError(p, None, f"directory has no .parquet files (expected {prefix} part files)")
                files += found
            elif p.is_file():
                files.append(p)
            elif any(ch in str(p) for ch in "*?["):
                found = sorted(Path(x) for x in glob.glob(str(p)) if Path(x).is_file())
                if not found:
                    raise DataError(p, None, f"pattern matches no file (expected {prefix} parquet)")
                files += found
            else:
                raise DataError(p, None, f"{prefix} input does not exist")
        return files
    assert src is not None
    for p in sorted(src.glob(prefix + "*")):
        if p.name.startswith((".", "_")):
            continue
        if p.is_dir():
            files += _parquet_in_dir(p)
        elif p.is_file() and p.suffix == ".parquet":
            files.append(p)
    if not files:
        present = sorted(p.name for p in src.iterdir())[:20]
        raise DataError(src, None, f"no {prefix}*.parquet file or {prefix}*/ directory found; present: {present}",
                        hint=f"pass the file explicitly ({'notes' if prefix == NOTES_PREFIX else 'lastn'}=...)")
    return files


def _open(path: Path) -> pq.ParquetFile:
    try:
        # pre_buffer=False: with pre-buffering, iter_batches keeps every row group read so far cached until the
        # iterator ends, so memory would grow with the file size instead of staying at one batch
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, f"cannot read parquet (truncated or corrupt?): {e}") from None


def _batches(pf: pq.ParquetFile, path: Path, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    it = pf.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise DataError(path, None, f"cannot read parquet data (truncated or corrupt?): {e}") from None
        yield batch


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _field_names(t: pa.StructType) -> list[str]:
    return [t.field(i).name for i in range(t.num_fields)]


def _column_type(path: Path, schema: pa.Schema, name: str) -> pa.DataType:
    if name not in schema.names:
        raise DataError(path, name, f"missing column; the file has columns {schema.names}")
    return schema.field(name).type


# -- plan: what to read from each multiscene_lastn file -----------------------------------------------------------
@dataclass
class _ListPlan:
    scenario: str
    column: str
    key: str
    timestamp: pa.DataType | None  # type of the timestamp field, None when absent
    flags: list[str]  # is_* fields present
    duration: bool
    ignored: list[str]


@dataclass
class _FilePlan:
    path: Path
    pf: pq.ParquetFile
    user_column: str
    lists: list[_ListPlan]


def _plan_file(path: Path, pf: pq.ParquetFile, cfg: RedMMUImportConfig, mapping: dict[str, str] | None) -> _FilePlan:
    schema = pf.schema_arrow
    ucol = next((c for c in USER_ID_COLUMNS if c in schema.names), None)
    if ucol is None:
        raise DataError(path, USER_ID_COLUMNS[0], f"missing user id column (or {USER_ID_COLUMNS[1]}); "
                                                  f"the file has columns {schema.names}")
    ut = schema.field(ucol).type
    if not (pa.types.is_string(ut) or pa.types.is_large_string(ut) or pa.types.is_integer(ut)):
        raise DataError(path, ucol, f"wrong column type {ut}; expected string (or integer)")
    if mapping is None:
        mapping = {s: c for s, c in DEFAULT_SCENARIO_COLUMNS.items() if c in schema.names}
        if not mapping:
            raise DataError(path, DEFAULT_SCENARIO_COLUMNS["homefeed"],
                            f"no scenario list column ({', '.join(DEFAULT_SCENARIO_COLUMNS.values())}); "
                            f"the file has columns {schema.names}", hint="set scenario_columns")
    lists = []
    for scen, col in mapping.items():
        t = _column_type(path, schema, col)
        if not (_is_list(t) and pa.types.is_struct(t.value_type)):
            raise DataError(path, col, f"wrong column type {t}; expected list<struct<...>> of events")
        st = t.value_type
        names = _field_names(st)
        key = cfg.item_field or next((k for k in ITEM_FIELD_CANDIDATES if k in names), None)
        if key is None or key not in names:
            want = key or " / ".join(ITEM_FIELD_CANDIDATES)
            raise DataError(path, f"{col}.{want}", f"join field missing from the event struct; it has fields {names}",
                            hint="set item_field to the struct field holding note_idx")
        if not pa.types.is_integer(st.field(key).type):
            raise DataError(path, f"{col}.{key}", f"wrong type {st.field(key).type}; the join field must be an integer "
                                                  "note_idx")
        ts = st.field("timestamp").type if "timestamp" in names else None
        if ts is not None and not (_is_number(ts) and not pa.types.is_boolean(ts) or pa.types.is_timestamp(ts)):
            raise DataError(path, f"{col}.timestamp", f"wrong type {ts}; expected an integer/float unix time or a "
                                                      "timestamp")
        if ts is None and cfg.timestamp_unit in ("s", "ms"):
            raise DataError(path, f"{col}.timestamp", f"missing; the event struct has fields {names}",
                            hint="use timestamp_unit='ordinal' to order events by list position")
        flags = [n for n in names if n.startswith("is_")]
        for f in flags:
            if not _is_number(st.field(f).type):
                raise DataError(path, f"{col}.{f}", f"wrong type {st.field(f).type}; an action flag must be bool/number")
        has_dur = "duration" in names
        if has_dur and not _is_number(st.field("duration").type):
            raise DataError(path, f"{col}.duration", f"wrong type {st.field('duration').type}; expected a number")
        used = {key, "timestamp", "duration", *flags}
        lists.append(_ListPlan(scen, col, key, ts, flags, has_dur, [n for n in names if n not in used]))
    return _FilePlan(path, pf, ucol, lists)


# -- note_idx -> item row -----------------------------------------------------------------------------------------
class _KeyIndex:
    """Maps ``note_idx`` values to item rows; memory linear in the number of notes, no Python dict.

    Dense keys (``0 <= key < 3 n``) use a direct int32 table; other keys a sorted copy + ``searchsorted``.
    """

    def __init__(self, keys: np.ndarray, describe_row):
        n = len(keys)
        self.n = n
        self.table: np.ndarray | None = None
        self.sorted: np.ndarray | None = None
        self.rows: np.ndarray | None = None
        if n == 0:
            return
        row_dtype = np.int32 if n < 2**31 else np.int64
        kmin, kmax = int(keys.min()), int(keys.max())
        if kmin >= 0 and kmax < max(3 * n, 1 << 16):
            table = np.full(kmax + 1, -1, dtype=row_dtype)
            table[keys] = np.arange(n, dtype=row_dtype)
            bad = np.flatnonzero(table[keys] != np.arange(n))
            if bad.size:
                r = int(bad[0])
                self._dup(keys, int(keys[r]), describe_row)
            self.table = table
        else:
            order = np.argsort(keys, kind="stable")
            sk = keys[order]
            dup = np.flatnonzero(sk[1:] == sk[:-1])
            if dup.size:
                self._dup(keys, int(sk[dup[0]]), describe_row)
            self.sorted, self.rows = sk, order.astype(row_dtype)

    @staticmethod
    def _dup(keys: np.ndarray, value: int, describe_row) -> None:
        rows = np.flatnonzero(keys == value)[:2]
        path, where = describe_row(int(rows[1]))
        raise DataError(path, NOTE_IDX, f"note_idx {value} appears more than once ({describe_row(int(rows[0]))[1]} "
                                        f"and {where}); note_idx must identify a note")

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """Item rows of ``q`` (int64), -1 where unknown."""
        out = np.full(len(q), -1, dtype=np.int64)
        if self.n == 0 or len(q) == 0:
            return out
        if self.table is not None:
            ok = (q >= 0) & (q < len(self.table))
            out[ok] = self.table[q[ok]]
            return out
        assert self.sorted is not None and self.rows is not None
        pos = np.searchsorted(self.sorted, q)
        pos_c = np.minimum(pos, self.n - 1)
        hit = self.sorted[pos_c] == q
        out[hit] = self.rows[pos_c[hit]]
        return out


# -- notes --------------------------------------------------------------------------------------------------------
def _check_notes_schema(path: Path, pf: pq.ParquetFile) -> None:
    schema = pf.schema_arrow
    t = _column_type(path, schema, NOTE_ID)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise DataError(path, NOTE_ID, f"wrong column type {t}; expected string")
    t = _column_type(path, schema, NOTE_IDX)
    if not pa.types.is_integer(t):
        raise DataError(path, NOTE_IDX, f"wrong column type {t}; expected an integer")
    t = _column_type(path, schema, NOTE_FEATURE)
    if not (_is_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))):
        raise DataError(path, NOTE_FEATURE, f"wrong column type {t}; expected list<float>")


def _read_notes(
    files: list[tuple[Path, pq.ParquetFile]], writer: EventStoreWriter, cfg: RedMMUImportConfig, progress: bool,
) -> tuple[_KeyIndex, int]:
    total = sum(pf.metadata.num_rows for _, pf in files)
    keys = np.empty(total, dtype=np.int64)
    starts = np.zeros(len(files) + 1, dtype=np.int64)
    dim = 0
    row = 0
    bar = tqdm(total=total, unit="note", desc="notes", disable=not progress, leave=False)
    for fi, (path, pf) in enumerate(files):
        starts[fi] = row
        file_row = 0
        for batch in _batches(pf, path, [NOTE_ID, NOTE_IDX, NOTE_FEATURE], cfg.note_batch_rows):
            n = batch.num_rows
            ids, idx, feat = (batch.column(c) for c in (NOTE_ID, NOTE_IDX, NOTE_FEATURE))
            for name, arr in ((NOTE_ID, ids), (NOTE_IDX, idx), (NOTE_FEATURE, feat)):
                if arr.null_count:
                    r = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
                    raise DataError(path, name, f"null value at row {file_row + r}")
            if ids.type != pa.string():
                ids = pc.cast(ids, pa.string())
            if pa.types.is_fixed_size_list(feat.type):
                lengths = np.full(n, feat.type.list_size, dtype=np.int64)
            else:
                lengths = pc.list_value_length(feat).to_numpy(zero_copy_only=False).astype(np.int64)
            if n:
                if dim == 0:
                    dim = int(lengths[0])
                    if dim == 0:
                        raise DataError(path, NOTE_FEATURE, f"note {ids[0].as_py()!r} (row {file_row}): empty vector")
                bad = np.flatnonzero(lengths != dim)
                if bad.size:
                    r = int(bad[0])
                    raise DataError(path, NOTE_FEATURE, f"note {ids[r].as_py()!r} (row {file_row + r}) has a "
                                                        f"{lengths[r]}-dim vector; earlier notes have {dim} dims")
            flat = feat.flatten()
            if flat.null_count:
                parent = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]) // max(dim, 1)
                raise DataError(path, NOTE_FEATURE, f"note {ids[parent].as_py()!r} (row {file_row + parent}): "
                                                    "null inside the vector")
            vec = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim if n else 0)
            finite = np.isfinite(vec).all(axis=1)
            if not finite.all():
                r = int(np.flatnonzero(~finite)[0])
                raise DataError(path, NOTE_FEATURE, f"note {ids[r].as_py()!r} (row {file_row + r}) has a NaN or "
                                                    "infinite value")
            idx_np = idx.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            keys[row : row + n] = idx_np
            writer.add_items(ids, fields={NOTE_IDX: pa.array(idx_np, type=pa.int64())},
                             vectors=vec if n else np.zeros((0, dim), np.float32))
            row += n
            file_row += n
            bar.update(n)
    bar.close()
    starts[len(files)] = row

    def describe_row(r: int) -> tuple[Path, str]:
        fi = int(np.searchsorted(starts, r, side="right") - 1)
        return files[fi][0], f"row {r - starts[fi]} of {files[fi][0].name}"

    return _KeyIndex(keys[:row], describe_row), dim


# -- events -------------------------------------------------------------------------------------------------------
@dataclass
class _State:
    unit: str | None  # resolved "s" / "ms" / "ordinal"; None until the first timestamps are seen
    dropped_unknown: int = 0
    sorted_lists: int = 0
    users_read: int = 0


def _as_float(arr: pa.Array) -> np.ndarray:
    """Numbers (bool/int/float, nulls -> NaN) as float64."""
    return pc.cast(arr, pa.float64(), safe=False).to_numpy(zero_copy_only=False)


def _timestamp_seconds(arr: pa.Array, unit: str) -> np.ndarray:
    """float64 unix seconds of a timestamp field (integer/float in ``unit``, or an arrow timestamp)."""
    if pa.types.is_timestamp(arr.type):
        per_s = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[arr.type.unit]
        return arr.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64) / per_s
    v = _as_float(arr)
    return v / 1000.0 if unit == "ms" else v


def _read_lastn(
    plans: list[_FilePlan], index: _KeyIndex, writer: EventStoreWriter, actions: list[str],
    cfg: RedMMUImportConfig, state: _State, progress: bool,
) -> None:
    bit = {f"is_{a}": np.uint32(1 << i) for i, a in enumerate(actions)}
    total = sum(p.pf.metadata.num_rows for p in plans)
    bar = tqdm(total=total, unit="user", desc="users", disable=not progress, leave=False)
    for plan in plans:
        path = plan.path
        writer.source_path = path  # the writer names this file in its own errors (empty history, order, ...)
        columns = [plan.user_column] + [lp.column for lp in plan.lists]
        row0 = 0
        for batch in _batches(plan.pf, path, columns, cfg.batch_rows):
            n_rows = batch.num_rows
            uids = batch.column(plan.user_column)
            if uids.null_count:
                r = int(np.flatnonzero(uids.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(path, plan.user_column, f"null user id at row {row0 + r}")
            if uids.type != pa.string():
                uids = pc.cast(uids, pa.string())
            _add_batch(path, plan, batch, uids, index, writer, bit, cfg, state, row0)
            row0 += n_rows
            state.users_read += n_rows
            bar.update(n_rows)
    bar.close()


def _where(uids: pa.Array, parent: np.ndarray, pos: np.ndarray, row0: int, j: int) -> str:
    """Human description of flattened event ``j``: its user (id and input row) and list position."""
    return f"user {uids[int(parent[j])].as_py()!r} (row {row0 + int(parent[j])}), position {int(pos[j])}"


def _add_batch(
    path: Path, plan: _FilePlan, batch: pa.RecordBatch, uids: pa.Array, index: _KeyIndex,
    writer: EventStoreWriter, bit: dict[str, np.uint32], cfg: RedMMUImportConfig, state: _State, row0: int,
) -> None:
    n_rows = batch.num_rows
    ordinal = state.unit == "ordinal"
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "scen", "time", "pos", "item", "act", "dur")}
    lens_by_list: list[np.ndarray] = []
    keeps: list[np.ndarray | None] = []
    raw_ts: list[tuple[_ListPlan, np.ndarray, np.ndarray, pa.Array | None]] = []

    for s, lp in enumerate(plan.lists):
        col = batch.column(lp.column)
        # a null list counts as an empty one; flatten() skips null slots (whatever their extent) and the slice offset
        values = col.flatten()  # StructArray of this batch's events, user by user
        counts = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        m = len(values)
        assert m == counts.sum()
        parent = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
        lens_by_list.append(counts)
        start = np.zeros(n_rows, dtype=np.int64)
        np.cumsum(counts[:-1], out=start[1:])
        pos = np.arange(m, dtype=np.int64) - start[parent]

        if values.null_count:
            j = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(path, lp.column, f"{_where(uids, parent, pos, row0, j)}: null event")
        fields = dict(zip(_field_names(values.type), values.flatten(), strict=True))

        key = fields[lp.key]
        if key.null_count:
            j = int(np.flatnonzero(key.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(path, f"{lp.column}.{lp.key}", f"{_where(uids, parent, pos, row0, j)}: null item id")
        key_np = key.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        item = index.lookup(key_np)
        keep = item >= 0
        if not keep.all():
            j = int(np.flatnonzero(~keep)[0])
            if not cfg.drop_unknown_items:
                raise DataError(path, f"{lp.column}.{lp.key}",
                                f"{_where(uids, parent, pos, row0, j)}: {lp.key} {int(key_np[j])} is not a note_idx "
                                f"of the note table ({index.n:,} notes)", hint="set drop_unknown_items to drop them")
            state.dropped_unknown += int((~keep).sum())

        ts_arr = None
        if not ordinal:
            ts_arr = fields["timestamp"]
            if ts_arr.null_count:
                j = int(np.flatnonzero(ts_arr.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(path, f"{lp.column}.timestamp",
                                f"{_where(uids, parent, pos, row0, j)}: null timestamp")
        raw_ts.append((lp, parent, pos, ts_arr))

        act = np.zeros(m, dtype=np.uint32)
        for f in lp.flags:
            v = _as_float(fields[f])
            act |= np.where((v != 0) & ~np.isnan(v), bit[f], np.uint32(0)).astype(np.uint32)
        dur = _as_float(fields["duration"]).astype(np.float32) if lp.duration else np.full(m, np.nan, np.float32)

        for k, v in (("user", parent), ("scen", np.full(m, s, np.int64)), ("pos", pos), ("item", item),
                     ("act", act), ("dur", dur)):
            parts[k].append(v[keep] if not keep.all() else v)
        keeps.append(None if keep.all() else keep)

    # time: resolve the unit on the first timestamps seen, convert, check each list is chronological
    if not ordinal and state.unit is None:
        sample = [_as_float(a) for lp, _, _, a in raw_ts if a is not None and not pa.types.is_timestamp(a.type)]
        sample = [x for x in sample if len(x)]
        if sample:
            state.unit = "ms" if float(np.median(np.concatenate(sample))) > MS_THRESHOLD else "s"
        elif any(a is not None and len(a) for _, _, _, a in raw_ts):
            state.unit = "s"  # only arrow timestamp columns, which carry their own unit
    longest = np.max(np.stack(lens_by_list), axis=0)
    for s, (lp, parent, pos, ts_arr) in enumerate(raw_ts):
        if ordinal:
            t = pos.astype(np.float64)
            if cfg.ordinal_align == "end":
                t = t + (longest - lens_by_list[s])[parent]
        else:
            assert ts_arr is not None
            t = _timestamp_seconds(ts_arr, state.unit or "s")
            back = np.flatnonzero((t[1:] < t[:-1]) & (parent[1:] == parent[:-1])) + 1 if len(t) > 1 else t[:0]
            if back.size:
                if cfg.sort_events:
                    state.sorted_lists += int(np.unique(parent[back]).size)
                else:
                    j = int(back[0])
                    raw = ts_arr.slice(j - 1, 2).to_pylist()
                    raise DataError(path, f"{lp.column}.timestamp",
                                    f"{_where(uids, parent, pos, row0, j)}: events are not in chronological "
                                    f"order (timestamp {raw[0]} then {raw[1]})",
                                    hint="set sort_events to sort each list by time")
        parts["time"].append(t if keeps[s] is None else t[keeps[s]])

    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    # chronological merge; ties keep the scenario-column order, then the list order (stable for sorted lists)
    order = np.lexsort((cat["pos"], cat["scen"], cat["time"], cat["user"]))
    user = cat["user"][order]
    ts = np.floor(cat["time"][order]).astype(np.int64)
    writer.add_users(
        uids,
        counts=np.bincount(user, minlength=n_rows) if len(user) else np.zeros(n_rows, np.int64),
        item=cat["item"][order],
        scenario=cat["scen"][order].astype(np.int8),
        timestamp=ts,
        actions=cat["act"][order],
        duration=cat["dur"][order],
    )


# -- entry point --------------------------------------------------------------------------------------------------
def import_redmmu(
    src: str | Path | None,
    out: str | Path,
    cfg: RedMMUImportConfig | None = None,
    *,
    notes: str | Path | Sequence[str | Path] | None = None,
    lastn: str | Path | Sequence[str | Path] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EventStore:
    """Import RED-MMU parquet files into a new event store at ``out`` (atomically; see :class:`EventStoreWriter`).

    Args:
        src: directory holding ``note_embeddings*.parquet`` and ``multiscene_lastn*.parquet`` (each a file, part
            files sharing the prefix, or a directory of part files).  May be ``None`` when ``notes`` and ``lastn``
            are given.
        out: the store directory to create.
        cfg: options (:class:`RedMMUImportConfig`).
        notes, lastn: explicit inputs instead of the ``src`` lookup: a file, a directory of part files, a glob, or
            a list of those.
        overwrite: replace an existing store at ``out`` (only once the import has fully succeeded).
        progress: show tqdm progress bars.

    Raises:
        DataError: naming the file, the column/field and the problem, for any bad input.  Nothing is left at
            ``out`` (and an existing store there is untouched) when it is raised.
    """
    cfg = cfg or RedMMUImportConfig()
    cfg.validate()
    src_path = Path(src) if src is not None else None
    if (notes is None or lastn is None) and (src_path is None or not src_path.is_dir()):
        raise DataError(src_path, None, "not a directory", hint="pass the RED-MMU directory, or notes=... and lastn=...")
    note_files = [(p, _open(p)) for p in _resolve(src_path, notes, NOTES_PREFIX)]
    lastn_files = [(p, _open(p)) for p in _resolve(src_path, lastn, LASTN_PREFIX)]
    for p, pf in note_files:
        _check_notes_schema(p, pf)

    # schema plan of every lastn file: same scenario columns everywhere, timestamps everywhere or nowhere
    mapping = dict(cfg.scenario_columns) if cfg.scenario_columns else None
    plans: list[_FilePlan] = []
    for p, pf in lastn_files:
        plan = _plan_file(p, pf, cfg, mapping)
        if mapping is None:
            mapping = {lp.scenario: lp.column for lp in plan.lists}
        elif not cfg.scenario_columns:
            extra = [c for c in DEFAULT_SCENARIO_COLUMNS.values() if c in pf.schema_arrow.names and c not in mapping.values()]
            if extra:
                raise DataError(p, extra[0], f"column present here but not in {plans[0].path}: every part file must "
                                             f"have the same scenario columns ({list(mapping.values())})",
                                hint="set scenario_columns to choose the scenarios explicitly")
        plans.append(plan)
    lists = [(plan.path, lp) for plan in plans for lp in plan.lists]
    with_ts = [(path, lp) for path, lp in lists if lp.timestamp is not None]
    ordinal = cfg.timestamp_unit == "ordinal" or not with_ts
    if not ordinal and len(with_ts) != len(lists):
        path, lp = next((path, lp) for path, lp in lists if lp.timestamp is None)
        other = with_ts[0][1].column
        raise DataError(path, f"{lp.column}.timestamp",
                        f"missing while {other} has timestamps: events cannot be ordered across scenarios",
                        hint="use timestamp_unit='ordinal' to order every list by position")
    seen: list[str] = []
    for _, lp in lists:
        seen += [f for f in lp.flags if f not in seen]
    actions = [a for a in KNOWN_ACTIONS if f"is_{a}" in seen]
    actions += [f[3:] for f in seen if f[3:] not in actions]
    assert mapping is not None
    scenarios = list(mapping)

    unit = "ordinal" if ordinal else (None if cfg.timestamp_unit == "auto" else cfg.timestamp_unit)
    state = _State(unit=unit)
    source: dict[str, Any] = {
        "adapter": ADAPTER,
        "src": str(src_path) if src_path is not None else None,
        "notes": [str(p) for p, _ in note_files],
        "lastn": [str(p) for p, _ in lastn_files],
        "options": to_dict(cfg),
        "scenario_columns": mapping,
        "item_fields": {lp.column: lp.key for _, lp in lists},
        "ignored_fields": sorted({f for _, lp in lists for f in lp.ignored}),
    }
    with EventStoreWriter(
        out, scenarios=scenarios, actions=actions, time_unit="ordinal" if ordinal else "seconds", source=source,
        overwrite=overwrite, sort_events=cfg.sort_events, skip_empty_users=cfg.skip_empty_users,
        source_path=note_files[0][0],
    ) as writer:
        index, dim = _read_notes(note_files, writer, cfg, progress)
        _read_lastn(plans, index, writer, actions, cfg, state, progress)
        writer.source.update({
            "timestamp_unit": state.unit or ("ordinal" if ordinal else "s"),
            "ordinal_align": cfg.ordinal_align if ordinal else None,
            "n_notes": index.n,
            "note_feature_dim": dim,
            "users_read": state.users_read,
            "dropped_unknown_items": state.dropped_unknown,
            "sorted_lists": state.sorted_lists,
        })
        return writer.commit()
