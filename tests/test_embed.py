"""Embedding generation (redrec.embed, ``redrec embed``): sharded = one process bit for bit, resume, merge checks.

The model is a tiny RED-Rec saved untrained (random weights are as good as trained ones for these checks) with a
run directory around it (``RUN/model`` + ``RUN/config.yaml``), on the tiny synthetic store (features item tower).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_store, make_tiny_store, tiny_train_config
from typer.testing import CliRunner

from redrec.cli import app
from redrec.config import save_yaml
from redrec.data.store import EventStore
from redrec.embed import (
    EmbedConfig,
    embed_items,
    embed_users,
    load_embeddings,
    merge_embeddings,
    resolve_rank,
    row_range,
)
from redrec.errors import ConfigError, DataError
from redrec.eval.protocols import ProtocolConfig, make_cases
from redrec.model.redrec import RedRec
from redrec.model.scorer import ModelScorer, all_item_vectors
from redrec.train import resolve_model_config

REPO = Path(__file__).resolve().parents[1]
B = 16  # batch size: 300 items / 120 users make several batches and parts
CFG = EmbedConfig(batch_size=B, part_rows=2 * B, device="cpu", num_threads=1, progress=False)
runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("embed")
    store = make_tiny_store(root)
    cfg = tiny_train_config(store, root / "run", **{"model.user_tower.queries_per_scenario": 2, "model.embed_dim": 16})
    st = EventStore(store)
    torch.manual_seed(0)
    model = RedRec(resolve_model_config(cfg, st)).eval()
    model.save_pretrained(root / "run" / "model")
    save_yaml(cfg, root / "run" / "config.yaml")
    return {"root": root, "store": store, "st": st, "run": root / "run", "model": model, "cfg": cfg, "cache": {}}


def one_rank(env, kind: str, protocol: str = "latest"):
    """Merged one-process embeddings (cached per module)."""
    key = (kind, protocol)
    if key not in env["cache"]:
        out = env["root"] / f"one-{kind}-{protocol}"
        if kind == "items":
            embed_items(env["run"], None, out, CFG)
        else:
            embed_users(env["run"], None, out, protocol, CFG)
        merge_embeddings(out, progress=False)
        env["cache"][key] = load_embeddings(out)
    return env["cache"][key]


def assert_same(a, b) -> None:
    assert np.array_equal(np.asarray(a.vectors), np.asarray(b.vectors))  # bit-identical
    assert np.array_equal(a.index, b.index) and list(a.ids) == list(b.ids)
    assert (a.cutoff is None) == (b.cutoff is None)
    if a.cutoff is not None:
        assert np.array_equal(a.cutoff, b.cutoff)


def test_row_range_and_rank_resolution(monkeypatch):
    for n, w in [(300, 2), (300, 3), (5, 4), (0, 2), (1000, 7)]:
        ranges = [row_range(n, B, r, w) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(lo % B == 0 for lo, _ in ranges)  # whole batches: the same forward passes for any w
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= B
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank() == (1, 3)
    assert resolve_rank(0, 2) == (0, 2)  # flags win over the environment
    with pytest.raises(ConfigError, match="rank"):
        resolve_rank(3, 3)


def test_items_shards_merge_bit_identical(env):
    one = one_rank(env, "items")
    st = env["st"]
    assert one.vectors.shape == (st.n_items, 16) and one.vectors.dtype == np.float32
    assert isinstance(one.vectors, np.memmap)
    np.testing.assert_array_equal(one.vectors, all_item_vectors(env["model"], st))
    assert np.array_equal(one.index, np.arange(st.n_items)) and list(one.ids) == list(st.item_ids)
    m = one.manifest
    assert (m["format"], m["version"], m["kind"], m["dim"], m["vectors_per_row"], m["n_rows"], m["world_size"]) == (
        "redrec-embeddings", 1, "items", 16, 1, st.n_items, 1)
    assert m["merged"] and m["store"] == str(env["store"].resolve()) and m["config"]["batch_size"] == B
    for w in (2, 3):
        out = env["root"] / f"items-w{w}"
        results = [embed_items(env["run"] / "model", env["store"], out, CFG, rank=r, world_size=w) for r in range(w)]
        assert [r.row_start for r in results][1:] == [r.row_end for r in results][:-1]
        assert all((out / f"shard-{r:05d}-of-{w:05d}" / "DONE").exists() for r in range(w))
        merge_embeddings(out, progress=False)
        assert_same(load_embeddings(out), one)


def test_part_file_format(env):
    from safetensors.numpy import load_file

    out = env["root"] / "fmt"
    res = embed_users(env["run"], None, out, "loo", CFG, rank=1, world_size=2)
    info = json.loads((res.shard_dir / "shard.json").read_text())
    assert (info["rank"], info["row_start"], info["row_end"]) == (1, res.row_start, res.row_end)
    assert info["kind"] == "users" and info["world_size"] == 2 and info["query_group"] == [0, 0, 1, 1, 2, 2]
    assert not (out / "manifest.json").exists()  # written by rank 0 (or by merge)
    part = res.shard_dir / "part-000000.safetensors"
    umask = os.umask(0o022)
    os.umask(umask)
    assert part.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by whoever merges, as the umask allows
    t = load_file(str(part))
    assert t["embeddings"].dtype == np.float32 and t["embeddings"].shape == (2 * B, 6, 16)
    for k in ("row", "user", "cutoff"):
        assert t[k].dtype == np.int64 and t[k].shape == (2 * B,)
    assert np.array_equal(t["row"], np.arange(res.row_start, res.row_start + 2 * B))
    assert sorted(p.name for p in res.shard_dir.iterdir()) == ["DONE"] + [f"part-{i:06d}.safetensors" for i in range(
        res.n_parts)] + ["shard.json"]


@pytest.mark.parametrize("protocol", ["latest", "loo", "redrec"])
def test_users_shards_match_one_rank_and_model_scorer(env, protocol):
    st, cfg = env["st"], env["cfg"]
    one = one_rank(env, "users", protocol)
    out = env["root"] / f"users-{protocol}-w2"
    for r in (1, 0):  # any order
        embed_users(env["run"], env["store"], out, protocol, CFG, rank=r, world_size=2)
    merge_embeddings(out, progress=False)
    assert_same(load_embeddings(out), one)

    if protocol == "latest":
        assert np.array_equal(one.index, np.arange(st.n_users)) and np.array_equal(one.cutoff, st.history_lengths())
        assert one.manifest["protocol"] == "latest"
        from redrec.embed import latest_case

        cases = [latest_case(st, u) for u in range(st.n_users)]
    else:
        proto = cfg.protocol if cfg.protocol.name == protocol else ProtocolConfig(name=protocol)  # as embed_users
        cases = make_cases(st, proto)
        assert one.manifest["protocol"]["name"] == protocol
        assert np.array_equal(one.index, [c.user for c in cases]) and np.array_equal(one.cutoff, [c.cutoff for c in cases])
    assert list(one.ids) == [st.user_ids[c.user] for c in cases]
    assert one.vectors.shape == (len(cases), 6, 16) and one.query_group.tolist() == [0, 0, 1, 1, 2, 2]
    # the vectors ModelScorer gives evaluation: the same batches bit for bit, all users at once to rounding
    scorer = ModelScorer(env["model"], cfg.mixing, cfg.features, queries="all")
    same_batches = np.concatenate([scorer.score_cases(st, cases[i : i + B]) for i in range(0, len(cases), B)])
    np.testing.assert_array_equal(one.vectors, same_batches)
    np.testing.assert_allclose(one.vectors, scorer.score_cases(st, cases), rtol=0, atol=1e-5)


class Stop(Exception):
    pass


def test_resume_skips_finished_parts(env):
    one = one_rank(env, "users", "latest")
    out = env["root"] / "resume"

    def stop_after_2(i, path):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        embed_users(env["run"], None, out, "latest", CFG, on_part=stop_after_2)
    sd = out / "shard-00000-of-00001"
    assert not (sd / "DONE").exists() and sorted(p.name for p in sd.glob("part-*")) == ["part-000000.safetensors",
                                                                                        "part-000001.safetensors"]
    with pytest.raises(DataError, match="incomplete shard"):
        merge_embeddings(out, progress=False)
    with pytest.raises(DataError, match="redrec embed merge"):
        load_embeddings(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in sd.glob("part-*")}
    res = embed_users(env["run"], None, out, "latest", CFG)
    assert (res.parts_skipped, res.parts_written) == (2, res.n_parts - 2)
    assert all(sd.joinpath(n).stat().st_mtime_ns == t for n, t in stamps.items())  # not rewritten
    # a kill after the last part but before DONE: nothing left to compute
    (sd / "DONE").unlink()
    res = embed_users(env["run"], None, out, "latest", CFG)
    assert (res.parts_skipped, res.parts_written) == (res.n_parts, 0) and (sd / "DONE").exists()
    merge_embeddings(out, progress=False)
    assert_same(load_embeddings(out), one)
    # a resumed run with another layout is refused (its parts would not fit)
    with pytest.raises(DataError, match="different embedding run"):
        embed_users(env["run"], None, out, "latest", EmbedConfig(batch_size=8, device="cpu", progress=False))
    with pytest.raises(DataError, match="another world size"):
        embed_users(env["run"], None, out, "latest", CFG, rank=0, world_size=2)


def test_merge_refuses_missing_or_corrupt_parts(env):
    one = one_rank(env, "items")
    out = env["root"] / "broken"
    embed_items(env["run"], None, out, CFG, rank=0, world_size=2)
    with pytest.raises(DataError, match=r"shard-00001-of-00002.*missing shard: rank 1 of 2"):
        merge_embeddings(out, progress=False)
    res = embed_items(env["run"], None, out, CFG, rank=1, world_size=2)
    part = res.shard_dir / "part-000001.safetensors"

    raw = bytearray(part.read_bytes())
    raw[-5] ^= 0x10  # one flipped bit in the vectors: only the checksum sees it
    part.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"part-000001\.safetensors.*corrupt part: crc32"):
        merge_embeddings(out, progress=False)
    part.write_bytes(bytes(raw[:100]))  # truncated
    with pytest.raises(DataError, match=r"part-000001\.safetensors.*corrupt part \(cannot be read"):
        merge_embeddings(out, progress=False)
    part.unlink()
    with pytest.raises(DataError, match=r"part-000001\.safetensors.*missing part"):
        merge_embeddings(out, progress=False)
    part.write_bytes(bytes(raw))
    res = embed_items(env["run"], None, out, CFG, rank=1, world_size=2)  # resume recomputes the bad part only
    assert (res.parts_written, res.parts_skipped) == (1, res.n_parts - 1)
    (out / "manifest.json").unlink()  # rank 0's manifest not copied over: merge rebuilds it from the shards
    merge_embeddings(out, progress=False)
    assert_same(load_embeddings(out), one)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_clear_errors(env, tmp_path):
    with pytest.raises(DataError, match="no such run or model directory"):
        embed_items(tmp_path / "nope", env["store"], tmp_path / "o", CFG)
    (tmp_path / "unfinished").mkdir()
    save_yaml(env["cfg"], tmp_path / "unfinished" / "config.yaml")
    with pytest.raises(DataError, match="no final model yet"):
        embed_items(tmp_path / "unfinished", env["store"], tmp_path / "o", CFG)
    embed_items(env["run"], None, tmp_path / "unmerged", CFG, rank=0, world_size=2)  # shards only, no merge
    with pytest.raises(DataError, match="not merged yet"):
        load_embeddings(tmp_path / "unmerged")
    with pytest.raises(ConfigError, match="latest protocol has no options"):
        embed_users(env["run"], None, tmp_path / "o", "latest", CFG, overrides={"protocol.min_history": 3})
    # another store than the model's: features of another width; an id tower over another item count
    small = build_store(tmp_path, [[(0, 0, 10), (1, 1, 20)]], n_items=5, vectors=np.zeros((5, 3), np.float32))
    with pytest.raises(DataError, match="item vectors have 3 dims"):
        embed_items(env["run"], small.path, tmp_path / "o", CFG)
    mcfg = resolve_model_config(tiny_train_config(env["store"], tmp_path / "r", **{"model.item_tower.kind": "id"}), env["st"])
    RedRec(mcfg).save_pretrained(tmp_path / "idmodel")
    with pytest.raises(DataError, match="n_items.*the store has 5 items but the model's id item tower has 300"):
        embed_items(tmp_path / "idmodel", small.path, tmp_path / "o", CFG)
    if not torch.cuda.is_available():  # a GPU this process cannot use: said before any file is written
        with pytest.raises(ConfigError, match="embed config: field 'device': 'cuda' requested but"):
            embed_items(env["run"], None, tmp_path / "gpu", EmbedConfig(device="cuda", progress=False))
        assert not (tmp_path / "gpu").exists()


def test_cli_items_users_merge(env, tmp_path):
    base = ["--no-progress", "--batch-size", str(B), "--part-rows", str(2 * B), "--device", "cpu", "--set", "num_threads=1"]
    r = runner.invoke(app, ["embed", "items", "--model", str(env["run"] / "model"), "--store", str(env["store"]),
                            "--out", str(tmp_path / "it"), *base])
    assert r.exit_code == 0, r.output
    assert "merged" in r.output  # one process: merged at once
    assert_same(load_embeddings(tmp_path / "it"), one_rank(env, "items"))

    one = one_rank(env, "users", "loo")
    for rank in (0, 1):
        r = runner.invoke(app, ["embed", "users", "--run", str(env["run"]), "--out", str(tmp_path / "us"),
                                "--protocol", "loo", "--rank", str(rank), "--world-size", "2", *base])
        assert r.exit_code == 0, r.output
        assert "redrec embed merge" in r.output
    r = runner.invoke(app, ["embed", "merge", str(tmp_path / "us"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert_same(load_embeddings(tmp_path / "us"), one)

    r = runner.invoke(app, ["embed", "users", "--run", str(env["run"]), "--out", str(tmp_path / "us2"), "--protocol",
                            "loo", "--set", "protocol.min_history=30", *base])
    assert r.exit_code == 0, r.output
    e = load_embeddings(tmp_path / "us2")
    assert e.manifest["protocol"]["min_history"] == 30 and 0 < len(e) < len(one) and (e.cutoff >= 30).all()

    for args, needle in [
        (["embed", "items", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "no such run"),
        (["embed", "items", "--out", str(tmp_path / "x")], "exactly one of --run"),
        (["embed", "users", "--run", str(env["run"]), "--out", str(tmp_path / "x"), "--protocol", "bogus"], "protocol"),
        (["embed", "users", "--run", str(env["run"]), "--out", str(tmp_path / "x"), "--set", "batchsize=3"], "batchsize"),
        (["embed", "merge", str(tmp_path / "nothing")], "not an embeddings directory"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output and "Traceback" not in r.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> str | None:
    exe = Path(sys.executable).parent / "torchrun"
    return str(exe) if exe.exists() else shutil.which("torchrun")


@pytest.mark.skipif(_torchrun() is None, reason="torchrun is not installed next to this Python or on PATH")
def test_torchrun_two_processes(env, tmp_path):
    """Real ``torchrun --nproc_per_node 2``: each process takes its shard from RANK / WORLD_SIZE (no collectives)."""
    out = tmp_path / "tr"
    cmd = [_torchrun(), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "redrec.cli", "embed", "items", "--run-dir", str(env["run"]), "--out", str(out), "--no-progress",
           "--batch-size", str(B), "--part-rows", str(2 * B), "--device", "cpu", "--set", "num_threads=1"]
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # an abort prints Python stacks
    proc = subprocess.run(cmd, cwd=REPO, env=env_vars, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "shard-00000-of-00002" / "DONE").exists() and (out / "shard-00001-of-00002" / "DONE").exists()
    merge_embeddings(out, progress=False)
    assert_same(load_embeddings(out), one_rank(env, "items"))
