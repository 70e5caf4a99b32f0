"""Load the published RedSeqRec checkpoint (``Red-Mmu-Rec-Multiscene-Qwen2.5-1.5b``) into :class:`RedRec`.

The reference model (``REDRec/model/redrec.py`` of RedSeqRec) is two Qwen2 causal LMs plus a few tensors.  Its
state-dict layout, and where each tensor goes in ours (``reference_key -> our key``)::

    item_llm.model.<X>                 -> item_tower.encoder.<X>        item LLM (Qwen2Model part)
    item_llm.lm_head.weight            -> ignored                       LM output head: unused by an embedding model
    item_emb_tokens          [1, 1, H] -> item_tower.encoder.embed_tokens.weight[slot]   our *added* slot token's row
    user_llm.model.<X>                 -> backbone.<X>                  user LLM, run on inputs_embeds
    user_llm.lm_head.weight            -> ignored
    query.weight             [K, H]    -> queries.weight                K = 3 interest queries, tied to no scenario
    note_embedding_head.projection.*   -> head.fc1.*                    Linear(H, 64)
    note_embedding_head.fc.*           -> head.fc2.*                    Linear(64, 64)
    note_embedding_head.layer_norm.*   -> head.norm.*                   LayerNorm(64)  (h1 + Dropout(fc GELU(h1)))
    item_action_embedding    [5, H]    -> action_emb.weight [H, A]      transposed; rows matched to our flags by name
                                                                        (reference order: share, comment, collect,
                                                                        like, nns)
    hour_embeddings.weight   [24, H]   -> hour_emb.weight[:24]          our row 24 (unknown hour) is set to zero
    position_embeddings.weight [200,H] -> pos_emb.weight                (optional; see the note in the report)
    logit_scale              []        -> the report (``log`` of the inverse temperature, = LogitScale.log_scale)
    learnable_interest_query_embedding, latent_proj_encoder.*, latent_proj_decoder.*, action_predict_head.*
                                       -> ignored (never used by the reference's embedding code)

Everything else is *unexpected*; every expected key that is absent is *missing*.  Both are an error naming the
keys (the reference itself loads with ``strict=False`` and says nothing), unless ``strict=False``.

Checkpoint formats read by :func:`read_state_dict`: a ``.bin`` / ``.pt`` state dict, ``.safetensors``, a sharded
HF index (``*.index.json``), and a DeepSpeed ZeRO checkpoint directory (the reference trains with DeepSpeed
ZeRO-3 through Lightning Fabric and evaluates with ``zero_to_fp32.load_state_dict_from_zero_checkpoint``).  ZeRO
stage 1/2 directories are read from the full ``module`` state of ``mp_rank_00_model_states.pt``; ZeRO-3 weights are
partitioned over the ranks' ``*_optim_states.pt`` files (fp32 master copies) and are re-assembled here following
DeepSpeed's ``zero_to_fp32`` protocol, without importing DeepSpeed.

Facts from the reference source that the configuration of :func:`reference_model_config` follows:

* item text prompt ``f"{item_prompt}\\ntitle:{title}\\ncontent:{content}\\nocr:{ocr}"`` with ``item_prompt =
  "Summary:\\n"``, title cut to 22 characters, ocr to 32, content to 250 (the reference also strips topic tags);
  at most 300 text tokens, then the slot token; the item vector is the last hidden state at the slot.
* the reference's slot is token id 0 (``!`` in Qwen's vocabulary), whose embedding is replaced by
  ``item_emb_tokens`` everywhere in the input (so a ``!`` in an item's text is replaced too).  Ours is an added
  token whose row *is* ``item_emb_tokens``; items whose text has no ``!`` get identical vectors.
* user input: item hidden states (+ action / hour embeddings when trained with them), no scenario, position or
  time-gap addend, then the 3 queries; the interests are the head's outputs at the queries.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import pickle
import re
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from redrec.errors import ConfigError, DataError
from redrec.model.config import ItemTowerConfig, ModelConfig, TextTowerConfig, UserTowerConfig

log = logging.getLogger("redrec.reference")

#: engagement flags of the reference's ``item_action_embedding`` rows, in row order (RedSeqRec ``process_action``)
REFERENCE_ACTIONS: tuple[str, ...] = ("share", "comment", "collect", "like", "nns")
#: the reference's item prompt prefix (``data.item_prompt`` of its configs)
REFERENCE_ITEM_PROMPT = "Summary:\n"
#: item text fields of the reference prompt, in order, with their character caps
REFERENCE_FIELDS: dict[str, int] = {"title": 22, "content": 250, "ocr": 32}
#: text tokens of an item prompt before the slot token (``data.max_input_token_len``)
REFERENCE_MAX_TEXT_TOKENS = 300
REFERENCE_SCENARIOS: tuple[str, ...] = ("homefeed", "ads")
#: the reference's per-scenario history quotas (evaluation / deployment: homefeed 96, ads 32, blocks concatenated)
REFERENCE_QUOTAS: dict[str, int] = {"homefeed": 96, "ads": 32}
REFERENCE_N_HOURS = 24

_IGNORED_PREFIXES: dict[str, str] = {
    "learnable_interest_query_embedding": "created by the reference but never used by its forward or embedding code",
    "latent_proj_encoder.": "training-only autoencoder (AE_compress_dim); the reference's embedding code skips it",
    "latent_proj_decoder.": "training-only autoencoder (AE_compress_dim); the reference's embedding code skips it",
    "action_predict_head.": "auxiliary action-prediction head (predict_action); not part of the embeddings",
}
_HEAD_MAP = {"projection": "fc1", "fc": "fc2", "layer_norm": "norm"}
_STRIP_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


# ================================================================================================================
# reading checkpoints
# ================================================================================================================
class _Stub(dict):
    """Stand-in for a class whose module cannot be imported (DeepSpeed's enums and loss scalers, EasyDict, ...):
    checkpoints pickle such objects next to the tensors; only the tensors matter here."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state

    def append(self, x: Any) -> None:  # list subclasses
        self.__dict__.setdefault("_items", []).append(x)

    def extend(self, xs: Any) -> None:
        self.__dict__.setdefault("_items", []).extend(xs)


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {"__module__": module})


