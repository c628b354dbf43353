"""Decomposed multitask prompts: ``out[b] = shared * (task_cols[t_b] @ task_rows[t_b])``.

The student prompt of Multitask Prompt Tuning (Wang et al., ICLR 2023), in the parameter layout of
PEFT's MultitaskPromptTuning: a shared prompt ``P* (l, d)`` scaled elementwise by a rank-r product
``U_t V_t`` per task. Layers in this file, bottom up: Triton kernels and their launchers, the torch
path, the cuda path (csrc/), ``torch.library`` ops with autograd, and the public function.

Backward reduces per task without float atomics: batch items are ordered by task, each program owns
a tile of the ``(l, d)`` plane and sums its tasks' gradients in a fixed order, so two runs give
bit-identical gradients on every backend.
"""

from __future__ import annotations

import torch

from mptkern import backends

try:
    import triton
    import triton.language as tl
except ImportError:  # non-Linux: the triton backend reports itself unavailable
    triton = None

_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (BLOCK_L, BLOCK_D, num_warps). Fixed until tuned on a GPU; the AOT check compiles exactly these.
FWD_CONFIG = (8, 256, 8)
BWD_CONFIG = (8, 128, 4)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _fwd_kernel(S, C, R, IDS, OFFS, OUT, L, D, RANK, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        i = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        j = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mi = i < L
        mj = j < D
        m = mi[:, None] & mj[None, :]
        t = tl.load(IDS + b).to(tl.int64)
        row0 = tl.load(OFFS + b).to(tl.int64)  # rows of a large packed buffer: keep 64-bit
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for k in range(RANK):
            c = tl.load(C + (t * L + i) * RANK + k, mask=mi, other=0.0).to(tl.float32)
            r = tl.load(R + (t * RANK + k) * D + j, mask=mj, other=0.0).to(tl.float32)
            acc += c[:, None] * r[None, :]
        s = tl.load(S + i[:, None] * D + j[None, :], mask=m, other=0.0).to(tl.float32)
        out = OUT + (row0 + i)[:, None] * D + j[None, :]
        tl.store(out, (s * acc).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_kernel(
        G, S, C, R, OFFS, ORDER, STARTS, DS, DCW, DRW, L, D, RANK, K,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pi = tl.program_id(0)
        pj = tl.program_id(1)
        n_i = tl.num_programs(0)
        n_j = tl.num_programs(1)
        i = pi * BLOCK_L + tl.arange(0, BLOCK_L)
        j = pj * BLOCK_D + tl.arange(0, BLOCK_D)
        mi = i < L
        mj = j < D
        m = mi[:, None] & mj[None, :]
        s = tl.load(S + i[:, None] * D + j[None, :], mask=m, other=0.0).to(tl.float32)
        ds = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for t in range(K):
            start = tl.load(STARTS + t)
            end = tl.load(STARTS + t + 1)
            if end > start:  # absent tasks keep the zeros their workspace was born with
                # H_t: the task's gradient summed over its batch items, in batch order
                h = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
                for q in range(start, end):
                    row0 = tl.load(OFFS + tl.load(ORDER + q)).to(tl.int64)
                    h += tl.load(G + (row0 + i)[:, None] * D + j[None, :], mask=m, other=0.0).to(tl.float32)
                w = h * s
                mt = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
                for k in range(RANK):
                    c = tl.load(C + (t * L + i) * RANK + k, mask=mi, other=0.0).to(tl.float32)
                    r = tl.load(R + (t * RANK + k) * D + j, mask=mj, other=0.0).to(tl.float32)
                    mt += c[:, None] * r[None, :]
                    # partial dC over this tile's columns and partial dR over its rows; the host
                    # sums the tile axis in a fixed order
                    tl.store(DCW + ((t * L + i) * RANK + k) * n_j + pj, tl.sum(w * r[None, :], axis=1), mask=mi)
                    tl.store(DRW + ((t * n_i + pi) * RANK + k) * D + j, tl.sum(w * c[:, None], axis=0), mask=mj)
                ds += h * mt
        tl.store(DS + i[:, None] * D + j[None, :], ds.to(DS.dtype.element_ty), mask=m)


def _task_segments(task_ids: torch.Tensor, num_tasks: int):
    """Batch indices sorted by task (stable) and the start of each task's run, (K+1,) int64."""
    order = torch.argsort(task_ids, stable=True)
    starts = torch.zeros(num_tasks + 1, dtype=torch.int64, device=task_ids.device)
    torch.cumsum(torch.bincount(task_ids, minlength=num_tasks), 0, out=starts[1:])
    return order, starts


def _fwd_triton(shared, cols, rows, ids, out2d, offs):
    (K, l, r), d, B = cols.shape, shared.shape[1], ids.shape[0]
    bl, bd, warps = FWD_CONFIG
    grid = (B, triton.cdiv(l, bl), triton.cdiv(d, bd))
    _fwd_kernel[grid](shared, cols, rows, ids, offs, out2d, l, d, r, BLOCK_L=bl, BLOCK_D=bd, num_warps=warps)


def _bwd_triton(grad2d, shared, cols, rows, ids, offs):
    (K, l, r), d = cols.shape, shared.shape[1]
    bl, bd, warps = BWD_CONFIG
    n_i, n_j = triton.cdiv(l, bl), triton.cdiv(d, bd)
    order, starts = _task_segments(ids, K)
    offs = _functional_offsets(ids, l) if offs is None else offs
    dS = torch.empty_like(shared)
    dcw = torch.zeros(K, l, r, n_j, dtype=torch.float32, device=shared.device)
    drw = torch.zeros(K, n_i, r, d, dtype=torch.float32, device=shared.device)
    _bwd_kernel[(n_i, n_j)](
        grad2d, shared, cols, rows, offs, order, starts, dS, dcw, drw, l, d, r, K,
        BLOCK_L=bl, BLOCK_D=bd, num_warps=warps,
    )
    return dS, dcw.sum(-1).to(cols.dtype), drw.sum(1).to(rows.dtype)


def aot_specs():
    """Every shipped kernel configuration, for the ahead-of-time compile check (:mod:`mptkern.aot`)."""
    from mptkern.aot import KernelSpec

    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        p, i64 = "*" + dt, "*i64"
        bl, bd, warps = FWD_CONFIG
        sig = dict(S=p, C=p, R=p, IDS=i64, OFFS=i64, OUT=p, L="i32", D="i32", RANK="i32", BLOCK_L="constexpr", BLOCK_D="constexpr")
        specs.append(KernelSpec(f"decomposed_prompts_fwd_{dt}", _fwd_kernel, sig, dict(BLOCK_L=bl, BLOCK_D=bd), warps))
        bl, bd, warps = BWD_CONFIG
        sig = dict(G=p, S=p, C=p, R=p, OFFS=i64, ORDER=i64, STARTS=i64, DS=p, DCW="*fp32", DRW="*fp32",
                   L="i32", D="i32", RANK="i32", K="i32", BLOCK_L="constexpr", BLOCK_D="constexpr")
        specs.append(KernelSpec(f"decomposed_prompts_bwd_{dt}", _bwd_kernel, sig, dict(BLOCK_L=bl, BLOCK_D=bd), warps))
    return specs


# ----------------------------------------------------------------------------------------------
# torch and cuda paths
# ----------------------------------------------------------------------------------------------
def _fwd_torch(shared, cols, rows, ids, out2d, offs):
    prompts = torch.bmm(cols.index_select(0, ids), rows.index_select(0, ids)).mul_(shared)
    if out2d is None:
        return prompts
    out2d.index_copy_(0, _prompt_rows(offs, shared.shape[0]), prompts.flatten(0, 1))
    return out2d


def _bwd_torch(grad2d, shared, cols, rows, ids, offs):
    (K, l, r), d = cols.shape, shared.shape[1]
    g = grad2d.view(-1, l * d) if offs is None else grad2d.index_select(0, _prompt_rows(offs, l)).view(-1, l * d)
    tasks, inverse = torch.unique(ids, return_inverse=True)
    # H_t as one small matmul: deterministic on every device, unlike index_add_ on CUDA
    onehot = torch.zeros(tasks.numel(), ids.numel(), dtype=torch.float32, device=ids.device)
    onehot[inverse, torch.arange(ids.numel(), device=ids.device)] = 1.0
    H = (onehot @ g.float()).view(-1, l, d)
    c, rr, s = cols[tasks].float(), rows[tasks].float(), shared.float()
    W = H * s
    dS = (H * torch.bmm(c, rr)).sum(0)
    dC = torch.zeros(K, l, r, dtype=cols.dtype, device=cols.device)
    dR = torch.zeros(K, r, d, dtype=rows.dtype, device=rows.device)
    dC[tasks] = torch.bmm(W, rr.transpose(1, 2)).to(cols.dtype)
    dR[tasks] = torch.bmm(c.transpose(1, 2), W).to(rows.dtype)
    return dS.to(shared.dtype), dC, dR


def _fwd_cuda(shared, cols, rows, ids, out2d, offs):
    torch.ops.mptkern_C.decomposed_prompts_fwd(shared, cols, rows, ids, offs, out2d)


def _bwd_cuda(grad2d, shared, cols, rows, ids, offs):
    order, starts = _task_segments(ids, cols.shape[0])
    offs = _functional_offsets(ids, shared.shape[0]) if offs is None else offs
    return tuple(torch.ops.mptkern_C.decomposed_prompts_bwd(grad2d, shared, cols, rows, offs, order, starts))


_IMPLS = {"torch": (_fwd_torch, _bwd_torch), "triton": (_fwd_triton, _bwd_triton), "cuda": (_fwd_cuda, _bwd_cuda)}


def _functional_offsets(ids: torch.Tensor, l: int) -> torch.Tensor:
    """Row offsets of a plain (B, l, d) result viewed as (B*l, d)."""
    return torch.arange(ids.shape[0], device=ids.device) * l


def _prompt_rows(offs: torch.Tensor, l: int) -> torch.Tensor:
    return (offs[:, None] + torch.arange(l, device=offs.device)).flatten()


def _check_values(ids: torch.Tensor, num_tasks: int, offs=None, l=0, total_rows=0) -> None:
    """Range checks that need the values (one host sync); run inside the ops so compile traces them."""
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_tasks:
        raise ValueError(f"task_ids must lie in [0, {num_tasks}) (K = task_cols.shape[0]), got values in [{lo}, {hi}]")
    if offs is not None:
        lo, hi = (int(x) for x in torch.aminmax(offs))
        if lo < 0 or hi + l > total_rows:
            raise ValueError(
                f"row_offsets must lie in [0, {total_rows - l}] so that l={l} rows fit in out of shape "
                f"({total_rows}, d), got values in [{lo}, {hi}]"
            )


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
def _validate(shared, task_cols, task_rows, task_ids, out, row_offsets, backend):
    def fail(msg):
        raise ValueError(msg)

    if shared.dim() != 2:
        fail(f"shared must have shape (l, d), got {tuple(shared.shape)}")
    l, d = shared.shape
    if task_cols.dim() != 3 or task_cols.shape[1] != l:
        fail(f"task_cols must have shape (K, l={l}, r), got {tuple(task_cols.shape)}")
    K, _, r = task_cols.shape
    if task_rows.shape != (K, r, d):
        fail(f"task_rows must have shape (K={K}, r={r}, d={d}), got {tuple(task_rows.shape)}")
    if K == 0 or r == 0 or l == 0 or d == 0:
        fail(f"shared (l, d) = {(l, d)} and task_cols (K, l, r) = {(K, l, r)} must all be nonzero")
    if task_ids.dim() != 1 or task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        fail(f"task_ids must be an integer tensor of shape (B,), got {task_ids.dtype} of shape {tuple(task_ids.shape)}")
    if task_ids.shape[0] == 0:
        fail("task_ids is empty: expected shape (B,) with B >= 1")
    for name, t in (("task_cols", task_cols), ("task_rows", task_rows)):
        if t.dtype != shared.dtype:
            fail(f"{name} has dtype {t.dtype} but shared has {shared.dtype}; all parameters must share one dtype")
    named = [("task_cols", task_cols), ("task_rows", task_rows), ("task_ids", task_ids)]
    if out is not None:
        if row_offsets is None:
            fail("out is given without row_offsets: pass row_offsets of shape (B,)")
        named += [("out", out), ("row_offsets", row_offsets)]
    for name, t in named:
        if t.device != shared.device:
            fail(f"{name} is on {t.device} but shared is on {shared.device}")
    if backend != "torch" and shared.dtype not in _GPU_DTYPES:
        fail(f"shared has dtype {shared.dtype}; the {backend} backend supports {_GPU_DTYPES}")
    if not shared.dtype.is_floating_point:
        fail(f"shared must be floating point, got {shared.dtype}")
    if out is None:
        if row_offsets is not None:
            fail("row_offsets is given without out: pass the (R, d) buffer to write into")
        return
    if out.dim() != 2 or out.shape[1] != d or not out.is_contiguous():
        fail(f"out must be a contiguous tensor of shape (R, d={d}), got {tuple(out.shape)} (contiguous={out.is_contiguous()})")
    if out.dtype != shared.dtype:
        fail(f"out has dtype {out.dtype} but shared has {shared.dtype}")
    if row_offsets.shape != task_ids.shape or row_offsets.dtype.is_floating_point or row_offsets.dtype == torch.bool:
        fail(f"row_offsets must be an integer tensor of shape (B={task_ids.shape[0]},), got {row_offsets.dtype} of shape {tuple(row_offsets.shape)}")


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
