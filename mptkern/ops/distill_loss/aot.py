"""Every shipped fused-distillation-loss kernel configuration, for the ahead-of-time compile check
(:mod:`mptkern.aot`)."""

from __future__ import annotations

import torch

from mptkern.ops._common import dot_precision
from mptkern.ops.distill_loss.triton_bwd import _dlogits_kernel
from mptkern.ops.distill_loss.triton_fwd import TRITON_CONFIGS, _stats_kernel


def aot_specs():
    """Every shipped kernel configuration, for the ahead-of-time compile check (:mod:`mptkern.aot`)."""
    from mptkern.aot import KernelSpec

    specs = []
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    for dtype, (bn, bv, bk, warps, stages) in TRITON_CONFIGS.items():
        dt = names[dtype]
        p = "*" + dt
        # both terms on is the register-heaviest variant; bf16 also ships the KL-only variant
        flags = [(True, True)] + ([(True, False)] if dtype == torch.bfloat16 else [])
        for has_kl, has_ce in flags:
            tag = f"{dt}{'' if has_ce else '_kl'}"
            ce = dict(HAS_KL=has_kl, HAS_CE=has_ce, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, PRECISION=dot_precision(dtype),
                      UPCAST=False)
            common = dict(HAS_KL="constexpr", HAS_CE="constexpr", BLOCK_N="constexpr", BLOCK_V="constexpr",
                          BLOCK_K="constexpr", PRECISION="constexpr", UPCAST="constexpr")
            sig = dict(HS=p, HT=p, W=p, LAB="*i64", WS="*fp32", N="i32", V="i32", D="i32", inv_t="fp32",
                       tiles_per_split="i32", **common)
            specs.append(KernelSpec(f"distill_stats_{tag}", _stats_kernel, sig, ce, warps, stages))
            sig = dict(HS=p, HT=p, W=p, LAB="*i64", LSE="*fp32", G=p, N="i32", V="i32", D="i32", inv_t="fp32",
                       c_kl="fp32", c_ce="fp32", **common)
            specs.append(KernelSpec(f"distill_dlogits_{tag}", _dlogits_kernel, sig, ce, warps, stages))
    return specs
