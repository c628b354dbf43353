"""What the prefix-attention kernels share: the shipped launch configurations, the Triton tile
helpers (products, tile ranges, a sequence's layout, the causal/window mask) and the launchers'
host-side helpers (precision, strides, 32-bit offset limits, dummy prefix arguments)."""

from __future__ import annotations

import torch

from mptkern import backends
from mptkern.ops._common import GPU_DTYPES, dot_precision, tl, triton

HEAD_DIMS = (16, 32, 64, 128)

# Shipped launch configurations, per kernel, head dim and dtype class ("16": bf16/fp16, "32": fp32).
# (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages). The AOT check compiles exactly
# these; head dims below 64 (tests) use the 64 row. Chosen only so that every one compiles without
# spills for both sm_80 and sm_90 under Triton 3.6 and 3.9 (the largest tiles that did, from a small
# sweep: 3.6 and 3.9 spill different d64 dK/dV tiles); NOT yet tuned on a GPU. fp32 (testing only)
# gets small tiles: its exact products run on FMA units.
CONFIGS = {
    ("fwd", 64, "16"): (128, 64, 8, 3),
    ("fwd", 128, "16"): (128, 32, 8, 3),
    ("fwd", 64, "32"): (16, 32, 4, 1),
    ("fwd", 128, "32"): (16, 16, 4, 1),
    ("dq", 64, "16"): (64, 32, 4, 2),
    ("dq", 128, "16"): (64, 64, 8, 2),
    ("dq", 64, "32"): (16, 16, 4, 1),
    ("dq", 128, "32"): (16, 16, 4, 1),
    ("dkdv", 64, "16"): (64, 32, 8, 1),
    ("dkdv", 128, "16"): (32, 64, 8, 1),
    ("dkdv", 64, "32"): (16, 16, 2, 1),
    ("dkdv", 128, "32"): (16, 16, 4, 1),
    # decode: (BLOCK_H query heads of one KV group, BLOCK_N keys, warps, stages)
    ("decode", 64, "16"): (16, 64, 4, 2),
    ("decode", 128, "16"): (16, 64, 4, 2),
    ("decode", 64, "32"): (16, 32, 4, 1),
    ("decode", 128, "32"): (16, 16, 4, 1),
}
DELTA_BLOCK = 64  # rows of (N*Hq, D) per program of the backward's preprocessing
# The interpreter runs every tile in numpy: small tiles there make odd test shapes cross many tile
# edges (the masked/unmasked split and the skipping). Tests set it to None to run the shipped
# CONFIGS in the interpreter, as on a GPU.
INTERPRET_BLOCK = 16