_tolerant_pickle = types.SimpleNamespace(Unpickler=_TolerantUnpickler, load=lambda f, **kw: _TolerantUnpickler(f, **kw).load(),
                                         __name__="redrec_tolerant_pickle")


def _torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` on CPU: weights-only first; a file that pickles other objects (DeepSpeed, Lightning) is read
    with ``weights_only=False`` and stand-ins for classes whose modules are not installed.  Only load files you
    trust: a full unpickle can run code."""
    kw: dict[str, Any] = {"map_location": "cpu"}
    if mmap:
        kw["mmap"] = True
    try:
        return torch.load(path, weights_only=True, **kw)
    except pickle.UnpicklingError:
        log.info("%s holds more than tensors; reading it with weights_only=False (trusted files only)", path)
    except Exception as e:  # noqa: BLE001 - a bad file is the user's problem, said in one line
        if mmap and "mmap" in str(e):
            return _torch_load(path, mmap=False)
        raise DataError(path, None, f"not a readable torch checkpoint: {type(e).__name__}: {e}") from None
    try:
        return torch.load(path, weights_only=False, pickle_module=_tolerant_pickle, **kw)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise DataError(path, None, f"not a readable torch checkpoint: {type(e).__name__}: {e}") from None


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _as_int(x: Any) -> int:
    """An int from an int, a list of ints (max) or a stand-in for an int enum (``ZeroStageEnum(3)``)."""
    if isinstance(x, (list, tuple)):
        return max(_as_int(v) for v in x)
    if isinstance(x, _Stub):
        args = getattr(x, "_args", ())
        if args:
            return int(args[0])
        raise ValueError(f"cannot read an integer from {type(x).__name__}")
    return int(x)


def _numel(shape: Any) -> int:
    return int(math.prod(tuple(shape)))


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor dict inside a loaded checkpoint object (``module`` / ``state_dict`` / ``model`` wrappers)."""
    for _ in range(3):
        if _is_tensor_dict(obj):
            break
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("module", "state_dict", "model_state_dict", "model") if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, dict):
        raise DataError(path, None, f"holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise DataError(path, None, "holds no tensors (expected a state dict, or one under 'module' / 'state_dict')")
    return tensors


def _strip(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Drop wrapper prefixes (``module.`` of DDP / DeepSpeed, ``_orig_mod.`` of torch.compile, Fabric's
    ``_forward_module.``)."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        key = k
        changed = True
        while changed:
            changed = False
            for p in _STRIP_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        key = key.replace("._orig_mod.", ".")
        if key in out:
            raise DataError(path, key, f"two tensors map to {key!r} once wrapper prefixes are stripped")
        out[key] = v
    return out


def _read_index(path: Path) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(path, "weight_map", f"not a sharded-checkpoint index: {e}") from None
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = _read_file(path.parent / shard)
        out.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
    absent = sorted(k for k in weight_map if k not in out)
    if absent:
        raise DataError(path, "weight_map", f"{len(absent)} tensors listed but not found in their shards, e.g. {absent[:5]}")
    return out


def _read_file(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise DataError(path, None, "no such file")
    if path.name.endswith(".index.json"):
        return _read_index(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise DataError(path, None, f"not a readable safetensors file: {e}") from None
    return _unwrap(_torch_load(path), path)


def _read_deepspeed(ds_dir: Path) -> dict[str, Tensor]:
    """Full weights of a DeepSpeed checkpoint tag directory (``global_stepN/``)."""
    zero3_models = sorted(glob.glob(str(ds_dir / "zero_pp_rank_*_mp_rank_*_model_states.pt")), key=_natural_key)
    plain = ds_dir / "mp_rank_00_model_states.pt"
    if not zero3_models:
        if not plain.exists():
            raise DataError(ds_dir, None, "not a DeepSpeed checkpoint: no mp_rank_00_model_states.pt and no "
                            "zero_pp_rank_*_mp_rank_*_model_states.pt")
        sd = _torch_load(plain)
        if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
            raise DataError(plain, "module", "missing: not a DeepSpeed model-states file")
        module = {k: v for k, v in sd["module"].items() if isinstance(v, Tensor)}
        # ZeRO 0/1/2 keep every parameter whole in 'module'; a placeholder means the weights live elsewhere
        shapes = {k: s for g in (sd.get("param_shapes") or []) for k, s in g.items()}
        bad = [k for k, s in shapes.items() if k in module and module[k].numel() != _numel(s)]
        if bad:
            raise DataError(plain, "module", f"{len(bad)} parameters are partitioned placeholders, e.g. {bad[:3]}",
                            hint=f"run DeepSpeed's zero_to_fp32.py on {ds_dir.parent} and pass the file it writes")
        return module
    return _read_zero3(ds_dir, [Path(p) for p in zero3_models])


def _flat_slice(flats: list[Tensor], starts: list[int], a: int, b: int) -> Tensor:
    """Elements ``[a, b)`` of the concatenation of ``flats`` (``starts`` = cumulative offsets), without building it."""
    parts = []
    for t, s in zip(flats, starts, strict=True):
        lo, hi = max(a, s), min(b, s + t.numel())
        if lo < hi:
            parts.append(t[lo - s: hi - s])
    if not parts:
        return flats[0].new_empty(0)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _read_zero3(ds_dir: Path, model_files: list[Path]) -> dict[str, Tensor]:
    """Re-assemble ZeRO-3 weights (DeepSpeed's zero_to_fp32 protocol).

    Every rank holds, for each trainable parameter in ``param_shapes`` order, a slice of ``ceil(numel / world)``
    fp32 elements (the last rank's zero-padded) in its ``fp32_flat_groups``; a parameter is the concatenation of its
    slices over the ranks, cut to ``numel``.  Frozen parameters are sliced the same way in each rank's
    ``frozen_param_fragments``; buffers are whole in ``module``; tied parameters are listed in ``shared_params``.
    """
    optim_files = sorted(glob.glob(str(ds_dir / "*_optim_states.pt")), key=_natural_key)
    if not optim_files:
        raise DataError(ds_dir, None, "a ZeRO-3 checkpoint without its *_optim_states.pt files: the weights are "
                        "partitioned in them", hint=f"copy the whole directory, or run DeepSpeed's zero_to_fp32.py on "
                        f"{ds_dir.parent} and pass the file it writes")
    models = [_torch_load(p) for p in model_files]
    flats: list[list[Tensor]] = []
    world = None
    for p in optim_files:
        sd = _torch_load(Path(p), mmap=True)
        osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise DataError(p, "optimizer_state_dict.zero_stage", "missing: not a ZeRO optimizer-states file")
        stage = _as_int(osd["zero_stage"])
        if stage != 3:
            raise DataError(p, "zero_stage", f"is {stage} but the model states are ZeRO-3 files")
        world = _as_int(osd["partition_count"])
        groups = osd.get("fp32_flat_groups")
        if groups is None:
            raise DataError(p, "fp32_flat_groups", "missing: not a ZeRO-3 optimizer-states file")
        flats.append([g.reshape(-1) for g in (groups if isinstance(groups, (list, tuple)) else [groups])])
    if world != len(optim_files) or world != len(models):
        raise DataError(ds_dir, None, f"partition_count is {world} but there are {len(optim_files)} optimizer-states and "
                        f"{len(models)} model-states files (an incomplete or overwritten checkpoint)")
    m0 = models[0]
    if not isinstance(m0, dict) or "param_shapes" not in m0:
        raise DataError(model_files[0], "param_shapes", "missing: not a DeepSpeed model-states file")
    out: dict[str, Tensor] = {}
    buffer_names = set(m0.get("buffer_names") or [])
    out.update({k: v.float() for k, v in (m0.get("module") or {}).items() if k in buffer_names and isinstance(v, Tensor)})
    # frozen parameters
    for name, shape in (m0.get("frozen_param_shapes") or {}).items():
        frags = [m["frozen_param_fragments"][name].reshape(-1) for m in models]
        out[name] = torch.cat(frags)[: _numel(shape)].view(tuple(shape)).clone()
    # trainable parameters
    shapes = {k: s for g in m0["param_shapes"] for k, s in g.items()}
    starts = [0]
    for t in flats[0][:-1]:
        starts.append(starts[-1] + t.numel())
    avail = sum(t.numel() for t in flats[0])
    offset = 0
    for name, shape in shapes.items():
        n = _numel(shape)
        part = math.ceil(n / world)
        if offset + part > avail:
            raise DataError(ds_dir, name, f"the partitions hold {avail} elements per rank, fewer than the parameters need")
        full = torch.cat([_flat_slice(flats[r], starts, offset, offset + part) for r in range(world)])
        out[name] = full[:n].view(tuple(shape)).clone()
        offset += part
    if offset != avail:
        raise DataError(ds_dir, None, f"consumed {offset} of {avail} elements per rank: the partitions do not match "
                        "param_shapes", hint="run DeepSpeed's zero_to_fp32.py instead")
    for name, shared_with in dict(m0.get("shared_params") or {}).items():
        if shared_with in out:
            out[name] = out[shared_with]
    return out


def read_state_dict(path: str | Path, tag: str | None = None) -> dict[str, Tensor]:
    """Every tensor of a checkpoint, on CPU, with wrapper prefixes (``module.``, ``_orig_mod.``) stripped.

    Args:
        path: a ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` file (``torch.save``; a state dict, or one under
            ``module`` / ``state_dict`` / ``model``), a ``.safetensors`` file, a sharded HF index
            (``*.index.json``), a directory holding one of ``model.safetensors[.index.json]`` /
            ``pytorch_model.bin[.index.json]``, or a DeepSpeed checkpoint directory (with a ``latest`` file naming
            the tag directory, or the tag directory ``global_stepN/`` itself).
        tag: DeepSpeed tag directory to read instead of the one ``latest`` names.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(p, None, "no such file or directory")
    if p.is_file() and p.name.endswith("_model_states.pt"):
        return _strip(_read_deepspeed(p.parent), p.parent)
    if p.is_file():
        return _strip(_read_file(p), p)
    if tag is not None or (p / "latest").is_file():
        t = tag if tag is not None else (p / "latest").read_text().strip()
        if not (p / t).is_dir():
            raise DataError(p / "latest", None, f"names tag {t!r} but {p / t} is not a directory")
        return _strip(_read_deepspeed(p / t), p / t)
    if glob.glob(str(p / "*_model_states.pt")):
        return _strip(_read_deepspeed(p), p)
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"):
        if (p / name).exists():
            return _strip(_read_file(p / name), p / name)
    raise DataError(p, None, "no checkpoint found: expected a DeepSpeed 'latest' file or *_model_states.pt, or "
                    "model.safetensors[.index.json] / pytorch_model.bin[.index.json]")


