import json

import pytest
from conftest import no_temp_leftovers

from redrec.data.reference import import_reference_json
from redrec.errors import DataError


def ev(nid, ts, **flags):
    return {"note_id": nid, "timestamp": ts, **{f"is_{k}": v for k, v in flags.items()}}


DATA = {
    "uA": {
        "homefeed_noteid_lastn": [ev("n1", 1_700_000_000_000, click=1, like=1), ev("n2", 1_700_000_100_000, click=1)],
        "ads_click_noteid_lastn": [ev("a1", 1_700_000_050_000, click=1)],
        "ads_click_noteid_target": [ev("a2", 1_700_000_200_000, click=1), ev("a2", 1_700_000_300_000, click=1)],
    },
    "uB": {
        "homefeed_noteid_lastn": [ev("n2", 1_700_000_000_000)],
        "ads_click_noteid_lastn": [],
        "ads_click_noteid_target": [ev("a1", 1_700_000_500_000, click=1)],
    },
}


def test_import_reference_json(tmp_path):
    p = tmp_path / "user_lastn.json"
    p.write_text(json.dumps(DATA))
    s = import_reference_json(p, tmp_path / "st", progress=False)
    assert s.scenarios == ["homefeed", "ads"] and s.n_users == 2 and s.n_events == 7
    assert s.actions_names == ["click", "like"]
    a = s.user(0)
    assert s.item_ids[a.item].tolist() == ["n1", "a1", "n2", "a2", "a2"]  # chronological merge
    assert a.target.tolist() == [0, 0, 0, 1, 1]
    assert a.timestamp[0] == 1_700_000_000  # ms -> s
    assert a.actions.tolist()[0] == 3
    assert [s.scenarios[k] for k in a.scenario] == ["homefeed", "ads", "homefeed", "ads", "ads"]


@pytest.mark.parametrize(
    "data,field,pattern",
    [
        ({"u": {"homefeed_noteid_lastn": [{"timestamp": 1}]}}, "homefeed_noteid_lastn[0].note_id", "no note_id"),
        ({"u": {"homefeed_noteid_lastn": [ev("a", 5), ev("b", 3)]}}, "homefeed_noteid_lastn[1].timestamp", "not oldest-first"),
        ({"u": {"homefeed_noteid_lastn": [], "ads_click_noteid_target": [ev("a", 5)]}}, "history", "empty history"),
        ({"u": {"foo": 1}}, "homefeed_noteid_lastn", "no history list"),
        ([1, 2], None, "expected an object"),
    ],
)
def test_bad_reference_json(tmp_path, data, field, pattern):
    p = tmp_path / "user_lastn.json"
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match=pattern) as e:
        import_reference_json(p, tmp_path / "st", progress=False)
    assert "user_lastn.json" in str(e.value)
    if field:
        assert f"'{field}'" in str(e.value)
    assert not (tmp_path / "st").exists() and no_temp_leftovers(tmp_path) == []


def test_truncated_json(tmp_path):
    p = tmp_path / "user_lastn.json"
    p.write_text(json.dumps(DATA)[:-20])
    with pytest.raises(DataError, match="invalid JSON"):
        import_reference_json(p, tmp_path / "st", progress=False)
