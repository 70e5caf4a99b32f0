"""Zero-parameter baselines: usable before any training, and the floor every trained model must clear.

* :class:`PopularityScorer`: the same ranking for everyone, by how often items occur in the evaluated users'
  *input* events.
* :class:`MeanPoolScorer`: one user vector, the mean of the (normalised) precomputed item vectors of the user's
  mixed input sequence; items ranked by cosine.

Both follow the :class:`redrec.eval.protocols.Scorer` interface and only read a case's input events.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from redrec.data.store import EventStore
from redrec.errors import DataError
from redrec.eval.protocols import EvalCase, ProtocolConfig, case_sequence
from redrec.mixing import MixingConfig

_FLUSH_EVENTS = 1 << 22  # input events buffered before a bincount


class PopularityScorer:
    """Most-popular items first, for every user.

    The count of an item is its number of occurrences among the **input events of all evaluated cases**
    (positions < ``cutoff``, or ``history_positions``): no event at or after any case's prediction point is
    counted, so nothing leaks from the targets.  Under the ``redrec`` protocol only events of the target
    scenario are counted (the targets are target-scenario events); pass ``scenario`` to choose explicitly.
    Equal counts are ordered by item index (the evaluation's tie rule).

    Args:
        scenario: count only this scenario's events (default: the ``redrec`` target scenario, else all).

    Attributes:
        counts: float64 ``[n_items]`` after :meth:`prepare`.
    """

    name = "popularity"

    def __init__(self, scenario: str | None = None):
        self.scenario = scenario
        self.counts: np.ndarray | None = None

    def prepare(self, store: EventStore, cases: Sequence[EvalCase], cfg: ProtocolConfig | None = None) -> None:
        """Count item occurrences over the input events of ``cases``."""
        scen = self.scenario
        if scen is None and cfg is not None and cfg.name == "redrec":
            scen = cfg.resolved(store).target_scenario
        s = None if scen is None else store.scenario_index(scen)
        counts = np.zeros(store.n_items, dtype=np.int64)
        buf: list[np.ndarray] = []
        size = 0
        for c in cases:
            a = int(store.offsets[c.user])
            pos = a + c.input_positions()
            items = np.asarray(store.item[pos])
            if s is not None:
                items = items[np.asarray(store.scenario[pos]) == s]
            buf.append(items)
            size += len(items)
            if size >= _FLUSH_EVENTS:
                counts += np.bincount(np.concatenate(buf), minlength=store.n_items)
                buf, size = [], 0
        if buf:
            counts += np.bincount(np.concatenate(buf).astype(np.int64), minlength=store.n_items)
        self.counts = counts.astype(np.float64)

    def score_cases(self, store: EventStore, cases: Sequence[EvalCase]) -> np.ndarray:
        """``[B, n_items]`` read-only broadcast view of the counts (no per-user memory)."""
        if self.counts is None:
            raise RuntimeError("PopularityScorer.prepare(store, cases) must be called first (evaluate() does it)")
        return np.broadcast_to(self.counts, (len(cases), len(self.counts)))


class MeanPoolScorer:
    """Mean of the user's input item vectors, scored by cosine.

    User vector = L2-normalise(mean over the case's mixed sequence (:func:`case_sequence`, the same mixing as
    the model) of L2-normalised ``store.item_vectors``).  Returned as ``[B, 1, d]``; items are scored by
    cosine against ``store.item_vectors``.  A case with an empty sequence gets the zero vector (every item
    scores 0; ties by item index).

    Args:
        mixing: how the input sequence is chosen (default :class:`MixingConfig`: ``2d``, last 128 split evenly).

    Raises:
        DataError: the store has no precomputed item vectors.
    """

    name = "mean-pool"

    def __init__(self, mixing: MixingConfig | None = None):
        self.mixing = mixing or MixingConfig()
        self.item_vectors: np.ndarray | None = None

    def _vectors(self, store: EventStore) -> np.ndarray:
        v = store.item_vectors
        if v is None:
            raise DataError(
                store.path, "item_vectors",
                "MeanPoolScorer needs precomputed item vectors and this store has none",
                hint="import a dataset that ships item vectors (e.g. RED-MMU note_feature) or pick another baseline",
            )
        self.item_vectors = v
        return v

    def prepare(self, store: EventStore, cases: Sequence[EvalCase] | None = None, cfg: ProtocolConfig | None = None) -> None:
        self._vectors(store)

    def score_cases(self, store: EventStore, cases: Sequence[EvalCase]) -> np.ndarray:
        """float32 ``[B, 1, d]`` user vectors (``self.item_vectors`` is the item side)."""
        V = self._vectors(store)
        out = np.zeros((len(cases), 1, V.shape[1]), dtype=np.float32)
        for i, c in enumerate(cases):
            user = store.user(c.user)
            seq = case_sequence(user, c, self.mixing, store.scenarios)
            if len(seq) == 0:
                continue
            x = np.asarray(V[np.asarray(user.item[seq.index], dtype=np.int64)], dtype=np.float32)
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            m = x.mean(axis=0)
            out[i, 0] = m / max(float(np.linalg.norm(m)), 1e-12)
        return out