if triton is not None:

    @triton.jit
    def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b in fp32. UPCAST (interpreter only): Triton 3.9's interpreter multiplies 16-bit
        operands wrongly, so it gets fp32 copies of the (already rounded) operands."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _tile_ranges(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
        """Tiles of BLOCK (starts multiple of BLOCK) covering [lo, hi), split into a masked run
        [t0, e1), an unmasked run [a, b) and a masked run [b, hi). A tile [t, t + BLOCK) needs no
        mask when full_lo <= t and t + BLOCK <= full_hi. Arguments are >= 0 (integer division
        rounds the same way on the GPU and in the interpreter only for non-negative values)."""
        t0 = (lo // BLOCK) * BLOCK
        hi = tl.where(hi > lo, hi, t0)
        a = tl.maximum(t0, tl.cdiv(full_lo, BLOCK) * BLOCK)
        b = tl.maximum(a, tl.minimum((full_hi // BLOCK) * BLOCK, tl.cdiv(hi, BLOCK) * BLOCK))
        return t0, tl.minimum(a, hi), a, b, hi

    @triton.jit
    def _seq_info(CU, PIDS, PLENS, b, HAS_PREFIX: tl.constexpr):
        """Row of sequence b's first token (int64), its length, its prefix id (clamped to >= 0 so
        pointer arithmetic stays in range) and its prefix length L_b (0 without one)."""
        start = tl.load(CU + b)
        n = tl.load(CU + b + 1) - start
        if HAS_PREFIX:
            pid = tl.load(PIDS + b)
            L = tl.where(pid >= 0, tl.load(PLENS + tl.maximum(pid, 0)), 0)
            pid = tl.maximum(pid, 0)
        else:
            pid = n * 0
            L = n * 0
        return start.to(tl.int64), n, pid, L

    @triton.jit
    def _query_block(SCHED, CU, PIDS, PLENS, blk, window, HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     BLOCK_M: tl.constexpr):
        """Query block ``blk`` of a query schedule: its sequence's first row (int64), length n,
        prefix id and length L (:func:`_seq_info`); the block's rows (``offs_m``, relative to the
        sequence) and their mask; the positions [qp_lo, qp_hi] of its queries. Keys at positions
        [lo, qp_hi] are seen by some row of the block, [full_lo, qp_lo] by every row."""
        b = tl.load(SCHED + 2 * blk)
        i0 = tl.load(SCHED + 2 * blk + 1)
        start, n, pid, L = _seq_info(CU, PIDS, PLENS, b, HAS_PREFIX)
        offs_m = i0 + tl.arange(0, BLOCK_M)
        qp_lo = L + i0
        qp_hi = L + tl.minimum(i0 + BLOCK_M, n) - 1
        if HAS_WINDOW:
            lo = tl.maximum(qp_lo - window + 1, 0)
            full_lo = tl.maximum(qp_hi - window + 1, 0)
        else:
            lo = qp_lo * 0
            full_lo = lo
        return start, n, pid, L, offs_m, offs_m < n, qp_lo, qp_hi, lo, full_lo

    @triton.jit
    def _own_tile_ranges(lo, full_lo, qp_lo, qp_hi, L, n, BLOCK_N: tl.constexpr):
        """:func:`_tile_ranges` of a query block's own keys (key j at position L + j)."""
        return _tile_ranges(tl.maximum(lo - L, 0), tl.minimum(qp_hi + 1 - L, n),
                            tl.maximum(full_lo - L, 0), tl.minimum(qp_lo + 1 - L, n), BLOCK_N)

    @triton.jit
    def _visible(qpos, kpos, window, HAS_WINDOW: tl.constexpr):
        ok = kpos[None, :] <= qpos[:, None]
        if HAS_WINDOW:
            ok = ok & (kpos[None, :] > qpos[:, None] - window)
        return ok


def _dtype_class(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


# fp32 kernels whose exact (FMA) products cannot fit the registers: 3xTF32 tensor-core products
# instead, accurate to about fp32's rounding
_FP32_TF32X3 = {("dq", 128)}


def _precision(dtype: torch.dtype, kind: str = "", dim: int = 0) -> str:
    """:func:`mptkern.ops._common.dot_precision`, except the fp32 kernels of ``_FP32_TF32X3``."""
    if dtype == torch.float32 and (kind, max(dim, 64)) in _FP32_TF32X3:
        return "tf32x3"
    return dot_precision(dtype)


def _config(kind: str, dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    cfg = CONFIGS[(kind, max(dim, 64), _dtype_class(dtype))]
    if backends.triton_interpret() and INTERPRET_BLOCK:
        return (cfg[0] if kind == "decode" else INTERPRET_BLOCK, INTERPRET_BLOCK, cfg[2], cfg[3])
    return cfg


def triton_unsupported(q: torch.Tensor, softcap: float | None = None) -> str | None:
    """Why the Triton kernels cannot take ``q``'s dtype / head dim (or a softcap), or None."""
    if softcap is not None:
        return "the triton backend has no logit soft-capping (softcap=); the torch path has"
    if q.dtype not in GPU_DTYPES:
        return f"the triton backend supports {GPU_DTYPES}, got {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the triton backend supports head dims {HEAD_DIMS}, got {q.shape[-1]}"
    return None


def _rowmajor(t):
    """Kernels take any row/head strides but need a unit stride along the head dim."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _check_offsets(*rows_and_strides):
    """Kernels add 64-bit per-sequence bases to 32-bit offsets within a sequence (fewer registers
    than 64-bit tiles of pointers); refuse a sequence too long for that."""
    for rows, stride in rows_and_strides:
        if rows * stride >= 2**31:
            raise ValueError(f"a sequence of {rows} rows with row stride {stride} exceeds the kernels' 32-bit "
                             "offsets within one sequence; split it or use backend='torch'")


def _prefix_args(q, prefix_k, prefix_v, prefix_ids, prefix_lens, k, v):
    """Prefix tensors for a launch: the real ones, or dummies (never read) when there is none."""
    if prefix_k is None:
        dummy_i = torch.zeros(1, dtype=torch.int32, device=q.device)
        return k.unsqueeze(0), v.unsqueeze(0), dummy_i, dummy_i, False
    ids = prefix_ids.to(torch.int32).contiguous()
    if prefix_lens is None:
        prefix_lens = torch.full((prefix_k.shape[0],), prefix_k.shape[1], dtype=torch.int32, device=q.device)
    return prefix_k, prefix_v, ids, prefix_lens.to(torch.int32).contiguous(), True

