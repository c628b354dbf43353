"""Fused distillation loss on a frozen lm_head: ``kl_weight*T^2*KL + ce_weight*CE + hidden_weight*MSE``.

The source stage of Multitask Prompt Tuning trains the student prompt against teacher prompts on
the same frozen backbone, so teacher and student share the lm_head ``W (V, d)``. Per valid token
``i`` (``labels[i] != ignore_index``; every token when ``labels`` is None)::

    KL_i  = T^2 * sum_v p_t (log p_t - log p_s),   p = softmax(h W^T / T)
    CE_i  = -log softmax(h_s W^T)[labels[i]]
    MSE_i = mean_d (h_s - h_t)^2

Neither backend allocates an ``(N, V)`` tensor. Both make one pass over vocabulary tiles that keeps
online log-sum-exp statistics per token (the student at T and at 1, the teacher at T, the
teacher-weighted logit gap ``A = sum_v e^{z_t/T - m_t} (z_t - z_s)/T`` giving ``KL = T^2 (A/S_t -
lse_t + lse_s)``, the label logit), then a second pass that rebuilds ``dlogits = kl_weight*T*(p_s^T
- p_t^T) + ce_weight*(p_s - onehot)`` tile by tile and contracts it with ``W`` into ``dX``.

The gradient is computed in the forward (only ``student_hidden`` gets one, and the loss is the last
op of the graph): the op returns ``dX`` of the unit-weighted loss, and backward only scales it by
``grad_output``. Forward calls without grad (eval, ``torch.no_grad``) skip the second pass. Ignored
tokens are dropped before any matmul (one host sync for their count), so they cost nothing.

Layers in this file, bottom up: Triton kernels and launchers, the torch path, the
``torch.library`` op with autograd, and the public function.
"""

from __future__ import annotations

import math

import torch

from mptkern import backends

try:
    import triton
    import triton.language as tl
except ImportError:  # non-Linux: the triton backend reports itself unavailable
    triton = None

SUPPORTED_BACKENDS = ("torch", "triton")
_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")

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
# Elements of one (tokens x vocab) logits chunk on the torch path (2^21 fp32 = 8 MiB; about six
# such temporaries live at once). Rows are at least TORCH_MIN_ROWS; if that many rows of the whole
# vocabulary fit, the logits are kept between the two passes instead of recomputed.
TORCH_CHUNK_ELEMENTS = 1 << 21
TORCH_MIN_ROWS = 32
_NEG = -1.0e30  # running-max start: finite so that exp(m_old - m_new) never sees (-inf) - (-inf)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
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


def _precision(dtype):
    # fp32 inputs must not silently drop to tf32: the contract is fp32 accumulation of fp32 products
    return "ieee" if dtype == torch.float32 else "tf32"


