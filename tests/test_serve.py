"""``redrec serve`` end to end: a real uvicorn server on 127.0.0.1 (in a thread, and ``redrec serve`` in a subprocess),
talked to with httpx.

The model is a tiny RED-Rec saved untrained (two of them, different seeds, for hot reload) with a run directory
around it, on the tiny synthetic store (features item tower, scenarios homefeed / ads / search).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from conftest import make_tiny_store, tiny_train_config

from redrec.config import save_yaml
from redrec.data.store import EventStore
from redrec.embed import latest_case
from redrec.eval.run import checkpoint_scorer
from redrec.model.redrec import RedRec
from redrec.serve.app import ServeConfig, create_app
from redrec.serve.batcher import BatcherClosed, MicroBatcher, QueueFull
from redrec.serve.history import events_from_store, open_history_store
from redrec.serve.recommender import Recommendation, Recommendations, Recommender, _frozen
from redrec.train import resolve_model_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    store = make_tiny_store(root)
    st = EventStore(store)
    runs = {}
    for name, seed in (("run", 0), ("run2", 1)):
        cfg = tiny_train_config(store, root / name, **{"model.user_tower.queries_per_scenario": 2, "model.embed_dim": 16})
        torch.manual_seed(seed)
        RedRec(resolve_model_config(cfg, st)).eval().save_pretrained(root / name / "model")
        save_yaml(cfg, root / name / "config.yaml")
        runs[name] = root / name
    rec = Recommender.load(runs["run"])
    return {"root": root, "store": store, "st": st, "run": runs["run"], "run2": runs["run2"], "rec": rec}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``create_app`` under a real uvicorn server in a background thread."""

    def __init__(self, rec: Recommender, cfg: ServeConfig, history_url: str = ":memory:"):
        self.history = open_history_store(history_url, 128)
        self.app = create_app(rec, self.history, cfg)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def service(self):
        return self.app.state.service

    def __enter__(self) -> Server:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert self.thread.is_alive() and time.time() - t0 < 30, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(env):
    cfg = ServeConfig(max_wait_ms=5, max_history=500, max_events=500, max_body_bytes=1 << 20)
    with Server(env["rec"], cfg) as s:
        yield s


def wire_events(st: EventStore, u: int, user: str | None = None) -> list[dict]:
    """Store user ``u``'s events as request JSON (with ``user`` for /v1/events)."""
    out = []
    for e in events_from_store(st, u):
        d = {"item": e.item, "scenario": e.scenario, "timestamp": e.timestamp, "actions": list(e.actions),
             "duration": e.duration}
        if user is not None:
            d["user"] = user
        out.append(d)
    return out


