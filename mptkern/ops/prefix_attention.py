"""Prefix-aware varlen attention: each packed sequence sees its parent prefix in full and itself causally.

Token j of sequence b sits at absolute position ``L_b + j`` (``L_b`` the length of its prefix, 0
without one). It attends to every prefix position and causally to its own tokens; with a window
``w`` only to keys at positions ``> pos - w`` (gpt-oss's sliding layers); per-head ``sinks`` add one
logit with no value to the softmax denominator. The prefix is read where it lies (by prefix id),
so a prefix shared by many sequences gets one gradient, summed over all of them.

Backends: ``torch`` here (any device; one sequence at a time, so memory is O(n * (L + n)) per
sequence and never O(N^2) over the packed batch). The Triton kernels are the prefix-attention
issue's; until then ``auto`` uses ``torch`` on every device.
"""

from __future__ import annotations

import math

import torch

from mptkern import backends

SUPPORTED_BACKENDS = ("torch",)


def _attend_one(q, k, v, n_prefix: int, scale: float, window, sinks):
    """One sequence. q (n, Hq, D); k, v (n_prefix + n, Hkv, D). Returns out (n, Hq, D), lse (n, Hq) fp32."""
    n, hq, dim = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    # (Hkv, G, n, D) x (Hkv, m, D) -> (Hkv, G, n, m): GQA without repeating K/V
    qh = q.permute(1, 0, 2).reshape(hkv, g, n, dim)
    scores = torch.matmul(qh.float(), k.permute(1, 2, 0).float().unsqueeze(1)) * scale
    q_pos = n_prefix + torch.arange(n, device=q.device)
    k_pos = torch.arange(n_prefix + n, device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # prefix keys precede every own token
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (Hkv, G, n)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float().view(hkv, g, 1))
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs.to(v.dtype), v.permute(1, 0, 2).unsqueeze(1))  # (Hkv, G, n, D)
    return out.reshape(hq, n, dim).permute(1, 0, 2), lse.reshape(hq, n).t()


def _prefix_attention_torch(q, k, v, cu, prefix_k, prefix_v, prefix_ids, prefix_lens, scale, window, sinks):
    outs, lses = [], []
    bounds = cu.tolist()
    pids = prefix_ids.tolist() if prefix_ids is not None else [-1] * (len(bounds) - 1)
    plens = prefix_lens.tolist() if prefix_lens is not None else None
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if e == s:
            continue
        kb, vb, n_prefix = k[s:e], v[s:e], 0
        if pids[b] >= 0:
            n_prefix = plens[pids[b]] if plens is not None else prefix_k.shape[1]
            kb = torch.cat([prefix_k[pids[b], :n_prefix], kb])
            vb = torch.cat([prefix_v[pids[b], :n_prefix], vb])
        o, lse = _attend_one(q[s:e], kb, vb, n_prefix, scale, window, sinks)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _validate(q, k, v, cu, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks):
    def fail(msg):
        raise ValueError(msg)

    if q.dim() != 3:
        fail(f"q must have shape (N, Hq, D), got {tuple(q.shape)}")
    N, hq, dim = q.shape
    if N == 0:
        fail("q is empty: expected (N, Hq, D) with N >= 1")
    if k.dim() != 3 or k.shape[0] != N or k.shape[2] != dim or v.shape != k.shape:
        fail(f"k and v must have shape (N={N}, Hkv, D={dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        fail(f"q's heads ({hq}) must be a multiple of k's heads ({hkv})")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            fail(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if not q.dtype.is_floating_point:
        fail(f"q must be floating point, got {q.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2 or cu.dtype not in (torch.int32, torch.int64) or cu.device != q.device:
        fail(f"cu_seqlens must be an int32 tensor of shape (B+1,) on {q.device}, got {cu.dtype} {tuple(cu.shape)} on {cu.device}")
    B = cu.shape[0] - 1
    c = cu.tolist()
    if c[0] != 0 or c[-1] != N or any(a > b for a, b in zip(c, c[1:])):
        fail(f"cu_seqlens must rise from 0 to N={N}, got {c if len(c) <= 12 else c[:6] + ['...'] + c[-3:]}")
    if (prefix_k is None) != (prefix_v is None) or (prefix_k is None) != (prefix_ids is None):
        fail("prefix_k, prefix_v and prefix_ids must be given together")
    if prefix_k is not None:
        if prefix_k.dim() != 4 or prefix_k.shape[2:] != (hkv, dim) or prefix_v.shape != prefix_k.shape:
            fail(f"prefix_k and prefix_v must have shape (P, Lp, Hkv={hkv}, D={dim}), got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype or t.device != q.device:
                fail(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
        P, Lp = prefix_k.shape[:2]
        if prefix_ids.shape != (B,) or prefix_ids.dtype.is_floating_point or prefix_ids.dtype == torch.bool:
            fail(f"prefix_ids must be an integer tensor of shape (B={B},), got {prefix_ids.dtype} {tuple(prefix_ids.shape)}")
        if prefix_ids.numel() and (int(prefix_ids.min()) < -1 or int(prefix_ids.max()) >= P):
            fail(f"prefix_ids must lie in [-1, {P}) (-1: no prefix), got values in [{int(prefix_ids.min())}, {int(prefix_ids.max())}]")
        if prefix_lens is not None:
            if prefix_lens.shape != (P,) or prefix_lens.dtype.is_floating_point:
                fail(f"prefix_lens must be an integer tensor of shape (P={P},), got {prefix_lens.dtype} {tuple(prefix_lens.shape)}")
            if int(prefix_lens.min()) < 0 or int(prefix_lens.max()) > Lp:
                fail(f"prefix_lens must lie in [0, Lp={Lp}]")
    elif prefix_lens is not None:
        fail("prefix_lens given without prefix_k")
    if window is not None and (not isinstance(window, int) or window < 1):
        fail(f"window must be a positive int or None, got {window!r}")
    if sinks is not None and (sinks.shape != (hq,) or sinks.device != q.device):
        fail(f"sinks must have shape (Hq={hq},) on {q.device}, got {tuple(sinks.shape)} on {sinks.device}")


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    prefix_ids: torch.Tensor | None = None,
    *,
    prefix_lens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Varlen causal attention where each sequence also sees a whole parent prefix.

    Args:
        q: ``(N, Hq, D)`` fp32/bf16/fp16, B sequences packed back to back.
        k, v: ``(N, Hkv, D)``, same dtype; GQA when ``Hq`` is a multiple of ``Hkv``.
        cu_seqlens: ``(B+1,)`` int32, sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``.
        prefix_k, prefix_v: ``(P, Lp, Hkv, D)`` prefix keys/values (e.g. one per task prompt).
        prefix_ids: ``(B,)`` integer, the prefix of each sequence, -1 for none.
        prefix_lens: ``(P,)`` integer valid length of each prefix (default ``Lp``).
        softmax_scale: default ``D ** -0.5``.
        window: keys at positions ``> pos - window`` only (positions counted from the prefix start).
        sinks: ``(Hq,)`` one logit per head added to the softmax denominator, no value (gpt-oss).
        return_lse: also return the fp32 natural-log LSE ``(N, Hq)`` (sinks included).

    Returns ``(N, Hq, D)`` in q's dtype (and the LSE). Differentiable w.r.t. q, k, v, prefix_k,
    prefix_v and sinks.
    """
    _validate(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks)
    backend = backends.resolve(backend, q.device, supported=SUPPORTED_BACKENDS)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _prefix_attention_torch(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, scale, window, sinks)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
