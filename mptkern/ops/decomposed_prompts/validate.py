"""Checks of :func:`decomposed_prompts`'s arguments: shapes, dtypes and devices at the entry point;
the value ranges (one host read) inside the ops, so that ``torch.compile`` traces the entry point."""

from __future__ import annotations

import torch

from mptkern.ops._common import GPU_DTYPES


def _validate(shared, task_cols, task_rows, task_ids, out, row_offsets, backend):
    if shared.dim() != 2:
        raise ValueError(f"shared must have shape (l, d), got {tuple(shared.shape)}")
    l, d = shared.shape
    if task_cols.dim() != 3 or task_cols.shape[1] != l:
        raise ValueError(f"task_cols must have shape (K, l={l}, r), got {tuple(task_cols.shape)}")
    K, _, r = task_cols.shape
    if task_rows.shape != (K, r, d):
        raise ValueError(f"task_rows must have shape (K={K}, r={r}, d={d}), got {tuple(task_rows.shape)}")
    if K == 0 or r == 0 or l == 0 or d == 0:
        raise ValueError(f"shared (l, d) = {(l, d)} and task_cols (K, l, r) = {(K, l, r)} must all be nonzero")
    if task_ids.dim() != 1 or task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must be an integer tensor of shape (B,), got {task_ids.dtype} of shape {tuple(task_ids.shape)}")
    if task_ids.shape[0] == 0:
        raise ValueError("task_ids is empty: expected shape (B,) with B >= 1")
    for name, t in (("task_cols", task_cols), ("task_rows", task_rows)):
        if t.dtype != shared.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but shared has {shared.dtype}; all parameters must share one dtype")
    named = [("task_cols", task_cols), ("task_rows", task_rows), ("task_ids", task_ids)]
    if out is not None:
        if row_offsets is None:
            raise ValueError("out is given without row_offsets: pass row_offsets of shape (B,)")
        named += [("out", out), ("row_offsets", row_offsets)]
    for name, t in named:
        if t.device != shared.device:
            raise ValueError(f"{name} is on {t.device} but shared is on {shared.device}")
    if backend != "torch" and shared.dtype not in GPU_DTYPES:
        raise ValueError(f"shared has dtype {shared.dtype}; the {backend} backend supports {GPU_DTYPES}")
    if not shared.dtype.is_floating_point:
        raise ValueError(f"shared must be floating point, got {shared.dtype}")
    if out is None:
        if row_offsets is not None:
            raise ValueError("row_offsets is given without out: pass the (R, d) buffer to write into")
        return
    if out.dim() != 2 or out.shape[1] != d or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape (R, d={d}), got {tuple(out.shape)} (contiguous={out.is_contiguous()})")
    if out.dtype != shared.dtype:
        raise ValueError(f"out has dtype {out.dtype} but shared has {shared.dtype}")
    if row_offsets.shape != task_ids.shape or row_offsets.dtype.is_floating_point or row_offsets.dtype == torch.bool:
        raise ValueError(f"row_offsets must be an integer tensor of shape (B={task_ids.shape[0]},), got {row_offsets.dtype} of shape {tuple(row_offsets.shape)}")



def _check_values(ids: torch.Tensor, num_tasks: int, offs=None, l=0, total_rows=0) -> None:
    """Range checks that need the values (one host sync); run inside the ops so compile traces them."""
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_tasks:
        raise ValueError(f"task_ids must lie in [0, {num_tasks}) (K = task_cols.shape[0]), got values in [{lo}, {hi}]")
    if offs is not None:
        lo, hi = (int(x) for x in torch.aminmax(offs))
        if lo < 0 or hi + l > total_rows:
            raise ValueError(
                f"row_offsets must lie in [0, {total_rows - l}] so that l={l} rows fit in out of shape "
                f"({total_rows}, d), got values in [{lo}, {hi}]"
            )
