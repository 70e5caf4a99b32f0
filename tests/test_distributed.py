"""Data-parallel training (real ``torchrun`` processes, gloo on CPU) is the same computation as one process.

Two ranks with ``batch_size = b`` each must end with the weights of one process with ``batch_size = 2b``: the
users of every global batch are the same (rank r takes users r, r + 2, ... of it, see ``TrainExamples.batches``),
the loss is normalised by the global target count, and in-batch negatives from the other rank are gathered with
autograd, so DDP's averaged gradient is the single-process gradient of the same global batch.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_store, tiny_train_config
from safetensors.torch import load_file

from redrec.config import save_yaml
from redrec.data.batching import TrainExamples
from redrec.data.store import EventStore
from redrec.model.redrec import RedRec
from redrec.train import TrainConfig, make_split, resolve_model_config, train

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _torchrun() -> str | None:
    exe = Path(sys.executable).parent / "torchrun"
    return str(exe) if exe.exists() else shutil.which("torchrun")


pytestmark = [
    pytest.mark.skipif(_torchrun() is None, reason="torchrun is not installed next to this Python or on PATH"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo"),
]


def tiny_config(store: Path, out: Path, **overrides) -> TrainConfig:
    return tiny_train_config(store, out, **{"max_steps": STEPS, "n_valid_users": 0, "device": 'cpu', "resume": False, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("ddp_store"))


def grad_norms(run: Path) -> list[float]:
    return [r["grad_norm"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "grad_norm" in r]


@pytest.mark.parametrize("random_cutoff", [0.0, 0.5])
def test_ranks_split_the_global_batch(store, random_cutoff):
    """Rank r of 2 gets exactly the examples of users r, r + 2, ... of the one-process batch of twice the size."""
    cfg = tiny_config(store, store.parent / "unused", **{"data.random_cutoff": random_cutoff})
    st = EventStore(store)
    split = make_split(st, cfg.protocol, cfg.n_valid_users, cfg.seed)
    ex = TrainExamples(st, split.bounds, cfg.mixing, cfg.features, cfg.data, with_features=True)
    one = list(itertools.islice(ex.batches(8, 0, cfg.seed), 4))
    for rank in range(2):
        part = list(itertools.islice(ex.batches(4, 0, cfg.seed, rank, 2), 4))
        for b1, bp in zip(one, part, strict=True):
            for k, v in bp.items():
                if k in ("neg_item", "neg_feat"):  # the shared pool: the same on every rank
                    assert torch.equal(v, b1[k]), k
                    continue
                mine = b1[k][rank::2]
                n = min(mine.shape[1], v.shape[1])  # padding length is per rank
                assert torch.equal(mine[:, :n], v[:, :n]), k


@pytest.mark.parametrize(
    ("per_rank", "accum", "in_batch_max", "queries", "steps"),
    [
        (4, 1, 1024, 1, STEPS),  # every positive of the global batch is an in-batch negative
        (2, 2, 16, 1, STEPS),  # gradient accumulation (DDP no_sync) + a seeded sample of 16 in-batch negatives
        (4, 1, 1024, 3, 1),  # 3 interest queries per scenario: one step only (see below)
    ],
)
def test_two_ranks_match_one_process(store, tmp_path, per_rank, accum, in_batch_max, queries, steps):
    """Both losses, in-batch negatives across the ranks, the features item tower.

    Tolerances: the two runs differ only by float rounding (other padding lengths, summation orders), but AdamW
    divides each gradient by its own running RMS, which turns the rounding noise of parameters whose gradient is
    tiny (or exactly zero in exact arithmetic, like the attention key bias under softmax's shift invariance) into
    weight differences proportional to the learning rate: lr 1e-3 keeps them under 1e-5, while any real
    difference in the gradients (a wrong normalisation, a missing cross-rank gradient) moves weights by ~lr.
    With several interest queries per scenario the window loss's Hungarian matching is a near-tie early in training
    (the queries start almost equal), so that rounding noise may flip a match after the first update and the runs
    legitimately part; that configuration is compared over one step.  random_cutoff 0: see
    test_ranks_split_the_global_batch.
    """
    world = 2
    over = {"grad_accum": accum, "loss.in_batch_max": in_batch_max, "data.random_cutoff": 0.0, "max_steps": steps,
            "model.user_tower.queries_per_scenario": queries, "optim.lr": 1e-3}
    one = tiny_config(store, tmp_path / "one", batch_size=per_rank * world, **over)
    ddp = tiny_config(store, tmp_path / "ddp", batch_size=per_rank, **over)
    assert one.loss.in_batch_negatives and one.loss.nce_weight > 0 and one.loss.window_weight > 0
    save_yaml(ddp, tmp_path / "ddp.yaml")
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT) prints every thread's Python stack into the failure message
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [_torchrun(), "--nnodes", "1", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "redrec.cli", "train", "-c", str(tmp_path / "ddp.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["steps"] == steps

    train(one)
    # the global gradient (logged before clipping) of every step ...
    assert grad_norms(tmp_path / "ddp") == pytest.approx(grad_norms(tmp_path / "one"), rel=1e-4)
    # ... and the final weights, including the logit scale
    a = load_file(str(tmp_path / "one" / "checkpoint" / "weights.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "checkpoint" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    # the weights really moved (the comparison is not between two untouched initialisations)
    torch.manual_seed(one.seed)
    w0 = RedRec(resolve_model_config(one, EventStore(store))).state_dict()
    for k in w0:
        if k.startswith(("backbone.layers.", "head.", "item_tower.")):
            assert (w0[k] - a[f"model.{k}"]).abs().max() > 10 * 1e-5 * steps, k
