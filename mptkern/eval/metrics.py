"""Metrics per task type, on structures parsed from generated text.

=================  ===========================================================================
task type          metric
=================  ===========================================================================
ner                strict micro F1: an entity counts when its whitespace-collapsed span text and
                   its type both equal a gold entity's; multiset semantics (a gold entity that
                   occurs twice must be predicted twice; a repeated prediction beyond the gold
                   count is a false positive)
re                 strict micro F1 over ``(head, type, tail)``, the same way
qa, nli            accuracy (an unparseable answer is wrong)
summarization      ROUGE-L F1 averaged over examples, by Google's ``rouge-score`` (longest common
                   subsequence of lower-cased alphanumeric tokens, no stemming)
=================  ===========================================================================

Micro F1 is ``2 tp / (2 tp + fp + fn)`` summed over all examples; precision ``tp / (tp + fp)`` and
recall ``tp / (tp + fn)`` are 0 when their denominator is 0, except that with no gold and no
prediction at all (nothing to find, nothing wrong) all three are 1.0.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

from mptkern.data.schema import Entity, Example, Relation, Task, gold_output, parse_output

__all__ = ["micro_prf", "entity_prf", "relation_prf", "accuracy", "rouge_l", "mean_rouge_l", "score"]


def micro_prf(predicted: Iterable[Iterable[Hashable]], gold: Iterable[Iterable[Hashable]]) -> dict:
    """Micro precision / recall / F1 over per-example multisets of hashable items.

    Returns:
        ``{"precision", "recall", "f1", "tp", "fp", "fn"}``.
    """
    tp = fp = fn = 0
    for p_items, g_items in zip(predicted, gold, strict=True):
        p, g = Counter(p_items), Counter(g_items)
        hit = sum((p & g).values())
        tp += hit
        fp += sum(p.values()) - hit
        fn += sum(g.values()) - hit
    if tp == fp == fn == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0}
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": 2 * tp / (2 * tp + fp + fn), "tp": tp, "fp": fp, "fn": fn}


def entity_prf(predicted: Sequence[Sequence[Entity]], gold: Sequence[Sequence[Entity]]) -> dict:
    """Strict micro P/R/F1 of entity lists per example, matched on ``Entity.key()`` = (text, type)."""
    return micro_prf(([e.key() for e in p] for p in predicted), ([e.key() for e in g] for g in gold))


def relation_prf(predicted: Sequence[Sequence[Relation]], gold: Sequence[Sequence[Relation]]) -> dict:
    """Strict micro P/R/F1 of relation lists per example, matched on ``Relation.key()`` = (head, type, tail)."""
    return micro_prf(([r.key() for r in p] for p in predicted), ([r.key() for r in g] for g in gold))


def accuracy(predicted: Sequence, gold: Sequence) -> dict:
    """Fraction of ``predicted[i] == gold[i]`` (None never equals a gold label).

    Returns:
        ``{"accuracy", "correct", "n"}`` (accuracy 0.0 for no examples).
    """
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold answers")
    correct = sum(p is not None and p == g for p, g in zip(predicted, gold))
    return {"accuracy": correct / len(gold) if gold else 0.0, "correct": correct, "n": len(gold)}


@functools.cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer  # imports nltk: loaded on first use only

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> dict:
    """ROUGE-L of two texts by ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])``: ``P = lcs /
    len(prediction)``, ``R = lcs / len(reference)``, ``F = 2PR / (P + R)`` over lower-cased
    alphanumeric tokens; all 0 when either text has no token.

    Returns:
        ``{"precision", "recall", "f1"}``.
    """
    res = _rouge_l_scorer().score(reference, prediction)["rougeL"]  # rouge-score takes (target, prediction)
    return {"precision": float(res.precision), "recall": float(res.recall), "f1": float(res.fmeasure)}


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean per-example ROUGE-L precision, recall and F1.

    Returns:
        ``{"precision", "recall", "f1", "n"}`` (zeros for no examples).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = [rouge_l(p, r) for p, r in zip(predictions, references)]
    n = len(scores)
    mean = lambda k: sum(s[k] for s in scores) / n if n else 0.0  # noqa: E731
    return {"precision": mean("precision"), "recall": mean("recall"), "f1": mean("f1"), "n": n}


def score(task: Task, predictions: Sequence[str], examples: Sequence[Example]) -> dict:
    """Score generated texts against the examples' gold with the metric of ``task.type``.

    Args:
        task: the task (its output format decides how texts are parsed).
        predictions: one generated text per example (EOS and padding already stripped).
        examples: the gold examples, in the same order.

    Returns:
        ``{"task", "type", "metric", "score", "n", ...}``: ``metric`` is ``"micro_f1"`` (ner, re; plus
        precision, recall, tp, fp, fn), ``"accuracy"`` (qa, nli; plus ``correct`` and ``unparsed``, the
        count of texts that held no answer) or ``"rouge_l"`` (summarization; mean F1, plus mean
        precision and recall). ``score`` is in [0, 1].
    """
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    for ex in examples:
        if ex.task != task.name:
            raise ValueError(f"example of task {ex.task!r} scored as task {task.name!r}")
    parsed = [parse_output(task, p) for p in predictions]
    gold = [gold_output(task, ex) for ex in examples]
    out = {"task": task.name, "type": task.type, "n": len(examples)}
    if task.type == "ner":
        res = entity_prf(parsed, gold)
        out.update(metric="micro_f1", score=res["f1"], **res)
    elif task.type == "re":
        res = relation_prf(parsed, gold)
        out.update(metric="micro_f1", score=res["f1"], **res)
    elif task.type in ("qa", "nli"):
        res = accuracy(parsed, gold)
        out.update(metric="accuracy", score=res["accuracy"], correct=res["correct"],
                   unparsed=sum(p is None for p in parsed))
    else:
        res = mean_rouge_l(parsed, gold)
        out.update(metric="rouge_l", score=res["f1"], precision=res["precision"], recall=res["recall"])
    return out
