"""redrec.eval.reference: RedSeqRec's eval/eval.py computed on the CPU.

The files are built in the exact format the authors' scripts write (pickled lists of ``{"id", "embed",
"embed_type"}`` dicts; item embeds = lists of floats rounded to 6 decimals, user embeds = flattened ``K*64``
tensors, bfloat16 on a CUDA device in the release) and ``user_lastn.json``.
"""

from __future__ import annotations

import io
import json
import math
import pickle

import numpy as np
import pytest
import torch

from redrec.errors import DataError
from redrec.eval.reference import (
    fp16_normalize,
    load_embedding_pickle,
    load_user_lastn,
    reference_eval,
    reference_topk,
)

D = 64


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def write_pkl(path, records, pickler=pickle.Pickler):
    with open(path, "wb") as f:
        pickler(f, protocol=4).dump(records)
    return path


def items_records(vecs, ids=None):
    ids = ids if ids is not None else [f"n{i}" for i in range(len(vecs))]
    return [{"id": i, "embed": [round(float(x), 6) for x in v], "embed_type": "basepool_embed_64d"}
            for i, v in zip(ids, vecs, strict=True)]


def users_records(vecs, ids, as_tensor=True):
    out = []
    for uid, v in zip(ids, vecs, strict=True):
        e = torch.tensor(np.asarray(v), dtype=torch.bfloat16) if as_tensor else np.asarray(v)
        out.append({"id": uid, "embed": e, "embed_type": "user_embed"})
    return out


def ev(note_id, ts=0):
    return {"note_id": note_id, "timestamp": ts, "is_click": 1}


def lastn_record(targets, history=()):
    return {"homefeed_noteid_lastn": [ev(n) for n in history], "ads_click_noteid_lastn": [],
            "ads_click_noteid_target": [ev(n) for n in targets]}


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


class CudaTaggedPickler(pickle.Pickler):
    """Pickles tensors as if they lived on ``cuda:0``.

    A tensor's storage is pickled as ``torch.storage._load_from_bytes(<torch.save bytes>)`` (legacy format,
    whose header names the storage's device).  Re-tagging ``cpu`` as ``cuda:0`` in those bytes gives exactly the
    stream a GPU-side ``pickle.dump`` writes: on a machine without CUDA, ``pickle.load`` then fails inside
    ``torch.load`` just as it does with the released ``user_embedding_pr.pkl`` -- no monkeypatching involved.
    """

    def reducer_override(self, obj):
        if isinstance(obj, (torch.storage.TypedStorage, torch.UntypedStorage)):
            fn, (b,) = obj.__reduce__()
            cpu = b"X\x03\x00\x00\x00cpu"
            assert b.count(cpu) == 1
            return fn, (b.replace(cpu, b"X\x06\x00\x00\x00cuda:0"),)
        return NotImplemented


def onehot(i, scale=1.0):
    v = np.zeros(D, dtype=np.float32)
    v[i] = scale
    return v


# ---------------------------------------------------------------------------------------------------------------
# an independent, literal re-implementation of eval.py (per-user loop, torch half on the CPU)
# ---------------------------------------------------------------------------------------------------------------


