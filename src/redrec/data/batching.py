"""Sequences -> padded tensor batches, the one path shared by training, evaluation and serving.

:func:`user_sequence` picks a user's input with :func:`redrec.mixing.mix` and computes its features
(:func:`redrec.features.build_features`); :func:`collate` right-pads a list of them into the batch dict the model
reads (see :mod:`redrec.model.redrec`).  :class:`TrainExamples` draws training examples: the last ``window``
events before a user's training bound are the window targets (eq. A5), the events before them the input, and every
input position's next event its next-item target (eq. 6).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from redrec.data.store import EventStore, UserEvents
from redrec.errors import ConfigError
from redrec.features import FeatureConfig, build_features
from redrec.mixing import MixedSequence, MixingConfig, mix

SEQ_KEYS = ("item", "scenario", "actions", "hour", "gap_bucket", "position")


def user_sequence(
    store: EventStore, user: UserEvents, seq: MixedSequence, t_now: int, feat: FeatureConfig
) -> dict[str, np.ndarray]:
    """Features of one mixed sequence (numpy, length L)."""
    return build_features(user, seq, t_now, n_actions=len(store.actions_names), time_unit=store.time_unit, cfg=feat)


def item_features(store: EventStore, ids: np.ndarray) -> np.ndarray | None:
    """float32 ``[*ids.shape, F]`` precomputed vectors of ``ids`` (None when the store has none)."""
    vec = store.item_vectors
    if vec is None:
        return None
    flat = np.asarray(ids).reshape(-1)
    return np.asarray(vec[flat], dtype=np.float32).reshape(*np.shape(ids), vec.shape[1])


def collate(seqs: Sequence[dict[str, np.ndarray]], store: EventStore, with_features: bool,
            min_len: int = 1) -> dict[str, Tensor]:
    """Right-pad sequences into ``item/scenario/hour/gap/position [B,L]`` long, ``time [B,L]`` long (each event's
    age ``t_now - t_j`` in store time units; read by the HSTU backbone), ``actions [B,L,A]`` float, ``mask [B,L]``
    bool and (features towers) ``item_feat [B,L,F]`` float.  Padding is 0 (False); ``L`` is the longest sequence,
    at least ``min_len``."""
    B = len(seqs)
    L = max(1, int(min_len), max(len(s["item"]) for s in seqs))
    A = max(1, len(store.actions_names))
    out = {k: np.zeros((B, L), np.int64) for k in ("item", "scenario", "hour", "gap", "position", "time")}
    actions = np.zeros((B, L, A), np.float32)
    mask = np.zeros((B, L), bool)
    for b, s in enumerate(seqs):
        n = len(s["item"])
        out["item"][b, :n] = s["item"]
        out["scenario"][b, :n] = s["scenario"]
        out["hour"][b, :n] = s["hour"]
        out["gap"][b, :n] = s["gap_bucket"]
        out["position"][b, :n] = s["position"]
        out["time"][b, :n] = s["age"]
        if s["actions"].shape[1]:
            actions[b, :n] = s["actions"]
        mask[b, :n] = True
    batch = {k: torch.from_numpy(v) for k, v in out.items()}
    batch["actions"] = torch.from_numpy(actions)
    batch["mask"] = torch.from_numpy(mask)
    if with_features:
        batch["item_feat"] = torch.from_numpy(item_features(store, out["item"]))
    return batch


@dataclass
class TrainDataConfig:
    """How training examples are drawn.

    Attributes:
        window: W, the number of most recent events before the training bound dropped from the input and used
            as the window multi-interest targets (paper: 10).
        min_input: fewest input events an example must keep.
        random_cutoff: probability of ending an example at a random earlier position instead of the user's
            training bound (augmentation; 0 = always the most recent events).
        n_negatives: shared uniform pool negatives per batch.
        window_mode: ``last``: the targets are the last ``window`` events before the end, whatever their scenario
            (the paper); ``per_scenario``: from the same cutoff, the next ``window`` events *of each scenario*
            up to the user's training bound, so sparse scenarios (ads, search) get window targets too and their
            scenario queries are trained (this mirrors the ``redrec`` protocol's per-scenario targets; the default).
    """

    window: int = 10
    min_input: int = 1
    random_cutoff: float = 0.5
    n_negatives: int = 1024
    window_mode: Literal["last", "per_scenario"] = "per_scenario"

    def validate(self, source: str | None = None) -> None:
        if self.window < 1:
            raise ConfigError(source, "window", "must be >= 1")
        if self.min_input < 1:
            raise ConfigError(source, "min_input", "must be >= 1")
        if not 0.0 <= self.random_cutoff <= 1.0:
            raise ConfigError(source, "random_cutoff", "must be in [0, 1]")
        if self.n_negatives < 0:
            raise ConfigError(source, "n_negatives", "must be >= 0")


class TrainExamples:
    """Training examples of the users of a store, each user's events limited to ``[0, bounds[u])``.

    Args:
        store: the event store.
        bounds: int64 ``[n_users]`` exclusive end of each user's training events (from the evaluation split, so
            no evaluation target is ever trained on).
        mixing, features, data: configs.
        with_features: add ``item_feat`` tensors (features item tower).
    """

    def __init__(
        self, store: EventStore, bounds: np.ndarray, mixing: MixingConfig, features: FeatureConfig,
        data: TrainDataConfig, with_features: bool,
    ):
        self.store = store
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.mixing = mixing
        self.features = features
        self.data = data
        self.with_features = with_features
        self.users = np.flatnonzero(self.bounds >= data.min_input + 1)  # need an input and a target

    def __len__(self) -> int:
        return int(self.users.size)

    def example(self, u: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One example: input features, ``next_item [L]``, ``window_item [W]``, ``window_scenario [W]``."""
        user = self.store.user(int(u))
        end = int(self.bounds[u])
        lo = self.data.min_input + 1
        if self.data.random_cutoff > 0 and end > lo and rng.random() < self.data.random_cutoff:
            end = int(rng.integers(lo, end + 1))
        bound = int(self.bounds[u])
        w = min(self.data.window, end - self.data.min_input)
        start = end - w  # the input is the events before `start`
        if self.data.window_mode == "last":
            win = np.arange(start, end)
        else:  # the next `window` events of every scenario from `start` on, up to the training bound
            future = np.asarray(user.scenario[start:bound])
            win = np.sort(np.concatenate([np.flatnonzero(future == s)[: self.data.window] for s in np.unique(future)])) + start
        seq = mix(user.scenario, start, self.mixing, self.store.scenarios)
        t_now = int(user.timestamp[start])
        feats = user_sequence(self.store, user, seq, t_now, self.features)
        items = feats["item"]
        nxt = np.empty_like(items)
        nxt[:-1] = items[1:]
        if len(items):
            nxt[-1] = user.item[start]
        feats["next_item"] = nxt
        feats["window_item"] = np.asarray(user.item[win], dtype=np.int64)
        feats["window_scenario"] = np.asarray(user.scenario[win], dtype=np.int64)
        return feats

    def batches(
        self, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        """Deterministic batches of one epoch: a seeded permutation of the users, split across ranks so that
        rank r takes users ``r, r + world_size, ...`` of each global batch of ``batch_size * world_size``."""
        order = np.random.default_rng([seed, epoch]).permutation(self.users)
        gb = batch_size * world_size
        n_batches = len(order) // gb
        for i in range(start_batch, n_batches):
            users = order[i * gb : (i + 1) * gb][rank::world_size]
            # each user's random cutoff depends on (seed, epoch, user) only, so the examples are the same whatever
            # the number of processes or the gradient accumulation
            exs = [self.example(int(u), np.random.default_rng([seed, epoch, int(u)])) for u in users]
            yield self.collate(exs, np.random.default_rng([seed, epoch, i]))

    def n_batches(self, batch_size: int, world_size: int = 1) -> int:
        return len(self.users) // (batch_size * world_size)

    def collate(self, exs: list[dict[str, np.ndarray]], neg_rng: np.random.Generator) -> dict[str, Tensor]:
        batch = collate(exs, self.store, self.with_features)
        B, L = batch["mask"].shape
        nxt = np.zeros((B, L), np.int64)
        W = max(len(e["window_item"]) for e in exs)
        win = np.zeros((B, W), np.int64)
        win_s = np.zeros((B, W), np.int64)
        win_m = np.zeros((B, W), bool)
        for b, e in enumerate(exs):
            nxt[b, : len(e["next_item"])] = e["next_item"]
            n = len(e["window_item"])
            win[b, :n], win_s[b, :n], win_m[b, :n] = e["window_item"], e["window_scenario"], True
        batch["next_item"] = torch.from_numpy(nxt)
        batch["window_item"] = torch.from_numpy(win)
        batch["window_scenario"] = torch.from_numpy(win_s)
        batch["window_mask"] = torch.from_numpy(win_m)
        neg = neg_rng.integers(0, self.store.n_items, self.data.n_negatives).astype(np.int64)  # same on every rank
        batch["neg_item"] = torch.from_numpy(neg)
        if self.with_features:
            batch["next_feat"] = torch.from_numpy(item_features(self.store, nxt))
            batch["window_feat"] = torch.from_numpy(item_features(self.store, win))
            batch["neg_feat"] = torch.from_numpy(item_features(self.store, neg))
        return batch