# ================================================================================================================
# the reference-compatible configuration
# ================================================================================================================
def reference_prompt_template(fields: list[str] | None = None, item_prompt: str = REFERENCE_ITEM_PROMPT) -> str:
    """The reference's prompt ``"{item_prompt}\\ntitle:{title}\\ncontent:{content}\\nocr:{ocr}"``; a reference
    field not in ``fields`` (the store lacks it) is kept as an empty label, exactly what the reference writes for an
    empty value."""
    have = set(REFERENCE_FIELDS if fields is None else fields)
    lines = [f"{f}:{{{f}}}" if f in have else f"{f}:" for f in REFERENCE_FIELDS]
    return item_prompt + "\n" + "\n".join(lines)


def reference_model_config(
    base_model_dir: str | Path,
    *,
    user_base_model_dir: str | Path | None = None,
    n_items: int = 1,
    scenarios: list[str] | tuple[str, ...] = REFERENCE_SCENARIOS,
    action_names: list[str] | None = None,
    use_actions: bool = False,
    use_hour: bool = False,
    use_position: bool = False,
    n_queries: int = 3,
    item_fields: list[str] | None = None,
    embed_dim: int = 64,
) -> ModelConfig:
    """Our :class:`ModelConfig` in the reference-compatible configuration.

    Item tower ``text`` / ``finetune`` / ``slot`` pooling / projection ``none`` over the Qwen2 at
    ``base_model_dir`` (its ``config.json`` and tokenizer); the user tower is the same architecture loaded from
    ``user_base_model_dir`` (default: the same directory), so every size, ``rope_theta`` and norm epsilon match;
    ``n_queries`` shared queries (``query_scope: shared``); no scenario, position or time-gap addend unless the
    checkpoint has them (``use_position``: its ``position_embeddings``); action / hour addends as trained.

    Args:
        n_items: item vocabulary of the store the model will embed (1 = none yet).
        action_names: our action flags in bit order (a store's ``actions_names``); ``None`` with ``use_actions``:
            the reference's five flags in its order.
        item_fields: the reference text fields the store has (``None``: all of title / content / ocr).
    """
    from redrec.model.text import encoder_width

    base = Path(base_model_dir).expanduser()
    user_base = Path(user_base_model_dir).expanduser() if user_base_model_dir else base
    fields = [f for f in REFERENCE_FIELDS if item_fields is None or f in item_fields]
    if not fields:
        raise ConfigError(None, "item_tower.text.fields", f"the store has none of the reference's item text fields "
                          f"{list(REFERENCE_FIELDS)} (it has {list(item_fields or [])})")
    text = TextTowerConfig(
        model_path=str(base), fields={f: REFERENCE_FIELDS[f] for f in fields},
        template=reference_prompt_template(fields), max_tokens=REFERENCE_MAX_TEXT_TOKENS + 1, pooling="slot",
        mode="finetune", projection="none",
    )
    text.dim = encoder_width(text)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(user_base, local_files_only=True)
    if int(hf.hidden_size) != text.dim:
        raise ConfigError(None, "user_tower.pretrained_path", f"the user LLM width {hf.hidden_size} differs from the item "
                          f"LLM width {text.dim}: the reference feeds item hidden states to the user LLM directly")
    n_actions = len(action_names) if action_names else (len(REFERENCE_ACTIONS) if use_actions else 0)
    user = UserTowerConfig(
        backbone="qwen2", pretrained_path=str(user_base), hidden_size=int(hf.hidden_size),
        num_layers=int(hf.num_hidden_layers), num_heads=int(hf.num_attention_heads),
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads),
        intermediate_size=int(hf.intermediate_size), use_item=True, use_actions=use_actions and n_actions > 0,
        use_hour=use_hour, use_scenario=False, use_position=use_position, use_time_gap=False,
        max_positions=200 if use_position else 1024, queries_per_scenario=n_queries, queries_see_each_other=False,
        queries_causal=True, query_positions="sequential",
    )
    # fields other helpers add; without them the queries would be counted per scenario (checked below)
    if hasattr(user, "readout"):
        user.readout = "queries"
    if hasattr(user, "query_scope"):
        user.query_scope = "shared"
    cfg = ModelConfig(
        item_tower=ItemTowerConfig(kind="text", n_items=max(1, int(n_items)), text=text),
        user_tower=user, embed_dim=embed_dim, head_dropout=0.1, scenarios=list(scenarios), n_actions=n_actions,
    )
    cfg.validate()
    if cfg.n_queries != n_queries:
        raise ConfigError(None, "user_tower.query_scope", f"this version of redrec gives {cfg.n_queries} queries for "
                          f"{len(cfg.scenarios)} scenarios; the reference has {n_queries} shared queries")
    return cfg


