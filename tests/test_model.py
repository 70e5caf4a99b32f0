"""RED-Rec model: shapes, attention semantics (causal history, queries see all, users independent), switches,
gradients into both towers, save/load, pretrained HF backbones from a local path."""

import pytest
import torch

from redrec.errors import DataError
from redrec.model.config import ItemTowerConfig, ModelConfig, UserTowerConfig
from redrec.model.redrec import RedRec

torch.set_num_threads(1)


def tiny_cfg(kind="features", backbone="qwen2", **user):
    return ModelConfig(
        item_tower=ItemTowerConfig(kind=kind, n_items=50, feature_dim=8, mlp_hidden=16),
        user_tower=UserTowerConfig(backbone=backbone, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64, max_positions=64, **user),
        embed_dim=16, scenarios=["homefeed", "ads"], n_actions=3,
    )


def batch(B=3, L=6, seed=0, lengths=(6, 4, 2)):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths[:B]):
        mask[b, :n] = True
    return {
        "item": torch.randint(0, 50, (B, L), generator=g),
        "item_feat": torch.randn(B, L, 8, generator=g),
        "scenario": torch.randint(0, 2, (B, L), generator=g),
        "actions": (torch.rand(B, L, 3, generator=g) > 0.5).float(),
        "hour": torch.randint(0, 25, (B, L), generator=g),
        "gap": torch.randint(0, 32, (B, L), generator=g),
        "position": torch.arange(L).expand(B, L).clone(),
        "mask": mask,
    }


def model(kind="features", **kw):
    torch.manual_seed(0)
    return RedRec(tiny_cfg(kind, **kw)).eval()


def test_shapes_and_unit_norm():
    m = model()
    out = m(batch())
    assert out["seq"].shape == (3, 6, 16) and out["interests"].shape == (3, 6, 16)  # 3 queries x 2 scenarios
    assert torch.allclose(out["seq"].norm(dim=-1), torch.ones(3, 6), atol=1e-5)
    assert torch.allclose(out["interests"].norm(dim=-1), torch.ones(3, 6), atol=1e-5)
    assert m.query_group.tolist() == [0, 0, 0, 1, 1, 1]
    v = m.item_vectors(torch.tensor([1, 2]), torch.randn(2, 8))
    assert v.shape == (2, 16) and torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("readout", ["queries", "last"])
def test_interests_only_forward_equals_the_full_one(readout):
    """``forward(batch, seq=False)`` (inference) puts only the interest rows through the head: same vectors."""
    m = model(readout=readout, **({"query_scope": "shared"} if readout == "last" else {}))
    b = batch()
    full, lean = m(b), m(b, seq=False)
    assert "seq" not in lean and torch.allclose(full["interests"], lean["interests"], atol=1e-6)


@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("queries", ["alone", "see_each_other", "causal"])
def test_inference_runs_the_last_layer_on_the_query_rows_only(backbone, attn, queries, monkeypatch):
    """At inference the last decoder layer computes queries, attention output and MLP for the K query rows only
    (keys / values of all rows): the interest vectors equal those of the whole backbone."""
    import redrec.model.redrec as R

    opts = {"queries_see_each_other": queries == "see_each_other", "queries_causal": queries == "causal"}
    m = model(backbone=backbone, attn_implementation=attn, **opts)
    b = batch()
    calls = []
    real = R._attention_last_rows
    monkeypatch.setattr(R, "_attention_last_rows", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        lean = m(b, seq=False)["interests"]
        assert calls and R._query_rows_layers(m.backbone)  # the query-rows path ran
        monkeypatch.setattr(R, "_query_rows_layers", lambda backbone: False)
        whole = m(b, seq=False)["interests"]
    torch.testing.assert_close(lean, whole, atol=1e-6, rtol=0)


def test_history_is_causal_and_queries_see_everything():
    m = model()
    b = batch()
    out = m(b)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["item_feat"][0, 4] = torch.randn(8, generator=torch.Generator().manual_seed(9))  # change user 0's event 4
    out2 = m(b2)
    assert torch.allclose(out["seq"][0, :4], out2["seq"][0, :4], atol=1e-6)  # earlier states unchanged
    assert not torch.allclose(out["seq"][0, 4], out2["seq"][0, 4], atol=1e-4)
    assert not torch.allclose(out["interests"][0], out2["interests"][0], atol=1e-4)  # queries see the whole history
    assert torch.allclose(out["interests"][1:], out2["interests"][1:], atol=1e-6)  # other users unaffected


def test_padding_and_batching_do_not_leak():
    m = model()
    b = batch()
    full = m(b)
    # user 2 (2 real events) alone, without padding, gives the same outputs
    alone = {k: v[2:3, :2] for k, v in b.items()}
    one = m(alone)
    assert torch.allclose(full["seq"][2, :2], one["seq"][0], atol=1e-5)
    assert torch.allclose(full["interests"][2], one["interests"][0], atol=1e-5)
    # garbage in the padded slots changes nothing
    b3 = {k: v.clone() for k, v in b.items()}
    b3["item_feat"][2, 2:] = torch.randn(4, 8) * 100
    assert torch.allclose(m(b3)["interests"][2], full["interests"][2], atol=1e-5)


def test_queries_see_each_other_option():
    m = model(queries_see_each_other=True)
    mask = m.attention_mask(torch.tensor([[True, True, False]]), torch.float32)[0, 0]
    allowed = mask == 0
    assert allowed[3:, 3:].all()  # queries attend to each other
    m2 = model()
    allowed2 = m2.attention_mask(torch.tensor([[True, True, False]]), torch.float32)[0, 0] == 0
    assert allowed2[3:, 3:].equal(torch.eye(6, dtype=torch.bool))
    assert allowed2[3:, :2].all() and not allowed2[3:, 2].any()  # history yes, padding no
    assert allowed2[:3, :3].equal(torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool))


