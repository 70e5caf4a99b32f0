"""Scenario quota + merge policies: which of a user's past events the model sees, and in what order.

RED-Rec's 2-D dense mixing (paper eq. 4): take the last ``n_s`` events of every scenario ``s`` (the *quota*
axis), then merge them chronologically keeping each event's scenario tag (the *time* axis); the model then
adds a sequence-position and a time-gap position embedding (2-D position, see :mod:`redrec.features`).

The paper's ablation alternatives (Table 3, bottom) are named policies:

==============  ==========================================  =================  ==============
policy          which events                                order              position PEs
==============  ==========================================  =================  ==============
``2d``          last ``n_s`` per scenario                   chronological      seq + time gap
``timestamp``   global last ``last_n`` by time (no quotas)  chronological      seq + time gap
``naive``       last ``n_s`` per scenario                   per-scenario blocks seq + time gap
``1d_position`` last ``n_s`` per scenario                   chronological      seq only
``1d_timestamp`` last ``n_s`` per scenario                  chronological      time gap only
==============  ==========================================  =================  ==============

The same :func:`mix` builds sequences for training, evaluation and serving, so the three cannot drift apart
(the reference code builds them differently in training and inference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from redrec.errors import ConfigError

Policy = Literal["2d", "timestamp", "naive", "1d_position", "1d_timestamp"]
POLICIES: tuple[str, ...] = ("2d", "timestamp", "naive", "1d_position", "1d_timestamp")


@dataclass
class MixingConfig:
    """How a user's history becomes the model's input sequence.

    Attributes:
        policy: one of :data:`POLICIES`.
        last_n: total sequence budget (paper: 128).  Used by ``timestamp``, and split evenly over the
            scenarios when ``quotas`` is not given.
        quotas: per-scenario quotas ``{scenario name: n_s}`` (reference: ``{homefeed: 96, ads: 32}``).
            Scenarios not named get 0 (they are left out of the input: the single-scenario ablation).
        fill_unused: when a scenario has fewer events than its quota, give the unused slots to the most recent
            remaining events of the scenarios that have a quota (the total stays <= sum of quotas).  Off by default, as in the paper.
    """

    policy: Policy = "2d"
    last_n: int = 128
    quotas: dict[str, int] | None = None
    fill_unused: bool = False

    def validate(self, source: str | None = None) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(source, "policy", f"must be one of {list(POLICIES)}, got {self.policy!r}")
        if self.last_n < 1:
            raise ConfigError(source, "last_n", f"must be >= 1, got {self.last_n}")
        for k, v in (self.quotas or {}).items():
            if v < 0:
                raise ConfigError(source, f"quotas.{k}", f"must be >= 0, got {v}")

    @property
    def use_position(self) -> bool:
        return self.policy != "1d_timestamp"

    @property
    def use_time_gap(self) -> bool:
        return self.policy != "1d_position"

    def resolve_quotas(self, scenarios: Sequence[str]) -> list[int]:
        """Quota per scenario index of ``scenarios`` (the store's scenario list)."""
        if self.quotas is None:
            base, rem = divmod(self.last_n, len(scenarios))
            return [base + (1 if i < rem else 0) for i in range(len(scenarios))]
        unknown = sorted(set(self.quotas) - set(scenarios))
        if unknown:
            raise ConfigError(None, f"quotas.{unknown[0]}", f"unknown scenario; the data has {list(scenarios)}")
        return [int(self.quotas.get(s, 0)) for s in scenarios]

    def block_order(self, scenarios: Sequence[str]) -> list[int]:
        """Scenario order of the ``naive`` policy's blocks: the quotas' order, else the data's order."""
        if self.quotas is None:
            return list(range(len(scenarios)))
        return [scenarios.index(s) for s in self.quotas]


@dataclass
class MixedSequence:
    """The model input chosen from one user's events.

    Attributes:
        index: int64 [L] positions into the user's (chronological) events, in model input order.
        use_position: add the sequence-position embedding ``PE_seq``.
        use_time_gap: add the time-gap embedding ``PE_gap``.
    """

    index: np.ndarray
    use_position: bool
    use_time_gap: bool

    def __len__(self) -> int:
        return int(self.index.shape[0])


def mix(scenario: np.ndarray, cutoff: int, cfg: MixingConfig, scenarios: Sequence[str]) -> MixedSequence:
    """Select and order the events ``[0, cutoff)`` of one user.

    Args:
        scenario: int8/int [n] scenario index of each of the user's events, oldest first.
        cutoff: only events with position < cutoff may be used (the prediction point; events at and after it are
            the future).  ``cutoff`` may equal ``n``.
        cfg: the mixing config.
        scenarios: the store's scenario names (``scenario`` values index it).

    Returns:
        :class:`MixedSequence` whose ``index`` has no duplicates and only values < ``cutoff``.
    """
    cutoff = int(min(max(cutoff, 0), len(scenario)))
    past = np.asarray(scenario[:cutoff])
    if cfg.policy == "timestamp":
        idx = np.arange(max(0, cutoff - cfg.last_n), cutoff, dtype=np.int64)
        return MixedSequence(idx, True, True)

    quotas = cfg.resolve_quotas(scenarios)
    blocks: dict[int, np.ndarray] = {}
    unused = 0
    for s, q in enumerate(quotas):
        if q <= 0:
            continue
        pos = np.flatnonzero(past == s)
        blocks[s] = pos[len(pos) - q :] if len(pos) > q else pos
        unused += q - len(blocks[s])
    if cfg.fill_unused and unused > 0 and blocks:
        taken = np.zeros(cutoff, bool)
        for b in blocks.values():
            taken[b] = True
        rest = np.flatnonzero(~taken & np.isin(past, list(blocks)))
        extra = rest[len(rest) - unused :] if len(rest) > unused else rest
        for s in np.unique(past[extra]):  # extra slots join their own scenario's block (naive stays blockwise)
            blocks[int(s)] = np.sort(np.concatenate([blocks[int(s)], extra[past[extra] == s]]))

    if cfg.policy == "naive":
        order = [s for s in cfg.block_order(scenarios) if s in blocks]
        parts = [blocks[s] for s in order]
    else:
        parts = list(blocks.values())
    idx = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    if cfg.policy != "naive":
        idx.sort(kind="stable")  # events are stored oldest first, so index order is chronological order
    return MixedSequence(idx, cfg.use_position, cfg.use_time_gap)
