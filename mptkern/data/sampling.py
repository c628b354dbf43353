"""Batch samplers over several tasks, deterministic by seed.

Both samplers index the concatenation of the tasks' examples in task order (:func:`flatten`) and
yield ``list[int]`` batches of indices into it, so they work as a ``torch.utils.data.DataLoader``
``batch_sampler`` over that list with a :class:`~mptkern.data.Collator` as ``collate_fn``.

* :class:`MixedTaskSampler`: every epoch is a fresh permutation of all examples cut into batches, so
  batches mix tasks in proportion to their sizes (teacher training, target adaptation).
* :class:`TaskSubsetSampler`: MPT's stochastic task sampling (distillation): for each batch draw
  ``k`` uniformly from ``[min_tasks, max_tasks]`` (default ``[2, K]``), pick ``k`` distinct tasks
  (weighted by size, or uniformly), and fill the batch with ``batch_size // k`` examples of each
  (the remainder going to randomly chosen ones among them). Each task's examples are consumed in a
  shuffled order and reshuffled when exhausted.

An epoch's batches are a deterministic function of ``(sizes, batch_size, seed, epoch)`` (string-seeded
``random.Random``): the same seed and epoch give the same batches, so a resumed run regenerates the
epoch and skips the batches it already did.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence

from mptkern.data.schema import Example, Task

__all__ = ["flatten", "task_sizes", "MixedTaskSampler", "TaskSubsetSampler"]


def task_sizes(tasks: Sequence[Task], split: str = "train") -> dict[str, int]:
    """``{task name: number of examples in split}`` in task order."""
    return {t.name: len(t.examples(split)) for t in tasks}


def flatten(tasks: Sequence[Task], split: str = "train") -> list[Example]:
    """The examples of ``split`` of all tasks, concatenated in task order (what sampler indices index)."""
    return [ex for t in tasks for ex in t.examples(split)]


def _offsets(sizes: Mapping[str, int]) -> tuple[list[str], list[int], list[int]]:
    names, counts = list(sizes), [int(sizes[n]) for n in sizes]
    if any(c < 0 for c in counts):
        raise ValueError(f"task sizes must be >= 0: {dict(sizes)}")
    if sum(counts) == 0:
        raise ValueError("no examples to sample from")
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    return names, counts, starts


class MixedTaskSampler:
    """Shuffled batches over all tasks' examples together.

    Args:
        sizes: ``{task name: number of examples}`` in the order of :func:`flatten` (see :func:`task_sizes`).
        batch_size: examples per batch.
        seed: base seed; epoch ``e`` uses the permutation drawn from ``(seed, e)``.
        drop_last: drop the last, smaller batch of an epoch.

    Iterating yields one epoch of ``list[int]`` batches; call :meth:`set_epoch` between epochs.
    """

    def __init__(self, sizes: Mapping[str, int], batch_size: int, *, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.names, self.counts, self.starts = _offsets(sizes)
        self.total = sum(self.counts)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.batch_size if self.drop_last else math.ceil(self.total / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.total))
        random.Random(f"mixed/{self.seed}/{self.epoch}").shuffle(order)
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


class TaskSubsetSampler:
    """Batches from a random subset of tasks (MPT's stochastic task sampling).

    Args:
        sizes: ``{task name: number of examples}`` in the order of :func:`flatten`; tasks with no
            examples are never drawn.
        batch_size: examples per batch (every batch has exactly this many).
        seed: base seed.
        min_tasks, max_tasks: bounds of the number of tasks per batch, drawn uniformly from
            ``[min_tasks, max_tasks]``; ``max_tasks`` defaults to all non-empty tasks ``K``. Both are
            clipped to ``[1, min(K, batch_size)]``.
        num_batches: batches per epoch (default: ``ceil(total examples / batch_size)``).
        mixing: ``"proportional"`` (tasks drawn with probability proportional to their size, without
            replacement within a batch) or ``"uniform"``.

    Iterating yields one epoch of ``list[int]`` batches; call :meth:`set_epoch` between epochs.
    """

    def __init__(self, sizes: Mapping[str, int], batch_size: int, *, seed: int = 0, min_tasks: int = 2,
                 max_tasks: int | None = None, num_batches: int | None = None, mixing: str = "proportional"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mixing not in ("proportional", "uniform"):
            raise ValueError(f"mixing must be 'proportional' or 'uniform', got {mixing!r}")
        self.names, self.counts, self.starts = _offsets(sizes)
        self.active = [i for i, c in enumerate(self.counts) if c > 0]
        K = len(self.active)
        cap = min(K, batch_size)
        self.max_tasks = max(1, min(cap, max_tasks if max_tasks is not None else K))
        self.min_tasks = max(1, min(self.max_tasks, min_tasks))
        self.batch_size, self.seed, self.mixing = batch_size, seed, mixing
        self.num_batches = num_batches if num_batches is not None else math.ceil(sum(self.counts) / batch_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _pick_tasks(self, rng: random.Random, k: int) -> list[int]:
        if self.mixing == "uniform":
            return rng.sample(self.active, k)
        # weighted sampling without replacement (Efraimidis-Spirakis keys u^(1/w))
        keyed = sorted(self.active, key=lambda i: rng.random() ** (1.0 / self.counts[i]), reverse=True)
        return keyed[:k]

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"subset/{self.seed}/{self.epoch}")
        streams: dict[int, list[int]] = {}

        def take(task: int, n: int) -> list[int]:
            out = []
            while len(out) < n:
                if not streams.get(task):
                    perm = list(range(self.counts[task]))
                    rng.shuffle(perm)
                    streams[task] = perm
                out.append(self.starts[task] + streams[task].pop())
            return out

        for _ in range(self.num_batches):
            k = rng.randint(self.min_tasks, self.max_tasks)
            chosen = self._pick_tasks(rng, k)
            share = [self.batch_size // k] * k
            for j in rng.sample(range(k), self.batch_size % k):
                share[j] += 1
            batch = []
            for task, n in zip(chosen, share):
                batch += take(task, n)
            yield batch