def metric_values(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out


def batches(text: str) -> tuple[float, float]:
    """(number of batches, batches of size 1) from /metrics."""
    v = metric_values(text)
    return v["redrec_batch_size_count"], v['redrec_batch_size_bucket{le="1"}']


# ------------------------------------------------------------------------------------------------------------------
def test_events_then_recommend(server, env):
    st, rec = env["st"], env["rec"]
    c = httpx.Client(base_url=server.url, timeout=30)
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == rec.model_version
    events = wire_events(st, 0, user="alice")
    r = c.post("/v1/events", json={"events": events})
    assert r.status_code == 200 and r.json() == {"accepted": len(events), "unknown_items": 0}
    seen = {e["item"] for e in events}

    r = c.post("/v1/recommend", json={"user": "alice", "k": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == rec.model_version and body["n_history"] == len(events)
    ids = [it["id"] for it in body["items"]]
    assert len(ids) == 50 and len(set(ids)) == 50 and not seen & set(ids)  # seen items excluded
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(it["interest_scenario"] == rec.query_scenarios[it["interest"]] for it in body["items"])
    direct = rec.recommend([events_from_store(st, 0)], k=50)[0]
    assert ids == [x.id for x in direct]
    np.testing.assert_allclose(scores, [x.score for x in direct], atol=1e-6)
    # the column-wise result list: a sequence of Recommendation, sliced, compared and turned into the JSON items
    assert isinstance(direct, Recommendations) and len(direct) == 50 and isinstance(direct[-1], Recommendation)
    assert direct[-1] == (ids[-1], int(st.item_index([ids[-1]])[0]), direct.scores[-1], direct.interests[-1],
                          rec.query_scenarios[direct.interests[-1]])
    assert isinstance(direct[:5], Recommendations) and direct[:5] == list(direct)[:5] and direct[:5] != direct[:4]
    assert direct.as_dicts()[:5] == [{"id": x.id, "score": x.score, "interest": x.interest,
                                      "interest_scenario": x.interest_scenario} for x in direct[:5]]

    # the winning interest really is the argmax over K
    vec = np.asarray(c.post("/v1/embed/user", json={"user": "alice"}).json()["vectors"])
    iv = rec.item_vectors[st.item_index(ids[:5])]
    cos = vec @ iv.T  # [K, 5]
    assert [it["interest"] for it in body["items"][:5]] == cos.argmax(0).tolist()
    np.testing.assert_allclose(scores[:5], cos.max(0), atol=1e-5)
    # ... of the cosines, whatever the lengths of a caller's own vectors: item v against u0 = 10 w (cos(w, v) =
    # 0.5, the larger dot product) and u1 = v (cosine 1)
    v = rec.item_vectors[st.item_index(ids[:1])[0]].astype(np.float64)
    n = np.random.default_rng(0).standard_normal(v.shape)
    n -= (n @ v) * v
    w = 0.5 * v + np.sqrt(0.75) * n / np.linalg.norm(n)
    users = np.stack([10 * w, v])[None].astype(np.float32)  # [1, 2, d]
    got = rec._items(users, st.item_index(ids[:1])[None], np.ones((1, 1), np.float32))[0]
    assert got.interests == [1]

    # scenario restriction: only items seen in ads in the training store
    ads = set(st.item_ids[rec.subsets["ads"]])
    r = c.post("/v1/recommend", json={"user": "alice", "k": 1000, "scenario": "ads"}).json()
    got = {it["id"] for it in r["items"]}
    assert got and got <= ads and not got & seen
    assert len(got) == len(ads - seen)  # k above the pool size: every eligible item once

    # exclude_seen false: seen items may come back (here: with k = every item, they must)
    r = c.post("/v1/recommend", json={"user": "alice", "k": 1000, "exclude_seen": False}).json()
    assert len(r["items"]) == st.n_items and seen <= {it["id"] for it in r["items"]}


def test_inline_history_and_unknown_user(server, env):
    st = env["st"]
    c = httpx.Client(base_url=server.url, timeout=30)
    c.post("/v1/events", json={"events": wire_events(st, 1, user="bob")}).raise_for_status()
    stored = c.post("/v1/recommend", json={"user": "bob", "k": 20}).json()
    inline = c.post("/v1/recommend", json={"history": wire_events(st, 1), "k": 20}).json()
    again = c.post("/v1/recommend", json={"history": wire_events(st, 1), "k": 20}).json()
    assert stored == inline == again  # deterministic: t_now = the last event's timestamp
    # unknown items in an inline history are ignored (not counted in n_history)
    extra = wire_events(st, 1) + [{"item": "no-such-item", "scenario": "ads", "timestamp": 1}]
    r = c.post("/v1/recommend", json={"history": extra, "k": 20}).json()
    assert r["n_history"] == inline["n_history"] and r["items"] == inline["items"]
    # a user without history: 200, the model on the empty sequence
    r = c.post("/v1/recommend", json={"user": "nobody", "k": 7})
    assert r.status_code == 200 and r.json()["n_history"] == 0 and len(r.json()["items"]) == 7
    assert r.json() == c.post("/v1/recommend", json={"history": [], "k": 7}).json()
    # an explicit t_now changes the time-gap features
    t_last = max(e["timestamp"] for e in wire_events(st, 1))
    same = c.post("/v1/embed/user", json={"history": wire_events(st, 1), "t_now": t_last}).json()
    later = c.post("/v1/embed/user", json={"history": wire_events(st, 1), "t_now": t_last + 10**6}).json()
    base = c.post("/v1/embed/user", json={"history": wire_events(st, 1)}).json()
    assert same["vectors"] == base["vectors"] and later["vectors"] != base["vectors"]


def test_recommend_fast_path_matches_the_full_stack(server, env, monkeypatch):
    """A JSON body of known length is answered by the middleware's fast path; a chunked body (no Content-Length)
    by FastAPI's route: the same answers and the same errors."""
    import redrec.serve.app as app_module

    taken = []
    fast_path = app_module._Observe._recommend

    async def counted(self, *args):
        taken.append(1)
        await fast_path(self, *args)

    monkeypatch.setattr(app_module._Observe, "_recommend", counted)
    st = env["st"]
    c = httpx.Client(base_url=server.url, timeout=30)
    c.post("/v1/events", json={"events": wire_events(st, 2, user="carol")}).raise_for_status()
    m0 = metric_values(c.get("/metrics").text)
    cases = [{"user": "carol", "k": 15}, {"history": wire_events(st, 2), "k": 5, "scenario": "ads"},
             {"user": "carol", "k": 0}, {"user": "carol", "scenario": "nope"}, {"user": "carol", "k": 3, "x": 1}]
    for body in cases:
        raw = json.dumps(body).encode()
        fast = c.post("/v1/recommend", content=raw, headers={"content-type": "application/json"})
        full = c.post("/v1/recommend", content=iter([raw[:7], raw[7:]]), headers={"content-type": "application/json"})
        assert fast.status_code == full.status_code and fast.json() == full.json(), body
        assert fast.headers["content-type"] == full.headers["content-type"] == "application/json"
    assert fast.status_code == 422 and "x" in fast.json()["message"]
    assert len(taken) == len(cases)  # the chunked requests took the full stack
    # both paths are counted per status
    m1 = metric_values(c.get("/metrics").text)
    key = 'redrec_requests_total{endpoint="/v1/recommend",status="200"}'
    assert m1[key] - m0.get(key, 0) == 4


def test_embed_user_equals_model_scorer(server, env):
    st = env["st"]
    c = httpx.Client(base_url=server.url, timeout=30)
    users = [3, 4, 5, 17]
    scorer = checkpoint_scorer(env["run"], None, queries="all")
    ref = scorer.score_cases(st, [latest_case(st, u) for u in users])  # [B, K, d]
    c.post("/v1/events", json={"events": [e for u in users for e in wire_events(st, u, user=f"s{u}")]}).raise_for_status()
    for b, u in enumerate(users):
        stored = c.post("/v1/embed/user", json={"user": f"s{u}"}).json()
        inline = c.post("/v1/embed/user", json={"history": wire_events(st, u)}).json()
        v = np.asarray(stored["vectors"], np.float32)
        assert v.shape == ref.shape[1:] and stored["n_history"] == len(st.user(u))
        np.testing.assert_allclose(v, ref[b], atol=1e-5)
        np.testing.assert_allclose(np.asarray(inline["vectors"]), ref[b], atol=1e-5)
        assert stored["query_scenarios"] == ["homefeed", "homefeed", "ads", "ads", "search", "search"]


def test_concurrent_requests_are_batched(server, env):
    st = env["st"]
    bodies = [{"history": wire_events(st, u), "k": 10, "scenario": [None, "ads", "search"][u % 3]} for u in range(32)]
    c = httpx.Client(base_url=server.url, timeout=30)
    single = [c.post("/v1/recommend", json=b).json() for b in bodies]  # one at a time: batches of 1
    n0, ones0 = batches(c.get("/metrics").text)

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=64)) as ac:
            return await asyncio.gather(*(ac.post("/v1/recommend", json=b) for b in bodies))

    rs = asyncio.run(burst())
    assert [r.status_code for r in rs] == [200] * 32
    n1, ones1 = batches(c.get("/metrics").text)
    assert n1 - n0 < 32 and (n1 - n0) > (ones1 - ones0)  # fewer batches than requests: some held several
    for a, r in zip(single, rs, strict=True):
        b = r.json()
        assert [i["id"] for i in b["items"]] == [i["id"] for i in a["items"]]
        np.testing.assert_allclose([i["score"] for i in b["items"]], [i["score"] for i in a["items"]], atol=1e-5)


def test_overload_answers_503(env):
    cfg = ServeConfig(max_batch=1, max_wait_ms=0, max_queue=1, batch_delay_ms=300)
    with Server(env["rec"], cfg) as s:
        async def burst():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as ac:
                return await asyncio.gather(*(ac.post("/v1/recommend", json={"user": f"u{i}"}) for i in range(8)))

        t0 = time.time()
        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        # one request runs (max_batch 1) and at most one waits (max_queue 1); whether the second found the queue
        # still holding the first depends on timing, so 1 or 2 succeed and every other one is refused at once
        assert set(codes) == {200, 503} and 1 <= codes.count(200) <= 2, codes
        assert time.time() - t0 < 2.5  # refused at once, not queued behind the slow batches
        for r in rs:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"] == "queue_full"
        v = metric_values(httpx.get(s.url + "/metrics").text)
        assert v['redrec_rejected_total{reason="queue_full"}'] == codes.count(503)
        assert v['redrec_requests_total{endpoint="/v1/recommend",status="503"}'] == codes.count(503)


BAD = [
    # (path, json body or raw bytes, content type, expected status, text the message must contain)
    ("/v1/recommend", b'{"user": "a",', "application/json", 400, "not valid JSON"),
    ("/v1/recommend", b"user=a", "application/x-www-form-urlencoded", 415, "JSON"),
    ("/v1/recommend", [1, 2], None, 422, "body"),
    ("/v1/recommend", {"user": "a", "kk": 3}, None, 422, "kk"),
    ("/v1/recommend", {"user": "a", "k": 0}, None, 422, "k"),
    ("/v1/recommend", {"user": "a", "k": -5}, None, 422, "k"),
    ("/v1/recommend", {"user": "a", "k": 1001}, None, 422, "k"),
    ("/v1/recommend", {"user": "a", "k": "10"}, None, 422, "k"),
    ("/v1/recommend", {"user": "a", "k": 2.5}, None, 422, "k"),
    ("/v1/recommend", {"user": "a", "k": True}, None, 422, "k"),
    ("/v1/recommend", b'{"user": "a", "k": NaN}', "application/json", 422, "k"),
    ("/v1/recommend", {"user": "a", "scenario": "nope"}, None, 422, "unknown scenario"),
    ("/v1/recommend", {"user": "a", "exclude_seen": "yes"}, None, 422, "exclude_seen"),
    ("/v1/recommend", {"user": ""}, None, 422, "user"),
    ("/v1/recommend", {}, None, 422, "user or history"),
    ("/v1/recommend", {"user": "a", "history": []}, None, 422, "exactly one"),
    ("/v1/recommend", {"history": [{"item": "x", "scenario": "nope", "timestamp": 1}]}, None, 422, "unknown scenario"),
    ("/v1/recommend", {"history": [{"item": "x", "scenario": "ads", "timestamp": 1, "actions": ["zap"]}]}, None, 422,
     "unknown action"),
    ("/v1/recommend", {"history": [{"item": "x", "scenario": "ads", "timestamp": -1}]}, None, 422, "timestamp"),
    ("/v1/recommend", {"history": [{"item": "x", "scenario": "ads"}]}, None, 422, "timestamp"),
    ("/v1/recommend", b'{"history": [{"item": "x", "scenario": "ads", "timestamp": 1, "duration": Infinity}]}',
     "application/json", 422, "duration"),
    ("/v1/recommend", {"history": [{"item": "x", "scenario": "ads", "timestamp": 1}] * 501}, None, 413, "max_history"),
    ("/v1/embed/user", {"history": [{"item": "x", "scenario": "ads", "timestamp": 1.5}]}, None, 422, "timestamp"),
    ("/v1/embed/user", {"user": "a", "k": 3}, None, 422, "k"),
    ("/v1/events", {"events": [{"user": "a", "item": "x", "scenario": "nope", "timestamp": 1}]}, None, 422,
     "unknown scenario"),
    ("/v1/events", {"events": [{"user": "a", "item": "x", "scenario": "ads", "timestamp": 1, "actions": ["zap"]}]},
     None, 422, "unknown action"),
    ("/v1/events", {"events": [{"item": "x", "scenario": "ads", "timestamp": 1}]}, None, 422, "user"),
    ("/v1/events", b'{"events": [{"user": "a", "item": "x", "scenario": "ads", "timestamp": 1, "duration": NaN}]}',
     "application/json", 422, "duration"),
    ("/v1/events", {"events": [{"user": "a", "item": "x", "scenario": "ads", "timestamp": 1}] * 501}, None, 413,
     "max_events"),
    ("/v1/events", b'{"events": [' + b" " * (1 << 20) + b"]}", "application/json", 413, "max_body_bytes"),
    ("/v1/admin/reload", {"checkpoint": "/no/such/run"}, None, 422, "still serving"),
    ("/v1/admin/reload", {"index": 3}, None, 422, "index"),
]


def test_bad_requests_get_4xx(server):
    c = httpx.Client(base_url=server.url, timeout=30)
    before = c.post("/v1/recommend", json={"user": "a"}).json()
    for path, body, ctype, status, text in BAD:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": ctype})
        else:
            r = c.post(path, json=body)
        assert r.status_code == status, (path, body if not isinstance(body, bytes) else body[:80], r.text[:300])
        assert r.headers["content-type"] == "application/json", (path, r.text[:300])
        j = r.json()
        assert set(j) == {"error", "message", "details"} and text in j["message"] + str(j["details"]), j
    big = (b'{"events": [' + b" " * (1 << 20) + b"]}")
    r = c.post("/v1/events", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
               headers={"content-type": "application/json"})  # chunked: no Content-Length
    assert r.status_code == 413 and "max_body_bytes" in r.json()["message"]
    assert c.get("/v1/recommend").status_code == 405
    assert c.get("/nope").status_code == 404 and "message" in c.get("/nope").json()
    assert c.get("/readyz").status_code == 200
    assert c.post("/v1/recommend", json={"user": "a"}).json() == before  # nothing stored, nothing broken
    assert server.history.get("a") == []
    text = c.get("/metrics").text
    assert not re.search(r'status="5\d\d"', text)


def test_metrics_are_prometheus_text(server):
    c = httpx.Client(base_url=server.url, timeout=30)
    c.post("/v1/recommend", json={"user": "m", "k": 3}).raise_for_status()
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? '
                        r'(-?[0-9.e+-]+|[+-]Inf|NaN)$')
    types: dict[str, str] = {}
    helped = set()
    buckets: dict[str, list[float]] = {}
    for line in r.text.rstrip("\n").split("\n"):
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram") and name in helped
            types[name] = kind
        else:
            m = sample.match(line)
            assert m, line
            name = m.group(1)
            base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert base in types, line
            if name.endswith("_bucket"):
                series = re.sub(r',?le="[^"]*"', "", line.rpartition(" ")[0])
                buckets.setdefault(series, []).append(float(m.group(4)))
    for series, counts in buckets.items():
        assert counts == sorted(counts), series  # cumulative
    for name in ("redrec_requests_total", "redrec_request_duration_seconds", "redrec_batch_size", "redrec_queue_depth",
                 "redrec_index_items", "redrec_user_tower_seconds", "redrec_index_seconds"):
        assert name in types, name
    v = metric_values(r.text)
    assert v['redrec_index_items{pool="all"}'] == 300 and v["redrec_queue_depth"] == 0
    assert v['redrec_requests_total{endpoint="/v1/recommend",status="200"}'] >= 1
    assert v["redrec_user_tower_seconds_count"] >= 1 and v["redrec_index_seconds_count"] >= 1
    spec = c.get("/openapi.json").json()
    assert {"/v1/events", "/v1/recommend", "/v1/embed/user", "/v1/admin/reload", "/healthz", "/readyz",
            "/metrics"} <= set(spec["paths"])
    assert "RecommendRequest" in spec["components"]["schemas"]


