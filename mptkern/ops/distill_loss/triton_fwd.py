"""Triton path of the fused distillation loss: the statistics kernel (one pass over vocabulary tiles
keeping online log-sum-exp statistics per token, split over the vocabulary to fill the GPU) and the
launcher of both passes (the dlogits kernel is :mod:`.triton_bwd`; ``dX = dlogits @ W`` by cuBLAS)."""

from __future__ import annotations

import torch

from mptkern import backends
from mptkern.ops._common import dot_precision, tl, triton
from mptkern.ops.distill_loss.reference import _hidden_grad, _hidden_term, _kl, _merge

if triton is not None:
    from mptkern.ops.distill_loss.tiles import _logit_tiles
    from mptkern.ops.distill_loss.triton_bwd import _dlogits_kernel

# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) per input dtype, for both kernels: the largest
# tiles that the AOT check compiles without spills for sm_80 and sm_90 (two fp32 accumulators plus
# the online-softmax epilogue sit near 255 registers). Not yet tuned on a GPU.
TRITON_CONFIGS = {
    torch.bfloat16: (64, 64, 32, 8, 2),
    torch.float16: (64, 64, 32, 8, 2),
    torch.float32: (32, 64, 32, 8, 3),
}
# Elements of the (tokens, V) dlogits buffer the Triton path holds at once: 2^27 = 256 MiB in bf16.
TRITON_CHUNK_ELEMENTS = 1 << 27


if triton is not None:

    @triton.jit
    def _stats_kernel(
        HS, HT, W, LAB, WS, N, V, D, inv_t, tiles_per_split,
        HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # axis 0 (token blocks) varies fastest, so programs running together walk the same W tiles
        # and share them through L2
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        rmask = rows < N
        if HAS_CE:
            lab = tl.load(LAB + rows, mask=rmask, other=-1)
        m_s = tl.full((BLOCK_N,), -1.0e30, tl.float32)
        s_s = tl.zeros((BLOCK_N,), tl.float32)
        m_t = tl.full((BLOCK_N,), -1.0e30, tl.float32)
        s_t = tl.zeros((BLOCK_N,), tl.float32)
        gap = tl.zeros((BLOCK_N,), tl.float32)
        m_1 = tl.full((BLOCK_N,), -1.0e30, tl.float32)
        s_1 = tl.zeros((BLOCK_N,), tl.float32)
        z_lab = tl.zeros((BLOCK_N,), tl.float32)
        t0 = split * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
        for tile in range(t0, t1):
            cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            cmask = cols < V
            zs, zt = _logit_tiles(HS, HT, W, tl.program_id(0) * BLOCK_N, tile * BLOCK_V, N, V, D,
                                  HAS_KL, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)
            # columns past V become -inf: exp gives 0 and the running max ignores them
            gap_tile = (zt - zs) * inv_t  # zero past V, where both accumulators are zero
            zs = tl.where(cmask[None, :], zs, float("-inf"))
            if HAS_KL:
                a = zs * inv_t
                b = tl.where(cmask[None, :], zt, float("-inf")) * inv_t
                m_new = tl.maximum(m_s, tl.max(a, axis=1))
                s_s = s_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(a - m_new[:, None]), axis=1)
                m_s = m_new
                m_new = tl.maximum(m_t, tl.max(b, axis=1))
                alpha = tl.exp(m_t - m_new)
                e = tl.exp(b - m_new[:, None])
                s_t = s_t * alpha + tl.sum(e, axis=1)
                gap = gap * alpha + tl.sum(e * gap_tile, axis=1)
                m_t = m_new
            if HAS_CE:
                m_new = tl.maximum(m_1, tl.max(zs, axis=1))
                s_1 = s_1 * tl.exp(m_1 - m_new) + tl.sum(tl.exp(zs - m_new[:, None]), axis=1)
                m_1 = m_new
                z_lab += tl.sum(tl.where(cols[None, :] == lab[:, None], zs, 0.0), axis=1)
        # partial statistics of this vocabulary split; the host merges the splits in a fixed order
        out = WS + split * N + rows
        plane = n_split * N
        tl.store(out, m_s, mask=rmask)
        tl.store(out + plane, s_s, mask=rmask)
        tl.store(out + 2 * plane, m_t, mask=rmask)
        tl.store(out + 3 * plane, s_t, mask=rmask)
        tl.store(out + 4 * plane, gap, mask=rmask)
        tl.store(out + 5 * plane, m_1, mask=rmask)
        tl.store(out + 6 * plane, s_1, mask=rmask)
        tl.store(out + 7 * plane, z_lab, mask=rmask)


