"""Imports of the real public datasets in ../shared/datasets (skipped with a reason when absent)."""

import pytest
from conftest import shared_dataset

from redrec.data.events import import_events
from redrec.data.stats import store_stats

pytestmark = pytest.mark.shared_data


@pytest.mark.parametrize(
    "name,users,items,events,scenarios,time_unit",
    [
        ("ml-1m", 6040, 3416, 999_611, ["default"], "seconds"),
        ("amazon-food-kitchen", 16_579, 64_093, 163_234, ["food", "kitchen"], "seconds"),
        ("kuairand-1k", 5101, 944_384, 3_134_958, ["tab0", "tab1", "tab11", "tab4", "tab7", "tab8", "tab9"], "ordinal"),
    ],
)
def test_import_public_dataset(tmp_path, name, users, items, events, scenarios, time_unit):
    s = import_events(shared_dataset(name), tmp_path / "st", progress=False)
    assert (s.n_users, s.n_items, s.n_events) == (users, items, events)
    assert s.scenarios == scenarios and s.time_unit == time_unit
    st = store_stats(s)
    assert sum(v["events"] for v in st["scenarios"].values()) == events
    if name == "amazon-food-kitchen":
        assert st["items_with_events"] == 53_354
        assert all(v["users"] == users for v in st["scenarios"].values())  # every user has both domains
