"""The training loop (redrec.train) on a tiny real store and a tiny real model.

* exact resume: a run killed with SIGKILL (a real ``redrec train`` subprocess) and resumed ends with weights
  bit-identical to an uninterrupted run, also when the kill hit the middle of a checkpoint write;
* the loss goes down, the JSONL and tensorboard logs exist, ``out/config.yaml`` round-trips;
* the split never trains on an evaluation target;
* gradient accumulation is the same update as one bigger batch (without in-batch negatives).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_store, tiny_train_config
from safetensors.torch import load_file

from redrec.config import from_dict, load_yaml, save_yaml, to_dict
from redrec.data.batching import TrainDataConfig, TrainExamples
from redrec.data.store import EventStore
from redrec.eval.protocols import ProtocolConfig, make_cases
from redrec.features import FeatureConfig
from redrec.mixing import MixingConfig
from redrec.train import TrainConfig, make_split, train

REPO = Path(__file__).resolve().parents[1]
STEPS = 10  # length of the resume runs
KILL_AT = 3  # the killed run is stopped once a checkpoint of at least this step exists


def tiny_config(store: Path, out: Path, **overrides) -> TrainConfig:
    return tiny_train_config(store, out, **{"batch_size": 8, "max_steps": STEPS, "n_valid_users": 8, **overrides})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("train_store"))


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory) -> dict:
    """Run A: STEPS uninterrupted steps (in this process).  Run B: the same config in a ``redrec train``
    subprocess, SIGKILLed as soon as its checkpoint reaches KILL_AT; three pristine copies of B's directory."""
    root = tmp_path_factory.mktemp("resume")
    cfg_a = tiny_config(store, root / "A", ckpt_every=1)
    train(cfg_a)

    cfg_b = tiny_config(store, root / "B", ckpt_every=1)
    save_yaml(cfg_b, root / "b.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "redrec.cli", "train", "-c", str(root / "b.yaml")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while True:
            # state.json is inside the checkpoint directory, which appears by a rename once complete
            if (_step_of(root / "B" / "checkpoint") or 0) >= KILL_AT:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the training subprocess ended before it was killed: rc {proc.returncode}\n"
                            f"{proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 120 s")
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the kill may land in the middle of a checkpoint save: the newest complete checkpoint is `checkpoint`, else a
    # complete `checkpoint.tmp` (killed between the two renames), else `checkpoint.old`
    b = root / "B"
    killed_at = next(s for s in (_step_of(b / "checkpoint"), _step_of(b / "checkpoint.tmp"),
                                 _step_of(b / "checkpoint.old")) if s is not None)
    # the kill must really have interrupted the run, or the resume would prove nothing
    assert KILL_AT <= killed_at < STEPS, killed_at
    copies = {"B1": root / "B1"}
    shutil.copytree(b, copies["B1"])
    # pristine copies for the simulated interruptions: one complete checkpoint of step `killed_at`, no leftovers
    for name in ("B2", "B3"):
        copies[name] = root / name
        copies[name].mkdir()
        for p in b.iterdir():
            if not p.name.startswith("checkpoint"):
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, copies[name] / p.name)
        src = next(d for d in (b / "checkpoint", b / "checkpoint.tmp", b / "checkpoint.old") if _step_of(d) == killed_at)
        shutil.copytree(src, copies[name] / "checkpoint")
    return {"A": root / "A", "cfg": cfg_b, "killed_at": killed_at, **copies}


def _step_of(ckpt: Path) -> int | None:
    """The step of a complete checkpoint directory (state.json is written last), None if there is none."""
    try:
        return int(json.loads((ckpt / "state.json").read_text())["step"])
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, KeyError):
        return None


def resume(runs: dict, name: str) -> dict:
    cfg = from_dict(TrainConfig, {**to_dict(runs["cfg"]), "out": str(runs[name])})
    return train(cfg)


def no_leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint."))