def config_for_checkpoint(state: dict[str, Tensor], base_model_dir: str | Path, *, store: Any = None,
                          user_base_model_dir: str | Path | None = None) -> ModelConfig:
    """:func:`reference_model_config` with the options the checkpoint was trained with (action / hour / position
    embeddings present, number of queries) and, given an event ``store``, its items, scenarios, flags and fields."""
    q = state.get("query.weight")
    kw: dict[str, Any] = dict(
        use_actions="item_action_embedding" in state, use_hour="hour_embeddings.weight" in state,
        use_position="position_embeddings.weight" in state, n_queries=int(q.shape[0]) if q is not None else 3,
    )
    if store is not None:
        kw.update(n_items=store.n_items, scenarios=list(store.scenarios), item_fields=list(store.item_fields),
                  action_names=list(store.actions_names) if kw["use_actions"] else None)
    return reference_model_config(base_model_dir, user_base_model_dir=user_base_model_dir, **kw)


# ================================================================================================================
# mapping
# ================================================================================================================
@dataclass
class ReferenceLoadReport:
    """What :func:`load_reference_checkpoint` did with every key.

    Attributes:
        source: the checkpoint read.
        mapped: reference key -> our key (``[rows]`` / ``.T`` note partial or transposed copies).
        ignored: reference key -> why it is not used.
        missing: expected reference keys the checkpoint lacks (our parameter kept as initialised).
        unexpected: checkpoint keys with no place in our model.
        mismatched: reference key -> ``"ours [..] vs checkpoint [..]"`` for shape mismatches (not copied).
        not_in_reference: our parameters the reference has no counterpart for -> what they hold now.
        logit_scale: the reference's ``logit_scale`` (log of the softmax inverse temperature; clamped to log 100
            in training), ``None`` if absent.  Our :class:`redrec.losses.LogitScale` ``log_scale`` equivalent.
        notes: behaviour differences that remain between the reference and our model.
    """

    source: str
    mapped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)
    not_in_reference: dict[str, str] = field(default_factory=dict)
    logit_scale: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def temperature(self) -> float | None:
        """Softmax temperature ``1 / min(exp(logit_scale), 100)``."""
        return None if self.logit_scale is None else 1.0 / min(math.exp(self.logit_scale), 100.0)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "temperature": self.temperature}

    def summary(self) -> str:
        lines = [f"reference checkpoint {self.source}",
                 f"  mapped {len(self.mapped)}, ignored {len(self.ignored)}, missing {len(self.missing)}, "
                 f"unexpected {len(self.unexpected)}, shape mismatches {len(self.mismatched)}"]
        if self.logit_scale is not None:
            lines.append(f"  logit_scale {self.logit_scale:.4f} (inverse temperature {math.exp(self.logit_scale):.2f}, "
                         f"temperature {self.temperature:.4f})")
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", [f"{k}: {v}" for k, v in self.mismatched.items()])):
            for k in keys[:20]:
                lines.append(f"  {title}: {k}")
            if len(keys) > 20:
                lines.append(f"  ... and {len(keys) - 20} more {title}")
        for k, why in self.ignored.items():
            lines.append(f"  ignored: {k} ({why})")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


