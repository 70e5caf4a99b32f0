"""FAISS-backed indexes (redrec.retrieval.index): exactness of flat, recall of the ANN kinds, persistence, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from conftest import no_temp_leftovers  # noqa: E402

from redrec.config import from_dict  # noqa: E402
from redrec.errors import ConfigError, DataError  # noqa: E402
from redrec.retrieval import exact  # noqa: E402
from redrec.retrieval.index import (  # noqa: E402
    KINDS,
    Index,
    IndexConfig,
    build_index,
    default_nlist,
    load_index,
    recall_at_k,
)
from redrec.retrieval.ivf_joint import bf16_available  # noqa: E402

D = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, centers: np.ndarray, noise: float = 1.0) -> np.ndarray:
    """Unit vectors around random cluster centres (like learned item embeddings)."""
    c = rng.integers(0, len(centers), size=n)
    return unit(centers[c] + noise * rng.standard_normal((n, centers.shape[1])) / np.sqrt(centers.shape[1]))


def numpy_topk(users: np.ndarray, items: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 reference: score = max_k cos, excluded -> -inf, order (score desc, id asc), -1 padding."""
    u = users.astype(np.float64)
    if u.ndim == 2:
        u = u[:, None, :]
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    v = items.astype(np.float64)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    s = np.einsum("bkd,nd->bkn", u, v).max(axis=1)
    if exclude is not None:
        for b, row in enumerate(exclude):
            row = np.asarray(row, dtype=np.int64)
            s[b, row[row >= 0]] = -np.inf
    ids = np.full((len(s), k), -1, dtype=np.int64)
    sc = np.full((len(s), k), -np.inf)
    n_items = len(items)
    for b in range(len(s)):
        o = np.lexsort((np.arange(n_items), -s[b]))[:k]
        o = o[np.isfinite(s[b, o])]
        ids[b, : len(o)] = o
        sc[b, : len(o)] = s[b, o]
    return ids, sc


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    centers = unit(rng.standard_normal((200, D)))
    items = clustered(rng, 12_000, centers)
    queries = clustered(rng, 200, centers)
    users = clustered(rng, 100 * 3, centers).reshape(100, 3, D)
    flat = build_index(IndexConfig(kind="flat"), D).fit(items)
    exact_ids, _ = flat.search(queries, 10)
    exact_multi, _ = flat.search(users, 10)
    return {"items": items, "queries": queries, "users": users, "exact": exact_ids, "exact_multi": exact_multi}


# one thread: deterministic builds (HNSW), and tiny FAISS jobs run fastest without OpenMP start-up on 2 cores
ANN_CONFIGS = {
    "ivf_flat": IndexConfig(kind="ivf_flat", nlist=64, nprobe=16, threads=1),  # nprobe = nlist / 4
    "hnsw": IndexConfig(kind="hnsw", hnsw_m=16, ef_construction=40, ef_search=64, threads=1),
    "ivf_pq": IndexConfig(kind="ivf_pq", nlist=64, nprobe=16, threads=1),  # pq_m = D / 2
    "ivf_fp16": IndexConfig(kind="ivf_fp16", nlist=64, nprobe=16, threads=1),
    "ivf_sq8": IndexConfig(kind="ivf_sq8", nlist=64, nprobe=16, threads=1),
}


@pytest.fixture(scope="module")
def ann(data):
    return {kind: build_index(cfg, D).fit(data["items"]) for kind, cfg in ANN_CONFIGS.items()}


# ---------------------------------------------------------------------------------------------------------------
# flat = exact
# ---------------------------------------------------------------------------------------------------------------


