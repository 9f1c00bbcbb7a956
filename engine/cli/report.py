"""``leanclip report SWEEP``: the papers' tables of a sweep (``leanclip.cli.sweep``), from the cells' own result files.

Per protocol, per dataset and averaged over datasets, mean ± std over seeds (population std, as CoOp's parse script):

- fewshot: top-1 accuracy per shot count (rows: methods; columns: K), plus accuracy-vs-shots curves;
- base2new: base / new accuracy and H; H of a dataset is the harmonic mean of its mean base and mean new accuracy (as
  CoCoOp reports it), its ± the std over seeds of each seed's H; the average row does the same with the averages;
- xd / dg: the source and every target, plus the average over the targets.

A group with fewer results than seeds shows how many it averages (``[2/3]``); an average over datasets is given
only when every dataset has every seed (else ``—``). Every cell without a result is listed with its state and
error line. What the report reads is checked first: a malformed sweep.json is one line naming the file and the field
(exit 2); a result file whose accuracy is not a finite number in [0, 100] makes its cell ``invalid`` (listed with
the file and the field, never averaged), so one damaged cell does not hide the rest of the grid. Writes ``report.md`` (also printed), ``report.csv`` (one row per number) and ``report_<protocol>.png``
into SWEEP (or ``--output``). Exit 2 when SWEEP holds no sweep.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from leanclip import utils
from leanclip.cli.common import UsageError
from leanclip.metrics import harmonic_mean
from leanclip.cli.sweep_grid import ZEROSHOT, cells_of
from leanclip.cli.sweep_state import InvalidResult, cell_metrics, load_manifest, spec_from_manifest

DASH = "—"


def add_arguments(p) -> None:
    p.description = ("Tables of a `leanclip sweep` folder: mean ± std over seeds per dataset and averaged over "
                     "datasets (Markdown, CSV, PNG); cells without a result are listed, never averaged in silence.")
    p.add_argument("sweep", metavar="SWEEP", help="folder written by leanclip sweep (holds sweep.json)")
    p.add_argument("--output", metavar="DIR", default=None, help="where report.md / .csv / .png go (default SWEEP)")


# ------------------------------------------------------------------------------------------------------ statistics
def stat(values: list[float], expected: int) -> dict:
    """mean, population std, count and expected count of ``values`` (mean/std None when empty)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "expected": expected}
    mean = sum(values) / n
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / n), "n": n, "expected": expected}


def fmt(st: dict | None) -> str:
    if st is None or st["mean"] is None:
        return DASH
    text = f"{st['mean']:.2f}" + (f" ± {st['std']:.2f}" if st["std"] is not None else "")
    return text + (f" [{st['n']}/{st['expected']}]" if st["n"] < st["expected"] else "")


def _h(b: float, n: float) -> float:
    return harmonic_mean(b, n)


def per_seed_average(groups: list[dict], seeds: list) -> dict | None:
    """``{seed: mean over groups}`` when every group (``{seed: value}``) has every seed, else None."""
    if not groups or any(set(seeds) - set(g) for g in groups):
        return None
    return {s: sum(g[s] for g in groups) / len(groups) for s in seeds}


# ------------------------------------------------------------------------------------------------------- collection
def collect(sweep: Path) -> dict:
    """``{protocol: {"spec", "values": {(dataset, method, shots): {seed: metrics}}, "missing": [...]}}``."""
    if not (sweep / "sweep.json").is_file():
        raise UsageError(f"{str(sweep)!r} holds no sweep.json (make one with leanclip sweep)")
    manifest = load_manifest(sweep)
    out = {}
    for protocol, entry in manifest["protocols"].items():
        spec = spec_from_manifest(sweep, protocol, entry)
        values, missing = {}, []
        for cell in cells_of(spec):
            try:
                metrics = cell_metrics(cell, spec)
            except InvalidResult as e:
                missing.append({"cell": cell.id, "state": "invalid", "error": str(e)})
                continue
            if metrics is None:
                recorded = manifest["cells"].get(cell.id, {})
                state = recorded.get("state", "pending")
                missing.append({"cell": cell.id, "state": "failed" if state == "failed" else "missing",
                                "error": recorded.get("error")})
                continue
            shots = spec.shots if cell.method == ZEROSHOT else [cell.shots]  # zero-shot: the same at every K
            for k in shots:
                values.setdefault((cell.dataset, cell.method, k), {})[cell.seed] = metrics
        out[protocol] = {"spec": spec, "values": values, "missing": missing}
    return out


