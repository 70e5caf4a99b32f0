"""The serving history store (redrec.serve.history): both backends, durability under kill -9, conversion to
the training store's representation.

Redis tests start their own ``redis-server`` (temp dir, free port, AOF with fsync always) and skip when
``redis-server`` or the ``redis`` package is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from redrec.errors import ConfigError, DataError
from redrec.serve.history import (
    SQLITE_VERSION,
    Event,
    HistoryError,
    RedisHistoryStore,
    SQLiteHistoryStore,
    events_from_store,
    item_lookup,
    open_history_store,
    to_user_events,
)

REPO = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server")
HAVE_REDIS_PY = importlib.util.find_spec("redis") is not None
REDIS_SKIP = (
    "redis-server is not on PATH (apt-get install redis-server)" if REDIS_SERVER is None
    else "the redis Python package is not installed (pip install redis)" if not HAVE_REDIS_PY
    else None
)
needs_redis = pytest.mark.skipif(REDIS_SKIP is not None, reason=REDIS_SKIP or "")


# ---- a real redis-server ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` in ``dir`` with an fsync-always append-only file; start / kill -9 / restart."""

    def __init__(self, dir: Path):
        self.dir = dir
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--protected-mode", "no", "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
                    raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")
                time.sleep(0.05)
        finally:
            client.close()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if REDIS_SKIP:
        pytest.skip(REDIS_SKIP)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# ---- one suite, every backend ----------------------------------------------------------------------------------
