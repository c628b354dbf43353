"""Prefix-aware varlen attention: each packed sequence sees its parent prefix in full and itself causally.

Token j of sequence b sits at absolute position ``L_b + j`` (``L_b`` the length of its prefix, 0
without one). It attends to every prefix position and causally to its own tokens; with a window
``w`` only to keys at positions ``> pos - w`` (gpt-oss's sliding layers); per-head ``sinks`` add one
logit with no value to the softmax denominator. The prefix is read where it lies (by prefix id),
so a prefix shared by many sequences gets one gradient, summed over all of them.

The package, by module: :mod:`.plan` (the layouts, checked and prepared once per batch and read by
every layer), :mod:`.validate` (argument checks), :mod:`.reference` (the torch path, any device),
:mod:`.tiles` (what the kernels share), :mod:`.triton_fwd` and :mod:`.triton_bwd` (training and
prefill), :mod:`.decode` (one new token per sequence, dense or paged, torch and Triton), :mod:`.aot`
(the shipped configurations for the compile check); here: the ``torch.library`` ops with autograd
and the public functions :func:`prefix_attention` and :func:`prefix_attention_decode`.

Backends: ``torch`` (any device) and ``triton`` (the CUDA default; CPU tensors under
``TRITON_INTERPRET=1``). LSEs are natural-log fp32 everywhere they leave a kernel (base-2 only
inside).
"""

from __future__ import annotations

import math

import torch

from mptkern import backends
from mptkern.ops.prefix_attention.decode import _decode_torch, _decode_torch_paged, _decode_triton
from mptkern.ops.prefix_attention.plan import (PagedDecodePlan, PrefixAttentionPlan, plan_from_tensors,
                                               plan_paged_decode, plan_prefix_attention)
from mptkern.ops.prefix_attention.reference import TorchPrefixAttention
from mptkern.ops.prefix_attention.tiles import _check_offsets, _config, triton_unsupported
from mptkern.ops.prefix_attention.triton_bwd import _bwd_triton
from mptkern.ops.prefix_attention.triton_fwd import _fwd_triton
from mptkern.ops.prefix_attention.validate import (_validate, _validate_decode, _validate_planned,
                                                   _validate_planned_decode)

__all__ = ["prefix_attention", "prefix_attention_decode", "plan_prefix_attention", "PrefixAttentionPlan",
           "plan_paged_decode", "PagedDecodePlan", "triton_unsupported"]

SUPPORTED_BACKENDS = ("torch", "triton")


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile) with autograd: the triton backend
# ----------------------------------------------------------------------------------------------
# The plan's layout tensors (int32, on q's device) are arguments: cu_seqlens (B+1,), prefix_ids (B,),
# prefix_lens (P,), the query schedules of the forward and dQ configs and the dK/dV key schedule.
@torch.library.custom_op("mptkern::prefix_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, prefix_ids: torch.Tensor | None,
    prefix_lens: torch.Tensor | None, sinks: torch.Tensor | None, softmax_scale: float, window: int,
    fwd_schedule: torch.Tensor, dq_schedule: torch.Tensor, key_items: torch.Tensor, key_order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (N, Hq, D), lse (N, Hq) fp32); ``window`` 0 means none."""
    return _fwd_triton(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, softmax_scale, window,
                       fwd_schedule)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, softmax_scale, window, *schedules):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("mptkern::prefix_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None, prefix_ids: torch.Tensor | None, prefix_lens: torch.Tensor | None,
    sinks: torch.Tensor | None, softmax_scale: float, window: int,
    dq_schedule: torch.Tensor, key_items: torch.Tensor, key_order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v, dsinks); the last three are empty when their input is None."""
    grads = _bwd_triton(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens,
                        sinks, softmax_scale, window, dq_schedule, key_items, key_order)
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks,
      softmax_scale, window, *schedules):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else q.new_empty(0)  # noqa: E731
    return like(q), like(k), like(v), like(prefix_k), like(prefix_v), like(sinks)


def _setup_context(ctx, inputs, output):
    q, k, v, cu, pk, pv, ids, lens, sinks, scale, window, _fwd_sched, dq_sched, items, order = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cu, pk, pv, ids, lens, sinks, out, lse, dq_sched, items, order)
    ctx.scale, ctx.window = scale, window


