"""Evaluate a trained model with the shared protocols: a :class:`redrec.eval.protocols.Scorer` over RedRec."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from redrec.data.batching import collate, item_features, user_sequence
from redrec.data.store import EventStore
from redrec.eval.protocols import EvalCase, ProtocolConfig, case_sequence
from redrec.features import FeatureConfig
from redrec.mixing import MixingConfig
from redrec.model.config import SHARED_GROUP
from redrec.model.redrec import RedRec


def item_batches(model: RedRec, store: EventStore, batch: int = 65536, device: str | torch.device = "cpu",
                 ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """The item tower's inputs for every item of ``store``, ``batch`` items at a time: ``(first item index, ids
    [n], features [n, F] or None when the tower needs none)``, on ``device``."""
    needs = getattr(model.item_tower, "needs_features", False)
    for a in range(0, store.n_items, batch):
        ids = np.arange(a, min(a + batch, store.n_items))
        feats = torch.from_numpy(item_features(store, ids)).to(device) if needs else None
        yield a, torch.from_numpy(ids).to(device), feats


@torch.no_grad()
def all_item_vectors(model: RedRec, store: EventStore, batch: int = 65536, device: str | torch.device = "cpu") -> np.ndarray:
    """float32 ``[n_items, d]`` unit vectors of every item of the store (chunked)."""
    model.eval()
    out = np.empty((store.n_items, model.cfg.embed_dim), np.float32)
    for a, ids, feats in item_batches(model, store, batch, device):
        out[a : a + len(ids)] = model.item_vectors(ids, feats).float().cpu().numpy()
    return out


class ModelScorer:
    """Scores cases with a RedRec model: user interests ``[B, K, d]`` against all item vectors (max over K).

    Args:
        model: the model.
        mixing, features: how inputs are built (the same configs as training).
        queries: ``all`` (max over every interest) or ``target_scenario`` (the target scenario's queries and the
            shared ones (query group -1, which serve every scenario); all of them when the protocol has no target
            scenario or the model has no query for it).
    """

    def __init__(
        self, model: RedRec, mixing: MixingConfig, features: FeatureConfig,
        queries: Literal["all", "target_scenario"] = "all", device: str | torch.device = "cpu",
    ):
        from redrec.model.config import model_label

        self.name = model_label(model.cfg)  # "red-rec", or the baseline backbone ("sasrec", "hstu")
        self.model = model
        self.mixing = mixing
        self.features = features
        self.queries = queries
        self.device = torch.device(device)
        self.item_vectors: np.ndarray | None = None
        self._query_index: torch.Tensor | None = None

    def prepare(self, store: EventStore, cases: Sequence[EvalCase], cfg: ProtocolConfig | None = None) -> None:
        self.item_vectors = all_item_vectors(self.model, store, device=self.device)
        self._query_index = None
        if self.queries == "target_scenario" and cfg is not None:
            scen = cfg.resolved(store).target_scenario
            if scen is not None:
                qg = self.model.query_group.cpu()
                idx = torch.nonzero((qg == store.scenarios.index(scen)) | (qg == SHARED_GROUP)).flatten()
                self._query_index = idx if 0 < len(idx) < len(qg) else None

    @torch.no_grad()
    def score_cases(self, store: EventStore, cases: Sequence[EvalCase]) -> np.ndarray:
        self.model.eval()
        seqs = []
        for c in cases:
            user = store.user(c.user)
            seq = case_sequence(user, c, self.mixing, store.scenarios)
            seqs.append(user_sequence(store, user, seq, int(c.t_now), self.features))
        needs = getattr(self.model.item_tower, "needs_features", False)
        batch = {k: v.to(self.device) for k, v in collate(seqs, store, needs).items()}
        interests = self.model(batch, seq=False)["interests"]
        if self._query_index is not None:
            interests = interests[:, self._query_index.to(interests.device)]
        return interests.float().cpu().numpy()