def literal_eval(item_recs, user_recs, lastn, list_size=1000, ks=(10, 100, 1000)):
    """eval.py's steps one by one.  One substitution: the GPU's fp16 GEMM (``user @ notes.T``, fp32
    accumulation) is the exact float64 dot product of the fp16 values rounded to fp16, and ``topk``'s tie order
    is made explicit (lower index first, by a stable sort)."""
    targets_of = {u: [e["note_id"] for e in d["ads_click_noteid_target"]] for u, d in lastn.items()}
    userid2embed = {}
    for rec in user_recs:
        t = torch.tensor(rec["embed"], dtype=torch.float16) if not isinstance(rec["embed"], torch.Tensor) \
            else rec["embed"].to(torch.float16)
        userid2embed[rec["id"]] = t / t.norm(dim=-1, keepdim=True)
    notes = torch.tensor(np.array([r["embed"] for r in item_recs], dtype=np.float64), dtype=torch.float16)
    notes = notes / notes.norm(dim=-1, keepdim=True)
    note_ids = np.array([r["id"] for r in item_recs])
    pool = set(note_ids)
    valid_users, valid_targets = [], []
    for uid in userid2embed:
        tg = [t for t in targets_of.get(uid, []) if t in pool]
        if tg:
            valid_users.append(uid)
            valid_targets.append(tg)
    notes64 = notes.double().numpy()
    per = {m: [] for m in [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]}
    for uid, tg in zip(valid_users, valid_targets, strict=True):
        u = userid2embed[uid].view(-1, 64)
        sims = (u.double().numpy() @ notes64.T).astype(np.float16)  # [K, N]
        best = sims.max(axis=0).astype(np.float32)
        top = np.argsort(-best, kind="stable")[:list_size]
        ranked = note_ids[top].tolist()
        targets = set(tg)
        for k in ks:
            per[f"hr@{k}"].append(1.0 if any(i in targets for i in ranked[:k]) else 0.0)
        for k in ks:
            dcg = sum(1.0 / np.log2(p + 2) for p, i in enumerate(ranked[:k]) if i in targets)
            idcg = sum(1.0 / np.log2(p + 2) for p in range(min(k, len(targets))))
            per[f"ndcg@{k}"].append(dcg / idcg if idcg > 0 else 0.0)
        r = next((p for p, i in enumerate(ranked, 1) if i in targets), None)
        per["mrr"].append(1.0 / r if r else 0.0)
    return valid_users, {m: np.array(v, dtype=np.float64) for m, v in per.items()}


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def test_load_pickles_of_every_embed_kind(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((4, D))
    recs = [
        {"id": "a", "embed": [float(x) for x in v[0]], "embed_type": "x"},
        {"id": "b", "embed": v[1], "embed_type": "x"},  # float64 numpy
        {"id": "c", "embed": torch.tensor(v[2], dtype=torch.float32)},
        {"id": np.str_("d"), "embed": torch.tensor(v[3], dtype=torch.bfloat16)},
    ]
    ids, x = load_embedding_pickle(write_pkl(tmp_path / "e.pkl", recs))
    assert ids == ["a", "b", "c", "d"] and all(type(i) is str for i in ids)
    assert x.dtype == np.float32 and x.shape == (4, D)
    np.testing.assert_array_equal(x[:3], v[:3].astype(np.float32))
    np.testing.assert_array_equal(x[3], torch.tensor(v[3], dtype=torch.bfloat16).float().numpy())
    # [K, 64] matrices keep their shape (eval.py would normalise them per row)
    ids, x = load_embedding_pickle(write_pkl(tmp_path / "m.pkl", [{"id": "u", "embed": np.ones((3, D))}]))
    assert x.shape == (1, 3, D)


def test_cuda_pickled_tensors_load_on_cpu(tmp_path):
    """The released user pickle holds bfloat16 tensors (views of a batch) pickled on a GPU."""
    batch = torch.randn(4, 3 * D).to(torch.bfloat16)
    recs = [{"id": f"u{i}", "embed": batch[i], "embed_type": "user_embed"} for i in range(4)]
    path = write_pkl(tmp_path / "user_embedding_pr.pkl", recs, pickler=CudaTaggedPickler)
    if not torch.cuda.is_available():  # what eval.py's plain pickle.load does on a CPU-only machine
        with pytest.raises(RuntimeError, match="CUDA"):
            with open(path, "rb") as f:
                pickle.load(f)
    ids, x = load_embedding_pickle(path)
    assert ids == ["u0", "u1", "u2", "u3"]
    np.testing.assert_array_equal(x, batch.float().numpy())


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"id": "a", "embed": [1.0] * D}, "expected a list"),
        ([], "empty"),
        (["not a dict"], "element 0 is a str"),
        ([{"id": "a"}], "field 'embed'.*element 0 has no key 'embed'"),
        ([{"embed": [1.0] * D}], "field 'id'.*element 0 has no key 'id'"),
        ([{"id": 1.5, "embed": [1.0] * D}], "id 1.5 is a float"),
        ([{"id": "a", "embed": [1.0] * D}, {"id": "b", "embed": [1.0] * 63}], r"element 1 \(id 'b'\) has shape \(63,\)"),
        ([{"id": "a", "embed": [[1.0, 2.0], [3.0]]}], "element 0 .*not a numeric vector"),
        ([{"id": "a", "embed": ["x"] * D}], "not a numeric vector"),
        ([{"id": "a", "embed": [1.0] * D}, {"id": "b", "embed": [float("nan")] * D}], r"element 1 \(id 'b'\) has NaN"),
    ],
)
def test_embedding_pickle_errors(tmp_path, payload, match):
    path = write_pkl(tmp_path / "bad.pkl", payload)
    with pytest.raises(DataError, match=match) as ei:
        load_embedding_pickle(path)
    assert str(path) in str(ei.value)


