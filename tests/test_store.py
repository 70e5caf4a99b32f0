import json

import numpy as np
import pytest
from conftest import no_temp_leftovers

from redrec.data.store import EventStore, EventStoreWriter
from redrec.errors import DataError


def _write(path, **kw):
    with EventStoreWriter(path, scenarios=["homefeed", "ads"], actions=["click", "like"], **kw) as w:
        w.add_items(["n0", "n1", "n2"], fields={"title": ["a", "b", None]}, vectors=np.arange(12, dtype="f4").reshape(3, 4))
        w.add_users(["u0", "u1"], [3, 2], item=[0, 1, 2, 2, 0], scenario=[0, 1, 0, 0, 0],
                    timestamp=[10, 20, 20, 5, 7], actions=[1, 3, 0, 2, 0], duration=[1.5, np.nan, 2, 3, 4])
        w.add_users(["u2"], [1], item=[1], scenario=[1], timestamp=[100])
        return w.commit()


def test_round_trip(tmp_path):
    s = _write(tmp_path / "st")
    assert (s.n_users, s.n_items, s.n_events) == (3, 3, 6)
    u = s.user(1)
    assert u.user_id == "u1" and u.item.tolist() == [2, 0] and u.timestamp.tolist() == [5, 7]
    assert s.user(0).actions.tolist() == [1, 3, 0]
    assert np.isnan(s.user(0).duration[1]) and s.user(0).duration[0] == 1.5
    assert s.item_vectors.shape == (3, 4) and s.item_vectors[2, 3] == 11
    assert s.item_index(["n2", "zz"]).tolist() == [2, -1]
    assert s.user_index(["u2", "nobody"]).tolist() == [2, -1]
    assert s.items_table().column("title").to_pylist() == ["a", "b", None]
    reopened = EventStore(tmp_path / "st")
    assert np.array_equal(reopened.offsets, [0, 3, 5, 6])
    meta = json.loads((tmp_path / "st" / "meta.json").read_text())
    assert meta["scenarios"] == ["homefeed", "ads"] and meta["actions"] == ["click", "like"]
    assert no_temp_leftovers(tmp_path) == []


def test_out_of_order_rejected_then_sorted(tmp_path):
    with pytest.raises(DataError, match="not in chronological order") as e:
        with EventStoreWriter(tmp_path / "st", scenarios=["a"], source_path="src.parquet") as w:
            w.add_items(["x", "y"])
            w.add_users(["u"], [3], item=[0, 1, 0], scenario=[0, 0, 0], timestamp=[5, 3, 9])
    assert "src.parquet" in str(e.value) and "'timestamp'" in str(e.value) and "'u'" in str(e.value)
    assert not (tmp_path / "st").exists() and no_temp_leftovers(tmp_path) == []
    with EventStoreWriter(tmp_path / "st", scenarios=["a"], sort_events=True) as w:
        w.add_items(["x", "y"])
        w.add_users(["u", "v"], [3, 1], item=[0, 1, 0, 1], scenario=[0, 0, 0, 0], timestamp=[5, 3, 9, 1])
        s = w.commit()
    assert s.user(0).timestamp.tolist() == [3, 5, 9] and s.user(0).item.tolist() == [1, 0, 0]
    assert s.meta["sorted_users"] == 1


def test_empty_user_rejected_or_skipped(tmp_path):
    with pytest.raises(DataError, match="empty history"):
        with EventStoreWriter(tmp_path / "st", scenarios=["a"]) as w:
            w.add_items(["x"])
            w.add_users(["u", "v"], [0, 1], item=[0], scenario=[0], timestamp=[1])
    with EventStoreWriter(tmp_path / "st", scenarios=["a"], skip_empty_users=True) as w:
        w.add_items(["x"])
        w.add_users(["u", "v"], [0, 1], item=[0], scenario=[0], timestamp=[1])
        s = w.commit()
    assert s.n_users == 1 and s.user_ids.tolist() == ["v"] and s.meta["skipped_empty_users"] == 1


def test_item_index_out_of_range_and_duplicate_users(tmp_path):
    with pytest.raises(DataError, match="item index 5"):
        with EventStoreWriter(tmp_path / "a", scenarios=["a"]) as w:
            w.add_items(["x"])
            w.add_users(["u"], [1], item=[5], scenario=[0], timestamp=[1])
            w.commit()
    with pytest.raises(DataError, match="appears more than once"):
        with EventStoreWriter(tmp_path / "b", scenarios=["a"]) as w:
            w.add_items(["x"])
            w.add_users(["u"], [1], item=[0], scenario=[0], timestamp=[1])
            w.add_users(["u"], [1], item=[0], scenario=[0], timestamp=[2])
            w.commit()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert no_temp_leftovers(tmp_path) == []


def test_existing_output_kept_on_failure_and_replaced_on_success(tmp_path):
    _write(tmp_path / "st")
    with pytest.raises(DataError, match="already exists"):
        _write(tmp_path / "st")
    with pytest.raises(DataError):
        with EventStoreWriter(tmp_path / "st", scenarios=["a"], overwrite=True) as w:
            w.add_items(["x"])
            w.add_users(["u"], [0], item=[], scenario=[], timestamp=[])
    assert EventStore(tmp_path / "st").n_users == 3  # untouched
    with EventStoreWriter(tmp_path / "st", scenarios=["a"], overwrite=True) as w:
        w.add_items(["x"])
        w.add_users(["u"], [1], item=[0], scenario=[0], timestamp=[1])
        w.commit()
    assert EventStore(tmp_path / "st").n_users == 1
    assert no_temp_leftovers(tmp_path) == []


def test_not_a_store(tmp_path):
    with pytest.raises(DataError, match="not an event store"):
        EventStore(tmp_path)
