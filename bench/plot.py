"""Bar chart of one benchmark run from any bench/results CSV (columns op, contender, mode, ms, ...).

    python bench/plot.py bench/results/prompt_embed.csv [--metric ms|gbs|speedup_vs_peft] [--date DATE]

Draws the latest run (rows sharing the last ``date``) unless ``--date`` picks another, one group of
bars per mode, one bar per contender, into ``<csv stem>_<metric>.png`` next to the CSV.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from mptkern._optional import MissingDependency, require


def plot(csv_path, metric="ms", date=None) -> Path:
    """Write the PNG for ``metric`` of the run at ``date`` (default: the latest); returns its path."""
    require("matplotlib", purpose="bench/plot.py").use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    date = date or rows[-1]["date"]
    rows = [r for r in rows if r["date"] == date and r.get(metric, "") != ""]
    if not rows:
        raise SystemExit(f"no rows with a {metric!r} value at date {date} in {csv_path}")
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    value = {(r["mode"], r["contender"]): float(r[metric]) for r in rows}
    width = 0.8 / len(contenders)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(modes) * len(contenders)), 4))
    for k, c in enumerate(contenders):
        xs = [i + (k - (len(contenders) - 1) / 2) * width for i, m in enumerate(modes) if (m, c) in value]
        ys = [value[m, c] for m in modes if (m, c) in value]
        bars = ax.bar(xs, ys, width, label=c)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel(metric)
    shape = " ".join(f"{k}={rows[0][k]}" for k in ("B", "l", "d", "K", "r", "dtype") if k in rows[0])
    ax.set_title(f"{rows[0]['op']} {shape}\n{rows[0]['device']}  {rows[0]['commit']}  {date}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = csv_path.with_name(f"{csv_path.stem}_{metric}.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_ratios(rows, out, title="") -> Path:
    """Horizontal bars of ``ratio`` (a contender's speed over its anchor's) per summary row (dicts
    with bench, figure, contender, anchor, ratio, as bench/gpu_check.py writes summary.csv), a line
    at 1; written to ``out``."""
    require("matplotlib", purpose="bench/plot.py").use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['bench']} {r['figure']}\n{r['contender']} vs {r['anchor']}" for r in rows]
    ratios = [float(r["ratio"]) for r in rows]
    fig, ax = plt.subplots(figsize=(11, max(2.5, 0.42 * len(rows) + 1)))
    # each bar spans from 1 (the anchor) to the ratio: right of the line faster, left slower
    bars = ax.barh(range(len(rows)), [x - 1 for x in ratios], left=1.0,
                   color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
    ax.bar_label(bars, labels=[f"{x:.3g}x" for x in ratios], fontsize=6)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed ratio to the anchor (log scale)")
    ax.set_title(title + (f"\n{rows[0].get('device', '')}  {rows[0].get('commit', '')}" if rows else ""), fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--metric", default="ms")
    p.add_argument("--date", default=None)
    a = p.parse_args()
    try:
        print(plot(a.csv, a.metric, a.date))
    except MissingDependency as exc:
        raise SystemExit(str(exc)) from None
