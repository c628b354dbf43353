"""Triton dlogits kernel of the fused distillation loss: rebuilds ``dlogits = kl_weight*T*(p_s^T -
p_t^T) + ce_weight*(p_s - onehot)`` tile by tile from the statistics of the first pass."""

from __future__ import annotations

from mptkern.ops._common import tl, triton

if triton is not None:
    from mptkern.ops.distill_loss.tiles import _logit_tiles

    @triton.jit
    def _dlogits_kernel(
        HS, HT, W, LAB, LSE, G, N, V, D, inv_t, c_kl, c_ce,
        HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        rmask = rows < N
        cmask = cols < V
        zs, zt = _logit_tiles(HS, HT, W, tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_V, N, V, D,
                              HAS_KL, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)
        g = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        # p = exp(z - lse) <= 1 for any logit magnitude; the final lse is known, so no rescaling
        if HAS_KL:
            lse_s = tl.load(LSE + rows, mask=rmask, other=0.0)
            lse_t = tl.load(LSE + N + rows, mask=rmask, other=0.0)
            g += c_kl * (tl.exp(zs * inv_t - lse_s[:, None]) - tl.exp(zt * inv_t - lse_t[:, None]))
        if HAS_CE:
            lse_1 = tl.load(LSE + 2 * N + rows, mask=rmask, other=0.0)
            lab = tl.load(LAB + rows, mask=rmask, other=-1)
            g += c_ce * (tl.exp(zs - lse_1[:, None]) - tl.where(cols[None, :] == lab[:, None], 1.0, 0.0))
        out = G + rows.to(tl.int64)[:, None] * V + cols[None, :]
        tl.store(out, g.to(G.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
