"""Decomposed multitask prompts: ``out[b] = shared * (task_cols[t_b] @ task_rows[t_b])``.

The student prompt of Multitask Prompt Tuning (Wang et al., ICLR 2023), in the parameter layout of
PEFT's MultitaskPromptTuning: a shared prompt ``P* (l, d)`` scaled elementwise by a rank-r product
``U_t V_t`` per task. The package, by module: :mod:`.rows` (where
prompt rows land), :mod:`.reference` (torch), :mod:`.triton_fwd`, :mod:`.triton_bwd`, :mod:`.cuda`
(csrc/), :mod:`.validate`, :mod:`.aot`; here: the ``torch.library`` ops with autograd, dispatch and
the public function.

Backward reduces per task without float atomics: batch items are ordered by task, each program owns
a tile of the ``(l, d)`` plane and sums its tasks' gradients in a fixed order, so two runs give
bit-identical gradients on every backend.
"""

from __future__ import annotations

import torch

from mptkern import backends
from mptkern.ops.decomposed_prompts.cuda import _bwd_cuda, _fwd_cuda
from mptkern.ops.decomposed_prompts.reference import _bwd_torch, _fwd_torch
from mptkern.ops.decomposed_prompts.rows import _functional_offsets, _prompt_rows
from mptkern.ops.decomposed_prompts.triton_bwd import _bwd_triton
from mptkern.ops.decomposed_prompts.triton_fwd import _fwd_triton
from mptkern.ops.decomposed_prompts.validate import _check_values, _validate

__all__ = ["decomposed_prompts"]

_IMPLS = {"torch": (_fwd_torch, _bwd_torch), "triton": (_fwd_triton, _bwd_triton), "cuda": (_fwd_cuda, _bwd_cuda)}


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile) with autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("mptkern::decomposed_prompts", mutates_args=())
def _decomposed_prompts_op(
    shared: torch.Tensor, task_cols: torch.Tensor, task_rows: torch.Tensor, task_ids: torch.Tensor, backend: str
) -> torch.Tensor:
    _check_values(task_ids, task_cols.shape[0])
    B, (l, d) = task_ids.shape[0], shared.shape
    if backend == "torch":
        return _fwd_torch(shared, task_cols, task_rows, task_ids, None, None)
    out = torch.empty(B * l, d, dtype=shared.dtype, device=shared.device)
    _IMPLS[backend][0](shared, task_cols, task_rows, task_ids, out, _functional_offsets(task_ids, l))
    return out.view(B, l, d)


@_decomposed_prompts_op.register_fake
def _(shared, task_cols, task_rows, task_ids, backend):
    return shared.new_empty(task_ids.shape[0], *shared.shape)


