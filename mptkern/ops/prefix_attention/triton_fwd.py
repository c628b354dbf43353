"""Triton forward of prefix attention: one program per (query block of a sequence, query head). Its
key loop walks the sequence's prefix tiles (through ``prefix_ids``, in place) and then its own
tiles, online softmax in the exp2 domain with the sink as the initial running max. Loop bounds skip
every tile the window or causality empties; only tiles on a mask edge compute a mask."""

from __future__ import annotations

import torch

from mptkern import backends
from mptkern.ops._common import tl, triton
from mptkern.ops.prefix_attention.tiles import _config, _precision, _prefix_args, _rowmajor

if triton is not None:
    from mptkern.ops.prefix_attention.tiles import _mm, _mma, _own_tile_ranges, _query_block, _tile_ranges, _visible

if triton is not None:

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
        start, n, pid, L, offs_m, rmask, qp_lo, qp_hi, lo, full_lo = _query_block(
            SCHED, CU, PIDS, PLENS, blk, window, HAS_PREFIX, HAS_WINDOW, BLOCK_M)
        scale2 = sm_scale * 1.4426950408889634
        offs_d = tl.arange(0, HEAD_DIM)
        # 64-bit scalar bases, 32-bit offsets within a sequence (the host checks they fit)
        q = tl.load(Q + start * sq_t + h * sq_h + (offs_m[:, None] * sq_t + offs_d[None, :]), mask=rmask[:, None], other=0.0)
        qpos = L + offs_m
        if HAS_SINKS:
            # the sink is a key with no value: start the running max and sum at it
            m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
            l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
        else:
            # finite start: a row that a tile masks entirely gets p = 0 there, not NaN
            m_i = tl.zeros([BLOCK_M], tl.float32) - 1.0e30
            l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
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
        t0, e1, a, bb, e3 = _own_tile_ranges(lo, full_lo, qp_lo, qp_hi, L, n, BLOCK_N)
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


def _fwd_triton(q, k, v, cu, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, scale, window, sched):
    """The plan's int32 ``cu`` (B+1,), ``prefix_ids`` (B,), ``prefix_lens`` (P,) and query schedule
    ``sched`` (:meth:`PrefixAttentionPlan.query_schedule` for this config's BLOCK_M): no host work."""
    q, k, v, prefix_k, prefix_v = (_rowmajor(t) for t in (q, k, v, prefix_k, prefix_v))
    N, hq, dim = q.shape
    hkv = k.shape[1]
    bm, bn, warps, stages = _config("fwd", dim, q.dtype)
    pk, pv, ids, plen_t, has_prefix = _prefix_args(q, prefix_k, prefix_v, prefix_ids, prefix_lens, k, v)
    out = torch.empty(N, hq, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, hq, dtype=torch.float32, device=q.device)
    _fwd_kernel[(sched.shape[0], hq)](
        q, k, v, pk, pv, out, lse, sinks if sinks is not None else lse, cu, ids, plen_t, sched,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        pk.stride(0), pk.stride(1), pk.stride(2), pv.stride(0), pv.stride(1), pv.stride(2), out.stride(0), out.stride(1),
        hq, scale, window, hq // hkv,
        HAS_PREFIX=has_prefix, HAS_WINDOW=window > 0, HAS_SINKS=sinks is not None,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=dim, PREC=_precision(q.dtype), UPCAST=backends.triton_interpret(), num_warps=warps, num_stages=stages,
    )
    return out, lse