def _check_model(model: Any) -> Any:
    from redrec.model.item_towers import TextItemTower

    tower = getattr(model, "item_tower", None)
    if not isinstance(tower, TextItemTower) or not tower.finetune:
        raise ConfigError(None, "item_tower", "the reference layout needs the 'text' item tower in 'finetune' mode "
                          "(its item LLM is part of the model); build the config with reference_model_config()")
    t = tower.cfg.text
    if t.pooling != "slot" or t.projection != "none":
        raise ConfigError(None, "item_tower.text", f"the reference layout needs pooling 'slot' and projection 'none', "
                          f"got {t.pooling!r} / {t.projection!r}")
    return tower


def _llm_key(key: str, llm: str) -> str | None:
    """``<llm>.model.X`` (causal LM) or ``<llm>.X`` (base model) -> ``X``; ``None`` for other keys."""
    for p in (f"{llm}.model.", f"{llm}."):
        if key.startswith(p):
            return key[len(p):]
    return None


def load_reference_checkpoint(
    path: str | Path | dict[str, Tensor],
    cfg_or_model: Any,
    *,
    strict: bool = True,
    store: Any = None,
    user_base_model_dir: str | Path | None = None,
    action_names: list[str] | None = None,
    tag: str | None = None,
) -> tuple[Any, ReferenceLoadReport]:
    """Load a RedSeqRec checkpoint into :class:`RedRec`.

    Args:
        path: the checkpoint (any format of :func:`read_state_dict`), or an already read state dict.
        cfg_or_model: a :class:`RedRec` to load into, a :class:`ModelConfig` to build one from, or the base
            Qwen2 directory (config.json + tokenizer) to build the reference-compatible configuration from
            (:func:`config_for_checkpoint`).
        strict: raise a :class:`DataError` naming the checkpoint and every missing / unexpected / mis-shaped key;
            with ``False`` they are returned in the report and logged as a warning.
        store: an event store whose item texts to tokenise into the model (and, when the model is built here, whose
            items, scenarios, action flags and fields size it).  A given model must have the store's item count.
        user_base_model_dir: the user LLM's base directory, when it differs from the item LLM's.
        action_names: our action flags in bit order, to match the reference's action rows by name (default: the
            store's ``actions_names``; without either, our flags are taken to be the reference's, in its order).
        tag: DeepSpeed tag directory to read instead of ``latest``.

    Returns:
        ``(model, report)``; the model in eval mode (a model built here is on CPU).
    """
    from redrec.model.redrec import RedRec

    source = "<state dict>" if isinstance(path, dict) else str(path)
    state = dict(path) if isinstance(path, dict) else read_state_dict(path, tag=tag)
    if isinstance(cfg_or_model, RedRec):
        model = cfg_or_model
    elif isinstance(cfg_or_model, ModelConfig):
        model = RedRec(cfg_or_model)
    elif isinstance(cfg_or_model, (str, Path)):
        model = RedRec(config_for_checkpoint(state, cfg_or_model, store=store, user_base_model_dir=user_base_model_dir))
    else:
        raise TypeError(f"cfg_or_model must be a RedRec, a ModelConfig or a base model directory, got {type(cfg_or_model).__name__}")
    tower = _check_model(model)
    if store is not None and model.cfg.item_tower.n_items != store.n_items:
        raise DataError(store.path, "n_items", f"the store has {store.n_items:,} items but the model was built for "
                        f"{model.cfg.item_tower.n_items:,}", hint="pass the base model directory to build it for the store")
    if action_names is None and store is not None:
        action_names = list(store.actions_names)
    rep = ReferenceLoadReport(source=source)
    u = model.cfg.user_tower
    ours = model.state_dict()
    written: set[str] = set()
    enc_emb = tower.encoder.get_input_embeddings().weight
    enc_emb_key = next(f"item_tower.encoder.{n}" for n, p in tower.encoder.named_parameters() if p is enc_emb)
    bb_emb = model.backbone.get_input_embeddings().weight
    bb_emb_key = next(f"backbone.{n}" for n, p in model.backbone.named_parameters() if p is bb_emb)

    def copy(ref_key: str, our_key: str, value: Tensor, label: str | None = None, rows: slice | None = None) -> None:
        target = ours[our_key] if rows is None else ours[our_key][rows]
        if tuple(target.shape) != tuple(value.shape):
            rep.mismatched[ref_key] = f"ours {list(target.shape)} ({label or our_key}) vs checkpoint {list(value.shape)}"
            return
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
        rep.mapped[ref_key] = label or our_key
        written.add(our_key)

    # expected keys: every tensor of both LLMs, the slot, the queries, the head, and the addends switched on
    expected = {f"item_llm.model.{k[len('item_tower.encoder.'):]}" for k in ours if k.startswith("item_tower.encoder.")}
    expected |= {f"user_llm.model.{k[len('backbone.'):]}" for k in ours if k.startswith("backbone.")} - {
        f"user_llm.model.{bb_emb_key[len('backbone.'):]}"}
    expected |= {"item_emb_tokens", "query.weight"} | {f"note_embedding_head.{a}.{w}" for a in _HEAD_MAP for w in ("weight", "bias")}
    if u.use_actions and model.cfg.n_actions:
        expected.add("item_action_embedding")
    if u.use_hour:
        expected.add("hour_embeddings.weight")
    if u.use_position:
        expected.add("position_embeddings.weight")
    seen: set[str] = set()
    for key, value in state.items():
        norm_key = key
        sub_item, sub_user = _llm_key(key, "item_llm"), _llm_key(key, "user_llm")
        if sub_item is not None or sub_user is not None:
            llm, sub = ("item_llm", sub_item) if sub_item is not None else ("user_llm", sub_user)
            norm_key = f"{llm}.model.{sub}"
            seen.add(norm_key)
            if sub.startswith("lm_head."):
                rep.ignored[key] = "causal-LM output head: unused by an embedding model (tied to embed_tokens in Qwen2.5)"
                continue
            if sub.endswith("rotary_emb.inv_freq"):
                rep.ignored[key] = "rotary frequencies: recomputed from the config"
                continue
            our_key = ("item_tower.encoder." if llm == "item_llm" else "backbone.") + sub
            if our_key == enc_emb_key and tuple(value.shape) != tuple(enc_emb.shape) and value.ndim == 2 \
                    and value.shape[0] < enc_emb.shape[0] and value.shape[1] == enc_emb.shape[1]:
                # our vocabulary grew by the slot token: copy the reference's rows, the slot row comes below
                copy(key, our_key, value, f"{our_key}[:{value.shape[0]}]", rows=slice(0, value.shape[0]))
                continue
            if our_key == bb_emb_key:
                if tuple(value.shape) == tuple(bb_emb.shape):
                    copy(key, our_key, value)
                else:
                    rep.ignored[key] = "user-LLM token embedding: unused (the user tower runs on inputs_embeds)"
                continue
            if our_key in ours:
                copy(key, our_key, value)
            else:
                rep.unexpected.append(key)
            continue
        seen.add(key)
        if key == "item_emb_tokens":
            continue  # written last, over the embedding table copied above
        if key == "query.weight":
            copy(key, "queries.weight", value)
        elif key.startswith("note_embedding_head."):
            parts = key.split(".")
            if len(parts) == 3 and parts[1] in _HEAD_MAP:
                copy(key, f"head.{_HEAD_MAP[parts[1]]}.{parts[2]}", value)
            elif len(parts) == 3 and parts[1] == "dropout":
                rep.ignored[key] = "dropout has no state"
            else:
                rep.unexpected.append(key)
        elif key == "item_action_embedding":
            _map_actions(model, value, rep, written, action_names)
        elif key == "hour_embeddings.weight":
            n = min(REFERENCE_N_HOURS, value.shape[0])
            copy(key, "hour_emb.weight", value[:n], f"hour_emb.weight[:{n}]", rows=slice(0, n))
            if key in rep.mapped:
                with torch.no_grad():
                    ours["hour_emb.weight"][n:].zero_()
                rep.not_in_reference["hour_emb.weight[24]"] = "zero (the unknown-hour row; the reference has none)"
        elif key == "position_embeddings.weight":
            if u.use_position:
                copy(key, "pos_emb.weight", value)
                rep.notes.append("position_embeddings: the reference indexes positions within each scenario block "
                                 "(homefeed 0.., ads 0..); ours index the merged sequence")
            else:
                rep.ignored[key] = "position embeddings switched off in this configuration (use_position: false)"
        elif key == "logit_scale":
            rep.logit_scale = float(value.float().reshape(-1)[0])
            rep.mapped[key] = "report.logit_scale (LogitScale.log_scale when training on)"
        elif any(key == p or key.startswith(p) for p in _IGNORED_PREFIXES):
            rep.ignored[key] = next(why for p, why in _IGNORED_PREFIXES.items() if key == p or key.startswith(p))
        else:
            rep.unexpected.append(key)
    if "item_emb_tokens" in state:
        value, slot = state["item_emb_tokens"], tower.slot_id
        if value.numel() != enc_emb.shape[1]:
            rep.mismatched["item_emb_tokens"] = f"ours [{enc_emb.shape[1]}] (slot row) vs checkpoint {list(value.shape)}"
        elif slot >= enc_emb.shape[0]:
            rep.mismatched["item_emb_tokens"] = f"slot token id {slot} is outside the item LLM's {enc_emb.shape[0]} rows"
        else:
            with torch.no_grad():
                enc_emb[slot].copy_(value.reshape(-1).to(enc_emb.dtype))
            rep.mapped["item_emb_tokens"] = f"{enc_emb_key}[{slot}]  (slot token {tower.cfg.text.slot_token!r})"
    rep.missing = sorted(k for k in expected if k not in seen)
    rep.unexpected.sort()
    _describe_ours(model, ours, written, rep)
    _add_notes(model, rep)
    if not rep.ok:
        problem = (f"does not match the reference layout: {len(rep.missing)} missing {rep.missing[:10]}, "
                   f"{len(rep.unexpected)} unexpected {rep.unexpected[:10]}, "
                   f"{len(rep.mismatched)} shape mismatches {list(rep.mismatched.items())[:5]}")
        if strict:
            raise DataError(source, None, problem, hint="load with strict=False (--no-strict) to keep going")
        log.warning("%s: %s", source, problem)
    if store is not None:
        from redrec.model.item_towers import prepare_text_tower

        prepare_text_tower(model, store)
    _fill_no_text(model, rep)
    return model.eval(), rep