def _seeds(spec, method: str) -> list:
    return [0] if method == ZEROSHOT else list(spec.seeds)


# ----------------------------------------------------------------------------------------------------------- tables
def _metric(values: dict, key, metric: str) -> dict:
    """``{seed: value of metric}`` of one (dataset, method, shots) group."""
    return {s: m[metric] for s, m in values.get(key, {}).items() if m.get(metric) is not None}


def _avg_stat(groups: list[dict], seeds: list) -> tuple[dict | None, dict | None]:
    avg = per_seed_average(groups, seeds)
    return (None, None) if avg is None else (stat(list(avg.values()), len(seeds)), avg)


def _h_stat(base: dict, new: dict, b_st: dict | None, n_st: dict | None, expected: int) -> dict | None:
    """H of the mean base and mean new accuracy, ± the std over seeds of each seed's H."""
    if not b_st or not n_st or b_st["mean"] is None or n_st["mean"] is None:
        return None
    per_seed = [_h(base[s], new[s]) for s in base if s in new]
    st = stat(per_seed, expected)
    return {**st, "mean": _h(b_st["mean"], n_st["mean"])}


def tables(protocol: str, data: dict) -> list[dict]:
    """``[{"title", "dataset", "shots", "columns", "rows": {method: {column: stat | None}}}]`` of one protocol: one
    table per dataset and one for the average over datasets (xd / dg: one per shot count)."""
    spec, values = data["spec"], data["values"]
    if protocol in ("xd", "dg"):
        return [_xd_table(spec, values, k) for k in spec.shots]
    groups = [[d] for d in spec.datasets] + ([spec.datasets] if len(spec.datasets) > 1 else [])
    if protocol == "fewshot":
        return [_fewshot_table(spec, values, g) for g in groups]
    return [_b2n_table(spec, values, g, k) for k in spec.shots for g in groups]


def _fewshot_table(spec, values: dict, datasets: list[str]) -> dict:
    rows = {}
    for m in spec.methods:
        seeds = _seeds(spec, m)
        rows[m] = {}
        for k in spec.shots:
            groups = [_metric(values, (d, m, k), "acc") for d in datasets]
            if len(datasets) == 1:
                rows[m][f"{k}-shot"] = stat(list(groups[0].values()), len(seeds))
            else:
                rows[m][f"{k}-shot"] = _avg_stat(groups, seeds)[0]
    name = datasets[0] if len(datasets) == 1 else "average"
    return {"title": f"few-shot top-1 (%): {name}", "dataset": name, "shots": None,
            "columns": [f"{k}-shot" for k in spec.shots], "rows": rows}


def _b2n_table(spec, values: dict, datasets: list[str], k: int) -> dict:
    rows = {}
    for m in spec.methods:
        seeds = _seeds(spec, m)
        base = [_metric(values, (d, m, k), "base") for d in datasets]
        new = [_metric(values, (d, m, k), "new") for d in datasets]
        if len(datasets) == 1:
            b, n = base[0], new[0]
            b_st, n_st = stat(list(b.values()), len(seeds)), stat(list(n.values()), len(seeds))
        else:
            (b_st, b), (n_st, n) = _avg_stat(base, seeds), _avg_stat(new, seeds)
        rows[m] = {"base": b_st, "new": n_st, "H": _h_stat(b or {}, n or {}, b_st, n_st, len(seeds))}
    name = datasets[0] if len(datasets) == 1 else "average"
    return {"title": f"base-to-new top-1 (%), {k} shots: {name}", "dataset": name, "shots": k,
            "columns": ["base", "new", "H"], "rows": rows}