def test_embedding_pickle_file_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_embedding_pickle(tmp_path / "missing.pkl")
    good = pickle.dumps([{"id": f"n{i}", "embed": [0.5] * D} for i in range(50)], protocol=4)
    (tmp_path / "trunc.pkl").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="trunc.pkl.*truncated"):
        load_embedding_pickle(tmp_path / "trunc.pkl")
    (tmp_path / "text.pkl").write_text("id,embed\n")
    with pytest.raises(DataError, match="text.pkl"):
        load_embedding_pickle(tmp_path / "text.pkl")


def test_load_user_lastn_and_errors(tmp_path):
    p = write_json(tmp_path / "user_lastn.json", {"u1": lastn_record(["n1", "n1", "x"], history=["n2", "n3"])})
    ln = load_user_lastn(p)
    assert ln.targets == {"u1": ["n1", "n1", "x"]} and len(ln) == 1
    assert ln.history("u1") == ["n2", "n3"] and ln.history("u1", "ads_click_noteid_lastn") == []
    assert ln.history("nobody") == []
    bad = {
        "trunc.json": '{"u1": {"ads_click_noteid_target": [',
        "list.json": "[1, 2]",
        "rec.json": '{"u1": 3}',
        "nokey.json": '{"u1": {"homefeed_noteid_lastn": []}}',
        "notlist.json": '{"u1": {"ads_click_noteid_target": {}}}',
        "noid.json": '{"u1": {"ads_click_noteid_target": [{"timestamp": 1}]}}',
    }
    matches = {
        "trunc.json": "invalid JSON", "list.json": "got a JSON list", "rec.json": "user 'u1'",
        "nokey.json": "field 'ads_click_noteid_target'.*user 'u1' has no", "notlist.json": "expected a list",
        "noid.json": "event 0 has no 'note_id'",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=matches[name]):
            load_user_lastn(tmp_path / name)
    with pytest.raises(DataError, match="file not found"):
        load_user_lastn(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------------------------
# fp16 emulation
# ---------------------------------------------------------------------------------------------------------------


def test_fp16_conversion_goes_through_float32_like_torch():
    """torch builds a Half from a float: float64 -> float32 -> float16 (double rounding), never directly."""
    x = 1 + 2**-11 + 2**-30  # just above an fp16 midpoint; float32 rounds it onto the midpoint
    assert torch.tensor([x], dtype=torch.float16).item() == 1.0
    assert float(np.float16(x)) != 1.0  # numpy's direct rounding would differ
    v = np.full(D, 0.0)
    v[0] = x
    out = fp16_normalize(np.asarray(v, dtype=np.float32)[None])  # the loader's float32, then fp16
    t = torch.tensor(v, dtype=torch.float16)
    np.testing.assert_array_equal(out[0], (t / t.norm()).float().numpy())


def test_fp16_normalize_matches_torch_half():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3000, D)) * rng.uniform(0.05, 4, (3000, 1))).astype(np.float32)
    t = torch.from_numpy(x).half()
    ref = (t / t.norm(dim=-1, keepdim=True)).float().numpy()
    out = fp16_normalize(x)
    diff = (out != ref).any(axis=1)
    # identical except where torch's float32 norm and the exact norm round to neighbouring fp16 values
    assert diff.sum() <= 3
    assert np.abs(out - ref).max() <= 2.0**-11
    # a flattened K*64 vector is normalised as a whole
    u = rng.standard_normal((5, 3 * D)).astype(np.float32)
    th = torch.from_numpy(u).half()
    np.testing.assert_array_equal(fp16_normalize(u), (th / th.norm(dim=-1, keepdim=True)).float().numpy())


