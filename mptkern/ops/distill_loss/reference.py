"""The torch path of the fused distillation loss (any device), and the statistics math both paths
share (LSE merges, KL from online statistics, the hidden-state term). See the package docstring for
the chunking and the single exp pass."""

from __future__ import annotations

import torch

# Elements of the torch path's workspace, allocated once per call (5 * 2^21 fp32 = 40 MiB): one token
# chunk's stacked (rows, vocab) logits blocks, plus one for z_t - z_s with KL. Chunks span the whole
# vocabulary when at least TORCH_MIN_ROWS rows of it fit (the GEMMs then have 2-3x that many rows);
# else TORCH_MIN_ROWS rows walk the vocabulary in slices and recompute the logits for the gradient.
TORCH_CHUNK_ELEMENTS = 5 << 21
TORCH_MIN_ROWS = 16
_NEG = -1.0e30  # running-max start: finite so that exp(m_old - m_new) never sees (-inf) - (-inf)


def _merge(m, s):
    """Merge per-split (max, sum) rows of shape (splits, n) into (max, sum relative to that max)."""
    top = m.amax(0)
    return top, (s * torch.exp(m - top)).sum(0)


def _kl(gap, m_s, s_s, m_t, s_t):
    """``KL / T^2 = E_pt[(z_t - z_s)/T] + lse_s - lse_t``. The lse difference is taken as
    ``(m_s - m_t) + log(S_s / S_t)``: both lse are about ``log V`` while KL can be far smaller, and
    subtracting two rounded lse would cost ``ulp(log V)`` (times T^2) of absolute error."""
    return gap / s_t + (m_s - m_t) + torch.log(s_s / s_t)


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