def test_hot_reload_under_load(env):
    st = env["st"]
    rec1 = Recommender.load(env["run"])
    rec2 = Recommender.load(env["run2"])
    assert rec1.model_version != rec2.model_version
    bodies = [{"history": wire_events(st, u), "k": 5} for u in range(8)]
    expect = {rec.model_version: [[x.id for x in rec.recommend([events_from_store(st, u)], k=5)[0]] for u in range(8)]
              for rec in (rec1, rec2)}
    with Server(rec1, ServeConfig(max_wait_ms=2)) as s:
        stop = asyncio.Event()
        failures: list[str] = []
        versions: list[str] = []

        async def client(ac: httpx.AsyncClient, i: int) -> None:
            while not stop.is_set():
                r = await ac.post("/v1/recommend", json=bodies[i])
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                b = r.json()
                versions.append(b["model_version"])
                if [x["id"] for x in b["items"]] != expect[b["model_version"]][i]:
                    failures.append(f"user {i}: items of another model than {b['model_version']}")

        async def main() -> list[dict]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as ac:
                tasks = [asyncio.create_task(client(ac, i)) for i in range(8)]
                await asyncio.sleep(0.3)
                out = []
                for run in (env["run2"], env["run"], env["run2"]):
                    busy = asyncio.create_task(ac.post("/v1/admin/reload", json={"checkpoint": str(run)}))
                    second = asyncio.create_task(_later(ac.post("/v1/admin/reload", json={}), 0.05))
                    r = await busy
                    while r.status_code == 409:  # on a slow host the second reload may win the race: ours follows
                        await asyncio.sleep(0.05)
                        r = await ac.post("/v1/admin/reload", json={"checkpoint": str(run)})
                    out.append(r.json())
                    assert r.status_code == 200, r.text
                    assert (await second).status_code in (200, 409)  # one reload at a time
                    await asyncio.sleep(0.2)
                stop.set()
                await asyncio.gather(*tasks)
                return out

        results = asyncio.run(main())
        assert failures == []
        assert [r["model_version"] for r in results] == [rec2.model_version, rec1.model_version, rec2.model_version]
        assert set(versions) == {rec1.model_version, rec2.model_version}
        r = httpx.post(s.url + "/v1/recommend", json=bodies[0]).json()
        assert r["model_version"] == rec2.model_version and [x["id"] for x in r["items"]] == expect[rec2.model_version][0]
        assert httpx.get(s.url + "/readyz").json()["model_version"] == rec2.model_version


