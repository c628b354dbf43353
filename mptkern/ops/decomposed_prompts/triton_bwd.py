"""Triton backward: each program owns a tile of the (l, d) plane and reduces its tasks' gradients in a
fixed order (batch items sorted by task on the device), so there are no float atomics and two runs
give bit-identical gradients."""

from __future__ import annotations

import torch

from mptkern.ops._common import tl, triton
from mptkern.ops.decomposed_prompts.rows import _functional_offsets, _task_segments

# (BLOCK_L, BLOCK_D, num_warps). Fixed until tuned on a GPU; the AOT check compiles exactly these.
BWD_CONFIG = (8, 128, 4)

if triton is not None:

    @triton.jit
    def _bwd_kernel(
        G, S, C, R, OFFS, ORDER, STARTS, DS, DCW, DRW, L, D, RANK, K,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pi = tl.program_id(0)
        pj = tl.program_id(1)
        n_i = tl.num_programs(0)
        n_j = tl.num_programs(1)
        i = pi * BLOCK_L + tl.arange(0, BLOCK_L)
        j = pj * BLOCK_D + tl.arange(0, BLOCK_D)
        mi = i < L
        mj = j < D
        m = mi[:, None] & mj[None, :]
        s = tl.load(S + i[:, None] * D + j[None, :], mask=m, other=0.0).to(tl.float32)
        ds = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for t in range(K):
            start = tl.load(STARTS + t)
            end = tl.load(STARTS + t + 1)
            if end > start:  # absent tasks keep the zeros their workspace was born with
                # H_t: the task's gradient summed over its batch items, in batch order
                h = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
                for q in range(start, end):
                    row0 = tl.load(OFFS + tl.load(ORDER + q)).to(tl.int64)
                    h += tl.load(G + (row0 + i)[:, None] * D + j[None, :], mask=m, other=0.0).to(tl.float32)
                w = h * s
                mt = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
                for k in range(RANK):
                    c = tl.load(C + (t * L + i) * RANK + k, mask=mi, other=0.0).to(tl.float32)
                    r = tl.load(R + (t * RANK + k) * D + j, mask=mj, other=0.0).to(tl.float32)
                    mt += c[:, None] * r[None, :]
                    # partial dC over this tile's columns and partial dR over its rows; the host
                    # sums the tile axis in a fixed order
                    tl.store(DCW + ((t * L + i) * RANK + k) * n_j + pj, tl.sum(w * r[None, :], axis=1), mask=mi)
                    tl.store(DRW + ((t * n_i + pi) * RANK + k) * D + j, tl.sum(w * c[:, None], axis=0), mask=mj)
                ds += h * mt
        tl.store(DS + i[:, None] * D + j[None, :], ds.to(DS.dtype.element_ty), mask=m)




def _bwd_triton(grad2d, shared, cols, rows, ids, offs):
    (K, l, r), d = cols.shape, shared.shape[1]
    bl, bd, warps = BWD_CONFIG
    n_i, n_j = triton.cdiv(l, bl), triton.cdiv(d, bd)
    order, starts = _task_segments(ids, K)
    offs = _functional_offsets(ids, l) if offs is None else offs
    dS = torch.empty_like(shared)
    dcw = torch.zeros(K, l, r, n_j, dtype=torch.float32, device=shared.device)
    drw = torch.zeros(K, n_i, r, d, dtype=torch.float32, device=shared.device)
    _bwd_kernel[(n_i, n_j)](
        grad2d, shared, cols, rows, offs, order, starts, dS, dcw, drw, l, d, r, K,
        BLOCK_L=bl, BLOCK_D=bd, num_warps=warps,
    )
    return dS, dcw.sum(-1).to(cols.dtype), drw.sum(1).to(rows.dtype)

