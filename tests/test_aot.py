"""The ahead-of-time compile check: every shipped configuration passes, and the checker catches
spills and shared-memory overuse (so its passing means something)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from mptkern import aot  # noqa: E402

NO_INTERPRET = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_all_shipped_configurations_compile_for_sm80_sm90():
    proc = subprocess.run([sys.executable, "-m", "mptkern.aot"], env=NO_INTERPRET, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith("ok")]
    for spec in aot.all_specs():
        for arch in aot.TARGETS:
            assert any(line.startswith(spec.name + "[") and f"sm_{arch}" in line for line in rows), (spec.name, arch)


# Kernels that must fail the check, run in a subprocess so that no TRITON_INTERPRET leaks in.
_BAD = r'''
import triton, triton.language as tl
from mptkern import aot

@triton.jit
def spill(X, Y, BLOCK: tl.constexpr):
    # a 4K-element fp32 tile held live across a dependent reduction: far over 255 registers/thread
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    y = tl.cumsum(x * x, 0) + tl.cumsum(x, 0) * x
    tl.store(Y + offs, y + tl.flip(x, 0))

@triton.jit
def big_smem(A, B, C, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    m = tl.arange(0, BM); n = tl.arange(0, BN); k = tl.arange(0, BK)
    a = tl.load(A + m[:, None] * BK + k[None, :])
    b = tl.load(B + k[:, None] * BN + n[None, :])
    tl.store(C + m[:, None] * BN + n[None, :], tl.dot(a, b))

sig = {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"}
r = aot.check_kernel(aot.KernelSpec("spill", spill, sig, {"BLOCK": 4096}, num_warps=1), 80)
print("SPILL", r.regs, r.stack, r.local, r.problems)
sig = {"A": "*fp16", "B": "*fp16", "C": "*fp32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
r = aot.check_kernel(aot.KernelSpec("big_smem", big_smem, sig, {"BM": 64, "BN": 64, "BK": 1024}, num_warps=8), 80)
print("SMEM", r.shared, r.problems)
r = aot.check_kernel(aot.KernelSpec("broken", big_smem, {"A": "*fp16"}, {}), 90)
print("BROKEN", r.problems)
'''


def test_checker_flags_spills_shared_memory_and_errors(tmp_path):
    script = tmp_path / "bad_kernels.py"  # @triton.jit needs its source in a file
    script.write_text(_BAD)
    proc = subprocess.run([sys.executable, str(script)], env=NO_INTERPRET, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    print(out, proc.stderr[-2000:])
    assert proc.returncode == 0
    spill = next(line for line in out.splitlines() if line.startswith("SPILL"))
    smem = next(line for line in out.splitlines() if line.startswith("SMEM"))
    broken = next(line for line in out.splitlines() if line.startswith("BROKEN"))
    assert "register spills" in spill
    assert "shared memory" in smem and "budget" in smem
    assert "compile failed" in broken
