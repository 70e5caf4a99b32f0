"""RED-MMU parquet adapter: synthetic round trip, format variants, and one test per kind of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import no_temp_leftovers

from redrec.config import from_dict
from redrec.data.redmmu import RedMMUImportConfig, import_redmmu
from redrec.data.schema import KNOWN_ACTIONS
from redrec.data.store import EventStore
from redrec.data.synth import FLAG_FIELDS, SynthConfig, write_synthetic
from redrec.errors import ConfigError, DataError

SYNTH = dict(n_users=80, n_items=400, n_topics=8, dim=8, homefeed_mean_len=30.0, ads_mean_len=8.0,
             search_mean_len=4.0, users_per_chunk=30)
EV = pa.struct([("item_id", pa.int64()), ("timestamp", pa.int64()), ("is_click", pa.int8()), ("is_like", pa.bool_()),
                ("duration", pa.float32())])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    src = tmp_path_factory.mktemp("redmmu")
    summary = write_synthetic(src, SynthConfig(**SYNTH))
    return src, summary


# -- tiny hand-made inputs ----------------------------------------------------------------------------------------
def _notes(path, n=6, dim=4, idx=None, feats=None, ids=None):
    idx = list(range(100, 100 + n)) if idx is None else idx
    feats = np.arange(n * dim, dtype=np.float32).reshape(n, dim).tolist() if feats is None else feats
    ids = [f"note{i}" for i in range(n)] if ids is None else ids
    pq.write_table(pa.table({"encrypted_note_id": ids, "note_idx": pa.array(idx, pa.int64()),
                             "note_feature": pa.array(feats, pa.list_(pa.float32()))}), path)


def _lastn(path, users: dict[str, dict[str, list[dict]]], struct=EV, cols=("homefeed_list", "ads_list")):
    data = {"encrypted_user_id": list(users), "user_idx": list(range(len(users)))}
    for c in cols:
        data[c] = pa.array([u.get(c, []) for u in users.values()], type=pa.list_(struct))
    pq.write_table(pa.table(data), path)


def _ev(item, ts, click=1, like=False, duration=5.0):
    return {"item_id": item, "timestamp": ts, "is_click": click, "is_like": like, "duration": duration}


def _mini(tmp_path, users=None, struct=EV, cols=("homefeed_list", "ads_list"), **notes_kw):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    _notes(src / "note_embeddings.parquet", **notes_kw)
    users = users if users is not None else {
        "u1": {"homefeed_list": [_ev(100, 1000), _ev(101, 3000)], "ads_list": [_ev(102, 2000, like=True)]},
        "u2": {"homefeed_list": [_ev(103, 1500)], "ads_list": [_ev(104, 1500), _ev(105, 2500)]},
    }
    _lastn(src / "multiscene_lastn.parquet", users, struct, cols)
    return src


def _fails(src, out, match=None, **kw):
    """Import must raise a DataError and leave neither ``out`` nor a temporary directory behind."""
    with pytest.raises(DataError, match=match) as e:
        import_redmmu(src, out, RedMMUImportConfig(**kw), progress=False)
    assert not out.exists()
    assert no_temp_leftovers(out.parent) == []
    return e.value


# -- round trip ---------------------------------------------------------------------------------------------------
def _expected_events(src, note_rows):
    """Per user: the merged, chronologically sorted events, computed from the parquet file with plain Python."""
    rows = pq.read_table(src / "multiscene_lastn.parquet").to_pylist()
    flags = [f"is_{a}" for a in KNOWN_ACTIONS if f"is_{a}" in FLAG_FIELDS]
    out = {}
    for r in rows:
        evs = []
        for s, col in enumerate(("homefeed_list", "ads_list", "search_list")):
            for p, e in enumerate(r[col]):
                bits = sum(1 << b for b, f in enumerate(flags) if e[f])
                evs.append((e["timestamp"], s, p, note_rows[e["item_id"]], bits, e["duration"]))
        evs.sort(key=lambda x: x[:3])
        out[r["encrypted_user_id"]] = evs
    return out


def test_round_trip_synthetic(synth, tmp_path):
    src, summary = synth
    store = import_redmmu(src, tmp_path / "st", RedMMUImportConfig(batch_rows=17, note_batch_rows=150), progress=False)
    notes = pq.read_table(src / "note_embeddings.parquet")
    assert (store.n_users, store.n_items, store.n_events) == (80, 400, summary["n_events"])
    assert store.scenarios == ["homefeed", "ads", "search"]
    assert store.actions_names == [a for a in KNOWN_ACTIONS if f"is_{a}" in FLAG_FIELDS]
    assert store.time_unit == "seconds"
    assert store.item_ids.tolist() == notes.column("encrypted_note_id").to_pylist()
    assert store.items_table(["note_idx"]).column(0).to_pylist() == notes.column("note_idx").to_pylist()
    feats = np.array(notes.column("note_feature").to_pylist(), dtype=np.float32)
    assert store.vector_dim == 8 and np.array_equal(np.asarray(store.item_vectors), feats)
    for s, n in summary["events"].items():
        assert int((np.asarray(store.scenario) == store.scenario_index(s)).sum()) == n
    note_rows = {v: i for i, v in enumerate(notes.column("note_idx").to_pylist())}
    expected = _expected_events(src, note_rows)
    assert store.user_ids.tolist() == list(expected)
    for u in range(store.n_users):
        ev = store.user(u)
        want = expected[ev.user_id]
        assert ev.item.tolist() == [w[3] for w in want]
        assert ev.scenario.tolist() == [w[1] for w in want]
        assert ev.timestamp.tolist() == [w[0] // 1000 for w in want]
        assert ev.actions.tolist() == [w[4] for w in want]
        assert np.allclose(ev.duration, [w[5] for w in want])
    src_meta = store.meta["source"]
    assert src_meta["adapter"] == "redmmu" and src_meta["timestamp_unit"] == "ms"
    assert src_meta["lastn"] == [str(src / "multiscene_lastn.parquet")]
    assert src_meta["dropped_unknown_items"] == 0 and src_meta["ignored_fields"] == ["page_key", "type"]
    assert src_meta["options"]["batch_rows"] == 17
    assert no_temp_leftovers(tmp_path) == []


def test_part_files_and_explicit_paths(synth, tmp_path):
    src, summary = synth
    ref = import_redmmu(src, tmp_path / "ref", progress=False)
    parts = tmp_path / "parts"
    (parts / "note_embeddings").mkdir(parents=True)
    notes = pq.read_table(src / "note_embeddings.parquet")
    pq.write_table(notes.slice(0, 150), parts / "note_embeddings" / "part-0.parquet")
    pq.write_table(notes.slice(150), parts / "note_embeddings" / "part-1.parquet")
    (parts / "note_embeddings" / "_SUCCESS").write_text("")
    lastn = pq.read_table(src / "multiscene_lastn.parquet")
    pq.write_table(lastn.slice(0, 50), parts / "multiscene_lastn-00000.parquet")
    pq.write_table(lastn.slice(50), parts / "multiscene_lastn-00001.parquet")
    for store in (
        import_redmmu(parts, tmp_path / "a", progress=True),
        import_redmmu(None, tmp_path / "b", notes=parts / "note_embeddings",
                      lastn=str(parts / "multiscene_lastn-*.parquet"), progress=False),
    ):
        assert store.n_events == ref.n_events and store.user_ids.tolist() == ref.user_ids.tolist()
        for col in ("item", "scenario", "timestamp", "actions"):
            assert np.array_equal(getattr(store, col), getattr(ref, col)), col
        assert np.array_equal(np.asarray(store.item_vectors), np.asarray(ref.item_vectors))
    assert len(store.meta["source"]["lastn"]) == 2
    # part files must agree on the scenario columns
    pq.write_table(lastn.slice(50).drop_columns(["search_list"]), parts / "multiscene_lastn-00001.parquet")
    err = _fails(parts, tmp_path / "c")
    assert err.field == "search_list" and "multiscene_lastn-00001.parquet" in str(err)
    pq.write_table(lastn.slice(0, 50).drop_columns(["search_list"]), parts / "multiscene_lastn-00000.parquet")
    pq.write_table(lastn.slice(50), parts / "multiscene_lastn-00001.parquet")
    err = _fails(parts, tmp_path / "c")
    assert err.field == "search_list" and "multiscene_lastn-00001.parquet" in str(err) and "00000" in str(err)


def test_sparse_note_idx_join(tmp_path):
    """note_idx values far from 0..n-1 (sorted-array join) and a join field named note_idx."""
    struct = pa.struct([("note_idx", pa.int64()), ("timestamp", pa.int64())])
    big = [10**12 + 7, 5, 10**12, -3]
    users = {"u": {"homefeed_list": [{"note_idx": 5, "timestamp": 1}, {"note_idx": 10**12, "timestamp": 2}],
                   "ads_list": [{"note_idx": -3, "timestamp": 1}]}}
    src = _mini(tmp_path, users, struct=struct, n=4, idx=big)
    st = import_redmmu(src, tmp_path / "st", progress=False)
    assert st.user(0).item.tolist() == [1, 3, 2] and st.user(0).scenario.tolist() == [0, 1, 0]
    assert st.meta["source"]["item_fields"] == {"homefeed_list": "note_idx", "ads_list": "note_idx"}


# -- format variants ----------------------------------------------------------------------------------------------
def test_seconds_ms_float_and_arrow_timestamps(tmp_path):
    def store_ts(name, struct, ts_values, **kw):
        d = tmp_path / name
        d.mkdir()
        users = {"u": {"homefeed_list": [{"item_id": 100 + i, "timestamp": t} for i, t in enumerate(ts_values)]}}
        src = _mini(d, users, struct=struct, cols=("homefeed_list",))
        st = import_redmmu(src, d / "st", RedMMUImportConfig(**kw), progress=False)
        return st.user(0).timestamp.tolist(), st.meta["source"]["timestamp_unit"]

    base = 1_700_000_000
    s = pa.struct([("item_id", pa.int64()), ("timestamp", pa.int64())])
    assert store_ts("s", s, [base, base + 5]) == ([base, base + 5], "s")
    assert store_ts("ms", s, [base * 1000 + 999, base * 1000 + 5000]) == ([base, base + 5], "ms")
    assert store_ts("forced", s, [1000, 5000], timestamp_unit="ms") == ([1, 5], "ms")
    f = pa.struct([("item_id", pa.int64()), ("timestamp", pa.float64())])
    assert store_ts("float", f, [base + 0.5, base + 1.25]) == ([base, base + 1], "s")
    t = pa.struct([("item_id", pa.int64()), ("timestamp", pa.timestamp("ms"))])
    assert store_ts("arrow", t, [base * 1000 + 1, base * 1000 + 2001]) == ([base, base + 2], "s")


def test_third_scenario_and_explicit_columns(synth, tmp_path):
    src, _ = synth
    two = tmp_path / "two"
    write_synthetic(two, SynthConfig(**{**SYNTH, "scenarios": ["homefeed", "ads"], "write_truth": False}))
    assert import_redmmu(two, tmp_path / "st2", progress=False).scenarios == ["homefeed", "ads"]
    st = import_redmmu(src, tmp_path / "st3", progress=False)
    assert st.scenarios == ["homefeed", "ads", "search"]
    assert set(np.unique(np.asarray(st.scenario)).tolist()) == {0, 1, 2}
    cfg = from_dict(RedMMUImportConfig, {"scenario_columns": {"search": "search_list", "feed": "homefeed_list"}})
    st = import_redmmu(src, tmp_path / "map", cfg, progress=False)
    lastn = pq.read_table(src / "multiscene_lastn.parquet")
    n_search = sum(len(x) for x in lastn.column("search_list").to_pylist())
    n_feed = sum(len(x) for x in lastn.column("homefeed_list").to_pylist())
    assert st.scenarios == ["search", "feed"] and st.n_events == n_search + n_feed
    assert int((np.asarray(st.scenario) == 0).sum()) == n_search


def test_subset_of_struct_fields(tmp_path):
    struct = pa.struct([("item_id", pa.int64()), ("timestamp", pa.int64())])
    users = {"u": {"homefeed_list": [{"item_id": 101, "timestamp": 10}], "ads_list": [{"item_id": 100, "timestamp": 5}]}}
    st = import_redmmu(_mini(tmp_path, users, struct=struct), tmp_path / "st", progress=False)
    assert st.actions_names == [] and st.user(0).actions.tolist() == [0, 0]
    assert np.isnan(st.user(0).duration).all() and st.user(0).item.tolist() == [0, 1]
    # extra is_* flags come after the known ones, in order of appearance; a flag absent from a list is 0 there
    hf = pa.struct([("item_id", pa.int64()), ("timestamp", pa.int64()), ("is_zap", pa.int8()), ("is_like", pa.int8())])
    ad = pa.struct([("item_id", pa.int64()), ("timestamp", pa.int64()), ("is_click", pa.bool_())])
    src = tmp_path / "x"
    src.mkdir()
    _notes(src / "note_embeddings.parquet")
    pq.write_table(pa.table({
        "encrypted_user_id": ["u"],
        "homefeed_list": pa.array([[{"item_id": 100, "timestamp": 1, "is_zap": 1, "is_like": 1}]], pa.list_(hf)),
        "ads_list": pa.array([[{"item_id": 101, "timestamp": 2, "is_click": True}]], pa.list_(ad)),
    }), src / "multiscene_lastn.parquet")
    st = import_redmmu(src, tmp_path / "st2", progress=False)
    assert st.actions_names == ["click", "like", "zap"]
    assert st.user(0).actions.tolist() == [0b110, 0b001]


def test_no_timestamp_is_ordinal(tmp_path):
    struct = pa.struct([("item_id", pa.int64()), ("is_click", pa.int8())])
    hf = [{"item_id": 100 + i, "is_click": 1} for i in range(4)]
    ads = [{"item_id": 104, "is_click": 1}, {"item_id": 105, "is_click": 0}]
    src = _mini(tmp_path, {"u": {"homefeed_list": hf, "ads_list": ads}}, struct=struct)
    st = import_redmmu(src, tmp_path / "end", progress=False)
    assert st.time_unit == "ordinal" and st.meta["source"]["ordinal_align"] == "end"
    u = st.user(0)  # aligned at the newest event: ads take ordinals 2, 3
    assert u.item.tolist() == [0, 1, 2, 4, 3, 5] and u.timestamp.tolist() == [0, 1, 2, 2, 3, 3]
    assert u.scenario.tolist() == [0, 0, 0, 1, 0, 1] and u.actions.tolist() == [1, 1, 1, 1, 1, 0]
    st = import_redmmu(src, tmp_path / "start", RedMMUImportConfig(ordinal_align="start"), progress=False)
    assert st.user(0).item.tolist() == [0, 4, 1, 5, 2, 3] and st.user(0).timestamp.tolist() == [0, 0, 1, 1, 2, 3]
    # timestamps present but ignored on request
    (tmp_path / "ts").mkdir()
    st = import_redmmu(_mini(tmp_path / "ts"), tmp_path / "forced", RedMMUImportConfig(timestamp_unit="ordinal"),
                       progress=False)
    assert st.time_unit == "ordinal" and st.user(0).timestamp.tolist() == [0, 1, 1]


def test_sort_events_and_drop_unknown_and_skip_empty(tmp_path):
    users = {
        "u1": {"homefeed_list": [_ev(101, 3000), _ev(100, 1000)], "ads_list": [_ev(999, 2000)]},
        "u2": {"homefeed_list": [_ev(999, 5)]},
        "u3": {"ads_list": [_ev(102, 7)]},
    }
    src = _mini(tmp_path, users)
    cfg = RedMMUImportConfig(sort_events=True, drop_unknown_items=True, skip_empty_users=True)
    st = import_redmmu(src, tmp_path / "st", cfg, progress=False)
    assert st.user_ids.tolist() == ["u1", "u3"]
    assert st.user(0).item.tolist() == [0, 1] and st.user(0).timestamp.tolist() == [1000, 3000]
    assert st.meta["source"]["dropped_unknown_items"] == 2 and st.meta["skipped_empty_users"] == 1


def test_null_lists_large_lists_and_fixed_size_features(tmp_path):
    """A null list is an empty one (even when it spans values); large_list columns and fixed_size_list features."""
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({
        "encrypted_note_id": ["a", "b", "c"], "note_idx": [0, 1, 2],
        "note_feature": pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.float32(), 2)),
    }), src / "note_embeddings.parquet")
    s = pa.struct([("item_id", pa.int64()), ("timestamp", pa.int64())])
    values = pa.array([{"item_id": i, "timestamp": t} for i, t in [(0, 5), (2, 9), (1, 7), (2, 8)]], s)
    hf = pa.ListArray.from_arrays(pa.array([0, 1, 2, 4]), values, mask=pa.array([False, True, False]))
    ads = pa.array([[{"item_id": 1, "timestamp": 6}], [{"item_id": 0, "timestamp": 1}], None], pa.large_list(s))
    pq.write_table(pa.table({"encrypted_user_id": ["u", "v", "w"], "homefeed_list": hf, "ads_list": ads}),
                   src / "multiscene_lastn.parquet")
    st = import_redmmu(src, tmp_path / "st", progress=False)
    assert st.history_lengths().tolist() == [2, 1, 2]
    assert st.user(0).item.tolist() == [0, 1] and st.user(1).item.tolist() == [0]
    assert st.user(2).item.tolist() == [1, 2] and st.user(2).timestamp.tolist() == [7, 8]
    assert np.asarray(st.item_vectors).tolist() == [[1, 2], [3, 4], [5, 6]]


# -- bad inputs ---------------------------------------------------------------------------------------------------
def test_truncated_parquet(synth, tmp_path):
    src, _ = synth
    for name in ("multiscene_lastn.parquet", "note_embeddings.parquet"):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(src, bad)
        data = (src / name).read_bytes()
        (bad / name).write_bytes(data[: len(data) // 2])
        err = _fails(bad, tmp_path / "st")
        assert str(bad / name) in str(err) and "truncated or corrupt" in str(err)


def test_corrupt_data_page(synth, tmp_path):
    src, _ = synth
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = bytearray((src / "multiscene_lastn.parquet").read_bytes())
    n = len(data)
    data[n // 3 : n // 3 + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (bad / "multiscene_lastn.parquet").write_bytes(bytes(data))
    err = _fails(bad, tmp_path / "st")
    assert str(bad / "multiscene_lastn.parquet") in str(err)


def test_missing_column(tmp_path):
    src = _mini(tmp_path)
    err = _fails(src, tmp_path / "st", scenario_columns={"homefeed": "homefeed_list", "search": "search_list"})
    assert "multiscene_lastn.parquet" in str(err) and err.field == "search_list"
    assert "homefeed_list" in str(err) and "ads_list" in str(err)  # says what is present
    t = pq.read_table(src / "note_embeddings.parquet").drop_columns(["note_feature"])
    pq.write_table(t, src / "note_embeddings.parquet")
    err = _fails(src, tmp_path / "st")
    assert "note_embeddings.parquet" in str(err) and err.field == "note_feature" and "note_idx" in str(err)


def test_no_scenario_column_or_wrong_type(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _notes(src / "note_embeddings.parquet")
    pq.write_table(pa.table({"encrypted_user_id": ["u"], "clicks": [[1, 2]]}), src / "multiscene_lastn.parquet")
    err = _fails(src, tmp_path / "st")
    assert "multiscene_lastn.parquet" in str(err) and "clicks" in str(err) and "homefeed_list" in str(err)
    pq.write_table(pa.table({"encrypted_user_id": ["u"], "homefeed_list": [[100, 101]]}), src / "multiscene_lastn.parquet")
    err = _fails(src, tmp_path / "st")
    assert err.field == "homefeed_list" and "int64" in str(err) and "list<struct" in str(err)


def test_missing_join_field(tmp_path):
    struct = pa.struct([("note", pa.int64()), ("timestamp", pa.int64())])
    src = _mini(tmp_path, {"u": {"homefeed_list": [{"note": 100, "timestamp": 1}]}}, struct=struct)
    err = _fails(src, tmp_path / "st")
    assert "multiscene_lastn.parquet" in str(err) and err.field.startswith("homefeed_list.")
    assert "note_idx" in err.field and "item_id" in err.field and "['note', 'timestamp']" in str(err)
    err = _fails(src, tmp_path / "st", item_field="item_idx")
    assert err.field == "homefeed_list.item_idx"


def test_timestamp_required_consistently(tmp_path):
    struct = pa.struct([("item_id", pa.int64())])
    src = _mini(tmp_path, {"u": {"homefeed_list": [{"item_id": 100}]}}, struct=struct)
    err = _fails(src, tmp_path / "st", timestamp_unit="ms")
    assert err.field == "homefeed_list.timestamp" and "multiscene_lastn.parquet" in str(err)
    hf = pa.struct([("item_id", pa.int64()), ("timestamp", pa.int64())])
    pq.write_table(pa.table({
        "encrypted_user_id": ["u"],
        "homefeed_list": pa.array([[{"item_id": 100, "timestamp": 1}]], pa.list_(hf)),
        "ads_list": pa.array([[{"item_id": 101}]], pa.list_(struct)),
    }), src / "multiscene_lastn.parquet")
    err = _fails(src, tmp_path / "st")
    assert err.field == "ads_list.timestamp" and "homefeed_list" in str(err)


def test_empty_history(tmp_path):
    src = _mini(tmp_path, {"u1": {"homefeed_list": [_ev(100, 1)]}, "u2": {}})
    err = _fails(src, tmp_path / "st")
    assert "multiscene_lastn.parquet" in str(err) and err.field == "history" and "'u2'" in str(err)


def test_nan_vector(tmp_path):
    feats = np.ones((6, 4), np.float32)
    feats[3, 2] = np.nan
    src = _mini(tmp_path, feats=feats.tolist())
    err = _fails(src, tmp_path / "st")
    assert "note_embeddings.parquet" in str(err) and err.field == "note_feature" and "'note3'" in str(err)
    feats[3, 2] = np.inf
    src = _mini(tmp_path, feats=feats.tolist())
    assert "'note3'" in str(_fails(src, tmp_path / "st"))


def test_ragged_note_feature(tmp_path):
    feats = [[0.0] * 4] * 6
    feats[4] = [0.0] * 3
    err = _fails(_mini(tmp_path, feats=feats), tmp_path / "st")
    assert "note_embeddings.parquet" in str(err) and err.field == "note_feature"
    assert "'note4'" in str(err) and "row 4" in str(err) and "3-dim" in str(err)


def test_unknown_item(tmp_path):
    src = _mini(tmp_path, {"u1": {"homefeed_list": [_ev(100, 1)]}, "u2": {"ads_list": [_ev(101, 1), _ev(4242, 2)]}})
    err = _fails(src, tmp_path / "st")
    msg = str(err)
    assert "multiscene_lastn.parquet" in msg and err.field == "ads_list.item_id"
    assert "'u2'" in msg and "4242" in msg and "position 1" in msg


def test_duplicate_note_idx(tmp_path):
    err = _fails(_mini(tmp_path, idx=[100, 101, 102, 103, 101, 105]), tmp_path / "st")
    assert "note_embeddings.parquet" in str(err) and err.field == "note_idx" and "101" in str(err)


def test_non_monotonic_timestamp(tmp_path):
    users = {"u1": {"homefeed_list": [_ev(100, 1)]},
             "u2": {"homefeed_list": [_ev(101, 10)], "ads_list": [_ev(102, 2000), _ev(103, 1000)]}}
    err = _fails(_mini(tmp_path, users), tmp_path / "st")
    msg = str(err)
    assert "multiscene_lastn.parquet" in msg and err.field == "ads_list.timestamp" and "'u2'" in msg
    assert "2000 then 1000" in msg and "sort_events" in msg


def test_failed_import_leaves_existing_store(synth, tmp_path):
    src, _ = synth
    out = tmp_path / "st"
    good = import_redmmu(src, out, progress=False)
    before = (out / "meta.json").read_bytes()
    bad = _mini(tmp_path, {"u": {"homefeed_list": [_ev(100, 5), _ev(101, 1)]}})
    with pytest.raises(DataError, match="chronological"):
        import_redmmu(bad, out, overwrite=True, progress=False)
    assert (out / "meta.json").read_bytes() == before and no_temp_leftovers(tmp_path) == []
    assert EventStore(out).n_events == good.n_events
    with pytest.raises(DataError, match="already exists"):
        import_redmmu(src, out, progress=False)
    st = import_redmmu(bad, out, RedMMUImportConfig(sort_events=True), overwrite=True, progress=False)
    assert st.n_users == 1 and json.loads((out / "meta.json").read_text())["source"]["sorted_lists"] == 1
    assert st.user(0).timestamp.tolist() == [1, 5] and st.user(0).item.tolist() == [1, 0]


def test_bad_paths_and_config(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        import_redmmu(tmp_path / "nope", tmp_path / "st", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no note_embeddings"):
        import_redmmu(tmp_path / "empty", tmp_path / "st", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        import_redmmu(None, tmp_path / "st", notes=tmp_path / "x.parquet", lastn=tmp_path / "y.parquet", progress=False)
    for bad in ({"timestamp_unit": "us"}, {"batch_rows": 0}, {"scenario_columns": {}}, {"sort": True}):
        with pytest.raises(ConfigError):
            from_dict(RedMMUImportConfig, bad)
    assert not (tmp_path / "st").exists()


def test_user_idx_when_no_encrypted_user_id(tmp_path):
    src = _mini(tmp_path)
    t = pq.read_table(src / "multiscene_lastn.parquet").drop_columns(["encrypted_user_id"])
    pq.write_table(t, src / "multiscene_lastn.parquet")
    st = import_redmmu(src, tmp_path / "st", progress=False)
    assert st.user_ids.tolist() == ["0", "1"] and st.n_events == 6
    pq.write_table(t.drop_columns(["user_idx"]), src / "multiscene_lastn.parquet")
    err = _fails(src, tmp_path / "st2")
    assert err.field == "encrypted_user_id" and "homefeed_list" in str(err)


def _hit_rates(st, k: int = 10) -> dict[str, float]:
    """HR@k on each user's last 3 ads events (cut before them) of simple scorers over the note features.

    pop: ads popularity in the inputs; mean_*: mean note feature of the ads / all events (+ log-popularity);
    recency_*: the same with weights exp(-age / 3 days) (a crude stand-in for a sequence model).
    """
    V = np.asarray(st.item_vectors)
    ads = st.scenario_index("ads")
    off, item, scen, ts = (np.asarray(a) for a in (st.offsets, st.item, st.scenario, st.timestamp))
    cnt = np.zeros(st.n_items)
    cases = []
    for u in range(st.n_users):
        a, b = off[u], off[u + 1]
        ai = np.flatnonzero(scen[a:b] == ads)
        if len(ai) >= 8:
            cut = a + ai[-3]
            cases.append((a, cut, item[a + ai[-3:]]))
            np.add.at(cnt, item[a:cut][scen[a:cut] == ads], 1)
    logpop = np.log1p(cnt)
    hits: dict[str, list[bool]] = {"pop": [], "mean_ads": [], "mean_all": [], "recency_ads": [], "recency_all": []}
    for a, cut, targets in cases:
        it, sc, t = item[a:cut], scen[a:cut], ts[a:cut]
        w = np.exp(-(t[-1] - t) / (3 * 86400.0))
        one, every = np.ones(len(it)), np.ones(len(it), bool)
        for name, mask, weight in (("mean_ads", sc == ads, one), ("mean_all", every, one),
                                   ("recency_ads", sc == ads, w), ("recency_all", every, w)):
            v = (V[it[mask]] * weight[mask, None]).sum(0)
            score = V @ (v / (np.linalg.norm(v) + 1e-9)) * 10 + logpop
            hits[name].append(np.isin(targets, np.argpartition(-score, k)[:k]).any())
        hits["pop"].append(np.isin(targets, np.argpartition(-logpop, k)[:k]).any())
    assert len(cases) > 500
    return {name: float(np.mean(h)) for name, h in hits.items()}


def test_planted_signal_end_to_end(tmp_path):
    """Through the importer, the synthetic data rewards what RED-Rec claims: personalisation beats popularity,
    recency (a sequence model) beats mean pooling, and adding homefeed to ads history helps."""
    cfg = SynthConfig(n_users=1000, n_items=4000, n_topics=16, homefeed_mean_len=100.0, ads_mean_len=20.0,
                      search_mean_len=0.0, write_truth=False)
    write_synthetic(tmp_path / "src", cfg)
    hr = _hit_rates(import_redmmu(tmp_path / "src", tmp_path / "st", progress=False))
    assert hr["mean_ads"] > hr["pop"] + 0.15, hr
    assert hr["recency_all"] > max(hr["mean_ads"], hr["mean_all"]) + 0.08, hr
    assert hr["recency_all"] > hr["recency_ads"] + 0.01, hr
