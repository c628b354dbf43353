"""Ahead-of-time compile check of every shipped Triton kernel configuration, no GPU needed.

Each op module lists its configurations in ``aot_specs()``; this compiles each for sm_80 (A100) and
sm_90 (H100) with ``triton.compile`` and a ``GPUTarget``, reads registers, stack, local memory and
static shared memory of the cubin with ``cuobjdump``, and fails on compile errors, register spills
(any local memory or stack frame) or shared memory over the chip's per-block budget.

    python -m mptkern.aot          # or: mptkern aot

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels it compiles).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
import tempfile

OP_MODULES = ("mptkern.ops.decomposed_prompts.aot", "mptkern.ops.distill_loss.aot", "mptkern.ops.prefix_attention.aot")
# max shared memory per block (opt-in), bytes: A100 163 KiB, H100 227 KiB (CUDA programming guide)
SHARED_BUDGET = {80: 166912, 90: 232448}
TARGETS = (80, 90)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compiled configuration: a @triton.jit kernel, its argument types and constexprs."""

    name: str
    kernel: object
    signature: dict  # argument -> "*bf16", "i32", "constexpr", ...
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    # arguments the runtime sees as multiples of 16 (torch's 16-byte aligned pointers, strides of
    # head-dim-aligned rows); the launcher specialises on this, so the check must compile it too
    divisible: tuple = ()


@dataclasses.dataclass
class Report:
    spec: str
    arch: int
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    error: str = ""

    @property
    def problems(self) -> list[str]:
        out = [self.error] if self.error else []
        if self.local or self.stack:
            out.append(f"register spills (stack {self.stack} B, local {self.local} B)")
        if self.shared > SHARED_BUDGET[self.arch]:
            out.append(f"shared memory {self.shared} B > budget {SHARED_BUDGET[self.arch]} B")
        return out


def _resource_usage(cubin: bytes) -> dict:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in fields.items()}


def check_kernel(spec: KernelSpec, arch: int) -> Report:
    """Compile ``spec`` for ``sm_<arch>`` and report its resources; errors are captured, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label = f"{spec.name}[{','.join(f'{k}={v}' for k, v in spec.constexprs.items())},warps={spec.num_warps}]"
    report = Report(label, arch)
    try:
        attrs = {(spec.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible}
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # reported as a failure of this configuration
        report.error = f"compile failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return report
    report.regs, report.stack, report.local = usage.get("REG", 0), usage.get("STACK", 0), usage.get("LOCAL", 0)
    report.shared = compiled.metadata.shared + usage.get("SHARED", 0)
    return report


def all_specs() -> list[KernelSpec]:
    specs = []
    for name in OP_MODULES:
        specs.extend(importlib.import_module(name).aot_specs())
    return specs


def main(argv=None) -> int:
    from mptkern import backends

    if backends.triton_interpret():
        print("mptkern.aot: unset TRITON_INTERPRET; the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    failures = 0
    print(f"{'kernel configuration':<72} {'arch':>5} {'regs':>5} {'shared':>7} {'stack':>6} {'local':>6}  status")
    for spec in all_specs():
        for arch in TARGETS:
            r = check_kernel(spec, arch)
            problems = r.problems
            failures += bool(problems)
            status = "ok" if not problems else "FAIL: " + "; ".join(problems)
            print(f"{r.spec:<72} {'sm_' + str(arch):>5} {r.regs:>5} {r.shared:>7} {r.stack:>6} {r.local:>6}  {status}")
    print(f"{failures} failing configuration(s)" if failures else "all configurations compile without spills")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
