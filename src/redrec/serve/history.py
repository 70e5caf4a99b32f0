"""The serving history store: each user's recent interactions, kept per scenario, durable once acknowledged.

The recommendation service appends the events it is told about (:meth:`HistoryStore.append`) and reads a
user's kept events back (:meth:`HistoryStore.get`) to build the model input with the same
:func:`redrec.mixing.mix` as training.  Only the last ``max_per_scenario`` events of every (user, scenario)
are kept -- mixing only ever looks at the last ``n_s`` events of each scenario, so ``max_per_scenario``
must be at least the largest quota (the paper's budget is 128).

Two backends share the :class:`HistoryStore` interface:

* :class:`SQLiteHistoryStore` -- one file (WAL journal, ``synchronous=FULL``: a returned append survives a
  crash or power loss), thread-safe, several processes may share the file.
* :class:`RedisHistoryStore` -- one sorted set per (user, scenario), written in ``MULTI``/``EXEC``
  transactions; durable only with ``appendonly yes`` + ``appendfsync always`` (see the class).

:func:`open_history_store` opens either from a URL, and :func:`to_user_events` turns a user's kept events into
the training store's :class:`~redrec.data.store.UserEvents` (item, scenario and action indices of a given
:class:`~redrec.data.store.EventStore`), ready for :func:`~redrec.mixing.mix` and
:func:`~redrec.data.batching.user_sequence`.

Events are identified by external ids and names (item id, scenario name, action names), not by the indices
of one training store, so a history survives a new model/store; resolving them is :func:`to_user_events`'s
job.  Ordering everywhere is by timestamp, then by arrival (ties keep the order they were appended in).
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import operator
import sqlite3
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

from redrec.data.store import EventStore, UserEvents
from redrec.errors import DataError

__all__ = [
    "Event",
    "HistoryError",
    "HistoryStore",
    "SQLiteHistoryStore",
    "RedisHistoryStore",
    "open_history_store",
    "to_user_events",
    "rows_to_user_events",
    "columns_to_user_events",
    "EventRow",
    "EventColumns",
    "events_from_store",
    "item_lookup",
    "check_event",
    "check_user",
    "MAX_TIMESTAMP",
    "MAX_NAME_LEN",
]

#: Largest accepted timestamp (int64, the training store's dtype).
MAX_TIMESTAMP = 2**63 - 1
#: Longest accepted user id, item id, scenario name or action name (characters).
MAX_NAME_LEN = 1024
DEFAULT_MAX_EVENTS_PER_APPEND = 10_000
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
SQLITE_FORMAT = "redrec-history"
SQLITE_VERSION = 3


class HistoryError(ValueError):
    """An invalid event, user id or argument given to a history store (or a use of a closed store).

    Attributes:
        field: the offending field (``user``, ``item``, ``scenario``, ``timestamp``, ``actions``,
            ``duration``, ``events``, ...).
        problem: what is wrong, with the offending value.
        index: position of the event in the call's batch, when the problem is one event's.
    """

    def __init__(self, field: str, problem: str, index: int | None = None):
        self.field = field
        self.problem = problem
        self.index = index
        where = f"event {index}: " if index is not None else ""
        super().__init__(f"{where}field '{field}': {problem}")

    def __reduce__(self):  # pickled with its fields (default: the message only, which __init__ cannot take)
        return type(self), (self.field, self.problem, self.index)


@dataclass(frozen=True)
class Event:
    """One interaction, by external ids and names.

    Attributes:
        item: external item id (the training store's ``item_id``).
        scenario: scenario name (``homefeed``, ``ads``, ...).
        timestamp: unix seconds, or the store's ordinal unit; a non-negative int.
        actions: engagement flag names, e.g. ``("click", "like")`` (a list is turned into a tuple).
        duration: dwell seconds, finite and >= 0 (0 when unknown).
    """

    item: str
    scenario: str
    timestamp: int
    actions: tuple[str, ...] = ()
    duration: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.actions, (list, np.ndarray)):
            object.__setattr__(self, "actions", tuple(self.actions))


# one event as the backends store it: (user, scenario, timestamp, item, actions, duration)
_Row = tuple[str, str, int, str, tuple[str, ...], float]
# one event as read back: (item, scenario, timestamp, actions, duration) -- the fields of Event, in order
EventRow = tuple[str, str, int, tuple[str, ...], float]


@dataclass(frozen=True, slots=True, eq=False)
class EventColumns:
    """One user's kept events column by column, oldest first (by timestamp, then arrival): what the serving hot
    path reads (:meth:`HistoryStore.get_many_columns`) and converts (:func:`columns_to_user_events`) without one
    Python object per event.  Row ``j`` of every column is event ``j``.

    Attributes:
        item: external item ids.
        scenario: scenario names.
        timestamp: int64 ``[n]``.
        actions: engagement flag names per event.
        duration: float64 ``[n]``.
        codes: the same items, scenarios and action sets as the history store's own ids, when it has them
            (:class:`HistoryCodes`; SQLite): :func:`columns_to_user_events` then converts by array lookups
            instead of one dict lookup per event.
    """

    item: list[str]
    scenario: list[str]
    timestamp: np.ndarray
    actions: list[tuple[str, ...]]
    duration: np.ndarray
    codes: HistoryCodes | None = None

    def __len__(self) -> int:
        return len(self.item)

    @classmethod
    def from_rows(cls, rows: Sequence[EventRow]) -> EventColumns:
        """Rows ``(item, scenario, timestamp, actions, duration)`` -> columns (same order)."""
        n = len(rows)
        if not n:
            return cls([], [], np.zeros(0, np.int64), [], np.zeros(0, np.float64))
        item, scenario, ts, actions, dur = zip(*rows, strict=True)
        return cls(list(item), list(scenario), np.fromiter(ts, np.int64, n), list(actions),
                   np.fromiter(dur, np.float64, n))

    def rows(self) -> list[EventRow]:
        """The events as rows ``(item, scenario, timestamp, actions, duration)``."""
        return list(zip(self.item, self.scenario, self.timestamp.tolist(), self.actions, self.duration.tolist(),
                        strict=True))

    def events(self) -> list[Event]:
        """The events as :class:`Event` s."""
        return [Event(*r) for r in self.rows()]


@dataclass(frozen=True, slots=True, eq=False)
class HistoryCodes:
    """The columns of :class:`EventColumns` as a history store's own ids (``int32 [n]`` each): ``item`` (ids of
    its item table), ``scenario`` and ``actions`` (ids of its scenario and action-set tables), with the
    :class:`HistoryVocab` that names them."""

    item: np.ndarray
    scenario: np.ndarray
    actions: np.ndarray
    vocab: HistoryVocab


class HistoryVocab:
    """A history store's id tables -- item ids, scenario names and action sets by the store's own integer ids --
    and, per training store, the arrays that turn those ids into the training store's item indices, scenario
    indices and action bit masks, so that converting a stored history (:func:`columns_to_user_events`) is a few
    numpy gathers instead of a dict lookup per event.  The tables only grow (the history store appends what
    other processes wrote); the arrays are extended for the new ids when next asked for.

    Attributes:
        items, scenarios, action_sets: object arrays, id -> item id / scenario name / tuple of action names
            (``None`` where no row has that id).
    """

    def __init__(self) -> None:
        self.items = np.empty(0, dtype=object)
        self.scenarios = np.empty(0, dtype=object)
        self.action_sets = np.empty(0, dtype=object)
        self._maps: weakref.WeakKeyDictionary[EventStore, tuple[np.ndarray, np.ndarray, np.ndarray]] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def add(self, table: str, rows: Sequence[tuple[int, Any]]) -> None:
        """Set ``rows`` ``(id, value)`` in table ``items``, ``scenarios`` or ``action_sets`` (replaced by a longer
        array when an id is past its end: readers holding the old one are unaffected)."""
        if not rows:
            return
        with self._lock:
            old = getattr(self, table)
            out = old
            size = max(len(old), max(i for i, _ in rows) + 1)
            if size > len(old):
                out = np.empty(size, dtype=object)
                out[: len(old)] = old
            for i, v in rows:
                out[i] = v
            setattr(self, table, out)

    def store_maps(self, store: EventStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(item, scenario, actions)`` int64 arrays over this vocabulary's ids: the ``store``'s item index and
        scenario index (-1: unknown to the store, or no such id) and the action bit mask (-1: a set with a name
        the store does not have)."""
        with self._lock:
            items, scenarios, sets = self.items, self.scenarios, self.action_sets
            it, sc, ac = self._maps.get(store) or (np.zeros(0, np.int64),) * 3
            if len(it) < len(items):
                tail = items[len(it):]
                named = np.flatnonzero([x is not None for x in tail.tolist()])
                new = np.full(len(tail), -1, dtype=np.int64)
                if len(named):
                    new[named] = item_lookup(store)(tail[named].tolist())
                it = np.concatenate([it, new])
            if len(sc) != len(scenarios):
                scen_of = {name: i for i, name in enumerate(store.scenarios)}
                sc = np.array([scen_of.get(name, -1) for name in scenarios.tolist()], dtype=np.int64)
            if len(ac) != len(sets):
                bit_of = {a: 1 << i for i, a in enumerate(store.actions_names)}
                ac = np.array([-1 if acts is None or any(a not in bit_of for a in acts) else _mask(acts, bit_of)
                               for acts in sets.tolist()], dtype=np.int64)
            self._maps[store] = (it, sc, ac)
            return it, sc, ac


