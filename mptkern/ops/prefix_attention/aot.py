"""Every shipped prefix-attention kernel configuration, for the ahead-of-time compile check
(:mod:`mptkern.aot`)."""

from __future__ import annotations

from mptkern.ops._common import AOT_DTYPES, aot_signature
from mptkern.ops.prefix_attention.decode import _decode_combine_kernel, _decode_kernel
from mptkern.ops.prefix_attention.tiles import CONFIGS, DELTA_BLOCK, _dtype_class, _precision
from mptkern.ops.prefix_attention.triton_bwd import _delta_kernel, _dkdv_kernel, _dq_kernel
from mptkern.ops.prefix_attention.triton_fwd import _fwd_kernel

I32 = "*i32"
TYPES = dict(LSE="*fp32", DELTA="*fp32", SINKS="*fp32", CU=I32, PIDS=I32, PLENS=I32, SCHED=I32, ITEMS=I32,
             ORDER=I32, LENS=I32, BT=I32, PBT=I32, OPART="*fp32", LPART="*fp32", DLSE="*fp32")


def _divisible(signature):
    # pointers (torch allocations) and row/head strides (s*: multiples of D); not counts or window
    return tuple(n for n, t in signature.items() if t.startswith("*") or (n.startswith("s") and n != "sm_scale"))


def aot_specs():
    """Head dims 64 and 128 x bf16/fp16/fp32 x forward, dQ, dK/dV, decode dense and paged (+ the two
    small helper kernels), in the most demanding variant (prefix, window and sinks on)."""
    from mptkern.aot import KernelSpec

    def spec(name, kernel, dt, ce, warps, stages):
        signature = aot_signature(kernel, dt, TYPES, ce, floats=("sm_scale",))
        return KernelSpec(name, kernel, signature, ce, warps, stages, _divisible(signature))

    specs = []
    for dt, dtype in AOT_DTYPES.items():
        for dim in (64, 128):
            for kind, kernel in (("fwd", _fwd_kernel), ("dq", _dq_kernel), ("dkdv", _dkdv_kernel)):
                bm, bn, warps, stages = CONFIGS[(kind, dim, _dtype_class(dtype))]
                ce = dict(HAS_PREFIX=True, HAS_WINDOW=True, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=dim,
                          PREC=_precision(dtype, kind, dim), UPCAST=False)
                if kind == "fwd":
                    ce["HAS_SINKS"] = True
                specs.append(spec(f"prefix_attention_{kind}_{dt}_d{dim}", kernel, dt, ce, warps, stages))
            bh, bn, warps, stages = CONFIGS[("decode", dim, _dtype_class(dtype))]
            for paged in (False, True):  # dense slabs; pools read through block tables
                ce = dict(HAS_PREFIX=True, HAS_WINDOW=True, PAGED=paged, BLOCK_H=bh, BLOCK_N=bn, HEAD_DIM=dim,
                          PREC=_precision(dtype), UPCAST=False)
                specs.append(spec(f"prefix_attention_decode{'_paged' if paged else ''}_{dt}_d{dim}", _decode_kernel,
                                  dt, ce, warps, stages))
            ce = dict(HAS_DLSE=True, HEAD_DIM=dim, BLOCK=DELTA_BLOCK)
            specs.append(spec(f"prefix_attention_delta_{dt}_d{dim}", _delta_kernel, dt, ce, 4, 1))
            ce = dict(HAS_SINKS=True, BLOCK_S=64, HEAD_DIM=dim)
            specs.append(spec(f"prefix_attention_combine_{dt}_d{dim}", _decode_combine_kernel, dt, ce, 4, 1))
    return specs