def test_scores_are_what_an_fp16_matmul_computes():
    """torch's own CPU half matmul agrees with the emulation up to one fp16 ulp (its summation order)."""
    rng = np.random.default_rng(2)
    items = fp16_normalize(rng.standard_normal((4000, D)).astype(np.float32))
    users = fp16_normalize(rng.standard_normal((6, 3 * D)).astype(np.float32)).reshape(6, 3, D)
    idx, val = reference_topk(users, items, 4000, user_chunk=4, item_chunk=512, threads=1)
    ours = np.empty((6, 4000), np.float32)
    np.put_along_axis(ours, idx, val, axis=1)
    half = (torch.from_numpy(users).half() @ torch.from_numpy(items).half().T).amax(1).float().numpy()
    ulp = np.spacing(np.abs(ours).astype(np.float16)).astype(np.float32)
    assert (np.abs(half - ours) <= ulp).all()
    assert (half != ours).mean() < 0.005


def test_topk_is_exact_whatever_the_chunking():
    rng = np.random.default_rng(3)
    items = fp16_normalize(rng.standard_normal((2500, D)).astype(np.float32))
    items[2000:2100] = items[:100]  # exact ties across chunks
    users = fp16_normalize(rng.standard_normal((23, 3 * D)).astype(np.float32)).reshape(23, 3, D)
    exact = (users.reshape(-1, D).astype(np.float64) @ items.T.astype(np.float64)).reshape(23, 3, -1).max(1)
    s16 = exact.astype(np.float16).astype(np.float32)  # numpy: float64 -> float16 directly (correctly rounded)
    order = np.argsort(-s16, axis=1, kind="stable")[:, :700]
    for uc, ic, th in [(23, 2500, 1), (5, 97, 2), (1, 700, 2), (8, 1, 1)]:
        idx, val = reference_topk(users, items, 700, user_chunk=uc, item_chunk=ic, threads=th)
        np.testing.assert_array_equal(idx, order)
        np.testing.assert_array_equal(val, np.take_along_axis(s16, order, axis=1))