def _map_actions(model: Any, value: Tensor, rep: ReferenceLoadReport, written: set[str],
                 action_names: list[str] | None) -> None:
    """Reference rows (``REFERENCE_ACTIONS`` order) -> our ``action_emb`` columns, matched by flag name."""
    key = "item_action_embedding"
    cfg = model.cfg
    if not (cfg.user_tower.use_actions and cfg.n_actions):
        rep.ignored[key] = "action embeddings switched off in this configuration (use_actions: false)"
        return
    W = model.action_emb.weight  # [H, A]: multi-hot @ W.T = sum of the flags' columns
    if value.ndim != 2 or value.shape[1] != W.shape[0]:
        rep.mismatched[key] = f"ours [A, {W.shape[0]}] vs checkpoint {list(value.shape)}"
        return
    names = list(action_names or [])
    if names and len(names) != cfg.n_actions:
        raise ConfigError(None, "n_actions", f"{len(names)} action names {names} for a model with {cfg.n_actions} flags")
    ref_names = list(REFERENCE_ACTIONS[: value.shape[0]])
    if not names:  # no names known: our flags are taken to be the reference's, in its order
        names = ref_names[: cfg.n_actions]
        rep.notes.append(f"action flags assumed to be the reference's, in its order: {names}")
    cols = {n: j for j, n in enumerate(names)}
    with torch.no_grad():
        W.zero_()
        used = []
        for r, n in enumerate(ref_names):
            if n in cols and cols[n] < W.shape[1]:
                W[:, cols[n]] = value[r].to(W.dtype)
                used.append(f"{n}: row {r} -> column {cols[n]}")
    rep.mapped[key] = f"action_emb.weight (transposed; {', '.join(used) or 'no flag matched'})"
    written.add("action_emb.weight")
    unused = [n for n in ref_names if n not in cols]
    extra = [n for n in names if n not in ref_names]
    if unused:
        rep.notes.append(f"reference action rows with no flag of ours (dropped): {unused}")
    if extra:
        rep.not_in_reference["action_emb.weight[:, " + ",".join(str(cols[n]) for n in extra) + "]"] = \
            f"zero (flags {extra} have no reference embedding)"


