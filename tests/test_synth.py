"""The synthetic RED-MMU generator: schema, sizes, determinism, scenario rules and the planted signal."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from redrec.config import from_dict
from redrec.data.synth import EVENT_STRUCT, FLAG_FIELDS, SynthConfig, write_synthetic
from redrec.errors import ConfigError

SMALL = dict(n_users=300, n_items=1500, n_topics=12, dim=16, homefeed_mean_len=60.0, ads_mean_len=15.0,
             search_mean_len=6.0, users_per_chunk=100)
SCEN = ("homefeed", "ads", "search")


def _load(out, cfg: SynthConfig) -> dict:
    summary = write_synthetic(out, cfg)
    notes = pq.read_table(out / "note_embeddings.parquet")
    lastn = pq.read_table(out / "multiscene_lastn.parquet")
    items = pq.read_table(out / "truth" / "items.parquet")
    users = pq.read_table(out / "truth" / "users.parquet")
    topic_of = np.empty(cfg.n_items, np.int64)  # note_idx -> topic
    topic_of[items.column("note_idx").to_numpy()] = items.column("topic").to_numpy()
    return dict(cfg=cfg, out=out, summary=summary, notes=notes, lastn=lastn, items=items, users=users, topic_of=topic_of)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _load(tmp_path_factory.mktemp("synth"), SynthConfig(**SMALL))


def _lists(table: pa.Table, col: str) -> pa.ListArray:
    return table.column(col).combine_chunks()


def _field(table: pa.Table, col: str, name: str) -> np.ndarray:
    return _lists(table, col).flatten().field(name).to_numpy(zero_copy_only=False)


def _parents(table: pa.Table, col: str) -> np.ndarray:
    return pc.list_parent_indices(_lists(table, col)).to_numpy()


def _topic_hist(data, col: str, pick=None) -> np.ndarray:
    """[n_users, n_topics] topic counts of each user's events in ``col`` (``pick(n) -> slice`` of each list)."""
    L = _lists(data["lastn"], col)
    T = data["cfg"].n_topics
    out = np.zeros((len(L), T))
    offs = L.offsets.to_numpy()
    item = L.values.field("item_id").to_numpy()
    for u in range(len(L)):
        ids = item[offs[u] : offs[u + 1]]
        if pick is not None:
            ids = ids[pick(len(ids))]
        out[u] = np.bincount(data["topic_of"][ids], minlength=T)
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def test_schema(data):
    cfg, notes, lastn = data["cfg"], data["notes"], data["lastn"]
    assert notes.schema.field("encrypted_note_id").type == pa.string()
    assert notes.schema.field("note_idx").type == pa.int64()
    assert notes.schema.field("note_feature").type == pa.list_(pa.float32())
    assert lastn.schema.names == ["encrypted_user_id", "user_idx", "homefeed_list", "ads_list", "search_list"]
    assert lastn.schema.field("encrypted_user_id").type == pa.string()
    assert lastn.schema.field("user_idx").type == pa.int64()
    for s in SCEN:
        t = lastn.schema.field(f"{s}_list").type
        assert pa.types.is_list(t) and t.value_type == EVENT_STRUCT
    names = [EVENT_STRUCT.field(i).name for i in range(EVENT_STRUCT.num_fields)]
    assert names[:3] == ["item_id", "timestamp", "duration"] and set(FLAG_FIELDS) <= set(names)
    assert {"page_key", "type"} <= set(names)
    # notes: one row per item, unit-norm dim-d features, note_idx a permutation (not the row number), unique ids
    assert notes.num_rows == cfg.n_items
    assert set(pc.list_value_length(notes.column("note_feature")).to_numpy()) == {cfg.dim}
    feats = np.asarray(notes.column("note_feature").combine_chunks().flatten()).reshape(-1, cfg.dim)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-4)
    idx = notes.column("note_idx").to_numpy()
    assert sorted(idx) == list(range(cfg.n_items)) and not np.array_equal(idx, np.arange(cfg.n_items))
    assert pc.count_distinct(notes.column("encrypted_note_id")).as_py() == cfg.n_items
    assert lastn.column("user_idx").to_numpy().tolist() == list(range(cfg.n_users))
    assert pc.count_distinct(lastn.column("encrypted_user_id")).as_py() == cfg.n_users
    # several row groups (streamed in user chunks)
    pf = pq.ParquetFile(data["out"] / "multiscene_lastn.parquet")
    assert pf.metadata.num_row_groups == 3 == data["summary"]["row_groups"]
    assert set(_field(lastn, "homefeed_list", "type")) == {"normal", "video"}


