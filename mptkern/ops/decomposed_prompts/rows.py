"""Where each prompt's rows land, and the batch grouped by task: what every path of the op shares."""

from __future__ import annotations

import torch


def _functional_offsets(ids: torch.Tensor, l: int) -> torch.Tensor:
    """Row offsets of a plain (B, l, d) result viewed as (B*l, d)."""
    return torch.arange(ids.shape[0], device=ids.device) * l


def _prompt_rows(offs: torch.Tensor, l: int) -> torch.Tensor:
    return (offs[:, None] + torch.arange(l, device=offs.device)).flatten()



def _task_segments(task_ids: torch.Tensor, num_tasks: int):
    """Batch indices sorted by task (stable) and the start of each task's run, (K+1,) int64."""
    order = torch.argsort(task_ids, stable=True)
    starts = torch.zeros(num_tasks + 1, dtype=torch.int64, device=task_ids.device)
    torch.cumsum(torch.bincount(task_ids, minlength=num_tasks), 0, out=starts[1:])
    return order, starts

