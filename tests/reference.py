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