def _torch_chunks(n, V, blocks):
    """``(rows, cols)`` of one token chunk, whose ``blocks`` ``(rows, cols)`` buffers (the stacked
    logits, and ``z_t - z_s`` for KL) fill the ``TORCH_CHUNK_ELEMENTS`` workspace: the whole
    vocabulary when ``min(n, TORCH_MIN_ROWS)`` rows of it fit (then as many rows as fit, balanced
    over the chunks: the largest GEMMs, the fewest ops), else that many rows and a vocabulary slice."""
    fit = TORCH_CHUNK_ELEMENTS // (blocks * V)
    if fit >= min(n, TORCH_MIN_ROWS):
        return -(-n // -(-n // fit)), V
    rows = min(n, TORCH_MIN_ROWS)
    return rows, max(1, TORCH_CHUNK_ELEMENTS // (blocks * rows))


def _rowdot(x, y):
    """Row-wise dot product of two ``(n, c)`` tensors: one batched GEMV, no ``(n, c)`` temporary."""
    return torch.bmm(x[:, None, :], y[:, :, None])[:, 0, 0]


def _label_cols(y, v0, cols):
    """Which labels fall in the vocabulary slice ``[v0, v0 + cols)``, and their columns there."""
    return (y >= v0) & (y < v0 + cols), (y - v0).clamp_(0, cols - 1)


def _dlogits_(z, k, y, v0, klT, cew, sep_ce):
    """In place on the probabilities ``z`` (blocks teacher, student at T, student at 1 as present):
    ``(g, coef)`` with ``coef * g = klT (p_s^T - p_t^T) + cew (p_s - onehot)``, ``g`` a block of ``z``."""
    if klT:
        g, coef = z[k:2 * k], klT + (cew if not sep_ce else 0.0)
        g.sub_(z[:k], alpha=klT / coef)
        if sep_ce:
            g.add_(z[2 * k:], alpha=cew / coef)
    else:
        g, coef = z, cew
    if cew:
        inside, col = _label_cols(y, v0, g.shape[1])
        rows = torch.arange(k, device=g.device)
        g.index_put_((rows, col), inside.to(g.dtype).mul_(-cew / coef), accumulate=True)
    return g, coef


def _torch_impl(hs, ht, W, lab, T, klw, cew, hw, scale, need_grad, cap=0.0):
    """Per token chunk, the inputs that the nonzero weights need stacked as ``[h_t/T; h_s/T; h_s]``:
    one GEMM per chunk (or vocabulary slice) gives all their logits, in one workspace per call.
    ``cap`` > 0: the logits are soft-capped, ``cap * tanh(logits / cap)``, before the temperature."""
    n, d = hs.shape
    V = W.shape[0]
    cdt = torch.promote_types(hs.dtype, torch.float32)
    dev = hs.device
    sep_ce = cew != 0 and (klw == 0 or T != 1)  # CE needs its own student block at T = 1
    nb = 2 * (klw != 0) + sep_ce  # logits blocks; the workspace adds z_t - z_s for KL
    cap_grad = bool(cap) and need_grad and nb > 0  # one more block: the cap's derivative at the student's logits
    bufs = nb + (klw != 0) + cap_grad
    terms = (T, klw, cew, sep_ce, cap)
    loss, diff_src = _hidden_term(hs, ht, hw, cdt)
    dx = torch.empty_like(hs) if need_grad else None
    rows, cols = _torch_chunks(n, V, max(bufs, 1))
    w = W.to(cdt)
    x_all = torch.empty(nb * rows, d, dtype=cdt, device=dev)
    ws = torch.empty(bufs * rows * cols, dtype=cdt, device=dev)
    part = torch.empty(rows, d, dtype=cdt, device=dev) if need_grad and cdt != hs.dtype else None
    for n0 in range(0, n, rows):
        n1 = min(n0 + rows, n)
        k = n1 - n0
        hid = _hidden_grad(diff_src, n0, n1, hw * scale, d) if need_grad else None
        out = (dx[n0:n1] if part is None else part[:k]) if need_grad else None
        if not nb:
            if need_grad and hid is not None:
                out.copy_(hid)
            elif need_grad:
                out.zero_()
        else:
            x, y = x_all[: nb * k], lab[n0:n1] if cew else None
            if klw:
                x[:k].copy_(ht[n0:n1]).mul_(1.0 / T)
                x[k:2 * k].copy_(hs[n0:n1]).mul_(1.0 / T)
            if sep_ce:
                x[-k:].copy_(hs[n0:n1])
            run = _torch_full_vocab if cols == V else _torch_vocab_slices
            loss[n0:n1] += run(x, k, w, y, ws, cols, terms, scale, hid, out)
        if part is not None:
            dx[n0:n1] = out
    return loss, dx


def _blocks(ws, rows, k, cols, klw, cap_grad=False):
    """The workspace as the stacked logits ``(rows, cols)``, for KL the ``(k, cols)`` ``z_t - z_s``,
    and with ``cap_grad`` the ``(k, cols)`` derivative of the cap at the student's logits."""
    z = ws[: rows * cols].view(rows, cols)
    end = (rows + k * bool(klw)) * cols
    diff = ws[rows * cols: end].view(k, cols) if klw else None
    return z, diff, ws[end: end + k * cols].view(k, cols) if cap_grad else None


def _softcap_(z, k, terms, fac):
    """In place on the stacked logits ``z``: each block soft-capped at its own scale (``1/T`` for the
    KL blocks, 1 for the CE block), ``cap * tanh(raw / cap)`` of the raw logits; into ``fac`` (when
    given) ``1 - tanh^2(raw / cap)`` of the student's, the derivative every student block shares."""
    T, klw, _cew, sep_ce, cap = terms
    scales = ([1.0 / T, 1.0 / T] if klw else []) + ([1.0] if sep_ce or not klw else [])
    for b, s in enumerate(scales):
        block = z[b * k:(b + 1) * k]
        block.mul_(1.0 / (cap * s)).tanh_()
        if fac is not None and b == (1 if klw else 0):
            torch.mul(block, block, out=fac).neg_().add_(1.0)
        block.mul_(cap * s)


def _torch_full_vocab(x, k, w, y, ws, cols, terms, scale, hid, out):
    """Loss rows of the token chunk whose ``k`` rows per block are stacked in ``x``, and
    ``out = hid + dX`` when ``out`` is given. Every logits block comes from one GEMM and stays in
    the workspace; one fused softmax turns them all into probabilities in place, and
    ``lse = max - log p[argmax]`` (that p is ``1 / sum e^{z - max}``). Few ops, each over the whole
    chunk: on a CPU every op is a parallel region, which costs milliseconds when cores are shared."""
    T, klw, cew, sep_ce, cap = terms
    z, diff, fac = _blocks(ws, x.shape[0], k, cols, klw, bool(cap) and out is not None)
    torch.mm(x, w.T, out=z)
    if cap:
        _softcap_(z, k, terms, fac)
    m, top = z.max(1)
    loss = torch.zeros(k, dtype=z.dtype, device=z.device)
    if cew:
        z_lab = z[-k:].gather(1, y[:, None])[:, 0]
    if klw:
        torch.sub(z[:k], z[k:2 * k], out=diff)
    torch.ops.aten._softmax.out(z, 1, False, out=z)
    lp = torch.log(z.gather(1, top[:, None])[:, 0])  # -log sum e^{z - max}
    if klw:
        # lse_s - lse_t as (m_s - m_t) + log(S_s / S_t): see _kl
        gap = _rowdot(z[:k], diff)
        loss += (klw * T * T) * (gap + (m[k:2 * k] - m[:k]) + (lp[:k] - lp[k:2 * k]))
    if cew:
        loss += cew * ((m[-k:] - lp[-k:]) - z_lab)
    if out is not None:
        g, coef = _dlogits_(z, k, y, 0, klw * T, cew, sep_ce)
        if fac is not None:
            g.mul_(fac)
        torch.addmm(out if hid is None else hid, g, w, beta=0.0 if hid is None else 1.0, alpha=coef * scale, out=out)
    return loss


def _torch_vocab_slices(x, k, w, y, ws, cols, terms, scale, hid, out):
    """The same when fewer than TORCH_MIN_ROWS rows of the vocabulary fit: online log-sum-exp
    statistics over vocabulary slices of ``cols`` columns, then (for ``out``) a second pass that
    recomputes each slice's logits for ``dlogits``."""
    T, klw, cew, sep_ce, cap = terms
    rows, V = x.shape[0], w.shape[0]
    m = torch.full((rows,), _NEG, dtype=ws.dtype, device=ws.device)
    s = torch.zeros_like(m)
    gap, z_lab = torch.zeros(k, dtype=ws.dtype, device=ws.device), 0.0
    for v0 in range(0, V, cols):
        c = min(cols, V - v0)
        z, diff, _ = _blocks(ws, rows, k, c, klw)
        torch.mm(x, w[v0:v0 + c].T, out=z)
        if cap:
            _softcap_(z, k, terms, None)
        if cew:
            inside, col = _label_cols(y, v0, c)
            z_lab = z_lab + torch.where(inside, z[-k:].gather(1, col[:, None])[:, 0], 0.0)
        m_new = torch.maximum(m, z.amax(1))
        alpha = torch.exp(m - m_new)
        s.mul_(alpha)
        if klw:
            torch.sub(z[:k], z[k:2 * k], out=diff)
        z.sub_(m_new[:, None]).exp_()
        s += z.sum(1)
        if klw:
            gap.mul_(alpha[:k]).add_(_rowdot(z[:k], diff))
        m = m_new
    loss = torch.zeros(k, dtype=ws.dtype, device=ws.device)
    if klw:
        loss += (klw * T * T) * _kl(gap, m[k:2 * k], s[k:2 * k], m[:k], s[:k])
    lse = m + torch.log(s)
    if cew:
        loss += cew * (lse[-k:] - z_lab)
    if out is None:
        return loss
    acc = hid if hid is not None else torch.zeros_like(out)
    for v0 in range(0, V, cols):
        c = min(cols, V - v0)
        z, _, fac = _blocks(ws, rows, k, c, False, bool(cap))
        torch.mm(x, w[v0:v0 + c].T, out=z)
        if cap:
            _softcap_(z, k, terms, fac)
        z.sub_(lse[:, None]).exp_()
        g, coef = _dlogits_(z, k, y, v0, klw * T, cew, sep_ce)
        if fac is not None:
            g.mul_(fac)
        acc.addmm_(g, w[v0:v0 + c], alpha=coef * scale)
    out.copy_(acc)
    return loss
