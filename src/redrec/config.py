"""Typed configuration: dataclasses loadable from YAML with strict checking.

Every config is a (nested) dataclass.  :func:`from_dict` builds one from a plain mapping and rejects
unknown keys and wrongly typed values with a :class:`~redrec.errors.ConfigError` naming the file and the
dotted field path.  :func:`to_dict` is the inverse; the resolved config is saved next to every artifact.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from redrec.errors import ConfigError

T = TypeVar("T")


def _check_value(tp: Any, value: Any, source: str | None, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(a, value, source, field)
            except ConfigError as e:
                errors.append(e.problem)
        raise ConfigError(source, field, "; ".join(errors) or f"invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(source, field, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        if not isinstance(value, dict):
            raise ConfigError(source, field, f"expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, source=source, prefix=field + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, field, f"expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        out = [_check_value(inner, v, source, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, field, f"expected a mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {
            _check_value(kt, k, source, f"{field}.{k}"): _check_value(vt, v, source, f"{field}.{k}")
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, field, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, field, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, field, f"expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, field, f"expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str | Path | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    src = str(source) if source is not None else None
    if not isinstance(data, dict):
        raise ConfigError(src, prefix.rstrip(".") or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(src, prefix + unknown[0], f"unknown field (known: {', '.join(sorted(names))})")
    kwargs = {k: _check_value(hints[k], v, src, prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(src)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config dataclass (for YAML / JSON)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file, then apply ``overrides`` (dotted keys allowed)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(path, "<file>", "config file does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(path, "<file>", f"not valid YAML: {e}") from None
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return from_dict(cls, data, source=path)


def load_config(cls: type[T], path: str | Path | None, overrides: dict[str, Any] | None = None) -> T:
    """``cls`` from a YAML file (or from its defaults when ``path`` is None), with dotted-key ``overrides``."""
    if path is not None:
        return load_yaml(cls, path, overrides)
    data = to_dict(cls())
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return from_dict(cls, data, source="command line")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def resolve_device(spec: str, source: str | Path | None = None, field: str = "device", *,
                   per_rank: bool = False) -> Any:
    """The ``torch.device`` of a device setting: ``auto`` (cuda when torch sees a GPU, else cpu), ``cpu``,
    ``cuda`` / ``cuda:N`` or any other torch device string.  With ``per_rank``, a cuda device without an index
    (``cuda``, or ``auto`` on a GPU machine) is ``cuda:LOCAL_RANK`` modulo the visible GPUs (torchrun sets
    ``LOCAL_RANK``; 0 without it), so every process of one node takes its own GPU.

    Raises:
        ConfigError: not a device string, or a cuda / mps device this process cannot use (a torch without CUDA, no
            GPU visible, an index past the GPUs) -- said here rather than as torch's traceback at first use.
    """
    import torch

    if spec == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(spec)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(source, field, f"{spec!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(source, field, f"{spec!r} requested but {why}; use cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(source, field, f"{spec!r}: only {torch.cuda.device_count()} GPU(s) visible")
        if per_rank and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(source, field, f"{spec!r} requested but MPS is not available; use cpu (or auto)")
    return dev