# ---------------------------------------------------------------------------------------------------------------
# the whole evaluation
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hand_case(tmp_path):
    """8 one-hot items; users of K=2 blocks whose scores (max over blocks) and ranks are known by hand."""
    items = [onehot(i) for i in range(8)]
    item_pkl = write_pkl(tmp_path / "base_item_embedding_pr.pkl", items_records(items))

    def user(block0, block1):
        v = np.zeros(2 * D, dtype=np.float32)
        for i, s in block0.items():
            v[i] = s
        for i, s in block1.items():
            v[D + i] = s
        return v

    users = {
        # scores n0 .9, n1 .8, n3 .7, n2 .5, then n4..n7 tied at 0 -> ranks n0 n1 n3 n2 n4 n5 n6 n7
        "A": user({0: 0.75, 2: 0.5}, {1: 0.625, 3: 0.5625}),
        # n6 .6, n0 .5, n4 .3, then n1 n2 n3 n5 n7 at 0
        "B": user({4: 0.25, 6: 0.5}, {0: 0.375}),
        # n0 .4, n1 .2, then n2..n7 at 0: n5 is 6th because ties go to the lower index
        "C": user({0: 0.5}, {1: 0.25}),
        "D": user({0: 1.0}, {}),  # no user_lastn entry
        "E": user({0: 1.0}, {}),  # targets outside the pool
        "F": user({0: 1.0}, {}),  # empty target list
    }
    user_pkl = write_pkl(tmp_path / "user_embedding_pr.pkl", users_records(users.values(), list(users)))
    lastn = {
        "A": lastn_record(["n1", "ghost", "n1"], history=["n0"]),
        "B": lastn_record(["n4", "n6"]),
        "C": lastn_record(["n5"]),
        "E": lastn_record(["ghost"]),
        "F": lastn_record([]),
        "G": lastn_record(["n0"]),  # no embedding: never looked at
    }
    lastn_json = write_json(tmp_path / "user_lastn.json", lastn)
    return item_pkl, user_pkl, lastn_json


def test_hand_computed_metrics(hand_case):
    res = reference_eval(*hand_case, ks=(1, 3, 8), list_size=8, progress=False, keep_top_items=True)
    assert res.users == ["A", "B", "C"] and res.n_users == 3 and res.n_items == 8
    np.testing.assert_array_equal(res.top_items, [[0, 1, 3, 2, 4, 5, 6, 7], [6, 0, 4, 1, 2, 3, 5, 7],
                                                  [0, 1, 2, 3, 4, 5, 6, 7]])
    l2 = math.log2
    expect = {  # per user A, B, C
        "hr@1": [0, 1, 0], "hr@3": [1, 1, 0], "hr@8": [1, 1, 1],
        "ndcg@1": [0, 1, 0],
        "ndcg@3": [1 / l2(3), (1 + 1 / l2(4)) / (1 + 1 / l2(3)), 0],
        "ndcg@8": [1 / l2(3), (1 + 1 / l2(4)) / (1 + 1 / l2(3)), 1 / l2(7)],
        "mrr": [1 / 2, 1, 1 / 6],
    }
    for m, vals in expect.items():
        np.testing.assert_allclose(res.per_user[m], vals, rtol=0, atol=1e-15, err_msg=m)
        assert res.metrics[m] == pytest.approx(np.mean(vals), abs=1e-15)
    np.testing.assert_array_equal(res.n_targets, [1, 2, 1])
    assert res.skipped == {"not in user_lastn.json": 1, "no target event": 1, "no target in the item pool": 1}
    assert res.n_skipped == 3
    assert res.info["lastn_users_without_embedding"] == 1
    assert res.info["target_events_outside_pool"] == 2  # A's ghost and E's ghost


def test_to_eval_result_prints(hand_case):
    from redrec.eval.report import format_table

    res = reference_eval(*hand_case, ks=(1, 3, 8), list_size=8, progress=False)
    er = res.to_eval_result()
    assert er.protocol == "reference" and er.pool == "full" and er.pool_size == 8 and not er.exclude_history
    assert er.model == "embeddings (user_embedding_pr.pkl)" and er.n_users == 3 and er.ks == [1, 3, 8]
    assert er.metrics == res.metrics and er.mean_targets == pytest.approx(4 / 3)
    table = format_table([er], style="plain")
    assert "reference" in table and "full pool: 8 items" in table
    assert json.loads(er.to_json(per_user=True))["users"] == ["A", "B", "C"]