def test_killed_run_resumes_bit_identically(runs):
    b = runs["B1"]
    # the checkpoint the kill left behind is complete and loadable
    ck = next(d for d in (b / "checkpoint", b / "checkpoint.tmp", b / "checkpoint.old") if _step_of(d) is not None)
    assert load_file(str(ck / "weights.safetensors"))
    assert torch.load(ck / "trainer.pt", weights_only=False)["state"]["step"] == runs["killed_at"]
    assert load_yaml(TrainConfig, ck / "config.yaml") == runs["cfg"]
    if ck.name == "checkpoint":
        # a half-written .tmp (as a kill during the next save leaves) must be ignored and cleaned
        tmp = b / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "weights.safetensors").write_bytes((ck / "weights.safetensors").read_bytes()[:100])

    summary = resume(runs, "B1")
    assert summary["start_step"] == runs["killed_at"]
    assert summary["steps"] == STEPS
    assert_bit_identical(weights(b), weights(runs["A"]))
    assert_bit_identical(load_file(str(b / "checkpoint" / "weights.safetensors")),
                         load_file(str(runs["A"] / "checkpoint" / "weights.safetensors")))  # + the logit scale
    assert no_leftovers(b) == []
    # the log holds every step once (records written after the checkpoint, before the kill, are dropped), and
    # the losses of the whole trajectory are those of the uninterrupted run
    steps_b = [r for r in log_records(b) if "loss" in r]
    steps_a = [r for r in log_records(runs["A"]) if "loss" in r]
    assert [r["step"] for r in steps_b] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["lr"]) for r in steps_b] == [(r["loss"], r["lr"]) for r in steps_a]


def test_kill_between_checkpoint_renames_recovers(runs):
    """save_checkpoint renames checkpoint -> checkpoint.old, then checkpoint.tmp -> checkpoint: a kill between the
    two leaves no ``checkpoint`` at all; the complete .tmp must be picked up, not a restart from step 0."""
    b = runs["B2"]
    (b / "checkpoint").rename(b / "checkpoint.old")
    shutil.copytree(b / "checkpoint.old", b / "checkpoint.tmp")
    summary = resume(runs, "B2")
    assert summary["start_step"] == runs["killed_at"]
    assert_bit_identical(weights(b), weights(runs["A"]))
    assert no_leftovers(b) == []


def test_kill_while_writing_after_rename_recovers_old(runs):
    """No ``checkpoint``, a complete ``.old`` and a half-written ``.tmp``: resume from ``.old``."""
    b = runs["B3"]
    (b / "checkpoint").rename(b / "checkpoint.old")
    (b / "checkpoint.tmp").mkdir()
    (b / "checkpoint.tmp" / "trainer.pt").write_bytes(b"\0" * 10)
    summary = resume(runs, "B3")
    assert summary["start_step"] == runs["killed_at"]
    assert_bit_identical(weights(b), weights(runs["A"]))
    assert no_leftovers(b) == []




@pytest.mark.parametrize(
    ("tower", "dup_threshold"),
    [
        ("features", 0.98),
        ("id", None),
        ("id", 0.98),
    ],
)
def test_loss_decreases_logs_and_config(store, tmp_path, tower, dup_threshold):
    cfg = tiny_config(store, tmp_path / "run", max_steps=30,
                      **{"model.item_tower.kind": tower, "loss.dup_threshold": dup_threshold})
    summary = train(cfg)
    assert summary["steps"] == 30
    recs = [r for r in log_records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 31))
    losses = np.array([r["loss"] for r in recs])
    assert np.isfinite(losses).all()
    first, last = losses[:3].mean(), losses[-3:].mean()
    assert last < first - 0.5, (tower, losses.round(2).tolist())
    for key in ("loss_next", "loss_window", "lr", "grad_norm", "scale", "seqs_per_s"):
        assert key in recs[0]
    assert any("valid/hr@10" in r for r in log_records(tmp_path / "run"))
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    # the resolved config round-trips
    assert load_yaml(TrainConfig, tmp_path / "run" / "config.yaml") == cfg
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["loo", "redrec"])
def test_split_never_trains_on_eval_targets(store, name):
    st = EventStore(store)
    proto = ProtocolConfig(name=name, max_users=30 if name == "redrec" else None)
    split = make_split(st, proto, n_valid=20, seed=0)
    assert len(split.valid) == 20 and len(split.test) > 0
    for c in split.valid + split.test:
        assert split.bounds[c.user] <= c.cutoff, (c.user, split.bounds[c.user], c.cutoff)
    # independently of the split's own case lists: every case the protocol can produce for any user
    full = ProtocolConfig(**{**to_dict(proto), "max_users": None})
    all_cases = make_cases(st, full)
    if name == "loo":
        all_cases += make_cases(st, ProtocolConfig(name="loo", split="valid"))
    else:
        assert not {c.user for c in split.valid} & {c.user for c in split.test}
    assert all_cases
    for c in all_cases:
        assert split.bounds[c.user] <= c.cutoff
    # and the training examples only read events before the bound: the window targets are training events (in
    # order), with ``last`` exactly the last ones before the bound
    for mode in ("last", "per_scenario"):
        ex = TrainExamples(st, split.bounds, MixingConfig(last_n=32), FeatureConfig(),
                           TrainDataConfig(window_mode=mode, random_cutoff=0.0), with_features=False)
        rng = np.random.default_rng(0)
        for u in ex.users[:40]:
            e = ex.example(int(u), rng)
            b = int(split.bounds[u])
            ev = st.user(int(u))
            w = len(e["window_item"])
            assert w >= 1
            if mode == "last":
                np.testing.assert_array_equal(e["window_item"], ev.item[b - w : b])
            assert _is_subsequence(list(zip(e["window_item"], e["window_scenario"], strict=True)),
                                   list(zip(ev.item[:b], ev.scenario[:b], strict=True)))