def _n_splits(n_blocks: int, n_tiles: int, device) -> int:
    """Vocabulary splits of the stats kernel: enough programs to fill the GPU twice over."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(n_tiles, triton.cdiv(2 * sms, n_blocks)))


def _merge(m, s):
    """Merge per-split (max, sum) rows of shape (splits, n) into (max, sum relative to that max)."""
    top = m.amax(0)
    return top, (s * torch.exp(m - top)).sum(0)


def _kl(gap, m_s, s_s, m_t, s_t):
    """``KL / T^2 = E_pt[(z_t - z_s)/T] + lse_s - lse_t``. The lse difference is taken as
    ``(m_s - m_t) + log(S_s / S_t)``: both lse are about ``log V`` while KL can be far smaller, and
    subtracting two rounded lse would cost ``ulp(log V)`` (times T^2) of absolute error."""
    return gap / s_t + (m_s - m_t) + torch.log(s_s / s_t)


def _triton_impl(hs, ht, W, lab, T, klw, cew, hw, scale, need_grad):
    n, d = hs.shape
    V = W.shape[0]
    has_kl, has_ce = klw != 0, cew != 0
    bn, bv, bk, warps, stages = TRITON_CONFIGS[hs.dtype]
    upcast = backends.triton_interpret()
    prec = "ieee" if upcast else _precision(hs.dtype)
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


def aot_specs():
    """Every shipped kernel configuration, for the ahead-of-time compile check (:mod:`mptkern.aot`)."""
    from mptkern.aot import KernelSpec

    specs = []
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    for dtype, (bn, bv, bk, warps, stages) in TRITON_CONFIGS.items():
        dt = names[dtype]
        p = "*" + dt
        # both terms on is the register-heaviest variant; bf16 also ships the KL-only variant
        flags = [(True, True)] + ([(True, False)] if dtype == torch.bfloat16 else [])
        for has_kl, has_ce in flags:
            tag = f"{dt}{'' if has_ce else '_kl'}"
            ce = dict(HAS_KL=has_kl, HAS_CE=has_ce, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PRECISION=_precision(dtype),
                      UPCAST=False)
            common = dict(HAS_KL="constexpr", HAS_CE="constexpr", BLOCK_N="constexpr", BLOCK_V="constexpr",
                          BLOCK_K="constexpr", PRECISION="constexpr", UPCAST="constexpr")
            sig = dict(HS=p, HT=p, W=p, LAB="*i64", WS="*fp32", N="i32", V="i32", D="i32", inv_t="fp32",
                       tiles_per_split="i32", **common)
            specs.append(KernelSpec(f"distill_stats_{tag}", _stats_kernel, sig, ce, warps, stages))
            sig = dict(HS=p, HT=p, W=p, LAB="*i64", LSE="*fp32", G=p, N="i32", V="i32", D="i32", inv_t="fp32",
                       c_kl="fp32", c_ce="fp32", **common)
            specs.append(KernelSpec(f"distill_dlogits_{tag}", _dlogits_kernel, sig, ce, warps, stages))
    return specs


# ----------------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------------
def _hidden_term(hs, ht, hw, cdt):
    """Per-token ``hw * MSE`` in ``cdt`` and, for the gradient, a function of the token range."""
    n = hs.shape[0]
    loss = torch.zeros(n, dtype=cdt, device=hs.device)
    if hw == 0:
        return loss, None
    step = max(1, TORCH_CHUNK_ELEMENTS // hs.shape[1])  # bounded fp32 temporaries
    for n0 in range(0, n, step):
        diff = hs[n0:n0 + step].to(cdt) - ht[n0:n0 + step].to(cdt)
        loss[n0:n0 + step] = hw * diff.square().mean(1)
    return loss, (hs, ht, cdt)


def _hidden_grad(diff_src, n0, n1, coef, d):
    """``coef * d MSE / d h_s`` for rows n0:n1 (None when the hidden term is off)."""
    if diff_src is None:
        return None
    hs, ht, cdt = diff_src
    cdt = torch.promote_types(cdt, torch.float32)
    return (hs[n0:n1].to(cdt) - ht[n0:n1].to(cdt)).mul_(2.0 * coef / d)


def _torch_chunks(n, V):
    rows = TORCH_CHUNK_ELEMENTS // V
    if rows >= TORCH_MIN_ROWS:
        return min(n, rows), V
    cn = min(n, TORCH_MIN_ROWS)
    return cn, max(1, TORCH_CHUNK_ELEMENTS // cn)


def _rowdot(x, y):
    """Row-wise dot product of two (n, V) tensors without an (n, V) temporary."""
    return torch.bmm(x[:, None, :], y[:, :, None])[:, 0, 0]


def _torch_full_vocab(h, t, y, w, T, klw, cew, scale, need_grad):
    """Loss rows and ``dlogits`` of a token chunk whose logits over the whole vocabulary fit the
    budget: one pass, nothing recomputed, row-wise fused softmax/logsumexp kernels (each row stays
    in cache). ``lse_s - lse_t`` is taken as ``logsumexp(z_s/T - lse_t)``, a number near 0 when KL
    is small, instead of a difference of two rounded lse of size log V (see :func:`_kl`)."""
    zs = h @ w.T
    loss = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    dz = None
    if klw:
        a = zs.mul(1.0 / T)
        b = (t @ w.T).mul_(1.0 / T)
        lse_t = torch.logsumexp(b, 1)
        p_t = torch.softmax(b, 1)
        gap = _rowdot(p_t, b.sub_(a))
        del b
        lse_d = torch.logsumexp(a.sub_(lse_t[:, None]), 1)
        loss += (klw * T * T) * (gap + lse_d)
        if need_grad:
            dz = torch.softmax(a, 1).sub_(p_t).mul_(klw * T * scale)
        del a, p_t
    if cew:
        loss += cew * (torch.logsumexp(zs, 1) - zs.gather(1, y[:, None])[:, 0])
        if need_grad:
            p1 = torch.softmax(zs, 1).mul_(cew * scale)
            p1[torch.arange(h.shape[0], device=h.device), y] -= cew * scale
            dz = p1 if dz is None else dz.add_(p1)
    return loss, dz


def _torch_impl(hs, ht, W, lab, T, klw, cew, hw, scale, need_grad):
    n, d = hs.shape
    V = W.shape[0]
    cdt = torch.promote_types(hs.dtype, torch.float32)
    has_kl, has_ce = klw != 0, cew != 0
    inv_t = 1.0 / T
    loss, diff_src = _hidden_term(hs, ht, hw, cdt)
    dx = torch.empty_like(hs) if need_grad else None
    cn, cv = _torch_chunks(n, V)
    for n0 in range(0, n, cn):
        n1 = min(n0 + cn, n)
        hid = _hidden_grad(diff_src, n0, n1, hw * scale, d) if need_grad else None
        if not (has_kl or has_ce):
            if need_grad:
                dx[n0:n1] = 0.0 if hid is None else hid.to(hs.dtype)
            continue
        h = hs[n0:n1].to(cdt)
        t = ht[n0:n1].to(cdt) if has_kl else None
        y = lab[n0:n1] if has_ce else None
        rows = n1 - n0
        if cv >= V:
            w = W.to(cdt)
            part, dz = _torch_full_vocab(h, t, y, w, T, klw, cew, scale, need_grad)
            loss[n0:n1] += part
            if need_grad:
                dx[n0:n1] = (dz @ w if hid is None else hid.addmm_(dz, w)).to(hs.dtype)
            continue
        # vocabulary in chunks: online log-sum-exp statistics, then a second pass for dlogits
        neg = torch.full((rows,), _NEG, dtype=cdt, device=hs.device)
        m_s, m_t, m_1 = neg.clone(), neg.clone(), neg
        s_s, s_t, s_1, gap, z_lab = (torch.zeros(rows, dtype=cdt, device=hs.device) for _ in range(5))
        for v0 in range(0, V, cv):
            w = W[v0:v0 + cv].to(cdt)
            zs = h @ w.T
            if has_kl:
                a, b = zs * inv_t, (t @ w.T).mul_(inv_t)
                m_new = torch.maximum(m_s, a.amax(1))
                s_s = s_s * torch.exp(m_s - m_new) + torch.exp(a - m_new[:, None]).sum(1)
                m_s = m_new
                m_new = torch.maximum(m_t, b.amax(1))
                alpha = torch.exp(m_t - m_new)
                e = torch.exp(b - m_new[:, None])
                s_t = s_t * alpha + e.sum(1)
                gap = gap * alpha + (e * b.sub_(a)).sum(1)
                m_t = m_new
                del a, b, e
            if has_ce:
                m_new = torch.maximum(m_1, zs.amax(1))
                s_1 = s_1 * torch.exp(m_1 - m_new) + torch.exp(zs - m_new[:, None]).sum(1)
                m_1 = m_new
                inside = (y >= v0) & (y < v0 + w.shape[0])
                z_lab += torch.where(inside, zs.gather(1, (y - v0).clamp(0, w.shape[0] - 1)[:, None])[:, 0], 0.0)
        lse_s, lse_t, lse_1 = m_s + torch.log(s_s), m_t + torch.log(s_t), m_1 + torch.log(s_1)
        if has_kl:
            loss[n0:n1] += (klw * T * T) * _kl(gap, m_s, s_s, m_t, s_t)
        if has_ce:
            loss[n0:n1] += cew * (lse_1 - z_lab)
        if not need_grad:
            continue
        acc = hid if hid is not None else torch.zeros(rows, d, dtype=cdt, device=hs.device)
        for v0 in range(0, V, cv):
            w = W[v0:v0 + cv].to(cdt)
            zs = h @ w.T
            dz = torch.zeros_like(zs)
            if has_kl:
                ps = torch.exp(zs * inv_t - lse_s[:, None])
                dz += ps.sub_(torch.exp((t @ w.T).mul_(inv_t).sub_(lse_t[:, None]))).mul_(klw * T * scale)
                del ps
            if has_ce:
                dz += torch.exp(zs - lse_1[:, None]).mul_(cew * scale)
                idx = ((y >= v0) & (y < v0 + w.shape[0])).nonzero()[:, 0]
                dz[idx, y[idx] - v0] -= cew * scale
            acc.addmm_(dz, w)
            del dz, zs
        dx[n0:n1] = acc.to(hs.dtype)
    return loss, dx


_IMPLS = {"torch": _torch_impl, "triton": _triton_impl}


# ----------------------------------------------------------------------------------------------
# torch.library op (opaque to torch.compile) with autograd
# ----------------------------------------------------------------------------------------------
def _loss_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("mptkern::fused_distill_loss", mutates_args=())
def _fused_distill_loss_op(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None,
    temperature: float, kl_weight: float, ce_weight: float, hidden_weight: float, ignore_index: int,
    reduction: str, need_grad: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(loss, dx)``: the reduced loss (or per-token ``(N,)``), and when ``need_grad`` the
    gradient of the loss with unit ``grad_output`` w.r.t. ``student_hidden`` (per-token losses for
    ``"none"``), else an empty ``(0, d)`` tensor."""
    N, d = student_hidden.shape
    dev = student_hidden.device
    if labels is not None and ce_weight != 0:
        _check_labels(labels, ignore_index, weight.shape[0])
    idx = None
    if labels is not None:
        valid = labels != ignore_index
        if not bool(valid.all()):
            idx = valid.nonzero()[:, 0]
    hs, ht, lab = student_hidden, teacher_hidden, labels
    if idx is not None:
        hs, ht = hs.index_select(0, idx), ht.index_select(0, idx)
        lab = lab.index_select(0, idx)
    n_valid = hs.shape[0]
    scale = 1.0 / n_valid if reduction == "mean" and n_valid else 1.0
    if n_valid:
        loss_v, dx_v = _IMPLS[backend](hs, ht, weight, lab, temperature, kl_weight, ce_weight, hidden_weight, scale, need_grad)
    else:
        loss_v = torch.zeros(0, dtype=_loss_dtype(hs.dtype), device=dev)
        dx_v = torch.zeros(0, d, dtype=hs.dtype, device=dev) if need_grad else None
    loss_v = loss_v.to(_loss_dtype(hs.dtype))
    if reduction == "none":
        loss = loss_v if idx is None else torch.zeros(N, dtype=loss_v.dtype, device=dev).index_copy_(0, idx, loss_v)
    else:
        loss = loss_v.sum() * scale
    if not need_grad:
        return loss, student_hidden.new_empty(0, d)
    dx = dx_v if idx is None else torch.zeros_like(student_hidden).index_copy_(0, idx, dx_v)
    return loss, dx