def test_duplicate_ids_follow_eval_py(tmp_path):
    """A repeated user keeps its first position and its last embedding; a repeated note id is two rows, and both
    count as hits (eval.py tests ``item in targets`` position by position)."""
    items = [onehot(i) for i in range(4)] + [onehot(1)]
    item_pkl = write_pkl(tmp_path / "i.pkl", items_records(items, ids=["n0", "n1", "n2", "n3", "n1"]))
    ua = np.concatenate([onehot(0), onehot(3, 0.5)])
    ub = np.concatenate([onehot(1), onehot(2, 0.5)])
    user_pkl = write_pkl(tmp_path / "u.pkl", users_records([ua, ub, ub], ["X", "Y", "X"], as_tensor=False))
    lastn_json = write_json(tmp_path / "l.json", {"X": lastn_record(["n1"]), "Y": lastn_record(["n0"])})
    res = reference_eval(item_pkl, user_pkl, lastn_json, ks=(1, 2, 5), list_size=5, progress=False,
                         keep_top_items=True)
    assert res.users == ["X", "Y"] and res.info["duplicate_user_ids"] == 1 and res.info["duplicate_item_ids"] == 1
    np.testing.assert_array_equal(res.top_items[0], [1, 4, 2, 0, 3])  # X uses its last embedding (= Y's)
    assert res.per_user["ndcg@2"][0] == pytest.approx((1 + 1 / math.log2(3)) / 1.0)  # > 1, as in eval.py


def test_agrees_with_literal_eval_py_on_random_data(tmp_path):
    rng = np.random.default_rng(5)
    n_items, n_users, K = 2600, 40, 3
    iv = rng.standard_normal((n_items, D))
    iv[1500:1540] = iv[100:140]  # exact score ties
    ids = [f"note{i}" for i in range(n_items)]
    ids[7] = ids[8]  # a duplicated note id
    item_recs = items_records(iv, ids)
    blocks = rng.standard_normal((n_users + 5, K, D))
    blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True)  # unit 64-d blocks, flattened as released
    uids = [f"user{j}" for j in range(n_users + 5)]
    user_recs = users_records(blocks.reshape(len(uids), K * D), uids)
    user_recs.append(dict(user_recs[3]))  # a repeated user
    lastn = {}
    for j, u in enumerate(uids[:n_users] + ["nobody"]):
        tg = [ids[i] for i in rng.integers(0, n_items, rng.integers(1, 5))]
        if j % 7 == 0:
            tg.append("not-in-pool")
        if j % 11 == 0:
            tg = ["not-in-pool"]
        lastn[u] = lastn_record(tg, history=[ids[0]])
    item_pkl = write_pkl(tmp_path / "base_item_embedding_pr.pkl", item_recs)
    user_pkl = write_pkl(tmp_path / "user_embedding_pr.pkl", user_recs, pickler=CudaTaggedPickler)
    lastn_json = write_json(tmp_path / "user_lastn.json", lastn)

    users, per = literal_eval(item_recs, user_recs, lastn)
    res = reference_eval(item_pkl, user_pkl, lastn_json, user_chunk=6, item_chunk=300, threads=2, progress=False)
    assert res.users == users and res.n_users == len(users) == 36
    assert res.skipped == {"not in user_lastn.json": 5, "no target in the item pool": 4}
    for m, v in per.items():
        np.testing.assert_array_equal(res.per_user[m], v, err_msg=m)
        assert res.metrics[m] == float(v.mean())
    assert set(res.metrics) == {"hr@10", "hr@100", "hr@1000", "ndcg@10", "ndcg@100", "ndcg@1000", "mrr"}
    assert res.metrics["hr@1000"] > 0.2  # the comparison is not vacuous