def _n_splits(n_blocks: int, n_tiles: int, device) -> int:
    """Vocabulary splits of the stats kernel: enough programs to fill the GPU twice over."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(n_tiles, triton.cdiv(2 * sms, n_blocks)))


def _triton_impl(hs, ht, W, lab, T, klw, cew, hw, scale, need_grad, cap=0.0):
    assert not cap, "the triton path has no logit soft-capping; fused_distill_loss picks torch for it"
    n, d = hs.shape
    V = W.shape[0]
    has_kl, has_ce = klw != 0, cew != 0
    bn, bv, bk, warps, stages = TRITON_CONFIGS[hs.dtype]
    upcast = backends.triton_interpret()
    prec = "ieee" if upcast else dot_precision(hs.dtype)
    loss, diff_chunks = _hidden_term(hs, ht, hw, torch.float32)
    lse = None
    if has_kl or has_ce:
        lab_arg = lab if has_ce else hs  # never read without HAS_CE
        n_blocks, n_tiles = triton.cdiv(n, bn), triton.cdiv(V, bv)
        n_split = _n_splits(n_blocks, n_tiles, hs.device)
        per = triton.cdiv(n_tiles, n_split)
        n_split = triton.cdiv(n_tiles, per)
        ws = torch.empty(8, n_split, n, dtype=torch.float32, device=hs.device)
        _stats_kernel[(n_blocks, n_split)](
            hs, ht, W, lab_arg, ws, n, V, d, 1.0 / T, per,
            HAS_KL=has_kl, HAS_CE=has_ce, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PRECISION=prec, UPCAST=upcast,
            num_warps=warps, num_stages=stages,
        )
        lse = torch.zeros(3, n, dtype=torch.float32, device=hs.device)
        if has_kl:
            m_s, s_s = _merge(ws[0], ws[1])
            m_t, s_t = _merge(ws[2], ws[3])
            gap = (ws[4] * torch.exp(ws[2] - m_t)).sum(0)
            lse[0], lse[1] = m_s + torch.log(s_s), m_t + torch.log(s_t)
            loss += (klw * T * T) * _kl(gap, m_s, s_s, m_t, s_t)
        if has_ce:
            m_1, s_1 = _merge(ws[5], ws[6])
            lse[2] = m_1 + torch.log(s_1)
            loss += cew * (lse[2] - ws[7].sum(0))
    if not need_grad:
        return loss, None
    dx = torch.empty_like(hs)
    rows = max(bn, TRITON_CHUNK_ELEMENTS // V // bn * bn) if lse is not None else n
    g = torch.empty(min(rows, n), V, dtype=hs.dtype, device=hs.device) if lse is not None else None
    for n0 in range(0, n, rows):
        n1 = min(n0 + rows, n)
        hid = _hidden_grad(diff_chunks, n0, n1, hw * scale, d)
        if lse is None:
            dx[n0:n1] = 0.0 if hid is None else hid.to(hs.dtype)
            continue
        _dlogits_kernel[(triton.cdiv(n1 - n0, bn), triton.cdiv(V, bv))](
            hs[n0:n1], ht[n0:n1], W, lab[n0:n1] if has_ce else hs, lse[:, n0:n1].contiguous(), g, n1 - n0, V, d,
            1.0 / T, klw * T * scale, cew * scale,
            HAS_KL=has_kl, HAS_CE=has_ce, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PRECISION=prec, UPCAST=upcast,
            num_warps=warps, num_stages=stages,
        )
        # dX = dlogits @ W as one GEMM per chunk (cuBLAS, fp32 accumulation); no atomics
        part = torch.mm(g[: n1 - n0], W)
        dx[n0:n1] = part if hid is None else (part.float() + hid).to(hs.dtype)
    return loss, dx