def test_history_store_down_is_503(env):
    with Server(env["rec"], ServeConfig()) as s:
        s.history.close()  # every read now fails
        r = httpx.post(s.url + "/v1/recommend", json={"user": "a"})
        assert r.status_code == 503 and r.json()["error"] == "history_unavailable" and "Retry-After" in r.headers
        r = httpx.post(s.url + "/v1/recommend", json={"history": wire_events(env["st"], 0)})
        assert r.status_code == 200  # inline histories do not need the store


def test_faiss_index_and_item_embeddings(env):
    """--index (FAISS flat) and --item-embeddings give the exact engine's lists; mismatched files are refused."""
    from redrec.embed import EmbedConfig, embed_items, load_embeddings, merge_embeddings
    from redrec.errors import DataError
    from redrec.retrieval.index import IndexConfig, build_index

    root, st, exact = env["root"], env["st"], env["rec"]
    emb = root / "emb-items"
    if not emb.exists():
        embed_items(env["run"], None, emb, EmbedConfig(device="cpu", progress=False))
        merge_embeddings(emb, progress=False)
    idx_dir = build_index(IndexConfig(kind="flat"), 16).fit(np.asarray(load_embeddings(emb).vectors)).save(root / "idx")
    rec = Recommender.load(env["run"], index=idx_dir, item_embeddings=emb)
    assert rec.retrieval == "faiss-flat"
    np.testing.assert_allclose(rec.item_vectors, exact.item_vectors, atol=1e-6)
    hist = [events_from_store(st, u) for u in range(6)]
    for scen in (None, "ads"):
        a = rec.recommend(hist, k=10, scenario=scen)
        b = exact.recommend(hist, k=10, scenario=scen)
        assert [[x.id for x in r] for r in a] == [[x.id for x in r] for r in b]
        np.testing.assert_allclose([[x.score for x in r] for r in a], [[x.score for x in r] for r in b], atol=1e-5)
    assert all(x.id not in {e.item for e in hist[0]} for x in a[0])  # exclusion through FAISS
    other = root / "emb-items-2"
    if not other.exists():
        embed_items(env["run2"], None, other, EmbedConfig(device="cpu", progress=False))
        merge_embeddings(other, progress=False)
    with pytest.raises(DataError, match="another model"):
        Recommender.load(env["run"], item_embeddings=other)
    small = build_index(IndexConfig(kind="flat"), 16).fit(np.asarray(load_embeddings(emb).vectors)[:10]).save(root / "idx10")
    with pytest.raises(DataError, match="ntotal"):
        Recommender.load(env["run"], index=small)


