"""Tables, reading, plots and the markdown report of ``redrec bench`` (what writes ``docs/results.md``).

Everything here reads the plain ``bench.json`` dict of :func:`redrec.bench.run_bench`, so a report can be
regenerated from the bench directories alone (``redrec bench report OUT1 OUT2 -o docs/results.md``).

* :func:`format_bench` / :func:`markdown_table`: one row per variant, ``mean ± std`` (sample std, ddof = 1) per
  metric, titled with the protocol, dataset, pool, test users and seeds;
* :func:`compare` / :func:`reading`: each difference of means set against the larger of the two seed stds,
  ``within seed spread`` when it is not larger;
* :func:`write_plots`: ``metrics_at_k.png`` and ``training_curves.png`` (matplotlib, Agg canvas);
* :func:`write_report`: the markdown file, with the plots drawn beside it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redrec.errors import DataError, RedrecError

#: metric columns of the printed table (those the protocol's K values allow)
DEFAULT_TABLE_METRICS = ["hr@10", "hr@50", "hr@100", "hr@1000", "ndcg@10", "ndcg@100", "mrr"]
#: metrics the automatic reading compares
READING_METRICS = ("hr@10", "ndcg@10", "mrr")


def load_bench(path: str | Path) -> dict[str, Any]:
    """``bench.json`` of a bench directory (or the file itself)."""
    p = Path(path)
    f = p / "bench.json" if p.is_dir() else p
    if not f.exists():
        raise DataError(f, None, "no bench results here", hint="run `redrec bench run ... -o DIR` first")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f, None, f"corrupt bench.json: {e}") from None


def reference_variant(bench: dict[str, Any]) -> str:
    """The variant the reading compares the others with: the preset's, else ``redrec``, else the first trained."""
    names = list(bench["aggregates"])
    ref = bench.get("reference")
    if ref in names:
        return str(ref)
    if "redrec" in names:
        return "redrec"
    trained = [n for n in names if bench["aggregates"][n]["kind"] == "trained"]
    return trained[0] if trained else names[0]


def describe_machine(m: dict[str, Any], threads: int | None = None) -> str:
    """``AMD EPYC (2 cores), torch 2.13.0+cpu, Python 3.11.2`` (+ threads per run)."""
    s = f"{m.get('cpu')} ({m.get('usable_cores') or m.get('cores')} cores"
    s += f", {m['memory_gib']:g} GiB)" if m.get("memory_gib") else ")"
    if m.get("gpu"):
        s += f", GPU {m['gpu']}"
    s += f", torch {m.get('torch')}, Python {m.get('python')}"
    if threads:
        s += f", {threads} torch thread{'s' if threads > 1 else ''} per run"
    if m.get("git"):
        s += f", code {m['git']}"
    return s


# ----------------------------------------------------------------------------------------------------------------
# tables and reading
# ----------------------------------------------------------------------------------------------------------------
def _label(metric: str) -> str:
    return metric.upper()  # hr@10 -> HR@10, mrr -> MRR


def bench_title(bench: dict[str, Any]) -> str:
    """E.g. ``protocol redrec (targets: next 3 ads events) | dataset synth-data | full pool: 8,000 items |
    test users 1,800 | seeds 0, 1, 2 (mean ± sample std)``."""
    p = bench["protocol"]
    proto = p["name"] + (f" (targets: next {p['n_targets']} {p['target_scenario']} events)" if p["name"] == "redrec" else "")
    runs = bench["runs"]
    pool = runs[0]["pool_description"] if runs else f"pool: {bench['store_stats']['n_items']:,} items"
    users = sorted({r["n_users"] for r in runs})
    users_s = "/".join(f"{u:,}" for u in users) if users else "?"
    seeds = ", ".join(map(str, bench["seeds"]))
    return (f"protocol {proto} | dataset {bench['dataset_name']} | {pool} | test users {users_s} | "
            f"seeds {seeds} (mean ± sample std)")


