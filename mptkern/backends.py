"""Backend selection shared by every op.

Three backends exist: ``torch`` (portable, any device), ``triton`` (CUDA default; also runs on CPU
tensors under ``TRITON_INTERPRET=1``) and ``cuda`` (the csrc/ extension, where it was built).
``auto`` picks by device; ``MPTKERN_BACKEND`` or an op's ``backend=`` argument forces one. The
argument wins over the environment variable.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "MPTKERN_BACKEND"


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 bf16 dot-product instructions


@functools.cache
def cpu_bf16_native(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16, read from the
    Linux ``/proc/cpuinfo`` flags), so that oneDNN runs bfloat16 matmuls natively: on a 2-core AMD
    EPYC with AVX512-BF16, a (64..4096, 576) x (576, 1536) linear ran 4.1-4.4x faster in bfloat16
    than in float32. False elsewhere (no such flags, or no ``/proc/cpuinfo``), where bfloat16 is
    emulated and no faster than float32."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # an installed but broken triton must be reported, not hidden
        return f"import triton failed: {exc}"
    return None


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``, or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return None
        return f"triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 (got {device.type})"
    if backend == "cuda":
        from mptkern import _ext

        if not _ext.loaded():
            return _ext.why_not()
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got {device.type})"
        return None
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def resolve(backend: str, device: torch.device, supported: tuple[str, ...] = BACKENDS, op: str = "this op") -> str:
    """Turn ``backend`` ("auto" or a name) into the backend that will run on ``device``.

    ``auto`` honours ``MPTKERN_BACKEND`` first (when the op ``op`` supports it: a global preference
    for a backend an op lacks falls back to the op's default), then picks ``triton`` for CUDA tensors
    and ``torch`` otherwise. ``supported`` lists the backends the op has. A forced backend that the
    op lacks or that cannot run raises RuntimeError naming the op, its backends and why.
    """
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend in BACKENDS and backend not in supported:
            backend = "auto"  # a global preference does not apply to ops without that backend
        if backend == "auto":
            gpu = device.type == "cuda" and "triton" in supported and why_unavailable("triton", device) is None
            return "triton" if gpu else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend not in supported:
        raise RuntimeError(f"{op} has no {backend!r} backend (it has {', '.join(supported)})")
    reason = why_unavailable(backend, device)
    if reason:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {reason}")
    return backend
