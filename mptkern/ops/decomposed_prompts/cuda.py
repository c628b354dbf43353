"""The cuda path: the same scheme as the Triton kernels in CUDA C++ (csrc/), through
``torch.ops.mptkern_C`` (the optional extension, :mod:`mptkern._ext`)."""

from __future__ import annotations

import torch

from mptkern.ops.decomposed_prompts.rows import _functional_offsets, _task_segments


def _fwd_cuda(shared, cols, rows, ids, out2d, offs):
    torch.ops.mptkern_C.decomposed_prompts_fwd(shared, cols, rows, ids, offs, out2d)


def _bwd_cuda(grad2d, shared, cols, rows, ids, offs):
    order, starts = _task_segments(ids, cols.shape[0])
    offs = _functional_offsets(ids, shared.shape[0]) if offs is None else offs
    return tuple(torch.ops.mptkern_C.decomposed_prompts_bwd(grad2d, shared, cols, rows, offs, order, starts))

