"""Baseline user models as RedRec backbones (SASRec, HSTU) and the readout / query-scope switches.

* SASRec / HSTU forward: shapes, right padding never reaches a real position, users are independent, causality,
  HSTU's relative time bias is used; save/load round-trip;
* ``readout: last``: one interest = the last real state; ``query_scope: shared``: queries of no scenario, the
  window loss clusters the targets of every scenario together;
* the presets of :data:`redrec.baselines.MODEL_PRESETS` train with :func:`redrec.train.train` on a tiny store.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_store, tiny_train_config

from redrec.baselines import MODEL_PRESETS
from redrec.baselines.hstu import time_bucket
from redrec.data.batching import collate, user_sequence
from redrec.data.store import EventStore
from redrec.errors import ConfigError
from redrec.eval.protocols import case_sequence
from redrec.losses import window_assignments, window_interest_loss
from redrec.model.config import ItemTowerConfig, ModelConfig, UserTowerConfig
from redrec.model.redrec import RedRec
from redrec.model.scorer import ModelScorer
from redrec.train import make_split, step_counts, train

torch.set_num_threads(1)

BACKBONES = ["sasrec", "hstu"]


def tiny_cfg(backbone: str, readout: str = "last", **user) -> ModelConfig:
    return ModelConfig(
        item_tower=ItemTowerConfig(kind="id", n_items=50),
        user_tower=UserTowerConfig(backbone=backbone, readout=readout, hidden_size=32, num_layers=2, num_heads=2,
                                   num_kv_heads=1, intermediate_size=64, max_positions=64, **user),
        embed_dim=16, scenarios=["homefeed", "ads"], n_actions=3,
    )


def model(backbone: str, readout: str = "last", **user) -> RedRec:
    torch.manual_seed(0)
    return RedRec(tiny_cfg(backbone, readout, **user)).eval()


def batch(B: int = 3, L: int = 6, seed: int = 0, lengths: tuple[int, ...] = (6, 4, 2)) -> dict[str, torch.Tensor]:
    """Random right-padded batch; ``time`` = event ages (t_now - t_j, decreasing), padding 0."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths[:B]):
        mask[b, :n] = True
    gaps = torch.randint(1, 100_000, (B, L), generator=g)
    age = gaps.flip(1).cumsum(1).flip(1)  # oldest first, strictly decreasing
    return {
        "item": torch.randint(0, 50, (B, L), generator=g),
        "scenario": torch.randint(0, 2, (B, L), generator=g),
        "actions": (torch.rand(B, L, 3, generator=g) > 0.5).float(),
        "hour": torch.randint(0, 25, (B, L), generator=g),
        "gap": torch.randint(0, 32, (B, L), generator=g),
        "position": torch.arange(L).expand(B, L).clone(),
        "time": age * mask,
        "mask": mask,
    }