BACKENDS = ["sqlite", "sqlite-memory", pytest.param("redis", marks=needs_redis)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make_store(backend, tmp_path, request):
    """``make_store(max_per_scenario=..., **kw)``: a new store of the backend; stores made with the same
    ``name`` share their data (same file / same key prefix)."""
    made = []
    tag = uuid.uuid4().hex[:8]

    def make(max_per_scenario=128, name="h", **kw):
        if backend == "sqlite":
            st = SQLiteHistoryStore(tmp_path / f"{name}.db", max_per_scenario, **kw)
        elif backend == "sqlite-memory":
            st = SQLiteHistoryStore(":memory:", max_per_scenario, **kw)
        else:
            server = request.getfixturevalue("redis_server")
            st = RedisHistoryStore(server.url, max_per_scenario, prefix=f"t{tag}{name}:", **kw)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


def ev(item, ts, scenario="homefeed", actions=(), duration=0.0):
    return Event(item, scenario, ts, tuple(actions), duration)


def test_append_get_order(make_store):
    st = make_store()
    evs = [ev("a", 30, actions=("click", "like"), duration=1.5), ev("b", 10, "ads"), ev("c", 20), ev("d", 20, "ads"),
           ev("e", 10)]
    assert st.append("u1", evs) == 5
    got = st.get("u1")
    # by timestamp, ties by arrival order (b before e at 10, c before d at 20)
    assert [e.item for e in got] == ["b", "e", "c", "d", "a"]
    assert got[-1] == Event("a", "homefeed", 30, ("click", "like"), 1.5)
    assert got[0] == Event("b", "ads", 10, (), 0.0)
    # a later append with the same timestamp comes after the earlier arrivals
    st.append("u1", [ev("f", 10), ev("g", 5)])
    assert [e.item for e in st.get("u1")] == ["g", "b", "e", "f", "c", "d", "a"]
    assert st.append("u1", []) == 0
    assert st.get("nobody") == []
    assert st.n_users() == 1


def test_ids_with_odd_characters(make_store):
    st = make_store()
    st.append("a:b", [ev("x", 1, "c")])
    st.append("a", [ev("y", 2, "b:c")])
    st.append("ü 用户", [Event("物品\n1", "场景", 3, ("点赞", 'q"uote'), 0.25)])
    assert st.get("a:b") == [ev("x", 1, "c")]
    assert st.get("a") == [ev("y", 2, "b:c")]
    assert st.get("ü 用户") == [Event("物品\n1", "场景", 3, ("点赞", 'q"uote'), 0.25)]
    big = Event("i", "s", 2**63 - 1)
    st.append("big", [big, Event("j", "s", 2**53 + 1), Event("k", "s", 2**53)])
    assert [e.item for e in st.get("big")] == ["k", "j", "i"]
    assert st.get("big")[-1] == big


def _n_stored(st, user, scenario):
    if isinstance(st, SQLiteHistoryStore):
        row = st._conn().execute(
            "SELECT w.ts FROM windows w JOIN users u ON u.id = w.user JOIN scenarios s ON s.id = w.scenario "
            "WHERE u.name = ? AND s.name = ?", (user, scenario)).fetchone()
        return 0 if row is None else len(row[0]) // 8  # int64 timestamps
    return st._r.zcard(st._ev_key(user, scenario))


def test_trim_per_scenario(make_store):
    st = make_store(max_per_scenario=3)
    st.append("u", [ev(f"h{t}", t) for t in range(5)] + [ev(f"a{t}", t, "ads") for t in range(2)])
    assert [e.item for e in st.get("u")] == ["a0", "a1", "h2", "h3", "h4"]
    st.append("u", [ev("h9", 9), ev("a9", 9, "ads"), ev("a10", 10, "ads")])
    assert [e.item for e in st.get("u")] == ["a1", "h3", "h4", "h9", "a9", "a10"]
    # an event older than the kept window is trimmed right away
    st.append("u", [ev("old", 0)])
    assert "old" not in [e.item for e in st.get("u")]
    # older events are deleted, not merely hidden
    assert _n_stored(st, "u", "homefeed") == 3
    assert _n_stored(st, "u", "ads") == 3
    # one append with more than N events of a scenario keeps its last N
    st.append("v", [ev(f"x{t}", 100 + t) for t in range(10)])
    assert [e.item for e in st.get("v")] == ["x7", "x8", "x9"]


def test_smaller_limit_on_reopen_hides_older(make_store, backend):
    if backend == "sqlite-memory":
        pytest.skip("an in-memory store cannot be reopened")
    st = make_store(max_per_scenario=5)
    st.append("u", [ev(f"h{t}", t) for t in range(5)] + [ev(f"a{t}", t, "ads") for t in range(4)])
    st.close()
    st2 = make_store(max_per_scenario=2)
    assert [e.item for e in st2.get("u")] == ["a2", "h3", "a3", "h4"]  # ties at 3: arrival order
    st3 = make_store(max_per_scenario=100)
    assert len(st3.get("u")) == 9


def test_many_users(make_store):
    st = make_store(max_per_scenario=4)
    rng = np.random.default_rng(0)
    expect = {}
    for k in range(40):
        evs = [ev(f"i{k}-{j}", int(t), ["homefeed", "ads"][j % 2]) for j, t in enumerate(rng.integers(0, 50, 6))]
        st.append(f"u{k}", evs)
        order = sorted(range(6), key=lambda j: (evs[j].timestamp, j))
        keep = [j for j in order if sum(evs[i].scenario == evs[j].scenario for i in order[order.index(j):]) <= 4]
        expect[f"u{k}"] = [evs[j] for j in keep]
    assert st.n_users() == 40
    users = [f"u{k}" for k in range(40)] + ["ghost"]
    got = st.get_many(users)
    assert got[-1] == []
    for u, g in zip(users, got, strict=True):
        if u != "ghost":
            assert g == expect[u] == st.get(u)
    assert st.get_many([]) == []


def test_append_many_atomic(make_store):
    st = make_store()
    st.append_many([("u1", ev("a", 1)), ("u2", ev("b", 2)), ("u1", ev("c", 0, "ads"))])
    assert [e.item for e in st.get("u1")] == ["c", "a"] and [e.item for e in st.get("u2")] == ["b"]
    bad = [("u1", ev("x", 5)), ("u3", ev("y", 6)), ("u4", ev("z", -1))]
    with pytest.raises(HistoryError, match=r"event 2: field 'timestamp'"):
        st.append_many(bad)
    assert [e.item for e in st.get("u1")] == ["c", "a"]
    assert st.get("u3") == [] and st.n_users() == 2
    with pytest.raises(HistoryError, match="field 'user'"):
        st.append_many([("u1", ev("x", 5)), ("", ev("y", 6))])
    assert st.n_users() == 2


def test_sqlite_failure_mid_transaction_rolls_back(tmp_path, monkeypatch):
    import redrec.serve.history as h

    st = SQLiteHistoryStore(tmp_path / "h.db")
    st.append("u1", [ev("a", 1)])
    monkeypatch.setattr(h, "_SET_NEXT_SEQ", "DELETE FROM no_such_table")  # fails after the windows are written
    with pytest.raises(Exception, match="no_such_table"):
        st.append_many([("u1", ev("b", 2)), ("u2", ev("c", 3))])
    monkeypatch.undo()
    assert [e.item for e in st.get("u1")] == ["a"] and st.n_users() == 1
    st.append("u1", [ev("d", 4)])  # the store is still usable
    assert [e.item for e in st.get("u1")] == ["a", "d"]
    st.close()


def test_threads(make_store):
    st = make_store(max_per_scenario=1000)
    n_threads, n_appends = 8, 25
    errors = []
    start = threading.Barrier(n_threads)

    def work(k):
        try:
            start.wait()
            for i in range(n_appends):
                st.append(f"t{k}", [ev(f"{k}-{i}-a", i), ev(f"{k}-{i}-b", i, "ads")])
                st.append_many([("shared", ev(f"{k}-{i}", 1000 + i))])
                got = st.get(f"t{k}")
                assert len(got) == 2 * (i + 1)
                st.get_many(["shared", f"t{(k + 1) % n_threads}"])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(n_threads):
        got = st.get(f"t{k}")
        assert [e.item for e in got] == [f"{k}-{i}-{x}" for i in range(n_appends) for x in "ab"]
    shared = st.get("shared")
    assert sorted(e.item for e in shared) == sorted(f"{k}-{i}" for k in range(n_threads) for i in range(n_appends))
    assert [e.timestamp for e in shared] == sorted(e.timestamp for e in shared)
    assert st.n_users() == n_threads + 1


def test_sqlite_version1_file_is_converted(tmp_path):
    """A file of the one-row-per-event format (version 1) is converted when opened: same events, same order
    (ties by arrival), later appends arrive after them, and the kept window is still trimmed."""
    import sqlite3

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('format', 'redrec-history'), ('version', '1');"
        "CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
        "CREATE TABLE scenarios(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
        "CREATE TABLE events(seq INTEGER PRIMARY KEY, user INTEGER NOT NULL, scenario INTEGER NOT NULL, "
        "ts INTEGER NOT NULL, item TEXT NOT NULL, actions TEXT NOT NULL, duration REAL NOT NULL);"
        "CREATE INDEX events_by_user ON events(user, scenario, ts, seq);"
        "INSERT INTO users VALUES (1, 'u'), (2, 'v');"
        "INSERT INTO scenarios VALUES (1, 'homefeed'), (2, 'ads');"
        # arrival (seq) order differs from timestamp order; 'b' and 'x' tie at ts 5 across scenarios
        "INSERT INTO events VALUES (1, 1, 1, 5, 'b', '[\"click\"]', 0.1), (2, 1, 2, 5, 'x', '', 2.5),"
        "(3, 1, 1, 2, 'a', '', 0.0), (7, 2, 1, 9, 'z', '[\"like\",\"click\"]', 1.0);"
    )
    conn.commit()
    conn.close()
    st = SQLiteHistoryStore(path, max_per_scenario=3)
    assert st.get("u") == [ev("a", 2), ev("b", 5, actions=["click"], duration=0.1), ev("x", 5, "ads", duration=2.5)]
    assert st.get("v") == [ev("z", 9, actions=["like", "click"], duration=1.0)]
    st.append("u", [ev("c", 5), ev("d", 6)])  # ts 5 again: after b and x (later arrival)
    assert [e.item for e in st.get("u")] == ["b", "x", "c", "d"]  # homefeed keeps its last 3: a is dropped
    st.close()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "events" not in tables and "windows" in tables
    assert dict(conn.execute("SELECT key, value FROM meta"))["version"] == str(SQLITE_VERSION)
    conn.close()