def test_flat_equals_float64_topk_single_and_multi_vector_with_exclusion():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((3000, 16)).astype(np.float32) * rng.uniform(0.5, 3, (3000, 1)).astype(np.float32)
    index = build_index(IndexConfig(kind="flat"), 16)
    index.add(items)
    assert index.ntotal == 3000 and index.dim == 16 and index.is_trained

    q1 = rng.standard_normal((40, 16))
    ids, sc = index.search(q1, 25)
    ref_i, ref_s = numpy_topk(q1, items, 25)
    assert ids.dtype == np.int64 and sc.dtype == np.float32 and ids.shape == sc.shape == (40, 25)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(sc, ref_s, atol=1e-5)

    users = rng.standard_normal((30, 4, 16))
    # ragged exclusion lists, including the exact top items of some users (so the merge must look deeper)
    full_i, _ = numpy_topk(users, items, 60)
    exclude = [full_i[b, : (b % 5) * 10] if b % 2 else rng.integers(0, 3000, size=b) for b in range(30)]
    ids, sc = index.search(users, 25, exclude=exclude)
    ref_i, ref_s = numpy_topk(users, items, 25, exclude)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(sc, ref_s, atol=1e-5)
    for b in range(30):
        assert not np.isin(ids[b], exclude[b]).any()

    # same answer as the torch exact engine (same conventions), and a [B, E] padded exclusion matrix works
    pad = np.full((30, 40), -1, dtype=np.int64)
    for b, e in enumerate(exclude):
        pad[b, : len(e)] = e
    ids2, sc2 = index.search(users, 25, exclude=pad)
    ex_i, ex_s = exact.topk(users, items, 25, exclude=exclude)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(ids2, ex_i)
    np.testing.assert_allclose(sc2, ex_s, atol=1e-5)


def test_flat_ties_lower_id_first_and_padding():
    rng = np.random.default_rng(1)
    items = unit(rng.standard_normal((50, 8)))
    items[[10, 30]] = items[20]  # three identical items
    items[40] = 2.5 * items[20]  # same direction: same cosine
    index = build_index(IndexConfig(kind="flat"), 8).fit(items)
    users = np.stack([np.stack([items[20], -items[20]]), np.stack([rng.standard_normal(8), items[20]])])
    ids, sc = index.search(users, 4)
    np.testing.assert_array_equal(ids[:, :4], [[10, 20, 30, 40]] * 2)
    np.testing.assert_allclose(sc[:, :4], 1.0, atol=1e-6)

    # k > eligible items: -1 / -inf padding; exclusions count
    ids, sc = index.search(items[:2], 60, exclude=[[0, 1, 2], []])
    assert (ids[0] >= 0).sum() == 47 and (ids[1] >= 0).sum() == 50
    assert (ids[0, 47:] == -1).all() and np.isneginf(sc[0, 47:]).all() and np.isfinite(sc[0, :47]).all()
    assert ids[1, 0] == 1 and len(set(ids[1, :50])) == 50


def test_zero_vectors_and_bad_values():
    index = build_index(IndexConfig(kind="flat"), 4)
    index.add(np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32))
    ids, sc = index.search(np.zeros((1, 4)), 3)  # a zero query scores 0 against everything: ids in order
    np.testing.assert_array_equal(ids, [[0, 1, 2]])
    np.testing.assert_array_equal(sc, [[0, 0, 0]])
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 4), np.nan), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones((1, 4)), 0)
    empty = build_index(IndexConfig(kind="hnsw"), 4)
    ids, sc = empty.search(np.ones((2, 4)), 3)
    assert (ids == -1).all() and np.isneginf(sc).all()


def test_chunked_add_from_memmap_and_incremental_ids(tmp_path, data):
    items = data["items"][:3000]
    np.save(tmp_path / "items.npy", items)
    mm = np.load(tmp_path / "items.npy", mmap_mode="r")
    a = build_index(IndexConfig(kind="ivf_flat", nlist=16, add_chunk=777, seed=3), D).fit(mm)
    b = build_index(IndexConfig(kind="ivf_flat", nlist=16, seed=3), D).fit(items)
    q = data["queries"][:20]
    np.testing.assert_array_equal(a.search(q, 10)[0], b.search(q, 10)[0])

    c = build_index(IndexConfig(kind="flat", add_chunk=100), D)
    c.add(items[:1234])
    c.add(items[1234:])
    assert c.ntotal == 3000
    ids, _ = c.search(items[[5, 2000]], 1)
    np.testing.assert_array_equal(ids[:, 0], [5, 2000])