def _backward(ctx, grad_out, grad_lse):
    q, k, v, cu, pk, pv, ids, lens, sinks, out, lse, dq_sched, items, order = ctx.saved_tensors
    dq, dk, dv, dpk, dpv, ds = torch.ops.mptkern.prefix_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, cu, pk, pv, ids, lens, sinks, ctx.scale, ctx.window, dq_sched, items, order
    )
    opt = lambda g, t: g if t is not None else None  # noqa: E731
    return (dq, dk, dv, None, opt(dpk, pk), opt(dpv, pv), None, None, opt(ds, sinks), None, None,
            None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mptkern::prefix_attention_decode", mutates_args=())
def _decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
    prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, prefix_ids: torch.Tensor | None,
    prefix_lens: torch.Tensor | None, sinks: torch.Tensor | None, softmax_scale: float, window: int,
    block_tables: torch.Tensor | None, prefix_block_tables: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, D), lse (B, Hq) fp32); ``window`` 0 means none; ``block_tables`` None: dense slabs."""
    return _decode_triton(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks,
                          softmax_scale, window, block_tables, prefix_block_tables)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, sinks, softmax_scale, window,
      block_tables, prefix_block_tables):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)



# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _validate_softcap(softcap):
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")


def _pick_backend(backend: str, q: torch.Tensor, softcap: float | None = None) -> str:
    """resolve(), then: the kernels cover fp32/bf16/fp16, head dims 16..128 and no softcap; ``auto``
    (or the environment) falls back to torch outside that, an explicit ``backend="triton"`` raises."""
    chosen = backends.resolve(backend, q.device, SUPPORTED_BACKENDS, "prefix_attention")
    if chosen == "triton":
        why = triton_unsupported(q, softcap)
        if why:
            if backend == "triton":
                raise ValueError(why)
            chosen = "torch"
    return chosen


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    prefix_ids: torch.Tensor | None = None,
    *,
    prefix_lens: torch.Tensor | None = None,
    plan: PrefixAttentionPlan | None = None,
    softmax_scale: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Varlen causal attention where each sequence also sees a whole parent prefix.

    Args:
        q: ``(N, Hq, D)`` fp32/bf16/fp16, B sequences packed back to back.
        k, v: ``(N, Hkv, D)``, same dtype; GQA when ``Hq`` is a multiple of ``Hkv``.
        cu_seqlens: ``(B+1,)`` int32, sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``.
        prefix_k, prefix_v: ``(P, Lp, Hkv, D)`` prefix keys/values (e.g. one per task prompt), read
            in place (views with any row/head strides are fine, e.g. rows of ``k`` itself).
        prefix_ids: ``(B,)`` integer, the prefix of each sequence, -1 for none.
        prefix_lens: ``(P,)`` integer valid length of each prefix (default ``Lp``).
        plan: instead of ``cu_seqlens``, ``prefix_ids`` and ``prefix_lens``, the layout made once by
            :func:`plan_prefix_attention` from host-side lengths, for every layer of a forward and its
            backward: the call then reads nothing from the device and builds no schedule. Without
            a plan the call makes one, reading those three tensors (a host sync on a GPU). Pass one
            under ``torch.compile(fullgraph=True)``.
        softmax_scale: default ``D ** -0.5``.
        window: keys at positions ``> pos - window`` only (positions counted from the prefix start).
        sinks: ``(Hq,)`` one logit per head added to the softmax denominator, no value (gpt-oss).
        softcap: scaled scores become ``softcap * tanh(score / softcap)`` before the mask (Gemma 2);
            the torch path only (``auto`` picks it; ``backend="triton"`` raises).
        return_lse: also return the fp32 natural-log LSE ``(N, Hq)`` (sinks included).
        backend: ``"auto" | "torch" | "triton"``; auto is triton on CUDA (head dims 16..128).

    Returns ``(N, Hq, D)`` in q's dtype (and the LSE). Differentiable w.r.t. q, k, v, prefix_k,
    prefix_v and sinks (and through the LSE). On the triton backend gradients are deterministic:
    two runs give bit-identical results.

    Example::

        q, k, v = torch.randn(12, 8, 64), torch.randn(12, 2, 64), torch.randn(12, 2, 64)
        pk, pv = torch.randn(3, 100, 2, 64), torch.randn(3, 100, 2, 64)   # 3 task prompts
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)                   # 2 sequences
        out = prefix_attention(q, k, v, cu, pk, pv, torch.tensor([2, 0]))  # (12, 8, 64)
        plan = plan_prefix_attention([5, 7], [2, 0], prefix_shape=(3, 100))  # once, for every layer
        out = prefix_attention(q, k, v, None, pk, pv, plan=plan)
    """
    if plan is not None:
        if not isinstance(plan, PrefixAttentionPlan):
            raise TypeError(f"plan must be a PrefixAttentionPlan (plan_prefix_attention), got {type(plan).__name__}")
        if any(t is not None for t in (cu_seqlens, prefix_ids, prefix_lens)):
            raise ValueError("with plan=, cu_seqlens, prefix_ids and prefix_lens come from the plan")
        _validate_planned(q, k, v, prefix_k, prefix_v, plan, window, sinks)
    elif cu_seqlens is None:
        raise ValueError("give cu_seqlens (or a plan)")
    else:
        _validate(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks)
        plan = plan_from_tensors(cu_seqlens, prefix_ids, prefix_lens, prefix_k, q.shape[0])
    _validate_softcap(softcap)
    backend = _pick_backend(backend, q, softcap)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "triton":
        dim = q.shape[-1]
        _check_offsets((plan.max_seqlen, max(q.stride(0), k.stride(0), v.stride(0), q.shape[1] * dim)),
                       *[(t.shape[1], t.stride(1)) for t in (prefix_k, prefix_v) if t is not None])
        items, order = plan.key_schedule(_config("dkdv", dim, q.dtype)[1])
        out, lse = torch.ops.mptkern.prefix_attention_fwd(
            q, k, v, plan.cu_seqlens, prefix_k, prefix_v, plan.prefix_ids, plan.prefix_lens, sinks, float(scale),
            int(window or 0), plan.query_schedule(_config("fwd", dim, q.dtype)[0]),
            plan.query_schedule(_config("dq", dim, q.dtype)[0]), items, order,
        )
    else:
        out, lse = TorchPrefixAttention.apply(q, k, v, prefix_k, prefix_v, sinks, plan, scale, window, softcap)
        out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def prefix_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor | None = None,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    prefix_ids: torch.Tensor | None = None,
    *,
    prefix_lens: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    prefix_block_tables: torch.Tensor | None = None,
    plan: PagedDecodePlan | None = None,
    softmax_scale: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """One decode step: each sequence's newest token attends to its task prefix plus its own cache.

    Args:
        q: ``(B, Hq, D)`` fp32/bf16/fp16, the query of each sequence's newest token.
        k_cache, v_cache: each sequence's own tokens only, the newest already appended. Dense (no
            ``block_tables``): ``(B, S, Hkv, D)``, one slab per sequence (slot), rows
            ``0..cache_lens[b]-1`` valid. Paged: pools ``(num_blocks, block_size, Hkv, D)``; sequence
            b's key j is ``k_cache[block_tables[b, j // block_size], j % block_size]``.
        cache_lens: ``(B,)`` integer >= 1. The query sits at absolute position ``L_b + cache_lens[b] - 1``.
        prefix_k, prefix_v: the per-task prompt K/V, read in place; prefix_ids ``(B,)`` picks one per
            sequence (-1: none); prefix_lens ``(P,)`` (default ``Lp``; required when paged). Dense:
            ``(P, Lp, Hkv, D)``. Paged: pools ``(num_blocks', block_size, Hkv, D)`` with the cache's
            block_size (in practice the very same pools as k_cache/v_cache); prefix p's key i is
            ``prefix_k[prefix_block_tables[p, i // block_size], i % block_size]``.
        block_tables: ``(B, max_blocks)`` int32 (int64 accepted), the paged layout; entries past
            ``ceil(cache_lens[b] / block_size)`` are never read (-1 or anything).
        prefix_block_tables: ``(P, max_prefix_blocks)`` int32 (int64 accepted), the prefixes' tables;
            paged mode only, and required there when a prefix is given.
        softmax_scale, window, sinks, softcap: as in :func:`prefix_attention` (window in absolute positions).
        return_lse: also return the fp32 natural-log LSE ``(B, Hq)``.

    Returns ``(B, Hq, D)`` in q's dtype (and the LSE): exactly the last row of
    :func:`prefix_attention` over the same tokens, in either layout. Inference only (not
    differentiable). Every cache or pool may have any strides with a unit stride along D (e.g. a
    head-major ``(.., Hkv, S or block_size, D)`` store passed as its ``transpose(1, 2)`` view).

    Two layouts. Dense slabs suit a fixed, small number of slots with short caches (the prompt K/V
    is shared per task, so a slab holds only a request's input and generated tokens): no tables,
    plain strided row loads. Paged pools suit an engine that shares prefix blocks between requests
    and sizes one pool of blocks from a memory budget: a sequence holds only the blocks it fills,
    a prefix is a list of blocks that any number of requests point at, and the kernel looks up
    each key row's block in the table. In both, the triton launch takes only device tensors of
    host-known shape (split plan from capacities, no host sync). The torch path, dense, reads the
    longest cache length and (with a prefix) the prefix ids on the host, to group the sequences by
    prefix; paged, it makes no host sync: it gathers every sequence's keys, and its prefix's keys, through the
    tables in one batch (so a shared prefix is read once per sequence using it, not once per call).

    Shapes, dtypes and devices are checked always; values (``cache_lens`` in ``[1, S]`` or
    ``[1, max_blocks * block_size]``, ``prefix_ids`` in ``[-1, P)``, ``prefix_lens``, the table
    entries in use) only for CPU tensors, since reading CUDA values would sync with the host.

    Example::

        q = torch.randn(4, 8, 64); kc, vc = torch.randn(2, 4, 256, 2, 64).unbind(0)
        pk, pv = torch.randn(2, 3, 100, 2, 64).unbind(0)
        out = prefix_attention_decode(q, kc, vc, torch.tensor([5, 1, 256, 9]), pk, pv, torch.tensor([0, 2, -1, 0]))
        # paged: blocks of 16 rows in one pool, shared by the caches and the prefixes
        pool_k, pool_v = torch.randn(2, 64, 16, 2, 64).unbind(0)
        tables = torch.tensor([[3, -1], [7, 8], [9, -1], [10, 11]], dtype=torch.int32)  # 4 sequences
        ptables = torch.tensor([[0, 1, 2]], dtype=torch.int32)  # one prefix of up to 48 rows
        out = prefix_attention_decode(q, pool_k, pool_v, torch.tensor([5, 17, 16, 32]), pool_k, pool_v,
                                      torch.tensor([0, 0, -1, 0]), prefix_lens=torch.tensor([40]),
                                      block_tables=tables, prefix_block_tables=ptables)
    """
    if plan is not None:
        if any(t is not None for t in (cache_lens, prefix_ids, prefix_lens, block_tables, prefix_block_tables)):
            raise ValueError("with plan=, cache_lens, prefix_ids, prefix_lens and the block tables come from the plan")
        if not isinstance(plan, PagedDecodePlan):
            raise TypeError(f"plan must be a PagedDecodePlan (plan_paged_decode), got {type(plan).__name__}")
        _validate_planned_decode(q, k_cache, v_cache, prefix_k, prefix_v, plan, window, sinks)
    elif cache_lens is None:
        raise ValueError("give cache_lens (or a plan)")
    else:
        _validate_decode(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens, window, sinks,
                         block_tables, prefix_block_tables)
        if block_tables is not None:  # planned here, for this call alone
            plan = plan_paged_decode(cache_lens, block_tables, block_size=k_cache.shape[1], num_blocks=k_cache.shape[0],
                                     prefix_ids=prefix_ids if prefix_k is not None else None,
                                     prefix_lens=prefix_lens if prefix_k is not None else None,
                                     prefix_block_tables=prefix_block_tables if prefix_k is not None else None)
    if plan is not None:
        cache_lens, prefix_ids, prefix_lens = plan.cache_lens, plan.prefix_ids, plan.prefix_lens
        block_tables, prefix_block_tables = plan.block_tables, plan.prefix_block_tables
    _validate_softcap(softcap)
    backend = _pick_backend(backend, q, softcap)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "triton":
        as32 = lambda t: t.to(torch.int32) if t is not None else None  # noqa: E731
        out, lse = torch.ops.mptkern.prefix_attention_decode(
            q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, as32(prefix_ids), as32(prefix_lens), sinks,
            float(scale), int(window or 0), as32(block_tables), as32(prefix_block_tables),
        )
    else:
        with torch.no_grad():
            if plan is not None:
                out, lse = _decode_torch_paged(q, k_cache, v_cache, prefix_k, prefix_v, plan, scale, window, sinks,
                                               softcap)
            else:
                out, lse = _decode_torch(q, k_cache, v_cache, cache_lens, prefix_k, prefix_v, prefix_ids, prefix_lens,
                                         scale, window, sinks, softcap)
    return (out, lse) if return_lse else out

