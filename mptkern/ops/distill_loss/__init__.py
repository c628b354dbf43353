"""Fused distillation loss on a frozen lm_head: ``kl_weight*T^2*KL + ce_weight*CE + hidden_weight*MSE``.

The source stage of Multitask Prompt Tuning trains the student prompt against teacher prompts on
the same frozen backbone, so teacher and student share the lm_head ``W (V, d)``. Per valid token
``i`` (``labels[i] != ignore_index``; every token when ``labels`` is None)::

    KL_i  = T^2 * sum_v p_t (log p_t - log p_s),   p = softmax(h W^T / T)
    CE_i  = -log softmax(h_s W^T)[labels[i]]
    MSE_i = mean_d (h_s - h_t)^2

Neither backend allocates an ``(N, V)`` tensor. The Triton path makes one pass over vocabulary
tiles that keeps online log-sum-exp statistics per token (the student at T and at 1, the teacher at
T, the teacher-weighted logit gap ``A = sum_v e^{z_t/T - m_t} (z_t - z_s)/T`` giving ``KL = T^2
(A/S_t - lse_t + lse_s)``, the label logit), then a second pass that rebuilds ``dlogits =
kl_weight*T*(p_s^T - p_t^T) + ce_weight*(p_s - onehot)`` tile by tile and contracts it with ``W``
into ``dX``.

The torch path stacks, per token chunk, the inputs that the nonzero weights need, ``[h_t/T; h_s/T;
h_s]`` (the last only for CE at T != 1), and gets all their logits from one GEMM into a workspace
allocated once per call (``TORCH_CHUNK_ELEMENTS``; chunks of as many rows as fit, for the largest
GEMMs and the fewest ops). When a chunk spans the whole vocabulary, the usual case, nothing is
recomputed or allocated per chunk, and each step is one op over the whole chunk: row max and
argmax; ``z_t/T - z_s/T`` for the gap; one fused softmax of every block in place; ``lse = max -
log p[argmax]``; the gap ``sum_v p_t (z_t - z_s)/T`` as one batched GEMV; the student block turned
into ``dlogits`` in place; one ``addmm`` adding ``dlogits @ W`` into ``dX``. Only when fewer than
``TORCH_MIN_ROWS`` rows of the vocabulary fit does a chunk walk vocabulary slices with online
statistics, recomputing the logits for the gradient as Triton does.

The gradient is computed in the forward (only ``student_hidden`` gets one, and the loss is the last
op of the graph): the op returns ``dX`` of the unit-weighted loss, and backward only scales it by
``grad_output``. Forward calls without grad (eval, ``torch.no_grad``) skip the second pass. Ignored
tokens are dropped before any matmul (one host sync for their count), so they cost nothing.

The package, by module: :mod:`.reference` (the torch path and the math both paths share),
:mod:`.triton_fwd` (the statistics kernel and the launcher of both passes), :mod:`.triton_bwd` (the
dlogits kernel), :mod:`.validate`, :mod:`.aot`; here: the ``torch.library`` op with autograd,
dispatch and the public function.
"""

from __future__ import annotations

import math

import torch

from mptkern import backends
from mptkern.ops.distill_loss.reference import _torch_impl
from mptkern.ops.distill_loss.triton_fwd import _triton_impl
from mptkern.ops.distill_loss.validate import _check_labels, _validate

__all__ = ["fused_distill_loss"]

SUPPORTED_BACKENDS = ("torch", "triton")
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
    reduction: str, need_grad: bool, backend: str, logit_softcap: float,
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
        loss_v, dx_v = _IMPLS[backend](hs, ht, weight, lab, temperature, kl_weight, ce_weight, hidden_weight, scale, need_grad,
                                       logit_softcap)
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
      ignore_index, reduction, need_grad, backend, logit_softcap):
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
    return (g * dx).to(dx.dtype), None, None, None, None, None, None, None, None, None, None, None, None


_fused_distill_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
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
    logit_softcap: float | None = None,
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
        logit_softcap: ``c > 0``: the logits are ``c * tanh(h W^T / c)`` (Gemma 2's final
            soft-capping), for both models, before the temperature. The torch path only: ``auto``
            picks it, ``backend="triton"`` raises.
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
    if logit_softcap is not None and (isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float))
                                      or not (math.isfinite(logit_softcap) and logit_softcap > 0)):
        raise ValueError(f"logit_softcap must be a finite number > 0 or None, got {logit_softcap!r}")
    chosen = backends.resolve(backend, student_hidden.device, SUPPORTED_BACKENDS, "fused_distill_loss")
    if logit_softcap is not None and chosen == "triton":
        if backend == "triton":
            raise ValueError("fused_distill_loss: the triton backend has no logit soft-capping (logit_softcap=); "
                             "the torch path has")
        chosen = "torch"
    backend = chosen
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
        float(hidden_weight), int(ignore_index), reduction, need_grad, backend, float(logit_softcap or 0.0),
    )
    return loss