def test_features_carry_topic_popularity_and_ads(data):
    """note_feature: near its topic's centroid, linearly predictive of popularity and of ads-ness, unique per note."""
    cfg, notes, items = data["cfg"], data["notes"], data["items"]
    feats = np.asarray(notes.column("note_feature").combine_chunks().flatten()).reshape(-1, cfg.dim)
    row = np.empty(cfg.n_items, np.int64)  # note_idx -> row of the notes file
    row[notes.column("note_idx").to_numpy()] = np.arange(cfg.n_items)
    f = feats[row[items.column("note_idx").to_numpy()]]  # aligned with the truth table
    topic = items.column("topic").to_numpy()
    cent = np.stack([f[topic == t].mean(0) for t in range(cfg.n_topics)])
    assert (np.argmax(f @ cent.T, axis=1) == topic).mean() > 0.9
    assert len(np.unique(f.round(5), axis=0)) == cfg.n_items

    def r2(y):
        x = np.column_stack([f, np.ones(len(f))])
        resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        return 1 - resid.var() / y.var()

    assert r2(np.log(items.column("popularity").to_numpy())) > 0.3  # ~0.01 with feature_popularity=0
    assert r2(items.column("is_ads").to_numpy().astype(float)) > 0.06  # ~0.007 with feature_ads=0


def test_counts_lengths_imbalance(data):
    cfg, lastn, summary = data["cfg"], data["lastn"], data["summary"]
    lens = {s: pc.list_value_length(lastn.column(f"{s}_list")).to_numpy() for s in SCEN}
    for s in SCEN:
        assert summary["events"][s] == lens[s].sum()
        mean = getattr(cfg, f"{s}_mean_len")
        assert 0.6 * mean < lens[s].mean() < 1.4 * mean, (s, lens[s].mean())
    assert summary["n_events"] == sum(summary["events"].values())
    assert lens["homefeed"].sum() > 3 * lens["ads"].sum() > 3 * lens["search"].sum() / 2
    assert lens["homefeed"].min() >= cfg.min_homefeed_len and max(v.max() for v in lens.values()) <= cfg.max_len
    hf = lens["homefeed"]
    assert np.percentile(hf, 99) > 4 * np.median(hf)  # heavy tail
    # heavy users are heavy in every scenario
    assert np.corrcoef(np.log1p(hf), np.log1p(lens["ads"]))[0, 1] > 0.3


