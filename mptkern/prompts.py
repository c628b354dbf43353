"""Prompt modules.

``MultitaskPrompt`` is the decomposed student prompt of MPT: a shared prompt ``P* (l, d)`` and per
task a rank-r pair ``U_t (l, r)``, ``V_t (r, d)``; task t's prompt is ``P* * (U_t @ V_t)``. Parameter
names and layout follow PEFT's MultitaskPromptTuning (``prompt_embeddings``, ``prefix_task_cols``,
``prefix_task_rows``) so checkpoints interoperate.
"""

from __future__ import annotations

import torch
from torch import nn

from mptkern.ops import decomposed_prompts


class MultitaskPrompt(nn.Module):
    """Shared prompt scaled per task by a rank-r matrix.

    Args:
        num_tasks: K. prompt_len: l. hidden_size: d. rank: r (1 in the papers).
        backend: passed to :func:`mptkern.ops.decomposed_prompts`.

    ``forward(task_ids (B,) int) -> (B, l, d)`` in the parameters' dtype.
    """

    def __init__(self, num_tasks: int, prompt_len: int, hidden_size: int, rank: int = 1, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.prompt_embeddings = nn.Parameter(torch.randn(prompt_len, hidden_size) * 0.02)
        # U V starts at the all-ones matrix plus noise, so each task's prompt starts near P*
        self.prefix_task_cols = nn.Parameter(1 + 0.02 * torch.randn(num_tasks, prompt_len, rank))
        self.prefix_task_rows = nn.Parameter(1 / rank + 0.02 * torch.randn(num_tasks, rank, hidden_size))

    @property
    def num_tasks(self) -> int:
        return self.prefix_task_cols.shape[0]

    @torch.no_grad()
    def init_from_text(self, embeddings: nn.Embedding, token_ids: list[int]) -> None:
        """Set ``P*`` to the embeddings of ``token_ids``, repeated to the prompt length."""
        if not token_ids:
            raise ValueError("init_from_text needs at least one token id")
        l = self.prompt_embeddings.shape[0]
        ids = torch.tensor((token_ids * (l // len(token_ids) + 1))[:l], device=embeddings.weight.device)
        self.prompt_embeddings.copy_(embeddings(ids).to(self.prompt_embeddings))

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        return decomposed_prompts(
            self.prompt_embeddings, self.prefix_task_cols, self.prefix_task_rows, task_ids, backend=self.backend
        )
