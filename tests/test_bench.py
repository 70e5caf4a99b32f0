"""``redrec bench`` (redrec.bench) on a tiny real store with a tiny real model.

* a 2-seed bench of ``popularity`` + ``redrec`` writes bench.json whose mean / std are numpy's over the per-seed
  values, valid PNG plots, and a table naming protocol, pool, users and seeds;
* a rerun reads finished runs back (nothing retrained); a run directory made with another config is refused;
* unknown models / presets and missing trained-baseline presets fail with errors naming them;
* the ablation presets expand to the intended overrides; ``--set`` comes after a model preset's overrides and may
  not touch a field an ablation varies; a YAML bench config merges with the flags;
* ``bench report`` writes markdown with the table, the plots and the reading;
* a raw dataset folder is imported once into OUT/store.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TRAIN, make_tiny_store
from typer.testing import CliRunner

from redrec import bench as B
from redrec import bench_report as R
from redrec.cli import app
from redrec.data.store import EventStore
from redrec.errors import ConfigError, RedrecError

runner = CliRunner()
SEEDS = 2


def tiny_base_yaml(path: Path) -> Path:
    """A base TrainConfig YAML with the tiny model of the training tests and a few steps."""
    import yaml

    from redrec.config import set_dotted

    data: dict = {}
    for k, v in {**TINY_TRAIN, "max_steps": 4, "batch_size": 8, "n_valid_users": 8, "eval_every": 2,
                 "protocol.name": "redrec", "protocol.target_scenario": "ads"}.items():
        if k not in ("test_at_end", "progress"):  # the bench sets these itself
            set_dotted(data, k, v)
    path.write_text(yaml.safe_dump(data))
    return path


def is_png(path: Path) -> bool:
    """PNG signature, an IHDR chunk with a non-empty image, and an IEND chunk at the end."""
    b = path.read_bytes()
    if b[:8] != b"\x89PNG\r\n\x1a\n" or b[12:16] != b"IHDR" or not b.endswith(b"IEND\xaeB`\x82"):
        return False
    w, h = struct.unpack(">II", b[16:24])
    return w > 100 and h > 100


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("bench_store"))


@pytest.fixture(scope="module")
def base_yaml(tmp_path_factory) -> Path:
    return tiny_base_yaml(tmp_path_factory.mktemp("bench_cfg") / "base.yaml")


@pytest.fixture(scope="module")
def bench_run(store, base_yaml, tmp_path_factory) -> tuple[Path, str]:
    """``redrec bench run`` of popularity + redrec, 2 seeds (through the CLI); returns (OUT, its output)."""
    out = tmp_path_factory.mktemp("bench") / "b"
    r = runner.invoke(app, ["bench", "run", "--dataset", str(store), "--models", "popularity,redrec",
                            "--seeds", str(SEEDS), "--config", str(base_yaml), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.output


def test_bench_json_aggregates_are_numpy_mean_and_sample_std(bench_run):
    out, output = bench_run
    b = json.loads((out / "bench.json").read_text())
    assert [(r["variant"], r["seed"]) for r in b["runs"]] == [("popularity", 0), ("redrec", 0), ("popularity", 1), ("redrec", 1)]
    assert b["seeds"] == [0, 1] and b["protocol"]["name"] == "redrec" and b["protocol"]["target_scenario"] == "ads"
    for name in ("popularity", "redrec"):
        runs = [r for r in b["runs"] if r["variant"] == name]
        agg = b["aggregates"][name]
        assert agg["n"] == SEEDS and agg["seeds"] == [0, 1]
        assert set(agg["mean"]) == set(runs[0]["metrics"]) and "hr@10" in agg["mean"]
        for m in agg["mean"]:
            vals = np.array([r["metrics"][m] for r in runs])
            assert agg["mean"][m] == pytest.approx(vals.mean(), abs=1e-12)
            assert agg["std"][m] == pytest.approx(vals.std(ddof=1), abs=1e-12)
        assert agg["wall_time_s"]["mean"] == pytest.approx(np.mean([r["wall_time_s"] for r in runs]))
    # the trained runs are real training runs of the tiny config, with their curves
    rr = [r for r in b["runs"] if r["variant"] == "redrec"]
    assert all(r["steps"] == 4 and not r["skipped"] for r in rr)
    assert all((out / r["dir"] / "model").is_dir() and (out / r["dir"] / "results.json").exists() for r in rr)
    curves = b["aggregates"]["redrec"]["curves"]
    assert curves["loss"]["step"] == [1, 2, 3, 4] and len(curves["valid_hr@10"]["step"]) >= 2
    assert b["aggregates"]["popularity"]["curves"] is None
    # every variant of a seed is tested on the same users; configs, machine and command are recorded
    for s in (0, 1):
        assert len({r["n_users"] for r in b["runs"] if r["seed"] == s}) == 1
    assert {v["name"] for v in b["variants"]} == {"popularity", "redrec"}
    assert b["variants"][1]["config"]["model"]["user_tower"]["hidden_size"] == 32
    assert b["machine"]["cores"] >= 1 and b["machine"]["torch"]
    assert b["command"].startswith("redrec bench run")  # rebuilt from OUT/bench_config.yaml (not the CLI here)
    assert (out / "bench_config.yaml").exists()
    # the printed table names protocol, dataset, pool, users and seeds, and shows mean ± std
    assert "protocol redrec" in output and "full pool: 300 items" in output and "seeds 0, 1" in output
    assert "±" in output and "popularity" in output and "zero-param" in output


def test_plots_are_valid_pngs(bench_run):
    out, _ = bench_run
    for name in ("metrics_at_k.png", "training_curves.png"):
        assert is_png(out / name), name


def test_rerun_reads_finished_runs_back(bench_run, store, base_yaml, monkeypatch):
    out, _ = bench_run
    before = json.loads((out / "bench.json").read_text())

    def no_training(cfg):
        raise AssertionError(f"retrained {cfg.out}")

    monkeypatch.setattr("redrec.train.train", no_training)
    monkeypatch.setattr("redrec.eval.protocols.evaluate", lambda *a, **k: pytest.fail("re-evaluated"))
    cfg = B.load_bench_config(None, {"dataset": str(store), "models": ["popularity", "redrec"], "seeds": SEEDS,
                                     "config": str(base_yaml), "out": str(out)})
    b = B.run_bench(cfg, log=lambda s: None)
    assert all(r["skipped"] for r in b["runs"])
    assert b["aggregates"]["redrec"]["mean"] == before["aggregates"]["redrec"]["mean"]
    assert b["aggregates"]["redrec"]["curves"] == before["aggregates"]["redrec"]["curves"]


def test_run_directory_of_another_config_is_refused(bench_run, store, base_yaml):
    out, _ = bench_run
    r = runner.invoke(app, ["bench", "run", "-d", str(store), "-m", "redrec", "--seeds", "1", "-c", str(base_yaml),
                            "--set", "mixing.last_n=16", "-o", str(out)])
    assert r.exit_code == 2
    assert "runs/redrec/seed0" in r.output and "mixing.last_n" in r.output and "another config" in r.output


def test_config_diff_ignores_fields_of_other_code_versions():
    old = {"seed": 0, "progress": True, "mixing": {"policy": "2d", "last_n": 128}}
    new = {"seed": 0, "progress": False, "mixing": {"policy": "2d", "last_n": 128, "fill_unused": False}}
    assert B._config_diff(new, old) is None  # a new field, and a field that does not change results
    new["mixing"]["last_n"] = 64
    assert B._config_diff(new, old) == "mixing.last_n: 64 here, 128 in the run directory"


def test_report_has_table_plots_and_reading(bench_run, tmp_path):
    out, _ = bench_run
    md = tmp_path / "docs" / "results.md"
    r = runner.invoke(app, ["bench", "report", str(out), "-o", str(md)])
    assert r.exit_code == 0, r.output
    text = md.read_text()
    b = json.loads((out / "bench.json").read_text())
    assert b["command"] in text and "seeds: 0, 1" in text and f"{b['machine']['usable_cores']} cores" in text
    assert "| variant | type | seeds | HR@10 |" in text and "| `redrec` | trained | 2 |" in text
    a = b["aggregates"]["redrec"]
    assert f"{a['mean']['hr@10']:.4f} ± {a['std']['hr@10']:.4f}" in text
    assert "Reading:" in text and "`redrec` vs `popularity`: HR@10" in text
    assert ("within seed spread" in text) or ("x the seed spread" in text)
    for name in ("metrics_at_k.png", "training_curves.png"):
        assert f"](results/{out.name}/{name})" in text
        assert is_png(tmp_path / "docs" / "results" / out.name / name)
    # a hand-written overall reading goes after the header, verbatim; a missing file is an error naming it
    (tmp_path / "summary.md").write_text("## Summary\n\nRED-Rec wins here, loses there.\n")
    r = runner.invoke(app, ["bench", "report", str(out), "-o", str(md), "--summary", str(tmp_path / "summary.md")])
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert "RED-Rec wins here, loses there." in text
    assert text.index("## Summary") < text.index("Reading:")
    r = runner.invoke(app, ["bench", "report", str(out), "-o", str(md), "--summary", str(tmp_path / "nope.md")])
    assert r.exit_code != 0 and "nope.md" in r.output


def test_compare_says_within_seed_spread():
    a = {"mean": {"hr@10": 0.50}, "std": {"hr@10": 0.02}}
    b = {"mean": {"hr@10": 0.49}, "std": {"hr@10": 0.01}}
    c = R.compare(a, b, "hr@10")
    assert c["verdict"] == "within seed spread" and c["spread"] == 0.02 and c["diff"] == pytest.approx(0.01)
    b["mean"]["hr@10"] = 0.40
    c = R.compare(a, b, "hr@10")
    assert c["verdict"] == "ahead" and c["ratio"] == pytest.approx(5.0)
    assert R.compare(b, a, "hr@10")["verdict"] == "behind"
    one = {"mean": {"hr@10": 0.4}, "std": {"hr@10": None}}
    assert R.compare(a, one, "hr@10")["verdict"] == "no spread (one seed)"


@pytest.mark.parametrize("args, needle", [
    (["--models", "popularity,nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["--preset", "nosuchpreset"], "unknown preset 'nosuchpreset'"),
    ([], "nothing to run"),
])
def test_unknown_names_are_clear_errors(store, tmp_path, args, needle):
    r = runner.invoke(app, ["bench", "run", "-d", str(store), "-o", str(tmp_path / "o"), *args])
    assert r.exit_code == 2
    assert needle in r.output and "error:" in r.output


def test_trained_baseline_needs_model_presets(store, tmp_path, monkeypatch):
    monkeypatch.setattr(B, "model_presets", lambda: {})
    with pytest.raises(ConfigError, match="'sasrec' is a trained baseline preset of redrec.baselines.MODEL_PRESETS"):
        B.load_bench_config(None, {"dataset": str(store), "models": ["sasrec"]})
    with pytest.raises(ConfigError, match="needs redrec.baselines.MODEL_PRESETS"):
        B.resolve_variants(B.load_bench_config(None, {"dataset": str(store), "preset": "baselines"}),
                           B.train_config(B.BenchConfig(dataset=str(store), models=["redrec"]), None, 0, store),
                           EventStore(store))


def test_model_presets_and_adhoc_variants_resolve(store, monkeypatch):
    monkeypatch.setattr(B, "model_presets", lambda: {"sasrec": {"loss.window_weight": 0.0, "mixing.policy": "timestamp"}})
    cfg = B.load_bench_config(None, {"dataset": str(store), "models": ["popularity", "sasrec", "short"],
                                     "variants": {"short": {"mixing.last_n": 16}}})
    base = B.train_config(cfg, None, 0, store)
    vs = B.resolve_variants(cfg, base, EventStore(store))
    assert [(v.name, v.kind) for v in vs] == [("popularity", "zero-param"), ("sasrec", "trained"), ("short", "trained")]
    tc = B.train_config(cfg, vs[1], 1, store)
    assert tc.loss.window_weight == 0.0 and tc.mixing.policy == "timestamp" and tc.seed == 1
    assert tc.out.endswith("runs/sasrec/seed1") and tc.resume and tc.test_at_end
    assert B.train_config(cfg, vs[2], 0, store).mixing.last_n == 16
    # --set comes after a model preset's overrides, but may not touch what an ablation variant varies
    cfg2 = B.load_bench_config(None, {"dataset": str(store), "models": ["sasrec"], "preset": "mixing"},
                               {"mixing.policy": "naive"})
    assert B.train_config(cfg2, vs[1], 0, store).mixing.policy == "naive"
    pinned = B.resolve_variants(B.load_bench_config(None, {"dataset": str(store), "preset": "mixing"}), base, EventStore(store))
    assert all(v.pinned for v in pinned) and not vs[1].pinned
    with pytest.raises(ConfigError, match=r"--set mixing.policy would override mixing.policy.*preset 'mixing'"):
        B.train_config(cfg2, pinned[0], 0, store)
    cfg3 = B.load_bench_config(None, {"dataset": str(store), "preset": "mixing"}, {"mixing": {"last_n": 16}})
    with pytest.raises(ConfigError, match="--set mixing would override mixing.policy"):
        B.train_config(cfg3, pinned[0], 0, store)
    # a bad override names the variant and the field
    bad = B.Variant("broken", {"mixing.policy": "sideways"})
    with pytest.raises(ConfigError, match=r"mixing.policy.*bench variant 'broken'"):
        B.train_config(cfg, bad, 0, store)


def test_baselines_preset_uses_model_presets(store, monkeypatch):
    presets = {"sasrec": {"mixing.policy": "timestamp", "model.item_tower.kind": "id"}, "morec": {"model.item_tower.kind": "features"}, "redrec": {}}
    monkeypatch.setattr(B, "model_presets", lambda: presets)
    cfg = B.load_bench_config(None, {"dataset": str(store), "preset": "baselines", "models": ["redrec"]})
    base = B.train_config(cfg, None, 0, store)
    vs = B.resolve_variants(cfg, base, EventStore(store))
    assert [v.name for v in vs] == ["popularity", "meanpool", "sasrec", "morec", "redrec"]  # redrec once, last
    assert B.ABLATIONS["baselines"].reference == "redrec"
    # a store without item vectors: no meanpool, no content-vector baseline, and a note saying so
    bare = type("S", (), {"vector_dim": 0, "path": "s"})()
    logs: list[str] = []
    vs = B.resolve_variants(B.load_bench_config(None, {"dataset": str(store), "preset": "baselines"}), base, bare, logs.append)  # type: ignore[arg-type]
    assert [v.name for v in vs] == ["popularity", "sasrec", "redrec"] and "meanpool, morec" in logs[0]


def test_presets_expand_to_the_paper_ablations(store):
    st = EventStore(store)
    cfg = B.BenchConfig(dataset=str(store), overrides={"protocol.name": "redrec", "protocol.target_scenario": "ads",
                                                       "mixing.last_n": 96})
    base = B.train_config(cfg, None, 0, store)
    ex = {name: {v.name: v for v in a.expand(base, st)} for name, a in B.ABLATIONS.items() if name != "baselines"}
    cross = ex["cross_scenario"]
    assert list(cross) == ["popularity", "single_ads", "cross"]
    assert cross["single_ads"].overrides == {"mixing.quotas": {"ads": 96}} and cross["cross"].overrides == {}
    assert list(ex["mixing"]) == ["2d", "timestamp", "naive", "1d_position", "1d_timestamp"]
    assert ex["mixing"]["naive"].overrides == {"mixing.policy": "naive"}
    assert ex["interests"]["single_interest"].overrides == {"model.user_tower.queries_per_scenario": 1}
    assert ex["interests"]["single_shared"].overrides == {"model.user_tower.queries_per_scenario": 1,
                                                          "model.user_tower.query_scope": "shared"}
    assert [v.overrides["mixing.last_n"] for v in ex["seq_len"].values()] == [32, 64, 128]
    for name, a in B.ABLATIONS.items():
        assert a.reference in ex.get(name, {a.reference: None}), name
    # with explicit quotas, seq_len scales them and the budgets of single / timestamp follow them
    q = B.train_config(B.BenchConfig(dataset=str(store), overrides={**cfg.overrides, "mixing.quotas": {"homefeed": 96, "ads": 32}}), None, 0, store)
    assert {v.name: v.overrides.get("mixing.quotas") for v in B.ABLATIONS["seq_len"].expand(q, st)} == {
        "seq32": {"homefeed": 24, "ads": 8}, "seq64": {"homefeed": 48, "ads": 16}, "seq128": {"homefeed": 96, "ads": 32}}
    assert B.ABLATIONS["cross_scenario"].expand(q, st)[1].overrides == {"mixing.quotas": {"ads": 128}}
    assert {v.name: v.overrides for v in B.ABLATIONS["mixing"].expand(q, st)}["timestamp"] == {
        "mixing.policy": "timestamp", "mixing.last_n": 128}
    # the cross-scenario ablation needs a target scenario
    loo = B.train_config(B.BenchConfig(dataset=str(store), overrides={"protocol.name": "loo"}), None, 0, store)
    with pytest.raises(ConfigError, match="needs protocol 'redrec'"):
        B.ABLATIONS["cross_scenario"].expand(loo, st)


def test_raw_dataset_is_imported_once(tmp_path):
    src = tmp_path / "ds"
    src.mkdir()
    rows = "".join(f"{u},{(u * 7 + j) % 13},{1_600_000_000 + j},{'a' if j % 3 else 'b'}\n" for u in range(12) for j in range(8))
    with gzip.open(src / "events.csv.gz", "wt") as f:
        f.write("user_id,item_id,timestamp,scenario\n" + rows)
    out = tmp_path / "bench"
    logs: list[str] = []
    st = B.prepare_store(src, out, logs.append)
    assert st == out / "store" and EventStore(st).n_users == 12 and len(logs) == 1
    assert B.prepare_store(src, out, logs.append) == st and len(logs) == 1  # reused, not re-imported
    other = tmp_path / "ds2"
    other.mkdir()
    (other / "events.csv.gz").write_bytes((src / "events.csv.gz").read_bytes())
    with pytest.raises(RedrecError, match="imported from"):
        B.prepare_store(other, out, logs.append)
    assert B.prepare_store(st, tmp_path / "x") == st  # a store is used in place
    (tmp_path / "empty").mkdir()
    with pytest.raises(RedrecError, match="neither an event store"):
        B.prepare_store(tmp_path / "empty", tmp_path / "y")


def test_help_texts():
    r = runner.invoke(app, ["bench", "--help"])
    assert r.exit_code == 0 and "run" in r.output and "report" in r.output
    r = runner.invoke(app, ["bench", "run", "--help"])
    for flag in ("--dataset", "--preset", "--models", "--seeds", "--config", "--set", "--out", "cross_scenario"):
        assert flag in r.output, flag


def test_bench_config_yaml_merges_flags(store, tmp_path):
    y = tmp_path / "bench.yaml"
    y.write_text(f"dataset: {store}\nmodels: [popularity]\nvariants:\n  short: {{mixing.last_n: 16}}\n"
                 "overrides: {epochs: 1, max_steps: 3}\nseeds: 2\n")
    cfg = B.load_bench_config(y, {"seeds": 1}, {"max_steps": 2, "num_threads": 1})
    assert cfg.seeds == 1 and cfg.models == ["popularity"] and cfg.variants == {"short": {"mixing.last_n": 16}}
    assert cfg.overrides == {"epochs": 1, "max_steps": 2, "num_threads": 1}  # --set merged into the file's
    y.write_text(f"dataset: {store}\nmodels: [popularity]\nsedes: 2\n")
    with pytest.raises(ConfigError, match=r"bench.yaml: field 'sedes': unknown field"):
        B.load_bench_config(y)
