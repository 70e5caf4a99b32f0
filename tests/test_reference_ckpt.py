"""Loading the RedSeqRec checkpoint layout (item_llm / user_llm Qwen2 causal LMs + extras) into RedRec.

A tiny Qwen2 base directory (hidden 32, 2 layers, a BPE tokenizer trained here) stands in for Qwen2.5-1.5B, and a
random state dict with the reference's key names stands in for Red-Mmu-Rec-Multiscene-Qwen2.5-1.5b.  The reference's
own computation (slot embedding written over token id 0, last hidden state at the slot, note_embedding_head,
user LLM over item states + queries) is re-done here with plain HF modules to check that our model computes the same.
"""

from __future__ import annotations

import json
import math
import sys
import types
from collections import OrderedDict
from enum import Enum

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from redrec.errors import DataError
from redrec.model.reference_ckpt import (
    REFERENCE_ACTIONS,
    config_for_checkpoint,
    load_reference_checkpoint,
    read_state_dict,
    reference_model_config,
)

H, D, V = 32, 64, 320
TEXTS = ["Summary:\n\ntitle:red lipstick\ncontent:a review of lipsticks\nocr:", "title:cats and dogs",
         "content:hiking shoes for the mountains", "ocr:sale today only", "homefeed ads notes recommend"]


# ------------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Qwen2 causal LM + tokenizer directory (what Qwen2.5-1.5B's directory holds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("qwen_tiny")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=512)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    return d


def _random_llm(base_dir, seed):
    from transformers import AutoConfig, Qwen2ForCausalLM

    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(AutoConfig.from_pretrained(base_dir)).eval()
    with torch.no_grad():  # move every tensor off its init (norm weights are all ones otherwise)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def ref(base_dir):
    """``(state dict in the reference layout, the reference's modules)``."""
    item_llm, user_llm = _random_llm(base_dir, 1), _random_llm(base_dir, 2)
    g = torch.Generator().manual_seed(3)
    extra = {
        "item_emb_tokens": torch.randn(1, 1, H, generator=g) * 0.5,
        "query.weight": torch.randn(3, H, generator=g) * 0.5,
        "note_embedding_head.projection.weight": torch.randn(D, H, generator=g) * 0.2,
        "note_embedding_head.projection.bias": torch.randn(D, generator=g) * 0.1,
        "note_embedding_head.fc.weight": torch.randn(D, D, generator=g) * 0.2,
        "note_embedding_head.fc.bias": torch.randn(D, generator=g) * 0.1,
        "note_embedding_head.layer_norm.weight": 1 + torch.randn(D, generator=g) * 0.1,
        "note_embedding_head.layer_norm.bias": torch.randn(D, generator=g) * 0.1,
        "logit_scale": torch.tensor(math.log(1 / 0.07) + 0.5),
        "item_action_embedding": torch.randn(5, H, generator=g) * 0.5,
        "hour_embeddings.weight": torch.randn(24, H, generator=g) * 0.5,
    }
    sd = {f"item_llm.{k}": v.clone() for k, v in item_llm.state_dict().items()}
    sd |= {f"user_llm.{k}": v.clone() for k, v in user_llm.state_dict().items()}
    sd |= extra
    assert "item_llm.lm_head.weight" in sd and "user_llm.model.layers.1.mlp.up_proj.weight" in sd
    return sd, item_llm, user_llm


@pytest.fixture(scope="module")
def loaded(base_dir, ref):
    sd, _, _ = ref
    cfg = reference_model_config(base_dir, n_items=len(TEXTS), use_actions=True, use_hour=True)
    model, rep = load_reference_checkpoint(sd, cfg)
    _set_items(model, TEXTS)
    return model, rep