def test_threads_setting_is_restored(data):
    before = faiss.omp_get_max_threads()
    index = build_index(IndexConfig(kind="flat", threads=1), D).fit(data["items"][:500])
    index.search(data["queries"][:3], 5)
    assert faiss.omp_get_max_threads() == before
    index.set_search_params(threads=2)
    assert index.config.threads == 2
    index.set_search_params(threads=0)  # back to FAISS's default
    assert index.config.threads is None


# ---------------------------------------------------------------------------------------------------------------
# recall of the approximate kinds
# ---------------------------------------------------------------------------------------------------------------


# measured on this data: ivf_flat ~0.95, hnsw ~0.99, ivf_pq ~0.85 (seeds 7-9; K=3 users alike)
@pytest.mark.parametrize("kind,threshold", [("ivf_flat", 0.9), ("ivf_fp16", 0.9), ("ivf_sq8", 0.9), ("hnsw", 0.9),
                                            ("ivf_pq", 0.6)])
def test_ann_recall_at_10(ann, data, kind, threshold):
    index = ann[kind]
    assert index.ntotal == len(data["items"])
    ids, sc = index.search(data["queries"], 10)
    r = recall_at_k(ids, data["exact"], 10)
    assert r >= threshold, f"{kind}: recall@10 {r:.3f} < {threshold}"
    assert (np.diff(sc, axis=1) <= 0).all()  # best first
    # multi-vector users (max over 3 vectors) through the same index
    ids_m, _ = index.search(data["users"], 10)
    r_m = recall_at_k(ids_m, data["exact_multi"], 10)
    assert r_m >= threshold, f"{kind} (K=3): recall@10 {r_m:.3f} < {threshold}"
    for row in ids_m:
        v = row[row >= 0]
        assert len(set(v.tolist())) == len(v)  # merged lists are deduplicated


def test_ann_exclusion_and_more_probes(ann, data):
    index = ann["ivf_flat"]
    ids, _ = index.search(data["queries"][:20], 10)
    ids_x, _ = index.search(data["queries"][:20], 10, exclude=ids[:, :5])
    for a, b in zip(ids, ids_x, strict=True):
        assert not np.isin(b, a[:5]).any()
        np.testing.assert_array_equal(b[:5], a[5:])  # the next ones move up
    # nprobe = nlist is an exhaustive scan: exactly the flat result
    index.set_search_params(nprobe=64)
    try:
        ids_all, _ = index.search(data["queries"], 10)
        np.testing.assert_array_equal(ids_all, data["exact"])
    finally:
        index.set_search_params(nprobe=16)
    hnsw = ann["hnsw"]
    low = recall_at_k(hnsw.search(data["queries"], 10)[0], data["exact"], 10)
    hnsw.set_search_params(ef_search=256)
    try:
        assert recall_at_k(hnsw.search(data["queries"], 10)[0], data["exact"], 10) >= low
    finally:
        hnsw.set_search_params(ef_search=64)


