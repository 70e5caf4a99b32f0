"""The command line end to end on files the tests write (typer's runner in-process, plus the real console script)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import no_temp_leftovers
from typer.testing import CliRunner

from redrec.cli import app

runner = CliRunner()


def _events(d: Path, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with gzip.open(d / "events.csv.gz", "wt") as f:
        f.write(text)
    return d


GOOD = "user_id,item_id,timestamp\n" + "".join(f"{u},{(u * 7 + j) % 13},{1_600_000_000 + j}\n" for u in range(20) for j in range(6))


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("data", "eval", "demo"):
        assert cmd in r.output
    r = runner.invoke(app, ["data", "--help"])
    assert all(c in r.output for c in ("synth", "import", "stats"))


def test_import_stats_eval(tmp_path):
    src = _events(tmp_path / "ds", GOOD)
    r = runner.invoke(app, ["data", "import", str(src), "-o", str(tmp_path / "st"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "users" in r.output and "20" in r.output and "120" in r.output
    r = runner.invoke(app, ["data", "stats", str(tmp_path / "st"), "--json"])
    st = json.loads(r.output)
    assert (st["users"], st["items"], st["events"]) == (20, 13, 120)
    r = runner.invoke(app, ["eval", "--store", str(tmp_path / "st"), "--protocol", "loo", "--no-progress", "-o", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "protocol: loo" in r.output and "popularity" in r.output
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert res[0]["protocol"] == "loo" and res[0]["n_users"] == 20


def test_eval_yaml_config_errors_name_field(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("store: x\nprotocol:\n  name: loo\n  nope: 1\n")
    r = runner.invoke(app, ["eval", "--config", str(cfg)])
    assert r.exit_code == 2 and "e.yaml" in r.output and "protocol.nope" in r.output
    cfg.write_text("store: x\nprotocol:\n  n_targets: three\n")
    r = runner.invoke(app, ["eval", "--config", str(cfg)])
    assert r.exit_code == 2 and "protocol.n_targets" in r.output


@pytest.mark.parametrize(
    "text,needle",
    [
        ("user_id,item_id\n1,2\n", "field 'timestamp'"),
        ("user_id,item_id,timestamp\n1,2,1600000009\n1,3,1600000001\n", "not in chronological order"),
    ],
)
def test_import_bad_input_exit_code_and_nothing_written(tmp_path, text, needle):
    src = _events(tmp_path / "ds", text)
    r = runner.invoke(app, ["data", "import", str(src), "-o", str(tmp_path / "st"), "--no-progress"])
    assert r.exit_code == 2
    assert needle in r.output and "events.csv.gz" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "st").exists() and no_temp_leftovers(tmp_path) == []


def test_import_existing_output_refused_before_reading(tmp_path):
    src = _events(tmp_path / "ds", GOOD)
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["data", "import", str(src), "-o", str(tmp_path / "st"), "--no-progress"])
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output
    assert (tmp_path / "st" / "keep.txt").read_text() == "mine"


def test_console_script_synth_import_eval(tmp_path):
    exe = Path(sys.executable).parent / "redrec"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "redrec.cli"]
    r = subprocess.run(cmd + ["data", "synth", "--out", str(tmp_path / "raw"), "--users", "150", "--items", "600"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd + ["data", "import", str(tmp_path / "raw"), "-o", str(tmp_path / "st"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "homefeed" in r.stdout and "ads" in r.stdout and "search" in r.stdout
    r = subprocess.run(cmd + ["eval", "-s", str(tmp_path / "st"), "-p", "redrec", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "protocol: redrec" in r.stdout and "mean-pool" in r.stdout
    r = subprocess.run(cmd + ["data", "stats", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "not an event store" in r.stderr


def test_demo_end_to_end_tiny(tmp_path):
    """`redrec demo` wiring: synthesise, import, baselines and RED-Rec on the same test users, one table, JSON."""
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--users", "150", "--items", "600", "--epochs", "1",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "protocol: redrec" in r.output
    for model in ("popularity", "mean-pool", "red-rec"):
        assert model in r.output
    res = json.loads((tmp_path / "d" / "results.json").read_text())["results"]
    assert [x["model"] for x in res] == ["popularity", "mean-pool", "red-rec"]
    assert len({x["n_users"] for x in res}) == 1  # the same test users for every model
    assert (tmp_path / "d" / "run" / "model" / "model.safetensors").exists()