@_fused_distill_loss_op.register_fake
def _(student_hidden, teacher_hidden, weight, labels, temperature, kl_weight, ce_weight, hidden_weight,
      ignore_index, reduction, need_grad, backend):
    N, d = student_hidden.shape
    shape = (N,) if reduction == "none" else ()
    loss = student_hidden.new_empty(shape, dtype=_loss_dtype(student_hidden.dtype))
    return loss, student_hidden.new_empty((N if need_grad else 0), d)


def _setup_context(ctx, inputs, output):
    _, dx = output
    ctx.mark_non_differentiable(dx)
    ctx.save_for_backward(dx)
    ctx.need_grad = inputs[10]
    ctx.per_token = inputs[9] == "none"


def _backward(ctx, grad_loss, _grad_dx):
    (dx,) = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError("fused_distill_loss: backward of a call made without grad mode (need_grad=False)")
    g = grad_loss[:, None] if ctx.per_token else grad_loss
    return (g * dx).to(dx.dtype), None, None, None, None, None, None, None, None, None, None, None


_fused_distill_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check_labels(labels, ignore_index, V):
    """Range check that needs the values (one host sync); inside the op so compile traces it."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"labels must lie in [0, {V}) (V = weight.shape[0]) or equal ignore_index={ignore_index}, got {first}")


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _validate(hs, ht, W, labels, temperature, weights, reduction, backend):
    def fail(msg):
        raise ValueError(msg)

    if hs.dim() != 2:
        fail(f"student_hidden must have shape (N, d), got {tuple(hs.shape)}")
    N, d = hs.shape
    if N == 0 or d == 0:
        fail(f"student_hidden is empty: shape {(N, d)}, expected N >= 1 and d >= 1")
    if ht.shape != hs.shape:
        fail(f"teacher_hidden must have the student's shape {(N, d)}, got {tuple(ht.shape)}")
    if W.dim() != 2 or W.shape[1] != d or W.shape[0] == 0:
        fail(f"weight must have shape (V, d={d}) with V >= 1, got {tuple(W.shape)}")
    if not hs.dtype.is_floating_point:
        fail(f"student_hidden must be floating point, got {hs.dtype}")
    for name, t in (("teacher_hidden", ht), ("weight", W)):
        if t.dtype != hs.dtype:
            fail(f"{name} has dtype {t.dtype} but student_hidden has {hs.dtype}; all three must share one dtype")
    if backend != "torch" and hs.dtype not in _GPU_DTYPES:
        fail(f"student_hidden has dtype {hs.dtype}; the {backend} backend supports {_GPU_DTYPES}")
    named = [("teacher_hidden", ht), ("weight", W)] + ([("labels", labels)] if labels is not None else [])
    for name, t in named:
        if t.device != hs.device:
            fail(f"{name} is on {t.device} but student_hidden is on {hs.device}")
    if W.requires_grad:
        fail("weight requires grad, but fused_distill_loss is for frozen heads: it computes no weight gradient "
             "(freeze the lm_head, or pass weight.detach())")
    if labels is not None and (labels.shape != (N,) or labels.dtype.is_floating_point or labels.dtype.is_complex
                               or labels.dtype == torch.bool):
        fail(f"labels must be an integer tensor of shape (N={N},), got {labels.dtype} of shape {tuple(labels.shape)}")
    if reduction not in _REDUCTIONS:
        fail(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        fail(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, v in weights.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            fail(f"{name} must be a finite number >= 0, got {v!r}")
    if weights["ce_weight"] > 0 and labels is None:
        fail("ce_weight > 0 needs labels: the cross-entropy term is taken against labels (N,)")


def fused_distill_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    hidden_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss of a student against a teacher through one frozen lm_head, without logits.

    Args:
        student_hidden: ``(N, d)`` fp32/bf16/fp16 (fp64 on the torch backend), final hidden states
            of the student at the target positions; the only input that gets a gradient.
        teacher_hidden: ``(N, d)``, same dtype; detached (the teacher never gets a gradient).
        weight: ``(V, d)``, same dtype, the frozen lm_head; ``weight.requires_grad`` is an error.
        labels: ``(N,)`` integer or None. Tokens with ``labels == ignore_index`` count for nothing;
            None makes every token count (then ``ce_weight`` must be 0).
        temperature: ``T > 0`` of the KL term (the CE term is always at T = 1).
        kl_weight, ce_weight, hidden_weight: non-negative weights of ``T^2 KL(p_t || p_s)``,
            ``CE(h_s W^T, labels)`` and ``mean_d (h_s - h_t)^2``. A zero weight skips its work.
        reduction: ``"mean"`` (over valid tokens; 0 with zero gradient when there are none),
            ``"sum"``, or ``"none"`` (``(N,)``, ignored tokens 0).
        backend: ``"auto" | "torch" | "triton"`` (see :mod:`mptkern.backends`).

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar, or ``(N,)`` for ``reduction="none"``. Logits are
        accumulated in fp32 and never stored as an ``(N, V)`` tensor.

    Example::

        hs = torch.randn(7, 64, requires_grad=True)
        ht, W = torch.randn(7, 64), torch.randn(1000, 64)
        labels = torch.tensor([3, -100, 5, 9, -100, 2, 1])
        loss = fused_distill_loss(hs, ht, W, labels, temperature=2.0, ce_weight=1.0, hidden_weight=0.5)
        loss.backward()
    """
    backend = backends.resolve(backend, student_hidden.device, SUPPORTED_BACKENDS, "fused_distill_loss")
    weights = dict(kl_weight=kl_weight, ce_weight=ce_weight, hidden_weight=hidden_weight)
    _validate(student_hidden, teacher_hidden, weight, labels, temperature, weights, reduction, backend)
    teacher_hidden = teacher_hidden.detach()
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
    if backend != "torch":
        student_hidden, teacher_hidden, weight = (t.contiguous() for t in (student_hidden, teacher_hidden, weight))
    need_grad = torch.is_grad_enabled() and student_hidden.requires_grad
    loss, _ = torch.ops.mptkern.fused_distill_loss(
        student_hidden, teacher_hidden, weight, labels, float(temperature), float(kl_weight), float(ce_weight),
        float(hidden_weight), int(ignore_index), reduction, need_grad, backend,
    )
    return loss
