"""Decode: each sequence's newest token against its task prefix plus its own cache, dense slabs or
paged pools read through block tables.

* triton: split-K over the virtual key range [prefix | cache] with one program per (sequence, KV
  head, split) holding the whole GQA group, then a combine kernel that merges the splits by their
  LSE and adds the sink once. The launch takes only device tensors of host-known shape (split plan
  from capacities, no host sync).
* torch: the cascade form. Each sequence's own keys in one batched matmul over all sequences; each
  prefix's keys read once and attended by the stacked queries of every sequence sharing it; the
  partial softmaxes merged by their LSEs, then the sinks. Paged, from the layout its plan built
  (:class:`mptkern.ops.prefix_attention.plan.PagedDecodePlan`), with no device read.
"""

from __future__ import annotations

import torch

from mptkern import backends
from mptkern.ops._common import tl, triton
from mptkern.ops.prefix_attention.reference import _acc, _softcap_, _softmax_attend
from mptkern.ops.prefix_attention.tiles import _check_offsets, _config, _precision, _prefix_args, _rowmajor

if triton is not None:
    from mptkern.ops.prefix_attention.tiles import _mm, _mma

DECODE_TARGET_PROGRAMS = 264  # split-K: aim for about two waves of programs on an H100 (132 SMs)

if triton is not None:

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


def _decode_part(qh, k, v, hidden, softcap=None):
    """Scaled queries ``qh`` (B, Hkv, G, D) against each sequence's keys ``k``, ``v`` (B, m, Hkv, D)
    where ``hidden`` (B, m) is False: out (B, Hkv, G, D), lse (B, Hkv, G) in qh's dtype, NaN on the
    sequences that see none of the m keys."""
    B, hkv, g, dim = qh.shape
    m = k.shape[1]
    scores = _softcap_(torch.matmul(qh, k.transpose(1, 2).to(qh.dtype).transpose(-1, -2)), softcap)  # (B, Hkv, G, m)
    scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
    out, lse = _softmax_attend(scores.view(B * hkv, g, m), v.transpose(1, 2).to(qh.dtype).reshape(B * hkv, m, dim))
    return out.view(B, hkv, g, dim), lse.view(B, hkv, g)


def _merge(parts, sinks, hkv, g):
    """Partial softmaxes over disjoint key sets, ``(out (B, Hkv, G, D), lse (B, Hkv, G))`` each
    (out 0 and lse -inf, or any value below every real LSE, where a part saw no key), and the sinks
    ``(Hq,)`` (logits with no value) merged by their LSEs -> out, lse of the whole softmax."""
    peak = torch.stack([lse for _, lse in parts]).amax(0)
    if sinks is not None:
        sink = sinks.to(peak.dtype).view(1, hkv, g)
        peak = torch.maximum(peak, sink)
    weights = [torch.exp(lse - peak) for _, lse in parts]
    denom = sum(weights)
    if sinks is not None:
        denom = denom + torch.exp(sink - peak)
    out = sum(o * w[..., None] for (o, _), w in zip(parts, weights)) / denom[..., None]
    return out, peak + denom.log()


def _same_view(a, b):
    """True when ``a`` and ``b`` view the same memory the same way (the engine passes its pools as both
    the caches and the prefixes)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _decode_torch_paged(q, k_pool, v_pool, prefix_k, prefix_v, plan, scale, window, sinks, softcap=None):
    """Paged cascade with no Python loop and no device read: each sequence's newest token attends to
    its own keys, gathered through its table, in one batched matmul; each prefix's keys are gathered
    once and attended by the queries of every sequence sharing it, stacked (P, n slots) in one more
    batched matmul; the two partial softmaxes and the sinks merge by their LSEs. V rows past a
    length are zeroed, so whatever the pool holds there (NaN in never-written memory included)
    cannot reach the output."""
    one_pool = prefix_k is not None and all(_same_view(a, b) for a, b in ((prefix_k, k_pool), (prefix_v, v_pool)))
    L = plan.torch_layout(one_pool)
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
        hidden = hidden | (torch.arange(S, device=q.device)[None] <= L.own_lens[:, None] - 1 - window)
    scores = _softcap_(torch.matmul(qh, k), softcap).masked_fill_(hidden[:, None, None, :], float("-inf"))  # (B, Hkv, G, S)
    out, lse = _softmax_attend(scores.view(B * hkv, g, S), v.reshape(B * hkv, S, dim))
    out, lse = out.view(B, hkv, g, dim), lse.view(B, hkv, g)  # lse finite: the newest token is visible
    parts = [(out, lse)]
    if L.pre is not None:
        P, lp = L.pre.shape
        n = L.n
        pk, pv = gather(prefix_k, prefix_v, L.pre, L.pre_past)  # (P, Hkv, D, Lp), (P, Hkv, Lp, D)
        qg = qh.index_select(0, L.q_index).view(P, n, hkv, g, dim).transpose(1, 2).reshape(P, hkv, n * g, dim)
        sp = _softcap_(torch.matmul(qg, pk), softcap).view(P, hkv, n, g, lp)
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
    if len(parts) > 1 or sinks is not None:
        out, lse = _merge(parts, sinks, hkv, g)
    return out.reshape(B, hq, dim).to(q.dtype), lse.reshape(B, hq).float()


def _decode_torch(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, scale, window, sinks,
                  softcap=None):
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
    out, lse = _decode_part(qh, kc, vc, blocked, softcap)  # lse finite: the newest token is always visible
    parts = [(out, lse)]
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
            sp = _softcap_(torch.bmm(qg, pk.transpose(0, 1).to(acc).transpose(-1, -2)), softcap)  # (Hkv, n*G, lp)
            if window is not None:  # prefix key i is visible iff i > lp + cache_len - 1 - window
                hidden = torch.arange(lp, device=dev)[None] <= (lp + lens_grp[start:end] - 1 - window)[:, None]
                sp.masked_fill_(hidden.repeat_interleave(g, 0), float("-inf"))
            og, lg = _softmax_attend(sp, pv.transpose(0, 1).to(acc))
            lse_pre[start:end] = lg.view(hkv, n, g).transpose(0, 1)
            out_pre[start:end] = og.view(hkv, n, g, dim).transpose(0, 1)
            start = end
        # a window hiding a whole prefix leaves NaN: no keys
        full_out = out.new_zeros(out.shape).index_copy_(0, rows, out_pre.nan_to_num_(0.0))
        full_lse = lse.new_full(lse.shape, float("-inf")).index_copy_(0, rows, lse_pre.nan_to_num_(float("-inf")))
        parts.append((full_out, full_lse))
    if len(parts) > 1 or sinks is not None:
        out, lse = _merge(parts, sinks, hkv, g)
    return out.reshape(B, hq, dim).to(q.dtype), lse.reshape(B, hq).float()