def test_recall_at_k():
    approx = np.array([[1, 2, 3], [4, 5, -1], [7, 8, 9]])
    exact_ = np.array([[3, 2, 1], [4, 6, 7], [-1, -1, -1]])
    assert recall_at_k(approx, exact_, 3) == pytest.approx((1 + 1 / 3) / 2)
    assert recall_at_k(approx, exact_, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        recall_at_k(approx, exact_, 4)


# ---------------------------------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, ann, data, kind):
    index = ann[kind] if kind in ann else build_index(IndexConfig(kind="flat"), D).fit(data["items"])
    users, exclude = data["users"][:30], [np.arange(b) for b in range(30)]
    before = index.search(users, 10, exclude=exclude)
    path = index.save(tmp_path / "idx")
    assert sorted(p.name for p in path.iterdir()) == ["index.faiss", "index.json"]
    meta = json.loads((path / "index.json").read_text())
    assert meta["kind"] == kind and meta["dim"] == D and meta["ntotal"] == index.ntotal and meta["version"] == 1

    loaded = load_index(path, verify=True)
    assert isinstance(loaded, Index)
    assert (loaded.kind, loaded.dim, loaded.ntotal, loaded.config) == (kind, D, index.ntotal, index.config)
    after = loaded.search(users, 10, exclude=exclude)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])

    # overwrite in place (atomic replace), no temporary directories left behind
    index.save(path)
    assert no_temp_leftovers(tmp_path) == []
    np.testing.assert_array_equal(Index.load(path).search(users, 10)[0], index.search(users, 10)[0])


def test_search_params_are_saved(tmp_path, ann):
    index = ann["hnsw"]
    index.set_search_params(ef_search=100)
    try:
        loaded = load_index(index.save(tmp_path / "h"))
    finally:
        index.set_search_params(ef_search=64)
    assert loaded.config.ef_search == 100


def test_ivf_pq_resolves_defaults_and_memory(data):
    index = build_index(IndexConfig(kind="ivf_pq", nprobe=8, pq_nbits=6, threads=1), D).fit(data["items"][:6000])
    c = index.config
    assert c.pq_m == D // 2 and c.nlist == min(default_nlist(6000), 6000 // 39)
    assert index.memory_bytes() < index.ntotal * (c.pq_m * 6 / 8 + 8) + 100_000


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, data) -> Path:
    return build_index(IndexConfig(kind="flat"), D).fit(data["items"][:200]).save(tmp_path / "idx")


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "index.json").read_text())
    meta.update(changes)
    (path / "index.json").write_text(json.dumps(meta))


def test_load_missing(tmp_path, saved):
    with pytest.raises(DataError, match="does not exist"):
        load_index(tmp_path / "nope")
    with pytest.raises(DataError, match="is a file"):
        load_index(saved / "index.faiss")
    (saved / "index.faiss").unlink()
    with pytest.raises(DataError, match="FAISS index file is missing"):
        load_index(saved)
    (saved / "index.json").unlink()
    with pytest.raises(DataError, match="index.json.*missing"):
        load_index(saved)


