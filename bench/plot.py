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
