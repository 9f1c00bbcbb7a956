"""What ``leanclip bench step`` reports from its measured rows: ratios against ``plain``, the best peer of each lean
mode, the warnings that make a timing suspect, the plot and the markdown summary."""
from __future__ import annotations

from leanclip.bench.common import reliability_warnings, write_png


def _ratios(values: dict, base: str) -> dict:
    ref = values.get(base)
    return {k: (v / ref if v is not None and ref else None) for k, v in values.items()}


def finish_row(row: dict) -> dict:
    """Ratios against ``plain`` and the best-peer comparison, from a row's raw per-mode numbers."""
    row["time_ratio_vs_plain"] = _ratios(row["seconds"], "plain")
    row["peak_ratio_vs_plain"] = _ratios(row["peak_step_bytes"], "plain")
    row["saved_ratio_vs_plain"] = _ratios(row["saved_bytes"], "plain")
    row["best_peer"] = best_peers(row["seconds"], row["peak_step_bytes"])
    predicted = row.get("predicted_peak_bytes") or {}
    row["predicted_vs_measured"] = {m: (v / row["peak_step_bytes"][m] if v and row["peak_step_bytes"].get(m) else None)
                                    for m, v in predicted.items()}
    return row


def best_peers(seconds: dict, peak: dict) -> dict:
    """For each lean mode: the fastest peer (a ``plain*`` mode) whose step memory is <= lean's, and the peer with the
    least memory whose time is <= lean's, each with lean/peer ratios (None when no peer qualifies)."""
    known = {m for m in seconds if peak.get(m) is not None}
    peers = [m for m in known if m.startswith("plain")]
    out = {}
    for lean in sorted(m for m in known if m.startswith("lean:")):
        t, mem = seconds[lean], peak[lean]
        within_mem = [p for p in peers if peak[p] <= mem]
        within_time = [p for p in peers if seconds[p] <= t]
        fast = min(within_mem, key=lambda p: seconds[p], default=None)
        small = min(within_time, key=lambda p: peak[p], default=None)
        out[lean] = {
            "fastest_peer_within_memory": fast,
            "time_ratio_vs_that_peer": t / seconds[fast] if fast else None,
            "least_memory_peer_within_time": small,
            "memory_ratio_vs_that_peer": (mem / peak[small] if small and peak[small] else None),
        }
    return out


def timing_warnings(res: dict) -> list[str]:
    """Why a result's time ratios may be off: a mode whose repetitions spread too far, or a loaded machine
    (``leanclip.bench.common.reliability_warnings``). With several rows, a message names the model and method."""
    load = res.get("load_average") or {}
    spreads = {}
    for r in res["rows"]:
        where = f"{r['model']} {r['method']} " if len(res["rows"]) > 1 else ""
        spreads.update({where + mode: sp for mode, sp in (r.get("spread") or {}).items()})
    return reliability_warnings(spreads, load.get("start"), load.get("end"), res["threads"],
                                res["machine"].get("cpu_count"), what="bench step")


def plot_rows(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = sum(len(r["seconds"]) for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 + 0.5 * n), squeeze=False)
    labels, t, s = [], [], []
    for r in rows:
        for mode in r["seconds"]:
            labels.append(f"{r['model']} {r['method']} {mode}")
            t.append(r["time_ratio_vs_plain"][mode] or float("nan"))
            s.append(r["peak_ratio_vs_plain"].get(mode) or float("nan"))
    for ax, vals, title in ((axes[0][0], t, "step time / plain"), (axes[0][1], s, "step memory / plain")):
        ax.barh(range(len(vals)), vals)
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title)
        ax.invert_yaxis()
    fig.tight_layout()
    try:
        return write_png(path, fig)
    finally:
        plt.close(fig)


def _fmt(v, spec, scale=1.0):
    return "" if v is None else format(v if scale == 1.0 else v / scale, spec)


def summarize(res) -> str:
    """Markdown: one table of every mode, one of each lean mode against the best peer."""
    m = res["machine"]
    load = res.get("load_average") or {}
    lines = [f"device: {m['device']} ({m['cpu']}), torch {m['torch']}, threads {res.get('threads')}, "
             f"{m.get('cpu_count')} cores; load average {_fmt(load.get('start'), '.2f')} at start, "
             f"{_fmt(load.get('end'), '.2f')} at end",
             f"time: {res.get('time_source')}, {res.get('reps')} repetitions per mode", ""]
    for r in res["rows"]:
        lines += [f"**{r['model']} {r['method']}** batch {r['batch_size']}, {r['n_classes']} classes, "
                  f"{r['precision']}, scope {r['scope']}; memory: {r.get('peak_method')}"
                  + (f"; step: {r['step']}" if r.get("step") else ""), "",
                  "| mode | median s/step | min s | max s | time / plain | step MiB | memory / plain | saved MiB | "
                  "warm-up s | graph breaks |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for mode, sec in r["seconds"].items():
            sp = (r.get("spread") or {}).get(mode) or {}
            lines.append(f"| {mode} | {sec:.4f} | {_fmt(sp.get('min'), '.4f')} | {_fmt(sp.get('max'), '.4f')} | "
                         f"{_fmt(r['time_ratio_vs_plain'][mode], '.2f')} | "
                         f"{_fmt(r['peak_step_bytes'].get(mode), '.1f', 2**20)} | "
                         f"{_fmt(r['peak_ratio_vs_plain'].get(mode), '.2f')} | "
                         f"{_fmt(r['saved_bytes'].get(mode), '.1f', 2**20)} | "
                         f"{_fmt((r['warmup_seconds'].get(mode) or [None])[0], '.1f')} | "
                         f"{_fmt(r.get('graph_breaks', {}).get(mode), 'd')} |")
        for mode, why in r["failed"].items():
            lines.append(f"| {mode} | did not run: {why} | | | | | | | | |")
        lines += ["", "| lean mode | fastest peer at <= its memory | lean time / peer | "
                      "least-memory peer at <= its time | lean memory / peer |", "|---|---|---:|---|---:|"]
        for lean, b in r["best_peer"].items():
            lines.append(f"| {lean} | {b['fastest_peer_within_memory'] or 'none'} | "
                         f"{_fmt(b['time_ratio_vs_that_peer'], '.2f')} | "
                         f"{b['least_memory_peer_within_time'] or 'none'} | "
                         f"{_fmt(b['memory_ratio_vs_that_peer'], '.2f')} |")
        lines.append("")
    return "\n".join(lines)