def _is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def _first_step(store, out, **kw) -> tuple[dict[str, torch.Tensor], float]:
    cfg = tiny_config(store, out, max_steps=1, n_valid_users=0, **kw)
    train(cfg)
    return weights(out), log_records(out)[0]["grad_norm"]


def test_grad_accum_equals_bigger_batch(store, tmp_path):
    """grad_accum=2 x batch_size=4 is the update of batch_size=8: the loss is normalised by the count of the whole
    optimizer step and the micro-batches share the step's negative pool.  Without in-batch negatives only, because
    with them a row's negatives are the other rows *of its micro-batch*: 3 other users in a micro-batch of 4
    against 7 in a batch of 8, so the two losses (and gradients) are genuinely different functions."""
    # random_cutoff 0: TrainExamples draws each example's random cutoff from a generator seeded with the batch
    # index, so micro-batches 0 and 1 of 4 users would not draw what batch 0 of 8 users draws
    # lr 1e-3: AdamW turns the rounding noise of near-zero gradients (the attention key bias has an exactly zero
    # one) into differences proportional to lr; a real gradient difference moves weights by ~lr = 5e-4 here
    off = {"loss.in_batch_negatives": False, "data.random_cutoff": 0.0, "optim.lr": 1e-3}
    w8, g8 = _first_step(store, tmp_path / "b8", batch_size=8, **off)
    w4, g4 = _first_step(store, tmp_path / "b4x2", batch_size=4, grad_accum=2, **off)
    # grad_norm is the norm before clipping: it checks the gradient's scale; the weights (AdamW's first update is
    # about lr * sign(grad)) its direction
    assert g4 == pytest.approx(g8, rel=1e-5)
    for k in w8:
        torch.testing.assert_close(w4[k], w8[k], rtol=0, atol=1e-5, msg=k)
    # with in-batch negatives the same comparison does see a difference (the test can tell them apart)
    _, g8_ib = _first_step(store, tmp_path / "b8ib", batch_size=8, **{"data.random_cutoff": 0.0})
    _, g4_ib = _first_step(store, tmp_path / "b4x2ib", batch_size=4, grad_accum=2, **{"data.random_cutoff": 0.0})
    assert abs(g4_ib - g8_ib) > 1e-3 * g8_ib


def test_device_settings_are_checked(store, tmp_path):
    """``resolve_device``: ``auto`` falls back to cpu; a bad string or a GPU this process cannot use is a
    ConfigError naming the field (training, serving), before any work."""
    from redrec.config import resolve_device
    from redrec.errors import ConfigError

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'device': 'banana' is not a torch device"):
        resolve_device("banana")
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
        return
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"'{spec}' requested but"):
            resolve_device(spec)
    cfg = tiny_train_config(store, tmp_path / "run", device="cuda", max_steps=1)
    with pytest.raises(ConfigError, match="train config: field 'device'"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing written


def test_per_rank_device_takes_the_local_rank_gpu(monkeypatch):
    """``per_rank``: an index-less cuda device (``cuda``, ``auto`` with a GPU) is ``cuda:LOCAL_RANK`` modulo the
    visible GPUs (what ``redrec embed users`` under torchrun uses); an explicit index and cpu are kept.  The GPU
    count is patched (this machine may have none): the test checks the index arithmetic, not a GPU."""
    from redrec.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda", per_rank=True) == torch.device("cuda", 1)
    assert resolve_device("auto", per_rank=True) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", per_rank=True) == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")  # without per_rank: as given
    assert resolve_device("cpu", per_rank=True) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda", per_rank=True) == torch.device("cuda", 0)