@pytest.mark.parametrize("switch,key", [("use_actions", "actions"), ("use_hour", "hour"), ("use_scenario", "scenario"),
                                        ("use_position", "position"), ("use_time_gap", "gap")])
def test_each_addend_can_be_switched_off(switch, key):
    b = batch()
    b2 = {k: v.clone() for k, v in b.items()}
    b2[key] = (b2[key] + 1) % (2 if key == "scenario" else 3 if key == "actions" else 20)
    on = model()
    assert not torch.allclose(on(b)["interests"], on(b2)["interests"], atol=1e-5)
    off = model(**{switch: False})
    assert torch.allclose(off(b)["interests"], off(b2)["interests"], atol=1e-6)


def test_gradients_reach_both_towers_and_head():
    m = model().train()
    b = batch()
    out = m(b)
    items = m.item_vectors(b["item"][:, 0], b["item_feat"][:, 0])
    loss = -(out["interests"][:, 0] * items).sum() - (out["seq"] * out["seq"].roll(1, 1)).sum()
    loss.backward()
    for name in ("item_tower.mlp.1.weight", "head.fc1.weight", "queries.weight", "action_emb.weight", "gap_emb.weight"):
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.backbone.named_parameters() if "layers" in n)
    assert m.backbone.get_input_embeddings().weight.requires_grad is False  # unused with inputs_embeds


def test_id_tower_and_llama_backbone_and_bf16():
    m = model("id", backbone="llama")
    b = batch()
    b.pop("item_feat")
    out = m(b)
    assert out["interests"].shape == (3, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o16 = m(b)
    assert torch.isfinite(o16["interests"].float()).all()
    with pytest.raises(ValueError, match="features"):
        model("features")({k: v for k, v in b.items()})


def test_save_load_round_trip(tmp_path):
    m = model()
    b = batch()
    m.save_pretrained(tmp_path / "m")
    m2 = RedRec.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(m(b)["interests"], m2(b)["interests"], atol=1e-6)
    with pytest.raises(DataError, match="missing"):
        RedRec.from_pretrained(tmp_path / "nothing")


def test_pretrained_backbone_from_local_path(tmp_path):
    from transformers import Qwen2Config, Qwen2Model

    hf = Qwen2Model(Qwen2Config(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2))
    hf.save_pretrained(tmp_path / "qwen")
    cfg = tiny_cfg()
    cfg.user_tower.pretrained_path = str(tmp_path / "qwen")
    m = RedRec(cfg)
    assert m.hidden_size == 48
    assert torch.equal(m.backbone.layers[0].mlp.up_proj.weight, hf.layers[0].mlp.up_proj.weight)
    assert m(batch())["interests"].shape == (3, 6, 16)
    cfg.user_tower.pretrained_path = str(tmp_path / "missing")
    with pytest.raises(DataError, match="no such directory"):
        RedRec(cfg)