@torch.library.custom_op("mptkern::decomposed_prompts_backward", mutates_args=())
def _decomposed_prompts_backward_op(
    grad: torch.Tensor, shared: torch.Tensor, task_cols: torch.Tensor, task_rows: torch.Tensor,
    task_ids: torch.Tensor, row_offsets: torch.Tensor | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the three parameters from ``grad (R, d)``; ``row_offsets=None`` means grad is
    the plain ``(B*l, d)`` result gradient."""
    return _IMPLS[backend][1](grad.contiguous(), shared, task_cols, task_rows, task_ids, row_offsets)


@_decomposed_prompts_backward_op.register_fake
def _(grad, shared, task_cols, task_rows, task_ids, row_offsets, backend):
    return torch.empty_like(shared), torch.empty_like(task_cols), torch.empty_like(task_rows)


def _setup_context(ctx, inputs, output):
    shared, task_cols, task_rows, task_ids, backend = inputs
    ctx.save_for_backward(shared, task_cols, task_rows, task_ids)
    ctx.backend = backend


def _backward(ctx, grad):
    shared, task_cols, task_rows, task_ids = ctx.saved_tensors
    grads = torch.ops.mptkern.decomposed_prompts_backward(
        grad.reshape(-1, shared.shape[1]), shared, task_cols, task_rows, task_ids, None, ctx.backend
    )
    return *grads, None, None


_decomposed_prompts_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mptkern::decomposed_prompts_into", mutates_args=("out",))
def _decomposed_prompts_into_op(
    out: torch.Tensor, shared: torch.Tensor, task_cols: torch.Tensor, task_rows: torch.Tensor,
    task_ids: torch.Tensor, row_offsets: torch.Tensor, backend: str,
) -> None:
    _check_values(task_ids, task_cols.shape[0], row_offsets, shared.shape[0], out.shape[0])
    _IMPLS[backend][0](shared, task_cols, task_rows, task_ids, out, row_offsets)


@_decomposed_prompts_into_op.register_fake
def _(out, shared, task_cols, task_rows, task_ids, row_offsets, backend):
    return None


class _DecomposedPromptsInto(torch.autograd.Function):
    """Autograd for the in-place write: prompt rows of ``out`` are overwritten, so ``out``'s other
    rows pass their gradient through and the prompt rows' gradient goes to the parameters."""

    @staticmethod
    def forward(ctx, out, shared, task_cols, task_rows, task_ids, row_offsets, backend):
        torch.ops.mptkern.decomposed_prompts_into(out, shared, task_cols, task_rows, task_ids, row_offsets, backend)
        ctx.mark_dirty(out)
        ctx.save_for_backward(shared, task_cols, task_rows, task_ids, row_offsets)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad):
        shared, task_cols, task_rows, task_ids, row_offsets = ctx.saved_tensors
        grads = torch.ops.mptkern.decomposed_prompts_backward(
            grad, shared, task_cols, task_rows, task_ids, row_offsets, ctx.backend
        )
        grad_out = None
        if ctx.needs_input_grad[0]:
            grad_out = grad.index_fill(0, _prompt_rows(row_offsets, shared.shape[0]), 0.0)
        return grad_out, *grads, None, None, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

def decomposed_prompts(
    shared: torch.Tensor,
    task_cols: torch.Tensor,
    task_rows: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    row_offsets: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-item prompts of a decomposed multitask prompt.

    Args:
        shared: ``(l, d)`` fp32/bf16/fp16, the shared prompt ``P*`` (PEFT ``prompt_embeddings``).
        task_cols: ``(K, l, r)``, same dtype, PEFT ``prefix_task_cols``.
        task_rows: ``(K, r, d)``, same dtype, PEFT ``prefix_task_rows``.
        task_ids: ``(B,)`` integer in ``[0, K)``, the task of each batch item.
        out: optional contiguous ``(R, d)`` buffer (e.g. a packed embedding stream); item ``b``'s
            ``l`` rows are written to ``out[row_offsets[b] : row_offsets[b] + l]`` and ``out`` is
            returned. Differentiable: the overwritten rows' gradient flows to the parameters.
        row_offsets: ``(B,)`` integer, required with ``out``.
        backend: ``"auto" | "torch" | "triton" | "cuda"`` (see :mod:`mptkern.backends`).

    Returns:
        ``(B, l, d)`` in the parameters' dtype with ``out[b] = shared * (task_cols[t] @ task_rows[t])``,
        ``t = task_ids[b]``, accumulated in fp32 on the GPU backends; or ``out`` when given.

    Example::

        P, U, V = torch.randn(100, 576), torch.rand(8, 100, 1), torch.rand(8, 1, 576)
        prompts = decomposed_prompts(P, U, V, torch.tensor([3, 0, 3]))  # (3, 100, 576)
    """
    backend = backends.resolve(backend, shared.device, op="decomposed_prompts")
    _validate(shared, task_cols, task_rows, task_ids, out, row_offsets, backend)
    task_ids = task_ids.to(torch.int64).contiguous()
    if backend != "torch":
        shared, task_cols, task_rows = shared.contiguous(), task_cols.contiguous(), task_rows.contiguous()
    if out is None:
        return torch.ops.mptkern.decomposed_prompts(shared, task_cols, task_rows, task_ids, backend)
    row_offsets = row_offsets.to(torch.int64).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, shared, task_cols, task_rows)):
        return _DecomposedPromptsInto.apply(out, shared, task_cols, task_rows, task_ids, row_offsets, backend)
    torch.ops.mptkern.decomposed_prompts_into(out, shared, task_cols, task_rows, task_ids, row_offsets, backend)
    return out