def _mask(actions: Sequence[str], bit_of: dict[str, int]) -> int:
    """Bit mask of the known names in ``actions`` (``bit_of``: a store's action name -> bit)."""
    return functools.reduce(operator.or_, (bit_of.get(a, 0) for a in actions), 0)


def _check_name(value: Any, field: str, index: int | None) -> str:
    if not isinstance(value, str):
        raise HistoryError(field, f"must be a string, got {type(value).__name__} {value!r}", index)
    if not value:
        raise HistoryError(field, "must be a non-empty string", index)
    if len(value) > MAX_NAME_LEN:
        raise HistoryError(field, f"is {len(value)} characters long; at most {MAX_NAME_LEN}", index)
    return value


def check_user(user: Any) -> str:
    """``user`` if it is a valid user id, else :class:`HistoryError`."""
    return _check_name(user, "user", None)


def check_event(event: Any, index: int | None = None) -> tuple[str, str, int, tuple[str, ...], float]:
    """Validate one event; returns its normalized ``(item, scenario, timestamp, actions, duration)``.

    Raises:
        HistoryError: naming the field (and ``index``) when the event is invalid.
    """
    if not isinstance(event, Event):
        raise HistoryError("event", f"expected an Event, got {type(event).__name__}", index)
    item = _check_name(event.item, "item", index)
    scenario = _check_name(event.scenario, "scenario", index)
    ts = event.timestamp
    if isinstance(ts, (bool, np.bool_)) or not isinstance(ts, (int, np.integer)):
        raise HistoryError("timestamp", f"must be an int, got {type(ts).__name__} {ts!r}", index)
    ts = int(ts)
    if not 0 <= ts <= MAX_TIMESTAMP:
        raise HistoryError("timestamp", f"must be in [0, 2**63), got {ts}", index)
    actions = event.actions
    if isinstance(actions, str) or not isinstance(actions, tuple):
        raise HistoryError("actions", f"must be a tuple of action names, got {type(actions).__name__} {actions!r}", index)
    for a in actions:
        _check_name(a, "actions", index)
    dur = event.duration
    if isinstance(dur, (bool, np.bool_)) or not isinstance(dur, (int, float, np.integer, np.floating)):
        raise HistoryError("duration", f"must be a number, got {type(dur).__name__} {dur!r}", index)
    dur = float(dur)
    if not math.isfinite(dur) or dur < 0:
        raise HistoryError("duration", f"must be finite and >= 0, got {dur}", index)
    return item, scenario, ts, actions, dur


