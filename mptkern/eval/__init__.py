"""Evaluation metrics per task type: strict micro F1 (NER, RE), accuracy (QA, NLI), ROUGE-L
(summarization), and :func:`score`, which parses generated texts with the task's output format and
applies the task type's metric.

Example::

    from mptkern.eval import score
    score(task, ["drug: aspirin; dose: 81 mg"], task.eval[:1])["score"]
"""

from mptkern.eval.metrics import (
    accuracy, entity_prf, mean_rouge_l, micro_prf, relation_prf, rouge_l, score,
)

__all__ = ["score", "micro_prf", "entity_prf", "relation_prf", "accuracy", "rouge_l", "mean_rouge_l"]
