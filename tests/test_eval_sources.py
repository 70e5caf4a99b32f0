"""``redrec eval`` from a checkpoint and from embedding files: the same cases give the same metrics either way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_store, tiny_train_config
from typer.testing import CliRunner

from redrec.cli import app
from redrec.config import save_yaml
from redrec.data.store import EventStore
from redrec.embed import EmbedConfig, embed_items, embed_users, merge_embeddings
from redrec.errors import ConfigError, DataError
from redrec.eval.protocols import ProtocolConfig
from redrec.eval.run import EvalConfig, run_eval
from redrec.model.redrec import RedRec
from redrec.train import resolve_model_config

runner = CliRunner()
ECFG = EmbedConfig(batch_size=32, device="cpu", num_threads=1, progress=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evalsrc")
    store = make_tiny_store(root)
    cfg = tiny_train_config(store, root / "run", **{"model.embed_dim": 16})
    torch.manual_seed(0)
    model = RedRec(resolve_model_config(cfg, EventStore(store))).eval()
    model.save_pretrained(root / "run" / "model")
    save_yaml(cfg, root / "run" / "config.yaml")
    embed_items(root / "run", None, root / "items", ECFG)
    merge_embeddings(root / "items", progress=False)
    embed_users(root / "run", None, root / "users_redrec", "redrec", ECFG)
    merge_embeddings(root / "users_redrec", progress=False)
    return {"root": root, "store": store, "run": root / "run"}


@pytest.mark.parametrize("queries", ["all", "target_scenario"])
def test_checkpoint_and_embeddings_agree(env, queries: str) -> None:
    proto = ProtocolConfig(name="redrec")
    base = {"store": str(env["store"]), "protocol": proto, "models": [], "queries": queries}
    r_ckpt = run_eval(EvalConfig(**base, checkpoint=str(env["run"])), progress=False)
    r_emb = run_eval(EvalConfig(**base, item_embeddings=str(env["root"] / "items"),
                                user_embeddings=str(env["root"] / "users_redrec")), progress=False)
    assert [r.model for r in r_ckpt] == ["red-rec"] and [r.model for r in r_emb] == ["embeddings"]
    a, b = r_ckpt[0], r_emb[0]
    assert a.n_users == b.n_users > 50
    for m, v in a.metrics.items():
        assert b.metrics[m] == pytest.approx(v, abs=1e-12), m
    # the per-user hit vectors agree too (not only the means)
    np.testing.assert_array_equal(a.per_user["hr@50"], b.per_user["hr@50"])


def test_query_selection_changes_the_result(env) -> None:
    base = {"store": str(env["store"]), "protocol": ProtocolConfig(name="redrec"), "models": []}
    emb = {"item_embeddings": str(env["root"] / "items"), "user_embeddings": str(env["root"] / "users_redrec")}
    r_all = run_eval(EvalConfig(**base, **emb, queries="all"), progress=False)[0]
    r_tgt = run_eval(EvalConfig(**base, **emb, queries="target_scenario"), progress=False)[0]
    assert r_all.per_user["mrr"].tolist() != r_tgt.per_user["mrr"].tolist()


def test_embeddings_of_another_protocol_are_refused(env) -> None:
    cfg = EvalConfig(store=str(env["store"]), protocol=ProtocolConfig(name="loo"), models=[],
                     item_embeddings=str(env["root"] / "items"), user_embeddings=str(env["root"] / "users_redrec"))
    with pytest.raises(DataError, match="no user row") as e:
        run_eval(cfg, progress=False)
    assert "redrec" in str(e.value) and "ids.parquet" in str(e.value)


def test_config_errors(env) -> None:
    with pytest.raises(ConfigError, match="user_embeddings"):
        run_eval(EvalConfig(store=str(env["store"]), item_embeddings=str(env["root"] / "items")), progress=False)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_eval(EvalConfig(store=str(env["store"]), models=[]), progress=False)
    with pytest.raises(DataError, match="kind"):  # items and users swapped
        run_eval(EvalConfig(store=str(env["store"]), protocol=ProtocolConfig(name="redrec"), models=[],
                            item_embeddings=str(env["root"] / "users_redrec"), user_embeddings=str(env["root"] / "items")),
                 progress=False)
    with pytest.raises(DataError, match="no such run"):
        run_eval(EvalConfig(store=str(env["store"]), models=[], checkpoint=str(env["root"] / "nope")), progress=False)


def test_cli_eval_checkpoint_writes_json(env, tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    r = runner.invoke(app, ["eval", "--store", str(env["store"]), "--protocol", "redrec", "--checkpoint", str(env["run"]),
                            "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "protocol: redrec" in r.output and "full pool: 300 items" in r.output and "K = 10, 50, 100, 200, 1000" in r.output
    assert "red-rec" in r.output and "popularity" not in r.output  # a checkpoint alone: no baselines by default
    res = json.loads(out.read_text())["results"]
    assert res[0]["model"] == "red-rec" and res[0]["config"]["eval"]["checkpoint"] == str(env["run"])