def test_joint_probe_ivf_index(env):
    """--index-probe joint over an IVF-Flat index probing every list gives the exact engine's lists; joint on
    another kind and a bad probe name are refused at load."""
    from redrec.embed import EmbedConfig, embed_items, load_embeddings, merge_embeddings
    from redrec.errors import ConfigError
    from redrec.retrieval.index import IndexConfig, build_index

    root, st, exact = env["root"], env["st"], env["rec"]
    emb = root / "emb-items"
    if not emb.exists():
        embed_items(env["run"], None, emb, EmbedConfig(device="cpu", progress=False))
        merge_embeddings(emb, progress=False)
    vecs = np.asarray(load_embeddings(emb).vectors)
    ivf = build_index(IndexConfig(kind="ivf_flat", nlist=8, nprobe=2), 16).fit(vecs).save(root / "ivf")
    rec = Recommender.load(env["run"], index=ivf, item_embeddings=emb, index_probe="joint", index_nprobe=8)
    pool = rec.pools[None].index
    assert pool.config.probe == "joint" and pool.config.user_nprobe == 8 and pool.config.threads == (os.cpu_count() or 1)
    hist = [events_from_store(st, u) for u in range(6)]
    a, b = rec.recommend(hist, k=10), exact.recommend(hist, k=10)
    assert [[x.id for x in r] for r in a] == [[x.id for x in r] for r in b]
    np.testing.assert_allclose([[x.score for x in r] for r in a], [[x.score for x in r] for r in b], atol=1e-5)
    assert [[x.interest for x in r] for r in a] == [[x.interest for x in r] for r in b]
    assert rec.reload().pools[None].index.config.probe == "joint"  # hot reload keeps the serving options
    from redrec.retrieval.ivf_joint import bf16_available

    if bf16_available():  # --index-precision bfloat16: the same lists here, float32 scores, kept by a reload
        r16 = Recommender.load(env["run"], index=ivf, item_embeddings=emb, index_probe="joint", index_nprobe=8,
                               index_precision="bfloat16")
        c = rec.recommend(hist, k=10)
        c16 = r16.recommend(hist, k=10)
        assert [[x.id for x in r] for r in c16] == [[x.id for x in r] for r in c]
        np.testing.assert_allclose([[x.score for x in r] for r in c16], [[x.score for x in r] for r in c], atol=1e-5)
        # the winning interest: from the bfloat16 scan's float32 re-scoring, from a product over the items for c
        assert [[x.interest for x in r] for r in c16] == [[x.interest for x in r] for r in c]
        assert r16.reload().pools[None].index.config.joint_precision == "bfloat16"
    per = Recommender.load(env["run"], index=ivf, item_embeddings=emb, index_nprobe=3)
    assert per.pools[None].index.config.probe == "per_vector" and per.pools[None].index.config.nprobe == 3
    assert per.pools[None].index.config.threads == 1
    flat = build_index(IndexConfig(kind="flat"), 16).fit(vecs).save(root / "idx-flat")
    for kwargs, field in (({"index": flat, "index_probe": "joint"}, "index_probe"),
                          ({"index": ivf, "index_probe": "both"}, "index_probe"),
                          ({"index": ivf, "index_nprobe": 0}, "index_nprobe"),
                          ({"index": ivf, "index_precision": "bfloat16"}, "index_precision"),  # per_vector probe
                          ({"index": ivf, "index_probe": "joint", "index_precision": "int8"}, "index_precision")):
        with pytest.raises(ConfigError, match=field):
            Recommender.load(env["run"], item_embeddings=emb, **kwargs)


