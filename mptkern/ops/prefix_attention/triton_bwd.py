"""Triton backward of prefix attention. ``Delta = rowsum(O * dO) - dLSE``; dQ per query block (the
forward's schedule); dK/dV per key block and KV head, looping over the query blocks (and the GQA
group's heads) that see it. A prefix key block loops over every sequence using that prefix in a
fixed order (sorted by prefix id on the host, :meth:`PrefixAttentionPlan.key_schedule`), so the
prefix gradient is reduced without atomics and two runs give bit-identical gradients.
``dsinks = -sum_q exp(sink - lse_q) * Delta_q``."""

from __future__ import annotations

import torch

from mptkern import backends
from mptkern.ops._common import tl, triton
from mptkern.ops.prefix_attention.tiles import DELTA_BLOCK, _config, _precision, _prefix_args, _rowmajor

if triton is not None:
    from mptkern.ops.prefix_attention.tiles import (_mm, _mma, _own_tile_ranges, _query_block, _seq_info, _tile_ranges,
                                                   _visible)

if triton is not None:

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
        start, n, pid, L, offs_m, rmask, qp_lo, qp_hi, lo, full_lo = _query_block(
            SCHED, CU, PIDS, PLENS, blk, window, HAS_PREFIX, HAS_WINDOW, BLOCK_M)
        scale2 = sm_scale * 1.4426950408889634
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + start * sq_t + h * sq_h + (offs_m[:, None] * sq_t + offs_d[None, :]), mask=rmask[:, None], other=0.0)
        do = tl.load(DO + start * sdo_t + h * sdo_h + (offs_m[:, None] * sdo_t + offs_d[None, :]), mask=rmask[:, None], other=0.0)
        stat = start * n_heads + h
        lse2 = tl.load(LSE + stat + offs_m * n_heads, mask=rmask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + stat + offs_m * n_heads, mask=rmask, other=0.0)
        qpos = L + offs_m
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
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
        t0, e1, a, bb, e3 = _own_tile_ranges(lo, full_lo, qp_lo, qp_hi, L, n, BLOCK_N)
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


def _bwd_triton(dout, dlse, q, k, v, out, lse, cu, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, scale, window,
                sched, items, order):
    """The plan's int32 layout tensors as in :func:`_fwd_triton`; ``sched`` the query schedule for
    the dQ config's BLOCK_M, ``items``/``order`` the key schedule for the dK/dV config's BLOCK_N."""
    q, k, v, prefix_k, prefix_v = (_rowmajor(t) for t in (q, k, v, prefix_k, prefix_v))
    dout, out = dout.contiguous(), out.contiguous()
    N, hq, dim = q.shape
    hkv = k.shape[1]
    pk, pv, ids, plen_t, has_prefix = _prefix_args(q, prefix_k, prefix_v, prefix_ids, prefix_lens, k, v)
    prec = _precision(q.dtype)

    delta = torch.empty(N, hq, dtype=torch.float32, device=q.device)
    R = N * hq
    _delta_kernel[(triton.cdiv(R, DELTA_BLOCK),)](
        out, dout, dlse.contiguous() if dlse is not None else delta, delta, R,
        HEAD_DIM=dim, BLOCK=DELTA_BLOCK, HAS_DLSE=dlse is not None,
    )

    bm, bn, warps, stages = _config("dq", dim, q.dtype)
    dq = torch.empty(N, hq, dim, dtype=q.dtype, device=q.device)
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              pk.stride(0), pk.stride(1), pk.stride(2), pv.stride(0), pv.stride(1), pv.stride(2),
              dout.stride(0), dout.stride(1))
    _dq_kernel[(sched.shape[0], hq)](
        q, k, v, pk, pv, dout, lse, delta, dq, cu, ids, plen_t, sched, *common, dq.stride(0), dq.stride(1),
        hq, scale, window, hq // hkv,
        HAS_PREFIX=has_prefix, HAS_WINDOW=window > 0, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=dim,
        PREC=_precision(q.dtype, "dq", dim), UPCAST=backends.triton_interpret(), num_warps=warps, num_stages=stages,
    )

    bm, bn, warps, stages = _config("dkdv", dim, q.dtype)
    dk = torch.empty(N, hkv, dim, dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    if has_prefix:  # zeros: rows past a prefix's length and prefixes nobody uses get no program
        dpk = torch.zeros(prefix_k.shape, dtype=q.dtype, device=q.device)
        dpv = torch.zeros_like(dpk)
    else:
        dpk, dpv = dk.unsqueeze(0), dv.unsqueeze(0)
    _dkdv_kernel[(items.shape[0], hkv)](
        q, k, v, pk, pv, dout, lse, delta, dk, dv, dpk, dpv, cu, ids, plen_t, items, order, *common,
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