def _describe_ours(model: Any, ours: dict[str, Tensor], written: set[str], rep: ReferenceLoadReport) -> None:
    u = model.cfg.user_tower
    unused = {"scenario_emb.weight": not u.use_scenario, "pos_emb.weight": not u.use_position,
              "gap_emb.weight": not u.use_time_gap, "hour_emb.weight": not u.use_hour,
              "action_emb.weight": not (u.use_actions and model.cfg.n_actions)}
    data = {"item_tower.has_text", "item_tower.tokens", "item_tower.lengths"}
    for k in ours:
        if k in written or k.startswith(("item_tower.encoder.", "backbone.", "head.")) or k == "queries.weight":
            continue
        if k in data:
            rep.not_in_reference[k] = "item data, filled from a store's item table (prepare_text_tower / --store)"
        elif k == "item_tower.no_text":
            rep.not_in_reference[k] = "the encoding of the empty prompt (as the reference encodes an item without text)"
        elif unused.get(k):
            rep.not_in_reference[k] = "initial values, unused (switched off in this configuration)"
        else:
            rep.not_in_reference[k] = "initial values, USED by this configuration"
    for k, v in rep.not_in_reference.items():
        if v.endswith("USED by this configuration"):
            log.warning("%s is not in the reference checkpoint and keeps its initial values", k)