def _xd_table(spec, values: dict, k: int) -> dict:
    rows = {}
    for m in spec.methods:
        seeds = _seeds(spec, m)
        rows[m] = {c: stat(list(_metric(values, (spec.source, m, k), c).values()), len(seeds))
                   for c in [spec.source, *spec.datasets]}
        groups = [_metric(values, (spec.source, m, k), t) for t in spec.datasets]
        rows[m]["targets avg"] = _avg_stat(groups, seeds)[0]
    return {"title": f"{spec.protocol} top-1 (%), trained on {spec.source}, {k} shots", "dataset": spec.source,
            "shots": k, "columns": [spec.source, *spec.datasets, "targets avg"], "rows": rows}


# ---------------------------------------------------------------------------------------------------------- outputs
def markdown(protocol: str, data: dict, tabs: list[dict]) -> str:
    lines = [f"## {protocol}", ""]
    for t in tabs:
        lines += [f"### {t['title']}", "", "| method | " + " | ".join(t["columns"]) + " |",
                  "|---|" + "---:|" * len(t["columns"])]
        lines += [f"| {m} | " + " | ".join(fmt(row.get(c)) for c in t["columns"]) + " |"
                  for m, row in t["rows"].items()]
        lines.append("")
    if data["missing"]:
        lines += [f"### cells without a result ({len(data['missing'])}, not averaged)", ""]
        lines += [f"- `{x['cell']}`: {x['state']}" + (f": {x['error']}" if x.get("error") else "")
                  for x in data["missing"]]
        lines.append("")
    return "\n".join(lines)


def csv_rows(protocol: str, tabs: list[dict]) -> list[dict]:
    rows = []
    for t in tabs:
        for m, row in t["rows"].items():
            for c in t["columns"]:
                st = row.get(c) or {"mean": None, "std": None, "n": 0, "expected": None}
                rows.append({"protocol": protocol, "dataset": t["dataset"], "shots": t["shots"], "method": m,
                             "column": c, **st})
    return rows


def plot(protocol: str, tabs: list[dict], path: Path) -> None:
    """fewshot: accuracy-vs-shots curves per dataset; base2new: H bars per method; xd / dg: target-average bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tabs), figsize=(4 * len(tabs), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tabs):
        if protocol == "fewshot":
            xs = [int(c.split("-")[0]) for c in t["columns"]]
            for m, row in t["rows"].items():
                st = [row.get(c) for c in t["columns"]]
                pts = [(x, s["mean"], s["std"]) for x, s in zip(xs, st) if s and s["mean"] is not None]
                if pts:
                    ax.errorbar(*zip(*pts), marker="o", capsize=3, label=m)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("shots per class")
        else:
            col = "H" if protocol == "base2new" else "targets avg"
            names = list(t["rows"])
            st = [t["rows"][m].get(col) for m in names]
            ax.bar(names, [s["mean"] if s and s["mean"] is not None else 0 for s in st],
                   yerr=[s["std"] if s and s["std"] is not None else 0 for s in st], capsize=3)
            ax.set_ylabel(col)
            ax.tick_params(axis="x", labelrotation=45)
        ax.set_title(t["dataset"] + (f" ({t['shots']} shots)" if t["shots"] is not None else ""), fontsize=9)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("top-1 (%)" if protocol == "fewshot" else axes[0][0].get_ylabel())
    if protocol == "fewshot":
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    utils.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run(args) -> int:
    sweep = Path(args.sweep)
    out = Path(args.output) if args.output else sweep
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {str(out)!r} is not a directory")
    collected = collect(sweep)
    if not collected:
        raise UsageError(f"{str(sweep / 'sweep.json')!r} records no protocol yet")
    md, rows = [f"# leanclip sweep report: {os.path.abspath(sweep)}", ""], []
    for protocol, data in collected.items():
        tabs = tables(protocol, data)
        md.append(markdown(protocol, data, tabs))
        rows += csv_rows(protocol, tabs)
        plot(protocol, tabs, out / f"report_{protocol}.png")
    text = "\n".join(md)
    utils.atomic_write_text(out / "report.md", text)
    utils.atomic_write_csv(out / "report.csv", rows, ["protocol", "dataset", "shots", "method", "column", "mean",
                                                      "std", "n", "expected"])
    print(text)
    return 0