def test_load_bad_meta(saved):
    _edit_meta(saved, format="something-else")
    with pytest.raises(DataError, match="'format'.*not a redrec index"):
        load_index(saved)
    _edit_meta(saved, format="redrec.faiss_index", version=99)
    with pytest.raises(DataError, match="'version'.*newer"):
        load_index(saved)
    _edit_meta(saved, version=1, dim=33)
    with pytest.raises(DataError, match="d=32.*d=33"):
        load_index(saved)
    _edit_meta(saved, dim=32, config={"kind": "ivf_pq", "pq_m": 5})
    with pytest.raises(ConfigError, match="'pq_m'.*must divide"):
        load_index(saved)
    _edit_meta(saved, config={"kind": "flat", "bogus": 1})
    with pytest.raises(ConfigError, match="bogus"):
        load_index(saved)
    (saved / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_index(saved)


def test_load_corrupt_index_file(saved):
    f = saved / "index.faiss"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_index(saved)
    f.write_bytes(b"\x00garbage" * (len(raw) // 8) + b"\x00" * (len(raw) % 8))
    with pytest.raises(DataError, match="corrupt or unreadable"):
        load_index(saved)
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # a vector byte: FAISS still reads it, only the checksum notices
    f.write_bytes(bytes(flipped))
    load_index(saved)
    with pytest.raises(DataError, match="SHA-256"):
        load_index(saved, verify=True)


def test_save_refuses_to_clobber_other_data(tmp_path, data):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    index = build_index(IndexConfig(kind="flat"), D).fit(data["items"][:10])
    with pytest.raises(DataError, match="refusing to overwrite"):
        index.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    with pytest.raises(RuntimeError, match="not trained"):
        build_index(IndexConfig(kind="ivf_flat"), D).save(tmp_path / "x")


def test_dimension_and_state_errors(data):
    index = build_index(IndexConfig(kind="flat"), D)
    with pytest.raises(ValueError, match="d=16 but the index has dim=32"):
        index.add(np.ones((3, 16), dtype=np.float32))
    index.add(data["items"][:10])
    with pytest.raises(ValueError, match="d=16 but the index has dim=32"):
        index.search(np.ones((2, 16)), 5)
    with pytest.raises(ValueError, match=r"\[B, d\] or \[B, K, d\]"):
        index.search(np.ones(32), 5)
    with pytest.raises(ValueError, match="exclusion rows"):
        index.search(np.ones((2, 32)), 5, exclude=[[1]])
    ivf = build_index(IndexConfig(kind="ivf_flat", nlist=4), D)
    with pytest.raises(RuntimeError, match="not trained"):
        ivf.add(data["items"][:10])
    with pytest.raises(RuntimeError, match="not trained"):
        ivf.search(data["queries"][:2], 5)
    ivf.fit(data["items"][:400])
    with pytest.raises(RuntimeError, match="retrain"):
        ivf.train(data["items"][:400])


@pytest.mark.parametrize(
    "kwargs,dim,field",
    [
        ({"kind": "annoy"}, 32, "kind"),
        ({"kind": "ivf_flat", "nlist": 0}, 32, "nlist"),
        ({"kind": "ivf_flat", "nprobe": 0}, 32, "nprobe"),
        ({"kind": "hnsw", "hnsw_m": 1}, 32, "hnsw_m"),
        ({"kind": "hnsw", "ef_search": 0}, 32, "ef_search"),
        ({"kind": "ivf_pq", "pq_m": 5}, 32, "pq_m"),
        ({"kind": "ivf_pq", "pq_nbits": 20}, 32, "pq_nbits"),
        ({"kind": "ivf_flat", "train_size": 0}, 32, "train_size"),
        ({"kind": "flat", "threads": 0}, 32, "threads"),
        ({"kind": "flat", "add_chunk": 0}, 32, "add_chunk"),
        ({"kind": "ivf_flat", "quantizer": "tree"}, 32, "quantizer"),
        ({"kind": "flat"}, 0, "dim"),
        ({"kind": "ivf_fp16", "probe": "joint"}, 32, "probe"),
        ({"kind": "ivf_flat", "probe": "both"}, 32, "probe"),
        ({"kind": "ivf_flat", "probe": "joint", "user_nprobe": 0}, 32, "user_nprobe"),
        ({"kind": "ivf_flat", "probe": "joint", "joint_precision": "float16"}, 32, "joint_precision"),
        ({"kind": "ivf_flat", "joint_precision": "bfloat16"}, 32, "joint_precision"),  # per_vector probe
    ],
)
def test_bad_configs_name_the_field(kwargs, dim, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        build_index(IndexConfig(**kwargs), dim)


def test_config_from_dict_and_training_size_checks(data):
    cfg = from_dict(IndexConfig, {"kind": "ivf_pq", "nlist": 8, "pq_m": 8, "pq_nbits": 6})
    assert cfg.kind == "ivf_pq"
    with pytest.raises(ConfigError, match="'kind'"):
        from_dict(IndexConfig, {"kind": "lsh"})
    with pytest.raises(ConfigError, match="'nlist'.*exceeds the 100 training vectors"):
        build_index(IndexConfig(kind="ivf_flat", nlist=200), D).train(data["items"][:100])
    with pytest.raises(ConfigError, match="'nlist'.*exceeds the 50 training vectors"):
        build_index(IndexConfig(kind="ivf_flat", nlist=64, train_size=50), D).train(data["items"][:1000])
    with pytest.raises(ConfigError, match="'pq_nbits'"):
        build_index(IndexConfig(kind="ivf_pq", nlist=4, pq_m=8), D).train(data["items"][:200])
    with pytest.raises(ConfigError, match="'nprobe'.*only IVF indexes"):
        build_index(IndexConfig(kind="hnsw"), D).set_search_params(nprobe=4)
    with pytest.raises(ConfigError, match="'ef_search'.*only hnsw"):
        build_index(IndexConfig(kind="flat"), D).set_search_params(ef_search=4)
    with pytest.raises(ConfigError, match="'nprobe'"):
        build_index(IndexConfig(kind="ivf_flat"), D).set_search_params(nprobe=0)


def test_ivf_with_hnsw_quantizer_round_trip(tmp_path, data):
    index = build_index(IndexConfig(kind="ivf_flat", nlist=32, nprobe=32, quantizer="hnsw", threads=1), D)
    index.fit(data["items"][:4000])
    flat = build_index(IndexConfig(kind="flat"), D).fit(data["items"][:4000])
    q = data["queries"][:50]
    assert recall_at_k(index.search(q, 10)[0], flat.search(q, 10)[0], 10) >= 0.99  # nprobe = nlist: exhaustive
    loaded = load_index(index.save(tmp_path / "h"))
    np.testing.assert_array_equal(loaded.search(q, 10)[0], index.search(q, 10)[0])


# ---------------------------------------------------------------------------------------------------------------
# joint multi-vector probing (redrec.retrieval.ivf_joint)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def joint_data():
    rng = np.random.default_rng(11)
    centers = unit(rng.standard_normal((60, D)))
    items = clustered(rng, 6000, centers)
    users = clustered(rng, 40 * 5, centers).reshape(40, 5, D)  # 5 interest vectors per user
    index = build_index(IndexConfig(kind="ivf_flat", nlist=48, nprobe=4, threads=1), D).fit(items)
    seen = [rng.choice(len(items), size=int(rng.integers(0, 60)), replace=False) for _ in range(len(users))]
    return {"items": items, "users": users, "index": index, "seen": seen}


def _lists_brute_force(jivf, users, k, seen, user_nprobe):
    """float64 top-k of each user over exactly the items of its probed lists (same probe as the kernel)."""
    lists = jivf.probe(unit(users), user_nprobe)
    ids = np.full((len(users), k), -1, np.int64)
    for b in range(len(users)):
        rows = np.concatenate([np.arange(jivf.offsets[x], jivf.offsets[x + 1]) for x in lists[b]])
        cand = jivf.ids[rows]
        s = (unit(users[b]).astype(np.float64) @ jivf.codes[rows].astype(np.float64).T).max(axis=0)
        keep = ~np.isin(cand, seen[b])
        cand, s = cand[keep], s[keep]
        o = np.lexsort((cand, -s))[:k]
        ids[b, : len(o)] = cand[o]
    return ids


def test_joint_probe_is_exact_over_the_probed_lists(joint_data):
    d = joint_data
    index = build_index(IndexConfig(kind="ivf_flat", nlist=48, nprobe=4, threads=1, probe="joint", user_nprobe=6),
                        D).fit(d["items"])
    ids, scores = index.search(d["users"], 20, exclude=d["seen"])
    ref = _lists_brute_force(index._joint_index(), d["users"], 20, d["seen"], 6)
    # float32 kernel vs float64 reference: the same items; the order may differ only between near-equal scores
    assert all(set(a) == set(b) for a, b in zip(ids.tolist(), ref.tolist(), strict=True))
    assert (np.diff(scores, axis=1) <= 0).all()
    want = np.max(unit(d["users"]) @ d["items"][np.maximum(ids, 0)].transpose(0, 2, 1), axis=1)  # [B, k]
    np.testing.assert_allclose(scores, want, atol=2e-6)
    assert not any(set(r) & set(e.tolist()) for r, e in zip(ids.tolist(), d["seen"], strict=True))


def test_joint_probe_of_every_list_is_the_exact_search(joint_data):
    d = joint_data
    index = d["index"]
    index.set_search_params(probe="joint", user_nprobe=48)  # all lists: exhaustive
    try:
        ids, scores = index.search(d["users"], 15, exclude=d["seen"])
    finally:
        index.set_search_params(probe="per_vector", user_nprobe=0)
    ref_ids, ref_scores = numpy_topk(d["users"], d["items"], 15, d["seen"])
    assert np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=2e-6)


def test_joint_probe_single_vector_equals_faiss_ivf(joint_data):
    """K = 1: joint probing with user_nprobe = P visits the same P lists as FAISS with nprobe = P."""
    d = joint_data
    index = d["index"]
    q = d["users"][:, 0]
    faiss_ids, faiss_scores = index.search(q, 10)
    index.set_search_params(probe="joint", user_nprobe=index.config.nprobe)
    try:
        ids, scores = index.search(q, 10)
    finally:
        index.set_search_params(probe="per_vector", user_nprobe=0)
    np.testing.assert_allclose(scores, faiss_scores, atol=2e-6)
    same = (ids == faiss_ids).mean()
    assert same > 0.99, same  # only float ties between near-equal scores may swap


def test_joint_probe_recall_beats_per_vector_at_equal_list_scans(joint_data):
    """The same number of list scans per user (K * nprobe per-vector vs user_nprobe joint) finds more of the exact
    top 10: every scanned item is scored by all K vectors."""
    d = joint_data
    index = d["index"]
    exact_ids, _ = numpy_topk(d["users"], d["items"], 10)
    K, nprobe = d["users"].shape[1], index.config.nprobe
    per_vector = recall_at_k(index.search(d["users"], 10)[0], exact_ids, 10)
    index.set_search_params(probe="joint", user_nprobe=K * nprobe)
    try:
        joint = recall_at_k(index.search(d["users"], 10)[0], exact_ids, 10)
        index.set_search_params(user_nprobe=0)  # the default: 4 * nprobe, fewer scans than K * nprobe
        joint_default = recall_at_k(index.search(d["users"], 10)[0], exact_ids, 10)
    finally:
        index.set_search_params(probe="per_vector", user_nprobe=0)
    assert joint >= per_vector, (joint, per_vector)
    assert joint > 0.9 and joint_default > 0.6, (joint, joint_default)


def test_joint_probe_threads_padding_and_persistence(tmp_path, joint_data):
    d = joint_data
    cfg = IndexConfig(kind="ivf_flat", nlist=48, nprobe=4, probe="joint", user_nprobe=3, threads=1)
    index = build_index(cfg, D).fit(d["items"])
    one = index.search(d["users"], 12, exclude=d["seen"])
    index.set_search_params(threads=2)
    two = index.search(d["users"], 12, exclude=d["seen"])
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    # k beyond the probed lists' items: -1 / -inf padding after the found ones
    ids, scores = index.search(d["users"][:2], 5000)
    assert (ids[:, -1] == -1).all() and np.isneginf(scores[:, -1]).all()
    n = (ids >= 0).sum(axis=1)
    assert ((ids >= 0).sum(axis=1) == np.isfinite(scores).sum(axis=1)).all() and (n < 5000).all()
    assert all(len(set(r[r >= 0].tolist())) == c for r, c in zip(ids, n, strict=True))  # no duplicates
    assert "probe='joint'" in repr(index) and index.memory_bytes() > len(d["items"]) * (8 * D + 16)
    back = load_index(index.save(tmp_path / "joint"))
    assert back.config.probe == "joint" and back.config.user_nprobe == 3
    assert np.array_equal(back.search(d["users"], 12, exclude=d["seen"])[0], one[0])
    # items added after a joint search are found by the next one (the list copy is rebuilt)
    extra = unit(d["users"][:1, 0] + 1e-3)
    back.add(extra)
    assert back.search(d["users"][:1, :1], 1)[0][0, 0] == len(d["items"])


@pytest.mark.skipif(not bf16_available(), reason="torch's library here has no MKL bfloat16 GEMM (non-x86 build)")
def test_joint_probe_bfloat16_scan_rescored_in_float32(tmp_path, joint_data):
    """The bfloat16 scan keeps 2k candidates by bfloat16 scores and returns the best k by float32 scores: the same
    lists as the float32 scan here, float32 scores, exclusions and padding as before."""
    d = joint_data
    cfg = IndexConfig(kind="ivf_flat", nlist=48, nprobe=4, probe="joint", user_nprobe=6, threads=1)
    index = build_index(cfg, D).fit(d["items"])
    f_ids, f_scores = index.search(d["users"], 20, exclude=d["seen"])
    index.set_search_params(joint_precision="bfloat16")
    ids, scores = index.search(d["users"], 20, exclude=d["seen"])
    same = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids.tolist(), f_ids.tolist(), strict=True)])
    assert same >= 0.98, same
    want = np.max(unit(d["users"]) @ d["items"][np.maximum(ids, 0)].transpose(0, 2, 1), axis=1)
    np.testing.assert_allclose(scores, want, atol=2e-6)  # float32 scores, not bfloat16-rounded ones (~1e-3 off)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert not any(set(r) & set(e.tolist()) for r, e in zip(ids.tolist(), d["seen"], strict=True))
    # the winning vector of each returned item, from the float32 re-scoring (-1 where no item); the float32 scan
    # does not compute it (all -1)
    which = np.full((len(ids), 20), 7, np.int64)
    index.search(d["users"], 20, exclude=d["seen"], interests=which)
    cos = unit(d["users"]) @ d["items"][np.maximum(ids, 0)].transpose(0, 2, 1)  # [B, K, 20]
    assert (which == cos.argmax(axis=1)).mean() > 0.99 and (which >= 0).all()
    index.set_search_params(threads=2)
    w2 = np.empty_like(which)
    assert np.array_equal(index.search(d["users"], 20, exclude=d["seen"], interests=w2)[0], ids)
    assert np.array_equal(w2, which)
    big_ids, big_scores = index.search(d["users"][:2], 5000)  # more than the probed lists hold: padded
    assert (big_ids[:, -1] == -1).all() and np.isneginf(big_scores[:, -1]).all()
    big_w = np.empty((2, 5000), np.int64)
    index.search(d["users"][:2], 5000, interests=big_w)
    assert ((big_w >= 0) == (big_ids >= 0)).all()
    with pytest.raises(ValueError, match="interests"):
        index.search(d["users"][:2], 5, interests=np.empty((2, 4), np.int64))
    index.set_search_params(joint_precision="float32")
    no_w = np.zeros((2, 5), np.int64)
    index.search(d["users"][:2], 5, interests=no_w)
    assert (no_w == -1).all()
    index.set_search_params(joint_precision="bfloat16")
    back = load_index(index.save(tmp_path / "bf16"))
    assert back.config.joint_precision == "bfloat16"
    assert np.array_equal(back.search(d["users"], 20, exclude=d["seen"])[0], ids)


def test_joint_probe_worker_threads_end_with_their_lists(joint_data):
    """The joint probe's worker thread stops when its list copy is dropped (after ``add``, or with the index)."""
    import gc
    import threading
    import time

    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("redrec-ivf")}

    before = workers()  # other tests' indexes may still hold (or now drop) theirs
    d = joint_data
    index = build_index(IndexConfig(kind="ivf_flat", nlist=48, nprobe=4, probe="joint", threads=2), D).fit(d["items"])
    index.search(d["users"], 5)
    first = workers() - before
    assert len(first) == 1
    index.add(d["items"][:3])
    index.search(d["users"], 5)
    second = workers() - before - first
    assert len(second) == 1
    del index
    gc.collect()
    t0 = time.time()
    while any(t.is_alive() for t in first | second) and time.time() - t0 < 5:
        time.sleep(0.02)
    assert not any(t.is_alive() for t in first | second)
