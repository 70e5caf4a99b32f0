"""The training loop: one plain PyTorch loop for one process or many (``torchrun``, DDP over gloo or NCCL).

    redrec train --config configs/train_synth.yaml           # one process
    torchrun --nproc_per_node 2 -m redrec.cli train -c ...   # data parallel (gloo on CPU, NCCL on GPU)

Per step: draw a batch of users (padding + masks, users never merged), run the user tower, and minimise
``nce_weight * L_next (eq. 6) + window_weight * L_window (eq. A5/A6)`` with AdamW, linear warm-up then cosine
decay, gradient clipping and, on GPU, bf16 autocast.  Every ``eval_every`` steps the validation cases are scored
with the same protocol as the final test.  Checkpoints (``out/checkpoint/``: safetensors weights, optimizer,
scheduler, RNG, step, the resolved config) are written atomically; ``resume: true`` continues exactly where the
last checkpoint stopped (same batches, same RNG), so a killed and resumed run ends with the same weights.

The split never trains on an evaluation target: each user's training events end at its validation/test cutoff
(see :func:`make_split`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from redrec.config import from_dict, load_config, resolve_device, save_yaml, to_dict
from redrec.data.batching import TrainDataConfig, TrainExamples
from redrec.data.store import EventStore
from redrec.errors import ConfigError
from redrec.eval.protocols import EvalCase, EvalResult, ProtocolConfig, evaluate, make_cases
from redrec.features import FeatureConfig
from redrec.losses import LogitScale, effective_groups, nce_loss, window_interest_loss
from redrec.mixing import MixingConfig
from redrec.model.config import ModelConfig
from redrec.model.item_towers import prepare_text_tower
from redrec.model.redrec import RedRec
from redrec.model.scorer import ModelScorer


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``; gradient clipping by norm."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class LossConfig:
    """Loss weights and negatives (DESIGN.md section 2).

    Attributes:
        nce_weight, window_weight: weights of the next-item NCE (eq. 6) and the window multi-interest loss (A5/A6).
        in_batch_negatives: add other positives of the batch (all processes) to the shared uniform pool.
        in_batch_max: at most this many in-batch positives (seeded sample) join the negatives of the next-item loss.
        dup_threshold: mask negatives whose cosine with the positive exceeds this (the reference's nce_thres).
        kmeans_iters: cosine k-means iterations of the window loss.
        init_temperature, max_scale: the learnable temperature starts at 1/init_temperature, capped at max_scale.
    """

    nce_weight: float = 1.0
    window_weight: float = 1.0
    in_batch_negatives: bool = True
    in_batch_max: int = 1024
    dup_threshold: float | None = 0.98
    kmeans_iters: int = 10
    init_temperature: float = 0.07
    max_scale: float = 100.0


@dataclass
class TrainConfig:
    """Everything one training run needs; saved resolved as ``out/config.yaml``.

    Attributes:
        store: event store directory.
        out: run directory (checkpoints, logs, final model, results).
        model, mixing, features, data, optim, loss: component configs.
        protocol: the evaluation protocol; it also fixes which events are held out of training.
        n_valid_users: users whose validation case is scored during training (``redrec``: a disjoint random
            subset of users; ``loo``: a random subset, validation target = the second-to-last event).
        batch_size: users per step per process; grad_accum: micro-batches per optimizer step.
        epochs / max_steps: stop at whichever comes first (max_steps 0 = no step limit).
        eval_every, log_every, ckpt_every: in optimizer steps (0 = never / only at the end).
        eval_queries: ``target_scenario`` (the target scenario's queries; all of them when the protocol has no
            target scenario) or ``all`` interests at evaluation time.
        device: ``auto`` (cuda when available), ``cpu`` or ``cuda``; precision: ``auto`` (bf16 autocast on GPU,
            fp32 on CPU), ``fp32`` or ``bf16``.
        num_threads: torch CPU threads (0 = torch's default).
        resume: continue from ``out/checkpoint`` when it exists.
        test_at_end: evaluate the test cases after training and write ``results.json``.
        progress: show a progress bar.
    """

    store: str = ""
    out: str = "runs/redrec"
    model: ModelConfig = field(default_factory=ModelConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    n_valid_users: int = 500
    batch_size: int = 32
    grad_accum: int = 1
    epochs: int = 10
    max_steps: int = 0
    seed: int = 0
    eval_every: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    eval_queries: Literal["all", "target_scenario"] = "target_scenario"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_threads: int = 0
    resume: bool = True
    test_at_end: bool = True
    progress: bool = True

    def validate(self, source: str | None = None) -> None:
        if not self.store:
            raise ConfigError(source, "store", "no event store given")
        for k in ("batch_size", "grad_accum"):
            if getattr(self, k) < 1:
                raise ConfigError(source, k, "must be >= 1")
        if self.epochs < 1 and self.max_steps < 1:
            raise ConfigError(source, "epochs", "need epochs >= 1 or max_steps >= 1")


# ----------------------------------------------------------------------------------------------------------------
# split: which events may be trained on
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    bounds: np.ndarray  # int64 [n_users]: each user's training events are [0, bounds[u])
    valid: list[EvalCase]
    test: list[EvalCase]


def make_split(store: EventStore, protocol: ProtocolConfig, n_valid: int, seed: int) -> Split:
    """Validation and test cases of ``protocol`` and the training bound of every user.

    ``loo``: test = last event, validation = the one before; training ends before the validation target.
    ``redrec``/``reference``: every eligible user gets one case (its random cutoff); ``n_valid`` of them (seeded)
    are validation users, the others test users (at most ``protocol.max_users``); training ends at each user's
    cutoff, so targets are never trained on.
    """
    bounds = store.history_lengths().astype(np.int64).copy()
    rng = np.random.default_rng(seed)
    if protocol.name == "loo":
        test = make_cases(store, protocol)
        vcfg = ProtocolConfig(**{**to_dict(protocol), "split": "valid", "max_users": None})
        valid_all = make_cases(store, vcfg)
        for c in valid_all:
            bounds[c.user] = min(bounds[c.user], c.cutoff)
        for c in test:
            bounds[c.user] = min(bounds[c.user], c.cutoff)
        pick = rng.permutation(len(valid_all))[: min(n_valid, len(valid_all))]
        valid = [valid_all[i] for i in sorted(pick)]
        return Split(bounds, valid, test)
    all_cases = make_cases(store, ProtocolConfig(**{**to_dict(protocol), "max_users": None}))
    for c in all_cases:
        first_target = c.cutoff if c.history_positions is None else int(np.min(np.setdiff1d(
            np.arange(len(store.user(c.user))), c.history_positions)))
        bounds[c.user] = min(bounds[c.user], c.cutoff, first_target)
    perm = rng.permutation(len(all_cases))
    nv = min(n_valid, max(0, len(all_cases) - 1))
    valid = [all_cases[i] for i in sorted(perm[:nv])]
    test_idx = sorted(perm[nv:])
    if protocol.max_users is not None:
        test_idx = sorted(rng.permutation(test_idx)[: protocol.max_users].tolist())
    return Split(bounds, valid, [all_cases[i] for i in test_idx])


# ----------------------------------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _maybe_init_distributed(device: torch.device) -> bool:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def _gather_rows(x: Tensor) -> Tensor:
    """Concatenate a tensor's rows from every rank, keeping the autograd path (gradients flow back to the owner)."""
    _, world, _ = _dist_info()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad = torch.zeros((m - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    parts = all_gather(torch.cat([x, pad]))
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def _others(x: Tensor) -> Tensor:
    """Rows of every *other* rank (with autograd), for cross-rank in-batch negatives."""
    rank, world, _ = _dist_info()
    if world == 1:
        return x[:0]
    allx = _gather_rows(x)
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    offs = np.cumsum([0] + [int(s.item()) for s in sizes])
    return torch.cat([allx[: offs[rank]], allx[offs[rank + 1] :]])


def step_counts(batches: list[dict[str, Tensor]], query_group: Tensor) -> tuple[float, float]:
    """``(next-item targets, window targets)`` of one optimizer step: summed over its micro-batches and, under
    DDP, over every rank (one all-reduce).  The loss is normalised by these, so a step's gradient is the mean over
    all of its targets, whatever the split into processes and micro-batches.  Window targets of a scenario without
    interest queries are not counted (the window loss leaves them out); with shared queries (query group -1) every
    window target counts (:func:`redrec.losses.effective_groups`)."""
    dev = batches[0]["mask"].device
    qg = query_group.to(dev)
    n_next = sum(b["mask"].sum() for b in batches)
    n_win = sum((b["window_mask"] & torch.isin(effective_groups(b["window_scenario"], qg), qg)).sum() for b in batches)
    t = torch.stack([torch.as_tensor(n_next), torch.as_tensor(n_win)]).to(dev, torch.float64)
    _, world, _ = _dist_info()
    if world > 1:
        dist.all_reduce(t)  # on the batch's device: NCCL reduces CUDA tensors only
    return float(t[0]), float(t[1])


# ----------------------------------------------------------------------------------------------------------------
# the loss of one batch
# ----------------------------------------------------------------------------------------------------------------
def compute_loss(model: RedRec, scale_mod: LogitScale, batch: dict[str, Tensor], cfg: TrainConfig,
                 norm: tuple[float, float] | None = None) -> tuple[Tensor, dict[str, float]]:
    """``nce_weight * L_next + window_weight * L_window`` of one (micro-)batch.

    Each loss is a sum over this batch's targets divided by ``norm`` = the (next-item, window) target counts of
    the whole optimizer step (all micro-batches, all ranks; :func:`step_counts`, which computes them for this batch
    alone when ``norm`` is None), times the world size because DDP averages the ranks' gradients.  So the
    accumulated DDP gradient equals the single-process gradient of the mean loss over the step's global batch.
    ``stats`` holds this batch's local *mean* losses (for logging).
    """
    core = model.module if hasattr(model, "module") else model
    if norm is None:
        norm = step_counts([batch], core.query_group)
    n_next_all, n_win_all = max(1.0, norm[0]), max(1.0, norm[1])
    out = model(batch)
    scale = scale_mod()
    rank, world, _ = _dist_info()
    needs = getattr(core.item_tower, "needs_features", False)
    neg_item = batch["neg_item"]
    neg_vec = core.item_vectors(neg_item, batch.get("neg_feat")) if neg_item.numel() else out["seq"].new_zeros((0, core.cfg.embed_dim))
    stats: dict[str, float] = {"scale": float(scale.detach())}
    total = out["seq"].sum() * 0.0

    if cfg.loss.nce_weight > 0:
        m = batch["mask"]
        q = out["seq"][m]
        pos_item = batch["next_item"][m]
        pos_vec = core.item_vectors(pos_item, batch["next_feat"][m] if needs else None)
        ni, nv = neg_item, neg_vec
        # each position's user, numbered by its place in the global batch (rank r holds users r, r + world, ...,
        # see TrainExamples.batches), so that one process and several number them alike
        row_user = torch.arange(m.shape[0], device=m.device)[:, None].expand_as(m)[m] * world + rank
        ng = torch.full_like(neg_item, -1)
        if cfg.loss.in_batch_negatives:
            # in-batch negatives = up to `in_batch_max` positives of the (global) batch, sampled with the batch's
            # seeded generator; the full N x N matrix would be quadratic in the number of positions
            all_item, all_vec, all_user = _gather_rows(pos_item), _gather_rows(pos_vec), _gather_rows(row_user)
            if world > 1:  # the gathered rows in global-batch order, so the sample picks what one process would
                order = torch.sort(all_user, stable=True).indices
                all_item, all_vec, all_user = all_item[order], all_vec[order], all_user[order]
            k = min(cfg.loss.in_batch_max, all_item.shape[0])
            g = torch.Generator().manual_seed(int(batch["neg_item"][:4].sum()) if neg_item.numel() else 0)
            pick = torch.randperm(all_item.shape[0], generator=g)[:k].to(all_item.device)
            ni, nv = torch.cat([all_item[pick], neg_item]), torch.cat([all_vec[pick], neg_vec])
            ng = torch.cat([all_user[pick], ng])
        # a user's own other positives (its past and future items) are not its negatives
        l_sum = nce_loss(q, pos_item, pos_vec, ni, nv, scale, in_batch=False, dup_threshold=cfg.loss.dup_threshold,
                         reduction="sum", row_group=row_user, neg_group=ng)
        l_next = l_sum / n_next_all * world
        total = total + cfg.loss.nce_weight * l_next
        stats["loss_next"] = float(l_sum.detach()) / max(1, q.shape[0])

    if cfg.loss.window_weight > 0:
        wm = batch["window_mask"]
        t_vec = core.item_vectors(batch["window_item"], batch["window_feat"] if needs else None)
        ni, nv = neg_item, neg_vec
        if cfg.loss.in_batch_negatives and world > 1:
            ni = torch.cat([_others(batch["window_item"][wm]), neg_item])
            nv = torch.cat([_others(t_vec[wm]), neg_vec])
        l_win, wstats = window_interest_loss(
            out["interests"], core.query_group, t_vec, batch["window_item"], batch["window_scenario"], wm,
            ni, nv, scale, kmeans_iters=cfg.loss.kmeans_iters, dup_threshold=cfg.loss.dup_threshold,
            in_batch=cfg.loss.in_batch_negatives,
        )
        # window_interest_loss returns a mean over the targets it used (n_targets of them)
        l_window = l_win * float(wstats["n_targets"]) / n_win_all * world
        total = total + cfg.loss.window_weight * l_window
        stats["loss_window"] = float(l_win.detach())
    stats["loss"] = cfg.loss.nce_weight * stats.get("loss_next", 0.0) + cfg.loss.window_weight * stats.get("loss_window", 0.0)
    return total, stats


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: RedRec, scale_mod: LogitScale, opt: torch.optim.Optimizer,
                    sched: Any, state: dict[str, Any], cfg: TrainConfig) -> None:
    """Atomic: everything goes to ``path.tmp`` (``state.json`` last) which then replaces ``path``.

    A directory cannot be renamed over a non-empty one, so the swap is two renames (``path -> path.old``,
    ``path.tmp -> path``); a kill between them leaves no ``path``, which :func:`recover_checkpoint` repairs
    from the complete ``path.tmp`` (or ``path.old``) before the next load.
    """
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights.update({f"scale.{k}": v.detach().cpu().contiguous() for k, v in scale_mod.state_dict().items()})
    save_file(weights, str(tmp / "weights.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), "state": state}, tmp / "trainer.pt")
    save_yaml(cfg, tmp / "config.yaml")
    (tmp / "state.json").write_text(json.dumps(state))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(path: Path) -> None:
    """Repair what an interrupted :func:`save_checkpoint` left: ``path`` missing after the first rename is
    restored from the complete ``path.tmp`` (its ``state.json``, written last, exists) or else from ``path.old``;
    then the leftover ``path.tmp`` / ``path.old`` are removed (a half-written ``path.tmp`` is never loaded)."""
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    if not path.exists():
        if (tmp / "state.json").exists():
            tmp.rename(path)
        elif (old / "state.json").exists():
            old.rename(path)
    for p in (tmp, old):
        if path.exists():
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model: RedRec, scale_mod: LogitScale, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    w = load_file(str(path / "weights.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in w.items() if k.startswith("model.")})
    scale_mod.load_state_dict({k[6:]: v for k, v in w.items() if k.startswith("scale.")})
    tr = torch.load(path / "trainer.pt", weights_only=False)
    opt.load_state_dict(tr["optimizer"])
    sched.load_state_dict(tr["scheduler"])
    torch.set_rng_state(tr["torch_rng"])
    np.random.set_state(tr["numpy_rng"])
    return dict(tr["state"])


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
def resolve_model_config(cfg: TrainConfig, store: EventStore) -> ModelConfig:
    """Fill the data-dependent model fields (items, feature width, scenarios, actions)."""
    m = from_dict(ModelConfig, to_dict(cfg.model))
    m.item_tower.n_items = store.n_items
    m.scenarios = store.scenarios
    m.n_actions = len(store.actions_names)
    kind = m.item_tower.kind
    if kind in ("features", "multimodal"):
        if not store.vector_dim:
            what = "item vectors" if kind == "features" else "item vectors (the image features)"
            raise ConfigError(None, "model.item_tower.kind", f"{kind!r} needs {what} and {store.path} has none; use 'id' or 'text'")
        m.item_tower.feature_dim = store.vector_dim
    if kind in ("text", "multimodal"):
        from redrec.model.text import encoder_width

        m.item_tower.text.validate()
        m.item_tower.text.dim = encoder_width(m.item_tower.text)
    m.user_tower.max_positions = max(m.user_tower.max_positions, cfg.mixing.last_n + 1)
    return m


def _lr_lambda(opt_cfg: OptimConfig, total_steps: int):
    def f(step: int) -> float:
        if step < opt_cfg.warmup_steps:
            return (step + 1) / max(1, opt_cfg.warmup_steps)
        t = (step - opt_cfg.warmup_steps) / max(1, total_steps - opt_cfg.warmup_steps)
        return opt_cfg.min_lr_ratio + (1 - opt_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _param_groups(modules: list[nn.Module], wd: float, lr: float, encoder_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not embeddings, queries, norms, biases); a fine-tuned
    pretrained text encoder (``item_tower...encoder``) at ``encoder_lr_scale`` x the learning rate."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for mod in modules:
        for name, p in mod.named_parameters():
            if not p.requires_grad:
                continue
            decays = p.ndim >= 2 and "emb" not in name and "queries" not in name
            groups.setdefault((decays, ".encoder." in f".{name}"), []).append(p)
    return [{"params": ps, "weight_decay": wd if d else 0.0, "lr": lr * (encoder_lr_scale if enc else 1.0)}
            for (d, enc), ps in sorted(groups.items(), key=lambda kv: (kv[0][1], not kv[0][0]))]


def validate_model(model: RedRec, store: EventStore, cases: list[EvalCase], cfg: TrainConfig, device: torch.device,
                   progress: bool = False) -> EvalResult:
    scorer = ModelScorer(model, cfg.mixing, cfg.features, queries=cfg.eval_queries, device=device)
    proto = ProtocolConfig(**{**to_dict(cfg.protocol), "max_users": None})
    return evaluate(store, cases, scorer, proto, progress=progress, batch_size=128, name=scorer.name, keep_per_user=False)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (steps, final losses, validation/test metrics, paths)."""
    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device, "train config")
    distributed = _maybe_init_distributed(device)
    rank, world, local_rank = _dist_info()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    is_main = rank == 0
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    store = EventStore(cfg.store)
    split = make_split(store, cfg.protocol, cfg.n_valid_users, cfg.seed)
    model_cfg = resolve_model_config(cfg, store)
    torch.manual_seed(cfg.seed)
    model = RedRec(model_cfg)
    # text towers: item text -> cached frozen vectors, or token ids for fine-tuning (saved with the model)
    prepare_text_tower(model, store, progress=cfg.progress and rank == 0, device=device)
    model = model.to(device)
    scale_mod = LogitScale(1.0 / cfg.loss.init_temperature, cfg.loss.max_scale).to(device)
    examples = TrainExamples(store, split.bounds, cfg.mixing, cfg.features, cfg.data,
                             with_features=getattr(model.item_tower, "needs_features", False))
    if len(examples) == 0:
        raise ConfigError(None, "data.min_input", f"no user of {store.path} has enough training events")
    micro_per_epoch = examples.n_batches(cfg.batch_size, world)
    if micro_per_epoch == 0:
        raise ConfigError(None, "batch_size", f"{len(examples)} training users < batch_size x processes = {cfg.batch_size * world}")
    if micro_per_epoch < cfg.grad_accum:
        raise ConfigError(None, "grad_accum", f"an epoch has only {micro_per_epoch} micro-batches of {cfg.batch_size} x "
                          f"{world} users, fewer than grad_accum = {cfg.grad_accum}")
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps) if cfg.epochs else cfg.max_steps
    opt = torch.optim.AdamW(_param_groups([model, scale_mod], cfg.optim.weight_decay, cfg.optim.lr,
                                          model_cfg.item_tower.text.encoder_lr_scale), lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.optim, total_steps))
    state = {"step": 0, "epoch": 0, "micro": 0, "best_valid": None}
    if cfg.resume:
        if is_main:
            recover_checkpoint(ckpt)
        if distributed:
            dist.barrier()  # the other ranks load what rank 0 has repaired
        if (ckpt / "trainer.pt").exists():
            state = load_checkpoint(ckpt, model, scale_mod, opt, sched)
    start_step = int(state["step"])
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
        save_yaml(model_cfg, out / "model_config.yaml")
        _trim_log(out / "log.jsonl", start_step)
    ddp_model: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        scale_mod = DDP(scale_mod, device_ids=[device.index] if device.type == "cuda" else None)  # type: ignore[assignment]

    from tqdm.auto import tqdm

    log_f = open(out / "log.jsonl", "a") if is_main else None
    tb = None
    if is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard is optional
            tb = None
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", disable=not (cfg.progress and is_main))
    t0 = time.perf_counter()
    seqs_seen = 0
    last_stats: dict[str, float] = {}

    def log(rec: dict[str, Any]) -> None:
        if log_f is not None:
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(k, v, rec["step"])

    def run_validation() -> None:
        if not split.valid:
            return
        r = validate_model(model, store, split.valid, cfg, device)
        rec = {"step": state["step"], **{f"valid/{k}": v for k, v in r.metrics.items()}}
        log(rec)
        key = "hr@10"
        if state["best_valid"] is None or r.metrics[key] > state["best_valid"]:
            state["best_valid"] = r.metrics[key]
        bar.set_postfix(valid_hr10=f"{r.metrics[key]:.4f}")
        model.train()

    model.train()
    done = state["step"] >= total_steps
    # an epoch is steps_per_epoch whole optimizer steps; its last (< grad_accum) micro-batches are skipped, so no
    # step ever mixes two epochs and every checkpoint falls on a step boundary
    micro_limit = steps_per_epoch * cfg.grad_accum
    while not done:
        epoch = state["epoch"]
        micro_iter = examples.batches(cfg.batch_size, epoch, cfg.seed, rank, world, start_batch=state["micro"])
        for group in _step_groups(micro_iter, cfg.grad_accum, max(0, micro_limit - state["micro"])):
            group = [{k: v.to(device) for k, v in b.items()} for b in group]
            # one negative pool per optimizer step (the first micro-batch's), as one batch of the combined size has
            for b in group[1:]:
                for k in ("neg_item", "neg_feat"):
                    if k in group[0]:
                        b[k] = group[0][k]
            norm = step_counts(group, model.query_group)
            micro_stats = []
            for j, batch in enumerate(group):
                with contextlib.ExitStack() as stack:
                    if distributed and j < len(group) - 1:  # gradients are all-reduced after the last micro-batch
                        stack.enter_context(ddp_model.no_sync())  # type: ignore[operator]
                        stack.enter_context(scale_mod.no_sync())  # type: ignore[operator]
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        loss, stats = compute_loss(ddp_model, scale_mod, batch, cfg, norm=norm)  # type: ignore[arg-type]
                    loss.backward()
                micro_stats.append(stats)
                seqs_seen += batch["mask"].shape[0]
            state["micro"] += len(group)
            stats = {k: float(np.mean([s[k] for s in micro_stats])) for k in micro_stats[0]}
            last_stats = stats
            gnorm = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(scale_mod.parameters()), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
            if cfg.log_every and state["step"] % cfg.log_every == 0:
                el = time.perf_counter() - t0
                log({"step": state["step"], "epoch": epoch, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                     "seqs_per_s": seqs_seen * world / max(el, 1e-9), **_mean_over_ranks(stats, device)})
            if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                run_validation()
            if is_main and cfg.ckpt_every and state["step"] % cfg.ckpt_every == 0:
                save_checkpoint(ckpt, model, _core(scale_mod), opt, sched, state, cfg)
            if state["step"] >= total_steps:
                done = True
                break
        if not done:
            state["epoch"] += 1
            state["micro"] = 0
    bar.close()
    summary: dict[str, Any] = {"steps": state["step"], "start_step": start_step, "train_seconds": time.perf_counter() - t0,
                               "last": last_stats}
    if is_main:
        save_checkpoint(ckpt, model, _core(scale_mod), opt, sched, state, cfg)
        model.save_pretrained(out / "model")
        if split.valid:
            rv = validate_model(model, store, split.valid, cfg, device)
            log({"step": state["step"], **{f"valid/{k}": v for k, v in rv.metrics.items()}})
            summary["valid"] = rv.metrics
        if cfg.test_at_end and split.test:
            from redrec.eval.report import write_json

            rt = validate_model(model, store, split.test, cfg, device, progress=cfg.progress)
            rt.config = {**rt.config, "train": to_dict(cfg)}
            write_json(out / "results.json", [rt])
            summary["test"] = rt.metrics
            summary["test_result"] = rt
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "test_result"}, indent=2, default=str))
    if log_f is not None:
        log_f.close()
    if tb is not None:
        tb.close()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _core(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


def _step_groups(batches: Iterable[dict[str, Tensor]], k: int, n: int) -> Iterator[list[dict[str, Tensor]]]:
    """The first ``n`` micro-batches in groups of ``k`` (one optimizer step each; a last partial group is dropped)."""
    group: list[dict[str, Tensor]] = []
    for b in itertools.islice(batches, n):
        group.append(b)
        if len(group) == k:
            yield group
            group = []


def _mean_over_ranks(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged statistics over the ranks (every rank logs at the same steps)."""
    _, world, _ = _dist_info()
    if world == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


def _trim_log(path: Path, last_step: int) -> None:
    """Drop the log records of steps after ``last_step`` (written after the checkpoint a run resumes from, or by an
    earlier run when starting over), so that every step appears once."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)