def test_evaluation_errors(tmp_path, hand_case):
    item_pkl, user_pkl, lastn_json = hand_case
    with pytest.raises(DataError, match="fewer than the list size 1000"):
        reference_eval(item_pkl, user_pkl, lastn_json, progress=False)
    bad_items = write_pkl(tmp_path / "i32.pkl", [{"id": "n0", "embed": [1.0] * 32}])
    with pytest.raises(DataError, match="i32.pkl.*64-d"):
        reference_eval(bad_items, user_pkl, lastn_json, list_size=1, progress=False)
    bad_users = write_pkl(tmp_path / "u100.pkl", [{"id": "A", "embed": [1.0] * 100}])
    with pytest.raises(DataError, match="u100.pkl.*not a multiple of 64"):
        reference_eval(item_pkl, bad_users, lastn_json, list_size=8, progress=False)
    zero_user = write_pkl(tmp_path / "u0.pkl", [{"id": "A", "embed": [0.0] * 128}])
    with pytest.raises(DataError, match="u0.pkl.*user 'A' has norm 0"):
        reference_eval(item_pkl, zero_user, lastn_json, list_size=8, progress=False)
    zero_item = write_pkl(tmp_path / "i0.pkl", items_records([onehot(0), np.zeros(D)]))
    with pytest.raises(DataError, match=r"i0.pkl.*id 'n1'\) has norm 0"):
        reference_eval(zero_item, user_pkl, lastn_json, list_size=2, progress=False)
    other_ids = write_pkl(tmp_path / "uo.pkl", [{"id": 17, "embed": [1.0] * 128}])
    with pytest.raises(DataError, match="no user of uo.pkl has a target note"):
        reference_eval(item_pkl, other_ids, lastn_json, list_size=8, progress=False)


def test_cpu_unpickler_leaves_torch_settings_alone(hand_case):
    threads, prec = torch.get_num_threads(), torch.get_float32_matmul_precision()
    reference_eval(*hand_case, ks=(1,), list_size=8, progress=False, threads=2)
    assert torch.get_num_threads() == threads and torch.get_float32_matmul_precision() == prec
    buf = io.BytesIO()
    pickle.dump({"x": np.arange(3)}, buf)  # ordinary objects unpickle as usual
    from redrec.eval.reference import _CpuUnpickler

    buf.seek(0)
    np.testing.assert_array_equal(_CpuUnpickler(buf).load()["x"], np.arange(3))


def test_cli_reference_protocol_from_released_files(tmp_path):
    """``redrec eval --ref-items --ref-users --lastn`` (no store) prints the reference table and writes the JSON."""
    from typer.testing import CliRunner

    from redrec.cli import app

    g = np.random.default_rng(5)
    items = g.standard_normal((1200, D)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    uids = [f"u{i}" for i in range(25)]
    users = g.standard_normal((25, 3 * D)).astype(np.float32)
    item_pkl = write_pkl(tmp_path / "base_item_embedding_pr.pkl", items_records(items))
    user_pkl = write_pkl(tmp_path / "user_embedding_pr.pkl", users_records(users, uids), CudaTaggedPickler)
    lastn = {u: lastn_record([f"n{j}" for j in g.integers(0, 1200, 3)]) for u in uids}
    lastn_json = write_json(tmp_path / "user_lastn.json", lastn)
    out = tmp_path / "res.json"
    r = CliRunner().invoke(app, ["eval", "--ref-items", str(item_pkl), "--ref-users", str(user_pkl),
                                 "--lastn", str(lastn_json), "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "protocol: reference" in r.output and "full pool: 1,200 items" in r.output and "K = 10, 100, 1000" in r.output
    expect = reference_eval(item_pkl, user_pkl, lastn_json, progress=False)
    got = json.loads(out.read_text())["results"][0]
    assert got["n_users"] == 25 and got["protocol"] == "reference"
    for m, v in expect.metrics.items():
        assert got["metrics"][m] == pytest.approx(v, abs=1e-12), m
    # a missing companion file is a clear config error
    r = CliRunner().invoke(app, ["eval", "--ref-items", str(item_pkl), "--lastn", str(lastn_json), "--no-progress"])
    assert r.exit_code == 2 and "reference.users" in r.output