def _cell(mean: float, std: float | None, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_rows(bench: dict[str, Any], metrics: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the mean ± std table (one row per variant)."""
    aggs = bench["aggregates"]
    wanted = list(metrics or bench.get("bench_config", {}).get("table_metrics") or DEFAULT_TABLE_METRICS)
    present = set.intersection(*(set(a["mean"]) for a in aggs.values())) if aggs else set()
    runs = bench["runs"]
    full_pool = runs[0]["pool_size"] if runs and runs[0]["pool"] == "full" else None
    # a cut-off K at or above a full pool's size is 1 for everyone: not worth a column
    cols = [m for m in wanted if m in present and not (full_pool and "@" in m and int(m.split("@")[1]) >= full_pool)]
    header = ["variant", "type", "seeds", *[_label(m) for m in cols], "wall s/run"]
    rows = []
    for name, a in aggs.items():
        rows.append([name, a["kind"], str(a["n"]), *[_cell(a["mean"][m], a["std"][m]) for m in cols],
                     f"{a['wall_time_s']['mean']:.0f}"])
    return header, rows


def format_bench(bench: dict[str, Any], metrics: Sequence[str] | None = None) -> str:
    """The mean ± std table as text (rich box table), titled with protocol, dataset, pool, users and seeds."""
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(bench, metrics)
    table = Table()
    for j, h in enumerate(header):
        table.add_column(h, justify="left" if j < 2 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=1000, color_system=None, force_terminal=False, highlight=False).print(table)
    note = ("zero-param rows are deterministic given the test cases: their spread is that of each seed's "
            "valid/test user split only") if any(a["kind"] == "zero-param" for a in bench["aggregates"].values()) else ""
    lines = [bench_title(bench), *(s.rstrip() for s in buf.getvalue().splitlines())]
    return "\n".join(lines + ([note] if note else []))


def markdown_table(bench: dict[str, Any], metrics: Sequence[str] | None = None) -> str:
    """The same table as GitHub markdown."""
    header, rows = table_rows(bench, metrics)
    align = ["---", "---", "---:", *["---:"] * (len(header) - 3)]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(f"`{r[0]}`" if j == 0 else c for j, c in enumerate(r)) + " |" for r in rows]
    return "\n".join(out)


def compare(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    """Difference of means ``a - b`` on ``metric`` against the larger of the two seed stds.

    Returns ``{"diff", "rel", "spread", "ratio", "verdict"}``; verdict is ``within seed spread`` when
    ``|diff| <= spread``, ``ahead``/``behind`` (a relative to b) beyond it, or ``no spread (one seed)``."""
    ma, mb = a["mean"][metric], b["mean"][metric]
    sa, sb = a["std"][metric], b["std"][metric]
    diff = ma - mb
    rel = diff / mb if mb else float("inf") if diff else 0.0
    if sa is None or sb is None:
        return {"diff": diff, "rel": rel, "spread": None, "ratio": None, "verdict": "no spread (one seed)"}
    spread = max(sa, sb)
    ratio = abs(diff) / spread if spread > 0 else float("inf") if diff else 0.0
    verdict = "within seed spread" if abs(diff) <= spread else ("ahead" if diff > 0 else "behind")
    return {"diff": diff, "rel": rel, "spread": spread, "ratio": ratio, "verdict": verdict}


def reading(bench: dict[str, Any], metrics: Sequence[str] = READING_METRICS) -> list[str]:
    """Markdown bullet lines: the reference variant against every other, per metric, in words."""
    aggs = bench["aggregates"]
    ref = reference_variant(bench)
    metrics = [m for m in metrics if all(m in a["mean"] for a in aggs.values())]
    if len(aggs) < 2 or not metrics:
        return ["- only one variant: nothing to compare."]
    head = metrics[0]
    best = max(aggs, key=lambda n: aggs[n]["mean"][head])
    lines = [f"- Best mean {_label(head)}: `{best}` ({aggs[best]['mean'][head]:.4f}). Reference for the comparisons "
             f"below: `{ref}`; each difference of means is set against the larger of the two seed stds."]
    for name, a in aggs.items():
        if name == ref:
            continue
        parts = []
        for m in metrics:
            c = compare(aggs[ref], a, m)
            s = f"{_label(m)} {aggs[ref]['mean'][m]:.4f} vs {a['mean'][m]:.4f} ({c['diff']:+.4f}, {c['rel']:+.1%})"
            if c["spread"] is None:
                s += ": one seed, no spread to compare with"
            elif c["verdict"] == "within seed spread":
                s += f": within seed spread (|diff| {abs(c['diff']):.4f} <= std {c['spread']:.4f})"
            else:
                who = ref if c["verdict"] == "ahead" else name
                s += f": `{who}` better by {c['ratio']:.1f}x the seed spread ({c['spread']:.4f})"
            parts.append(s)
        lines.append(f"- `{ref}` vs `{name}`: " + "; ".join(parts) + ".")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# plots (matplotlib, Agg canvas: no display, no global pyplot state)
# ----------------------------------------------------------------------------------------------------------------
def write_plots(bench: dict[str, Any], out: Path) -> list[str]:
    """``metrics_at_k.png`` and ``training_curves.png`` in ``out``; returns their file names."""
    names = ["metrics_at_k.png"]
    plot_metrics_at_k(bench, out / names[0])
    plot_training_curves(bench, out / "training_curves.png")
    names.append("training_curves.png")
    return names


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_metrics_at_k(bench: dict[str, Any], path: Path) -> None:
    """HR@K and NDCG@K vs K (log scale), one line per variant, error bars = std over seeds.  Each variant's points
    are shifted by a few percent along K so that overlapping error bars stay apart."""
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2)
    ks = bench["ks"]
    n = len(bench["aggregates"])
    for i, (name, a) in enumerate(bench["aggregates"].items()):
        dodge = 1.0 + 0.03 * (i - (n - 1) / 2)
        style = "--" if a["kind"] == "zero-param" else "-"
        for ax, m in zip(axes, ("hr", "ndcg"), strict=True):
            keys = [f"{m}@{k}" for k in ks if f"{m}@{k}" in a["mean"]]
            x = [int(k.split("@")[1]) * dodge for k in keys]
            y = [a["mean"][k] for k in keys]
            e = [a["std"][k] or 0.0 for k in keys]
            ax.errorbar(x, y, yerr=e, marker="o", markersize=3, capsize=3, linestyle=style, color=f"C{i % 10}", label=name)
    for ax, lab in zip(axes, ("HR@K", "NDCG@K"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel(lab)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(_plot_title(bench), fontsize=9)
    fig.savefig(path)


def plot_training_curves(bench: dict[str, Any], path: Path) -> None:
    """Training objective, next-item NCE loss and validation HR@10 vs step (mean over seeds), trained variants."""
    fig = _figure(14, 4.2)
    axes = fig.subplots(1, 3)
    panels = (("loss", "training loss (objective)"), ("loss_next", "next-item NCE loss"),
              ("valid_hr@10", "validation HR@10"))
    drawn = False
    for i, (name, a) in enumerate(bench["aggregates"].items()):  # colour i: the same as in metrics_at_k.png
        curves = a.get("curves")
        if not curves:
            continue
        for ax, (key, _) in zip(axes, panels, strict=True):
            c = curves.get(key) or {}
            if c.get("step"):
                ax.plot(c["step"], c["value"], marker="." if key.startswith("valid") else None, color=f"C{i % 10}", label=name)
                drawn = True
    for ax, (_, lab) in zip(axes, panels, strict=True):
        ax.set_xlabel("optimizer step")
        ax.set_title(lab, fontsize=9)
        ax.grid(True, alpha=0.3)
    if drawn:
        axes[2].legend(fontsize=8)
    else:
        axes[1].text(0.5, 0.5, "no trained variant", ha="center", va="center", transform=axes[1].transAxes)
    fig.suptitle(_plot_title(bench) + " (mean over seeds)", fontsize=9)
    fig.savefig(path)


def _plot_title(bench: dict[str, Any]) -> str:
    what = f"preset {bench['preset']}" if bench.get("preset") else "models"
    p = bench["protocol"]
    return f"{what} on {bench['dataset_name']} | protocol {p['name']} | seeds {', '.join(map(str, bench['seeds']))}"


# ----------------------------------------------------------------------------------------------------------------
# markdown report
# ----------------------------------------------------------------------------------------------------------------
def write_report(bench_dirs: Sequence[str | Path], out: str | Path, *, command: str | None = None,
                 summary: str | Path | None = None) -> Path:
    """``out`` (markdown): per bench its command, seeds, machine, the mean ± std table, the plots (drawn from its
    bench.json into a folder named like ``out`` without its suffix, e.g. ``docs/results/<bench>/``) and the
    automatic reading.  ``summary``: a hand-written markdown file (the overall reading across benches) placed
    after the header, verbatim."""
    out = Path(out)
    if not bench_dirs:
        raise RedrecError("bench report: give at least one bench directory")
    benches = [(Path(d), load_bench(d)) for d in bench_dirs]
    assets = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = command or "redrec bench report " + " ".join(str(d) for d in bench_dirs) + f" -o {out}"
    lines = [
        "# Results",
        "",
        f"Generated by `{cmd}` from the bench directories below (each made by the `redrec bench run` command "
        "shown with it); `make results` reruns the benches (finished runs are read back) and regenerates this "
        "file. Do not edit by hand.",
        "",
        "Every table: mean ± sample standard deviation (ddof = 1) over the seeds; seed *k* sets the training "
        "seed (initialisation, batch order, negatives) and which users are validation users, so the test users "
        "of two seeds differ slightly; the protocol's cutoffs are fixed. Zero-parameter models are evaluated "
        "on each seed's test users (their spread is that of the split alone). The reading under each table sets "
        "every difference of means against the larger of the two seed stds and says *within seed spread* when "
        "it is not larger; with three seeds a gap of one or two stds is a hint, not a significant result.",
        "",
    ]
    if summary is not None:
        sp = Path(summary)
        if not sp.exists():
            raise RedrecError(f"{sp}: no such summary file")
        lines += [sp.read_text().rstrip(), ""]
    used: set[str] = set()
    for d, b in benches:
        slug = d.resolve().name
        while slug in used:
            slug += "_"
        used.add(slug)
        what = f"preset `{b['preset']}`" if b.get("preset") else "models " + ", ".join(f"`{n}`" for n in b["aggregates"])
        lines += [f"## {what} on {b['dataset_name']}", ""]
        if b.get("description"):
            lines += [b["description"][0].upper() + b["description"][1:] + ".", ""]
        m = b["machine"]
        total = b.get("run_wall_time_s") or sum(r["wall_time_s"] for r in b["runs"])
        runs_done = len(b["runs"])
        expected = len(b["variants"]) * len(b["seeds"])
        lines += [
            f"- command: `{b['command']}`",
            f"- seeds: {', '.join(map(str, b['seeds']))}" + ("" if runs_done == expected else
                                                             f" (**incomplete: {runs_done} of {expected} runs**)"),
            f"- machine: {describe_machine(m, m.get('num_threads'))}" + _load_note(b),
            f"- time: {total / 60:.1f} min of runs in all (bench {'finished ' + b['finished'] if b.get('finished') else 'started ' + b['created']})",
            f"- store: {b['store_stats']['n_users']:,} users, {b['store_stats']['n_items']:,} items, "
            f"{b['store_stats']['n_events']:,} events, scenarios {', '.join(b['store_stats']['scenarios'])}",
            "",
            f"**{bench_title(b)}**",
            "",
            markdown_table(b),
            "",
        ]
        dst = assets / slug
        dst.mkdir(parents=True, exist_ok=True)
        pics = []
        for name in write_plots(b, dst):  # drawn again from bench.json: the report needs nothing else
            rel = os.path.relpath(dst / name, out.parent)
            pics.append(f"![{Path(name).stem.replace('_', ' ')}]({Path(rel).as_posix()})")
        if pics:
            lines += [" ".join(pics), ""]
        lines += ["Reading:", "", *reading(b), ""]
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(out)
    return out


def _load_note(bench: dict[str, Any]) -> str:
    """``; host load average 5.7-7.4 ...`` from the runs' records (empty when none was recorded)."""
    loads = [r["load_avg"] for r in bench["runs"] if r.get("load_avg") is not None]
    if not loads:
        return ""
    return (f"; host load average (1 min) at the end of the runs {min(loads):.1f}-{max(loads):.1f}: "
            "on a shared host the wall times include waiting for other jobs")
