"""The tile both Triton kernels of the fused distillation loss start from: a block of student (and
teacher) logits, ``h W^T`` over one (token block, vocabulary block)."""

from __future__ import annotations

from mptkern.ops._common import tl, triton

if triton is not None:

    @triton.jit
    def _logit_tiles(HS, HT, W, row0, col0, N, V, D,
                     HAS_KL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """fp32 student and teacher logits of one (BLOCK_N, BLOCK_V) tile; one W tile feeds both dots.
        UPCAST (interpreter only) feeds the dots fp32 copies: Triton 3.9's interpreter multiplies the
        raw uint16 bits of bf16 operands. Exact either way: bf16 products are exact in fp32."""
        acc_s = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        acc_t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        r = tl.arange(0, BLOCK_N)
        c = tl.arange(0, BLOCK_V)
        k = tl.arange(0, BLOCK_K)
        rmask = (row0 + r) < N
        cmask = (col0 + c) < V
        # 64-bit scalar bases and 32-bit in-tile offsets: large N*d and V*d are safe without a
        # 64-bit offset per element held in registers
        hs = HS + tl.cast(row0, tl.int64) * D
        ht = HT + tl.cast(row0, tl.int64) * D
        w_ptr = W + tl.cast(col0, tl.int64) * D
        h_off = r[:, None] * D + k[None, :]
        w_off = c[None, :] * D + k[:, None]  # the W^T tile
        for k0 in range(0, D, BLOCK_K):
            km = (k0 + k) < D
            w = tl.load(w_ptr + w_off + k0, mask=km[:, None] & cmask[None, :], other=0.0)
            h = tl.load(hs + h_off + k0, mask=rmask[:, None] & km[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
                h = h.to(tl.float32)
            acc_s = tl.dot(h, w, acc_s, input_precision=PRECISION)
            if HAS_KL:
                h = tl.load(ht + h_off + k0, mask=rmask[:, None] & km[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                acc_t = tl.dot(h, w, acc_t, input_precision=PRECISION)
        return acc_s, acc_t
