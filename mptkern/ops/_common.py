"""What every op shares: Triton's optional import, the dtypes the GPU kernels take, the precision of
their products, and the argument signatures of the ahead-of-time compile check (:mod:`mptkern.aot`)."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # non-Linux: the triton backend reports itself unavailable
    triton = tl = None

GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AOT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: fp32 inputs keep fp32-accurate products (the contract is fp32
    accumulation of fp32 products, and the oracle tests compare at fp32 tolerances), never tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def aot_signature(kernel, dt: str, types: dict, constexprs: dict, floats=()) -> dict:
    """The argument types of ``kernel`` for one compile: constexprs by name, then ``types[name]``,
    then by convention upper-case names are pointers to ``dt`` elements, ``floats`` are fp32 and
    the rest i32."""
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in types:
            out[name] = types[name]
        elif name.isupper():
            out[name] = "*" + dt
        else:
            out[name] = "fp32" if name in floats else "i32"
    return out
