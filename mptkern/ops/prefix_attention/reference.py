"""The torch path of prefix attention (any device): the reference the kernels are held to, and what
CPU training runs. One sequence at a time, so memory is O(n (L + n)) per sequence and never O(N^2)
over the packed batch, with a hand-written backward (flash-attention's recipe: probabilities
recomputed from the saved LSE) that writes gradients straight into preallocated buffers."""

from __future__ import annotations

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the torch path: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softcap_(scores, softcap):
    """In place: ``softcap * tanh(scores / softcap)`` (Gemma 2's logit soft-capping), or nothing."""
    return scores if softcap is None else scores.div_(softcap).tanh_().mul_(softcap)


def _scores(q, k, n_prefix: int, scale: float, masks, softcap=None):
    """fp32 masked scores of one sequence: q (n, Hq, D), k (n_prefix + n, Hkv, D) -> (Hkv, G, n, m),
    and q as (Hkv, G, n, D); ``masks`` from :meth:`PrefixAttentionPlan.blocked_masks`."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    # (Hkv, G*n, D) x (Hkv, D, m): GQA as one bmm per KV head, K neither repeated nor broadcast
    acc = _acc(q.dtype)
    q2 = q.permute(1, 0, 2).to(acc).reshape(hkv, g * n, dim)  # a copy: heads-major rows
    scores = _softcap_(torch.bmm(q2, k.permute(1, 2, 0).to(acc)).mul_(scale), softcap).view(hkv, g, n, -1)
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


def _attend_one(q, k, v, n_prefix: int, scale: float, masks, sinks, softcap=None):
    """One sequence. q (n, Hq, D); k, v (n_prefix + n, Hkv, D). Returns out (n, Hq, D) fp32, lse (n, Hq) fp32."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    scores, _ = _scores(q, k, n_prefix, scale, masks, softcap)  # (Hkv, G, n, m)
    if sinks is not None:
        sinks = sinks.to(scores.dtype).view(hkv, hq // hkv, 1).expand(-1, -1, n).reshape(hkv, -1, 1)
    out, lse = _softmax_attend(scores.view(hkv, -1, k.shape[0]), v.permute(1, 0, 2).to(scores.dtype), sinks)
    return out.view(hq, n, dim).permute(1, 0, 2), lse.view(hq, n).t()


def _keys(t, prefix, s, e, pid, n_prefix):
    return torch.cat([prefix[pid, :n_prefix], t[s:e]]) if n_prefix else t[s:e]


class TorchPrefixAttention(torch.autograd.Function):
    """``apply(q, k, v, prefix_k, prefix_v, sinks, plan, scale, window, softcap)`` -> (out, lse) fp32: one
    sequence at a time through the plan's rows; no per-sequence slice makes autograd touch the whole
    packed batch."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, sinks, plan, scale, window, softcap):
        out = torch.empty(q.shape, dtype=_acc(q.dtype), device=q.device)
        lse = torch.empty(q.shape[:2], dtype=_acc(q.dtype), device=q.device)
        masks = plan.blocked_masks(window)
        for s, e, pid, n_prefix in plan.torch_rows():
            o, l = _attend_one(q[s:e], _keys(k, prefix_k, s, e, pid, n_prefix), _keys(v, prefix_v, s, e, pid, n_prefix),
                               n_prefix, scale, masks, sinks, softcap)
            out[s:e], lse[s:e] = o, l
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, sinks, out, lse)
        ctx.plan, ctx.scale, ctx.window, ctx.softcap = plan, scale, window, softcap
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
        masks = ctx.plan.blocked_masks(ctx.window)
        for s, e, pid, n_prefix in ctx.plan.torch_rows():
            n = e - s
            kb = _keys(k, prefix_k, s, e, pid, n_prefix)
            vb = _keys(v, prefix_v, s, e, pid, n_prefix).permute(1, 0, 2).to(out.dtype).unsqueeze(1)  # (Hkv, 1, m, D)
            scores, qh = _scores(q[s:e], kb, n_prefix, ctx.scale, masks, ctx.softcap)
            l = lse[s:e].t().reshape(hkv, g, n, 1)
            p = torch.exp(scores - l)  # (Hkv, G, n, m)
            do = dout[s:e].permute(1, 0, 2).reshape(hkv, g, n, dim)
            o = out[s:e].permute(1, 0, 2).reshape(hkv, g, n, dim)
            delta = (do * o).sum(-1, keepdim=True)  # rowsum(dO * O)
            dl = dlse[s:e].t().reshape(hkv, g, n, 1) if dlse is not None else 0.0
            ds = p * (torch.matmul(do, vb.transpose(-1, -2)) - delta + dl)  # dL/dscores
            if ctx.softcap is not None:  # through the cap: d(c tanh(x / c))/dx = 1 - (capped / c)^2 (0 where masked)
                ds *= (1 - (scores / ctx.softcap).square_()).clamp_(min=0)
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
                None, None, None, None)
