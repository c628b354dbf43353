"""Prefix-aware varlen attention: each packed sequence sees its parent prefix in full and itself causally.

Token j of sequence b sits at absolute position ``L_b + j`` (``L_b`` the length of its prefix, 0
without one). It attends to every prefix position and causally to its own tokens; with a window
``w`` only to keys at positions ``> pos - w`` (gpt-oss's sliding layers); per-head ``sinks`` add one
logit with no value to the softmax denominator. The prefix is read where it lies (by prefix id),
so a prefix shared by many sequences gets one gradient, summed over all of them.

Layers in this file, bottom up: Triton kernels, their launchers and host-side plans, the torch
path, ``torch.library`` ops with autograd, and the public functions :func:`prefix_attention`
(training/prefill) and :func:`prefix_attention_decode` (one new token per sequence).

Backends: ``torch`` (any device; one sequence at a time, so memory is O(n * (L + n)) per sequence
and never O(N^2) over the packed batch) and ``triton`` (the CUDA default; CPU tensors under
``TRITON_INTERPRET=1``). The Triton kernels in brief:

* forward: one program per (query block of a sequence, query head). Its key loop walks the
  sequence's prefix tiles (through ``prefix_ids``, in place) and then its own tiles, online softmax
  in the exp2 domain with the sink as the initial running max. Loop bounds skip every tile the
  window or causality empties; only tiles on a mask edge compute a mask.
* backward: ``Delta = rowsum(O * dO) - dLSE``; dQ per query block (same plan as the forward); dK/dV
  per key block and KV head, looping over the query blocks (and the GQA group's heads) that see it.
  A prefix key block loops over every sequence using that prefix, in a fixed order (sequences
  sorted by prefix id on the host), so the prefix gradient is reduced without atomics and two runs
  give bit-identical gradients. dsinks = -sum_q exp(sink - lse_q) * Delta_q.
* decode: split-K over the virtual key range [prefix | cache] with one program per (sequence,
  KV head, split) holding the whole GQA group, then a combine kernel that merges the splits by
  their LSE and adds the sink once. The caches are dense per-sequence slabs, or (PAGED) pools of
  blocks read through block tables: each key row's block is looked up in the sequence's (or its
  prefix's) table.

LSEs are natural-log fp32 everywhere they leave a kernel (base-2 only inside).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from mptkern import backends

try:
    import triton
    import triton.language as tl
except ImportError:  # non-Linux: the triton backend reports itself unavailable
    triton = None

SUPPORTED_BACKENDS = ("torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_HEAD_DIMS = (16, 32, 64, 128)

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
# edges (the masked/unmasked split and the skipping). None: use CONFIGS, as on a GPU.
INTERPRET_BLOCK = 16
DECODE_TARGET_PROGRAMS = 264  # split-K: aim for about two waves of programs on an H100 (132 SMs)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
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
    def _visible(qpos, kpos, window, HAS_WINDOW: tl.constexpr):
        ok = kpos[None, :] <= qpos[:, None]
        if HAS_WINDOW:
            ok = ok & (kpos[None, :] > qpos[:, None] - window)
        return ok

    @triton.jit
    def _fwd_tiles(acc, m_i, l_i, q, kb, vb, stride_k, stride_v, kend, kpos0, t_lo, t_hi, qpos, window, scale2,
                   MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for t in range(t_lo, t_hi, BLOCK_N):
            j = t + offs_n
            k_off = j[:, None] * stride_k + offs_d[None, :]
            v_off = j[:, None] * stride_v + offs_d[None, :]
            if MASK:
                kmask = j < kend
                k = tl.load(kb + k_off, mask=kmask[:, None], other=0.0)
            else:
                k = tl.load(kb + k_off)
            s = _mm(q, tl.trans(k), PREC, UPCAST) * scale2
            if MASK:
                ok = _visible(qpos, kpos0 + j, window, HAS_WINDOW) & kmask[None, :]
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if MASK:
                v = tl.load(vb + v_off, mask=kmask[:, None], other=0.0)
            else:
                v = tl.load(vb + v_off)
            acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PREC, UPCAST)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _fwd_kernel(
        Q, K, V, PK, PV, O, LSE, SINKS, CU, PIDS, PLENS, SCHED,
        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, spk_p, spk_l, spk_h, spv_p, spv_l, spv_h, so_t, so_h,
        n_heads, sm_scale, window, group,
        HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        blk = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        hk = h // group
        b = tl.load(SCHED + 2 * blk)
        i0 = tl.load(SCHED + 2 * blk + 1)
        start, n, pid, L = _seq_info(CU, PIDS, PLENS, b, HAS_PREFIX)
        scale2 = sm_scale * 1.4426950408889634
        offs_m = i0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        rmask = offs_m < n
        # 64-bit scalar bases, 32-bit offsets within a sequence (the host checks they fit)
        q = tl.load(Q + start * sq_t + h * sq_h + (offs_m[:, None] * sq_t + offs_d[None, :]), mask=rmask[:, None], other=0.0)
        qpos = L + offs_m
        qp_lo = L + i0
        qp_hi = L + tl.minimum(i0 + BLOCK_M, n) - 1
        if HAS_SINKS:
            # the sink is a key with no value: start the running max and sum at it
            m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
            l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
        else:
            # finite start: a row that a tile masks entirely gets p = 0 there, not NaN
            m_i = tl.zeros([BLOCK_M], tl.float32) - 1.0e30
            l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # keys at positions [lo, qp_hi] can be seen by some row, [full_lo, qp_lo] by every row
        if HAS_WINDOW:
            lo = tl.maximum(qp_lo - window + 1, 0)
            full_lo = tl.maximum(qp_hi - window + 1, 0)
        else:
            lo = qp_lo * 0
            full_lo = lo
        if HAS_PREFIX:
            # prefix key p sits at position p < L <= every query: only the window and length mask
            pid64 = pid.to(tl.int64)
            kb = PK + pid64 * spk_p + hk * spk_h
            vb = PV + pid64 * spv_p + hk * spv_h
            t0, e1, a, bb, e3 = _tile_ranges(lo, L, full_lo, L, BLOCK_N)
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kb, vb, spk_l, spv_l, L, 0, t0, e1, qpos, window, scale2,
                                       True, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kb, vb, spk_l, spv_l, L, 0, a, bb, qpos, window, scale2,
                                       False, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kb, vb, spk_l, spv_l, L, 0, bb, e3, qpos, window, scale2,
                                       True, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
        # own key j sits at position L + j
        kb = K + start * sk_t + hk * sk_h
        vb = V + start * sv_t + hk * sv_h
        t0, e1, a, bb, e3 = _tile_ranges(tl.maximum(lo - L, 0), tl.minimum(qp_hi + 1 - L, n),
                                         tl.maximum(full_lo - L, 0), tl.minimum(qp_lo + 1 - L, n), BLOCK_N)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kb, vb, sk_t, sv_t, n, L, t0, e1, qpos, window, scale2,
                                   True, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kb, vb, sk_t, sv_t, n, L, a, bb, qpos, window, scale2,
                                   False, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kb, vb, sk_t, sv_t, n, L, bb, e3, qpos, window, scale2,
                                   True, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
        out = acc / l_i[:, None]
        tl.store(O + start * so_t + h * so_h + (offs_m[:, None] * so_t + offs_d[None, :]), out.to(O.dtype.element_ty),
                 mask=rmask[:, None])
        tl.store(LSE + start * n_heads + h + offs_m * n_heads, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=rmask)

    @triton.jit
    def _delta_kernel(O, DO, DLSE, DELTA, n_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr):
        """Delta = rowsum(O * dO) - dLSE over the (N * n_heads) rows of contiguous O and dO."""
        r0 = tl.program_id(0).to(tl.int64) * BLOCK
        r = tl.arange(0, BLOCK)
        d = tl.arange(0, HEAD_DIM)
        m = r0 + r < n_rows
        off = r[:, None] * HEAD_DIM + d[None, :]
        o = tl.load(O + r0 * HEAD_DIM + off, mask=m[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + r0 * HEAD_DIM + off, mask=m[:, None], other=0.0).to(tl.float32)
        delta = tl.sum(o * do, 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + r0 + r, mask=m, other=0.0)
        tl.store(DELTA + r0 + r, delta, mask=m)

    @triton.jit
    def _dq_tiles(dq, q, do, lse2, delta, kb, vb, stride_k, stride_v, kend, kpos0, t_lo, t_hi, qpos, window, scale2,
                  MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for t in range(t_lo, t_hi, BLOCK_N):
            j = t + offs_n
            k_off = j[:, None] * stride_k + offs_d[None, :]
            v_off = j[:, None] * stride_v + offs_d[None, :]
            if MASK:
                kmask = j < kend
                k = tl.load(kb + k_off, mask=kmask[:, None], other=0.0)
                v = tl.load(vb + v_off, mask=kmask[:, None], other=0.0)
            else:
                k = tl.load(kb + k_off)
                v = tl.load(vb + v_off)
            s = _mm(q, tl.trans(k), PREC, UPCAST) * scale2
            if MASK:
                ok = _visible(qpos, kpos0 + j, window, HAS_WINDOW) & kmask[None, :]
                s = tl.where(ok, s, float("-inf"))
            p = tl.math.exp2(s - lse2[:, None])
            dp = _mm(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq = _mma(ds.to(k.dtype), k, dq, PREC, UPCAST)
        return dq

    @triton.jit
    def _dq_kernel(
        Q, K, V, PK, PV, DO, LSE, DELTA, DQ, CU, PIDS, PLENS, SCHED,
        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, spk_p, spk_l, spk_h, spv_p, spv_l, spv_h, sdo_t, sdo_h, sdq_t, sdq_h,
        n_heads, sm_scale, window, group,
        HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        blk = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        hk = h // group
        b = tl.load(SCHED + 2 * blk)
        i0 = tl.load(SCHED + 2 * blk + 1)
        start, n, pid, L = _seq_info(CU, PIDS, PLENS, b, HAS_PREFIX)
        scale2 = sm_scale * 1.4426950408889634
        offs_m = i0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        rmask = offs_m < n
        q = tl.load(Q + start * sq_t + h * sq_h + (offs_m[:, None] * sq_t + offs_d[None, :]), mask=rmask[:, None], other=0.0)
        do = tl.load(DO + start * sdo_t + h * sdo_h + (offs_m[:, None] * sdo_t + offs_d[None, :]), mask=rmask[:, None], other=0.0)
        stat = start * n_heads + h
        lse2 = tl.load(LSE + stat + offs_m * n_heads, mask=rmask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + stat + offs_m * n_heads, mask=rmask, other=0.0)
        qpos = L + offs_m
        qp_lo = L + i0
        qp_hi = L + tl.minimum(i0 + BLOCK_M, n) - 1
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if HAS_WINDOW:
            lo = tl.maximum(qp_lo - window + 1, 0)
            full_lo = tl.maximum(qp_hi - window + 1, 0)
        else:
            lo = qp_lo * 0
            full_lo = lo
        if HAS_PREFIX:
            pid64 = pid.to(tl.int64)
            kb = PK + pid64 * spk_p + hk * spk_h
            vb = PV + pid64 * spv_p + hk * spv_h
            t0, e1, a, bb, e3 = _tile_ranges(lo, L, full_lo, L, BLOCK_N)
            dq = _dq_tiles(dq, q, do, lse2, delta, kb, vb, spk_l, spv_l, L, 0, t0, e1, qpos, window, scale2,
                           True, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
            dq = _dq_tiles(dq, q, do, lse2, delta, kb, vb, spk_l, spv_l, L, 0, a, bb, qpos, window, scale2,
                           False, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
            dq = _dq_tiles(dq, q, do, lse2, delta, kb, vb, spk_l, spv_l, L, 0, bb, e3, qpos, window, scale2,
                           True, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
        kb = K + start * sk_t + hk * sk_h
        vb = V + start * sv_t + hk * sv_h
        t0, e1, a, bb, e3 = _tile_ranges(tl.maximum(lo - L, 0), tl.minimum(qp_hi + 1 - L, n),
                                         tl.maximum(full_lo - L, 0), tl.minimum(qp_lo + 1 - L, n), BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse2, delta, kb, vb, sk_t, sv_t, n, L, t0, e1, qpos, window, scale2,
                       True, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, kb, vb, sk_t, sv_t, n, L, a, bb, qpos, window, scale2,
                       False, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, kb, vb, sk_t, sv_t, n, L, bb, e3, qpos, window, scale2,
                       True, HAS_WINDOW, BLOCK_N, HEAD_DIM, PREC, UPCAST)
        dq = dq * sm_scale
        tl.store(DQ + start * sdq_t + h * sdq_h + (offs_m[:, None] * sdq_t + offs_d[None, :]), dq.to(DQ.dtype.element_ty),
                 mask=rmask[:, None])

    @triton.jit
    def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, row0, sq_t, sq_h, sdo_t, sdo_h, h, n_heads, n, L, kpos,
                    t_lo, t_hi, window, scale2,
                    MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_base = Q + row0 * sq_t + h * sq_h
        do_base = DO + row0 * sdo_t + h * sdo_h
        stat = row0 * n_heads + h
        for t in range(t_lo, t_hi, BLOCK_M):
            i = t + offs_m
            rmask = i < n
            # rows past the sequence load q = 0, dO = 0, lse = +inf: p = 0, they add nothing
            q = tl.load(q_base + (i[:, None] * sq_t + offs_d[None, :]), mask=rmask[:, None], other=0.0)
            do = tl.load(do_base + (i[:, None] * sdo_t + offs_d[None, :]), mask=rmask[:, None], other=0.0)
            lse2 = tl.load(LSE + stat + i * n_heads, mask=rmask, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + stat + i * n_heads, mask=rmask, other=0.0)
            s = _mm(q, tl.trans(k), PREC, UPCAST) * scale2
            if MASK:
                s = tl.where(_visible(L + i, kpos, window, HAS_WINDOW), s, float("-inf"))
            p = tl.math.exp2(s - lse2[:, None])
            dv = _mma(tl.trans(p.to(do.dtype)), do, dv, PREC, UPCAST)
            dp = _mm(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dk = _mma(tl.trans(ds.to(q.dtype)), q, dk, PREC, UPCAST)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(
        Q, K, V, PK, PV, DO, LSE, DELTA, DK, DV, DPK, DPV, CU, PIDS, PLENS, ITEMS, ORDER,
        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, spk_p, spk_l, spk_h, spv_p, spv_l, spv_h, sdo_t, sdo_h,
        sdk_t, sdk_h, sdpk_p, sdpk_l, sdpk_h,
        n_heads, sm_scale, window, group,
        HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One key block of one KV head. Work item: (own, src, j0, lo, hi): keys j0.. of sequence src
        (own = 1) or of prefix src (own = 0); the sequences whose queries are reduced are
        ORDER[lo:hi] (just src for own keys; every user of the prefix, sorted, for a prefix)."""
        item = tl.program_id(0)
        hk = tl.program_id(1).to(tl.int64)
        own = tl.load(ITEMS + 5 * item)
        src = tl.load(ITEMS + 5 * item + 1)
        j0 = tl.load(ITEMS + 5 * item + 2)
        s_lo = tl.load(ITEMS + 5 * item + 3)
        s_hi = tl.load(ITEMS + 5 * item + 4)
        scale2 = sm_scale * 1.4426950408889634
        offs_n = j0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        if own != 0:
            start_b, n_b, _pb, _lb = _seq_info(CU, PIDS, PLENS, src, HAS_PREFIX)
            kb = K + start_b * sk_t + hk * sk_h
            vb = V + start_b * sv_t + hk * sv_h
            k_st = sk_t
            v_st = sv_t
            kend = n_b
            dkb = DK + start_b * sdk_t + hk * sdk_h
            dvb = DV + start_b * sdk_t + hk * sdk_h
            d_st = sdk_t
        else:
            p64 = src.to(tl.int64)
            kb = PK + p64 * spk_p + hk * spk_h
            vb = PV + p64 * spv_p + hk * spv_h
            k_st = spk_l
            v_st = spv_l
            kend = tl.load(PLENS + src)
            dkb = DPK + p64 * sdpk_p + hk * sdpk_h
            dvb = DPV + p64 * sdpk_p + hk * sdpk_h
            d_st = sdpk_l
        kmask = offs_n < kend
        k = tl.load(kb + (offs_n[:, None] * k_st + offs_d[None, :]), mask=kmask[:, None], other=0.0)
        v = tl.load(vb + (offs_n[:, None] * v_st + offs_d[None, :]), mask=kmask[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for idx in range(s_lo, s_hi):
            s = tl.load(ORDER + idx)
            row0, n, _p, L = _seq_info(CU, PIDS, PLENS, s, HAS_PREFIX)
            kpos0 = tl.where(own != 0, L, 0)
            kpos = kpos0 + offs_n
            # query rows i (position L + i) that see some key of the block, and that see all of it
            lo = tl.maximum(kpos0 + j0 - L, 0)
            full_lo = tl.maximum(kpos0 + j0 + BLOCK_N - 1 - L, 0)
            if HAS_WINDOW:
                hi = tl.maximum(tl.minimum(n, kpos0 + j0 + BLOCK_N - 1 + window - L), 0)
                full_hi = tl.maximum(kpos0 + j0 + window - L, 0)
            else:
                hi = n
                full_hi = n + BLOCK_M
            t0, e1, a, bb, e3 = _tile_ranges(lo, hi, full_lo, full_hi, BLOCK_M)
            for g in range(group):
                h = hk * group + g
                dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, row0, sq_t, sq_h, sdo_t, sdo_h, h, n_heads, n, L,
                                     kpos, t0, e1, window, scale2, True, HAS_WINDOW, BLOCK_M, HEAD_DIM, PREC, UPCAST)
                dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, row0, sq_t, sq_h, sdo_t, sdo_h, h, n_heads, n, L,
                                     kpos, a, bb, window, scale2, False, HAS_WINDOW, BLOCK_M, HEAD_DIM, PREC, UPCAST)
                dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, row0, sq_t, sq_h, sdo_t, sdo_h, h, n_heads, n, L,
                                     kpos, bb, e3, window, scale2, True, HAS_WINDOW, BLOCK_M, HEAD_DIM, PREC, UPCAST)
        dk = dk * sm_scale
        d_off = offs_n[:, None] * d_st + offs_d[None, :]
        tl.store(dkb + d_off, dk.to(DK.dtype.element_ty), mask=kmask[:, None])
        tl.store(dvb + d_off, dv.to(DV.dtype.element_ty), mask=kmask[:, None])

    @triton.jit
    def _decode_kernel(
        Q, KC, VC, PK, PV, LENS, PIDS, PLENS, BT, PBT, OPART, LPART,
        sq_b, sq_h, skc_b, skc_t, skc_h, svc_b, svc_t, svc_h, spk_p, spk_l, spk_h, spv_p, spv_l, spv_h, bt_b, pbt_p,
        n_heads, sm_scale, window, group, chunk, nsplit, block_size,
        HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr, PAGED: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One (sequence, KV head, split): the GQA group's queries against keys at virtual positions
        [lo + split * chunk, ...) of [prefix (L) | cache (n)]; the query sits at position L + n - 1.
        Writes the split's normalised output and base-2 LSE (-inf when the split is empty).

        PAGED: KC/VC (and PK/PV) are pools of blocks, their ``_b`` (``_p``) strides per block and
        ``_t`` (``_l``) per row within a block; row ``b`` of BT (row ``prefix_ids[b]`` of PBT) maps
        the sequence's (its prefix's) key index // block_size to a block."""
        b = tl.program_id(0).to(tl.int64)
        hk = tl.program_id(1).to(tl.int64)
        sp = tl.program_id(2)
        n = tl.load(LENS + b).to(tl.int32)
        if HAS_PREFIX:
            pid = tl.load(PIDS + b)
            L = tl.where(pid >= 0, tl.load(PLENS + tl.maximum(pid, 0)), 0)
            pid64 = tl.maximum(pid, 0).to(tl.int64)
        else:
            L = n * 0
            pid64 = b * 0
        T = L + n
        if HAS_WINDOW:
            lo = tl.maximum(T - window, 0)
        else:
            lo = T * 0
        s_lo = lo + sp * chunk
        s_hi = tl.minimum(T, s_lo + chunk)
        scale2 = sm_scale * 1.4426950408889634
        g = tl.arange(0, BLOCK_H)
        hmask = g < group
        heads = hk * group + g
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
        m_i = tl.zeros([BLOCK_H], tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
        if PAGED:  # the per-row block offsets carry the rest
            kpb = PK + hk * spk_h
            vpb = PV + hk * spv_h
            kcb = KC + hk * skc_h
            vcb = VC + hk * svc_h
        else:
            kpb = PK + pid64 * spk_p + hk * spk_h
            vpb = PV + pid64 * spv_p + hk * spv_h
            kcb = KC + b * skc_b + hk * skc_h
            vcb = VC + b * svc_b + hk * svc_h
        bt_row = BT + b * bt_b
        pbt_row = PBT + pid64 * pbt_p
        offs_n = tl.arange(0, BLOCK_N)
        for t in range(s_lo, s_hi, BLOCK_N):
            pos = t + offs_n
            valid = pos < s_hi
            own = pos >= L
            if PAGED:
                # one table lookup and one load per row, from a block of the cache or of the prefix
                # (without a prefix L = 0: every row is the cache's)
                idx = tl.where(own, pos - L, pos)
                j = idx // block_size
                blk = tl.load(tl.where(own, bt_row, pbt_row) + j, mask=valid, other=0).to(tl.int64)
                r = idx - j * block_size
                kr = tl.where(own, kcb + (blk * skc_b + r * skc_t), kpb + (blk * spk_p + r * spk_l))
                vr = tl.where(own, vcb + (blk * svc_b + r * svc_t), vpb + (blk * spv_p + r * spv_l))
                k = tl.load(kr[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
                v = tl.load(vr[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            else:
                pr = pos[:, None]
                cr = (pos - L)[:, None]
                # a tile may straddle the prefix/cache boundary: two predicated loads, one per source
                k = tl.load(kcb + (cr * skc_t + offs_d[None, :]), mask=(valid & own)[:, None], other=0.0)
                v = tl.load(vcb + (cr * svc_t + offs_d[None, :]), mask=(valid & own)[:, None], other=0.0)
                if HAS_PREFIX:
                    k += tl.load(kpb + (pr * spk_l + offs_d[None, :]), mask=(valid & ~own)[:, None], other=0.0)
                    v += tl.load(vpb + (pr * spv_l + offs_d[None, :]), mask=(valid & ~own)[:, None], other=0.0)
            s = _mm(q, tl.trans(k), PREC, UPCAST) * scale2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PREC, UPCAST)
            m_i = m_new
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse2 = tl.where(nonempty, m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        part = (b * n_heads + heads) * nsplit + sp  # (B, n_heads, nsplit) partials
        tl.store(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=hmask[:, None])
        tl.store(LPART + part, lse2, mask=hmask)

    @triton.jit
    def _decode_combine_kernel(OPART, LPART, SINKS, O, LSE, n_heads, nsplit, so_b, so_h,
                               HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Merge the splits of one (sequence, head) by their LSE; the sink enters once, here."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        sidx = tl.arange(0, BLOCK_S)
        smask = sidx < nsplit
        offs_d = tl.arange(0, HEAD_DIM)
        base = (b * n_heads + h) * nsplit
        lse2 = tl.load(LPART + base + sidx, mask=smask, other=float("-inf"))
        m = tl.max(lse2, 0)
        if HAS_SINKS:
            sink2 = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
            m = tl.maximum(m, sink2)
        w = tl.math.exp2(lse2 - m)
        denom = tl.sum(w, 0)
        if HAS_SINKS:
            denom += tl.math.exp2(sink2 - m)
        o = tl.load(OPART + (base + sidx)[:, None] * HEAD_DIM + offs_d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / denom
        tl.store(O + b * so_b + h * so_h + offs_d, out.to(O.dtype.element_ty))
        tl.store(LSE + b * n_heads + h, (m + tl.math.log2(denom)) * 0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# torch path (any device; the reference the kernels are held to)
# ----------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the torch path: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocked_masks(plan, window, device):
    """One boolean matrix that every sequence's mask is a slice of: ``blocked[i, j]`` is True where
    query i may not see key j, i.e. unless ``j <= Lmax + i`` (and ``j > Lmax + i - window``). Both
    conditions depend only on ``j - i``, so a sequence with ``n`` tokens after ``L`` prefix keys takes
    ``blocked[:n, Lmax - L : Lmax + n]`` (built once per call instead of once per sequence)."""
    n_max = max(e - s for s, e, _, _ in plan)
    l_max = max(n_prefix for *_, n_prefix in plan)
    i = torch.arange(n_max, device=device)[:, None]
    j = torch.arange(l_max + n_max, device=device)[None, :]
    allowed = j <= l_max + i
    if window is not None:
        allowed &= j > l_max + i - window
    return ~allowed, l_max


def _scores(q, k, n_prefix: int, scale: float, masks):
    """fp32 masked scores of one sequence: q (n, Hq, D), k (n_prefix + n, Hkv, D) -> (Hkv, G, n, m),
    and q as (Hkv, G, n, D); ``masks`` from :func:`_blocked_masks`."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    # (Hkv, G*n, D) x (Hkv, D, m): GQA as one bmm per KV head, K neither repeated nor broadcast
    acc = _acc(q.dtype)
    q2 = q.permute(1, 0, 2).to(acc).reshape(hkv, g * n, dim)  # a copy: heads-major rows
    scores = torch.bmm(q2, k.permute(1, 2, 0).to(acc)).mul_(scale).view(hkv, g, n, -1)
    blocked, l_max = masks
    return scores.masked_fill_(blocked[:n, l_max - n_prefix : l_max + n], float("-inf")), q2.view(hkv, g, n, dim)


def _softmax_attend(scores, v, sinks=None):
    """Masked scores (batch, rows, keys), v (batch, keys, D) -> out (batch, rows, D), lse (batch, rows),
    with one exp pass (scores are overwritten):
    out = softmax(scores) @ v, lse the natural-log normaliser; NaN on rows whose keys are all masked
    (callers that allow such rows mask them). ``sinks`` (broadcastable to (batch, rows, 1)) are extra
    logits with no value."""
    peak = scores.amax(-1, keepdim=True)
    if sinks is not None:
        peak = torch.maximum(peak, sinks)  # a sink far above every score must not overflow exp
    probs = scores.sub_(peak).exp_()
    denom = probs.sum(-1, keepdim=True)
    if sinks is not None:
        denom += torch.exp(sinks - peak)
    out = torch.bmm(probs, v).div_(denom)
    return out, (peak + denom.log()).squeeze(-1)


def _attend_one(q, k, v, n_prefix: int, scale: float, masks, sinks):
    """One sequence. q (n, Hq, D); k, v (n_prefix + n, Hkv, D). Returns out (n, Hq, D) fp32, lse (n, Hq) fp32."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    scores, _ = _scores(q, k, n_prefix, scale, masks)  # (Hkv, G, n, m)
    if sinks is not None:
        sinks = sinks.to(scores.dtype).view(hkv, hq // hkv, 1).expand(-1, -1, n).reshape(hkv, -1, 1)
    out, lse = _softmax_attend(scores.view(hkv, -1, k.shape[0]), v.permute(1, 0, 2).to(scores.dtype), sinks)
    return out.view(hq, n, dim).permute(1, 0, 2), lse.view(hq, n).t()


def _torch_plan(cu, prefix_ids, prefix_lens, prefix_k):
    """(start, end, prefix id, prefix length) of every non-empty sequence."""
    bounds = cu.tolist()
    pids = prefix_ids.tolist() if prefix_ids is not None else [-1] * (len(bounds) - 1)
    plens = prefix_lens.tolist() if prefix_lens is not None else None
    plan = []
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if e > s:
            pid = pids[b]
            plan.append((s, e, pid, 0 if pid < 0 else (plens[pid] if plens is not None else prefix_k.shape[1])))
    return plan


def _keys(t, prefix, s, e, pid, n_prefix):
    return torch.cat([prefix[pid, :n_prefix], t[s:e]]) if n_prefix else t[s:e]


class _TorchPrefixAttention(torch.autograd.Function):
    """The torch path, one sequence at a time, with a hand-written backward that recomputes each
    sequence's probabilities from the saved LSE (flash-attention's recipe) and writes gradients
    straight into preallocated buffers: memory is O(n (L + n)) for one sequence at a time, and no
    per-sequence slice makes autograd touch the whole packed batch."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, sinks, plan, scale, window):
        out = torch.empty(q.shape, dtype=_acc(q.dtype), device=q.device)
        lse = torch.empty(q.shape[:2], dtype=_acc(q.dtype), device=q.device)
        masks = _blocked_masks(plan, window, q.device) if plan else None
        for s, e, pid, n_prefix in plan:
            o, l = _attend_one(q[s:e], _keys(k, prefix_k, s, e, pid, n_prefix), _keys(v, prefix_v, s, e, pid, n_prefix),
                               n_prefix, scale, masks, sinks)
            out[s:e], lse[s:e] = o, l
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, sinks, out, lse)
        ctx.plan, ctx.scale, ctx.window = plan, scale, window
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, prefix_k, prefix_v, sinks, out, lse = ctx.saved_tensors
        hq, dim, hkv = q.shape[1], q.shape[2], k.shape[1]
        g = hq // hkv
        f32 = dict(dtype=_acc(q.dtype), device=q.device)
        dq, dk, dv = torch.zeros(q.shape, **f32), torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)
        dpk = torch.zeros(prefix_k.shape, **f32) if prefix_k is not None else None
        dpv = torch.zeros(prefix_v.shape, **f32) if prefix_v is not None else None
        dsinks = torch.zeros(hq, **f32) if sinks is not None else None
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype)
        masks = _blocked_masks(ctx.plan, ctx.window, q.device) if ctx.plan else None
        for s, e, pid, n_prefix in ctx.plan:
            n = e - s
            kb = _keys(k, prefix_k, s, e, pid, n_prefix)
            vb = _keys(v, prefix_v, s, e, pid, n_prefix).permute(1, 0, 2).to(out.dtype).unsqueeze(1)  # (Hkv, 1, m, D)
            scores, qh = _scores(q[s:e], kb, n_prefix, ctx.scale, masks)
            l = lse[s:e].t().reshape(hkv, g, n, 1)
            p = torch.exp(scores - l)  # (Hkv, G, n, m)
            do = dout[s:e].permute(1, 0, 2).reshape(hkv, g, n, dim)
            o = out[s:e].permute(1, 0, 2).reshape(hkv, g, n, dim)
            delta = (do * o).sum(-1, keepdim=True)  # rowsum(dO * O)
            dl = dlse[s:e].t().reshape(hkv, g, n, 1) if dlse is not None else 0.0
            ds = p * (torch.matmul(do, vb.transpose(-1, -2)) - delta + dl)  # dL/dscores
            dq[s:e] = (torch.matmul(ds, kb.permute(1, 0, 2).to(out.dtype).unsqueeze(1)) * ctx.scale).reshape(hq, n, dim).permute(1, 0, 2)
            dkb = (torch.matmul(ds.transpose(-1, -2), qh) * ctx.scale).sum(1).permute(1, 0, 2)  # (m, Hkv, D)
            dvb = torch.matmul(p.transpose(-1, -2), do).sum(1).permute(1, 0, 2)
            dk[s:e], dv[s:e] = dkb[n_prefix:], dvb[n_prefix:]
            if n_prefix:
                dpk[pid, :n_prefix] += dkb[:n_prefix]
                dpv[pid, :n_prefix] += dvb[:n_prefix]
            if sinks is not None:  # d lse / d sink = p_sink; d out / d sink = -p_sink * out
                p_sink = torch.exp(sinks.to(out.dtype).view(hkv, g, 1, 1) - l)
                dsinks += (p_sink * (dl - delta)).sum((2, 3)).reshape(hq)
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)  # noqa: E731
        return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dpk, prefix_k), cast(dpv, prefix_v), cast(dsinks, sinks),
                None, None, None)


def _prefix_attention_torch(q, k, v, cu, prefix_k, prefix_v, prefix_ids, prefix_lens, scale, window, sinks):
    plan = _torch_plan(cu, prefix_ids, prefix_lens, prefix_k)
    return _TorchPrefixAttention.apply(q, k, v, prefix_k, prefix_v, sinks, plan, scale, window)


def _validate_prefix(q, B, hkv, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks, prefix_tables=None):
    """The checks prefill and decode share: the prefix tensors against q's dtype/device, ``B``
    sequences and ``Hkv`` heads; the window; the sinks. With ``prefix_tables`` (paged decode) the
    prefix tensors are block pools and the tables' rows count the prefixes. Raises ValueError."""
    hq, dim = q.shape[1:]

    def fail(msg):
        raise ValueError(msg)

    if (prefix_k is None) != (prefix_v is None) or (prefix_k is None) != (prefix_ids is None):
        fail("prefix_k, prefix_v and prefix_ids must be given together")
    if prefix_k is not None:
        layout = "(P, Lp" if prefix_tables is None else "pools (num_blocks, block_size"
        if prefix_k.dim() != 4 or prefix_k.shape[2:] != (hkv, dim) or prefix_v.shape != prefix_k.shape:
            fail(f"prefix_k and prefix_v must have shape {layout}, Hkv={hkv}, D={dim}), "
                 f"got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype or t.device != q.device:
                fail(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
        P = prefix_k.shape[0] if prefix_tables is None else prefix_tables.shape[0]
        if prefix_ids.shape != (B,) or prefix_ids.dtype.is_floating_point or prefix_ids.dtype == torch.bool:
            fail(f"prefix_ids must be an integer tensor of shape (B={B},), got {prefix_ids.dtype} {tuple(prefix_ids.shape)}")
        if prefix_lens is not None and (prefix_lens.shape != (P,) or prefix_lens.dtype.is_floating_point):
            fail(f"prefix_lens must be an integer tensor of shape (P={P},), got {prefix_lens.dtype} {tuple(prefix_lens.shape)}")
    elif prefix_lens is not None:
        fail("prefix_lens given without prefix_k")
    if window is not None and (not isinstance(window, int) or window < 1):
        fail(f"window must be a positive int or None, got {window!r}")
    if sinks is not None and (sinks.shape != (hq,) or sinks.device != q.device):
        fail(f"sinks must have shape (Hq={hq},) on {q.device}, got {tuple(sinks.shape)} on {sinks.device}")


def _validate(q, k, v, cu, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks, values=True):
    def fail(msg):
        raise ValueError(msg)

    if q.dim() != 3:
        fail(f"q must have shape (N, Hq, D), got {tuple(q.shape)}")
    N, hq, dim = q.shape
    if N == 0:
        fail("q is empty: expected (N, Hq, D) with N >= 1")
    if k.dim() != 3 or k.shape[0] != N or k.shape[2] != dim or v.shape != k.shape:
        fail(f"k and v must have shape (N={N}, Hkv, D={dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        fail(f"q's heads ({hq}) must be a multiple of k's heads ({hkv})")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            fail(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if not q.dtype.is_floating_point:
        fail(f"q must be floating point, got {q.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2 or cu.dtype not in (torch.int32, torch.int64) or cu.device != q.device:
        fail(f"cu_seqlens must be an int32 tensor of shape (B+1,) on {q.device}, got {cu.dtype} {tuple(cu.shape)} on {cu.device}")
    B = cu.shape[0] - 1
    if values:
        _check_cu(cu, N)
    _validate_prefix(q, B, hkv, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks)
    if values:
        _check_prefix_values(prefix_k, prefix_ids, prefix_lens)


def _check_cu(cu, N):
    c = cu.tolist()
    if c[0] != 0 or c[-1] != N or any(a > b for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to N={N}, got {c if len(c) <= 12 else c[:6] + ['...'] + c[-3:]}")


def _check_values(q, cu, prefix_k, prefix_ids, prefix_lens):
    """The checks that read tensor values (host syncs). The triton path runs them inside its op,
    so that torch.compile traces the public function without a graph break."""
    _check_cu(cu, q.shape[0])
    _check_prefix_values(prefix_k, prefix_ids, prefix_lens)


def _check_prefix_values(prefix_k, prefix_ids, prefix_lens):
    if prefix_k is not None:
        _check_prefix_ranges(prefix_k.shape[0], prefix_k.shape[1], prefix_ids, prefix_lens)


def _check_prefix_ranges(P, Lp, prefix_ids, prefix_lens, lp_name="Lp"):
    if prefix_ids.numel():
        lo, hi = (int(x) for x in torch.aminmax(prefix_ids))
        if lo < -1 or hi >= P:
            raise ValueError(f"prefix_ids must lie in [-1, {P}) (-1: no prefix), got values in [{lo}, {hi}]")
    if prefix_lens is not None and prefix_lens.numel():
        lo, hi = (int(x) for x in torch.aminmax(prefix_lens))
        if lo < 0 or hi > Lp:
            raise ValueError(f"prefix_lens must lie in [0, {lp_name}={Lp}]")




# ----------------------------------------------------------------------------------------------
# launchers and host-side plans
# ----------------------------------------------------------------------------------------------
def _dtype_class(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


# fp32 kernels whose exact (FMA) products cannot fit the registers: 3xTF32 tensor-core products
# instead, accurate to about fp32's rounding
_FP32_TF32X3 = {("dq", 128)}


def _precision(dtype: torch.dtype, kind: str = "", dim: int = 0) -> str:
    """fp32 inputs get fp32-accurate products (the oracle tests compare at fp32 tolerances), not tf32."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if (kind, max(dim, 64)) in _FP32_TF32X3 else "ieee"


def _config(kind: str, dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    cfg = CONFIGS[(kind, max(dim, 64), _dtype_class(dtype))]
    if backends.triton_interpret() and INTERPRET_BLOCK:
        return (cfg[0] if kind == "decode" else INTERPRET_BLOCK, INTERPRET_BLOCK, cfg[2], cfg[3])
    return cfg


def triton_unsupported(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take ``q``'s dtype / head dim, or None."""
    if q.dtype not in _TRITON_DTYPES:
        return f"the triton backend supports {_TRITON_DTYPES}, got {q.dtype}"
    if q.shape[-1] not in _TRITON_HEAD_DIMS:
        return f"the triton backend supports head dims {_TRITON_HEAD_DIMS}, got {q.shape[-1]}"
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


def _host_layout(cu, prefix_ids, prefix_lens, prefix_k):
    """Python lists: sequence lengths, prefix id per sequence (-1: none), prefix length per sequence."""
    c = cu.tolist()
    lens = [e - s for s, e in zip(c[:-1], c[1:])]
    B = len(lens)
    pids = prefix_ids.tolist() if prefix_ids is not None else [-1] * B
    plens = prefix_lens.tolist() if prefix_lens is not None else ([prefix_k.shape[1]] * prefix_k.shape[0] if prefix_k is not None else [])
    seq_L = [plens[p] if p >= 0 else 0 for p in pids]
    return lens, pids, plens, seq_L


def _query_plan(lens, seq_L, block_m, device):
    """(blocks, 2) int32 (sequence, first row) of every query block, the longest key ranges first."""
    blocks = sorted(((-(L + i0), b, i0) for b, (n, L) in enumerate(zip(lens, seq_L)) for i0 in range(0, n, block_m)))
    return torch.tensor([(b, i0) for _, b, i0 in blocks], dtype=torch.int32).view(-1, 2).to(device)


def _key_plan(lens, pids, plens, block_n, device):
    """Work items (own, src, j0, lo, hi) for the dK/dV kernel and the sequence order they index.

    Prefix items come first (each reduces over every sequence of its prefix, the longest work);
    ORDER holds the sequences sorted by prefix id (stable, so the reduction order is the batch
    order within a prefix), then 0..B-1 for the own-key items."""
    B = len(lens)
    users = sorted((p, b) for b, p in enumerate(pids) if p >= 0 and lens[b] > 0)
    order = [b for _, b in users]
    items = []
    i = 0
    while i < len(users):
        p, j = users[i][0], i
        while j < len(users) and users[j][0] == p:
            j += 1
        items += [(0, p, j0, i, j) for j0 in range(0, plens[p], block_n)]
        i = j
    own = sorted(((-(n - j0), b, j0) for b, n in enumerate(lens) for j0 in range(0, n, block_n)))
    items += [(1, b, j0, len(order) + b, len(order) + b + 1) for _, b, j0 in own]
    order += list(range(B))
    return (torch.tensor(items, dtype=torch.int32).view(-1, 5).to(device),
            torch.tensor(order, dtype=torch.int32).to(device))


def _prefix_args(q, prefix_k, prefix_v, prefix_ids, prefix_lens, k, v):
    """Prefix tensors for a launch: the real ones, or dummies (never read) when there is none."""
    if prefix_k is None:
        dummy_i = torch.zeros(1, dtype=torch.int32, device=q.device)
        return k.unsqueeze(0), v.unsqueeze(0), dummy_i, dummy_i, False
    ids = prefix_ids.to(torch.int32).contiguous()
    if prefix_lens is None:
        prefix_lens = torch.full((prefix_k.shape[0],), prefix_k.shape[1], dtype=torch.int32, device=q.device)
    return prefix_k, prefix_v, ids, prefix_lens.to(torch.int32).contiguous(), True


def _fwd_triton(q, k, v, cu, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, scale, window):
    q, k, v, prefix_k, prefix_v = (_rowmajor(t) for t in (q, k, v, prefix_k, prefix_v))
    N, hq, dim = q.shape
    hkv = k.shape[1]
    lens, pids, plens, seq_L = _host_layout(cu, prefix_ids, prefix_lens, prefix_k)
    _check_offsets((max(lens), max(q.stride(0), k.stride(0), v.stride(0), hq * dim)),
                   *[(t.shape[1], t.stride(1)) for t in (prefix_k, prefix_v) if t is not None])
    bm, bn, warps, stages = _config("fwd", dim, q.dtype)
    sched = _query_plan(lens, seq_L, bm, q.device)
    pk, pv, ids, plen_t, has_prefix = _prefix_args(q, prefix_k, prefix_v, prefix_ids, prefix_lens, k, v)
    out = torch.empty(N, hq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, hq, dtype=torch.float32, device=q.device)
    cu32 = cu.to(torch.int32).contiguous()
    _fwd_kernel[(sched.shape[0], hq)](
        q, k, v, pk, pv, out, lse, sinks if sinks is not None else lse, cu32, ids, plen_t, sched,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        pk.stride(0), pk.stride(1), pk.stride(2), pv.stride(0), pv.stride(1), pv.stride(2), out.stride(0), out.stride(1),
        hq, scale, window, hq // hkv,
        HAS_PREFIX=has_prefix, HAS_WINDOW=window > 0, HAS_SINKS=sinks is not None,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=dim, PREC=_precision(q.dtype), UPCAST=backends.triton_interpret(), num_warps=warps, num_stages=stages,
    )
    return out, lse


def _bwd_triton(dout, dlse, q, k, v, out, lse, cu, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, scale, window):
    q, k, v, prefix_k, prefix_v = (_rowmajor(t) for t in (q, k, v, prefix_k, prefix_v))
    dout, out = dout.contiguous(), out.contiguous()
    N, hq, dim = q.shape
    hkv = k.shape[1]
    lens, pids, plens, seq_L = _host_layout(cu, prefix_ids, prefix_lens, prefix_k)
    pk, pv, ids, plen_t, has_prefix = _prefix_args(q, prefix_k, prefix_v, prefix_ids, prefix_lens, k, v)
    cu32 = cu.to(torch.int32).contiguous()
    prec = _precision(q.dtype)

    delta = torch.empty(N, hq, dtype=torch.float32, device=q.device)
    R = N * hq
    _delta_kernel[(triton.cdiv(R, DELTA_BLOCK),)](
        out, dout, dlse.contiguous() if dlse is not None else delta, delta, R,
        HEAD_DIM=dim, BLOCK=DELTA_BLOCK, HAS_DLSE=dlse is not None,
    )

    bm, bn, warps, stages = _config("dq", dim, q.dtype)
    sched = _query_plan(lens, seq_L, bm, q.device)
    dq = torch.empty(N, hq, dim, dtype=q.dtype, device=q.device)
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              pk.stride(0), pk.stride(1), pk.stride(2), pv.stride(0), pv.stride(1), pv.stride(2),
              dout.stride(0), dout.stride(1))
    _dq_kernel[(sched.shape[0], hq)](
        q, k, v, pk, pv, dout, lse, delta, dq, cu32, ids, plen_t, sched, *common, dq.stride(0), dq.stride(1),
        hq, scale, window, hq // hkv,
        HAS_PREFIX=has_prefix, HAS_WINDOW=window > 0, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=dim,
        PREC=_precision(q.dtype, "dq", dim), UPCAST=backends.triton_interpret(), num_warps=warps, num_stages=stages,
    )

    bm, bn, warps, stages = _config("dkdv", dim, q.dtype)
    items, order = _key_plan(lens, pids, plens, bn, q.device)
    dk = torch.empty(N, hkv, dim, dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    if has_prefix:  # zeros: rows past a prefix's length and prefixes nobody uses get no program
        dpk = torch.zeros(prefix_k.shape, dtype=q.dtype, device=q.device)
        dpv = torch.zeros_like(dpk)
    else:
        dpk, dpv = dk.unsqueeze(0), dv.unsqueeze(0)
    _dkdv_kernel[(items.shape[0], hkv)](
        q, k, v, pk, pv, dout, lse, delta, dk, dv, dpk, dpv, cu32, ids, plen_t, items, order, *common,
        dk.stride(0), dk.stride(1), dpk.stride(0), dpk.stride(1), dpk.stride(2),
        hq, scale, window, hq // hkv,
        HAS_PREFIX=has_prefix, HAS_WINDOW=window > 0, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=dim, PREC=prec, UPCAST=backends.triton_interpret(),
        num_warps=warps, num_stages=stages,
    )
    dsinks = None
    if sinks is not None:
        # d lse / d sink = p_sink; d O / d sink = -p_sink O: both fold into -p_sink * Delta
        dsinks = -(torch.exp(sinks.float()[None, :] - lse) * delta).sum(0)
        dsinks = dsinks.to(sinks.dtype)
    return dq, dk, dv, (dpk if has_prefix else None), (dpv if has_prefix else None), dsinks


def _decode_splits(B, hkv, max_keys, block_n):
    """Split-K factor: enough programs to fill the GPU when B * Hkv alone cannot."""
    tiles = max(1, triton.cdiv(max_keys, block_n))
    return max(1, min(tiles, triton.cdiv(DECODE_TARGET_PROGRAMS, B * hkv)))


def _decode_triton(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, scale, window,
                   block_tables=None, prefix_block_tables=None):
    """Dense slabs, or (``block_tables`` given) pools of blocks read through int32 block tables. The
    host knows only capacities (no sync): the split plan covers the longest possible key range,
    ``S`` (``max_blocks * block_size`` paged) plus ``Lp`` (``max_prefix_blocks * block_size``)."""
    q, k_cache, v_cache, prefix_k, prefix_v = (_rowmajor(t) for t in (q, k_cache, v_cache, prefix_k, prefix_v))
    B, hq, dim = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    paged = block_tables is not None
    bh, bn, warps, stages = _config("decode", dim, q.dtype)
    bh = max(bh, triton.next_power_of_2(group))
    pk, pv, ids, plen_t, has_prefix = _prefix_args(q, prefix_k, prefix_v, prefix_ids, prefix_lens, k_cache[:, 0], v_cache[:, 0])
    # 32-bit offsets within a slab, or within a block (the kernel adds 64-bit block offsets)
    _check_offsets((k_cache.shape[1], max(k_cache.stride(1), v_cache.stride(1))),
                   *[(t.shape[1], t.stride(1)) for t in (prefix_k, prefix_v) if t is not None])
    if paged:
        bt = block_tables.to(torch.int32).contiguous()
        pbt = prefix_block_tables.to(torch.int32).contiguous() if has_prefix else bt
        block_size = k_cache.shape[1]
        own_cap, prefix_cap = bt.shape[1] * block_size, pbt.shape[1] * block_size if has_prefix else 0
    else:
        bt = pbt = ids  # never read
        block_size = 1
        own_cap, prefix_cap = k_cache.shape[1], prefix_k.shape[1] if has_prefix else 0
    max_keys = own_cap + prefix_cap
    if window > 0:
        max_keys = min(max_keys, window)
    nsplit = _decode_splits(B, hkv, max_keys, bn)
    chunk = triton.cdiv(triton.cdiv(max_keys, nsplit), bn) * bn
    opart = torch.empty(B, hq, nsplit, dim, dtype=torch.float32, device=q.device)
    lpart = torch.empty(B, hq, nsplit, dtype=torch.float32, device=q.device)
    _decode_kernel[(B, hkv, nsplit)](
        q, k_cache, v_cache, pk, pv, cache_lens.to(torch.int32).contiguous(), ids, plen_t, bt, pbt, opart, lpart,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        pk.stride(0), pk.stride(1), pk.stride(2), pv.stride(0), pv.stride(1), pv.stride(2), bt.stride(0), pbt.stride(0),
        hq, scale, window, group, chunk, nsplit, block_size,
        HAS_PREFIX=has_prefix, HAS_WINDOW=window > 0, PAGED=paged, BLOCK_H=bh, BLOCK_N=bn, HEAD_DIM=dim,
        PREC=_precision(q.dtype), UPCAST=backends.triton_interpret(), num_warps=warps, num_stages=stages,
    )
    out = torch.empty(B, hq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, hq, dtype=torch.float32, device=q.device)
    _decode_combine_kernel[(B, hq)](
        opart, lpart, sinks if sinks is not None else lpart, out, lse, hq, nsplit, out.stride(0), out.stride(1),
        HAS_SINKS=sinks is not None, BLOCK_S=triton.next_power_of_2(nsplit), HEAD_DIM=dim, num_warps=4,
    )
    return out, lse


def aot_specs():
    """Every shipped kernel configuration, for the ahead-of-time compile check (:mod:`mptkern.aot`).

    Head dims 64 and 128 x bf16/fp16/fp32 x forward, dQ, dK/dV, decode dense and paged (+ the two
    small helper kernels), in the most demanding variant (prefix, window and sinks on)."""
    from mptkern.aot import KernelSpec

    def divisible(signature):
        # pointers (torch allocations) and row/head strides (s*: multiples of D); not counts or window
        return tuple(n for n, t in signature.items() if t.startswith("*") or (n.startswith("s") and n != "sm_scale"))

    def sig(kernel, dt, ptr_types, floats, constexprs):
        out = {}
        for name in kernel.arg_names:
            if name in constexprs:
                out[name] = "constexpr"
            elif name in ptr_types:
                out[name] = ptr_types[name]
            elif name.isupper():
                out[name] = "*" + dt
            elif name in floats:
                out[name] = "fp32"
            else:
                out[name] = "i32"
        return out

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    i32 = "*i32"
    meta = dict(LSE="*fp32", DELTA="*fp32", SINKS="*fp32", CU=i32, PIDS=i32, PLENS=i32, SCHED=i32, ITEMS=i32,
                ORDER=i32, LENS=i32, BT=i32, PBT=i32, OPART="*fp32", LPART="*fp32", DLSE="*fp32")
    specs = []
    for dt, dtype in dtypes.items():
        for dim in (64, 128):
            for kind, kernel in (("fwd", _fwd_kernel), ("dq", _dq_kernel), ("dkdv", _dkdv_kernel)):
                prec = _precision(dtype, kind, dim)
                bm, bn, warps, stages = CONFIGS[(kind, dim, _dtype_class(dtype))]
                ce = dict(HAS_PREFIX=True, HAS_WINDOW=True, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=dim, PREC=prec, UPCAST=False)
                if kind == "fwd":
                    ce["HAS_SINKS"] = True
                signature = sig(kernel, dt, meta, ("sm_scale",), ce)
                specs.append(KernelSpec(f"prefix_attention_{kind}_{dt}_d{dim}", kernel, signature, ce, warps, stages,
                                        divisible(signature)))
            bh, bn, warps, stages = CONFIGS[("decode", dim, _dtype_class(dtype))]
            prec = _precision(dtype)
            for paged in (False, True):  # dense slabs; pools read through block tables
                ce = dict(HAS_PREFIX=True, HAS_WINDOW=True, PAGED=paged, BLOCK_H=bh, BLOCK_N=bn, HEAD_DIM=dim, PREC=prec,
                          UPCAST=False)
                signature = sig(_decode_kernel, dt, meta, ("sm_scale",), ce)
                specs.append(KernelSpec(f"prefix_attention_decode{'_paged' if paged else ''}_{dt}_d{dim}", _decode_kernel,
                                        signature, ce, warps, stages, divisible(signature)))
            ce = dict(HAS_DLSE=True, HEAD_DIM=dim, BLOCK=DELTA_BLOCK)
            signature = sig(_delta_kernel, dt, meta, (), ce)
            specs.append(KernelSpec(f"prefix_attention_delta_{dt}_d{dim}", _delta_kernel, signature, ce, 4, 1,
                                    divisible(signature)))
            ce = dict(HAS_SINKS=True, BLOCK_S=64, HEAD_DIM=dim)
            signature = sig(_decode_combine_kernel, dt, meta, (), ce)
            specs.append(KernelSpec(f"prefix_attention_combine_{dt}_d{dim}", _decode_combine_kernel, signature, ce, 4, 1,
                                    divisible(signature)))
    return specs


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile) with autograd: the triton backend
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("mptkern::prefix_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, prefix_ids: torch.Tensor | None,
    prefix_lens: torch.Tensor | None, sinks: torch.Tensor | None, softmax_scale: float, window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (N, Hq, D), lse (N, Hq) fp32); ``window`` 0 means none."""
    _check_values(q, cu_seqlens, prefix_k, prefix_ids, prefix_lens)
    return _fwd_triton(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, softmax_scale, window)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, softmax_scale, window):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("mptkern::prefix_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None, prefix_ids: torch.Tensor | None, prefix_lens: torch.Tensor | None,
    sinks: torch.Tensor | None, softmax_scale: float, window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v, dsinks); the last three are empty when their input is None."""
    grads = _bwd_triton(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens,
                        sinks, softmax_scale, window)
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks,
      softmax_scale, window):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else q.new_empty(0)  # noqa: E731
    return like(q), like(k), like(v), like(prefix_k), like(prefix_v), like(sinks)


def _setup_context(ctx, inputs, output):
    q, k, v, cu, pk, pv, ids, lens, sinks, scale, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cu, pk, pv, ids, lens, sinks, out, lse)
    ctx.scale, ctx.window = scale, window


def _backward(ctx, grad_out, grad_lse):
    q, k, v, cu, pk, pv, ids, lens, sinks, out, lse = ctx.saved_tensors
    dq, dk, dv, dpk, dpv, ds = torch.ops.mptkern.prefix_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, cu, pk, pv, ids, lens, sinks, ctx.scale, ctx.window
    )
    opt = lambda g, t: g if t is not None else None  # noqa: E731
    return dq, dk, dv, None, opt(dpk, pk), opt(dpv, pv), None, None, opt(ds, sinks), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mptkern::prefix_attention_decode", mutates_args=())
def _decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
    prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, prefix_ids: torch.Tensor | None,
    prefix_lens: torch.Tensor | None, sinks: torch.Tensor | None, softmax_scale: float, window: int,
    block_tables: torch.Tensor | None, prefix_block_tables: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, D), lse (B, Hq) fp32); ``window`` 0 means none; ``block_tables`` None: dense slabs."""
    return _decode_triton(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks,
                          softmax_scale, window, block_tables, prefix_block_tables)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, softmax_scale, window,
      block_tables, prefix_block_tables):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _pick_backend(backend: str, q: torch.Tensor) -> str:
    """resolve(), then: the kernels cover fp32/bf16/fp16 and head dims 16..128; ``auto`` (or the
    environment) falls back to torch outside that, an explicit ``backend="triton"`` raises."""
    chosen = backends.resolve(backend, q.device, SUPPORTED_BACKENDS, "prefix_attention")
    if chosen == "triton":
        why = triton_unsupported(q)
        if why:
            if backend == "triton":
                raise ValueError(why)
            chosen = "torch"
    return chosen


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    prefix_ids: torch.Tensor | None = None,
    *,
    prefix_lens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Varlen causal attention where each sequence also sees a whole parent prefix.

    Args:
        q: ``(N, Hq, D)`` fp32/bf16/fp16, B sequences packed back to back.
        k, v: ``(N, Hkv, D)``, same dtype; GQA when ``Hq`` is a multiple of ``Hkv``.
        cu_seqlens: ``(B+1,)`` int32, sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``.
        prefix_k, prefix_v: ``(P, Lp, Hkv, D)`` prefix keys/values (e.g. one per task prompt), read
            in place (views with any row/head strides are fine, e.g. rows of ``k`` itself).
        prefix_ids: ``(B,)`` integer, the prefix of each sequence, -1 for none.
        prefix_lens: ``(P,)`` integer valid length of each prefix (default ``Lp``).
        softmax_scale: default ``D ** -0.5``.
        window: keys at positions ``> pos - window`` only (positions counted from the prefix start).
        sinks: ``(Hq,)`` one logit per head added to the softmax denominator, no value (gpt-oss).
        return_lse: also return the fp32 natural-log LSE ``(N, Hq)`` (sinks included).
        backend: ``"auto" | "torch" | "triton"``; auto is triton on CUDA (head dims 16..128).

    Returns ``(N, Hq, D)`` in q's dtype (and the LSE). Differentiable w.r.t. q, k, v, prefix_k,
    prefix_v and sinks (and through the LSE). On the triton backend gradients are deterministic:
    two runs give bit-identical results.

    Example::

        q, k, v = torch.randn(12, 8, 64), torch.randn(12, 2, 64), torch.randn(12, 2, 64)
        pk, pv = torch.randn(3, 100, 2, 64), torch.randn(3, 100, 2, 64)   # 3 task prompts
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)                   # 2 sequences
        out = prefix_attention(q, k, v, cu, pk, pv, torch.tensor([2, 0]))  # (12, 8, 64)
    """
    backend = _pick_backend(backend, q) if q.dim() == 3 else "torch"
    # the triton path checks values inside its op (no host sync for torch.compile to trace)
    _validate(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks, values=backend == "torch")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "triton":
        ids = prefix_ids.to(torch.int32) if prefix_ids is not None else None
        lens = prefix_lens.to(torch.int32) if prefix_lens is not None else None
        out, lse = torch.ops.mptkern.prefix_attention_fwd(
            q, k, v, cu_seqlens.to(torch.int32), prefix_k, prefix_v, ids, lens, sinks, float(scale), int(window or 0)
        )
        return (out, lse) if return_lse else out
    out, lse = _prefix_attention_torch(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, scale, window, sinks)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _decode_part(qh, k, v, hidden):
    """Scaled queries ``qh`` (B, Hkv, G, D) against each sequence's keys ``k``, ``v`` (B, m, Hkv, D)
    where ``hidden`` (B, m) is False: out (B, Hkv, G, D), lse (B, Hkv, G) in qh's dtype, NaN on the
    sequences that see none of the m keys."""
    B, hkv, g, dim = qh.shape
    m = k.shape[1]
    scores = torch.matmul(qh, k.transpose(1, 2).to(qh.dtype).transpose(-1, -2))  # (B, Hkv, G, m)
    scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
    out, lse = _softmax_attend(scores.view(B * hkv, g, m), v.transpose(1, 2).to(qh.dtype).reshape(B * hkv, m, dim))
    return out.view(B, hkv, g, dim), lse.view(B, hkv, g)


def _merge_partials(out, lse, out_pre, lse_pre):
    """Merge a second partial softmax (out_pre, lse_pre; NaN LSE where it saw no key) into the first by
    their LSEs."""
    seen = ~torch.isnan(lse_pre)
    l_new = torch.where(seen, torch.logaddexp(lse, lse_pre), lse)
    w_pre = torch.where(seen, torch.exp(lse_pre - l_new), 0.0)[..., None]
    return out * torch.exp(lse - l_new)[..., None] + torch.where(seen[..., None], out_pre * w_pre, 0.0), l_new


def _flat_rows(tables, lens, block_size):
    """Flat pool rows (``block * block_size + offset``) of every row a table addresses, in order,
    ``(R, max_blocks * block_size)`` long, and the mask of the rows at or past ``lens`` (R,), which
    point at row 0 (entries past ``ceil(lens / block_size)`` are not read)."""
    pos = torch.arange(tables.shape[1] * block_size, device=tables.device)
    past = pos[None] >= lens[:, None]
    rows = tables.long().repeat_interleave(block_size, 1) * block_size + pos % block_size
    return rows.masked_fill(past, 0), past


@dataclasses.dataclass(frozen=True, eq=False)
class _PagedTorchLayout:
    """What the torch path of a paged decode step reads, made once per plan: the flat pool rows of
    each sequence's own keys (``own``, ``own_past``: (B, S)) and of each prefix's keys (``pre``,
    ``pre_past``: (P, Lp)); the queries stacked per prefix, ``n`` slots per prefix (``q_index``:
    (P * n,) sequence of each slot, padding slots repeat sequence 0), ``slot`` (B,): each sequence's
    slot, ``P * n`` for a sequence without a prefix; ``slot_lens``/``slot_plens`` (P * n,): the cache
    and prefix length of each slot (for windows). ``pre`` is None without prefixes."""

    own: torch.Tensor
    own_past: torch.Tensor
    lens: torch.Tensor
    pre: torch.Tensor | None = None
    pre_past: torch.Tensor | None = None
    n: int = 0
    q_index: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    slot_lens: torch.Tensor | None = None
    slot_plens: torch.Tensor | None = None

    @staticmethod
    def build(tables, lens, block_size, prefix_tables, prefix_lens, host_prefix):
        own, own_past = _flat_rows(tables, lens, block_size)
        if host_prefix is None:
            return _PagedTorchLayout(own, own_past, lens)
        pids, plens = host_prefix
        groups = [[] for _ in plens]
        for b, p in enumerate(pids):
            if p >= 0 and plens[p] > 0:
                groups[p].append(b)
        n = max(map(len, groups), default=0)
        if n == 0:
            return _PagedTorchLayout(own, own_past, lens)
        P, dev = len(plens), lens.device
        q_index = [b for members in groups for b in members + [0] * (n - len(members))]
        slot = [P * n] * len(pids)
        for p, members in enumerate(groups):
            for j, b in enumerate(members):
                slot[b] = p * n + j
        pre, pre_past = _flat_rows(prefix_tables, prefix_lens, block_size)
        q_index = torch.tensor(q_index, device=dev)
        return _PagedTorchLayout(own, own_past, lens, pre, pre_past, n, q_index, torch.tensor(slot, device=dev),
                                 lens[q_index], prefix_lens.repeat_interleave(n))


def _decode_torch_paged(q, k_pool, v_pool, prefix_k, prefix_v, plan, scale, window, sinks):
    """Paged cascade with no Python loop and no device read: each sequence's newest token attends to
    its own keys, gathered through its table, in one batched matmul; each prefix's keys are gathered
    once and attended by the queries of every sequence sharing it, stacked (P, n slots) in one more
    batched matmul; the two partial softmaxes and the sinks merge by their LSEs. V rows past a
    length are zeroed, so whatever the pool holds there (NaN in never-written memory included)
    cannot reach the output."""
    L = plan.torch_layout
    B, hq, dim = q.shape
    hkv = k_pool.shape[2]
    g = hq // hkv
    acc = _acc(q.dtype)
    qh = q.reshape(B, hkv, g, dim).to(acc) * scale

    def gather(pool_k, pool_v, rows, past):
        R, m = rows.shape
        k = pool_k.flatten(0, 1).index_select(0, rows.view(-1)).view(R, m, hkv, dim)
        v = pool_v.flatten(0, 1).index_select(0, rows.view(-1)).view(R, m, hkv, dim)
        return k.permute(0, 2, 3, 1).to(acc), v.masked_fill(past[:, :, None, None], 0.0).transpose(1, 2).to(acc)

    k, v = gather(k_pool, v_pool, L.own, L.own_past)  # (B, Hkv, D, S), (B, Hkv, S, D)
    S = L.own.shape[1]
    hidden = L.own_past
    if window is not None:
        hidden = hidden | (torch.arange(S, device=q.device)[None] <= L.lens[:, None] - 1 - window)
    scores = torch.matmul(qh, k).masked_fill_(hidden[:, None, None, :], float("-inf"))  # (B, Hkv, G, S)
    out, lse = _softmax_attend(scores.view(B * hkv, g, S), v.reshape(B * hkv, S, dim))
    out, lse = out.view(B, hkv, g, dim), lse.view(B, hkv, g)  # lse finite: the newest token is visible
    parts = [(out, lse)]
    if L.pre is not None:
        P, lp = L.pre.shape
        n = L.n
        pk, pv = gather(prefix_k, prefix_v, L.pre, L.pre_past)  # (P, Hkv, D, Lp), (P, Hkv, Lp, D)
        qg = qh.index_select(0, L.q_index).view(P, n, hkv, g, dim).transpose(1, 2).reshape(P, hkv, n * g, dim)
        sp = torch.matmul(qg, pk).view(P, hkv, n, g, lp)
        hidden = L.pre_past[:, None, None, None, :]
        if window is not None:  # prefix key i is visible iff i > lp + cache_len - 1 - window
            hide = torch.arange(lp, device=q.device)[None] <= (L.slot_plens + L.slot_lens - 1 - window)[:, None]
            hidden = hidden | hide.view(P, 1, n, 1, lp)
        sp.masked_fill_(hidden, float("-inf"))
        op, lse_p = _softmax_attend(sp.view(P * hkv, n * g, lp), pv.reshape(P * hkv, lp, dim))
        op = op.view(P, hkv, n, g, dim).transpose(1, 2).reshape(P * n, hkv, g, dim)
        lse_p = lse_p.view(P, hkv, n, g).transpose(1, 2).reshape(P * n, hkv, g)
        # one more slot for the sequences without a prefix (and NaN, a window hiding the whole prefix): no keys
        op = torch.cat([op, op.new_zeros(1, hkv, g, dim)]).nan_to_num_(0.0)
        lse_p = torch.cat([lse_p, lse_p.new_full((1, hkv, g), float("-inf"))]).nan_to_num_(float("-inf"))
        parts.append((op.index_select(0, L.slot), lse_p.index_select(0, L.slot)))
    if len(parts) == 1 and sinks is None:
        return out.reshape(B, hq, dim).to(q.dtype), lse.reshape(B, hq).float()
    peak = torch.stack([p[1] for p in parts]).amax(0)
    if sinks is not None:
        sink = sinks.to(acc).view(1, hkv, g)
        peak = torch.maximum(peak, sink)
    weights = [torch.exp(p[1] - peak) for p in parts]
    denom = sum(weights)
    if sinks is not None:
        denom = denom + torch.exp(sink - peak)
    out = sum(o * w[..., None] for (o, _), w in zip(parts, weights)) / denom[..., None]
    return out.reshape(B, hq, dim).to(q.dtype), (peak + denom.log()).reshape(B, hq).float()


def _decode_torch(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, scale, window, sinks):
    """Cascade form over dense slabs (paged: :func:`_decode_torch_paged`). Every sequence's newest
    token attends to its own cache in one batched matmul over all sequences; the prefix part is
    computed per prefix, the queries of every sequence sharing it stacked into one matrix, so a
    prefix's keys are read once per call; the two partial softmaxes merge through their LSEs (then
    the sinks). The query of sequence b sits at position L_b + cache_lens[b] - 1; its own key j at
    L_b + j. One host sync (``lens.max()``) trims the slabs to what any sequence holds, and
    ``prefix_ids``/``prefix_lens`` are read on the host; a cache stored head-major, ``(B, Hkv, S,
    D)`` passed as its ``transpose(1, 2)`` view, is read in place."""
    B, hq, dim = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    acc, dev = _acc(q.dtype), q.device
    lens = cache_lens.long()
    qh = q.reshape(B, hkv, g, dim).to(acc) * scale
    used = int(lens.max())  # one host sync; trims the slab to what any sequence holds
    kc, vc = k_cache[:, :used], v_cache[:, :used]
    blocked = torch.arange(used, device=dev)[None] >= lens[:, None]
    if prefix_k is not None:
        pids = prefix_ids.tolist()
        plens = prefix_lens.tolist() if prefix_lens is not None else [prefix_k.shape[1]] * prefix_k.shape[0]
    else:
        pids, plens = [], []
    if window is not None:
        blocked = blocked | (torch.arange(kc.shape[1], device=dev)[None] <= lens[:, None] - 1 - window)
    out, lse = _decode_part(qh, kc, vc, blocked)  # lse finite: the newest token is always visible
    order = sorted((b for b in range(len(pids)) if pids[b] >= 0 and plens[pids[b]] > 0), key=pids.__getitem__)
    if order:
        rows = torch.tensor(order, device=dev)
        q_grp, lens_grp = qh[rows], lens[rows]
        lse_pre = torch.empty(len(order), hkv, g, dtype=acc, device=dev)
        out_pre = torch.empty(len(order), hkv, g, dim, dtype=acc, device=dev)
        start = 0
        while start < len(order):
            pid = pids[order[start]]
            end = start + sum(1 for b in order[start:] if pids[b] == pid)  # the sequences sharing this prefix
            n, lp = end - start, plens[pid]
            pk, pv = prefix_k[pid, :lp], prefix_v[pid, :lp]  # (lp, Hkv, D) each
            qg = q_grp[start:end].permute(1, 0, 2, 3).reshape(hkv, n * g, dim)  # (Hkv, n*G, D)
            sp = torch.bmm(qg, pk.transpose(0, 1).to(acc).transpose(-1, -2))  # (Hkv, n*G, lp)
            if window is not None:  # prefix key i is visible iff i > lp + cache_len - 1 - window
                hidden = torch.arange(lp, device=dev)[None] <= (lp + lens_grp[start:end] - 1 - window)[:, None]
                sp.masked_fill_(hidden.repeat_interleave(g, 0), float("-inf"))
            og, lg = _softmax_attend(sp, pv.transpose(0, 1).to(acc))
            lse_pre[start:end] = lg.view(hkv, n, g).transpose(0, 1)
            out_pre[start:end] = og.view(hkv, n, g, dim).transpose(0, 1)
            start = end
        out[rows], lse[rows] = _merge_partials(out[rows], lse[rows], out_pre, lse_pre)
    if sinks is not None:
        l_new = torch.logaddexp(lse, sinks.to(acc).view(hkv, g))
        out = out * torch.exp(lse - l_new)[..., None]
        lse = l_new
    return out.reshape(B, hq, dim).to(q.dtype), lse.reshape(B, hq).float()


def _validate_table(name, table, rows, device, what):
    if table.dtype not in (torch.int32, torch.int64) or table.dim() != 2 or table.shape[0] != rows or table.device != device:
        raise ValueError(f"{name} must be an int32 (or int64) tensor of shape ({what}={rows}, max_blocks) on {device}, "
                         f"got {table.dtype} {tuple(table.shape)} on {table.device}")


def _validate_decode(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks,
                     block_tables=None, prefix_block_tables=None):
    """Shapes, dtypes and devices of a decode step (dense or paged), then the values, for CPU tensors
    only: reading a CUDA tensor's values is a host sync, which a decode step does not pay, so on the
    GPU (and under torch.compile) out-of-range values are not caught here. Raises ValueError."""
    def fail(msg):
        raise ValueError(msg)

    if q.dim() != 3 or q.shape[0] == 0:
        fail(f"q must have shape (B, Hq, D) with B >= 1, got {tuple(q.shape)}")
    B, hq, dim = q.shape
    paged = block_tables is not None
    if not paged:
        if prefix_block_tables is not None:
            fail("prefix_block_tables given without block_tables: a paged prefix goes with a paged cache")
        if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != dim or v_cache.shape != k_cache.shape:
            fail(f"k_cache and v_cache must have shape (B={B}, S, Hkv, D={dim}), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    else:
        if k_cache.dim() != 4 or 0 in k_cache.shape[:2] or k_cache.shape[3] != dim or v_cache.shape != k_cache.shape:
            fail("with block_tables, k_cache and v_cache must be pools of shape (num_blocks >= 1, block_size >= 1, Hkv, "
                 f"D={dim}), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        _validate_table("block_tables", block_tables, B, q.device, "B")
        if block_tables.shape[1] == 0:
            fail("block_tables must have at least one column (every sequence holds at least its newest token)")
    hkv = k_cache.shape[2]
    if hkv == 0 or hq % hkv:
        fail(f"q's heads ({hq}) must be a multiple of the cache's heads ({hkv})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype or t.device != q.device:
            fail(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if cache_lens.shape != (B,) or cache_lens.dtype.is_floating_point or cache_lens.device != q.device:
        fail(f"cache_lens must be an integer tensor of shape (B={B},) on {q.device}, got {cache_lens.dtype} {tuple(cache_lens.shape)}")
    if paged and prefix_k is not None:
        if prefix_block_tables is None:
            fail("with block_tables, the prefix must be paged too: pass prefix_block_tables (and prefix_lens) "
                 "with prefix_k/prefix_v as block pools, not a dense (P, Lp, Hkv, D) prefix")
        _validate_table("prefix_block_tables", prefix_block_tables, prefix_block_tables.shape[0], q.device, "P")
        if prefix_lens is None:
            fail("with prefix_block_tables, prefix_lens (P,) is required")
    elif prefix_block_tables is not None:
        fail("prefix_block_tables given without prefix_k, prefix_v and prefix_ids")
    _validate_prefix(q, B, hkv, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks,
                     prefix_block_tables if paged else None)
    if paged and prefix_k is not None and prefix_k.shape[1] != k_cache.shape[1]:
        fail(f"the prefix pools' block_size ({prefix_k.shape[1]}) must equal the cache pools' ({k_cache.shape[1]})")
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_decode_values(k_cache, cache_lens, prefix_k, prefix_ids, prefix_lens, block_tables, prefix_block_tables)


def _check_decode_values(k_cache, cache_lens, prefix_k, prefix_ids, prefix_lens, block_tables, prefix_block_tables):
    """The value checks of a decode step (host reads: CPU tensors only)."""
    lens = cache_lens.long()
    bs = k_cache.shape[1]
    cap, cap_name = (k_cache.shape[1], "S") if block_tables is None else (block_tables.shape[1] * bs, "max_blocks * block_size")
    lo, hi = (int(x) for x in torch.aminmax(lens))
    if lo < 1 or hi > cap:
        raise ValueError(f"cache_lens must lie in [1, {cap_name}={cap}], got values in [{lo}, {hi}]")
    if block_tables is None:
        _check_prefix_values(prefix_k, prefix_ids, prefix_lens)
        return
    _check_table_entries("block_tables", block_tables, lens, k_cache.shape[0], bs)
    if prefix_k is not None:
        P, max_pb = prefix_block_tables.shape
        _check_prefix_ranges(P, max_pb * bs, prefix_ids, prefix_lens, "max_prefix_blocks * block_size")
        _check_table_entries("prefix_block_tables", prefix_block_tables, prefix_lens.long(), prefix_k.shape[0], bs)


def _check_table_entries(name, table, lens, num_blocks, block_size):
    """Every entry a row uses (the first ceil(lens / block_size)) names a block of the pool."""
    in_use = torch.arange(table.shape[1])[None] * block_size < lens[:, None]
    bad = (in_use & ((table < 0) | (table >= num_blocks))).nonzero()
    if bad.numel():
        r, c = (int(x) for x in bad[0])
        raise ValueError(f"{name}[{r}, {c}] = {int(table[r, c])} is in use (row {r} holds {int(lens[r])} keys) but is "
                         f"not a block of the pool [0, {num_blocks})")


@dataclasses.dataclass(frozen=True, eq=False)
class PagedDecodePlan:
    """The layout of one paged decode step, checked and prepared once for every layer that reads it
    (an engine step runs the same plan through all its layers): the int32 tensors the kernels take,
    ``block_size`` and ``num_blocks`` of the pools they index, and for the torch path the pool
    coordinates of every key it reads and the queries grouped by prefix (``torch_layout``, built from
    host lists), so its layers never read the device. Made by :func:`plan_paged_decode`."""

    cache_lens: torch.Tensor
    block_tables: torch.Tensor
    prefix_ids: torch.Tensor | None
    prefix_lens: torch.Tensor | None
    prefix_block_tables: torch.Tensor | None
    block_size: int
    num_blocks: int
    torch_layout: "_PagedTorchLayout"

    @property
    def batch(self) -> int:
        return self.cache_lens.shape[0]


def plan_paged_decode(cache_lens, block_tables, *, block_size: int, num_blocks: int, prefix_ids=None,
                      prefix_lens=None, prefix_block_tables=None, device=None) -> PagedDecodePlan:
    """Check and prepare a paged decode layout once, for :func:`prefix_attention_decode` ``(plan=)``
    calls on pools of ``num_blocks`` blocks of ``block_size`` rows (the cache's and, if any, the
    prefix's pool). Arguments as in :func:`prefix_attention_decode` (the prefix ones go together),
    each a tensor or a host list (tables: lists of equal-length rows; lists are made into int32
    tensors on ``device``). Given as lists, ``prefix_ids`` and ``prefix_lens`` are kept on the host
    for the torch path; given as tensors they are read once here (a host sync on a GPU). Values are
    checked for CPU tensors only. Raises ValueError."""
    if block_size < 1 or num_blocks < 1:
        raise ValueError(f"block_size and num_blocks must be >= 1, got {block_size} and {num_blocks}")
    host = [x if isinstance(x, (list, tuple)) else None for x in (prefix_ids, prefix_lens)]
    as32 = lambda t: t if t is None or torch.is_tensor(t) else torch.tensor(t, dtype=torch.int32, device=device)  # noqa: E731
    cache_lens, block_tables, prefix_ids, prefix_lens, prefix_block_tables = (
        as32(t) for t in (cache_lens, block_tables, prefix_ids, prefix_lens, prefix_block_tables))
    if cache_lens.dim() != 1 or cache_lens.shape[0] == 0 or cache_lens.dtype.is_floating_point:
        raise ValueError(f"cache_lens must be a non-empty 1-D integer tensor, got {cache_lens.dtype} {tuple(cache_lens.shape)}")
    B, dev = cache_lens.shape[0], cache_lens.device
    _validate_table("block_tables", block_tables, B, dev, "B")
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables must have at least one column (every sequence holds at least its newest token)")
    given = [t is not None for t in (prefix_ids, prefix_lens, prefix_block_tables)]
    if any(given) and not all(given):
        raise ValueError("prefix_ids, prefix_lens and prefix_block_tables go together")
    if all(given):
        _validate_table("prefix_block_tables", prefix_block_tables, prefix_block_tables.shape[0], dev, "P")
        P = prefix_block_tables.shape[0]
        for name, t, n in (("prefix_ids", prefix_ids, B), ("prefix_lens", prefix_lens, P)):
            if t.shape != (n,) or t.dtype.is_floating_point or t.device != dev:
                raise ValueError(f"{name} must be an integer tensor of shape ({n},) on {dev}, got {t.dtype} {tuple(t.shape)}")
    lens = cache_lens.long()
    if dev.type == "cpu" and not torch.compiler.is_compiling():
        cap = block_tables.shape[1] * block_size
        lo, hi = (int(x) for x in torch.aminmax(lens))
        if lo < 1 or hi > cap:
            raise ValueError(f"cache_lens must lie in [1, max_blocks * block_size={cap}], got values in [{lo}, {hi}]")
        _check_table_entries("block_tables", block_tables, lens, num_blocks, block_size)
        if all(given):
            _check_prefix_ranges(P, prefix_block_tables.shape[1] * block_size, prefix_ids, prefix_lens,
                                 "max_prefix_blocks * block_size")
            _check_table_entries("prefix_block_tables", prefix_block_tables, prefix_lens.long(), num_blocks, block_size)
    host_prefix = None
    if all(given):
        host_prefix = tuple(list(h) if h is not None else t.tolist() for h, t in zip(host, (prefix_ids, prefix_lens)))
    to32 = lambda t: t.to(torch.int32) if t is not None else None  # noqa: E731
    layout = _PagedTorchLayout.build(block_tables, lens, block_size, prefix_block_tables,
                                     prefix_lens.long() if all(given) else None, host_prefix)
    return PagedDecodePlan(to32(cache_lens), to32(block_tables), to32(prefix_ids), to32(prefix_lens),
                           to32(prefix_block_tables), block_size, num_blocks, layout)


def _validate_planned(q, k_cache, v_cache, prefix_k, prefix_v, plan, window, sinks):
    """What a planned call still checks: shapes, dtypes and devices against the plan (no values)."""
    if not isinstance(plan, PagedDecodePlan):
        raise TypeError(f"plan must be a PagedDecodePlan (plan_paged_decode), got {type(plan).__name__}")
    if q.dim() != 3 or q.shape[0] != plan.batch or q.device != plan.cache_lens.device:
        raise ValueError(f"q must have shape (B={plan.batch}, Hq, D) on the plan's device {plan.cache_lens.device}, "
                         f"got {tuple(q.shape)} on {q.device}")
    want = (plan.num_blocks, plan.block_size)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t is None:
            continue
        if t.dim() != 4 or tuple(t.shape[:2]) != want or t.shape[2:] != k_cache.shape[2:] or t.shape[3] != q.shape[2]:
            raise ValueError(f"{name} must be a pool of shape (num_blocks={want[0]}, block_size={want[1]}, Hkv, "
                             f"D={q.shape[2]}) like k_cache, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if (prefix_k is None) != (prefix_v is None) or (prefix_k is None) != (plan.prefix_ids is None):
        raise ValueError("prefix_k and prefix_v go with a plan made with prefix_ids, prefix_lens and prefix_block_tables")
    hkv = k_cache.shape[2]
    if hkv == 0 or q.shape[1] % hkv:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of the cache's heads ({hkv})")
    _validate_prefix(q, plan.batch, hkv, None, None, None, None, window, sinks)


def prefix_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor | None = None,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    prefix_ids: torch.Tensor | None = None,
    *,
    prefix_lens: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    prefix_block_tables: torch.Tensor | None = None,
    plan: PagedDecodePlan | None = None,
    softmax_scale: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """One decode step: each sequence's newest token attends to its task prefix plus its own cache.

    Args:
        q: ``(B, Hq, D)`` fp32/bf16/fp16, the query of each sequence's newest token.
        k_cache, v_cache: each sequence's own tokens only, the newest already appended. Dense (no
            ``block_tables``): ``(B, S, Hkv, D)``, one slab per sequence (slot), rows
            ``0..cache_lens[b]-1`` valid. Paged: pools ``(num_blocks, block_size, Hkv, D)``; sequence
            b's key j is ``k_cache[block_tables[b, j // block_size], j % block_size]``.
        cache_lens: ``(B,)`` integer >= 1. The query sits at absolute position ``L_b + cache_lens[b] - 1``.
        prefix_k, prefix_v: the per-task prompt K/V, read in place; prefix_ids ``(B,)`` picks one per
            sequence (-1: none); prefix_lens ``(P,)`` (default ``Lp``; required when paged). Dense:
            ``(P, Lp, Hkv, D)``. Paged: pools ``(num_blocks', block_size, Hkv, D)`` with the cache's
            block_size (in practice the very same pools as k_cache/v_cache); prefix p's key i is
            ``prefix_k[prefix_block_tables[p, i // block_size], i % block_size]``.
        block_tables: ``(B, max_blocks)`` int32 (int64 accepted), the paged layout; entries past
            ``ceil(cache_lens[b] / block_size)`` are never read (-1 or anything).
        prefix_block_tables: ``(P, max_prefix_blocks)`` int32 (int64 accepted), the prefixes' tables;
            paged mode only, and required there when a prefix is given.
        softmax_scale, window, sinks: as in :func:`prefix_attention` (window in absolute positions).
        return_lse: also return the fp32 natural-log LSE ``(B, Hq)``.

    Returns ``(B, Hq, D)`` in q's dtype (and the LSE): exactly the last row of
    :func:`prefix_attention` over the same tokens, in either layout. Inference only (not
    differentiable). Every cache or pool may have any strides with a unit stride along D (e.g. a
    head-major ``(.., Hkv, S or block_size, D)`` store passed as its ``transpose(1, 2)`` view).

    Two layouts. Dense slabs suit a fixed, small number of slots with short caches (the prompt K/V
    is shared per task, so a slab holds only a request's input and generated tokens): no tables,
    plain strided row loads. Paged pools suit an engine that shares prefix blocks between requests
    and sizes one pool of blocks from a memory budget: a sequence holds only the blocks it fills,
    a prefix is a list of blocks that any number of requests point at, and the kernel looks up
    each key row's block in the table. In both, the triton launch takes only device tensors of
    host-known shape (split plan from capacities, no host sync). The torch path, dense, reads the
    longest cache length and (with a prefix) the prefix ids on the host, to group the sequences by
    prefix; paged, it makes no host sync: it gathers every sequence's keys, and its prefix's keys, through the
    tables in one batch (so a shared prefix is read once per sequence using it, not once per call).

    Shapes, dtypes and devices are checked always; values (``cache_lens`` in ``[1, S]`` or
    ``[1, max_blocks * block_size]``, ``prefix_ids`` in ``[-1, P)``, ``prefix_lens``, the table
    entries in use) only for CPU tensors, since reading CUDA values would sync with the host.

    Example::

        q = torch.randn(4, 8, 64); kc, vc = torch.randn(2, 4, 256, 2, 64).unbind(0)
        pk, pv = torch.randn(2, 3, 100, 2, 64).unbind(0)
        out = prefix_attention_decode(q, kc, vc, torch.tensor([5, 1, 256, 9]), pk, pv, torch.tensor([0, 2, -1, 0]))
        # paged: blocks of 16 rows in one pool, shared by the caches and the prefixes
        pool_k, pool_v = torch.randn(2, 64, 16, 2, 64).unbind(0)
        tables = torch.tensor([[3, -1], [7, 8], [9, -1], [10, 11]], dtype=torch.int32)  # 4 sequences
        ptables = torch.tensor([[0, 1, 2]], dtype=torch.int32)  # one prefix of up to 48 rows
        out = prefix_attention_decode(q, pool_k, pool_v, torch.tensor([5, 17, 16, 32]), pool_k, pool_v,
                                      torch.tensor([0, 0, -1, 0]), prefix_lens=torch.tensor([40]),
                                      block_tables=tables, prefix_block_tables=ptables)
    """
    if plan is not None:
        if any(t is not None for t in (cache_lens, prefix_ids, prefix_lens, block_tables, prefix_block_tables)):
            raise ValueError("with plan=, cache_lens, prefix_ids, prefix_lens and the block tables come from the plan")
        _validate_planned(q, k_cache, v_cache, prefix_k, prefix_v, plan, window, sinks)
    elif cache_lens is None:
        raise ValueError("give cache_lens (or a plan)")
    else:
        _validate_decode(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks,
                         block_tables, prefix_block_tables)
        if block_tables is not None:  # planned here, for this call alone
            plan = plan_paged_decode(cache_lens, block_tables, block_size=k_cache.shape[1], num_blocks=k_cache.shape[0],
                                     prefix_ids=prefix_ids if prefix_k is not None else None,
                                     prefix_lens=prefix_lens if prefix_k is not None else None,
                                     prefix_block_tables=prefix_block_tables if prefix_k is not None else None)
    if plan is not None:
        cache_lens, prefix_ids, prefix_lens = plan.cache_lens, plan.prefix_ids, plan.prefix_lens
        block_tables, prefix_block_tables = plan.block_tables, plan.prefix_block_tables
    backend = _pick_backend(backend, q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "triton":
        as32 = lambda t: t.to(torch.int32) if t is not None else None  # noqa: E731
        out, lse = torch.ops.mptkern.prefix_attention_decode(
            q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, as32(prefix_ids), as32(prefix_lens), sinks,
            float(scale), int(window or 0), as32(block_tables), as32(prefix_block_tables),
        )
    else:
        with torch.no_grad():
            if plan is not None:
                out, lse = _decode_torch_paged(q, k_cache, v_cache, prefix_k, prefix_v, plan, scale, window, sinks)
            else:
                out, lse = _decode_torch(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens,
                                         scale, window, sinks)
    return (out, lse) if return_lse else out
