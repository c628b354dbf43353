"""Every shipped decomposed-prompts kernel configuration, for the ahead-of-time compile check
(:mod:`mptkern.aot`)."""

from __future__ import annotations

from mptkern.ops._common import AOT_DTYPES, aot_signature
from mptkern.ops.decomposed_prompts.triton_bwd import BWD_CONFIG, _bwd_kernel
from mptkern.ops.decomposed_prompts.triton_fwd import FWD_CONFIG, _fwd_kernel


# the kernels' index tensors are int64; their upper-case sizes are scalars
TYPES = dict(IDS="*i64", OFFS="*i64", ORDER="*i64", STARTS="*i64", DCW="*fp32", DRW="*fp32", L="i32", D="i32", RANK="i32",
             K="i32")


def aot_specs():
    from mptkern.aot import KernelSpec

    specs = []
    for dt in AOT_DTYPES:
        for kind, kernel, (bl, bd, warps) in (("fwd", _fwd_kernel, FWD_CONFIG), ("bwd", _bwd_kernel, BWD_CONFIG)):
            ce = dict(BLOCK_L=bl, BLOCK_D=bd)
            specs.append(KernelSpec(f"decomposed_prompts_{kind}_{dt}", kernel, aot_signature(kernel, dt, TYPES, ce), ce, warps))
    return specs
