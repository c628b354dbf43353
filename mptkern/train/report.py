"""Results of the target grid: the printed table (mean ± standard deviation over seeds), the CSV and
JSON files, and the few-shot plot (score against k per method, one panel per target, as in the
paper's few-shot figure), drawn with matplotlib."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

FIELDS = ["task", "method", "k", "seed", "params", "metric", "score"]


def _groups(results: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["k"], r["method"]), []).append(r)
    return groups


def format_results(results: list[dict]) -> str:
    """A table: per target and k, each method's mean score ± its standard deviation over seeds
    (blank with one seed), the number of seeds and the trainable parameters."""
    lines = [f"{'target':<20} {'k':>3} {'method':<14} {'metric':<9} {'score':>15} {'seeds':>5} {'trainable':>10}"]
    for (task, k, method), rs in _groups(results).items():
        vals = [r["score"] for r in rs]
        spread = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        lines.append(f"{task:<20} {k:>3} {method:<14} {rs[0]['metric']:<9} {statistics.mean(vals):>7.3f}{spread:<8} "
                     f"{len(vals):>5} {rs[0]['params']:>10,}")
    return "\n".join(lines)


def write_results(results: list[dict], folder: str | Path) -> list[Path]:
    """``results.json`` and ``results.csv`` (one row per run) in ``folder``; returns their paths."""
    folder = Path(folder)
    paths = [folder / "results.json", folder / "results.csv"]
    paths[0].write_text(json.dumps(results, indent=1))
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in FIELDS} for r in results)
    return paths


def plot_results(results: list[dict], path: str | Path, title: str = "") -> Path:
    """Score against k for each method, one panel per target, mean over seeds with ± one standard
    deviation as error bars, written as a PNG to ``path``."""
    from mptkern._optional import require

    require("matplotlib", purpose="the results plot").use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results)
    tasks = list(dict.fromkeys(r["task"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    cols = min(len(tasks), 3)
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for method in methods:
            ks = sorted({k for (t, k, m) in groups if t == task and m == method})
            means = [statistics.mean(r["score"] for r in groups[task, k, method]) for k in ks]
            errs = [statistics.stdev([r["score"] for r in groups[task, k, method]])
                    if len(groups[task, k, method]) > 1 else 0.0 for k in ks]
            ax.errorbar(ks, means, yerr=errs, marker="o", capsize=3, label=method)
        metric = next(r["metric"] for r in results if r["task"] == task)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("k (training examples)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
