"""Result tables and JSON files.  Every table's title names the protocol, dataset, pool and K values.

Several results of one model (e.g. seeds) are shown as ``mean ± std`` (sample standard deviation) with the
number of runs: published margins are often smaller than seed noise.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from redrec.eval.metrics import metric_names
from redrec.eval.protocols import EvalResult

Results = Sequence[EvalResult] | Mapping[str, EvalResult]


def _as_list(results: Results) -> list[EvalResult]:
    if isinstance(results, Mapping):
        return [dataclasses.replace(r, model=str(name)) for name, r in results.items()]
    return list(results)


def _dataset_name(path: str) -> str:
    return Path(path).name or path


def _common(values: list[str]) -> str | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def _fmt(vals: list[float], digits: int) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    a = np.asarray(vals, dtype=np.float64)
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def format_table(
    results: Results,
    *,
    style: Literal["rich", "plain"] = "rich",
    metrics: Sequence[str] | None = None,
    digits: int = 4,
) -> str:
    """One row per model, one column per metric, as text.

    Args:
        results: a list of results, or ``{model name: result}`` (the key names the row).
        style: ``rich`` (box table, no colour codes) or ``plain`` (aligned columns).
        metrics: metric columns to show (default: ``hr@K`` and ``ndcg@K`` for every K, then ``mrr``).
        digits: decimals.

    The title holds what all results share (protocol, dataset, pool, K values); a setting that differs between
    results becomes a column instead.  Results with the same model name are aggregated as ``mean ± std``.
    """
    rs = _as_list(results)
    if not rs:
        return "(no results)"
    ks = sorted({k for r in rs for k in r.ks})
    cols = list(metrics) if metrics is not None else [m for m in metric_names(ks) if any(m in r.metrics for r in rs)]

    attrs = {
        "protocol": [r.protocol for r in rs],
        "dataset": [_dataset_name(r.dataset) for r in rs],
        "pool": [r.pool_description for r in rs],
        "K": [", ".join(map(str, r.ks)) for r in rs],
    }
    title_parts, extra_cols = [], []
    for key, vals in attrs.items():
        c = _common(vals)
        if c is None:
            extra_cols.append(key)
        else:
            title_parts.append({"K": f"K = {c}", "pool": c}.get(key, f"{key}: {c}"))
    title = " | ".join(title_parts) if title_parts else "evaluation"

    groups: dict[tuple, list[EvalResult]] = {}
    for i, r in enumerate(rs):
        key = (r.model, *(attrs[a][i] for a in extra_cols))
        groups.setdefault(key, []).append(r)
    multi = any(len(g) > 1 for g in groups.values())

    header = ["model", *extra_cols, "users", *(["runs"] if multi else []), *cols]
    rows = []
    for key, g in groups.items():
        users = sorted({r.n_users for r in g})
        row = [key[0], *key[1:], "/".join(f"{u:,}" for u in users)]
        if multi:
            row.append(str(len(g)))
        for m in cols:
            vals = [r.metrics[m] for r in g if m in r.metrics]
            row.append(_fmt(vals, digits) if vals else "-")
        rows.append(row)

    if style == "plain":
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        n_left = 1 + len(extra_cols)  # text columns left-aligned, numbers right-aligned

        def line(cells: list[str]) -> str:
            return "  ".join(
                str(c).ljust(w) if j < n_left else str(c).rjust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out = [title, line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
        return "\n".join(out)

    from rich.console import Console
    from rich.table import Table

    table = Table()
    for j, h in enumerate(header):
        table.add_column(h, justify="left" if j < 1 + len(extra_cols) else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=1000, color_system=None, force_terminal=False, highlight=False).print(table)
    return "\n".join([title, *(s.rstrip() for s in buf.getvalue().splitlines())])


def write_json(path: str | Path, results: Results | EvalResult, *, per_user: bool = False) -> Path:
    """Write ``{"results": [...]}`` (each :meth:`EvalResult.to_dict`) to ``path``; returns the path."""
    rs = [results] if isinstance(results, EvalResult) else _as_list(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": [r.to_dict(per_user=per_user) for r in rs]}, indent=2) + "\n")
    return path


def read_json(path: str | Path) -> list[EvalResult]:
    """Results written by :func:`write_json`."""
    data = json.loads(Path(path).read_text())
    items = data["results"] if isinstance(data, dict) and "results" in data else data
    if isinstance(items, dict):
        items = [items]
    return [EvalResult.from_dict(d) for d in items]