def _add_notes(model: Any, rep: ReferenceLoadReport) -> None:
    rep.notes += [
        "item slot: the reference overwrites every token id 0 ('!' in Qwen's vocabulary) with item_emb_tokens; ours "
        "is an added token, so items whose text contains '!' get different vectors",
        "queries: as in the reference, query k attends to the history and queries 0..k (queries_causal) at RoPE "
        "position length+k (query_positions: sequential); the reference uses the padded history length T, so "
        "positions agree for the longest user of a padded batch and for unpadded input",
        f"user input: build sequences with mixing policy 'naive' and quotas {REFERENCE_QUOTAS} (scenario blocks "
        "concatenated in the reference order); the reference pads each block in place (RoPE positions of the ads "
        "block shift when homefeed has fewer than 96 events), ours are contiguous",
        "item text: the reference also removes topic tags from the content (note_content_preprocess); ours keep the "
        "text as stored",
        "hour of day: the reference uses the local time of its machine (datetime.fromtimestamp); set "
        "features.timezone to match (Xiaohongshu: Asia/Shanghai, an assumption)",
    ]


@torch.no_grad()
def _fill_no_text(model: Any, rep: ReferenceLoadReport) -> None:
    """Items without text: the vector of the empty prompt, as the reference would encode such an item."""
    from redrec.model.text import ItemTokenizer, encode_tokens

    tower = _check_model(model)
    t = tower.cfg.text
    if t.template is None:
        return
    tok = ItemTokenizer(t)
    ids, lengths = tok([t.template.format(**{f: "" for f in t.fields})])
    dev = tower.no_text.device
    was_training = tower.encoder.training
    tower.encoder.eval()
    v = encode_tokens(tower.encoder, torch.from_numpy(ids).to(dev), torch.from_numpy(lengths).to(dev), "slot")
    tower.encoder.train(was_training)
    tower.no_text.copy_(tower.proj(v[0].to(tower.no_text.dtype)))


def convert_reference(
    ckpt: str | Path,
    base_model_dir: str | Path,
    out: str | Path,
    *,
    user_base_model_dir: str | Path | None = None,
    store: str | Path | None = None,
    strict: bool = True,
    tag: str | None = None,
    overwrite: bool = False,
) -> ReferenceLoadReport:
    """Load a RedSeqRec checkpoint and write it as a redrec model directory (``RedRec.save_pretrained``) plus
    ``reference_conversion.json`` (the key report, logit scale included).  The directory is written beside ``out``
    and renamed into place, so a failure leaves nothing behind."""
    import shutil

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(out, None, "exists and is not empty", hint="pass --overwrite to replace it")
    st = None
    if store is not None:
        from redrec.data.store import EventStore

        st = EventStore(store)
    model, rep = load_reference_checkpoint(ckpt, base_model_dir, strict=strict, store=st,
                                           user_base_model_dir=user_base_model_dir, tag=tag)
    if st is None:
        rep.notes.append("no store given: the model holds no item texts (n_items = 1); convert with --store to build it "
                         "for a store's items, scenarios and action flags")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        (tmp / "reference_conversion.json").write_text(json.dumps(rep.to_dict(), indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rep

__all__ = [
    "REFERENCE_ACTIONS", "REFERENCE_FIELDS", "REFERENCE_ITEM_PROMPT", "REFERENCE_MAX_TEXT_TOKENS", "REFERENCE_QUOTAS",
    "REFERENCE_SCENARIOS", "ReferenceLoadReport", "config_for_checkpoint", "convert_reference", "load_reference_checkpoint",
    "read_state_dict", "reference_model_config", "reference_prompt_template",
]