def test_sqlite_version2_file_is_converted(tmp_path, tiny_store):
    """A file of format 2 (each window's item ids as JSON text) is converted when opened: the same events, item
    ids now in the ``items`` table, and the hot path's conversion (by ids) equals the one by names."""
    import sqlite3

    from redrec.serve.history import columns_to_user_events, rows_to_user_events

    store = tiny_store
    a, b, c = (str(x) for x in store.item_ids[:3])
    i32 = lambda *v: np.array(v, "<i4").tobytes()  # noqa: E731
    i64 = lambda *v: np.array(v, "<i8").tobytes()  # noqa: E731
    f64 = lambda *v: np.array(v, "<f8").tobytes()  # noqa: E731
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('format', 'redrec-history'), ('version', '2'), ('next_seq', '4');"
        "CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
        "CREATE TABLE scenarios(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
        "CREATE TABLE action_sets(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
        "CREATE TABLE windows(user INTEGER NOT NULL, scenario INTEGER NOT NULL, items TEXT NOT NULL, "
        "actions BLOB NOT NULL, ts BLOB NOT NULL, seq BLOB NOT NULL, duration BLOB NOT NULL, "
        "PRIMARY KEY (user, scenario)) WITHOUT ROWID;"
        "INSERT INTO users VALUES (1, 'u');"
        f"INSERT INTO scenarios VALUES (1, '{store.scenarios[0]}'), (2, '{store.scenarios[1]}');"
        f"INSERT INTO action_sets VALUES (1, ''), (2, '[\"{store.actions_names[0]}\"]');"
    )
    conn.executemany("INSERT INTO windows VALUES (?, ?, ?, ?, ?, ?, ?)", [
        (1, 1, f'["{a}","unknown-item"]', i32(2, 1), i64(5, 7), i64(1, 3), f64(0.5, 0.0)),
        (1, 2, f'["{c}"]', i32(1), i64(6), i64(2), f64(1.0)),
    ])
    conn.commit()
    conn.close()
    st = SQLiteHistoryStore(path, max_per_scenario=4)
    s0, s1 = store.scenarios[:2]
    act = store.actions_names[0]
    assert st.get("u") == [ev(a, 5, s0, actions=[act], duration=0.5), ev(c, 6, s1, duration=1.0),
                           ev("unknown-item", 7, s0)]
    st.append("u", [ev(b, 6, s0)])  # same ts as c, later arrival
    cols = st.get_many_columns(["u"])[0]
    assert cols.item == [a, c, b, "unknown-item"] and cols.codes is not None
    assert list(cols.codes.vocab.items[cols.codes.item]) == cols.item
    fast, info = columns_to_user_events(cols, store)
    slow, info_rows = rows_to_user_events(cols.rows(), store)
    for f in ("item", "scenario", "timestamp", "actions", "duration"):
        np.testing.assert_array_equal(getattr(fast, f), getattr(slow, f), err_msg=f)
    assert info == info_rows and info["n_unknown_items"] == 1 and info["unknown_items"] == ["unknown-item"]
    st.close()
    conn = sqlite3.connect(path)
    assert dict(conn.execute("SELECT key, value FROM meta"))["version"] == str(SQLITE_VERSION)
    assert sorted(n for (n,) in conn.execute("SELECT name FROM items")) == sorted([a, b, c, "unknown-item"])
    conn.close()