def pad(b: dict[str, torch.Tensor], extra: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Append ``extra`` padding columns holding random garbage (only ``mask`` marks them as padding)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in b.items():
        shape = (v.shape[0], extra, *v.shape[2:])
        if k == "mask":
            fill = torch.zeros(shape, dtype=torch.bool)
        elif v.dtype.is_floating_point:
            fill = torch.rand(shape, generator=g)
        else:
            fill = torch.randint(0, 2, shape, generator=g)
        out[k] = torch.cat([v, fill], 1)
    return out


def real(out: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    return out["seq"][mask]


# ---------------------------------------------------------------------------------------------------------------
# forward semantics
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("readout", ["last", "queries"])
def test_shapes_unit_norm_and_query_groups(backbone, readout):
    m = model(backbone, readout)
    out = m(batch())
    K = 1 if readout == "last" else 6  # 3 queries x 2 scenarios
    assert out["seq"].shape == (3, 6, 16) and out["interests"].shape == (3, K, 16)
    assert torch.allclose(out["seq"].norm(dim=-1), torch.ones(3, 6), atol=1e-5)
    assert torch.allclose(out["interests"].norm(dim=-1), torch.ones(3, K), atol=1e-5)
    assert m.cfg.n_queries == K
    assert m.query_group.tolist() == ([-1] if readout == "last" else [0, 0, 0, 1, 1, 1])
    assert (m.queries is None) == (readout == "last")


@pytest.mark.parametrize("backbone", [*BACKBONES, "qwen2"])
def test_last_readout_is_the_last_real_state(backbone):
    m = model(backbone, "last")
    b = batch()
    out = m(b)
    last = b["mask"].sum(1) - 1
    assert torch.allclose(out["interests"][:, 0], out["seq"][torch.arange(3), last], atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("readout", ["last", "queries"])
def test_padding_never_reaches_real_positions_and_users_are_independent(backbone, readout):
    m = model(backbone, readout)
    b = batch()
    out = m(b)
    # more (garbage-filled) padding columns: the real states and the interests are unchanged
    out_p = m(pad(b, 5))
    assert torch.allclose(real(out, b["mask"]), out_p["seq"][:, :6][b["mask"]], atol=1e-5)
    assert torch.allclose(out["interests"], out_p["interests"], atol=1e-5)
    # each user alone, unpadded: the same as inside the batch
    for u in range(3):
        n = int(b["mask"][u].sum())
        one = m({k: v[u : u + 1, :n] for k, v in b.items()})
        assert torch.allclose(one["seq"][0], out["seq"][u, :n], atol=1e-5), u
        assert torch.allclose(one["interests"][0], out["interests"][u], atol=1e-5), u


@pytest.mark.parametrize("backbone", BACKBONES)
def test_history_is_causal(backbone):
    m = model(backbone, "queries")
    b = batch()
    out = m(b)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["item"][0, 3] = (b["item"][0, 3] + 1) % 50
    b2["time"][0, 3] = b["time"][0, 3] - 7  # a later event's time, too (still between its neighbours)
    out2 = m(b2)
    assert torch.allclose(out["seq"][0, :3], out2["seq"][0, :3], atol=1e-6)  # earlier states unchanged
    assert not torch.allclose(out["seq"][0, 3:], out2["seq"][0, 3:], atol=1e-4)  # later ones see the change
    assert not torch.allclose(out["interests"][0], out2["interests"][0], atol=1e-4)  # the queries see everything
    assert torch.allclose(out["seq"][1:], out2["seq"][1:], atol=1e-6)  # other users unchanged


def test_hstu_relative_time_bias_matters():
    b = batch()
    b2 = {k: v.clone() for k, v in b.items()}
    b2["time"] = b["time"] * 1000  # the same order, much longer gaps
    hstu, sasrec = model("hstu"), model("sasrec")
    assert not torch.allclose(hstu(b)["seq"], hstu(b2)["seq"], atol=1e-4)
    assert torch.equal(sasrec(b)["seq"], sasrec(b2)["seq"])  # SASRec has no time input
    # the log buckets: 0 for |dt| <= 1, monotone, symmetric, capped
    dt = torch.tensor([0, 1, -1, 2, 100, -100, 10**9, 2**62])
    tb = time_bucket(dt, 128)
    assert tb[:3].tolist() == [0, 0, 0] and tb[4] == tb[5] and bool((tb[3:5].diff() > 0).all()) and int(tb.max()) <= 128


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_load_round_trip(backbone, tmp_path):
    m = model(backbone, "queries", dropout=0.1)
    m.save_pretrained(tmp_path / "m")
    m2 = RedRec.from_pretrained(tmp_path / "m").eval()
    b = batch()
    assert torch.equal(m(b)["interests"], m2(b)["interests"])


def test_hstu_needs_times_and_config_errors():
    b = batch()
    del b["time"]
    with pytest.raises(Exception, match="time"):
        model("hstu")(b)
    cfg = tiny_cfg("sasrec")
    cfg.user_tower.pretrained_path = "/nowhere"
    with pytest.raises(ConfigError, match="pretrained_path"):
        cfg.validate()
    cfg = tiny_cfg("hstu")
    cfg.user_tower.num_kv_heads = 3  # HF-only field: not checked for the baseline encoders
    cfg.validate()


# ---------------------------------------------------------------------------------------------------------------
# query_scope: shared
# ---------------------------------------------------------------------------------------------------------------
def test_shared_queries_have_no_scenario():
    m = model("qwen2", "queries", query_scope="shared", queries_per_scenario=2)
    assert m.cfg.n_queries == 2 and m.query_group.tolist() == [-1, -1]
    b = batch()
    out = m(b)
    assert out["interests"].shape == (3, 2, 16)
    # the queries carry no scenario embedding: changing the scenario table only moves them through the history
    b_single = {k: v[:1] for k, v in b.items()}
    b_single["scenario"][:] = 0
    before = m(b_single)["interests"]
    with torch.no_grad():
        m.scenario_emb.weight[1] += 1.0  # scenario 1 appears in no event of this user
    assert torch.equal(m(b_single)["interests"], before)


def test_window_loss_shared_scope_uses_every_target():
    g = torch.Generator().manual_seed(0)
    B, W, d, K = 4, 10, 8, 3
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    interests = unit(torch.randn(B, K, d, generator=g))
    targets = unit(torch.randn(B, W, d, generator=g))
    scen = torch.randint(0, 3, (B, W), generator=g)  # targets of three scenarios
    wmask = torch.ones(B, W, dtype=torch.bool)
    wmask[3, 4:] = False
    shared = torch.full((K,), -1)
    b_idx, k_idx, w_idx, stats = window_assignments(interests, shared, targets, scen, wmask)
    assert stats["n_targets"] == int(wmask.sum()) and stats["n_unmatched"] == 0
    assert stats["mean_clusters"] == K  # one group per user, K clusters each (every user has >= K targets)
    for b in range(B):  # the K clusters of a user are matched to K distinct queries, whatever their scenario
        assert sorted(set(k_idx[b_idx == b].tolist())) == list(range(K))
    # scenario scope: only scenario 0 has queries here -> the other scenarios' targets are left out
    per_scen = torch.zeros(K, dtype=torch.long)
    _, _, _, st0 = window_assignments(interests, per_scen, targets, scen, wmask)
    assert st0["n_targets"] == int((wmask & (scen == 0)).sum()) and st0["n_unmatched"] == int((wmask & (scen != 0)).sum())
    # step_counts agrees with the loss on what counts
    tb = {"mask": torch.ones(B, 5, dtype=torch.bool), "window_mask": wmask, "window_scenario": scen}
    assert step_counts([tb], shared) == (B * 5, stats["n_targets"])
    assert step_counts([tb], per_scen) == (B * 5, st0["n_targets"])
    loss, ls = window_interest_loss(interests, shared, targets, torch.randint(0, 50, (B, W), generator=g), scen,
                                    wmask, torch.zeros(0, dtype=torch.long), torch.zeros(0, d), 10.0)
    assert torch.isfinite(loss) and ls["n_targets"] == stats["n_targets"]


# ---------------------------------------------------------------------------------------------------------------
# the presets in the real trainer
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("baseline_store"))


def test_presets_are_valid_train_overrides(tmp_path):
    assert set(MODEL_PRESETS) == {"sasrec", "hstu", "hllm", "morec", "redrec"}
    for name, preset in MODEL_PRESETS.items():
        tiny_train_config(tmp_path, tmp_path / name, **preset)  # every key exists and every value type-checks


@pytest.mark.parametrize("preset", ["sasrec", "hstu", "hllm", "morec"])
def test_preset_trains_evaluates_and_round_trips(store, tmp_path, preset):
    steps = 25
    cfg = tiny_train_config(store, tmp_path / "run", **{**MODEL_PRESETS[preset], "batch_size": 8, "max_steps": steps,
                                                        "n_valid_users": 8, "test_at_end": True,
                                                        "protocol.max_users": 30})
    summary = train(cfg)
    assert summary["steps"] == steps
    recs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in recs if "loss" in r])
    assert np.isfinite(losses).all()
    assert losses[-3:].mean() < losses[:3].mean() - 0.3, losses.round(2).tolist()
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "hr@10" in json.dumps(res)
    # results are labelled with the baseline's name, not "red-rec"
    want = {"sasrec": "sasrec", "hstu": "hstu", "morec": "sasrec"}.get(preset, "red-rec")
    assert [r["model"] for r in res["results"]] == [want]

    m = RedRec.from_pretrained(tmp_path / "run" / "model").eval()
    assert m.cfg.user_tower.backbone == cfg.model.user_tower.backbone
    m.save_pretrained(tmp_path / "again")
    m2 = RedRec.from_pretrained(tmp_path / "again").eval()
    st = EventStore(store)
    split = make_split(st, cfg.protocol, 8, 0)
    cases = split.test[:6]
    seqs = []
    for c in cases:
        user = st.user(c.user)
        seqs.append(user_sequence(st, user, case_sequence(user, c, cfg.mixing, st.scenarios), int(c.t_now), cfg.features))
    needs = bool(getattr(m.item_tower, "needs_features", False))
    b = collate(seqs, st, needs)
    assert torch.equal(m(b)["interests"], m2(b)["interests"])
    # the target-scenario scorer falls back to every interest when they are all shared
    scorer = ModelScorer(m, cfg.mixing, cfg.features, queries="target_scenario")
    scorer.prepare(st, cases, cfg.protocol)
    assert scorer._query_index is None
    assert scorer.score_cases(st, cases).shape == (len(cases), m.cfg.n_queries, m.cfg.embed_dim)
