"""Naive float64 oracles: the plainest statement of each op, for comparing every backend against."""

import torch


def decomposed_prompts(shared, task_cols, task_rows, task_ids):
    """(B, l, d) float64: one prompt per batch item, a loop over items, no fusion."""
    S, C, R = shared.double(), task_cols.double(), task_rows.double()
    return torch.stack([S * (C[t] @ R[t]) for t in task_ids.tolist()])


def decomposed_prompts_grads(shared, task_cols, task_rows, task_ids, grad):
    """Float64 gradients of ``sum(decomposed_prompts(...) * grad)`` w.r.t. the three parameters."""
    params = [p.detach().double().requires_grad_() for p in (shared, task_cols, task_rows)]
    out = decomposed_prompts(*params, task_ids)
    return torch.autograd.grad(out, params, grad.double())


def assert_within_baseline(actual, oracle, baseline, *, name="", floor=None):
    """The house tolerance: the backend's error against the float64 oracle may be at most twice the
    error of plain torch in the same dtype (``baseline``), plus a small floor for exact cases."""
    if floor is None:
        floor = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[actual.dtype]
    err = (actual.double() - oracle).abs().max().item()
    base = (baseline.double() - oracle).abs().max().item()
    scale = max(oracle.abs().max().item(), 1.0)
    assert err <= 2 * base + floor * scale, f"{name}: error {err:.3g} > 2 x baseline {base:.3g} + floor {floor * scale:.3g}"


def prefix_attention(q, k, v, cu_seqlens, prefix_k=None, prefix_v=None, prefix_ids=None, *, prefix_lens=None,
                     softmax_scale=None, window=None, sinks=None, softcap=None):
    """Float64 (out (N, Hq, D), lse (N, Hq)): a loop over every query and head, keys listed by position."""
    N, hq, dim = q.shape
    g = hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else dim**-0.5
    out = torch.zeros(N, hq, dim, dtype=torch.float64)
    lse = torch.zeros(N, hq, dtype=torch.float64)
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        pid = -1 if prefix_ids is None else int(prefix_ids[b])
        plen = 0 if pid < 0 else (int(prefix_lens[pid]) if prefix_lens is not None else prefix_k.shape[1])
        keys = [(p, prefix_k[pid, p], prefix_v[pid, p]) for p in range(plen)]
        keys += [(plen + j, k[cu[b] + j], v[cu[b] + j]) for j in range(cu[b + 1] - cu[b])]
        for i in range(cu[b + 1] - cu[b]):
            pos = plen + i
            seen = [(kk, vv) for p, kk, vv in keys if p <= pos and (window is None or p > pos - window)]
            K = torch.stack([kk for kk, _ in seen]).double()  # (m, Hkv, D)
            V = torch.stack([vv for _, vv in seen]).double()
            for h in range(hq):
                s = (K[:, h // g] @ q[cu[b] + i, h].double()) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                if sinks is not None:
                    s = torch.cat([s, sinks[h].double().view(1)])
                p = torch.softmax(s, 0)[: len(seen)]
                out[cu[b] + i, h] = p @ V[:, h // g]
                lse[cu[b] + i, h] = torch.logsumexp(s, 0)
    return out, lse


def fused_distill_loss(student_hidden, teacher_hidden, weight, labels=None, *, temperature=1.0, kl_weight=1.0,
                       ce_weight=0.0, hidden_weight=0.0, ignore_index=-100, reduction="mean", logit_softcap=None):
    """Float64 distillation loss from full (N, V) logits: ``kl_weight*T^2*KL(p_t||p_s) + ce_weight*CE
    + hidden_weight*MSE`` per valid token, then the reduction. Differentiable in every input."""
    hs, ht, W = student_hidden.double(), teacher_hidden.double(), weight.double()
    T = temperature
    zs, zt = hs @ W.T, ht @ W.T
    if logit_softcap is not None:
        zs, zt = (logit_softcap * torch.tanh(z / logit_softcap) for z in (zs, zt))
    log_ps, log_pt = torch.log_softmax(zs / T, 1), torch.log_softmax(zt / T, 1)
    kl = T * T * (log_pt.exp() * (log_pt - log_ps)).sum(1)
    valid = torch.ones(hs.shape[0], dtype=torch.bool) if labels is None else (labels.cpu() != ignore_index)
    valid = valid.to(hs.device)
    loss = kl_weight * kl + hidden_weight * (hs - ht).square().mean(1)
    if ce_weight:
        safe = torch.where(valid, labels, 0)
        loss = loss + ce_weight * -torch.log_softmax(zs, 1).gather(1, safe[:, None])[:, 0]
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(int(valid.sum()), 1)


def fused_distill_loss_grad(student_hidden, teacher_hidden, weight, labels, grad, **kwargs):
    """Float64 gradient of ``sum(fused_distill_loss(...) * grad)`` w.r.t. ``student_hidden``."""
    hs = student_hidden.detach().double().requires_grad_()
    out = fused_distill_loss(hs, teacher_hidden.detach(), weight.detach(), labels, **kwargs)
    (g,) = torch.autograd.grad(out, hs, grad.double())
    return g
