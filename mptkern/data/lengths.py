"""Token lengths of a task's examples against the ``max_length`` budget, and fitting them to it.

Clinical documents, trial sections and dialogues are often longer than a training row. The rule the
collator follows is that the **input is cut, never the answer**: the instruction/input part of a
source is shortened from its end, the answer cue and the target are kept whole. :func:`fit_to_length`
drops the training examples whose answer alone leaves no room for any input (they cannot be trained
on without cutting the answer); :func:`length_report` says, per task and split, how long sources and
targets are and how many inputs the budget cuts, which the trainer logs when it loads its data.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from mptkern.data.collator import InputFormat
from mptkern.data.schema import Example, Task

__all__ = ["answer_fits", "fit_to_length", "length_report", "format_length_report"]


def _summary(values: Sequence[int]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "p90": 0, "max": 0}
    ordered = sorted(values)
    return {"min": ordered[0], "median": int(statistics.median(ordered)),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1]}


def answer_fits(fmt: InputFormat, ex: Example, max_length: int) -> bool:
    """Whether ``ex``'s target (with EOS) fits in ``max_length`` beside the source overhead and one
    input token: what the collator needs to keep the answer whole."""
    return len(fmt.target(ex.target)) + fmt.overhead + 1 <= max_length


def fit_to_length(task: Task, fmt: InputFormat, max_length: int) -> int:
    """Drop from ``task.train`` the examples whose answer does not fit (see :func:`answer_fits`);
    returns how many were dropped. Eval examples are kept: their answer is generated, not fed."""
    kept = [ex for ex in task.train if answer_fits(fmt, ex, max_length)]
    dropped = len(task.train) - len(kept)
    task.train = kept
    return dropped


def length_report(task: Task, fmt: InputFormat, max_length: int) -> dict:
    """Token lengths of ``task``'s examples under ``max_length``.

    Returns:
        ``{split: {"n", "source": {min, median, p90, max}, "target": {...}, "cut"}}`` for ``train``
        and ``eval``: ``source`` is the untruncated formatted source (special prefix, instruction,
        input, answer cue), ``target`` the answer with EOS, and ``cut`` the number of examples whose
        input the budget shortens (train: ``source + target > max_length``; eval: ``source >
        max_length``, since the answer is generated there).
    """
    out = {}
    for split in ("train", "eval"):
        sources, targets, cut = [], [], 0
        for ex in task.examples(split):
            n_src = len(fmt.source(ex.instruction, ex.input)[0])
            n_tgt = len(fmt.target(ex.target))
            sources.append(n_src)
            targets.append(n_tgt)
            cut += n_src + (n_tgt if split == "train" else 0) > max_length
        out[split] = {"n": len(sources), "source": _summary(sources), "target": _summary(targets), "cut": cut}
    return out


def format_length_report(reports: dict[str, dict], max_length: int) -> str:
    """One line per task and split: ``task split n=.. source med/p90/max target med/p90/max cut=..``."""
    lines = [f"token lengths (max_length={max_length}; inputs longer than the budget are cut, answers never):"]
    for name, rep in reports.items():
        for split, r in rep.items():
            if not r["n"]:
                continue
            s, t = r["source"], r["target"]
            lines.append(f"  {name:<24} {split:<5} n={r['n']:<5} source {s['median']}/{s['p90']}/{s['max']}  "
                         f"target {t['median']}/{t['p90']}/{t['max']}  (median/p90/max)  cut={r['cut']}")
    return "\n".join(lines)