def test_frozen_patch_is_per_thread():
    """``_frozen`` turns inductor's ``freezing`` on around each call, for the calling thread only: a call ending in
    one thread leaves it on in a call still running in another (a hot reload compiling while the model serves),
    and off outside the calls."""
    import threading

    from torch._inductor import config as inductor_config

    if inductor_config.freezing:
        pytest.skip("inductor freezing is on for the whole process (TORCHINDUCTOR_FREEZING)")
    seen: dict[str, list[bool]] = {"slow": [], "quick": []}
    inside, leave = threading.Event(), threading.Event()

    def fake_compiled(name):
        seen[name].append(inductor_config.freezing)
        if name == "slow":
            inside.set()
            leave.wait(10)
            seen[name].append(inductor_config.freezing)  # after the quick call ended

    call = _frozen(fake_compiled)
    t = threading.Thread(target=call, args=("slow",))
    t.start()
    assert inside.wait(10)
    call("quick")
    assert inductor_config.freezing is False
    leave.set()
    t.join(10)
    assert seen == {"slow": [True, True], "quick": [True]}


def test_bfloat16_and_compiled_user_tower(env):
    """--precision bfloat16 (autocast) and --compile (torch.compile, batches padded to >= 2 x 2) give the float32
    interest vectors within rounding, for batches of 1 and of several users, empty histories included."""
    st, ref = env["st"], env["rec"]
    hist = [events_from_store(st, u) for u in range(5)] + [[]]
    want = ref.user_vectors(hist)
    bf16 = Recommender.load(env["run"], precision="bfloat16")
    cos = (bf16.user_vectors(hist) * want).sum(-1)
    assert cos.min() > 0.995, cos.min()
    t0 = time.perf_counter()
    comp = Recommender.load(env["run"], compile=True)  # the warm-up compiles
    assert comp.compiled and time.perf_counter() - t0 < 600
    for batch in (hist, hist[:1], hist[-1:], hist[2:4]):
        got = comp.user_vectors(batch)
        assert got.shape == (len(batch), *want.shape[1:]) and got.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(got, ref.user_vectors(batch), atol=2e-5)
    # both: within rounding too, and frozen (inductor freezing: the linear layers' weights are cast and prepacked
    # into constants of the compiled graph, so changing them afterwards does not change its output; unfrozen they
    # are graph inputs, read at every call)
    both = Recommender.load(env["run"], compile=True, precision="bfloat16")
    got = both.user_vectors(hist)
    assert (got * want).sum(-1).min() > 0.995
    linears = [m for m in both.model.backbone.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    with torch.no_grad():
        for m in linears:
            m.weight.mul_(-1.0)
    np.testing.assert_array_equal(both.user_vectors(hist), got)
    with pytest.raises(Exception, match="precision"):
        Recommender.load(env["run"], precision="float8")


def test_precomputed_item_tower(env):
    """``precompute_items``: the item tower's output for every item, computed once at load, replaces the tower in
    each forward: in float32 the same vectors as running it; on by default with bfloat16 (within rounding of
    float32, off on request); and it is what the forward reads (changing the table changes the vectors)."""
    from redrec.data.batching import item_features
    from redrec.serve.recommender import item_hidden_table

    st, ref = env["st"], env["rec"]
    assert ref.item_hidden is None  # float32 default: off
    hist = [events_from_store(st, u) for u in range(5)] + [[]]
    want = ref.user_vectors(hist)
    pre = Recommender.load(env["run"], precompute_items=True)
    assert tuple(pre.item_hidden.shape) == (st.n_items, pre.model.cfg.user_tower.hidden_size)
    ids = np.arange(st.n_items)
    with torch.no_grad():
        tower = pre.model.item_hidden(torch.from_numpy(ids), torch.from_numpy(item_features(st, ids)))
    torch.testing.assert_close(pre.item_hidden, tower, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pre.user_vectors(hist), want, rtol=0, atol=1e-5)
    bf16 = Recommender.load(env["run"], precision="bfloat16")
    assert bf16.item_hidden is not None and bf16.item_hidden.dtype == torch.bfloat16
    assert torch.equal(bf16.item_hidden, item_hidden_table(bf16.model, st, "bfloat16", chunk=7))  # chunking
    got = bf16.user_vectors(hist)
    assert (got * want).sum(-1).min() > 0.995
    assert Recommender.load(env["run"], precision="bfloat16", precompute_items=False).item_hidden is None
    assert bf16.reload().item_hidden is not None  # a hot reload keeps the setting
    bf16.item_hidden.mul_(-1.0)
    assert np.abs(bf16.user_vectors(hist[:5]) - got[:5]).max() > 1e-2


async def _later(coro, delay: float):
    await asyncio.sleep(delay)
    return await coro


def test_batcher_unit():
    """The generic batcher: batches form, per-item exceptions, queue bound, drain on stop."""
    seen: list[int] = []

    def fn(items):
        seen.append(len(items))
        time.sleep(0.05)
        return [ValueError(f"bad {x}") if x < 0 else x * 2 for x in items]

    async def main():
        b = MicroBatcher(fn, max_batch=4, max_wait_ms=20, max_queue=6)
        await b.start()
        results = await asyncio.gather(*(b.submit(x) for x in [1, 2, -3, 4, 5]), return_exceptions=True)
        assert results[:2] == [2, 4] and isinstance(results[2], ValueError) and results[3:] == [8, 10]
        assert seen[0] == 4  # the first four in one batch
        futs = [asyncio.ensure_future(b.submit(x)) for x in range(12)]
        await asyncio.sleep(0)
        done = await asyncio.gather(*futs, return_exceptions=True)
        assert sum(isinstance(x, QueueFull) for x in done) >= 1
        assert all(x == 2 * i for i, x in enumerate(done) if not isinstance(x, Exception))
        pending = [asyncio.ensure_future(b.submit(x)) for x in range(5)]
        await asyncio.sleep(0)
        await b.stop(drain=True)  # queued items are still answered
        assert [await p for p in pending] == [0, 2, 4, 6, 8]
        with pytest.raises(BatcherClosed):
            await b.submit(1)

    asyncio.run(main())


@pytest.mark.parametrize("history", [8, 0])
def test_batcher_fill_target_follows_recent_batches(history):
    """With ``history`` a batch starts once it holds as many items as the largest recent batch instead of waiting
    out ``max_wait_ms``; with ``history=0`` it always waits for ``max_batch`` or ``max_wait_ms``."""
    sizes: list[int] = []

    def fn(items):
        sizes.append(len(items))
        return items

    async def timed(b, n):
        t = time.perf_counter()
        assert await asyncio.gather(*(b.submit(x) for x in range(n))) == list(range(n))
        return time.perf_counter() - t

    async def main():
        b = MicroBatcher(fn, max_batch=32, max_wait_ms=300, max_queue=64, history=history)
        await b.start()
        first = await timed(b, 3)  # nothing to go by yet: waits max_wait
        second = await timed(b, 3)
        lone = await timed(b, 1)  # fewer than recent batches: waits max_wait again
        await b.stop()
        return first, second, lone

    first, second, lone = asyncio.run(main())
    assert sizes == [3, 3, 1]
    assert first >= 0.29 and lone >= 0.29
    assert (second < 0.15) if history else (second >= 0.29)


def test_batcher_gathers_closed_loop_clients_after_the_load_grows():
    """One client, then two sending back to back: the two are soon in one batch again (a fill target of the
    last batch's size alone would keep them alternating in batches of one)."""
    sizes: list[int] = []

    def fn(items):
        sizes.append(len(items))
        time.sleep(0.02)
        return items

    async def client(b, n):
        for x in range(n):
            assert await b.submit(x) == x

    async def main():
        b = MicroBatcher(fn, max_batch=32, max_wait_ms=10, max_queue=64)
        await b.start()
        await client(b, 5)
        await asyncio.gather(client(b, 20), _later(client(b, 20), 0.005))  # joins while a batch runs
        await b.stop()

    asyncio.run(main())
    assert sizes[:5] == [1] * 5
    assert sizes[-11:-1] == [2] * 10, sizes  # (the later client ends alone)


def test_cli_serve_subprocess_graceful_shutdown(env, tmp_path):
    """``redrec serve`` as a process: serve, then SIGTERM with requests in flight -> all answered, clean exit."""
    port = free_port()
    db = tmp_path / "history.db"
    cmd = [sys.executable, "-m", "redrec.cli", "serve", "--checkpoint", str(env["run"]), "--port", str(port),
           "--history", f"sqlite:///{db}", "--max-batch", "2", "--max-wait-ms", "1", "--batch-delay-ms", "300",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() - t0 < 60, "server did not become ready"
            time.sleep(0.1)
        events = wire_events(env["st"], 2, user="carol")
        assert httpx.post(url + "/v1/events", json={"events": events}).json()["accepted"] == len(events)
        first = httpx.post(url + "/v1/recommend", json={"user": "carol", "k": 5}, timeout=30).json()
        assert len(first["items"]) == 5 and first["n_history"] == len(events)

        results: list = [None] * 6

        def call(i: int) -> None:
            try:
                results[i] = httpx.post(url + "/v1/recommend", json={"user": "carol", "k": 5}, timeout=30)
            except Exception as e:  # noqa: BLE001
                results[i] = e

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.4)  # all six sent; batches of 2 x 300 ms: most still queued
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=30)
        rc = proc.wait(timeout=30)
        assert rc in (0, -signal.SIGTERM), rc
        for r in results:
            assert isinstance(r, httpx.Response) and r.status_code == 200, r
            assert r.json()["items"] == first["items"]
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/healthz", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open_history_store(f"sqlite:///{db}") as h:  # the events were durable
        assert len(h.get("carol")) == len(events)


