import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import no_temp_leftovers

from redrec.data.events import EventsImportConfig, import_events
from redrec.data.store import EventStore
from redrec.errors import DataError

EVENTS = """user_id,item_id,timestamp,scenario,click,is_like,duration,extra
u2,i3,1600000300,food,1,0,3.5,x
u1,i1,1600000000,kitchen,1,1,10,x
u2,i1,1600000400,kitchen,0,0,,x
u1,i2,1600000100,food,1,0,1,x
u3,i2,1600000050,food,0,1,2,x
u1,i3,1600000200,kitchen,0,0,4,x
"""
ITEMS = """item_id,title
i1,Pan
i2,Tea
i3,Knife
i4,Never seen
"""


def _write(d, events=EVENTS, items=ITEMS, gz=True):
    d.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(d / "events.csv.gz", "wt") as f:
            f.write(events)
    else:
        (d / "events.csv").write_text(events)
    if items is not None:
        (d / "items.csv").write_text(items)
    return d


@pytest.mark.parametrize("n_buckets", [1, 3])
def test_csv_import_ungrouped_rows(tmp_path, n_buckets):
    src = _write(tmp_path / "ds")
    s = import_events(src, tmp_path / "st", EventsImportConfig(n_buckets=n_buckets), progress=False)
    assert (s.n_users, s.n_items, s.n_events) == (3, 4, 6)
    assert s.scenarios == ["food", "kitchen"]  # sorted names
    assert s.actions_names == ["click", "like"]
    assert s.time_unit == "seconds"
    by_user = {s.user(u).user_id: s.user(u) for u in range(s.n_users)}
    u1 = by_user["u1"]
    assert s.item_ids[u1.item].tolist() == ["i1", "i2", "i3"]
    assert u1.timestamp.tolist() == [1600000000, 1600000100, 1600000200]
    assert [s.scenarios[k] for k in u1.scenario] == ["kitchen", "food", "kitchen"]
    assert u1.actions.tolist() == [3, 1, 0]
    u2 = by_user["u2"]
    assert np.isnan(u2.duration[1]) and u2.duration[0] == pytest.approx(3.5)
    assert s.items_table().column("title").to_pylist()[3] == "Never seen"
    assert s.meta["source"]["ignored_columns"] == ["extra"]
    assert no_temp_leftovers(tmp_path) == []


def test_parquet_import_equals_csv(tmp_path):
    a = import_events(_write(tmp_path / "csv"), tmp_path / "a", progress=False)
    (tmp_path / "pq").mkdir()
    import pyarrow.csv as pacsv

    t = pacsv.read_csv(tmp_path / "csv" / "events.csv.gz", convert_options=pacsv.ConvertOptions(
        column_types={"user_id": pa.string(), "item_id": pa.string()}))
    pq.write_table(t, tmp_path / "pq" / "events.parquet")
    (tmp_path / "pq" / "items.csv").write_text(ITEMS)
    b = import_events(tmp_path / "pq", tmp_path / "b", progress=False)
    for col in ("item", "scenario", "timestamp", "actions"):
        assert np.array_equal(getattr(a, col), getattr(b, col)), col
    assert a.user_ids.tolist() == b.user_ids.tolist()


def test_no_items_file_no_scenario_ordinal_time(tmp_path):
    ev = "user_id,item_id,timestamp\n1,10,0\n1,11,1\n2,10,0\n"
    s = import_events(_write(tmp_path / "ds", ev, items=None), tmp_path / "st", progress=False)
    assert s.scenarios == ["default"] and s.time_unit == "ordinal" and s.n_items == 2
    assert s.item_ids.tolist() == ["10", "11"]


def test_milliseconds_converted(tmp_path):
    ev = "user_id,item_id,timestamp\n1,10,1600000000123\n1,11,1600000001999\n"
    s = import_events(_write(tmp_path / "ds", ev, items=None), tmp_path / "st", progress=False)
    assert s.time_unit == "seconds" and s.timestamp.tolist() == [1600000000, 1600000001]


@pytest.mark.parametrize(
    "events,items,field,pattern",
    [
        ("user_id,timestamp\n1,5\n", None, "item_id", "required column is missing"),
        ("user_id,item_id,timestamp\n1,i1,5\n1,i9,6\n", ITEMS, "item_id", "unknown item id 'i9'"),
        ("user_id,item_id,timestamp\n1,i1,1600000005\n1,i2,1600000001\n", ITEMS, "timestamp", "not in chronological order"),
        ("user_id,item_id,timestamp\n1,i1,abc\n", ITEMS, "timestamp", "cannot read"),
        ("user_id,item_id,timestamp\n1,i1,5\n", "title\nx\n", "item_id", "required column is missing"),
        ("user_id,item_id,timestamp\n", ITEMS, None, "no rows"),
    ],
)
def test_bad_input_clear_error_nothing_written(tmp_path, events, items, field, pattern):
    src = _write(tmp_path / "ds", events, items)
    with pytest.raises(DataError, match=pattern) as e:
        import_events(src, tmp_path / "st", progress=False)
    msg = str(e.value)
    assert "events.csv.gz" in msg or "items.csv" in msg
    if field:
        assert f"'{field}'" in msg
    assert not (tmp_path / "st").exists()
    assert no_temp_leftovers(tmp_path) == [] and no_temp_leftovers(tmp_path / "ds") == []


def test_truncated_gzip(tmp_path):
    src = _write(tmp_path / "ds", EVENTS * 2000)
    raw = (src / "events.csv.gz").read_bytes()
    (src / "events.csv.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="events.csv.gz"):
        import_events(src, tmp_path / "st", progress=False)
    assert not (tmp_path / "st").exists() and no_temp_leftovers(tmp_path) == []


def test_sort_and_drop_options(tmp_path):
    ev = "user_id,item_id,timestamp\n1,i1,1600000005\n1,i9,1600000006\n1,i2,1600000001\n"
    src = _write(tmp_path / "ds", ev, ITEMS)
    s = import_events(src, tmp_path / "st", EventsImportConfig(sort_events=True, drop_unknown_items=True), progress=False)
    assert s.item_ids[s.user(0).item].tolist() == ["i2", "i1"]
    assert s.meta["source"]["dropped_unknown_item_events"] == 1


def test_failed_overwrite_keeps_existing(tmp_path):
    good = import_events(_write(tmp_path / "ds"), tmp_path / "st", progress=False)
    bad = _write(tmp_path / "bad", "user_id,item_id,timestamp\n1,i1,5\n1,i2,1\n", ITEMS)
    with pytest.raises(DataError):
        import_events(bad, tmp_path / "st", overwrite=True, progress=False)
    assert EventStore(tmp_path / "st").n_events == good.n_events
