"""Shared fixtures.  The default suite builds its own data; tests that read ../shared/datasets skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("REDREC_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def shared_dataset(name: str) -> Path:
    """Path of a public dataset in ../shared/datasets, or skip the test with the reason."""
    path = SHARED_DATASETS / name
    if not (path / "events.csv.gz").exists():
        pytest.skip(f"public dataset {name!r} not found at {path} (set REDREC_SHARED_DATASETS to its parent folder)")
    return path


def no_temp_leftovers(parent: Path) -> list[str]:
    """Names of temporary/partial outputs an import may have left in ``parent`` (should be empty)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or "spill" in p.name or ".old-" in p.name))


# ---- shared by the training tests ------------------------------------------------------------------------------
TINY_TRAIN = {
    "model.user_tower.hidden_size": 32, "model.user_tower.num_layers": 1, "model.user_tower.num_heads": 2,
    "model.user_tower.num_kv_heads": 1, "model.user_tower.intermediate_size": 64,
    "model.item_tower.mlp_hidden": 32, "mixing.last_n": 32, "data.n_negatives": 64,
    # a short warm-up, so that the cosine part of the schedule (which depends on the total steps) is used
    "optim.lr": 1e-2, "optim.warmup_steps": 2,
    "test_at_end": False, "progress": False, "eval_every": 0, "log_every": 1, "ckpt_every": 0, "num_threads": 1,
}


def tiny_train_config(store: Path, out: Path, **overrides):
    """A TrainConfig with a tiny model (well under a second per 10 steps on one thread); dotted override keys."""
    from redrec.config import from_dict, set_dotted, to_dict
    from redrec.train import TrainConfig

    data = to_dict(TrainConfig(store=str(store), out=str(out)))
    for k, v in {**TINY_TRAIN, **overrides}.items():
        set_dotted(data, k, v)
    return from_dict(TrainConfig, data)


def make_tiny_store(root: Path) -> Path:
    """120 synthetic users x 300 items (homefeed / ads / search) imported into ``root/store``."""
    from redrec.data.redmmu import import_redmmu
    from redrec.data.synth import SynthConfig, write_synthetic

    cfg = SynthConfig(n_users=120, n_items=300, homefeed_mean_len=40, ads_mean_len=8, search_mean_len=4, max_len=80,
                      write_truth=False)
    write_synthetic(root / "raw", cfg)
    import_redmmu(root / "raw", root / "store", progress=False)
    return root / "store"


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Every test leaves torch's thread count as it found it (the engine, trainer and server change it)."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def build_store(tmp_path, users, n_items, *, scenarios=("homefeed", "ads"), vectors=None, with_target=False, name="s"):
    """``users``: per user a list of ``(item, scenario, timestamp)`` or ``(item, scenario, timestamp, target)``."""
    from redrec.data.store import EventStoreWriter

    with EventStoreWriter(tmp_path / name, scenarios=list(scenarios), actions=["click"], with_target=with_target) as w:
        w.add_items([f"i{i}" for i in range(n_items)], vectors=vectors)
        ev = [e for u in users for e in u]
        w.add_users(
            [f"u{k}" for k in range(len(users))],
            counts=[len(u) for u in users],
            item=[e[0] for e in ev],
            scenario=[e[1] for e in ev],
            timestamp=[e[2] for e in ev],
            target=[e[3] for e in ev] if with_target else None,
        )
        return w.commit()
