"""Triton forward: one program per (batch item, tile of the (l, d) plane) writes
``shared * (task_cols[t] @ task_rows[t])`` at the item's row offset."""

from __future__ import annotations

import torch

from mptkern.ops._common import tl, triton

# (BLOCK_L, BLOCK_D, num_warps). Fixed until tuned on a GPU; the AOT check compiles exactly these.
FWD_CONFIG = (8, 256, 8)

if triton is not None:

    @triton.jit
    def _fwd_kernel(S, C, R, IDS, OFFS, OUT, L, D, RANK, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        j = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mi = i < L
        mj = j < D
        m = mi[:, None] & mj[None, :]
        t = tl.load(IDS + b).to(tl.int64)
        row0 = tl.load(OFFS + b).to(tl.int64)  # rows of a large packed buffer: keep 64-bit
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for k in range(RANK):
            c = tl.load(C + (t * L + i) * RANK + k, mask=mi, other=0.0).to(tl.float32)
            r = tl.load(R + (t * RANK + k) * D + j, mask=mj, other=0.0).to(tl.float32)
            acc += c[:, None] * r[None, :]
        s = tl.load(S + i[:, None] * D + j[None, :], mask=m, other=0.0).to(tl.float32)
        out = OUT + (row0 + i)[:, None] * D + j[None, :]
        tl.store(out, (s * acc).to(OUT.dtype.element_ty), mask=m)


def _fwd_triton(shared, cols, rows, ids, out2d, offs):
    (K, l, r), d, B = cols.shape, shared.shape[1], ids.shape[0]
    bl, bd, warps = FWD_CONFIG
    grid = (B, triton.cdiv(l, bl), triton.cdiv(d, bd))
    _fwd_kernel[grid](shared, cols, rows, ids, offs, out2d, l, d, r, BLOCK_L=bl, BLOCK_D=bd, num_warps=warps)

