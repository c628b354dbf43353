"""Token lengths of a task's examples against the ``max_length`` budget, and fitting them to it.

Clinical documents, trial sections and dialogues are often longer than a training row. The rule the
collator follows is that the **input is cut, never the answer**: the instruction/input part of a
source is shortened from its end, the answer cue and the target are kept whole. :func:`fit_to_length`
drops the training examples whose answer alone leaves no room for any input (they cannot be trained
on without cutting the answer) and returns :func:`length_report`: per task and split, how long
sources and targets are and how many inputs the budget cuts, which the trainer records when it loads
its data.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from mptkern.data.collator import InputFormat
from mptkern.data.schema import Example, Task

__all__ = ["fit_to_length", "length_report", "format_length_report"]


def _summary(values: Sequence[int]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "p90": 0, "max": 0}
    ordered = sorted(values)
    return {"min": ordered[0], "median": int(statistics.median(ordered)),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1]}


def _measure(fmt: InputFormat, examples: Sequence[Example]) -> list[tuple[int, int]]:
    """``(source tokens untruncated, answer tokens with EOS)`` of each example."""
    return [(len(fmt.source(ex.instruction, ex.input)[0]), len(fmt.target(ex.target))) for ex in examples]


def _split_report(lengths: Sequence[tuple[int, int]], max_length: int, answer_fed: bool) -> dict:
    cut = sum(n_src + (n_tgt if answer_fed else 0) > max_length for n_src, n_tgt in lengths)
    return {"n": len(lengths), "source": _summary([s for s, _ in lengths]), "target": _summary([t for _, t in lengths]),
            "cut": cut}


def length_report(task: Task, fmt: InputFormat, max_length: int) -> dict:
    """Token lengths of ``task``'s examples under ``max_length``.

    Returns:
        ``{split: {"n", "source": {min, median, p90, max}, "target": {...}, "cut"}}`` for ``train``
        and ``eval``: ``source`` is the untruncated formatted source (special prefix, instruction,
        input, answer cue), ``target`` the answer with EOS, and ``cut`` the number of examples whose
        input the budget shortens (train: ``source + target > max_length``; eval: ``source >
        max_length``, since the answer is generated there).
    """
    return {split: _split_report(_measure(fmt, task.examples(split)), max_length, split == "train")
            for split in ("train", "eval")}


def fit_to_length(task: Task, fmt: InputFormat, max_length: int) -> dict:
    """Drop from ``task.train`` the examples whose answer (with EOS) does not fit in ``max_length``
    beside the source overhead and one input token, which the collator needs to keep the answer
    whole; eval examples are kept (their answer is generated, not fed). Each example is tokenized
    once. Returns :func:`length_report` of the fitted task, with ``train["dropped"]``."""
    lengths = _measure(fmt, task.train)
    keep = [i for i, (_, n_tgt) in enumerate(lengths) if n_tgt + fmt.overhead + 1 <= max_length]
    task.train = [task.train[i] for i in keep]
    train = _split_report([lengths[i] for i in keep], max_length, True)
    return {"train": {**train, "dropped": len(lengths) - len(keep)},
            "eval": _split_report(_measure(fmt, task.eval), max_length, False)}


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