def test_cli_serve_bad_arguments(env, tmp_path):
    from typer.testing import CliRunner

    from redrec.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--checkpoint", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such run" in r.output
    r = runner.invoke(app, ["serve", "--checkpoint", str(env["run"]), "--exact", "--index", str(tmp_path)])
    assert r.exit_code == 2 and "not both" in r.output
    r = runner.invoke(app, ["serve", "--checkpoint", str(env["run"]), "--history", "ftp://x"])
    assert r.exit_code == 2 and "history" in r.output
    r = runner.invoke(app, ["serve", "--checkpoint", str(env["run"] / "model")])
    assert r.exit_code == 2 and "run directory" in r.output
    r = runner.invoke(app, ["serve", "--checkpoint", str(env["run"]), "--device", "banana"])
    assert r.exit_code == 2 and "'device': 'banana' is not a torch device" in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["serve", "--checkpoint", str(env["run"]), "--device", "cuda"])
        assert r.exit_code == 2 and "'cuda' requested but" in r.output


def test_compile_without_a_working_cxx_compiler_is_a_clear_error(env, tmp_path, monkeypatch):
    """--compile needs a C++ compiler: none at all is refused before anything is loaded, and one that fails
    mid-compilation gives one line with the compiler's output (no inductor traceback), exit code 2 from the CLI."""
    import torch._inductor.config as inductor_config
    from typer.testing import CliRunner

    from redrec.cli import app
    from redrec.errors import ConfigError, RedrecError

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        Recommender.load(env["run"], compile=True)
    assert time.perf_counter() - t0 < 5  # refused before loading or compiling
    r = CliRunner().invoke(app, ["serve", "--checkpoint", str(env["run"]), "--compile"])
    assert r.exit_code == 2 and "needs a C++ compiler" in r.output and "Traceback" not in r.output

    # a model of its own shape: its kernels are compiled now (a model compiled earlier in this process would reuse
    # the kernels already built)
    run = tmp_path / "run"
    cfg = tiny_train_config(env["store"], run, **{"model.user_tower.hidden_size": 24, "model.embed_dim": 12})
    RedRec(resolve_model_config(cfg, env["st"])).eval().save_pretrained(run / "model")
    save_yaml(cfg, run / "config.yaml")
    fake = tmp_path / "fake-g++"  # answers --version, refuses to compile
    fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "g++ (fake) 12.2.0"; exit 0; fi\n'
                    'echo "fake compiler refuses" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(fake)))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # no cached kernels to reuse
    with pytest.raises(RedrecError, match="compiling the user tower .* failed: .*fake compiler refuses"):
        Recommender.load(run, compile=True)
