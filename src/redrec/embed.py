"""Embedding generation: item vectors and user interest vectors of a trained model, sharded, resumable, merged.

    redrec embed items --run RUN --store STORE --out DIR             # one process (merges at the end)
    torchrun --nproc_per_node 8 -m redrec.cli embed users --run-dir RUN --out DIR   # (torchrun eats --run)
    redrec embed merge DIR                                            # after every rank is done

Rows: ``items``: every item of the store (row = item index), one unit vector ``[d]`` each.  ``users``: with the
``latest`` protocol every user of the store (row = user index; input = the user's whole history, prediction time
= its last event's timestamp: the serving case), otherwise one row per :func:`redrec.eval.protocols.make_cases`
case (the vectors a protocol evaluation needs); each row holds all ``K`` interest vectors ``[K, d]`` of the model
(``manifest["query_group"][k]`` = the store scenario index of query ``k``, so an evaluator can keep the target
scenario's queries only).  The model code paths are :func:`redrec.model.scorer.all_item_vectors` (items) and
:meth:`redrec.model.scorer.ModelScorer.score_cases` (users), the ones evaluation uses.

Sharding: rank ``r`` of ``W`` processes (``--rank/--world-size``, else torchrun's ``RANK``/``WORLD_SIZE``) takes a
contiguous row range; the ranges split the rows as evenly as possible *in whole batches* (every boundary is a
multiple of ``batch_size``), so every forward pass sees the same rows whatever ``W`` is and the merged output is
bit-identical for any number of processes.  No collective communication: ranks may run on different machines at
different times, and their shard directories are copied into one ``DIR`` before the merge.

On-disk format (``DIR``)::

    manifest.json                       {"format": "redrec-embeddings", "version": 1, "kind": "items"|"users",
                                         "dim": d, "vectors_per_row": K (1 for items), "store": abs path,
                                         "n_rows": N, "world_size": W, "source": run/model path,
                                         "protocol": ProtocolConfig dict | "latest" | null (items),
                                         "query_group": [K ints] (users), "created": ISO time, "merged": bool,
                                         "config": EmbedConfig, "model_sha256", "store_fingerprint", ...}
    shard-RRRRR-of-WWWWW/shard.json     the manifest fields + "rank", "row_start", "row_end", "n_parts"
    shard-RRRRR-of-WWWWW/part-IIIIII.safetensors
                                        embeddings float32 [n, d] (items) or [n, K, d] (users),
                                        row int64 [n] (global row numbers), users also user int64 [n] (store user
                                        index) and cutoff int64 [n]; metadata: row range + crc32 of the tensors
    shard-RRRRR-of-WWWWW/DONE           written when the rank has finished
    embeddings.npy                      (merge) float32 [N, d] or [N, K, d], np.load(mmap_mode="r")
    ids.parquet                         (merge) row int64, index int64 (store item/user index), id string
                                        (the store's external id), users also cutoff int64

Every file is written to a temporary name and renamed into place.  Resume: rerunning the same command skips every
part that exists and verifies (shapes, rows, crc32); a part that fails verification is recomputed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from redrec.config import from_dict, resolve_device, set_dotted, to_dict
from redrec.errors import ConfigError, DataError
from redrec.fileio import sha256_file

FORMAT = "redrec-embeddings"
VERSION = 1
DEFAULT_BATCH = {"items": 8192, "users": 256}
#: manifest fields that must agree between the manifest, every shard and a resumed run (paths may differ between
#: machines: the store and the model are identified by content instead)
_COMPAT_KEYS = ("format", "version", "kind", "dim", "vectors_per_row", "n_rows", "world_size", "protocol",
                "query_group", "mixing", "features", "model_sha256", "store_fingerprint")
_COMPAT_CONFIG = ("batch_size", "part_rows", "precision")
_SHARD_KEYS = ("rank", "row_start", "row_end", "n_parts")


# ----------------------------------------------------------------------------------------------------------------
# config and results
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EmbedConfig:
    """How embeddings are computed and written (saved resolved in the manifest as ``config``).

    Attributes:
        batch_size: rows per forward pass (0 = 8192 for items, 256 for users).  Part of the output layout: a
            resumed run and every rank must use the same value.
        part_rows: rows per part file (rounded up to a multiple of ``batch_size``); a part is the unit of resume.
        device: ``auto`` (cuda when available; ``cuda:LOCAL_RANK`` under torchrun), ``cpu`` or ``cuda``.
        precision: ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 on GPU, fp32 on CPU).
        num_threads: torch CPU threads (0 = torch's default).
        progress: show a tqdm bar.
    """

    batch_size: int = 0
    part_rows: int = 65536
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    num_threads: int = 0
    progress: bool = True

    def validate(self, source: str | None = None) -> None:
        if self.batch_size < 0:
            raise ConfigError(source, "batch_size", f"must be >= 1 (or 0 = default), got {self.batch_size}")
        if self.part_rows < 1:
            raise ConfigError(source, "part_rows", f"must be >= 1, got {self.part_rows}")
        if self.num_threads < 0:
            raise ConfigError(source, "num_threads", f"must be >= 0, got {self.num_threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(source, "device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(source, "precision", f"must be auto, fp32 or bf16, got {self.precision!r}")

    def resolved(self, kind: str, device_type: str) -> EmbedConfig:
        """A copy with the batch size, the part size (a multiple of it), the device and the precision filled in."""
        self.validate()
        b = self.batch_size or DEFAULT_BATCH[kind]
        prec = self.precision if self.precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
        return EmbedConfig(batch_size=b, part_rows=math.ceil(self.part_rows / b) * b, device=device_type,  # type: ignore[arg-type]
                           precision=prec, num_threads=self.num_threads, progress=self.progress)  # type: ignore[arg-type]


@dataclass
class ShardResult:
    """What one process did: its shard, its rows ``[row_start, row_end)`` and how many parts it (re)computed."""

    out: Path
    shard_dir: Path
    rank: int
    world_size: int
    row_start: int
    row_end: int
    n_parts: int
    parts_written: int
    parts_skipped: int

    @property
    def n_rows(self) -> int:
        return self.row_end - self.row_start


@dataclass
class Embeddings:
    """Merged embeddings (see :func:`load_embeddings`).

    Attributes:
        vectors: float32 read-only memmap ``[N, d]`` (items) or ``[N, K, d]`` (users), unit vectors.
        index: int64 ``[N]`` store item / user index of each row.
        ids: object ``[N]`` the store's external item / user id of each row.
        cutoff: users: int64 ``[N]`` the case cutoff (input = the user's events ``[0, cutoff)``); items: None.
        manifest: the parsed ``manifest.json``.
    """

    vectors: np.ndarray
    index: np.ndarray
    ids: np.ndarray
    cutoff: np.ndarray | None
    manifest: dict[str, Any] = field(repr=False)

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def query_group(self) -> np.ndarray | None:
        """int64 ``[K]`` store scenario index of each interest query (users), None for items."""
        q = self.manifest.get("query_group")
        return None if q is None else np.asarray(q, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------
def shard_dir_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}"


def part_name(i: int) -> str:
    return f"part-{i:06d}.safetensors"


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from the arguments, else torchrun's ``RANK`` / ``WORLD_SIZE``, else ``(0, 1)``."""

    def env(name: str, default: int) -> int:
        v = os.environ.get(name)
        if v is None or v == "":
            return default
        try:
            return int(v)
        except ValueError:
            raise ConfigError("environment", name, f"expected an integer, got {v!r}") from None

    r = env("RANK", 0) if rank is None else int(rank)
    w = env("WORLD_SIZE", 1) if world_size is None else int(world_size)
    if w < 1:
        raise ConfigError("command line", "world_size", f"must be >= 1, got {w}")
    if not 0 <= r < w:
        raise ConfigError("command line", "rank", f"must be in [0, world_size={w}), got {r}")
    return r, w


def row_range(n_rows: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``rank``: the ``ceil(n_rows / batch_size)`` batches split as evenly as possible (the
    last ranks take the extra batches, the last one the partial batch: shard sizes differ by at most one batch)."""
    n_batches = math.ceil(n_rows / batch_size)
    base, rem = divmod(n_batches, world_size)
    first_extra = world_size - rem
    a = rank * base + max(0, rank - first_extra)
    b = a + base + (1 if rank >= first_extra else 0)
    return min(a * batch_size, n_rows), min(b * batch_size, n_rows)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(path, None, f"unreadable: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise DataError(path, "format", f"expected {FORMAT!r}, got {d.get('format') if isinstance(d, dict) else d!r}")
    return d


def _crc(tensors: dict[str, np.ndarray]) -> str:
    c = 0
    for k in sorted(tensors):
        c = zlib.crc32(k.encode(), c)
        c = zlib.crc32(np.ascontiguousarray(tensors[k]).reshape(-1).view(np.uint8), c)
    return f"{c:08x}"


def _compat(m: dict[str, Any]) -> dict[str, Any]:
    out = {k: m.get(k) for k in _COMPAT_KEYS}
    out["config"] = {k: (m.get("config") or {}).get(k) for k in _COMPAT_CONFIG}
    return out


def _check_compat(expected: dict[str, Any], found: dict[str, Any], path: Path, hint: str) -> None:
    def show(v: Any) -> str:
        s = json.dumps(v, default=str)
        return s[:120] + "..." if len(s) > 120 else s

    a, b = _compat(expected), _compat(found)
    for k in a:
        if a[k] != b[k]:
            raise DataError(path, k, f"was written by a different embedding run ({show(b[k])}, now {show(a[k])})",
                            hint=hint)


# ----------------------------------------------------------------------------------------------------------------
# model, store, source
# ----------------------------------------------------------------------------------------------------------------
def resolve_source(source: str | Path) -> tuple[Path, Path | None]:
    """``(model_dir, run_dir or None)`` of a training run directory (``RUN/model/``) or a model directory."""
    p = Path(source)
    if not p.is_dir():
        raise DataError(p, None, "no such run or model directory")
    if (p / "model").is_dir():
        return p / "model", p
    if (p / "model.safetensors").exists():
        return p, None
    if (p / "config.yaml").exists() or (p / "checkpoint").exists():
        raise DataError(p / "model", None, "missing: this run has no final model yet (has its training finished?)")
    raise DataError(p, None, "neither a run directory (RUN/model/) nor a model directory (config.yaml + model.safetensors)")


def _load_run_config(run_dir: Path):
    from redrec.train import load_train_config

    path = run_dir / "config.yaml"
    if not path.exists():
        raise DataError(path, None, "missing: the run directory has no resolved training config")
    return load_train_config(path)


def _device(cfg: EmbedConfig):
    """The embedding device: :func:`redrec.config.resolve_device` of ``cfg.device``, one GPU per torchrun rank."""
    return resolve_device(cfg.device, "embed config", per_rank=True)


def check_model_store(model, store, users: bool) -> None:
    """Raise a DataError when ``store`` is not the kind of store ``model`` was trained on.

    Items: the id tower's vocabulary must be the store's item count; the features tower's input width must be the
    store's item vector width.  Users also: the same scenarios (queries and scenario embeddings are indexed by them)
    and the same number of action flags.
    """
    it = model.cfg.item_tower
    if it.kind == "id" and it.n_items != store.n_items:
        raise DataError(store.path, "n_items", f"the store has {store.n_items:,} items but the model's id item tower "
                        f"has {it.n_items:,}: item indices would not match", hint="use the store the model was trained on")
    if getattr(model.item_tower, "needs_features", False) and store.vector_dim != it.feature_dim:
        raise DataError(store.path, "item_vector_dim", f"the store's item vectors have {store.vector_dim} dims but the "
                        f"model's features item tower reads {it.feature_dim}", hint="use the store the model was trained on")
    if users:
        if list(model.cfg.scenarios) != store.scenarios:
            raise DataError(store.path, "scenarios", f"the store has scenarios {store.scenarios}, the model "
                            f"{list(model.cfg.scenarios)}", hint="use the store the model was trained on")
        if model.cfg.n_actions != len(store.actions_names):
            raise DataError(store.path, "actions", f"the store has {len(store.actions_names)} action flags, the model "
                            f"{model.cfg.n_actions}", hint="use the store the model was trained on")


def _store_fingerprint(store) -> dict[str, Any]:
    m = store.meta
    return {k: m.get(k) for k in ("n_users", "n_items", "n_events", "created")}


def latest_case(store, u: int):
    """The serving case of user ``u``: all its events are the input, prediction time = its last event's time."""
    from redrec.eval.protocols import EvalCase

    a, b = int(store.offsets[u]), int(store.offsets[u + 1])
    t_now = int(store.timestamp[b - 1]) if b > a else 0
    return EvalCase(int(u), b - a, t_now, np.zeros(0, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------------------------------
def _expected_keys(kind: str) -> tuple[str, ...]:
    return ("embeddings", "row") if kind == "items" else ("embeddings", "row", "user", "cutoff")


def read_part(path: Path, kind: str, row_start: int, row_end: int, vec_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Load and verify one part (keys, dtypes, shapes, rows ``[row_start, row_end)``, crc32).

    Raises:
        DataError: naming the part and what is wrong with it.
    """
    from safetensors import safe_open

    if not path.exists():
        raise DataError(path, None, "missing part")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as e:  # safetensors raises several types for a truncated / garbled file
        raise DataError(path, None, f"corrupt part (cannot be read: {type(e).__name__}: {e})") from None
    n = row_end - row_start
    want = _expected_keys(kind)
    if sorted(t) != sorted(want):
        raise DataError(path, None, f"corrupt part: tensors {sorted(t)}, expected {sorted(want)}")
    e = t["embeddings"]
    if e.dtype != np.float32 or e.shape != (n, *vec_shape):
        raise DataError(path, "embeddings", f"corrupt part: {e.dtype} {e.shape}, expected float32 {(n, *vec_shape)}")
    for k in want[1:]:
        if t[k].dtype != np.int64 or t[k].shape != (n,):
            raise DataError(path, k, f"corrupt part: {t[k].dtype} {t[k].shape}, expected int64 ({n},)")
    if not np.array_equal(t["row"], np.arange(row_start, row_end, dtype=np.int64)):
        raise DataError(path, "row", f"corrupt part: rows are not [{row_start}, {row_end})")
    if meta.get("crc32") != _crc(t):
        raise DataError(path, None, f"corrupt part: crc32 {_crc(t)} != {meta.get('crc32')!r} recorded when written")
    return t


def _write_part(path: Path, tensors: dict[str, np.ndarray], kind: str) -> None:
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {"format": FORMAT, "kind": kind, "crc32": _crc(tensors),
            "row_start": str(int(tensors["row"][0])), "row_end": str(int(tensors["row"][-1]) + 1)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; parts are read by the merging user too
    os.replace(tmp, path)


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


# ----------------------------------------------------------------------------------------------------------------
# the shard loop shared by items and users
# ----------------------------------------------------------------------------------------------------------------
def _other_world_sizes(out: Path, world: int) -> list[str]:
    return sorted(p.name for p in out.glob("shard-*-of-*") if p.is_dir() and not p.name.endswith(f"-of-{world:05d}"))


def _run_shard(
    out: Path,
    manifest: dict[str, Any],
    cfg: EmbedConfig,
    rank: int,
    world: int,
    compute: Callable[[int, int, Callable[[int], None]], dict[str, np.ndarray]],
    on_part: Callable[[int, Path], None] | None,
) -> ShardResult:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    hint = f"use the same arguments as the first run, or a new --out directory (or delete {out})"
    other = _other_world_sizes(out, world)
    if other:
        raise DataError(out / other[0], None, f"{out} holds shards of another world size; this run has {world} processes",
                        hint=hint)
    mpath = out / "manifest.json"
    if mpath.exists():
        _check_compat(manifest, _read_json(mpath), mpath, hint)
    elif rank == 0:
        _write_json(mpath, manifest)
    n_rows, P = int(manifest["n_rows"]), cfg.part_rows
    lo, hi = row_range(n_rows, cfg.batch_size, rank, world)
    n_parts = math.ceil((hi - lo) / P)
    sd = out / shard_dir_name(rank, world)
    sd.mkdir(exist_ok=True)
    info = {**manifest, "rank": rank, "row_start": lo, "row_end": hi, "n_parts": n_parts}
    spath = sd / "shard.json"
    if spath.exists():
        old = _read_json(spath)
        _check_compat(info, old, spath, hint)
        if any(old.get(k) != info[k] for k in _SHARD_KEYS):
            raise DataError(spath, "row_start", "row range differs from this run's", hint=hint)
    (sd / "DONE").unlink(missing_ok=True)
    for p in sd.glob(".*.tmp-*"):  # temp files of a killed process of this rank
        p.unlink(missing_ok=True)
    _write_json(spath, info)

    kind = manifest["kind"]
    vec_shape = (int(manifest["dim"]),) if kind == "items" else (int(manifest["vectors_per_row"]), int(manifest["dim"]))
    written = skipped = 0
    bar = tqdm(total=hi - lo, desc=f"embed {kind} [rank {rank}/{world}]", unit="row", disable=not cfg.progress)
    try:
        for i in range(n_parts):
            a, b = lo + i * P, min(lo + (i + 1) * P, hi)
            path = sd / part_name(i)
            if path.exists():
                try:
                    read_part(path, kind, a, b, vec_shape)
                    skipped += 1
                    bar.update(b - a)
                    continue
                except DataError:
                    path.unlink()  # recompute it
            tensors = compute(a, b, bar.update)
            _write_part(path, tensors, kind)
            written += 1
            if on_part is not None:
                on_part(i, path)
    finally:
        bar.close()
    _write_json(sd / "DONE", {"format": FORMAT, "rank": rank, "world_size": world, "n_parts": n_parts,
                              "row_start": lo, "row_end": hi, "finished": _now()})
    return ShardResult(out, sd, rank, world, lo, hi, n_parts, written, skipped)


def _base_manifest(kind: str, model, model_dir: Path, source: Path, store, cfg: EmbedConfig, n_rows: int,
                   world: int) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "kind": kind, "dim": int(model.cfg.embed_dim),
        "vectors_per_row": 1 if kind == "items" else int(model.cfg.n_queries),
        "store": str(Path(store.path).resolve()), "n_rows": int(n_rows), "world_size": int(world),
        "source": str(source.resolve()), "protocol": None, "created": _now(), "merged": False,
        "config": to_dict(cfg), "model_sha256": sha256_file(model_dir / "model.safetensors"),
        "store_fingerprint": _store_fingerprint(store),
    }


def _setup(source: str | Path, cfg: EmbedConfig | None, kind: str):
    import torch

    from redrec.model.redrec import RedRec

    cfg = cfg or EmbedConfig()
    cfg.validate()
    model_dir, run_dir = resolve_source(source)
    device = _device(cfg)
    cfg = cfg.resolved(kind, device.type)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model = RedRec.from_pretrained(model_dir).to(device).eval()
    return cfg, model_dir, run_dir, device, model


def _store_path(store: str | Path | None, run_dir: Path | None) -> Path:
    if store is not None:
        return Path(store)
    if run_dir is not None:
        return Path(_load_run_config(run_dir).store)
    raise ConfigError(None, "store", "no event store given (--store PATH)")


def _autocast(device, precision: str):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------------------------------------------
# items
# ----------------------------------------------------------------------------------------------------------------
def embed_items(
    source: str | Path,
    store: str | Path | None,
    out: str | Path,
    cfg: EmbedConfig | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    on_part: Callable[[int, Path], None] | None = None,
) -> ShardResult:
    """Write this process's shard of the unit item vectors ``[n_items, d]`` of every item of ``store``.

    Args:
        source: a training run directory (its ``model/``) or a model directory (``save_pretrained``).
        store: the event store (default: the run's training store).
        out: the embeddings directory (shared by all ranks; see the module docstring).
        cfg: batch / part sizes, device, precision.
        rank, world_size: this process's shard (default: ``RANK`` / ``WORLD_SIZE`` from the environment, else 0/1).
        on_part: called as ``on_part(i, path)`` after part ``i`` is written (progress hooks, tests).

    Row ``r`` = item index ``r``.  Rerunning resumes: verified parts are not recomputed.
    """
    import torch

    from redrec.data.batching import item_features
    from redrec.data.store import EventStore

    rank, world = resolve_rank(rank, world_size)
    cfg, model_dir, run_dir, device, model = _setup(source, cfg, "items")
    st = EventStore(_store_path(store, run_dir))
    check_model_store(model, st, users=False)
    manifest = _base_manifest("items", model, model_dir, run_dir or model_dir, st, cfg, st.n_items, world)
    needs = getattr(model.item_tower, "needs_features", False)

    @torch.no_grad()
    def compute(a: int, b: int, advance: Callable[[int], None]) -> dict[str, np.ndarray]:
        # the batch body of redrec.model.scorer.all_item_vectors, over rows [a, b)
        emb = np.empty((b - a, model.cfg.embed_dim), np.float32)
        for s in range(a, b, cfg.batch_size):
            ids = np.arange(s, min(s + cfg.batch_size, b))
            feats = torch.from_numpy(item_features(st, ids)).to(device) if needs else None
            with _autocast(device, cfg.precision):
                v = model.item_vectors(torch.from_numpy(ids).to(device), feats)
            emb[s - a : s - a + len(ids)] = v.float().cpu().numpy()
            advance(len(ids))
        return {"embeddings": emb, "row": np.arange(a, b, dtype=np.int64)}

    return _run_shard(Path(out), manifest, cfg, rank, world, compute, on_part)


# ----------------------------------------------------------------------------------------------------------------
# users
# ----------------------------------------------------------------------------------------------------------------
def resolve_user_inputs(
    run_dir: Path | None, protocol: Any, overrides: dict[str, Any] | None,
    mixing: Any = None, features: Any = None,
) -> tuple[Any, Any, Any]:
    """``(protocol, mixing, features)`` for :func:`embed_users`.

    ``protocol``: ``"latest"``, a protocol name (based on the run's protocol when it has that name, so seeds and
    target scenario match training, else the defaults) or a :class:`ProtocolConfig`.  ``overrides``: dotted keys
    ``protocol.*``, ``mixing.*``, ``features.*``.  Mixing and features default to the run's.
    """
    from redrec.eval.protocols import PROTOCOLS, ProtocolConfig
    from redrec.features import FeatureConfig
    from redrec.mixing import MixingConfig

    run_cfg = _load_run_config(run_dir) if run_dir is not None else None
    ov: dict[str, dict[str, Any]] = {"protocol": {}, "mixing": {}, "features": {}}
    for k, v in (overrides or {}).items():
        head, _, rest = k.partition(".")
        if head not in ov or not rest:
            raise ConfigError("command line", k, "users overrides are protocol.*, mixing.* or features.*")
        ov[head][rest] = v
    if isinstance(protocol, ProtocolConfig):
        proto_d: dict[str, Any] | None = to_dict(protocol)
    elif protocol == "latest":
        if ov["protocol"]:
            raise ConfigError("command line", "protocol." + next(iter(ov["protocol"])), "the latest protocol has no options")
        proto_d = None
    elif protocol in PROTOCOLS:
        base = run_cfg.protocol if run_cfg is not None and run_cfg.protocol.name == protocol else ProtocolConfig(name=protocol)
        proto_d = to_dict(base)
    else:
        raise ConfigError("command line", "protocol", f"must be latest or one of {list(PROTOCOLS)}, got {protocol!r}")

    def build(cls, explicit, run_value, extra, name):
        if explicit is None and run_value is None:
            raise DataError(None, name, "a model directory has no training config to take the input mixing and "
                            "features from", hint="pass the run directory (--run RUN)")
        d = to_dict(explicit if explicit is not None else run_value)
        for k, v in extra.items():
            set_dotted(d, k, v)
        return from_dict(cls, d, source="command line", prefix=name + ".")

    proto = None
    if proto_d is not None:
        for k, v in ov["protocol"].items():
            set_dotted(proto_d, k, v)
        proto = from_dict(ProtocolConfig, proto_d, source="command line", prefix="protocol.")
    mix = build(MixingConfig, mixing, run_cfg.mixing if run_cfg else None, ov["mixing"], "mixing")
    feat = build(FeatureConfig, features, run_cfg.features if run_cfg else None, ov["features"], "features")
    return proto if proto is not None else "latest", mix, feat


def embed_users(
    source: str | Path,
    store: str | Path | None,
    out: str | Path,
    protocol: Any = "latest",
    cfg: EmbedConfig | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    mixing: Any = None,
    features: Any = None,
    rank: int | None = None,
    world_size: int | None = None,
    on_part: Callable[[int, Path], None] | None = None,
) -> ShardResult:
    """Write this process's shard of the users' ``K`` unit interest vectors, ``[n_rows, K, d]``.

    Args:
        source: a training run directory (mixing and features come from its ``config.yaml``), or a model directory
            with explicit ``mixing`` and ``features``.
        store: the event store (default: the run's training store).
        out: the embeddings directory (see the module docstring).
        protocol: ``latest`` (every user, its whole history; serving), ``loo`` / ``redrec`` / ``reference`` (one row
            per evaluation case) or a :class:`redrec.eval.protocols.ProtocolConfig`.
        cfg: batch / part sizes, device, precision.
        overrides: dotted ``protocol.*`` / ``mixing.*`` / ``features.*`` keys.
        mixing, features: :class:`MixingConfig` / :class:`FeatureConfig` instead of the run's.
        rank, world_size: this process's shard (default: ``RANK`` / ``WORLD_SIZE``, else 0/1).
        on_part: called as ``on_part(i, path)`` after part ``i`` is written.

    Rows are in user order (``latest``: row = user index; protocols: the :func:`make_cases` order, sorted by user).
    The vectors of a batch are exactly :meth:`ModelScorer.score_cases` with ``queries="all"`` of its cases.
    """
    from redrec.data.store import EventStore
    from redrec.eval.protocols import make_cases
    from redrec.model.scorer import ModelScorer

    rank, world = resolve_rank(rank, world_size)
    cfg, model_dir, run_dir, device, model = _setup(source, cfg, "users")
    proto, mix, feat = resolve_user_inputs(run_dir, protocol, overrides, mixing, features)
    st = EventStore(_store_path(store, run_dir))
    check_model_store(model, st, users=True)
    if proto == "latest":
        cases: Sequence[Any] | None = None
        n_rows = st.n_users
        proto_out: Any = "latest"
    else:
        cases = make_cases(st, proto)
        n_rows = len(cases)
        proto_out = to_dict(proto.resolved(st))
    if n_rows == 0:
        raise DataError(st.path, None, f"no users to embed under protocol {proto_out if proto == 'latest' else proto.name!r}")
    manifest = _base_manifest("users", model, model_dir, run_dir or model_dir, st, cfg, n_rows, world)
    manifest.update(protocol=proto_out, query_group=model.query_group.cpu().tolist(), scenarios=st.scenarios,
                    mixing=to_dict(mix), features=to_dict(feat))
    scorer = ModelScorer(model, mix, feat, queries="all", device=device)
    K, d = model.cfg.n_queries, model.cfg.embed_dim

    def compute(a: int, b: int, advance: Callable[[int], None]) -> dict[str, np.ndarray]:
        rows = cases[a:b] if cases is not None else [latest_case(st, u) for u in range(a, b)]
        emb = np.empty((b - a, K, d), np.float32)
        for s in range(0, b - a, cfg.batch_size):
            batch = rows[s : s + cfg.batch_size]
            with _autocast(device, cfg.precision):
                emb[s : s + len(batch)] = scorer.score_cases(st, batch)
            advance(len(batch))
        return {"embeddings": emb, "row": np.arange(a, b, dtype=np.int64),
                "user": np.array([c.user for c in rows], dtype=np.int64),
                "cutoff": np.array([c.cutoff for c in rows], dtype=np.int64)}

    return _run_shard(Path(out), manifest, cfg, rank, world, compute, on_part)


# ----------------------------------------------------------------------------------------------------------------
# merge and load
# ----------------------------------------------------------------------------------------------------------------
def _manifest_for_merge(out: Path) -> dict[str, Any]:
    mpath = out / "manifest.json"
    if mpath.exists():
        return _read_json(mpath)
    # rank 0 never ran here (or its manifest was not copied): rebuild it from a shard's shard.json
    shards = sorted(p for p in out.glob("shard-*-of-*") if (p / "shard.json").exists())
    if not out.is_dir() or not shards:
        raise DataError(out, None, "not an embeddings directory (no manifest.json, no shard-*/shard.json)",
                        hint="write it with `redrec embed items` or `redrec embed users`")
    worlds = sorted({p.name.rsplit("-of-", 1)[1] for p in shards})
    if len(worlds) > 1:
        raise DataError(out, None, f"shards of several world sizes ({', '.join(worlds)}) are mixed in this directory")
    m = _read_json(shards[0] / "shard.json")
    for k in _SHARD_KEYS:
        m.pop(k, None)
    return m


def merge_embeddings(out: str | Path, *, store: str | Path | None = None, remove_shards: bool = False,
                     progress: bool = True) -> Path:
    """Merge the shards of ``out`` into ``embeddings.npy`` + ``ids.parquet`` and mark the manifest merged.

    Streams part by part into a memory-mapped temporary ``.npy`` (peak memory: one part + the int64 row
    bookkeeping), verifies every part (crc32, rows), and refuses to merge when a shard or a part is missing,
    incomplete, corrupt or inconsistent, or when rows are missing or duplicated.

    Args:
        out: the embeddings directory.
        store: the event store for the external ids (default: the manifest's ``store``).
        remove_shards: delete the shard directories after a successful merge.
        progress: show a tqdm bar.

    Returns:
        the path of ``embeddings.npy``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from redrec.data.store import EventStore

    out = Path(out)
    man = _manifest_for_merge(out)
    kind, n, W = man["kind"], int(man["n_rows"]), int(man["world_size"])
    cfg = man["config"]
    vec_shape = (int(man["dim"]),) if kind == "items" else (int(man["vectors_per_row"]), int(man["dim"]))
    other = _other_world_sizes(out, W)
    if other:
        raise DataError(out / other[0], None, f"a shard of another world size than the manifest's ({W})")
    spath = Path(store) if store is not None else Path(man["store"])
    if not (spath / "meta.json").exists():
        raise DataError(spath, None, "the event store of these embeddings is not here (needed for the external ids)",
                        hint="pass its location with --store")
    st = EventStore(spath)
    if _store_fingerprint(st) != man.get("store_fingerprint"):
        raise DataError(spath, "meta.json", "not the store the embeddings were computed from "
                        f"({_store_fingerprint(st)} != {man.get('store_fingerprint')})")

    # every shard is there, finished and consistent with the manifest
    shards: list[tuple[Path, dict[str, Any]]] = []
    for r in range(W):
        sd = out / shard_dir_name(r, W)
        rerun = f"run rank {r} again (--rank {r} --world-size {W}, same arguments and --out) or copy its shard here"
        if not (sd / "shard.json").exists():
            raise DataError(sd, None, f"missing shard: rank {r} of {W} has not run here", hint=rerun)
        info = _read_json(sd / "shard.json")
        _check_compat(man, info, sd / "shard.json", hint="the shards come from different embedding runs")
        lo, hi = row_range(n, int(cfg["batch_size"]), r, W)
        if (info.get("rank"), info.get("row_start"), info.get("row_end")) != (r, lo, hi):
            raise DataError(sd / "shard.json", "row_start", f"rows [{info.get('row_start')}, {info.get('row_end')}) of "
                            f"rank {info.get('rank')}, expected [{lo}, {hi}) of rank {r}")
        if not (sd / "DONE").exists():
            have = sum(1 for _ in sd.glob("part-*.safetensors"))
            raise DataError(sd, None, f"incomplete shard: rank {r} of {W} has not finished ({have} of "
                            f"{info.get('n_parts')} parts, no DONE marker)", hint=rerun.replace("again", "again to resume"))
        shards.append((sd, info))

    P = int(cfg["part_rows"])
    seen = np.zeros(n, dtype=bool)
    index = np.empty(n, dtype=np.int64)
    cutoff = np.empty(n, dtype=np.int64) if kind == "users" else None
    tmp_npy = out / f".embeddings.npy.tmp-{os.getpid()}"
    tmp_ids = out / f".ids.parquet.tmp-{os.getpid()}"
    try:
        mm = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(n, *vec_shape))
        bar = tqdm(total=n, desc=f"merge {kind}", unit="row", disable=not progress)
        try:
            for sd, info in shards:
                lo, hi = int(info["row_start"]), int(info["row_end"])
                for i in range(math.ceil((hi - lo) / P)):
                    a, b = lo + i * P, min(lo + (i + 1) * P, hi)
                    t = read_part(sd / part_name(i), kind, a, b, vec_shape)
                    if seen[a:b].any():
                        raise DataError(sd / part_name(i), "row", f"duplicated rows in [{a}, {b})")
                    seen[a:b] = True
                    mm[a:b] = t["embeddings"]
                    index[a:b] = t["user"] if kind == "users" else t["row"]
                    if cutoff is not None:
                        cutoff[a:b] = t["cutoff"]
                    bar.update(b - a)
        finally:
            bar.close()
        if not seen.all():
            miss = np.flatnonzero(~seen)
            raise DataError(out, "row", f"{len(miss):,} of {n:,} rows are in no shard (first: row {int(miss[0])})")
        mm.flush()
        del mm
        src = st.path / ("items.parquet" if kind == "items" else "users.parquet")
        col = "item_id" if kind == "items" else "user_id"
        bad = index[(index < 0) | (index >= (st.n_items if kind == "items" else st.n_users))]
        if bad.size:
            raise DataError(out, "index", f"store index {int(bad[0])} out of range for {st.path}")
        ids = pq.read_table(src, columns=[col]).column(0).take(pa.array(index))
        cols = {"row": pa.array(np.arange(n, dtype=np.int64)), "index": pa.array(index),
                "id": ids.cast(pa.string())}
        if cutoff is not None:
            cols["cutoff"] = pa.array(cutoff)
        pq.write_table(pa.table(cols), tmp_ids)
        os.replace(tmp_npy, out / "embeddings.npy")
        os.replace(tmp_ids, out / "ids.parquet")
    finally:
        tmp_npy.unlink(missing_ok=True)
        tmp_ids.unlink(missing_ok=True)
    _write_json(out / "manifest.json", {**man, "merged": True, "merged_at": _now()})
    if remove_shards:
        for sd, _ in shards:
            shutil.rmtree(sd)
    return out / "embeddings.npy"


def load_embeddings(out: str | Path) -> Embeddings:
    """Open merged embeddings: vectors memory-mapped (read-only), ids in memory.

    Raises:
        DataError: not an embeddings directory, not merged yet (run ``redrec embed merge DIR``), or files that do
            not match the manifest.
    """
    import pyarrow.parquet as pq

    out = Path(out)
    mpath = out / "manifest.json"
    if not mpath.exists():
        if any(out.glob("shard-*-of-*")):
            raise DataError(out, None, "not merged yet (shards only)", hint=f"run `redrec embed merge {out}`")
        raise DataError(out, None, "not an embeddings directory (no manifest.json)")
    man = _read_json(mpath)
    if not man.get("merged") or not (out / "embeddings.npy").exists() or not (out / "ids.parquet").exists():
        raise DataError(out, None, "not merged yet", hint=f"run `redrec embed merge {out}` once every rank has finished")
    vec = np.load(out / "embeddings.npy", mmap_mode="r")
    n = int(man["n_rows"])
    shape = (n, int(man["dim"])) if man["kind"] == "items" else (n, int(man["vectors_per_row"]), int(man["dim"]))
    if vec.shape != shape or vec.dtype != np.float32:
        raise DataError(out / "embeddings.npy", None, f"{vec.dtype} {vec.shape}, the manifest says float32 {shape}")
    tbl = pq.read_table(out / "ids.parquet")
    if tbl.num_rows != n:
        raise DataError(out / "ids.parquet", None, f"{tbl.num_rows} rows, the manifest says {n}")
    cut = tbl.column("cutoff").to_numpy() if "cutoff" in tbl.column_names else None
    return Embeddings(
        vectors=vec,
        index=tbl.column("index").to_numpy().astype(np.int64, copy=False),
        ids=tbl.column("id").to_numpy(zero_copy_only=False),
        cutoff=None if cut is None else cut.astype(np.int64, copy=False),
        manifest=man,
    )
