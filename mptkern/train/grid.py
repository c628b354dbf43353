"""The k-shot target grid: its runs, and the stack that trains all their prompts as one stream.

Every (target, k, seed, method) of the grid is a :class:`Run`. The prompt runs (MPT, prompt tuning)
each own a one-task prompt module; :class:`PromptStack` makes them the slots of one prompt module,
so one ``PromptedLM`` call per step carries every run's micro-batch and computes each run's prompt
once. Runs do not interact: a sequence sees only its own slot's prompt, each run's loss is its own
mean, and the trainer clips and schedules each run's parameters on their own, so a run in the stack
follows the trajectory it would follow alone.
"""

from __future__ import annotations

import dataclasses
import random

import torch
from torch import nn

from mptkern.data import Example, Task

PROMPT_METHODS = ("mpt", "prompt_tuning")
METHODS = (*PROMPT_METHODS, "lora")


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of the grid: ``method`` adapted on ``k`` training examples of ``task`` drawn with ``seed``."""

    task: Task
    k: int
    seed: int
    method: str

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; methods: {', '.join(METHODS)}")
        if not 0 <= self.k <= len(self.task.train):
            raise ValueError(f"{self.task.name}: k={self.k} outside [0, {len(self.task.train)}] training examples")

    @property
    def name(self) -> str:
        return f"target-{self.task.name}-k{self.k}-s{self.seed}-{self.method}"

    def train_examples(self) -> list[Example]:
        """The run's k examples: a function of (seed, task) only, the same for every method."""
        return random.Random(f"{self.seed}-{self.task.name}").sample(self.task.train, self.k)

    def batch(self, step: int, micro: int, batch_size: int) -> list[Example]:
        """The examples of the run's micro-batch ``micro`` of ``step``: drawn with replacement from
        its k examples by a generator seeded with (run, step, micro), whatever else trains with it."""
        train = self.train_examples()
        rng = random.Random(f"{self.name}-{step}-{micro}")
        return [rng.choice(train) for _ in range(min(batch_size, len(train)))]


class PromptStack(nn.Module):
    """One-task prompt modules (``TaskPrompts`` / ``MultitaskPrompt`` with one task each, the same
    prompt length and hidden size) as the tasks of one prompt module: task ``i`` is ``modules[i]``.

    ``forward(task_ids (B,) int) -> (B, l, d)``; ``write_rows`` writes each distinct slot's prompt
    once, through the slot module's own ``write_rows`` (the fused op for ``MultitaskPrompt``).
    """

    def __init__(self, modules, task_names=None):
        super().__init__()
        modules = list(modules)
        if not modules:
            raise ValueError("a PromptStack needs at least one prompt module")
        shapes = {(m.prompt_len, m.hidden_size, m.dtype) for m in modules}
        if len(shapes) != 1 or any(m.num_tasks != 1 for m in modules):
            raise ValueError(f"every slot must be a one-task prompt of the same (length, hidden size, dtype), got {shapes}")
        if task_names is not None and len(task_names) != len(modules):
            raise ValueError(f"{len(task_names)} task names for {len(modules)} slots")
        self.slots = nn.ModuleList(modules)
        self.task_names = None if task_names is None else list(task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.slots)

    @property
    def prompt_len(self) -> int:
        return self.slots[0].prompt_len

    @property
    def hidden_size(self) -> int:
        return self.slots[0].hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.slots[0].dtype

    @property
    def device(self) -> torch.device:
        return self.slots[0].device

    def _check(self, task_ids: torch.Tensor) -> None:
        if task_ids.dim() != 1 or task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
            raise ValueError(f"task_ids must be an integer tensor of shape (B,), got {task_ids.dtype} {tuple(task_ids.shape)}")
        if task_ids.numel() and not bool(((task_ids >= 0) & (task_ids < self.num_tasks)).all()):
            raise ValueError(f"task ids must lie in [0, {self.num_tasks})")

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        self._check(task_ids)
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        prompts = torch.cat([m(zero) for m in self.slots])  # (S, l, d): every slot once
        return prompts[task_ids.to(prompts.device)]

    def write_rows(self, task_ids: torch.Tensor, out: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """Write slot ``task_ids[b]``'s ``l`` rows to ``out[row_offsets[b]:][:l]`` (differentiable)."""
        self._check(task_ids)
        zero = torch.zeros(1, dtype=torch.long, device=out.device)
        for b, slot in enumerate(task_ids.tolist()):
            out = self.slots[slot].write_rows(zero, out, row_offsets[b : b + 1])
        return out


def per_run_mean(token_loss: torch.Tensor, token_run: torch.Tensor, num_runs: int) -> torch.Tensor:
    """``(R,)`` each run's mean over its tokens of ``token_loss (N,)``; ``token_run (N,)`` int gives
    each token's run, -1 for tokens that count for nothing. A run without tokens gets 0."""
    keep = token_run >= 0
    runs, loss = token_run[keep], token_loss[keep]
    total = loss.new_zeros(num_runs).index_add(0, runs, loss)
    count = torch.bincount(runs, minlength=num_runs).to(loss.dtype)
    return total / count.clamp(min=1)