def test_columns_match_rows(make_store, tiny_store):
    """The column read and conversion of the serving hot path give what the row path gives."""
    from redrec.serve.history import columns_to_user_events, rows_to_user_events

    st = make_store(max_per_scenario=4)
    items = [str(x) for x in tiny_store.item_ids[:6].tolist()] + ["unknown-item"]
    rng = np.random.default_rng(3)
    for k in range(5):
        st.append(f"u{k}", [ev(items[int(rng.integers(len(items)))], int(rng.integers(0, 20)),
                               ["homefeed", "ads"][int(rng.integers(2))], ["click"] if j % 3 else [], float(j))
                            for j in range(12)])
    users = [f"u{k}" for k in range(5)] + ["ghost"]
    cols, rows = st.get_many_columns(users), st.get_many_rows(users)
    assert [c.rows() for c in cols] == rows and len(cols[-1]) == 0
    for c, r in zip(cols, rows, strict=True):
        a, ra = columns_to_user_events(c, tiny_store)
        b, rb = rows_to_user_events(r, tiny_store)
        assert ra == rb
        for f in ("item", "scenario", "timestamp", "actions", "duration"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_sqlite_ids_written_by_another_store_object(tmp_path, tiny_store):
    """Two stores on one file (as two serving processes): items, scenarios and action sets the other one adds
    later are named and converted by the reader (its id tables are read again), the same as by names; a set
    with an action the training store lacks is the same DataError on both paths."""
    from redrec.serve.history import columns_to_user_events, rows_to_user_events

    writer, reader = SQLiteHistoryStore(tmp_path / "h.db"), SQLiteHistoryStore(tmp_path / "h.db")
    items = [str(x) for x in tiny_store.item_ids[:4].tolist()]
    writer.append("u", [ev(items[0], 1)])

    def check(expect_items):
        cols = reader.get_many_columns(["u"])[0]
        assert cols.item == expect_items and cols.rows() == writer.get_many_rows(["u"])[0]
        a, ra = columns_to_user_events(cols, tiny_store)
        b, rb = rows_to_user_events(cols.rows(), tiny_store)
        assert ra == rb
        for f in ("item", "scenario", "timestamp", "actions", "duration"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        return cols

    check([items[0]])  # the reader's maps for tiny_store now cover one item
    writer.append("u", [ev(items[1], 2, "ads", actions=["click"]), ev(items[2], 3), ev("new-item", 4)])
    cols = check([items[0], items[1], items[2], "new-item"])
    # extended for the new ids (1..4: SQLite row ids start at 1)
    assert len(cols.codes.vocab.store_maps(tiny_store)[0]) == len(cols.codes.vocab.items) == 5
    writer.append("u", [ev(items[3], 5, actions=["teleport"])])  # an action tiny_store does not have
    cols = reader.get_many_columns(["u"])[0]
    with pytest.raises(DataError, match="unknown action 'teleport'"):
        columns_to_user_events(cols, tiny_store)
    with pytest.raises(DataError, match="unknown action 'teleport'"):
        rows_to_user_events(cols.rows(), tiny_store)
    writer.close()
    reader.close()


def test_prepare_maps_every_stored_id(tmp_path, tiny_store):
    """``prepare(store)`` reads the whole id tables and maps them to ``store`` before any read (the service calls
    it at start-up and on reload); a later read needs no new mapping; Redis and closed stores: as documented."""
    writer = SQLiteHistoryStore(tmp_path / "h.db")
    items = [str(x) for x in tiny_store.item_ids[:5].tolist()]
    writer.append("u", [ev(x, t) for t, x in enumerate(items)] + [ev("unknown-item", 9, "ads", ["click"])])
    st = SQLiteHistoryStore(tmp_path / "h.db")
    assert len(st.vocab.items) == 0
    st.prepare(tiny_store)
    assert sorted(x for x in st.vocab.items.tolist() if x is not None) == sorted(items + ["unknown-item"])
    item_map, scen_map, act_map = st.vocab.store_maps(tiny_store)
    assert len(item_map) == len(st.vocab.items)
    named = [i for i, x in enumerate(st.vocab.items.tolist()) if x is not None]
    ids_list = [str(x) for x in tiny_store.item_ids.tolist()]
    want = [ids_list.index(x) if x != "unknown-item" else -1
            for x in st.vocab.items[named].tolist()]
    assert item_map[named].tolist() == want
    assert (scen_map >= 0).sum() == 2 and (act_map >= 0).sum() == 2  # homefeed, ads; (), ("click",)
    cols = st.get_many_columns(["u"])[0]
    assert st.vocab.store_maps(tiny_store)[0] is item_map  # nothing new to map
    assert cols.item == items + ["unknown-item"]
    st.close()
    with pytest.raises(HistoryError, match="closed"):
        st.prepare(tiny_store)
    writer.close()


def test_sqlite_connections_of_finished_threads_are_closed(tmp_path):
    st = SQLiteHistoryStore(tmp_path / "h.db")
    for k in range(5):
        t = threading.Thread(target=st.append, args=(f"u{k}", [ev("a", k)]))
        t.start()
        t.join()
    st.get("u0")  # the main thread's connection exists already; a new thread sweeps the dead ones
    t = threading.Thread(target=st.get, args=("u1",))
    t.start()
    t.join()
    assert len(st._conns) <= 2
    st.close()
    assert st._conns == {}


BAD_EVENTS = [
    (Event("", "homefeed", 1), "item"),
    (Event(3, "homefeed", 1), "item"),  # type: ignore[arg-type]
    (Event("a", "", 1), "scenario"),
    (Event("a", "homefeed", -1), "timestamp"),
    (Event("a", "homefeed", 1.0), "timestamp"),  # type: ignore[arg-type]
    (Event("a", "homefeed", "1"), "timestamp"),  # type: ignore[arg-type]
    (Event("a", "homefeed", True), "timestamp"),
    (Event("a", "homefeed", 2**63), "timestamp"),
    (Event("a", "homefeed", 1, duration=float("nan")), "duration"),
    (Event("a", "homefeed", 1, duration=float("inf")), "duration"),
    (Event("a", "homefeed", 1, duration=-1.0), "duration"),
    (Event("a", "homefeed", 1, actions="click"), "actions"),  # type: ignore[arg-type]
    (Event("a", "homefeed", 1, actions=("click", "")), "actions"),
    (Event("a" * 2000, "homefeed", 1), "item"),
]


def test_validation(make_store):
    st = make_store(max_events_per_append=5)
    for bad, field in BAD_EVENTS:
        with pytest.raises(HistoryError) as info:
            st.append("u", [ev("ok", 1), bad])
        assert info.value.field == field and info.value.index == 1, (bad, str(info.value))
        assert f"field '{field}'" in str(info.value)
    assert isinstance(HistoryError("x", "y"), ValueError)
    with pytest.raises(HistoryError, match="field 'user'"):
        st.append("", [ev("a", 1)])
    with pytest.raises(HistoryError, match="field 'user'"):
        st.append(None, [ev("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(HistoryError, match="field 'user'"):
        st.get("")
    with pytest.raises(HistoryError, match=r"field 'events': 6 events in one append; at most 5"):
        st.append("u", [ev("a", t) for t in range(6)])
    with pytest.raises(HistoryError, match="field 'events'"):
        st.append("u", ev("a", 1))  # type: ignore[arg-type]
    with pytest.raises(HistoryError, match="field 'event'"):
        st.append("u", [("a", "homefeed", 1)])  # type: ignore[list-item]
    assert st.get("u") == [] and st.n_users() == 0
    # accepted: numpy ints, int durations, list of actions
    st.append("u", [Event("a", "homefeed", np.int64(5), ["click"], 2), Event("b", "ads", np.int32(6))])
    assert st.get("u") == [Event("a", "homefeed", 5, ("click",), 2.0), Event("b", "ads", 6)]


def test_bad_arguments_and_close(make_store, tmp_path):
    with pytest.raises(HistoryError, match="max_per_scenario"):
        make_store(max_per_scenario=0)
    with pytest.raises(HistoryError, match="synchronous"):
        SQLiteHistoryStore(tmp_path / "x.db", synchronous="SOMETIMES")
    st = make_store()
    with st:
        st.append("u", [ev("a", 1)])
    assert st.closed
    with pytest.raises(HistoryError, match="closed"):
        st.get("u")
    with pytest.raises(HistoryError, match="closed"):
        st.append("u", [ev("a", 1)])
    st.close()  # idempotent


def test_open_history_store(tmp_path, monkeypatch):
    with open_history_store(f"sqlite://{tmp_path}/a/abs.db", max_per_scenario=7, synchronous="NORMAL") as st:
        assert isinstance(st, SQLiteHistoryStore) and st.path == tmp_path / "a" / "abs.db"
        assert st.max_per_scenario == 7 and st.synchronous == "NORMAL"
        st.append("u", [ev("a", 1)])
        mode = st._conn().execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    monkeypatch.chdir(tmp_path)
    with open_history_store("sqlite://rel.db") as st:
        assert st.path == Path("rel.db")
        st.append("u", [ev("a", 1)])
    assert (tmp_path / "rel.db").exists()
    for url in (":memory:", "sqlite://:memory:"):
        with open_history_store(url) as st:
            assert st.memory
    for url in ("", "postgres://x", "sqlite://", "/some/file.db"):
        with pytest.raises(HistoryError, match="field 'url'"):
            open_history_store(url)
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(HistoryError, match="not a usable history database"):
        open_history_store(f"sqlite://{tmp_path}/junk.db")


@needs_redis
def test_open_redis_url(redis_server):
    with open_history_store(redis_server.url, max_per_scenario=3, prefix="open:") as st:
        assert isinstance(st, RedisHistoryStore) and st.max_per_scenario == 3
        st.append("u", [ev("a", 1)])
        assert st.get("u") == [ev("a", 1)]
    with pytest.raises(ConnectionError, match="cannot reach Redis"):
        RedisHistoryStore(f"redis://127.0.0.1:{_free_port()}/0", socket_timeout=1)


# ---- durability: kill -9 mid-stream, every acknowledged event survives ----------------------------------------
WRITER = """
import sys
from redrec.serve.history import Event, open_history_store
with open_history_store(sys.argv[1], max_per_scenario=1_000_000, **({"prefix": sys.argv[2]} if len(sys.argv) > 2 else {})) as st:
    i = 0
    while True:
        st.append(f"u{i % 4}", [Event(f"i{i}-{k}", ("homefeed", "ads")[k % 2], 1000 + i, ("click",), float(k))
                                for k in range(3)])
        print(f"acked {i}", flush=True)
        i += 1
"""


def _start_writer(tmp_path, *args):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _read_acks(proc, until: int, timeout: float = 20) -> int:
    """Read "acked i" lines until ``until`` acks; returns the last acked i."""
    last = -1
    deadline = time.monotonic() + timeout
    while last + 1 < until:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer ended early: {proc.stderr.read()[-2000:]}")
        assert line.startswith("acked "), line
        last = int(line.split()[1])
        assert time.monotonic() < deadline, "writer too slow"
    return last


def _drain_acks(proc, last: int) -> int:
    """After the kill: the acks the writer printed before it died count too."""
    for line in proc.stdout.read().splitlines():
        if line.startswith("acked "):
            last = int(line.split()[1])
    return last


def _check_acked(st, last: int) -> None:
    stored = {e.item: e for u in range(4) for e in st.get(f"u{u}")}
    for i in range(last + 1):
        for k in range(3):
            e = stored.get(f"i{i}-{k}")
            assert e is not None, f"acknowledged event i{i}-{k} lost (last ack {last})"
            assert e == Event(f"i{i}-{k}", ("homefeed", "ads")[k % 2], 1000 + i, ("click",), float(k))


def test_sqlite_durable_after_kill9(tmp_path):
    db = tmp_path / "hist.db"
    proc = _start_writer(tmp_path, f"sqlite://{db}")
    try:
        _read_acks(proc, 40)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        last = _drain_acks(proc, 39)
    finally:
        if proc.poll() is None:
            proc.kill()
    with SQLiteHistoryStore(db) as st:
        assert st._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        _check_acked(st, last)


SHARED_WRITER = """
import sys
from redrec.serve.history import Event, open_history_store
tag, n = sys.argv[2], int(sys.argv[3])
with open_history_store(sys.argv[1], max_per_scenario=1_000_000) as st:
    for i in range(n):
        st.append(f"u{i % 4}", [Event(f"{tag}{i}-{k}", ("homefeed", "ads")[k % 2], 1000 + i, ("click",), float(k))
                                for k in range(3)])
"""


def test_sqlite_shared_by_processes(tmp_path):
    """Several `redrec serve` instances may share one SQLite history (a deployment behind a load balancer): two
    processes appending to the same users at once lose nothing, and each batch keeps its arrival order."""
    db = tmp_path / "hist.db"
    script = tmp_path / "shared_writer.py"
    script.write_text(SHARED_WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    n = 60
    procs = [subprocess.Popen([sys.executable, str(script), f"sqlite://{db}", tag, str(n)], stderr=subprocess.PIPE,
                              text=True, env=env) for tag in ("a", "b")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    with SQLiteHistoryStore(db, max_per_scenario=1_000_000) as st:
        for u in range(4):
            got = [e.item for e in st.get(f"u{u}")]
            want = {f"{tag}{i}-{k}" for tag in ("a", "b") for i in range(u, n, 4) for k in range(3)}
            assert len(got) == len(want) and set(got) == want, f"u{u}: {len(got)} events, {len(want)} appended"
            for tag in ("a", "b"):  # same timestamp within a batch: arrival order
                for i in range(u, n, 4):
                    pos = [got.index(f"{tag}{i}-{k}") for k in range(3)]
                    assert pos == sorted(pos), (u, tag, i, pos)


@needs_redis
def test_redis_durable_after_server_kill9(tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    proc = _start_writer(tmp_path, server.url, "dur:")
    try:
        _read_acks(proc, 40)
        server.kill9()  # the server dies mid-stream, right after acknowledging
        proc.kill()
        proc.wait()
        last = _drain_acks(proc, 39)
        server.start()  # same dir and port: replays the append-only file
        with RedisHistoryStore(server.url, max_per_scenario=1_000_000, prefix="dur:") as st:
            _check_acked(st, last)
            assert st.n_users() == 4
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()


# ---- conversion to the training store's representation ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from conftest import make_tiny_store

    from redrec.data.store import EventStore

    return EventStore(make_tiny_store(tmp_path_factory.mktemp("tiny")))


def _last_n_index(scenario: np.ndarray, n: int) -> np.ndarray:
    idx = [np.flatnonzero(scenario == s)[-n:] for s in np.unique(scenario)]
    return np.sort(np.concatenate(idx))


def test_to_user_events_round_trip(make_store, tiny_store):
    from redrec.data.batching import user_sequence
    from redrec.features import FeatureConfig
    from redrec.mixing import MixingConfig, mix

    store = tiny_store
    N = 8
    users = np.argsort(-store.history_lengths())[:3]  # the longest histories: trimming matters
    hist = make_store(max_per_scenario=N)
    for u in users:
        evs = events_from_store(store, int(u))
        for a in range(0, len(evs), 5):  # several appends, in order
            hist.append(store.user_ids[u], evs[a : a + 5])
    for u in users:
        ref = store.user(int(u))
        conv, report = to_user_events(hist.get(store.user_ids[u]), store, user_id=str(ref.user_id))
        keep = _last_n_index(np.asarray(ref.scenario), N)
        assert len(keep) < len(ref)  # trimming happened
        assert report["n_events"] == report["n_kept"] == len(keep) and report["n_unknown_items"] == 0
        for name in ("item", "scenario", "timestamp", "actions", "duration"):
            got, want = getattr(conv, name), np.asarray(getattr(ref, name))[keep]
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want, err_msg=name)
        assert conv.user_id == ref.user_id and conv.target is None and len(conv) == len(keep)

        t_now = int(ref.timestamp[-1]) + 3600
        for cfg in (
            MixingConfig(quotas={"homefeed": 6, "ads": 3, "search": 2}),
            MixingConfig(last_n=3 * N),  # 8 per scenario, the whole kept window
            MixingConfig(policy="timestamp", last_n=N),
            MixingConfig(policy="naive", quotas={"ads": 4, "homefeed": 8}),
        ):
            m_ref = mix(ref.scenario, len(ref), cfg, store.scenarios)
            m_conv = mix(conv.scenario, len(conv), cfg, store.scenarios)
            assert len(m_ref) == len(m_conv) > 0
            f_ref = user_sequence(store, ref, m_ref, t_now, FeatureConfig())
            f_conv = user_sequence(store, conv, m_conv, t_now, FeatureConfig())
            assert f_ref.keys() == f_conv.keys()
            for k in f_ref:
                np.testing.assert_array_equal(f_conv[k], f_ref[k], err_msg=f"{cfg.policy} {k}")


def test_to_user_events_unknowns(tiny_store):
    from redrec.errors import DataError

    store = tiny_store
    known = str(store.item_ids[5])
    evs = [Event(known, "ads", 20, ("click",)), Event("nope", "homefeed", 10), Event(known, "homefeed", 10, ("like",)),
           Event("nope2", "search", 5)]
    user, report = to_user_events(evs, store)
    assert report["n_unknown_items"] == 2 and report["unknown_items"] == ["nope", "nope2"] and report["n_kept"] == 2
    np.testing.assert_array_equal(user.item, [5, 5])
    np.testing.assert_array_equal(user.timestamp, [10, 20])  # sorted by time
    np.testing.assert_array_equal(user.scenario, [store.scenarios.index("homefeed"), store.scenarios.index("ads")])
    like, click = 1 << store.actions_names.index("like"), 1 << store.actions_names.index("click")
    np.testing.assert_array_equal(user.actions, [like, click])
    assert user.user_index == -1

    with pytest.raises(DataError, match=r"field 'item'.*'nope'"):
        to_user_events(evs, store, unknown_items="error")
    with pytest.raises(DataError, match=r"unknown scenario 'video'; this store has \['homefeed', 'ads', 'search'\]"):
        to_user_events([Event(known, "video", 1)], store)
    user, report = to_user_events([Event(known, "video", 1), Event(known, "ads", 2)], store, unknown_scenarios="drop")
    assert report["unknown_scenarios"] == ["video"] and len(user) == 1
    with pytest.raises(DataError, match=r"unknown action 'poke'.*this store has \['click'"):
        to_user_events([Event(known, "ads", 1, ("click", "poke"))], store)
    user, report = to_user_events([Event(known, "ads", 1, ("click", "poke"))], store, unknown_actions="drop")
    assert report["unknown_actions"] == ["poke"] and int(user.actions[0]) == click
    with pytest.raises(HistoryError, match="field 'timestamp'"):
        to_user_events([Event(known, "ads", -4)], store)
    with pytest.raises(HistoryError, match="unknown_items"):
        to_user_events([], store, unknown_items="keep")  # type: ignore[arg-type]

    empty, report = to_user_events([], store)
    assert len(empty) == 0 and empty.item.dtype == np.int32 and report["n_kept"] == 0
    from redrec.mixing import MixingConfig, mix

    assert len(mix(empty.scenario, len(empty), MixingConfig(), store.scenarios)) == 0


def test_to_user_events_stable_ties(tiny_store):
    ids = [str(i) for i in tiny_store.item_ids[:4]]
    evs = [Event(ids[0], "ads", 7), Event(ids[1], "homefeed", 3), Event(ids[2], "ads", 3), Event(ids[3], "search", 7)]
    user, _ = to_user_events(evs, tiny_store)
    np.testing.assert_array_equal(user.item, [1, 2, 0, 3])


def test_item_lookup_matches_store(tiny_store):
    ids = list(tiny_store.item_ids[::7]) + ["missing", "", "zzzz", "0"] + list(tiny_store.item_ids[:3])
    np.testing.assert_array_equal(item_lookup(tiny_store)(ids), tiny_store.item_index(ids))
    assert item_lookup(tiny_store) is item_lookup(tiny_store)
    assert item_lookup(tiny_store)([]).shape == (0,)


@pytest.mark.parametrize("err", [
    HistoryError("timestamp", "must be >= 0, got -1", index=3),
    DataError("/data/store", "item", "2 unknown ids", hint="pass unknown_items='drop'"),
    DataError(None, None, "empty file"),
    ConfigError("command line", "max_batch", "must be an integer >= 1, got 0"),
])
def test_errors_survive_pickling(err):
    """Errors cross process boundaries (ProcessPoolExecutor, multiprocessing) pickled: fields and message intact
    (the default pickling passes the message alone to ``__init__``, which needs the fields: TypeError)."""
    import pickle

    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert vars(back) == vars(err)
