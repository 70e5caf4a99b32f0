"""The serving core, without HTTP: load a trained run, turn histories into interest vectors, retrieve items.

    rec = Recommender.load("runs/r1")                     # model + the run's store + exact engine
    rec = Recommender.load("runs/r1", index="runs/r1/items.index", item_embeddings="runs/r1/emb-items")
    vecs = rec.user_vectors([events_a, events_b])         # float32 [B, K, d] unit interest vectors
    lists = rec.recommend([events_a], k=10, scenario="ads")   # per history: Recommendations (a sequence of
                                                              # Recommendation(id, index, score, interest, ...))

Inputs are built exactly as in training and evaluation: history events (:class:`redrec.serve.history.Event`,
oldest first) -> :func:`redrec.serve.history.to_user_events` (item ids to store indices; events of items the
store does not know are dropped) -> :func:`redrec.mixing.mix` with the run's mixing config and cutoff = the number
of events -> :func:`redrec.data.batching.user_sequence` with the run's feature config -> ``collate`` -> the model's
``interests``.  The prediction time ``t_now`` (the time-gap features count back from it) is **the last event's
timestamp** unless the caller gives one: the ``latest`` case of ``redrec embed users``, and deterministic (the same
history always gives the same vectors).  An empty history is valid: the model then runs on its queries alone.

Scores: ``score(item) = max_k cos(u_k, v_item)`` over the K interest vectors; ``interest`` is the k that attains the
max (argmax over K of the float32 cosines; the lowest k on a tie) and ``interest_scenario`` the scenario of that query.

Candidate pools: all items (the FAISS index given with ``index=``, else the exact engine
:func:`redrec.retrieval.engine.search` over the item vectors), and per scenario the items seen in that scenario in
the store, precomputed at load time and always searched exactly (ids mapped back to store item indices).  A
per-scenario pool holds a copy of its items' vectors (``n_s * d * 4`` bytes) unless it covers every item.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, overload

import numpy as np

from redrec.data.store import EventStore, UserEvents
from redrec.errors import ConfigError, DataError, RedrecError
from redrec.serve.history import (
    Event,
    EventColumns,
    EventRow,
    HistoryError,
    columns_to_user_events,
    rows_to_user_events,
    to_user_events,
)


class Recommendation(NamedTuple):
    """One recommended item (what indexing or iterating :class:`Recommendations` gives).

    Attributes:
        id: the store's external item id.
        index: the store item index.
        score: ``max_k cos(u_k, v_item)`` (float64 cosine rounded to float32 for the exact engine; the index's
            score for a FAISS index).
        interest: which of the K interest vectors attains the max (0-based).
        interest_scenario: the scenario of that interest's query.
    """

    id: str
    index: int
    score: float
    interest: int
    interest_scenario: str


class Recommendations(Sequence[Recommendation]):
    """One user's recommendations, best first, kept column by column: a sequence of :class:`Recommendation` made
    on access, so the service writes its JSON answer (:meth:`as_dicts`) without one Python object per item first
    (800 named tuples per batch of 8 x 100 items took ~0.5 ms of the batch's ~10 ms).

    Attributes:
        ids: external item ids; ``indices``: store item indices; ``scores``: as :attr:`Recommendation.score`;
        ``interests``: the winning interest of each item; ``query_scenarios``: the scenario of each interest.
    """

    __slots__ = ("ids", "indices", "scores", "interests", "query_scenarios")

    def __init__(self, ids: list[str], indices: list[int], scores: list[float], interests: list[int],
                 query_scenarios: Sequence[str]):
        self.ids, self.indices, self.scores, self.interests = ids, indices, scores, interests
        self.query_scenarios = query_scenarios

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> Recommendation: ...
    @overload
    def __getitem__(self, i: slice) -> Recommendations: ...
    def __getitem__(self, i: int | slice) -> Recommendation | Recommendations:
        if isinstance(i, slice):
            return Recommendations(self.ids[i], self.indices[i], self.scores[i], self.interests[i],
                                   self.query_scenarios)
        w = self.interests[i]
        return Recommendation(self.ids[i], self.indices[i], self.scores[i], w, self.query_scenarios[w])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Recommendations({list(self)!r})"

    def as_dicts(self) -> list[dict[str, Any]]:
        """``[{"id", "score", "interest", "interest_scenario"}, ...]``: the items of a ``/v1/recommend`` answer."""
        scen = self.query_scenarios
        return [{"id": i, "score": s, "interest": w, "interest_scenario": scen[w]}
                for i, s, w in zip(self.ids, self.scores, self.interests, strict=True)]


@dataclass
class UserInput:
    """One history converted for the model.

    Attributes:
        user: the events the store knows, oldest first (:class:`UserEvents`, store indices).
        t_now: prediction time (store time unit): the given one, else the last kept event's timestamp (0 if none).
        n_given: events given.
        info: what :func:`to_user_events` reported (e.g. how many unknown items were dropped).
    """

    user: UserEvents
    t_now: int
    n_given: int
    info: dict = field(default_factory=dict)

    @property
    def n_history(self) -> int:
        """Events the model may use (the known ones)."""
        return len(self.user)

    @property
    def seen(self) -> np.ndarray:
        """int64 sorted unique store indices of the history's items."""
        return np.unique(np.asarray(self.user.item, dtype=np.int64))


@dataclass
class Query:
    """One request of a micro-batch (see :meth:`Recommender.answer`).

    Attributes:
        events: the history (events oldest first) or an already converted :class:`UserInput`.
        kind: ``recommend`` (vectors + items) or ``embed`` (vectors only).
        k: list length (recommend).
        scenario: restrict the candidates to the items seen in this scenario (``None`` = all items).
        exclude_seen: never return the history's items.
        t_now: prediction time (``None`` = the last event's timestamp).
        user_id: for messages only.
        trusted: ``events`` were read back from a :class:`HistoryStore` (:meth:`HistoryStore.get_many_columns`
            or ``get_many_rows``: checked when appended), converted with :meth:`prepare_rows` and not validated
            again.
    """

    events: Sequence[Event] | Sequence[EventRow] | EventColumns | UserInput
    kind: Literal["recommend", "embed"] = "recommend"
    k: int = 10
    scenario: str | None = None
    exclude_seen: bool = True
    t_now: int | None = None
    user_id: str = ""
    trusted: bool = False


@dataclass
class Answer:
    """The result of one :class:`Query`.

    Attributes:
        vectors: float32 ``[K, d]`` unit interest vectors.
        items: the recommendations, best first (``None`` for ``embed``).
        n_history: events the model used (known items).
        n_given: events given.
        model_version: the model that answered.
        query_scenarios: the scenario of each of the K interest vectors.
    """

    vectors: np.ndarray
    items: Recommendations | None
    n_history: int
    n_given: int
    model_version: str
    query_scenarios: list[str] = field(default_factory=list)


PRECISIONS = ("float32", "bfloat16")


class Pool:
    """A candidate pool: store item indices ``ids`` (``None`` = every item, row = item index), their unit vectors
    ``[n, d]`` float32, and a FAISS :class:`redrec.retrieval.index.Index` over them (``None`` = exact engine)."""

    def __init__(self, name: str, vectors: np.ndarray, ids: np.ndarray | None = None, index: Any = None,
                 engine_config: Any = None):
        self.name = name
        self.vectors = vectors
        self.ids = ids
        self.index = index
        self.engine_config = engine_config

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def _local(self, seen: np.ndarray) -> np.ndarray:
        """Store item indices -> rows of this pool (items not in it are left out)."""
        seen = np.asarray(seen, dtype=np.int64)
        if self.ids is None:
            return seen[(seen >= 0) & (seen < len(self))]
        pos = np.searchsorted(self.ids, seen)
        ok = pos < len(self.ids)
        ok[ok] = self.ids[pos[ok]] == seen[ok]
        return pos[ok]

    def search(self, users: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Top ``k`` of ``users`` ``[B, K, d]``; returns ``(store item indices int64 [B, k], scores float32 [B, k],
        interests)``, best first, padded with ``-1`` / ``-inf`` when the pool has fewer eligible items;
        ``interests`` (int64 ``[B, k]``, the winning vector of each item) when the index computed them (the joint
        probe's bfloat16 scan), else ``None``."""
        B = users.shape[0]
        out_i = np.full((B, k), -1, np.int64)
        out_s = np.full((B, k), -np.inf, np.float32)
        if B == 0 or len(self) == 0:
            return out_i, out_s, None
        ex = None if exclude is None else [self._local(e) for e in exclude]
        which: np.ndarray | None = None
        if self.index is not None:
            which = np.empty((B, k), np.int64)
            ids, scores = self.index.search(users, k, exclude=ex, interests=which)
            if ((which < 0) & (ids >= 0)).any():  # not computed by this index
                which = None
        else:
            from redrec.retrieval.engine import search

            ids, scores = search(users, self.vectors, k, ex, config=self.engine_config, items_normalized=True)
        n = ids.shape[1]
        out_i[:, :n], out_s[:, :n] = ids, scores
        if self.ids is not None:
            ok = out_i >= 0
            out_i[ok] = self.ids[out_i[ok]]
        return out_i, out_s, which


def scenario_items(store: EventStore, chunk: int = 1 << 24) -> dict[str, np.ndarray]:
    """Per scenario name, int64 sorted unique item indices of the store's events in that scenario (one chunked
    pass over the events; ``n_scenarios * n_items`` bytes of scratch)."""
    S, N = len(store.scenarios), store.n_items
    seen = np.zeros((S, max(N, 1)), bool)
    for a in range(0, store.n_events, chunk):
        seen[np.asarray(store.scenario[a : a + chunk], np.int64), np.asarray(store.item[a : a + chunk], np.int64)] = True
    return {s: np.flatnonzero(seen[i, :N]).astype(np.int64) for i, s in enumerate(store.scenarios)}


def _check_compiler() -> None:
    """``compile=True`` needs a C++ compiler (inductor builds the tower's kernels with it): a clear error now, not
    a compiler search's traceback at the first forward."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # another torch layout: the compilation itself reports
        return
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as e:
        raise ConfigError("serving", "compile", f"torch.compile of the user tower needs a C++ compiler and none works "
                          f"({e}); install one (e.g. apt install g++) or name it in CXX, or serve without "
                          f"compiling (no --compile)") from None


def _frozen(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """``compiled`` (a ``torch.compile`` d module) called with inductor's ``freezing`` on, so a compilation it
    triggers (the first call, a new shape) treats the weights as constants.  Torch's config values are per thread
    (context variables): a hot reload compiling in another thread neither sees nor ends this patch."""
    from torch._inductor import config as inductor_config

    def forward(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return forward


def _compile_failure(e: Exception) -> str:
    """One line on a failed compilation: the error's first line, and the compiler's output when it has one."""
    text = str(e).strip()
    why = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
    _, sep, output = text.partition("\nOutput:\n")  # inductor's C++ compile errors: Command, then Output
    if sep:
        why += f" (compiler output: {output.split('Set TORCHDYNAMO_VERBOSE')[0].strip()[:800]})"
    return why


def history_cap(mixing: Any) -> int:
    """Events per scenario a history store must keep so that :func:`redrec.mixing.mix` sees what it would see on the
    whole history: the sequence budget or the sum of the quotas, whichever is larger."""
    return max(int(mixing.last_n), sum((mixing.quotas or {}).values()))


class Recommender:
    """A loaded model, its store, item vectors and candidate pools; immutable once built (hot reload builds a new
    one with :meth:`reload` and the caller swaps the reference).

    Use :meth:`load`.  Attributes: ``model`` (eval mode), ``store``, ``mixing``, ``features``, ``item_vectors``
    (float32 ``[n_items, d]`` unit rows, row = item index), ``pools`` (``None`` -> all items, scenario name -> its
    items), ``model_version``, ``sources`` (the paths it was loaded from).
    """

    def __init__(self, model: Any, store: EventStore, mixing: Any, features: Any, item_vectors: np.ndarray, *,
                 index: Any = None, subsets: dict[str, np.ndarray] | None = None, model_version: str = "",
                 sources: dict[str, Any] | None = None, engine_config: Any = None, precision: str = "float32",
                 compile: bool = False, precompute_items: bool | None = None):
        import torch

        if precision not in PRECISIONS:
            raise ConfigError("serving", "precision", f"must be one of {list(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.model = model.eval()
        # torch.compile with dynamic shapes; batches are padded to >= 2 users and >= 2 events (see user_vectors)
        # because sizes 0 and 1 get graphs of their own, each a compilation of tens of seconds
        self.compiled = bool(compile)
        # "cpp_wrapper" calls the kernels from C++ instead of a Python wrapper; inductor "freezing" folds the
        # weights (and their bfloat16 casts) into the graph as constants and prepacks the linear layers for oneDNN.
        # Freezing must be on while dynamo traces (passed in torch.compile's options it is not: dynamo then lifts
        # the weights to graph inputs and nothing is frozen), so every call runs under the config patch (~15 us).
        # A forward of 8 users of the default model in bfloat16: 3.0-3.2 ms frozen against 3.7-4.2 ms not, here.
        self._forward = _frozen(torch.compile(self.model, dynamic=True, options={"cpp_wrapper": True})) if compile \
            else self.model
        self.device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
        self.store = store
        self.mixing = mixing
        self.features = features
        self.item_vectors = item_vectors
        self.model_version = model_version
        self.sources = dict(sources or {})
        self.subsets = subsets if subsets is not None else scenario_items(store)
        self.scenarios = list(store.scenarios)
        self.needs_features = bool(getattr(model.item_tower, "needs_features", False))
        # the item tower's output for every item, computed once: a forward then gathers its history's rows
        # instead of running the tower on them (see load's ``precompute_items``)
        if precompute_items is None:  # not by default for a text encoder that runs per item (finetune mode)
            encoder = any(name.rsplit(".", 1)[-1] == "encoder" for name, _ in model.item_tower.named_modules())
            precompute_items = precision == "bfloat16" and not encoder
        self.item_hidden = item_hidden_table(model, store, precision) if precompute_items and store.n_items else None
        self.query_group = model.query_group.cpu().numpy().astype(np.int64)
        # group -1: a shared query tied to no scenario (query_scope shared, readout last)
        self.query_scenarios = ["any" if g < 0 else self.scenarios[g] if g < len(self.scenarios) else str(g)
                                for g in self.query_group]
        self.pools: dict[str | None, Pool] = {None: Pool("all", item_vectors, None, index, engine_config)}
        for s, ids in self.subsets.items():
            if len(ids) == len(item_vectors):  # every item: share the full pool's vectors (exact engine)
                self.pools[s] = Pool(s, item_vectors, None, None, engine_config)
            else:
                self.pools[s] = Pool(s, np.ascontiguousarray(item_vectors[ids]), ids, None, engine_config)
        self.retrieval = f"faiss-{index.kind}" if index is not None else "exact"

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls, checkpoint: str | Path, store: str | Path | None = None, *, index: str | Path | None = None,
        item_embeddings: str | Path | None = None, device: str = "cpu", reuse: Recommender | None = None,
        engine_config: Any = None, warmup: bool = True, precision: str = "float32", search_threads: int = 0,
        index_probe: str = "per_vector", index_nprobe: int | None = None, compile: bool = False,
        index_precision: str = "float32", precompute_items: bool | None = None,
    ) -> Recommender:
        """Load a training run for serving.

        Args:
            checkpoint: a run directory (``RUN/model`` + ``RUN/config.yaml``: the run's mixing and feature configs
                build the inputs); a bare model directory has no such configs and is refused.
            store: the event store (item ids, scenarios, per-scenario item pools); default: the run's store.
            index: a FAISS index directory (``redrec.retrieval.index``) over the store's items, row = item index;
                ``None`` = the exact engine.
            item_embeddings: merged ``redrec embed items`` directory of this model; ``None`` = computed here.
            device: torch device of the user tower (``cpu``, ``cuda``, ``cuda:N``, ``auto``: cuda when a GPU is
                visible); one this process cannot use is a ConfigError before anything is loaded.
            reuse: a recommender on the same store: its store and scenario pools are reused (hot reload).
            engine_config: :class:`redrec.retrieval.engine.EngineConfig` of the exact engine.
            warmup: answer a dummy query per pool before returning (compiles the engine's kernels, so the first
                real request is not slow).
            precision: ``float32`` (default) or ``bfloat16``: the user tower runs under ``torch.autocast`` in
                bfloat16 (faster on CPUs with AMX / AVX512-BF16: :meth:`user_vectors` of 8 users of the default
                model, conversion included, 6.6 -> 6.2 ms here, 4.8 -> 3.6 ms compiled; interest vectors within
                cosine 0.9999 of float32 on that model); weights, item vectors and the index are unchanged.
            search_threads: threads of each index search; 0 = automatic: all cores for the joint probe (its users
                are split over the threads), 1 for a FAISS search (a micro-batch is a few queries: OpenMP fan-out
                costs more than it saves).
            index_probe: how the K interest vectors search an IVF index: ``per_vector`` (FAISS: K searches of
                ``nprobe`` lists, merged) or ``joint`` (``ivf_flat`` only: the user's best lists scanned once with all
                K vectors, :mod:`redrec.retrieval.ivf_joint`: another speed / recall trade-off, measured by
                ``benchmarks/bench_joint_probe.py``).
            index_nprobe: lists scanned per user (``joint``) or per vector (``per_vector``); ``None`` = the
                index's saved setting (``joint``: 4 x its ``nprobe``).
            index_precision: ``float32`` or ``bfloat16``: the joint probe's scan on a bfloat16 copy of the lists,
                candidates re-scored in float32 (:mod:`redrec.retrieval.ivf_joint`; ``joint`` only).
            compile: run the user tower through ``torch.compile`` (inductor with freezing -- the linear layers'
                weights become constants of the graph, cast and prepacked once -- and its C++ wrapper, dynamic
                shapes; needs a C++ compiler).  :meth:`user_vectors` of 8 users of the default model here: 6.6 ->
                4.8 ms in float32, 3.6 ms with ``bfloat16`` (before freezing took effect); the bfloat16 forward
                alone then went from 3.7-4.2 to 3.0-3.2 ms with it.  Compiled once at load (``warmup``: ~25-60 s).
            precompute_items: run the item tower once over every item at load (:func:`item_hidden_table`: ``H``
                values per item in the tower's precision, 256 MB per million items of the default model in
                bfloat16) and give each forward its history's rows of that table instead of running the tower on
                them; ``None`` = with ``bfloat16``, unless the item tower runs a text encoder per item (``finetune``
                mode: the table would encode every item's text at load).  Same vectors up to rounding: in float32 exactly the
                tower's output; in bfloat16 the table is rounded to bfloat16 where the compiled forward kept the
                tower's output in float32 (interest vectors within 0.004 here).  The compiled bfloat16 forward of
                8 users of the default model: 2.88-2.92 -> 2.50-2.58 ms here.

        Raises:
            DataError / ConfigError: missing or inconsistent files (model vs store, index size, embeddings of
                another model); ``compile`` with no working C++ compiler (checked first).
            RedrecError: ``compile``, and the compilation at warm-up failed (the compiler's output in the message).
        """
        from redrec.config import resolve_device

        # the arguments, before anything is loaded
        torch_device = resolve_device(device, "serving")
        if compile:
            _check_compiler()
        if index_probe not in ("joint", "per_vector"):
            raise ConfigError("serving", "index_probe", f"must be per_vector or joint, got {index_probe!r}")
        if index_nprobe is not None and (isinstance(index_nprobe, bool) or int(index_nprobe) < 1):
            raise ConfigError("serving", "index_nprobe", f"must be a positive integer, got {index_nprobe!r}")
        if index_precision not in ("float32", "bfloat16"):
            raise ConfigError("serving", "index_precision", f"must be float32 or bfloat16, got {index_precision!r}")
        if index_precision != "float32" and (not index or index_probe != "joint"):
            raise ConfigError("serving", "index_precision", f"{index_precision} applies to the joint probe of an "
                              "ivf_flat index only (--index INDEX --index-probe joint)")
        from redrec.embed import check_model_store, resolve_source
        from redrec.fileio import sha256_file
        from redrec.model.redrec import RedRec
        from redrec.model.scorer import all_item_vectors

        model_dir, run_dir = resolve_source(checkpoint)
        if run_dir is None or not (run_dir / "config.yaml").exists():
            raise DataError(checkpoint, None, "a model directory has no training config (mixing, features) to build "
                            "serving inputs the way training did", hint="pass the run directory (RUN with RUN/model)")
        from redrec.train import load_train_config

        tc = load_train_config(run_dir / "config.yaml")
        store_path = Path(store) if store else Path(tc.store)
        if reuse is not None and Path(reuse.store.path).resolve() == store_path.resolve():
            st, subsets = reuse.store, reuse.subsets
        else:
            st, subsets = EventStore(store_path), None
        model = RedRec.from_pretrained(model_dir).to(torch_device).eval()
        check_model_store(model, st, users=True)
        sha = sha256_file(model_dir / "model.safetensors")
        d = int(model.cfg.embed_dim)
        if item_embeddings:
            vecs = _load_item_embeddings(item_embeddings, st, d, sha)
        else:
            vecs = all_item_vectors(model, st, device=torch_device)
        idx = None
        if index:
            from redrec.retrieval.index import IVF_KINDS, load_index

            idx = load_index(index)
            probe = index_probe
            if idx.kind not in IVF_KINDS:
                if index_probe == "joint" or index_nprobe is not None:
                    raise ConfigError("serving", "index_probe" if index_probe == "joint" else "index_nprobe",
                                      f"only IVF indexes have lists to probe (this one is {idx.kind})")
            elif probe == "joint":
                if idx.kind != "ivf_flat":
                    raise ConfigError("serving", "index_probe", f"joint probing needs an ivf_flat index (this one is "
                                      f"{idx.kind}); use per_vector")
                idx.set_search_params(probe="joint", user_nprobe=index_nprobe, joint_precision=index_precision)
            else:
                idx.set_search_params(probe="per_vector", nprobe=index_nprobe, joint_precision="float32")
            threads = int(search_threads) or ((os.cpu_count() or 1) if probe == "joint" else 1)
            idx.set_search_params(threads=threads)
            if idx.dim != d:
                raise DataError(index, "dim", f"the index holds {idx.dim}-d vectors, the model makes {d}-d ones")
            if idx.ntotal != st.n_items:
                raise DataError(index, "ntotal", f"the index holds {idx.ntotal:,} items, the store {st.n_items:,}: "
                                "row i must be item index i", hint="build the index from this store's item embeddings")
        sources = {"checkpoint": str(Path(checkpoint).resolve()), "store": str(store_path.resolve()),
                   "index": str(Path(index).resolve()) if index else None,
                   "item_embeddings": str(Path(item_embeddings).resolve()) if item_embeddings else None,
                   "device": device, "precision": precision, "search_threads": int(search_threads),
                   "index_probe": index_probe, "index_nprobe": index_nprobe, "compile": bool(compile),
                   "index_precision": index_precision, "precompute_items": precompute_items}
        version = f"{(run_dir or model_dir).name}@{sha[:12]}"
        rec = cls(model, st, tc.mixing, tc.features, vecs, index=idx, subsets=subsets, model_version=version,
                  sources=sources, engine_config=engine_config, precision=precision, compile=compile,
                  precompute_items=precompute_items)
        if warmup:
            try:
                rec.warmup()
            except Exception as e:
                if compile and type(e).__module__.startswith("torch._"):  # inductor / dynamo: not the inputs
                    raise RedrecError(f"compiling the user tower (compile=True, redrec serve --compile) failed: "
                                      f"{_compile_failure(e)}; serve without compiling") from e
                raise
        return rec

    def warmup(self) -> None:
        """One empty-history query per candidate pool (model forward, engine / FAISS search); a compiled user
        tower is compiled here, on the histories of the store's first two users (padded as every batch is)."""
        pools = list(self.pools)
        self.answer([Query([], k=1, scenario=s) for s in pools])
        if self.compiled:
            n = min(self.store.n_users, 2)
            users = [self.store.user(u) for u in range(n)]
            fake = [UserInput(u, int(u.timestamp[-1]) if len(u) else 0, len(u)) for u in users]
            self.user_vectors(fake + [fake[-1]] * (2 - n) if fake else [])

    def reload(self, checkpoint: str | Path | None = None, *, index: str | Path | None = None,
               item_embeddings: str | Path | None = None, exact: bool = False) -> Recommender:
        """A new recommender on the same store (this one keeps serving until the caller swaps).

        Arguments left out keep their current value; but a *different* checkpoint drops the current index and item
        embeddings (they were made by the old model) unless given again.  ``exact=True`` drops the index.
        """
        cur = self.sources
        ckpt = str(Path(checkpoint).resolve()) if checkpoint else cur["checkpoint"]
        same = ckpt == cur["checkpoint"]
        idx = None if exact else (index or (cur["index"] if same else None))
        emb = item_embeddings or (cur["item_embeddings"] if same else None)
        return Recommender.load(ckpt, cur["store"], index=idx, item_embeddings=emb, device=cur["device"], reuse=self,
                                engine_config=self.pools[None].engine_config, precision=self.precision,
                                search_threads=cur.get("search_threads", 0), index_probe=cur.get("index_probe", "per_vector"),
                                index_nprobe=cur.get("index_nprobe"), compile=self.compiled,
                                index_precision=cur.get("index_precision", "float32") if idx else "float32",
                                precompute_items=self.item_hidden is not None)

    # -- shapes ----------------------------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return int(self.item_vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    @property
    def n_interests(self) -> int:
        return len(self.query_group)

    def pool_sizes(self) -> dict[str, int]:
        """Searchable items per pool (``all`` and each scenario)."""
        return {("all" if s is None else s): len(p) for s, p in self.pools.items()}

    # -- inputs and the user tower -----------------------------------------------------------------------------------
    def prepare(self, events: Sequence[Event], *, t_now: int | None = None, user_id: str = "",
                validate: bool = True) -> UserInput:
        """Convert a history (events oldest first) for the model; unknown items are dropped.

        Raises:
            HistoryError: an invalid event; DataError: an unknown scenario or action.
        """
        user, info = to_user_events(list(events), self.store, user_id=user_id, unknown_items="drop", validate=validate)
        return self._input(user, info, len(events), t_now)

    def prepare_rows(self, rows: Sequence[EventRow] | EventColumns, *, t_now: int | None = None,
                     user_id: str = "") -> UserInput:
        """:meth:`prepare` of events read from a history store (:meth:`HistoryStore.get_many_columns` or
        ``get_many_rows``: checked when appended, so not validated again).

        Raises:
            DataError: a scenario or action this model's store does not know.
        """
        convert = columns_to_user_events if isinstance(rows, EventColumns) else rows_to_user_events
        user, info = convert(rows, self.store, user_id=user_id, unknown_items="drop")  # type: ignore[arg-type]
        return self._input(user, info, len(rows), t_now)

    @staticmethod
    def _input(user: UserEvents, info: dict | None, n_given: int, t_now: int | None) -> UserInput:
        n = len(user)
        t = int(t_now) if t_now is not None else (int(user.timestamp[n - 1]) if n else 0)
        return UserInput(user, t, n_given, dict(info or {}))

    def user_vectors(self, histories: Sequence[Sequence[Event] | UserInput], t_now: int | None = None) -> np.ndarray:
        """float32 ``[B, K, d]`` unit interest vectors of ``B`` histories: one forward of the user tower.

        ``histories`` are event lists (oldest first; converted with :meth:`prepare`, ``t_now`` applies to them) or
        :class:`UserInput`\\ s.
        """
        import torch

        from redrec.data.batching import collate, user_sequence
        from redrec.mixing import mix

        inputs = [h if isinstance(h, UserInput) else self.prepare(h, t_now=t_now) for h in histories]
        if not inputs:
            return np.zeros((0, self.n_interests, self.dim), np.float32)
        seqs = []
        for inp in inputs:
            seq = mix(inp.user.scenario, len(inp.user), self.mixing, self.scenarios)
            seqs.append(user_sequence(self.store, inp.user, seq, inp.t_now, self.features))
        B = len(seqs)
        if self.compiled and B < 2:  # an empty history pads the batch (see __init__)
            seqs = seqs + [{k: v[:0] for k, v in seqs[0].items()}]
        # histories padded to a multiple of 16 events: a few shapes instead of one per longest history, so the
        # matmul kernels (oneDNN makes one per shape) are reused; padding is masked out of the result
        longest = max(len(s["item"]) for s in seqs)
        table = self.item_hidden
        batch = collate(seqs, self.store, self.needs_features and table is None, min_len=max(2, -(-longest // 16) * 16))
        if table is not None:  # [B, L, H] rows of the precomputed item tower (padding: item 0's, masked out)
            batch["item_h"] = table[batch["item"]]
        batch = {k: v.to(self.device) for k, v in batch.items()}
        low = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bfloat16" else nullcontext()
        with torch.no_grad(), low:
            interests = self._forward(batch, seq=False)["interests"]
        return np.ascontiguousarray(interests[:B].float().cpu().numpy())

    # -- retrieval -------------------------------------------------------------------------------------------------
    def check_scenario(self, scenario: str | None) -> None:
        if scenario is not None and scenario not in self.pools:
            raise ConfigError("request", "scenario", f"unknown scenario {scenario!r}; this store has {self.scenarios}")

    def retrieve(self, vectors: np.ndarray, k: int | Sequence[int], scenario: str | None | Sequence[str | None] = None,
                 exclude: Sequence[np.ndarray] | None = None) -> list[Recommendations]:
        """The best items of ``B`` users: one search per distinct scenario pool among the rows.

        Args:
            vectors: ``[B, K, d]`` interest vectors.
            k: list length, one for all or one per user.
            scenario: candidate pool, one for all or one per user (``None`` = all items).
            exclude: per user, store item indices never returned.
        """
        B = len(vectors)
        ks = [int(k)] * B if isinstance(k, (int, np.integer)) else [int(x) for x in k]
        scens = [scenario] * B if scenario is None or isinstance(scenario, str) else list(scenario)
        out = [Recommendations([], [], [], [], self.query_scenarios) for _ in range(B)]
        groups: dict[str | None, list[int]] = {}
        for r, s in enumerate(scens):
            self.check_scenario(s)
            groups.setdefault(s, []).append(r)
        for s, rows in groups.items():
            kk = max(ks[r] for r in rows)
            ex = None if exclude is None else [exclude[r] for r in rows]
            users = np.ascontiguousarray(vectors[rows])
            ids, scores, which = self.pools[s].search(users, kk, ex)
            for r, items in zip(rows, self._items(users, ids, scores, which), strict=True):
                out[r] = items[: ks[r]]
        return out

    def _items(self, users: np.ndarray, ids: np.ndarray, scores: np.ndarray,
               which: np.ndarray | None = None) -> list[Recommendations]:
        """Result lists of ``B`` users (``[B, K, d]`` vectors, ``[B, k]`` ids / scores, -1 = no item): the
        winning interest of each item is the argmax over K of the float32 cosines, ``which`` ``[B, k]`` when the
        index computed it, else one batched product here (over item rows gathered from memory: ~0.4 ms for 8 x
        100 items; the item vectors are unit, the users' are scaled to unit first, as the searches do)."""
        ok = ids >= 0
        safe = np.where(ok, ids, 0)
        if which is None:
            u = np.asarray(users, np.float32)
            u = u / np.maximum(np.linalg.norm(u, axis=2, keepdims=True), 1e-30)
            v = self.item_vectors[safe]  # [B, k, d]
            which = np.matmul(v, u.transpose(0, 2, 1)).argmax(axis=2)  # [B, k]
        names = self.store.item_ids[safe]
        out = []
        for b in range(len(ids)):
            j = np.flatnonzero(ok[b]) if not ok[b].all() else slice(None)
            nm = names[b, j].tolist()
            if nm and not isinstance(nm[0], str):
                nm = [str(x) for x in nm]
            out.append(Recommendations(nm, ids[b, j].tolist(), scores[b, j].tolist(), which[b, j].tolist(),
                                       self.query_scenarios))
        return out

    def recommend(self, histories: Sequence[Sequence[Event] | UserInput], k: int = 10, scenario: str | None = None,
                  exclude_seen: bool = True, t_now: int | None = None) -> list[Recommendations]:
        """``k`` items per history: :meth:`user_vectors` then :meth:`retrieve` (history items excluded when
        ``exclude_seen``)."""
        self.check_scenario(scenario)
        inputs = [h if isinstance(h, UserInput) else self.prepare(h, t_now=t_now) for h in histories]
        vecs = self.user_vectors(inputs)
        return self.retrieve(vecs, k, scenario, [i.seen for i in inputs] if exclude_seen else None)

    # -- a micro-batch ---------------------------------------------------------------------------------------------
    def answer(self, queries: Sequence[Query], timings: dict[str, float] | None = None) -> list[Answer | Exception]:
        """Answer a micro-batch: one user-tower forward for all queries, one search per scenario pool used.

        A query whose history is invalid gets its exception (:class:`HistoryError`, :class:`ConfigError` for an
        unknown scenario) in its slot; the others are answered.  ``timings`` receives ``user_tower`` (conversion +
        forward) and ``retrieval`` seconds.
        """
        t0 = time.perf_counter()
        out: list[Answer | Exception | None] = [None] * len(queries)
        inputs: list[UserInput] = []
        rows: list[int] = []
        for i, q in enumerate(queries):
            try:
                self.check_scenario(q.scenario)
                if isinstance(q.events, UserInput):
                    inp = q.events
                elif q.trusted:
                    inp = self.prepare_rows(q.events, t_now=q.t_now, user_id=q.user_id)  # type: ignore[arg-type]
                else:
                    inp = self.prepare(q.events, t_now=q.t_now, user_id=q.user_id)
            except (HistoryError, RedrecError) as e:  # an invalid event; DataError: unknown scenario / action
                out[i] = e
                continue
            inputs.append(inp)
            rows.append(i)
        vecs = self.user_vectors(inputs)
        t1 = time.perf_counter()
        rec_rows = [j for j, i in enumerate(rows) if queries[i].kind == "recommend"]
        lists = self.retrieve(
            vecs[rec_rows], [queries[rows[j]].k for j in rec_rows], [queries[rows[j]].scenario for j in rec_rows],
            [inputs[j].seen if queries[rows[j]].exclude_seen else np.zeros(0, np.int64) for j in rec_rows],
        ) if rec_rows else []
        t2 = time.perf_counter()
        items_of = dict(zip(rec_rows, lists, strict=True))
        for j, i in enumerate(rows):
            out[i] = Answer(vecs[j], items_of.get(j), inputs[j].n_history, inputs[j].n_given, self.model_version,
                            self.query_scenarios)
        if timings is not None:
            timings["user_tower"] = t1 - t0
            timings["retrieval"] = t2 - t1
        return out  # type: ignore[return-value]


def item_hidden_table(model: Any, store: EventStore, precision: str = "float32", chunk: int = 1 << 15) -> Any:
    """``model.item_hidden`` of every item of ``store``: a ``[n_items, H]`` tensor (row = item index) on the model's
    device, float32, or bfloat16 computed under ``torch.autocast`` with ``precision="bfloat16"`` -- the item
    tower's output as the user tower's forward would compute it, ``chunk`` items at a time."""
    import torch

    from redrec.model.scorer import item_batches

    device = next(model.parameters()).device
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    low = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bfloat16" else nullcontext()
    out = torch.empty(store.n_items, int(model.hidden_size), dtype=dtype, device=device)
    with torch.no_grad(), low:
        for a, ids, feats in item_batches(model, store, chunk, device):
            out[a : a + len(ids)] = model.item_hidden(ids, feats)
    return out


def _load_item_embeddings(path: str | Path, store: EventStore, dim: int, model_sha: str) -> np.ndarray:
    """float32 ``[n_items, d]`` item vectors (row = item index) from a merged ``redrec embed items`` directory."""
    from redrec.embed import load_embeddings

    emb = load_embeddings(path)
    mpath = Path(path) / "manifest.json"
    if emb.kind != "items":
        raise DataError(mpath, "kind", f"holds {emb.kind} embeddings, expected items")
    if emb.vectors.shape[-1] != dim:
        raise DataError(mpath, "dim", f"{emb.vectors.shape[-1]}-d vectors, the model makes {dim}-d ones")
    sha = emb.manifest.get("model_sha256")
    if sha and sha != model_sha:
        raise DataError(mpath, "model_sha256", "the item embeddings were made by another model",
                        hint="embed the items with this checkpoint: `redrec embed items --run RUN`")
    idx = emb.index
    if len(idx) != store.n_items or not np.array_equal(np.sort(idx), np.arange(store.n_items)):
        raise DataError(Path(path) / "ids.parquet", "index",
                        f"{len(idx):,} item rows do not cover the store's {store.n_items:,} items exactly once")
    v = np.asarray(emb.vectors, dtype=np.float32)
    return np.ascontiguousarray(v if np.array_equal(idx, np.arange(len(idx))) else v[np.argsort(idx)])