def _set_items(model, texts):
    from redrec.model.text import ItemTokenizer

    tower = model.item_tower
    ids, lengths = ItemTokenizer(tower.cfg.text)(texts)
    tower.set_tokens(ids, lengths, np.ones(len(texts), bool))
    return ids, lengths


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny event store: scenarios homefeed / ads, flags share / like / follow, items with title + ocr."""
    from redrec.data.events import import_events

    d = tmp_path_factory.mktemp("events")
    rows = ["user_id,item_id,timestamp,scenario,is_share,is_like,is_follow"]
    for u in range(4):
        for j in range(6):
            rows.append(f"u{u},i{(u + j) % 5},{1_700_000_000 + 3600 * j + u},{'ads' if j % 3 == 2 else 'homefeed'},"
                        f"{j % 2},{(j + 1) % 2},{int(j == 3)}")
    (d / "events.csv").write_text("\n".join(rows) + "\n")
    (d / "items.csv").write_text("item_id,title,ocr\ni0,red lipstick,sale\ni1,cats and dogs,\ni2,hiking shoes,today\n"
                                 "i3,,\ni4,notes,only\n")
    return import_events(d, tmp_path_factory.mktemp("st") / "store", progress=False)


# ------------------------------------------------------------------------------------------------------------------
# the reference's computation, redone from its description
# ------------------------------------------------------------------------------------------------------------------
def _ref_head(sd, x):
    p = F.linear(x, sd["note_embedding_head.projection.weight"], sd["note_embedding_head.projection.bias"])
    h = p + F.linear(F.gelu(p), sd["note_embedding_head.fc.weight"], sd["note_embedding_head.fc.bias"])
    return F.layer_norm(h, (D,), sd["note_embedding_head.layer_norm.weight"], sd["note_embedding_head.layer_norm.bias"])


@torch.no_grad()
def _ref_item_hidden(sd, item_llm, text_ids):
    """Text ids + token 0, whose embedding is replaced by item_emb_tokens; positions right-aligned to 300."""
    ids = torch.tensor([list(text_ids) + [0]])
    x = item_llm.get_input_embeddings()(ids)
    x[ids == 0] = sd["item_emb_tokens"].reshape(-1)
    pos = torch.arange(ids.shape[1])[None] + (300 - len(text_ids))
    out = item_llm(inputs_embeds=x, position_ids=pos, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return out.hidden_states[-1][0, -1]


# ------------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------------
def test_every_tensor_lands_in_its_place(loaded, ref):
    model, rep = loaded
    sd, _, _ = ref
    assert rep.ok and not rep.missing and not rep.unexpected and not rep.mismatched
    assert set(rep.ignored) == {"item_llm.lm_head.weight", "user_llm.lm_head.weight"}
    assert set(rep.mapped) | set(rep.ignored) == set(sd)
    ours = model.state_dict()
    for k, v in sd.items():
        if k.startswith("user_llm.model."):
            assert torch.equal(ours["backbone." + k[len("user_llm.model."):]], v), k
        elif k.startswith("item_llm.model.") and not k.endswith("embed_tokens.weight"):
            assert torch.equal(ours["item_tower.encoder." + k[len("item_llm.model."):]], v), k
    emb = model.item_tower.encoder.get_input_embeddings().weight
    slot = model.item_tower.slot_id
    assert torch.equal(emb[slot], sd["item_emb_tokens"].reshape(-1))
    other = torch.arange(emb.shape[0]) != slot
    assert torch.equal(emb[other], sd["item_llm.model.embed_tokens.weight"][other])
    assert torch.equal(model.queries.weight, sd["query.weight"])
    assert torch.equal(model.head.fc1.weight, sd["note_embedding_head.projection.weight"])
    assert torch.equal(model.head.fc2.bias, sd["note_embedding_head.fc.bias"])
    assert torch.equal(model.head.norm.weight, sd["note_embedding_head.layer_norm.weight"])
    assert torch.equal(model.action_emb.weight, sd["item_action_embedding"].T)  # reference flag order assumed
    assert torch.equal(model.hour_emb.weight[:24], sd["hour_embeddings.weight"])
    assert torch.count_nonzero(model.hour_emb.weight[24]) == 0
    assert rep.logit_scale == pytest.approx(math.log(1 / 0.07) + 0.5)
    assert rep.temperature == pytest.approx(1 / min(math.exp(rep.logit_scale), 100))
    # the reference-compatible configuration
    u = model.cfg.user_tower
    assert model.cfg.n_queries == 3 and u.query_scope == "shared"
    assert (u.use_scenario, u.use_position, u.use_time_gap, u.use_actions, u.use_hour) == (False, False, False, True, True)
    assert "item_tower.no_text" in rep.not_in_reference and "scenario_emb.weight" in rep.not_in_reference


def test_outputs_match_the_reference_computation(loaded, ref):
    """Item vectors, the user's causal states and all 3 interests equal the reference's, computed independently."""
    model, _ = loaded
    sd, item_llm, user_llm = ref
    tower = model.item_tower
    ids, lengths = tower.tokens.numpy(), tower.lengths.numpy()
    with torch.no_grad():
        ours_h = model.item_hidden(torch.arange(len(TEXTS)))
        ours_v = model.item_vectors(torch.arange(len(TEXTS)))
    ref_h = torch.stack([_ref_item_hidden(sd, item_llm, ids[i, : lengths[i] - 1]) for i in range(len(TEXTS))])
    assert all((ids[i, : lengths[i] - 1] != 0).all() for i in range(len(TEXTS)))  # no text token is the reference's slot id
    torch.testing.assert_close(ours_h, ref_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_v, F.normalize(_ref_head(sd, ref_h), dim=-1), atol=1e-4, rtol=1e-4)

    # a user: 5 events with actions and hours, then the 3 queries
    L = 5
    acts = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 1], [0, 0, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    hours = torch.tensor([3, 10, 23, 0, 12])
    items = torch.tensor([4, 0, 2, 1, 3])
    batch = {"item": items[None], "actions": acts[None], "hour": hours[None], "scenario": torch.zeros(1, L, dtype=torch.long),
             "gap": torch.zeros(1, L, dtype=torch.long), "position": torch.arange(L)[None], "mask": torch.ones(1, L, dtype=torch.bool)}
    with torch.no_grad():
        out = model(batch)
        x = ref_h[items] + acts @ sd["item_action_embedding"] + sd["hour_embeddings.weight"][hours]
        x = torch.cat([x, sd["query.weight"]])[None]
        hs = user_llm(inputs_embeds=x, attention_mask=torch.ones(1, L + 3, dtype=torch.long), output_hidden_states=True).hidden_states[-1]
        z = F.normalize(_ref_head(sd, hs[0]), dim=-1)
    torch.testing.assert_close(out["seq"][0], z[:L], atol=1e-4, rtol=1e-4)
    # every interest: query k sees the history and queries 0..k at position L + k, in both models
    torch.testing.assert_close(out["interests"][0], z[L:], atol=1e-4, rtol=1e-4)


def test_file_formats(tmp_path, base_dir, ref, loaded):
    from safetensors.torch import save_file

    sd, _, _ = ref
    model, _ = loaded
    want = {k: v for k, v in model.state_dict().items()
            if k.startswith(("item_tower.encoder.", "item_tower.no_text", "backbone.", "head.", "queries", "action_emb", "hour_emb"))}
    # .bin with torch.compile / DDP prefixes, .safetensors, a sharded index
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "ckpt.bin")
    save_file(sd, str(tmp_path / "ckpt.safetensors"))
    keys = sorted(sd)
    half = len(keys) // 2
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    save_file({k: sd[k] for k in keys[:half]}, str(shard_dir / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(shard_dir / "model-00002-of-00002.safetensors"))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}))
    for src in (tmp_path / "ckpt.bin", tmp_path / "ckpt.safetensors", shard_dir / "model.safetensors.index.json", shard_dir):
        state = read_state_dict(src)
        assert set(state) == set(sd), src
        assert all(torch.equal(state[k], sd[k]) for k in sd), src
    m2, rep = load_reference_checkpoint(tmp_path / "ckpt.bin", reference_model_config(base_dir, n_items=len(TEXTS), use_actions=True, use_hour=True))
    assert rep.ok
    got = m2.state_dict()
    assert [k for k, v in want.items() if not torch.equal(got[k], v)] == []


# DeepSpeed pickles its own objects (an int enum for the stage, EasyDict configs through Lightning) next to the
# tensors; they are defined in modules that are gone when the checkpoint is read, as without deepspeed installed.
def _foreign_objects():
    mod = types.ModuleType("fake_deepspeed_constants")

    class ZeroStageEnum(int, Enum):
        optimizer_states = 1
        gradients = 2
        weights = 3

    class EasyDict(dict):
        pass

    for c in (ZeroStageEnum, EasyDict):
        c.__module__ = mod.__name__
        c.__qualname__ = c.__name__
        setattr(mod, c.__name__, c)
    sys.modules[mod.__name__] = mod
    return mod, ZeroStageEnum, EasyDict


def _save_foreign(obj, path):
    torch.save(obj, path)


def test_deepspeed_zero2_directory(tmp_path, ref, base_dir):
    sd, _, _ = ref
    mod, Stage, EasyDict = _foreign_objects()
    try:
        ckpt = tmp_path / "checkpoint-10"
        (ckpt / "global_step10").mkdir(parents=True)
        (ckpt / "latest").write_text("global_step10")
        cfg = EasyDict(model=EasyDict(query_nums=3))
        _save_foreign({"module": {k: v.to(torch.bfloat16) for k, v in sd.items()}, "buffer_names": [],
                       "param_shapes": [OrderedDict((k, v.shape) for k, v in sd.items())], "shared_params": {},
                       "ds_version": "0.14.0", "ds_config": {"zero_optimization": {"stage": 2}}, "config": cfg},
                      ckpt / "global_step10" / "mp_rank_00_model_states.pt")
        _save_foreign({"optimizer_state_dict": {"zero_stage": Stage.gradients, "partition_count": [1],
                                                "single_partition_of_fp32_groups": [torch.zeros(3)]}},
                      ckpt / "global_step10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    finally:
        del sys.modules[mod.__name__]
    for src in (ckpt, ckpt / "global_step10", ckpt / "global_step10" / "mp_rank_00_model_states.pt"):
        state = read_state_dict(src)
        assert set(state) == set(sd)
        assert all(torch.equal(state[k], sd[k].to(torch.bfloat16)) for k in sd)
    model, rep = load_reference_checkpoint(ckpt, base_dir)  # configuration detected from the checkpoint
    assert rep.ok and model.cfg.user_tower.use_actions and model.cfg.user_tower.use_hour
    assert torch.equal(model.queries.weight, sd["query.weight"].to(torch.bfloat16).float())
    with pytest.raises(DataError, match="global_step99"):
        (ckpt / "latest").write_text("global_step99")
        read_state_dict(ckpt)


def _zero3_directory(path, sd, world=2, frozen=("user_llm.model.embed_tokens.weight",)):
    """A ZeRO-3 tag directory laid out as DeepSpeed writes it: per rank a model-states file (placeholders, shapes,
    frozen fragments) and a bf16 optimizer-states file with that rank's fp32 partition of every parameter."""
    mod, Stage, _ = _foreign_objects()
    try:
        path.mkdir(parents=True)
        names = [k for k in sd if k not in frozen and k != "item_llm.lm_head.weight"]
        groups = [names[: len(names) // 2], names[len(names) // 2:]]  # two optimizer param groups

        def part(t, r):
            n = t.numel()
            p = math.ceil(n / world)
            flat = torch.cat([t.reshape(-1).float(), torch.zeros(p * world - n)])
            return flat[r * p: (r + 1) * p]

        for r in range(world):
            _save_foreign({
                "module": {k: torch.empty(0) for k in sd}, "buffer_names": [],
                "param_shapes": [OrderedDict((k, sd[k].shape) for k in g) for g in groups],
                "frozen_param_shapes": OrderedDict((k, sd[k].shape) for k in frozen),
                "frozen_param_fragments": {k: part(sd[k], r) for k in frozen},
                "shared_params": {"item_llm.lm_head.weight": "item_llm.model.embed_tokens.weight"},
                "ds_version": "0.14.0"}, path / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            _save_foreign({"optimizer_state_dict": {
                "zero_stage": Stage.weights, "partition_count": world,
                "fp32_flat_groups": [torch.cat([part(sd[k], r) for k in g]) for g in groups],
                "optimizer_state_dict": {"state": {}}}}, path / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    finally:
        del sys.modules[mod.__name__]


def test_deepspeed_zero3_reassembly(tmp_path, ref):
    sd, _, _ = ref
    _zero3_directory(tmp_path / "ck" / "checkpoint", sd, world=3)
    (tmp_path / "ck" / "latest").write_text("checkpoint")
    state = read_state_dict(tmp_path / "ck")
    assert set(state) == set(sd)
    for k in sd:
        assert torch.equal(state[k], sd[k].float()), k
    # a rank's optimizer file missing: said, with what to run instead
    (tmp_path / "ck" / "checkpoint" / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DataError, match="partition_count is 3"):
        read_state_dict(tmp_path / "ck")
    for p in (tmp_path / "ck" / "checkpoint").glob("*_optim_states.pt"):
        p.unlink()
    with pytest.raises(DataError, match="zero_to_fp32"):
        read_state_dict(tmp_path / "ck")


def test_missing_and_unexpected_keys_are_named(tmp_path, ref, base_dir, caplog):
    sd, _, _ = ref
    bad = {k: v for k, v in sd.items() if k != "user_llm.model.layers.1.mlp.up_proj.weight"}
    torch.save(bad, tmp_path / "missing.bin")
    with pytest.raises(DataError, match=r"user_llm\.model\.layers\.1\.mlp\.up_proj\.weight") as e:
        load_reference_checkpoint(tmp_path / "missing.bin", base_dir)
    assert "missing.bin" in str(e.value) and "1 missing" in str(e.value)
    extra = {**sd, "user_llm.model.layers.7.new_thing.weight": torch.zeros(2), "foo.bar": torch.zeros(1)}
    with pytest.raises(DataError, match=r"foo\.bar") as e:
        load_reference_checkpoint(extra, base_dir)
    assert "user_llm.model.layers.7.new_thing.weight" in str(e.value)
    shaped = {**sd, "query.weight": torch.zeros(4, H)}
    cfg = reference_model_config(base_dir, use_actions=True, use_hour=True)
    with pytest.raises(DataError, match=r"query\.weight"):
        load_reference_checkpoint(shaped, cfg)
    # strict=False: loads, lists them, warns
    with caplog.at_level("WARNING", logger="redrec.reference"):
        _, rep = load_reference_checkpoint({**bad, "foo.bar": torch.zeros(1)}, base_dir, strict=False)
    assert rep.missing == ["user_llm.model.layers.1.mlp.up_proj.weight"] and rep.unexpected == ["foo.bar"]
    assert "foo.bar" in caplog.text
    # optional addends absent: switched off, nothing missing
    plain = {k: v for k, v in sd.items() if k not in ("item_action_embedding", "hour_embeddings.weight")}
    m, rep = load_reference_checkpoint(plain, base_dir)
    assert rep.ok and not m.cfg.user_tower.use_actions and not m.cfg.user_tower.use_hour


def test_actions_matched_by_name_and_store(ref, base_dir, store):
    sd, _, _ = ref
    assert store.actions_names == ["share", "like", "follow"]
    model, rep = load_reference_checkpoint(sd, base_dir, store=store)
    W, A = model.action_emb.weight, sd["item_action_embedding"]
    assert torch.equal(W[:, 0], A[REFERENCE_ACTIONS.index("share")])
    assert torch.equal(W[:, 1], A[REFERENCE_ACTIONS.index("like")])
    assert torch.count_nonzero(W[:, 2]) == 0  # follow: no reference row
    assert any("comment" in n for n in rep.notes)
    # the store's items are tokenised with the reference prompt ('content' missing from the store: an empty label)
    t = model.item_tower.cfg.text
    assert t.template == "Summary:\n\ntitle:{title}\ncontent:\nocr:{ocr}" and set(t.fields) == {"title", "ocr"}
    assert model.item_tower.tokens.shape[0] == store.n_items == model.cfg.item_tower.n_items
    assert model.item_tower.has_text.tolist() == [True, True, True, False, True]
    # an item without text gets the encoding of the empty prompt, as in the reference
    from redrec.model.text import ItemTokenizer, encode_tokens

    ids, lengths = ItemTokenizer(t)(["Summary:\n\ntitle:\ncontent:\nocr:"])
    with torch.no_grad():
        want = encode_tokens(model.item_tower.encoder, torch.from_numpy(ids), torch.from_numpy(lengths), "slot")[0]
        got = model.item_hidden(torch.tensor([3]))[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cli_writes_a_loadable_model_dir(tmp_path, ref, base_dir, store):
    from typer.testing import CliRunner

    from redrec.cli import app
    from redrec.model.redrec import RedRec

    sd, _, _ = ref
    torch.save(sd, tmp_path / "ref.bin")
    out = tmp_path / "converted"
    res = CliRunner().invoke(app, ["convert-reference", str(tmp_path / "ref.bin"), "--base-model", str(base_dir),
                                   "-o", str(out), "--store", str(store.path)])
    assert res.exit_code == 0, res.output
    assert "missing 0, unexpected 0" in res.output and "logit_scale" in res.output
    report = json.loads((out / "reference_conversion.json").read_text())
    assert report["logit_scale"] == pytest.approx(math.log(1 / 0.07) + 0.5) and report["missing"] == []
    direct, _ = load_reference_checkpoint(sd, base_dir, store=store)
    loaded = RedRec.from_pretrained(out).eval()
    L = 4
    batch = {"item": torch.tensor([[0, 3, 2, 4]]), "actions": torch.tensor([[[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]]),
             "hour": torch.tensor([[1, 5, 24, 23]]), "scenario": torch.zeros(1, L, dtype=torch.long),
             "gap": torch.zeros(1, L, dtype=torch.long), "position": torch.arange(L)[None], "mask": torch.ones(1, L, dtype=torch.bool)}
    with torch.no_grad():
        a, b = direct(batch), loaded(batch)
        assert torch.equal(a["interests"], b["interests"]) and torch.equal(a["seq"], b["seq"])
        ids = torch.arange(store.n_items)
        assert torch.equal(direct.item_vectors(ids), loaded.item_vectors(ids))
    # an existing output is not overwritten without --overwrite; a bad checkpoint is a one-line error, exit 2
    res = CliRunner().invoke(app, ["convert-reference", str(tmp_path / "ref.bin"), "--base-model", str(base_dir), "-o", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    torch.save({k: v for k, v in sd.items() if k != "query.weight"}, tmp_path / "bad.bin")
    res = CliRunner().invoke(app, ["convert-reference", str(tmp_path / "bad.bin"), "--base-model", str(base_dir), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "query.weight" in res.output and not (tmp_path / "o2").exists()


def test_config_for_checkpoint_detects_options(ref, base_dir):
    sd, _, _ = ref
    cfg = config_for_checkpoint({k: v for k, v in sd.items() if k != "hour_embeddings.weight"}, base_dir)
    assert cfg.user_tower.use_actions and not cfg.user_tower.use_hour and cfg.n_actions == 5
    assert cfg.item_tower.text.projection == "none" and cfg.item_tower.text.pooling == "slot"
    assert cfg.item_tower.text.max_tokens == 301 and cfg.item_tower.text.mode == "finetune"
    assert cfg.user_tower.pretrained_path == str(base_dir) and cfg.n_queries == 3
