"""Evaluation of trained runs by the project's one generation path, :class:`MultiTaskEngine`.

Each run is a task of one engine (its prompt, or no prompt for a model evaluated as it is, e.g. with
a LoRA adapter). Every eval input is formatted by :class:`mptkern.data.InputFormat`, the function the
training collator uses, so a run is evaluated on exactly the source it was trained to continue. All requests of all runs go into one ``generate`` call:
prompts' K/V are computed once per run, and requests of every run share the engine's batches.
Under torchrun each rank generates its share of the requests and the texts are gathered.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm import tqdm

from mptkern.data import InputFormat, Task
from mptkern.eval import score
from mptkern.serve.engine import MultiTaskEngine, Request

MAX_RUNNING = 64  # default requests decoding at once (TrainConfig.eval_max_running); bounds the engine's K/V slabs


@dataclasses.dataclass
class EvalRun:
    """One thing to score: ``prompt`` (a one-task module, ``(module, index)``, or None) on ``task.eval``."""

    name: str
    task: Task
    prompt: nn.Module | tuple[nn.Module, int] | None


def generation_budget(fmt: InputFormat, task: Task, max_new_tokens: int) -> int:
    """Tokens to generate for ``task``: its longest training target (EOS included) plus 4, at most
    ``max_new_tokens`` (all of it when the task has no training examples). A yes/no task stops
    after a few tokens instead of running on to ``max_new_tokens`` when a prompt does not end its
    answer with EOS; gold eval targets are not looked at."""
    if not task.train:
        return max_new_tokens
    return min(max_new_tokens, max(len(fmt.target(ex.target)) for ex in task.train) + 4)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_runs(model: nn.Module, tokenizer, runs: list[EvalRun], *, max_new_tokens: int,
                  max_length: int = 256, max_running: int = MAX_RUNNING, progress: bool = True) -> dict[str, dict]:
    """Greedy generation for every eval example of every run, parsed and scored with the task's
    metric. Returns ``{run name: score dict}``: :func:`mptkern.eval.score`'s fields (``metric``,
    ``score``, ``n``, ...) and ``texts``, the generated texts in ``task.eval`` order.

    Args:
        model: the frozen ``*ForCausalLM`` (for LoRA, the adapted model).
        runs: the runs; names must be unique.
        max_new_tokens: longest continuation (per task: :func:`generation_budget`); generation
            stops at EOS first.
        max_length: longest formatted input in tokens (the instruction/input part is cut to fit, as
            the training collator cuts it).
        max_running: requests the engine decodes at once (its batch; it bounds the K/V memory).
        progress: show a bar over the requests (rank 0 only).
    """
    if max_running < 1:
        raise ValueError(f"max_running must be >= 1, got {max_running}")
    if not runs:
        return {}
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("evaluation run names must be unique")
    if any(not r.task.eval for r in runs):
        raise ValueError(f"runs without eval examples: {[r.name for r in runs if not r.task.eval]}")
    fmt = InputFormat(tokenizer)
    budget = {r.task.name: generation_budget(fmt, r.task, max_new_tokens) for r in runs}
    items = [(r, ex, fmt.source(ex.instruction, ex.input, max_length)[0]) for r in runs for ex in r.task.eval]
    rank, world = _world()
    mine = items[rank::world]
    longest = max((len(ids) for _, _, ids in items), default=1)
    engine = MultiTaskEngine(model, tokenizer, {r.name: r.prompt for r in runs},
                             max_running=max(1, min(max_running, len(mine))),
                             max_batch_tokens=max(512, longest, min(max_running, len(mine))),
                             max_seq_len=longest + max(budget.values()))
    with tqdm(total=len(mine), desc="evaluation", unit="req", disable=rank != 0 or not progress) as bar:
        results = engine.generate([Request(task=r.name, input_ids=ids, max_new_tokens=budget[r.task.name])
                                   for r, _, ids in mine], on_result=lambda i, res: bar.update(1)) if mine else []
    texts = [res.text for res in results]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, texts)
        texts = [None] * len(items)
        for k, part in enumerate(gathered):
            texts[k::world] = part
    by_run: dict[str, list[str]] = {}
    for (r, _, _), text in zip(items, texts):
        by_run.setdefault(r.name, []).append(text)
    return {r.name: {**score(r.task, by_run[r.name], r.task.eval), "texts": by_run[r.name]} for r in runs}
