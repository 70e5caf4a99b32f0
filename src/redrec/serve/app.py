"""``redrec serve``: the HTTP service (FastAPI + uvicorn) around a :class:`~redrec.serve.recommender.Recommender`.

Endpoints (JSON in and out; the schema is at ``GET /openapi.json``, a browsable form at ``/docs``):

==============================  ====================================================================================
``POST /v1/events``             ``{"events": [{"user", "item", "scenario", "timestamp", "actions", "duration"}]}`` ->
                                ``{"accepted": n, "unknown_items": m}``: appended to the history store, durable
                                before the answer (items the store does not know are kept, and ignored by the model)
``POST /v1/recommend``          ``{"user": "u1"}`` (its stored history) or ``{"history": [events]}`` (inline), plus
                                ``k`` (1..1000, default 10), ``scenario`` (``null`` = all items, else the items seen in
                                that scenario in the training store), ``exclude_seen`` (default true), ``t_now`` ->
                                ``{"items": [{"id", "score", "interest", "interest_scenario"}], "model_version",
                                "n_history"}``
``POST /v1/embed/user``         the same input -> ``{"vectors": [[d floats] x K], "query_scenarios": [K names],
                                "model_version", "n_history"}``
``GET /healthz``                200 while the process runs
``GET /readyz``                 200 once the model and index are loaded and the batcher runs; 503 while shutting down
``GET /metrics``                Prometheus text format (:class:`~redrec.serve.metrics.ServeMetrics`)
``POST /v1/admin/reload``       ``{"checkpoint", "index", "item_embeddings", "exact"}``: load a new model / index in a
                                background thread and swap it in atomically; requests keep being answered meanwhile
                                (by the old model until the swap, by the new one after; a batch never mixes them)
==============================  ====================================================================================

Decisions:

* ``t_now`` (the time the time-gap features count back from) defaults to the history's last event timestamp, for
  stored and inline histories alike: responses are deterministic, and a user's vectors equal its ``latest``
  ``redrec embed users`` vectors.  Pass ``t_now`` (store time unit) to use another time, e.g. the wall clock.
* A user with no stored history (or an empty inline history) gets 200: the model runs on the empty sequence
  (its interest queries alone), a non-personalised answer; ``n_history`` is 0 so callers can tell.
* Bad requests get a 4xx with ``{"error": <code>, "message": <text>, "details": [{"field", "problem"}]}``: 400
  malformed JSON, 415 a body sent with a non-JSON ``Content-Type`` (none at all is read as JSON), 422 a schema violation (unknown field, wrong type, NaN/inf, ``k`` outside 1..1000, ``user`` and
  ``history`` both or neither given, unknown scenario or action), 413 a history over ``max_history`` events, an events
  batch over ``max_events`` or a body over ``max_body_bytes``.  Overload: 503 with ``Retry-After`` (seconds) when
  ``max_queue`` requests already wait, and while shutting down.
* Micro-batching (:mod:`redrec.serve.batcher`): recommend and embed requests arriving together share one history
  read, one user-tower forward and one search per candidate pool, in one worker thread.
* Shutdown (SIGTERM / Ctrl-C): uvicorn stops accepting connections and waits for the requests in flight; the batcher
  then drains its queue and the history store is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from redrec.errors import ConfigError, DataError, RedrecError
from redrec.serve.batcher import BatchInfo, MicroBatcher, Overloaded
from redrec.serve.history import (
    MAX_NAME_LEN,
    MAX_TIMESTAMP,
    Event,
    EventColumns,
    HistoryError,
    HistoryStore,
    item_lookup,
)
from redrec.serve.metrics import CONTENT_TYPE, ServeMetrics
from redrec.serve.recommender import Answer, Query, Recommender

log = logging.getLogger("redrec.serve")

MAX_K = 1000


@dataclass
class ServeConfig:
    """Limits and batching of the service.

    Attributes:
        max_batch: most requests per micro-batch (one user-tower forward).
        max_wait_ms: longest wait for a micro-batch to fill, milliseconds.
        max_queue: most requests waiting for a batch; more are answered 503 at once.
        max_history: most events in an inline history (413 above).
        max_events: most events in one ``POST /v1/events`` (413 above).
        max_body_bytes: largest request body (413 above; ``Content-Length`` is checked before reading, a chunked
            body while it streams in).
        admin_token: when set, ``/v1/admin/*`` requires ``Authorization: Bearer <token>``.
        batch_delay_ms: extra sleep per batch in the worker (testing overload and shutdown only).
    """

    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_history: int = 10_000
    max_events: int = 10_000
    max_body_bytes: int = 16 << 20
    admin_token: str | None = None
    batch_delay_ms: float = 0.0

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "max_history", "max_events", "max_body_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError("command line", name, f"must be an integer >= 1, got {v!r}")
        for name in ("max_wait_ms", "batch_delay_ms"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError("command line", name, f"must be a number >= 0, got {v!r}")


# ------------------------------------------------------------------------------------------------------------------
# request / response schema
# ------------------------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class HistoryEventIn(_Strict):
    """One past interaction of an inline history."""

    item: str = Field(min_length=1, max_length=MAX_NAME_LEN, description="External item id.")
    scenario: str = Field(min_length=1, max_length=MAX_NAME_LEN, description="Scenario name (homefeed, ads, ...).")
    timestamp: int = Field(ge=0, le=MAX_TIMESTAMP, description="Unix seconds (or the store's ordinal unit).")
    actions: list[str] = Field(default_factory=list, description="Engagement flags, e.g. [\"click\", \"like\"].")
    duration: float = Field(0.0, ge=0, allow_inf_nan=False, description="Dwell seconds (0 = unknown).")

    def event(self) -> Event:
        return Event(self.item, self.scenario, self.timestamp, tuple(self.actions), float(self.duration))


class EventIn(HistoryEventIn):
    """One interaction of a user, to append to its history."""

    user: str = Field(min_length=1, max_length=MAX_NAME_LEN, description="External user id.")


class EventsRequest(_Strict):
    events: list[EventIn] = Field(description="Events to append (any users, any order).")


class EventsResponse(BaseModel):
    accepted: int = Field(description="Events written (durable).")
    unknown_items: int = Field(0, description="Of those, events whose item the training store does not know.")


class UserInputIn(_Strict):
    user: str | None = Field(None, min_length=1, max_length=MAX_NAME_LEN,
                             description="Use this user's stored history (give user or history).")
    history: list[HistoryEventIn] | None = Field(None, description="Inline history, any order (sorted by time here).")
    t_now: int | None = Field(None, ge=0, le=MAX_TIMESTAMP,
                              description="Prediction time for the time-gap features (default: the last event's).")


class RecommendRequest(UserInputIn):
    k: int = Field(10, ge=1, le=MAX_K, description="Number of items.")
    scenario: str | None = Field(None, min_length=1, max_length=MAX_NAME_LEN,
                                 description="Only items seen in this scenario in the training store (null = all).")
    exclude_seen: bool = Field(True, description="Never recommend the history's items.")


class EmbedRequest(UserInputIn):
    pass


class RecommendedItem(BaseModel):
    id: str
    score: float = Field(description="max over the K interests of the cosine similarity.")
    interest: int = Field(description="Index of the interest vector that scored the item best.")
    interest_scenario: str = Field(description="Scenario of that interest's query.")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    model_version: str
    n_history: int = Field(description="History events the model used (items known to the store).")


class EmbedResponse(BaseModel):
    vectors: list[list[float]] = Field(description="K unit interest vectors of d floats.")
    query_scenarios: list[str] = Field(description="Scenario of each interest vector.")
    model_version: str
    n_history: int


class ReloadRequest(_Strict):
    checkpoint: str | None = Field(None, min_length=1, description="Run directory (default: the current one).")
    index: str | None = Field(None, min_length=1, description="FAISS index directory (default: the current one "
                              "when the checkpoint is unchanged, else the exact engine).")
    item_embeddings: str | None = Field(None, min_length=1, description="Merged `redrec embed items` directory of "
                                        "the new model (default: computed from the model).")
    exact: bool = Field(False, description="Use the exact engine (drop the index).")


class ReloadResponse(BaseModel):
    model_version: str
    previous_model_version: str
    retrieval: str
    seconds: float


class ErrorDetail(BaseModel):
    field: str
    problem: str


class ErrorResponse(BaseModel):
    error: str
    message: str
    details: list[ErrorDetail] = []


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON."},
    415: {"model": ErrorResponse, "description": "Not a JSON body."},
    413: {"model": ErrorResponse, "description": "History, events batch or body too large."},
    422: {"model": ErrorResponse, "description": "Invalid request (schema, unknown scenario or action)."},
    503: {"model": ErrorResponse, "description": "Overloaded or shutting down (see Retry-After)."},
}


class ApiError(Exception):
    """An error answered as ``{"error", "message", "details"}`` with ``status``."""

    def __init__(self, status: int, error: str, message: str, details: Sequence[dict[str, str]] = (),
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.details = list(details)
        self.headers = headers


def _error_response(status: int, error: str, message: str, details: Sequence[dict[str, str]] = (),
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, "details": list(details)}, status_code=status,
                        headers=headers)


def _json(body: dict) -> Response:
    """A JSON response built from plain values the route made itself (finite floats, str, int): serialised
    with orjson (about 10x faster than ``json`` on a 100-item list), skipping FastAPI's re-validation against the
    ``response_model`` (which still documents it in the OpenAPI schema)."""
    return Response(orjson.dumps(body), media_type="application/json")


def _loc(loc: Sequence[Any]) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _redrec_message(e: Exception) -> str:
    """A client-facing message of a redrec error: the field and the problem, no server paths or library hints."""
    if isinstance(e, (DataError, ConfigError, HistoryError)):
        return f"field '{e.field}': {e.problem}"
    return str(e)


# ------------------------------------------------------------------------------------------------------------------
# the service
# ------------------------------------------------------------------------------------------------------------------
class HistoryUnavailable(RuntimeError):
    """The history store failed to answer a read (503)."""


@dataclass
class Job:
    """One queued recommend / embed request: a stored user's history or an inline one."""

    kind: str
    user: str | None
    history: list[Event] | None
    k: int = 10
    scenario: str | None = None
    exclude_seen: bool = True
    t_now: int | None = None


class Service:
    """The state behind the routes: the current recommender (swapped by reload), the history store, the batcher,
    the metrics."""

    def __init__(self, recommender: Recommender, history: HistoryStore, config: ServeConfig):
        config.validate()
        self.recommender = recommender
        self.history = history
        self.config = config
        self.batcher: MicroBatcher[Job, Answer] = MicroBatcher(
            self._run_batch, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, max_queue=config.max_queue,
            on_batch=self._on_batch, name="redrec-batch",
        )
        self.metrics = ServeMetrics(queue_depth=lambda: self.batcher.queue_depth)
        self.ready = False
        self.reload_lock = asyncio.Lock()
        self._publish_model()

    def _publish_model(self) -> None:
        rec = self.recommender
        self.metrics.model_info.clear()
        self.metrics.model_info.set(1, model_version=rec.model_version, retrieval=rec.retrieval)
        self.metrics.index_items.clear()
        for pool, n in rec.pool_sizes().items():
            self.metrics.index_items.set(n, pool=pool)

    # -- the batch function (worker thread) ------------------------------------------------------------------------
    def _run_batch(self, jobs: list[Job]) -> list[Answer | Exception]:
        rec = self.recommender  # one model for the whole batch, even if a reload swaps it meanwhile
        users = [j.user for j in jobs if j.user is not None]
        stored: dict[int, EventColumns] = {}
        failed: Exception | None = None
        if users:
            t0 = time.perf_counter()
            try:
                got = self.history.get_many_columns(users)
            except Exception as e:  # the store is down: those requests fail (503), inline ones go on
                log.exception("history store read failed")
                failed = HistoryUnavailable(f"the history store could not be read ({type(e).__name__}: {e})")
            else:
                stored = dict(zip([i for i, j in enumerate(jobs) if j.user is not None], got, strict=True))
            self.metrics.history_fetch.observe(time.perf_counter() - t0)
        live = [i for i, j in enumerate(jobs) if failed is None or j.user is None]
        queries = []
        for i in live:
            j = jobs[i]
            events = stored[i] if j.user is not None else j.history
            queries.append(Query(events, j.kind, j.k, j.scenario, j.exclude_seen, j.t_now, j.user or "",  # type: ignore[arg-type]
                                 trusted=j.user is not None))
        timings: dict[str, float] = {}
        answers = rec.answer(queries, timings)
        out: list[Answer | Exception] = [failed] * len(jobs)  # type: ignore[list-item]
        for i, a in zip(live, answers, strict=True):
            out[i] = a
        self.metrics.user_tower.observe(timings.get("user_tower", 0.0))
        if "retrieval" in timings and any(j.kind == "recommend" for j in jobs):
            self.metrics.index_search.observe(timings["retrieval"])
        if self.config.batch_delay_ms:
            time.sleep(self.config.batch_delay_ms / 1000.0)
        return out

    def _on_batch(self, info: BatchInfo) -> None:
        self.metrics.batch_size.observe(info.size)
        for w in info.queue_wait:
            self.metrics.queue_wait.observe(w)

    # -- request helpers -------------------------------------------------------------------------------------------
    def job(self, kind: str, req: UserInputIn) -> Job:
        if (req.user is None) == (req.history is None):
            raise ApiError(422, "invalid_request", "give exactly one of 'user' (stored history) or 'history' "
                           "(inline events)", [{"field": "user", "problem": "give user or history, not both"
                                                if req.user is not None else "user or history is required"}])
        if req.history is not None and len(req.history) > self.config.max_history:
            raise ApiError(413, "history_too_large", f"the history has {len(req.history)} events; at most "
                           f"{self.config.max_history} (max_history)", [{"field": "history", "problem": "too many events"}])
        history = None if req.history is None else [e.event() for e in req.history]
        scenario = getattr(req, "scenario", None)
        if scenario is not None and scenario not in self.recommender.scenarios:
            raise ApiError(422, "invalid_request", f"unknown scenario {scenario!r}; this store has "
                           f"{self.recommender.scenarios}", [{"field": "scenario", "problem": "unknown scenario"}])
        return Job(kind, req.user, history, getattr(req, "k", 10), scenario, getattr(req, "exclude_seen", True), req.t_now)

    async def submit(self, job: Job) -> Answer:
        try:
            return await self.batcher.submit(job)
        except Overloaded as e:
            self.metrics.rejected.inc(reason=e.reason)
            raise ApiError(503, e.reason, str(e), headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from None
        except HistoryUnavailable as e:
            raise ApiError(503, "history_unavailable", str(e), headers={"Retry-After": "1"}) from None
        except (HistoryError, RedrecError) as e:  # a bad history (unknown scenario / action, invalid event)
            field = getattr(e, "field", None) or "history"
            raise ApiError(422, "invalid_request", _redrec_message(e),
                           [{"field": f"history.{field}", "problem": getattr(e, "problem", str(e))}]) from None

    def check_events(self, events: list[EventIn]) -> None:
        """422 for an unknown scenario or action (before anything is stored)."""
        rec = self.recommender
        scen, acts = set(rec.scenarios), set(rec.store.actions_names)
        for i, e in enumerate(events):
            if e.scenario not in scen:
                raise ApiError(422, "invalid_request", f"events[{i}].scenario: unknown scenario {e.scenario!r}; this "
                               f"store has {rec.scenarios}", [{"field": f"events[{i}].scenario", "problem": "unknown scenario"}])
            for a in e.actions:
                if a not in acts:
                    raise ApiError(422, "invalid_request", f"events[{i}].actions: unknown action {a!r}; this store has "
                                   f"{rec.store.actions_names}", [{"field": f"events[{i}].actions", "problem": "unknown action"}])

    def readiness(self) -> tuple[bool, str]:
        if not self.ready:
            return False, "starting"
        if not self.batcher.running:
            return False, "shutting_down"
        return True, "ready"


_ENDPOINTS = ("/v1/events", "/v1/recommend", "/v1/embed/user", "/v1/admin/reload", "/healthz", "/readyz", "/metrics",
              "/openapi.json", "/docs")


class _Observe:
    """ASGI middleware: request counts and latency per endpoint and status, in-flight gauge, body size limit."""

    def __init__(self, app: Any, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.service.metrics
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        limit = self.service.config.max_body_bytes
        received = 0

        async def receive_limited() -> dict:  # a chunked body over the limit: 413 from the HTTPException handler
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413)
            return message

        t0 = time.perf_counter()
        m.inflight.inc()
        try:
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:  # refused before reading
                resp = _error_response(413, "body_too_large", f"the request body has {int(length)} bytes; at most "
                                       f"{limit} (max_body_bytes)")
                await resp(scope, receive, send_wrapper)
            elif (endpoint == "/v1/recommend" and scope.get("method") == "POST" and length is not None
                  and length.isdigit() and b"json" in headers.get(b"content-type", b"").lower()):
                await self._recommend(scope, receive, send_wrapper, int(length))
            else:
                await self.app(scope, receive_limited, send_wrapper)
        finally:
            m.inflight.dec()
            m.requests.inc(endpoint=endpoint, status=str(status[0]))
            m.latency.observe(time.perf_counter() - t0, endpoint=endpoint)


    async def _recommend(self, scope: dict, receive: Any, send: Any, length: int) -> None:
        """``POST /v1/recommend`` without FastAPI's routing and dependency layers (about a third of the event
        loop's work per request), for a JSON body of known length that validates.  Anything else -- malformed
        JSON, an invalid field, a client gone before the body arrived -- is handed to the full stack with the body
        replayed, so every error is answered exactly as the route answers it."""
        chunks = []
        received = 0
        more = True
        first: dict | None = None
        while more and received <= length:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # a disconnect: the full stack sees it
                break
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            more = message.get("more_body", False)
        body = b"".join(chunks)
        svc = self.service
        job = None
        if first is None and not more:
            try:
                job = svc.job("recommend", RecommendRequest.model_validate(orjson.loads(body)))
            except Exception:  # noqa: BLE001 - answered by the full stack below
                job = None
        if job is None:
            replayed = [first or {"type": "http.request", "body": body, "more_body": more}]

            async def replay() -> dict:
                return replayed.pop() if replayed else await receive()

            await self.app(scope, replay, send)
            return
        try:
            ans = await svc.submit(job)
        except ApiError as e:
            await _error_response(e.status, e.error, e.message, e.details, e.headers)(scope, receive, send)
            return
        payload = orjson.dumps(_recommend_body(ans))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def _prepare_history(history: HistoryStore, store: Any) -> None:
    """:meth:`HistoryStore.prepare` (e.g. the history's item ids mapped to the model's once, not in the first
    requests); a failure is logged, not raised: the requests then do the work, or report the store's error."""
    try:
        history.prepare(store)
    except Exception as e:  # noqa: BLE001 - an optimisation: the service works without it
        log.warning("history store not prepared for the model's store (%s: %s)", type(e).__name__, e)


def _recommend_body(ans: Answer) -> dict:
    """The ``POST /v1/recommend`` response of an answer (:class:`RecommendResponse`)."""
    return {"items": ans.items.as_dicts() if ans.items is not None else [], "model_version": ans.model_version,
            "n_history": ans.n_history}


def create_app(recommender: Recommender, history: HistoryStore, config: ServeConfig | None = None, *,
               close_history: bool = True) -> FastAPI:
    """The FastAPI app serving ``recommender`` with ``history`` (closed at shutdown when ``close_history``).

    The app's :class:`Service` is ``app.state.service`` (``service.recommender`` is the model being served).
    """
    cfg = config or ServeConfig()
    svc = Service(recommender, history, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.batcher.start()
        await asyncio.to_thread(_prepare_history, history, svc.recommender.store)
        # the loaded model, store and index are millions of long-lived objects: keep them out of the cyclic
        # collector, whose full passes over them took 20-140 ms each (seen as latency spikes under load)
        gc.collect()
        gc.freeze()
        svc.ready = True
        log.info("serving %s (%s, %d items)", svc.recommender.model_version, svc.recommender.retrieval,
                 svc.recommender.n_items)
        try:
            yield
        finally:
            svc.ready = False
            await svc.batcher.stop(drain=True)
            if close_history:
                with contextlib.suppress(Exception):
                    history.close()

    app = FastAPI(title="redrec", summary="RED-Rec recommendation service", version="1", lifespan=lifespan,
                  strict_content_type=False)
    app.state.service = svc
    app.add_middleware(_Observe, service=svc)

    # -- errors ----------------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e.status, e.error, e.message, e.details, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        ctype = request.headers.get("content-type", "")
        if ctype and "json" not in ctype.lower() and any(tuple(err.get("loc", ())) == ("body",) for err in errs):
            return _error_response(415, "unsupported_media_type", f"the body must be JSON (Content-Type: "
                                   f"application/json), got Content-Type {ctype!r}")
        if any(err.get("type") == "json_invalid" for err in errs):
            err = next(err for err in errs if err.get("type") == "json_invalid")
            why = (err.get("ctx") or {}).get("error", "")
            return _error_response(400, "malformed_json", f"the body is not valid JSON{': ' + str(why) if why else ''}")
        details = [{"field": _loc(err.get("loc", ())), "problem": str(err.get("msg", ""))} for err in errs]
        msg = "; ".join(f"{d['field']}: {d['problem']}" for d in details[:5])
        if len(details) > 5:
            msg += f"; ... ({len(details)} problems)"
        return _error_response(422, "invalid_request", msg, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 413:  # a streamed (chunked) body over the limit
            return _error_response(413, "body_too_large", f"the request body is larger than {cfg.max_body_bytes} "
                                   "bytes (max_body_bytes)")
        return _error_response(e.status_code, "http_error", str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error_response(500, "internal_error", f"{type(e).__name__}: {e}")

    # -- routes ----------------------------------------------------------------------------------------------------
    @app.post("/v1/events", response_model=EventsResponse, responses=_ERRORS, tags=["history"])
    async def post_events(body: EventsRequest) -> dict:
        """Append events to the users' histories; durable when answered."""
        if len(body.events) > cfg.max_events:
            raise ApiError(413, "too_many_events", f"{len(body.events)} events in one request; at most "
                           f"{cfg.max_events} (max_events)", [{"field": "events", "problem": "too many events"}])
        svc.check_events(body.events)
        pairs = [(e.user, e.event()) for e in body.events]
        rec = svc.recommender
        known = item_lookup(rec.store)([e.item for e in body.events])
        try:
            n = await run_in_threadpool(history.append_many, pairs)
        except HistoryError as e:
            raise ApiError(422 if e.field != "events" else 413, "invalid_request", str(e),
                           [{"field": f"events[{e.index}].{e.field}" if e.index is not None else e.field,
                             "problem": e.problem}]) from None
        svc.metrics.events.inc(n)
        return {"accepted": n, "unknown_items": int((known < 0).sum())}

    @app.post("/v1/recommend", response_model=RecommendResponse, responses=_ERRORS, tags=["recommend"])
    async def recommend(body: RecommendRequest) -> Response:
        """The best ``k`` items for a stored or inline history."""
        ans = await svc.submit(svc.job("recommend", body))
        return _json(_recommend_body(ans))

    @app.post("/v1/embed/user", response_model=EmbedResponse, responses=_ERRORS, tags=["recommend"])
    async def embed_user(body: EmbedRequest) -> Response:
        """The K unit interest vectors of a stored or inline history."""
        ans = await svc.submit(svc.job("embed", body))
        return _json({"vectors": ans.vectors.tolist(), "query_scenarios": list(ans.query_scenarios),
                      "model_version": ans.model_version, "n_history": ans.n_history})

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "Starting or shutting down."}})
    async def readyz() -> JSONResponse:
        """Model and index loaded, batcher running."""
        ok, status = svc.readiness()
        rec = svc.recommender
        return JSONResponse({"status": status, "model_version": rec.model_version, "retrieval": rec.retrieval,
                             "items": rec.n_items}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text exposition format."""
        return PlainTextResponse(svc.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/admin/reload", response_model=ReloadResponse, responses={**_ERRORS, 409: {"model": ErrorResponse}},
              tags=["ops"])
    async def reload(body: ReloadRequest, request: Request) -> dict:
        """Load a new model / index in the background and swap it in; requests are answered throughout."""
        if cfg.admin_token and request.headers.get("authorization") != f"Bearer {cfg.admin_token}":
            raise ApiError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <admin token>'")
        if svc.reload_lock.locked():
            raise ApiError(409, "reload_in_progress", "a reload is already running")
        async with svc.reload_lock:
            old = svc.recommender
            t0 = time.perf_counter()
            try:
                new = await asyncio.to_thread(old.reload, body.checkpoint, index=body.index,
                                              item_embeddings=body.item_embeddings, exact=body.exact)
                await asyncio.to_thread(_prepare_history, svc.history, new.store)
            except RedrecError as e:
                svc.metrics.reloads.inc(result="error")
                raise ApiError(422, "reload_failed", f"{e}; still serving {old.model_version}") from None
            except Exception as e:
                svc.metrics.reloads.inc(result="error")
                log.exception("reload failed")
                raise ApiError(500, "reload_failed", f"{type(e).__name__}: {e}; still serving {old.model_version}") from None
            svc.recommender = new  # atomic: the next batch uses the new model
            svc._publish_model()
            gc.freeze()  # the new model's objects, as at start-up
            svc.metrics.reloads.inc(result="ok")
            log.info("reloaded: %s -> %s", old.model_version, new.model_version)
            return {"model_version": new.model_version, "previous_model_version": old.model_version,
                    "retrieval": new.retrieval, "seconds": time.perf_counter() - t0}

    return app


def serve(
    checkpoint: str | Path, *, store: str | Path | None = None, index: str | Path | None = None,
    item_embeddings: str | Path | None = None, history: str = ":memory:", history_per_scenario: int | None = None,
    host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None, device: str = "cpu",
    log_level: str = "info", access_log: bool = False, precision: str = "float32", threads: int | None = None,
    search_threads: int = 0, index_probe: str = "per_vector", index_nprobe: int | None = None, compile: bool = False,
    index_precision: str = "float32", precompute_items: bool | None = None,
) -> None:
    """Load everything (errors are raised before the port opens), then run uvicorn until SIGINT / SIGTERM.

    ``threads``: torch intra-op threads of the user tower (``None`` = torch's default, the cores);
    ``precision`` / ``search_threads`` / ``index_probe`` / ``index_nprobe`` / ``compile`` / ``index_precision`` /
    ``precompute_items``: see :meth:`Recommender.load`.
    numpy's BLAS is held to one thread in this process: its worker threads busy-wait after each call, which takes
    a core from the user tower and the index search running next (the small matrices here gain nothing from them).
    """
    import torch
    import uvicorn

    cfg = config or ServeConfig()
    cfg.validate()
    if threads is not None:
        if threads < 1:
            raise ConfigError("command line", "threads", f"must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    if search_threads < 0:
        raise ConfigError("command line", "search_threads", f"must be >= 0 (0 = automatic), got {search_threads}")
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")

    from redrec.serve.history import open_history_store
    from redrec.serve.recommender import history_cap

    rec = Recommender.load(checkpoint, store, index=index, item_embeddings=item_embeddings, device=device,
                           precision=precision, search_threads=search_threads, index_probe=index_probe,
                           index_nprobe=index_nprobe, compile=compile, index_precision=index_precision,
                           precompute_items=precompute_items)
    threadpool_limits(1, user_api="blas")  # again: the BLAS libraries loaded meanwhile (numba's np.dot: scipy's)
    per = history_per_scenario or history_cap(rec.mixing)
    try:
        hist = open_history_store(history, per, max_events_per_append=cfg.max_events)
    except HistoryError as e:
        raise ConfigError("command line", "history", e.problem) from None
    except (ConnectionError, OSError) as e:
        raise ConfigError("command line", "history", str(e)) from None
    app = create_app(rec, hist, cfg)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                                           lifespan="on", timeout_graceful_shutdown=60))
    server.run()