class HistoryStore(ABC):
    """Each user's kept events: the last ``max_per_scenario`` of every scenario.

    Implementations are thread-safe.  Use as a context manager, or call :meth:`close`.

    Args:
        max_per_scenario: events kept per (user, scenario); older ones are deleted when newer ones arrive and
            are never returned.
        max_events_per_append: most events one :meth:`append` / :meth:`append_many` call may carry.
    """

    def __init__(self, max_per_scenario: int = 128, max_events_per_append: int = DEFAULT_MAX_EVENTS_PER_APPEND):
        for name, v in (("max_per_scenario", max_per_scenario), ("max_events_per_append", max_events_per_append)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise HistoryError(name, f"must be an int >= 1, got {v!r}")
        self.max_per_scenario = int(max_per_scenario)
        self.max_events_per_append = int(max_events_per_append)
        self._closed = False

    # -- public API ------------------------------------------------------------------------------------------
    def append(self, user: str, events: Sequence[Event]) -> int:
        """Store ``events`` of ``user`` in one transaction; durable when it returns.

        Returns:
            the number of events written (events older than the user's kept window of their scenario are
            trimmed right away, and are never returned).

        Raises:
            HistoryError: an invalid user id or event (nothing is stored then), or too many events.
        """
        check_user(user)
        if isinstance(events, Event):
            raise HistoryError("events", "expected a sequence of Event, got a single Event")
        return self.append_many([(user, e) for e in events])

    def append_many(self, batch: Sequence[tuple[str, Event]]) -> int:
        """Store ``(user, event)`` pairs of many users in one transaction (all or nothing); durable when it
        returns.  Events of one user keep their order in ``batch`` as arrival order."""
        self._check_open()
        batch = list(batch)
        if len(batch) > self.max_events_per_append:
            raise HistoryError(
                "events", f"{len(batch)} events in one append; at most {self.max_events_per_append} "
                "(max_events_per_append)",
            )
        rows: list[_Row] = []
        for i, pair in enumerate(batch):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise HistoryError("batch", f"expected (user, Event) pairs, got {type(pair).__name__}", i)
            user, event = pair
            _check_name(user, "user", i)
            item, scenario, ts, actions, dur = check_event(event, i)
            rows.append((user, scenario, ts, item, actions, dur))
        if not rows:
            return 0
        self._write(rows)
        return len(rows)

    def get(self, user: str) -> list[Event]:
        """The kept events of ``user``, oldest first (by timestamp, then arrival); ``[]`` for an unknown user."""
        return self.get_many([user])[0]

    def get_many(self, users: Sequence[str]) -> list[list[Event]]:
        """:meth:`get` of each of ``users`` (one snapshot where the backend allows)."""
        return [c.events() for c in self.get_many_columns(users)]

    def get_many_rows(self, users: Sequence[str]) -> list[list[EventRow]]:
        """:meth:`get_many` as plain tuples ``(item, scenario, timestamp, actions, duration)`` (the fields of
        :class:`Event`, in order; checked when they were appended)."""
        return [c.rows() for c in self.get_many_columns(users)]

    def get_many_columns(self, users: Sequence[str]) -> list[EventColumns]:
        """:meth:`get_many` column by column (:class:`EventColumns`): no Python object per event, for the
        serving hot path (:func:`columns_to_user_events`)."""
        self._check_open()
        users = [users] if isinstance(users, str) else list(users)
        for u in users:
            check_user(u)
        if not users:
            return []
        return self._read_columns(users)

    @abstractmethod
    def n_users(self) -> int:
        """Number of users with at least one stored event."""

    def prepare(self, store: EventStore) -> None:
        """Make ready whatever converting this store's histories for ``store`` needs, so the first reads do not
        pay for it (the service calls it at start-up and before swapping in a reloaded model).  Default: nothing
        (Redis); SQLite: its id tables read and mapped to ``store``'s indices (:class:`HistoryVocab`)."""
        self._check_open()

    def close(self) -> None:
        """Release connections (idempotent).  Call once no other thread uses the store."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for the backends ------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise HistoryError("store", f"{type(self).__name__} is closed")

    @abstractmethod
    def _write(self, rows: list[_Row]) -> None:
        """Store validated rows atomically and durably, then trim each touched (user, scenario)."""

    def _read(self, users: list[str]) -> list[list[EventRow]]:
        """Kept events of each user as rows, oldest first (may hold more than ``max_per_scenario`` per scenario
        when the data was written with a larger limit: :meth:`_read_columns` trims).  A backend implements this
        or :meth:`_read_columns`."""
        raise NotImplementedError

    def _read_columns(self, users: list[str]) -> list[EventColumns]:
        """Kept events of each user (at most ``max_per_scenario`` per scenario), column by column."""
        return [EventColumns.from_rows(self._keep_last(rows)) for rows in self._read(users)]

    def _keep_last(self, rows: list[EventRow]) -> list[EventRow]:
        """Drop all but the last ``max_per_scenario`` rows of each scenario (``rows`` oldest first); for
        data written with a larger limit than this store's."""
        n = self.max_per_scenario
        if len(rows) <= n:
            return rows
        counts: dict[str, int] = {}
        keep = []
        for r in reversed(rows):
            c = counts.get(r[1], 0) + 1
            counts[r[1]] = c
            if c <= n:
                keep.append(r)
        keep.reverse()
        return keep


def _encode_actions(actions: tuple[str, ...]) -> str:
    return json.dumps(actions, ensure_ascii=False, separators=(",", ":")) if actions else ""


@functools.lru_cache(maxsize=4096)
def _decode_actions(text: str) -> tuple[str, ...]:  # few distinct action sets: decode each once
    return tuple(json.loads(text)) if text else ()


# ---------------------------------------------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------------------------------------------
# format 3: one row per (user, scenario) holding its kept window, oldest first.  ``items`` / ``actions`` /
# ``ts`` / ``seq`` (arrival numbers) / ``duration``: little-endian int32 (ids in ``items``) / int32 (ids in
# ``action_sets``) / int64 / int64 / float64 arrays.  Converted when opened: format 1 (a row per event) and
# format 2 (``items`` a JSON array of item ids).
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS users(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS scenarios(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS action_sets(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS windows(user INTEGER NOT NULL, scenario INTEGER NOT NULL, items BLOB NOT NULL, "
    "actions BLOB NOT NULL, ts BLOB NOT NULL, seq BLOB NOT NULL, duration BLOB NOT NULL, "
    "PRIMARY KEY (user, scenario)) WITHOUT ROWID",
)
_WINDOW = "SELECT items, actions, ts, seq, duration FROM windows WHERE user = ? AND scenario = ?"
_PUT_WINDOW = "INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?, ?, ?)"
_SET_NEXT_SEQ = "UPDATE meta SET value = ? WHERE key = 'next_seq'"
_READ_CHUNK = 500  # users per read statement (SQLite allows 32,766 parameters)


class _Window:
    """The kept events of one (user, scenario), oldest first (timestamp, then arrival ``seq``); ``items`` and
    ``actions`` are ids of the ``items`` and ``action_sets`` tables."""

    __slots__ = ("items", "actions", "ts", "seq", "duration")

    def __init__(self, items: np.ndarray, actions: np.ndarray, ts: np.ndarray, seq: np.ndarray, duration: np.ndarray):
        self.items, self.actions, self.ts, self.seq, self.duration = items, actions, ts, seq, duration

    @classmethod
    def decode(cls, items: bytes, actions: bytes, ts: bytes, seq: bytes, duration: bytes) -> _Window:
        return cls(np.frombuffer(items, "<i4"), np.frombuffer(actions, "<i4"), np.frombuffer(ts, "<i8"),
                   np.frombuffer(seq, "<i8"), np.frombuffer(duration, "<f8"))

    def encode(self) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        return (self.items.astype("<i4").tobytes(), self.actions.astype("<i4").tobytes(),
                self.ts.astype("<i8").tobytes(), self.seq.astype("<i8").tobytes(),
                self.duration.astype("<f8").tobytes())

    def __len__(self) -> int:
        return len(self.items)

    def last(self, n: int) -> _Window:
        """The newest ``n`` events."""
        if len(self) <= n:
            return self
        return _Window(self.items[-n:], self.actions[-n:], self.ts[-n:], self.seq[-n:], self.duration[-n:])

    def __add__(self, other: _Window) -> _Window:
        return _Window(np.concatenate([self.items, other.items]), np.concatenate([self.actions, other.actions]),
                       np.concatenate([self.ts, other.ts]), np.concatenate([self.seq, other.seq]),
                       np.concatenate([self.duration, other.duration]))

    def sorted(self) -> _Window:
        """The events in (timestamp, arrival) order."""
        order = np.lexsort((self.seq, self.ts))
        return _Window(self.items[order], self.actions[order], self.ts[order], self.seq[order], self.duration[order])


class SQLiteHistoryStore(HistoryStore):
    """History in one SQLite file (or in memory).

    Table ``windows(user, scenario, items, actions, ts, seq, duration)``: one row per (user, scenario) holding
    its last ``max_per_scenario`` events, oldest first, as packed arrays (little-endian int32 ids of the
    ``items`` and ``action_sets`` tables, int64 timestamps and arrival numbers, float64 durations).  A read is
    one statement for a batch of users that returns a few rows per user, not one per event, and gives the
    events' ids with the names (:class:`HistoryCodes`), so the conversion for a model looks each item id up
    once per store, not once per read.  An append rewrites the windows it touches (merge by timestamp, then
    arrival; keep the last ``max_per_scenario``) in one ``BEGIN IMMEDIATE`` transaction.  The WAL journal lets
    readers run while a writer commits.  Files of the earlier formats (version 1: one row per event; version
    2: item ids as JSON text in the windows) are converted in place, in one transaction, when opened.

    Thread safety: every thread gets its own connection (connections of finished threads are closed); the
    writers of this process take turns on a lock, writers of other processes wait up to ``timeout`` seconds
    for SQLite's file lock.  ``":memory:"`` is one connection shared under that lock (tests, demos).

    Durability: ``synchronous="FULL"`` (default) fsyncs the WAL at every commit, so a returned append
    survives a process kill and a power loss; ``"NORMAL"`` survives a process kill but may lose the last
    commits on power loss (faster).

    Args:
        path: database file (its folder is created), or ``":memory:"``.
        max_per_scenario: events kept per (user, scenario).
        synchronous: SQLite ``PRAGMA synchronous``: ``OFF``, ``NORMAL``, ``FULL`` or ``EXTRA``.
        max_events_per_append: most events in one append call.
        timeout: seconds to wait for another process's write lock.
    """

    def __init__(
        self,
        path: str | Path,
        max_per_scenario: int = 128,
        synchronous: str = "FULL",
        *,
        max_events_per_append: int = DEFAULT_MAX_EVENTS_PER_APPEND,
        timeout: float = 30.0,
    ):
        super().__init__(max_per_scenario, max_events_per_append)
        sync = str(synchronous).upper()
        if sync not in SYNCHRONOUS_MODES:
            raise HistoryError("synchronous", f"must be one of {list(SYNCHRONOUS_MODES)}, got {synchronous!r}")
        self.synchronous = sync
        self.timeout = float(timeout)
        self.memory = str(path) == ":memory:"
        self.path: str | Path = ":memory:" if self.memory else Path(path)
        self._lock = threading.RLock()  # this process's writers (and every use of the :memory: connection)
        self._local = threading.local()
        self._conns: dict[int, tuple[weakref.ref[threading.Thread], sqlite3.Connection]] = {}
        self._conns_lock = threading.Lock()
        self._shared: sqlite3.Connection | None = None
        self.vocab = HistoryVocab()  # the id tables as read so far (this process and others append to them)
        if not self.memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._connect()
            if self.memory:
                self._shared = conn
            else:
                self._register(conn)
            self._init_schema(conn)
        except sqlite3.DatabaseError as e:
            self.close()
            raise HistoryError("path", f"{str(self.path)!r} is not a usable history database: {e}") from None
        except BaseException:
            self.close()
            raise

    # -- connections -----------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn

    def _register(self, conn: sqlite3.Connection) -> None:
        with self._conns_lock:
            for key, (thread_ref, c) in list(self._conns.items()):  # close connections of finished threads
                t = thread_ref()
                if t is None or not t.is_alive():
                    c.close()
                    del self._conns[key]
            self._conns[id(conn)] = (weakref.ref(threading.current_thread()), conn)
        self._local.conn = conn

    def _conn(self) -> sqlite3.Connection:
        self._check_open()
        if self._shared is not None:
            return self._shared
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._register(conn)
        return conn

    def _read_lock(self) -> Any:
        return self._lock if self.memory else nullcontext()

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        if not self.memory:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent in the file; needs no open transaction
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                conn.executemany(
                    "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                    [("format", SQLITE_FORMAT), ("version", str(SQLITE_VERSION))],
                )
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                version = meta.get("version")
                if meta.get("format") != SQLITE_FORMAT or version not in ("1", "2", str(SQLITE_VERSION)):
                    raise HistoryError(
                        "path", f"{str(self.path)!r} holds format {meta.get('format')!r} version "
                        f"{version!r}, expected {SQLITE_FORMAT!r} version {SQLITE_VERSION}",
                    )
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', '1')")
                if version == "1":
                    self._upgrade_v1(conn)
                elif version == "2":
                    self._upgrade_v2(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _upgrade_v1(self, conn: sqlite3.Connection) -> None:
        """Convert a version-1 file (table ``events``, one row per event; its rowid is the arrival number) to
        windows, inside the caller's transaction."""
        has_events = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone()
        last_seq = 0
        if has_events:
            cur = conn.execute("SELECT user, scenario, ts, seq, item, actions, duration FROM events "
                               "ORDER BY user, scenario, ts, seq")
            for (user, scenario), group in itertools.groupby(cur, key=lambda r: (r[0], r[1])):
                rows = list(group)
                acts = np.array([self._name_id(conn, "action_sets", r[5]) for r in rows], np.int32)
                codes = self._item_codes(conn, [r[4] for r in rows])
                w = _Window(np.array([codes[r[4]] for r in rows], np.int32), acts, np.array([r[2] for r in rows], np.int64),
                            np.array([r[3] for r in rows], np.int64), np.array([r[6] for r in rows], np.float64))
                last_seq = max(last_seq, int(w.seq.max()))
                conn.execute(_PUT_WINDOW, (user, scenario, *w.encode()))
            conn.execute("DROP TABLE events")
        conn.execute(_SET_NEXT_SEQ, (str(last_seq + 1),))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(SQLITE_VERSION),))

    def _upgrade_v2(self, conn: sqlite3.Connection) -> None:
        """Convert a version-2 file (each window's item ids as a JSON array) to item table ids, inside the
        caller's transaction."""
        rows = conn.execute("SELECT user, scenario, items FROM windows").fetchall()
        for user, scenario, text in rows:
            names = orjson.loads(text)
            codes = self._item_codes(conn, names)
            packed = np.array([codes[x] for x in names], dtype="<i4").tobytes()
            conn.execute("UPDATE windows SET items = ? WHERE user = ? AND scenario = ?", (packed, user, scenario))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(SQLITE_VERSION),))

    # -- writes and reads ------------------------------------------------------------------------------------
    def _write(self, rows: list[_Row]) -> None:
        with self._lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq0 = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
                groups: dict[tuple[str, str], list[int]] = {}
                for i, r in enumerate(rows):
                    groups.setdefault((r[0], r[1]), []).append(i)
                user_ids = {u: self._name_id(conn, "users", u) for u in dict.fromkeys(r[0] for r in rows)}
                scen_ids = {s: self._name_id(conn, "scenarios", s) for s in dict.fromkeys(r[1] for r in rows)}
                set_ids = {a: self._name_id(conn, "action_sets", _encode_actions(a)) for a in dict.fromkeys(r[4] for r in rows)}
                item_ids = self._item_codes(conn, list(dict.fromkeys(r[3] for r in rows)))
                for (u, s), idx in groups.items():
                    key = (user_ids[u], scen_ids[s])
                    new = _Window(np.array([item_ids[rows[i][3]] for i in idx], np.int32),
                                  np.array([set_ids[rows[i][4]] for i in idx], np.int32),
                                  np.array([rows[i][2] for i in idx], np.int64), seq0 + np.array(idx, np.int64),
                                  np.array([rows[i][5] for i in idx], np.float64))
                    old = conn.execute(_WINDOW, key).fetchone()
                    w = (new if old is None else _Window.decode(*old) + new).sorted().last(self.max_per_scenario)
                    conn.execute(_PUT_WINDOW, (*key, *w.encode()))
                conn.execute(_SET_NEXT_SEQ, (str(seq0 + len(rows)),))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _name_id(conn: sqlite3.Connection, table: str, name: str) -> int:
        row = conn.execute(f"SELECT id FROM {table} WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return int(row[0])
        return int(conn.execute(f"INSERT INTO {table}(name) VALUES (?)", (name,)).lastrowid)

    @staticmethod
    def _item_codes(conn: sqlite3.Connection, names: Sequence[str]) -> dict[str, int]:
        """Ids in the ``items`` table of the distinct ``names`` (new ones inserted), in the caller's
        transaction: one statement per 500 names, plus one per new name."""
        names = list(dict.fromkeys(names))
        out: dict[str, int] = {}
        for a in range(0, len(names), _READ_CHUNK):
            chunk = names[a : a + _READ_CHUNK]
            out.update(conn.execute(f"SELECT name, id FROM items WHERE name IN ({','.join('?' * len(chunk))})",
                                    chunk).fetchall())
        for name in names:
            if name not in out:
                out[name] = int(conn.execute("INSERT INTO items(name) VALUES (?)", (name,)).lastrowid)
        return out

    def _refresh_vocab(self, conn: sqlite3.Connection, items: int, scenarios: int, action_sets: int) -> HistoryVocab:
        """:attr:`vocab` covering item / scenario / action-set ids below the given bounds (the rows past what
        was read so far -- written since, by any process -- read on the caller's connection)."""
        v = self.vocab  # two threads may both read the same new rows: setting them twice is harmless
        if items > len(v.items):
            v.add("items", conn.execute("SELECT id, name FROM items WHERE id >= ?", (len(v.items),)).fetchall())
        if scenarios > len(v.scenarios):
            v.add("scenarios", conn.execute("SELECT id, name FROM scenarios").fetchall())
        if action_sets > len(v.action_sets):
            rows = conn.execute("SELECT id, name FROM action_sets").fetchall()
            v.add("action_sets", [(i, _decode_actions(name)) for i, name in rows])
        return v

    def _read_columns(self, users: list[str]) -> list[EventColumns]:
        found: dict[str, list[tuple[int, _Window]]] = {u: [] for u in users}
        names = list(found)
        n = self.max_per_scenario
        with self._read_lock():
            conn = self._conn()
            snapshot = len(names) > _READ_CHUNK and not conn.in_transaction
            if snapshot:
                conn.execute("BEGIN")  # one read snapshot for all users
            try:
                for a in range(0, len(names), _READ_CHUNK):
                    chunk = names[a : a + _READ_CHUNK]
                    cur = conn.execute(
                        "SELECT u.name, w.scenario, w.items, w.actions, w.ts, w.seq, w.duration FROM users u "
                        f"JOIN windows w ON w.user = u.id WHERE u.name IN ({','.join('?' * len(chunk))})", chunk)
                    for name, sid, *packed in cur:
                        found[name].append((sid, _Window.decode(*packed).last(n)))
                pairs = [p for ps in found.values() for p in ps]
                items = np.concatenate([w.items for _, w in pairs] or [np.zeros(0, np.int32)])
                acts = np.concatenate([w.actions for _, w in pairs] or [np.zeros(0, np.int32)])
                vocab = self._refresh_vocab(conn, int(items.max(initial=-1)) + 1,
                                            max((sid for sid, _ in pairs), default=-1) + 1, int(acts.max(initial=-1)) + 1)
            finally:
                if snapshot and conn.in_transaction:
                    conn.execute("COMMIT")
        return [_columns(found[u], vocab) for u in users]

    def n_users(self) -> int:
        with self._read_lock():
            return int(self._conn().execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def prepare(self, store: EventStore) -> None:
        """Read every row of the id tables now and map them to ``store`` (:meth:`HistoryVocab.store_maps`): one
        dict lookup per item id, once per store, instead of inside the first requests."""
        self._check_open()
        with self._read_lock():
            conn = self._conn()
            tops = [conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {t}").fetchone()[0]
                    for t in ("items", "scenarios", "action_sets")]
            self._refresh_vocab(conn, tops[0] + 1, tops[1] + 1, tops[2] + 1)
        self.vocab.store_maps(store)

    def close(self) -> None:
        super().close()
        with self._conns_lock:
            for _, conn in self._conns.values():
                conn.close()
            self._conns.clear()
        if self._shared is not None:
            with self._lock:
                self._shared.close()
            self._shared = None

    def __repr__(self) -> str:
        return f"SQLiteHistoryStore({str(self.path)!r}, max_per_scenario={self.max_per_scenario})"


def _columns(windows: list[tuple[int, _Window]], vocab: HistoryVocab) -> EventColumns:
    """Per-scenario windows ``(scenario id, window)`` of one user -> :class:`EventColumns` with their
    :class:`HistoryCodes`, in (timestamp, arrival) order (numpy gathers, no Python work per event)."""
    if not windows:
        return EventColumns.from_rows([])
    if len(windows) == 1:
        items, acts, ts, dur = windows[0][1].items, windows[0][1].actions, windows[0][1].ts, windows[0][1].duration
        scen = np.full(len(items), windows[0][0], dtype=np.int32)
    else:
        ts = np.concatenate([w.ts for _, w in windows])
        order = np.lexsort((np.concatenate([w.seq for _, w in windows]), ts))
        ts = ts[order]
        items = np.concatenate([w.items for _, w in windows])[order]
        acts = np.concatenate([w.actions for _, w in windows])[order]
        dur = np.concatenate([w.duration for _, w in windows])[order]
        scen = np.repeat(np.array([s for s, _ in windows], dtype=np.int32), [len(w) for _, w in windows])[order]
    codes = HistoryCodes(items.astype(np.int32, copy=False), scen, acts.astype(np.int32, copy=False), vocab)
    return EventColumns(vocab.items[items].tolist(), vocab.scenarios[scen].tolist(), ts.astype(np.int64),
                        vocab.action_sets[acts].tolist(), dur.astype(np.float64), codes)


# ---------------------------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------------------------
class RedisHistoryStore(HistoryStore):
    """History in Redis: one sorted set per (user, scenario).

    Keys (``P`` = ``prefix``): ``P ev:<len(user)>:<user>:<scenario>`` (sorted set of the kept events),
    ``P sc:<user>`` (set of the user's scenarios), ``P users`` (set of users), ``P seq`` (arrival counter).
    Every member has score 0 and reads ``<timestamp: 16 hex><seq: 16 hex><json [item, actions, duration]>``,
    so Redis orders a set by (timestamp, arrival) exactly (no float rounding of large timestamps) and
    ``ZREMRANGEBYRANK key 0 -(N+1)`` keeps the last N.  An append reserves its arrival numbers with
    ``INCRBY`` and then writes all its sets and trims them in one ``MULTI``/``EXEC`` transaction (all or
    nothing; a single Redis node, not Redis Cluster).  A read is two pipelined round trips (the user's
    scenarios, then their sets).

    Durability -- an acknowledged append survives a Redis crash or restart only when the server runs with
    ``appendonly yes`` and ``appendfsync always`` (Redis then fsyncs the append-only file before it answers
    ``EXEC``).  With the default ``appendfsync everysec`` up to about a second of acknowledged appends can be
    lost on a crash, and with RDB snapshots alone (``save ...``) everything since the last snapshot.  Keep
    ``aof-load-truncated yes`` (the default: a transaction cut by the crash is dropped, not an error) and
    ``maxmemory-policy noeviction`` (otherwise Redis may evict histories when memory is full).

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://...`` or ``unix:///path.sock?db=0``.
        max_per_scenario: events kept per (user, scenario).
        prefix: prefix of every key (several stores can share a database).
        max_events_per_append: most events in one append call.
        socket_timeout: seconds before a command without an answer fails.
        client: an existing ``redis.Redis`` (``url`` is then ignored).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        max_per_scenario: int = 128,
        prefix: str = "redrec:",
        *,
        max_events_per_append: int = DEFAULT_MAX_EVENTS_PER_APPEND,
        socket_timeout: float | None = 10.0,
        client: Any = None,
    ):
        super().__init__(max_per_scenario, max_events_per_append)
        try:
            import redis
        except ImportError:
            raise ImportError("RedisHistoryStore needs the redis client: pip install redis") from None
        self.url = url
        self.prefix = str(prefix)
        self._redis = redis
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        self._r = client
        try:
            self._r.ping()
        except redis.exceptions.ConnectionError as e:
            self._r.close()
            raise ConnectionError(f"cannot reach Redis at {url}: {e}") from None

    def _ev_key(self, user: str, scenario: str) -> str:
        return f"{self.prefix}ev:{len(user)}:{user}:{scenario}"

    def _sc_key(self, user: str) -> str:
        return f"{self.prefix}sc:{user}"

    def _write(self, rows: list[_Row]) -> None:
        last = int(self._r.incrby(f"{self.prefix}seq", len(rows)))
        seq = last - len(rows) + 1
        groups: dict[tuple[str, str], dict[bytes, float]] = {}
        for user, scenario, ts, item, actions, dur in rows:
            payload = json.dumps([item, list(actions), dur], ensure_ascii=False, separators=(",", ":"))
            groups.setdefault((user, scenario), {})[f"{ts:016x}{seq:016x}{payload}".encode()] = 0.0
            seq += 1
        pipe = self._r.pipeline(transaction=True)
        for (user, scenario), members in groups.items():
            key = self._ev_key(user, scenario)
            pipe.zadd(key, members)
            pipe.zremrangebyrank(key, 0, -(self.max_per_scenario + 1))
            pipe.sadd(self._sc_key(user), scenario)
        pipe.sadd(f"{self.prefix}users", *dict.fromkeys(r[0] for r in rows))
        pipe.execute()

    def _read(self, users: list[str]) -> list[list[EventRow]]:
        pipe = self._r.pipeline(transaction=False)
        for u in users:
            pipe.smembers(self._sc_key(u))
        scen_sets = [sorted(_text(s) for s in members) for members in pipe.execute()]
        pipe = self._r.pipeline(transaction=False)
        for u, scens in zip(users, scen_sets, strict=True):
            for s in scens:
                pipe.zrange(self._ev_key(u, s), -self.max_per_scenario, -1)
        sets = iter(pipe.execute())
        out = []
        for scens in scen_sets:
            keyed = []
            for s in scens:
                for m in next(sets):
                    m = _text(m)
                    item, actions, dur = json.loads(m[32:])
                    keyed.append((m[:32], (item, s, int(m[:16], 16), tuple(actions), float(dur))))
            keyed.sort(key=lambda x: x[0])
            out.append([e for _, e in keyed])
        return out

    def n_users(self) -> int:
        self._check_open()
        return int(self._r.scard(f"{self.prefix}users"))

    def close(self) -> None:
        if not self._closed:
            self._r.close()
        super().close()

    def __repr__(self) -> str:
        return f"RedisHistoryStore({self.url!r}, max_per_scenario={self.max_per_scenario}, prefix={self.prefix!r})"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_history_store(url: str, max_per_scenario: int = 128, **options: Any) -> HistoryStore:
    """Open a history store from a URL.

    * ``sqlite:///abs/path.db`` (absolute), ``sqlite://relative.db`` (relative to the working directory),
      ``:memory:`` or ``sqlite://:memory:`` (in memory, lost on exit) -> :class:`SQLiteHistoryStore`;
    * ``redis://host:port/db``, ``rediss://...``, ``unix:///path.sock`` -> :class:`RedisHistoryStore`.

    ``options`` go to the backend (``synchronous``, ``timeout``, ``prefix``, ``max_events_per_append``, ...).
    """
    if not isinstance(url, str) or not url:
        raise HistoryError("url", f"must be a non-empty string, got {url!r}")
    if url in (":memory:", "sqlite://:memory:", "sqlite:///:memory:"):
        return SQLiteHistoryStore(":memory:", max_per_scenario, **options)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path:
            raise HistoryError("url", f"{url!r} names no database file (sqlite:///abs/path.db or sqlite://rel.db)")
        return SQLiteHistoryStore(path, max_per_scenario, **options)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHistoryStore(url, max_per_scenario, **options)
    raise HistoryError(
        "url", f"unsupported history store {url!r}; use sqlite:///abs/path.db, sqlite://relative.db, :memory: "
        "or redis://host:port/db",
    )


# ---------------------------------------------------------------------------------------------------------------
# conversion to the training store's representation
# ---------------------------------------------------------------------------------------------------------------
class _ItemIdMap:
    """Item id -> index of one store: a dict built once per store (about 100 bytes per item; lookups of a user's
    few hundred ids take microseconds, where sorted-string bisection took milliseconds at 1M items)."""

    def __init__(self, store: EventStore):
        self.index = {str(x): i for i, x in enumerate(store.item_ids.tolist())}

    def __call__(self, item_ids: Sequence[str]) -> np.ndarray:
        get = self.index.get
        try:  # ids are str (checked events, ids read back from a history store): no conversion
            out = np.fromiter(map(get, item_ids, itertools.repeat(-1)), dtype=np.int64, count=len(item_ids))
        except TypeError:  # an unhashable id
            return np.fromiter((get(str(i), -1) for i in item_ids), dtype=np.int64, count=len(item_ids))
        for j in np.flatnonzero(out < 0):  # not found as given: try the id's text (e.g. an int id)
            out[j] = get(str(item_ids[j]), -1)
        return out


_ITEM_LOOKUPS: weakref.WeakKeyDictionary[EventStore, _ItemIdMap] = weakref.WeakKeyDictionary()
_ITEM_LOOKUPS_LOCK = threading.Lock()


def item_lookup(store: EventStore) -> Callable[[Sequence[str]], np.ndarray]:
    """A fast ``store.item_index`` equivalent (ids -> int64 indices, -1 unknown), cached per store.

    :meth:`EventStore.item_index` hashes the whole item table on every call (~150 ms per call at 1M items);
    this builds a dict once and answers a user's few hundred ids in microseconds.
    """
    with _ITEM_LOOKUPS_LOCK:
        lookup = _ITEM_LOOKUPS.get(store)
        if lookup is None:
            lookup = _ITEM_LOOKUPS[store] = _ItemIdMap(store)
    return lookup


_ACTION_MASKS: weakref.WeakKeyDictionary[EventStore, dict[tuple[str, ...], int]] = weakref.WeakKeyDictionary()


def _action_masks(store: EventStore) -> dict[tuple[str, ...], int]:
    """Action-name set -> bit mask of ``store``'s actions, for the sets seen so far that hold known names only."""
    with _ITEM_LOOKUPS_LOCK:
        masks = _ACTION_MASKS.get(store)
        if masks is None:
            masks = _ACTION_MASKS[store] = {}
    return masks


def _check_policy(name: str, value: str) -> None:
    if value not in ("drop", "error"):
        raise HistoryError(name, f"must be 'drop' or 'error', got {value!r}")


def to_user_events(
    events: Sequence[Event],
    store: EventStore,
    *,
    user_id: str = "",
    unknown_items: Literal["drop", "error"] = "drop",
    unknown_scenarios: Literal["drop", "error"] = "error",
    unknown_actions: Literal["drop", "error"] = "error",
    item_index: Callable[[Sequence[str]], np.ndarray] | None = None,
    validate: bool = True,
) -> tuple[UserEvents, dict[str, Any]]:
    """Convert history events to the training store's :class:`UserEvents` (indices of ``store``).

    The result is sorted by timestamp (stable: ties keep their order in ``events``) and can be used with
    :func:`redrec.mixing.mix` and :func:`redrec.data.batching.user_sequence` exactly like
    ``store.user(u)``.  ``user_index`` is -1 (the user need not be in the training store) and ``target``
    is ``None``.

    Args:
        events: a user's events (e.g. :meth:`HistoryStore.get`).
        store: the training store whose item ids, scenario names and action names give the indices.
        user_id: recorded as ``UserEvents.user_id``.
        unknown_items: ``"drop"`` events whose item the store does not know (counted in the report), or
            ``"error"`` (:class:`~redrec.errors.DataError`).
        unknown_scenarios: the same for scenario names (default ``"error"``).
        unknown_actions: ``"drop"`` unknown action names from an event (the event stays), or ``"error"``.
        item_index: ids -> indices (-1 unknown); default :func:`item_lookup` of ``store`` (same answers as
            ``store.item_index``).
        validate: check every event (:func:`check_event`); ``False`` for events read back from a
            :class:`HistoryStore`, which checked them when they were appended.

    Returns:
        ``(user_events, report)``; ``report`` has ``n_events`` (given), ``n_kept`` (returned),
        ``n_unknown_items`` / ``unknown_items`` (up to 10 ids), ``n_unknown_scenarios`` /
        ``unknown_scenarios`` (names) and ``n_unknown_actions`` / ``unknown_actions`` (names).

    Raises:
        HistoryError: an invalid event or option.
        DataError: an unknown item / scenario / action under the ``"error"`` policy, naming it and (for
            scenarios and actions) the store's names.
    """
    if validate:
        checked = [check_event(e, i) for i, e in enumerate(events)]
    else:
        checked = [(e.item, e.scenario, int(e.timestamp), tuple(e.actions), float(e.duration)) for e in events]
    return rows_to_user_events(checked, store, user_id=user_id, unknown_items=unknown_items,
                               unknown_scenarios=unknown_scenarios, unknown_actions=unknown_actions,
                               item_index=item_index)


def rows_to_user_events(
    checked: Sequence[EventRow],
    store: EventStore,
    *,
    user_id: str = "",
    unknown_items: Literal["drop", "error"] = "drop",
    unknown_scenarios: Literal["drop", "error"] = "error",
    unknown_actions: Literal["drop", "error"] = "error",
    item_index: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> tuple[UserEvents, dict[str, Any]]:
    """:func:`to_user_events` of checked rows ``(item, scenario, timestamp, actions, duration)`` (e.g.
    :meth:`HistoryStore.get_many_rows`; not validated again); same arguments, result and errors."""
    return columns_to_user_events(
        EventColumns.from_rows(checked), store, user_id=user_id, unknown_items=unknown_items,
        unknown_scenarios=unknown_scenarios, unknown_actions=unknown_actions, item_index=item_index,
    )


def columns_to_user_events(
    columns: EventColumns,
    store: EventStore,
    *,
    user_id: str = "",
    unknown_items: Literal["drop", "error"] = "drop",
    unknown_scenarios: Literal["drop", "error"] = "error",
    unknown_actions: Literal["drop", "error"] = "error",
    item_index: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> tuple[UserEvents, dict[str, Any]]:
    """:func:`to_user_events` of checked events column by column (:meth:`HistoryStore.get_many_columns`; not
    validated again); same arguments, result and errors.  Columns with :class:`HistoryCodes` (and no
    ``item_index`` given) are converted by array gathers (:meth:`HistoryVocab.store_maps`); others by a few
    dict lookups per event in C (``map``)."""
    _check_policy("unknown_items", unknown_items)
    _check_policy("unknown_scenarios", unknown_scenarios)
    _check_policy("unknown_actions", unknown_actions)
    n = len(columns)
    report: dict[str, Any] = {
        "n_events": n, "n_kept": 0,
        "n_unknown_items": 0, "unknown_items": [],
        "n_unknown_scenarios": 0, "unknown_scenarios": [],
        "n_unknown_actions": 0, "unknown_actions": [],
    }

    codes = columns.codes if item_index is None else None
    if codes is not None:  # the history store's ids: gathers (item, scenario, action mask; -1 = unknown)
        it_map, sc_map, ac_map = codes.vocab.store_maps(store)
        item, scenario, masks = it_map[codes.item], sc_map[codes.scenario], ac_map[codes.actions]
    else:
        lookup = item_index or item_lookup(store)
        item = np.asarray(lookup(columns.item), dtype=np.int64).reshape(n)
    keep = item >= 0
    if not keep.all():
        bad = [columns.item[i] for i in np.flatnonzero(~keep)]
        if unknown_items == "error":
            raise DataError(
                store.path, "item", f"{len(bad)} of {n} events have item ids unknown to the store, e.g. {bad[:5]}",
                hint="pass unknown_items='drop' to skip them",
            )
        report["n_unknown_items"] = len(bad)
        report["unknown_items"] = list(dict.fromkeys(bad))[:10]

    scen_names = store.scenarios
    if codes is None:
        scen_of = {s: i for i, s in enumerate(scen_names)}
        scenario = np.fromiter(map(scen_of.get, columns.scenario, itertools.repeat(-1)), dtype=np.int64, count=n)
    if (scenario < 0).any():
        bad_s = list(dict.fromkeys(columns.scenario[i] for i in np.flatnonzero(scenario < 0)))
        if unknown_scenarios == "error":
            raise DataError(
                store.path, "scenario", f"unknown scenario {bad_s[0]!r}; this store has {scen_names}",
                hint="pass unknown_scenarios='drop' to skip such events",
            )
        report["n_unknown_scenarios"] = int((scenario < 0).sum())
        report["unknown_scenarios"] = bad_s
        keep &= scenario >= 0

    # few distinct action sets: one bit mask each, kept per store (sets in order of first use, so an error
    # names the first event with an unknown action)
    known = _action_masks(store)
    try:
        if codes is None:
            actions = np.fromiter(map(known.__getitem__, columns.actions), dtype=np.uint32, count=n)
        elif (masks < 0).any():  # a set with a name the store does not have: the name path says which
            raise KeyError
        else:
            actions = masks.astype(np.uint32)
    except KeyError:  # a set not seen before, or one with unknown names
        bit_of = {a: 1 << i for i, a in enumerate(store.actions_names)}
        mask_of: dict[tuple[str, ...], int] = {}
        bad_in: dict[tuple[str, ...], list[str]] = {}
        for acts in dict.fromkeys(columns.actions):
            unknown = [a for a in acts if a not in bit_of]
            if unknown:
                if unknown_actions == "error":
                    raise DataError(
                        store.path, "actions", f"unknown action {unknown[0]!r} (event {columns.actions.index(acts)}); "
                        f"this store has {store.actions_names}", hint="pass unknown_actions='drop' to ignore such names",
                    ) from None
                bad_in[acts] = unknown
            mask_of[acts] = _mask(acts, bit_of)
        if len(known) < 4096:  # sets of known names only: their count is bounded by the store's actions
            known.update((a, m) for a, m in mask_of.items() if a not in bad_in)
        actions = np.fromiter(map(mask_of.__getitem__, columns.actions), dtype=np.uint32, count=n)
        if bad_in:
            uses = collections.Counter(a for a in columns.actions if a in bad_in)
            report["n_unknown_actions"] = sum(len(bad_in[a]) * c for a, c in uses.items())
            report["unknown_actions"] = list(dict.fromkeys(x for names in bad_in.values() for x in names))

    timestamp = np.asarray(columns.timestamp, dtype=np.int64).reshape(n)
    duration = np.asarray(columns.duration, dtype=np.float32).reshape(n)
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(timestamp[idx], kind="stable")]
    report["n_kept"] = int(len(idx))
    user = UserEvents(
        user_index=-1,
        user_id=str(user_id),
        item=item[idx].astype(np.int32),
        scenario=scenario[idx].astype(np.int8),
        timestamp=timestamp[idx],
        actions=actions[idx],
        duration=duration[idx],
        target=None,
    )
    return user, report


def events_from_store(store: EventStore, u: int) -> list[Event]:
    """The events of training-store user index ``u`` as history :class:`Event` s (ids and names; unknown
    (NaN) or negative durations become 0) -- e.g. to seed a history store from the training data."""
    user = store.user(u)
    item_ids, scenarios, names = store.item_ids, store.scenarios, store.actions_names
    out = []
    for it, s, ts, a, d in zip(user.item, user.scenario, user.timestamp, user.actions, user.duration, strict=True):
        acts = tuple(name for b, name in enumerate(names) if int(a) >> b & 1)
        out.append(Event(str(item_ids[it]), scenarios[s], int(ts), acts, float(d) if np.isfinite(d) and d >= 0 else 0.0))
    return out