def test_deterministic_by_seed(tmp_path, data):
    cfg = SynthConfig(**SMALL)
    write_synthetic(tmp_path / "a", cfg)
    for name in ("note_embeddings.parquet", "multiscene_lastn.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(data["out"] / name))
    write_synthetic(tmp_path / "b", SynthConfig(**{**SMALL, "seed": 1}))
    assert not pq.read_table(tmp_path / "b" / "multiscene_lastn.parquet").equals(data["lastn"])
    assert not pq.read_table(tmp_path / "b" / "note_embeddings.parquet").equals(data["notes"])
    assert not any(p.name.count(".tmp-") for p in (tmp_path / "a").rglob("*"))


def test_ads_only_on_ads_items(data):
    cfg, items, lastn = data["cfg"], data["items"], data["lastn"]
    is_ads = np.zeros(cfg.n_items, bool)
    is_ads[items.column("note_idx").to_numpy()] = items.column("is_ads").to_numpy()
    assert is_ads.sum() == round(cfg.ads_item_fraction * cfg.n_items) == data["summary"]["n_ads_items"]
    assert is_ads[_field(lastn, "ads_list", "item_id")].all()
    hf = _field(lastn, "homefeed_list", "item_id")
    assert 0 <= hf.min() and hf.max() < cfg.n_items and not is_ads[hf].all()


def test_timestamps_sorted_in_span_and_bursty(data):
    cfg, lastn = data["cfg"], data["lastn"]
    lo = cfg.start_time * 1000
    hi = int((cfg.start_time + (cfg.span_days + 1) * 86400) * 1000)
    for s in SCEN:
        ts = _field(lastn, f"{s}_list", "timestamp")
        par = _parents(lastn, f"{s}_list")
        assert ts.dtype == np.int64 and lo <= ts.min() and ts.max() <= hi
        same = par[1:] == par[:-1]
        assert (np.diff(ts)[same] >= 0).all(), s
    ts = _field(lastn, "homefeed_list", "timestamp")
    par = _parents(lastn, "homefeed_list")
    gaps = np.diff(ts)[par[1:] == par[:-1]] / 1000.0
    assert np.median(gaps) < 300  # within a session: seconds to minutes
    assert np.percentile(gaps, 99) > 3 * 3600  # between sessions: hours to days


def test_active_hours_concentrated(data):
    lastn = data["lastn"]
    hours = (_field(lastn, "homefeed_list", "timestamp") // 3_600_000) % 24
    par = _parents(lastn, "homefeed_list")
    share = []
    for u in range(data["cfg"].n_users):
        h = np.bincount(hours[par == u], minlength=24)
        window = np.convolve(np.concatenate([h, h[:6]]), np.ones(7), "valid")[:24]  # best 7-hour window
        share.append(window.max() / h.sum())
    assert np.mean(share) > 0.55  # uniform hours would give ~0.3-0.4


def test_action_flags(data):
    lastn, topic_of = data["lastn"], data["topic_of"]
    for s in SCEN:
        f = {name: _field(lastn, f"{s}_list", name) for name in FLAG_FIELDS}
        assert all(v.dtype == np.int8 and set(np.unique(v)) <= {0, 1} for v in f.values())
        click = f["is_click"] == 1
        for name in ("is_like", "is_collect", "is_share", "is_comment", "is_videoend", "is_read_comment"):
            assert not (f[name].astype(bool) & ~click).any(), (s, name)  # engagement implies a click
        assert not (f["is_hide"].astype(bool) & click).any()
        assert 0 < f["is_hide"].mean() < 0.05 and 0 < f["is_like"].mean() < 0.2
        dur = _field(lastn, f"{s}_list", "duration")
        assert np.isfinite(dur).all() and (dur > 0).all() and np.median(dur[click]) > 3 * np.median(dur[~click])
    ads_click = _field(lastn, "ads_list", "is_click").mean()
    hf_click = _field(lastn, "homefeed_list", "is_click").mean()
    assert ads_click > 0.75 and ads_click > hf_click
    video = _field(lastn, "homefeed_list", "type") == "video"
    assert not (_field(lastn, "homefeed_list", "is_videoend").astype(bool) & ~video).any()
    # clicks are likelier on a user's interest topics than off them
    users = data["users"]
    interests = users.column("interest_topics").to_pylist()
    item = _field(lastn, "homefeed_list", "item_id")
    par = _parents(lastn, "homefeed_list")
    on = np.array([topic_of[i] in interests[u] for i, u in zip(item, par, strict=True)])
    click = _field(lastn, "homefeed_list", "is_click") == 1
    assert click[on].mean() > click[~on].mean() + 0.2


def test_interests_shared_across_scenarios(data):
    """A user's homefeed topics and ads topics agree far above chance (topics from the truth table)."""
    hf, ads, search = (_topic_hist(data, f"{s}_list") for s in SCEN)
    ok = ads.sum(1) >= 5
    same = _cos(hf, ads)[ok].mean()
    shuffled = _cos(hf, np.roll(ads, 1, axis=0))[ok].mean()
    assert same > 0.7 and same > 2.5 * shuffled, (same, shuffled)
    ok = search.sum(1) >= 3
    assert _cos(hf, search)[ok].mean() > 2 * _cos(hf, np.roll(search, 7, axis=0))[ok].mean()
    # the same holds from the note features alone (no truth): mean feature of homefeed vs ads
    cfg, notes, lastn = data["cfg"], data["notes"], data["lastn"]
    feat = np.zeros((cfg.n_items, cfg.dim), np.float32)
    feat[notes.column("note_idx").to_numpy()] = np.asarray(
        notes.column("note_feature").combine_chunks().flatten()).reshape(-1, cfg.dim)

    def user_mean(col):
        m = np.zeros((cfg.n_users, cfg.dim))
        np.add.at(m, _parents(lastn, col), feat[_field(lastn, col, "item_id")])
        return m

    fs = _cos(user_mean("homefeed_list"), user_mean("ads_list"))
    fr = _cos(user_mean("homefeed_list"), np.roll(user_mean("ads_list"), 3, axis=0))
    assert fs.mean() > fr.mean() + 0.3


def _recency_gain(data) -> np.ndarray:
    """Per user: cos(topics of the newest homefeed quarter, last 5 ads) - the same for the oldest quarter."""
    old = _topic_hist(data, "homefeed_list", lambda n: slice(0, max(1, n // 4)))
    new = _topic_hist(data, "homefeed_list", lambda n: slice(n - max(1, n // 4), n))
    last_ads = _topic_hist(data, "ads_list", lambda n: slice(max(0, n - 5), n))
    ok = last_ads.sum(1) >= 3
    return (_cos(new, last_ads) - _cos(old, last_ads))[ok]


def test_drift_recent_more_predictive(tmp_path):
    """Recent homefeed events predict a user's latest ads events better than old ones (interest drift)."""
    cfg = dict(SMALL, n_users=1000, homefeed_mean_len=40.0, ads_mean_len=20.0, search_mean_len=0.0, users_per_chunk=500)
    gain = _recency_gain(_load(tmp_path / "drift", SynthConfig(**cfg)))
    assert gain.mean() > 0.05 and gain.mean() > 4 * gain.std() / np.sqrt(len(gain)), (gain.mean(), gain.std())
    static = _recency_gain(_load(tmp_path / "static", SynthConfig(**{**cfg, "drift": 0.0})))
    assert gain.mean() > static.mean() + 0.05 and abs(static.mean()) < 0.04, (gain.mean(), static.mean())


def test_scenario_subset_and_no_truth(tmp_path):
    write_synthetic(tmp_path, SynthConfig(n_users=20, n_items=100, n_topics=4, homefeed_mean_len=5))
    assert (tmp_path / "truth" / "items.parquet").exists()
    s = write_synthetic(tmp_path, SynthConfig(n_users=50, n_items=200, n_topics=4, homefeed_mean_len=20,
                                              scenarios=["homefeed", "ads"], write_truth=False))
    schema = pq.read_schema(tmp_path / "multiscene_lastn.parquet")
    assert [n for n in schema.names if n.endswith("_list")] == ["homefeed_list", "ads_list"]
    assert set(s["events"]) == {"homefeed", "ads"} and not list((tmp_path / "truth").iterdir())  # stale truth removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multiscene_lastn.parquet", "note_embeddings.parquet", "truth"]
    assert "truth_items" not in s["paths"]


def test_edge_configs(tmp_path):
    s = write_synthetic(tmp_path / "a", SynthConfig(n_users=7, n_items=10, n_topics=1, max_interests=1, search_mean_len=0.0,
                                                    homefeed_mean_len=3.0, users_per_chunk=2))
    assert s["events"]["search"] == 0 and s["row_groups"] == 4
    lastn = pq.read_table(tmp_path / "a" / "multiscene_lastn.parquet")
    assert pc.list_value_length(lastn.column("search_list")).to_numpy().tolist() == [0] * 7
    assert pc.min(pc.list_value_length(lastn.column("homefeed_list"))).as_py() >= 3


def test_config_validation():
    assert from_dict(SynthConfig, {"n_users": 10, "scenarios": ["homefeed"]}).n_users == 10
    bad = [
        ({"n_users": 0}, "n_users"), ({"n_items": 5, "n_topics": 10}, "n_items"),
        ({"ads_item_fraction": 0.0}, "ads_item_fraction"), ({"ads_item_fraction": 1.5}, "ads_item_fraction"),
        ({"scenarios": ["ads"]}, "scenarios"), ({"scenarios": ["homefeed", "video"]}, "scenarios"),
        ({"drift": 2.0}, "drift"), ({"span_days": 0.0}, "span_days"), ({"homefeed_mean_len": -1.0}, "homefeed_mean_len"),
        ({"min_homefeed_len": 0}, "min_homefeed_len"), ({"n_items": 40, "ads_item_fraction": 0.01}, "ads_item_fraction"),
        ({"n_users": "many"}, "n_users"),
    ]
    for kw, field in bad:
        with pytest.raises(ConfigError) as e:
            from_dict(SynthConfig, kw, source="synth.yaml")
        assert e.value.field == field and str(e.value).startswith("synth.yaml: field"), (kw, str(e.value))
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(SynthConfig, {"n_user": 3})
    with pytest.raises(ConfigError):
        write_synthetic("/nonexistent-never-created", SynthConfig(n_users=-3))
