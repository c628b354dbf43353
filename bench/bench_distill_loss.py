"""Benchmark of ``mptkern.ops.fused_distill_loss`` (forward KL, frozen shared lm_head) against full logits.

Contenders: every mptkern backend that can run on the device; torch eager with full ``(N, V)``
logits (what a user writes); ``torch.compile`` of that eager function; Liger-Kernel's
``LigerFusedLinearJSD`` (beta=0 is forward KL, CUDA only) and chunked ``LigerFusedLinearJSDLoss``
(beta=0, soft loss only). Each must match eager in loss and in d(student_hidden) before it is timed.
The loss is ``KL(p_t || p_s)`` at T=1 averaged over tokens, the one that all of them compute.
Modes: ``fwd+bwd`` (loss and ``torch.autograd.grad`` w.r.t. the student hidden states) and ``fwd``
(under ``torch.no_grad``, as in evaluation). FLOPs counted: 6·N·d·V for fwd+bwd (student and
teacher logits, dX), 4·N·d·V for fwd, whatever a contender actually does.

    python bench/bench_distill_loss.py                 # CUDA: bf16, N in 1024 4096 8192, d=4096, V=128256
    python bench/bench_distill_loss.py --device cpu    # CPU: fp32, N=512, d=256, V=32000
"""

from __future__ import annotations

import argparse
import ctypes
import time
from dataclasses import dataclass
from typing import Callable

import torch

import harness
from mptkern import backends
from mptkern.ops import fused_distill_loss

DTYPES = harness.DTYPES
TOLS = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


Disagreement = harness.Disagreement


@dataclass
class Contender:
    name: str
    loss: Callable[[], torch.Tensor]  # inputs bound; returns the scalar loss


def eager(hs, ht, W):
    """Full logits, fp32 softmax statistics: the plain expression."""
    ls = torch.log_softmax((hs @ W.T).float(), -1)
    lt = torch.log_softmax((ht @ W.T).float(), -1)
    return torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="sum") / hs.shape[0]


def make_inputs(N, d, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(V, d, generator=g) / d**0.5).to(device, dtype)
    hs = torch.randn(N, d, generator=g) * 2
    ht = (hs + torch.randn(N, d, generator=g)).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    return hs.to(device, dtype).requires_grad_(), ht, W, labels


def liger_contenders(hs, ht, W, labels, device):
    out, skipped = [], {}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return out, {"liger": f"liger-kernel not importable: {exc}"}
    if device.type == "cuda":
        fljsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
        out.append(Contender("liger-fused-linear-jsd", lambda: fljsd(hs, W, ht, W, labels)))
    else:
        skipped["liger-fused-linear-jsd"] = "Triton kernels: CUDA only"
    chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0,
                                      compiled=device.type == "cuda")
    out.append(Contender("liger-chunked-jsd-loss", lambda: chunked(hs, W, ht, W, labels)))
    return out, skipped


def make_contenders(hs, ht, W, labels, device, with_compile=True):
    out, skipped = [], {}
    for b in ("torch", "triton"):
        name = f"mptkern-{b}"
        why = backends.why_unavailable(b, device)
        if why is None and b == "triton" and device.type == "cpu":
            why = "Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): far too slow to time"
        if why:
            skipped[name] = why
            continue
        out.append(Contender(name, lambda b=b: fused_distill_loss(hs, ht, W, backend=b)))
    out.append(Contender("eager", lambda: eager(hs, ht, W)))
    if with_compile:
        compiled = torch.compile(eager)
        out.append(Contender("torch.compile", lambda: compiled(hs, ht, W)))
    lig, why = liger_contenders(hs, ht, W, labels, device)
    out += lig
    skipped.update(why)
    return out, skipped


def check_agreement(c: Contender, ref: Contender, hs) -> None:
    tol = TOLS[hs.dtype]
    got, want = c.loss(), ref.loss()
    (g,) = torch.autograd.grad(got, hs)
    (w,) = torch.autograd.grad(want, hs)
    for what, a, b in (("loss", got, want), ("d_student", g, w)):
        try:
            torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=tol, atol=tol * b.abs().max().item())
        except AssertionError as exc:
            raise Disagreement(f"{c.name} {what} differs from {ref.name}: {exc}") from None


def _cpu_peak_bytes(fn) -> int | None:
    """Peak RSS growth of one call (Linux): reset VmHWM through clear_refs, read it after."""
    def hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = hwm()
    fn()
    return hwm() - before


def peak_bytes(fn, device):
    return harness.peak_memory(fn, device) if device.type == "cuda" else _cpu_peak_bytes(fn)


def run(args) -> tuple[list[dict], dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        # freed large blocks go straight back to the OS, so peak RSS measures live tensors only
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except OSError:
            pass
    mm = harness.matmul_tflops(device)
    rows, refused = [], {}
    for N in args.N:
        d, V = args.d, args.V
        hs, ht, W, labels = make_inputs(N, d, V, dtype, device)
        contenders, skipped = make_contenders(hs, ht, W, labels, device, with_compile=not args.no_compile)
        for name, why in skipped.items():
            print(f"skip {name}: {why}")
        ref = next(c for c in contenders if c.name == "eager")
        ok = []
        for c in contenders:
            try:
                if c is not ref:
                    check_agreement(c, ref, hs)
                ok.append(c)
            except Disagreement as exc:
                refused[f"{c.name}@N={N}"] = str(exc)
                print(f"REFUSED {c.name}: {str(exc)[:400]}")
            except Exception as exc:  # noqa: BLE001 - a contender that cannot run this shape (OOM, ...)
                refused[f"{c.name}@N={N}"] = f"{type(exc).__name__}: {exc}"
                print(f"FAILED {c.name}: {type(exc).__name__}: {str(exc)[:400]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        fns = {}
        for c in ok:
            def full(c=c):
                return torch.autograd.grad(c.loss(), hs)

            def fwd(c=c):
                with torch.no_grad():
                    return c.loss()

            fns[(c.name, "fwd+bwd")], fns[(c.name, "fwd")] = full, fwd
        # rounds interleave the contenders and keep each one's best median, so that load from other
        # processes (shared CPU machines) does not land on one contender only
        best = {}
        for _ in range(args.rounds):
            for key, fn in fns.items():
                ms = harness.time_fn(fn, device=device, warmup=args.warmup, rep=args.rep)
                best[key] = min(ms, best.get(key, float("inf")))
        timed = [(name, mode, best[(name, mode)], peak_bytes(fn, device)) for (name, mode), fn in fns.items()]
        eager_ms = {mode: ms for name, mode, ms, _ in timed if name == "eager"}
        eager_peak = {mode: p for name, mode, _, p in timed if name == "eager"}
        for name, mode, ms, peak in timed:
            flops = (6 if mode == "fwd+bwd" else 4) * N * d * V
            tf = flops / (ms * 1e-3) / 1e12
            rows.append(dict(
                op="distill_loss", contender=name, mode=mode, N=N, d=d, V=V, dtype=args.dtype,
                ms=round(ms, 4), tflops=round(tf, 3), matmul_tflops=round(mm, 2), frac_matmul=round(tf / mm, 4),
                speedup_vs_eager=round(eager_ms[mode] / ms, 3) if mode in eager_ms else "",
                peak_mem_mb=round(peak / 2**20, 1) if peak is not None else "",
                mem_vs_eager=round(peak / eager_peak[mode], 3) if peak and eager_peak.get(mode) else "",
            ))
    return rows, refused


def print_table(rows):
    cols = ["N", "contender", "mode", "ms", "speedup_vs_eager", "tflops", "frac_matmul", "peak_mem_mb", "mem_vs_eager"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in sorted(rows, key=lambda r: (r["N"], r["mode"], r["contender"])):
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--N", type=int, nargs="+", default=None, help="default: 1024 4096 8192 on CUDA, 512 on CPU")
    p.add_argument("--d", type=int, default=None, help="default: 4096 on CUDA, 256 on CPU")
    p.add_argument("--V", type=int, default=None, help="default: 128256 on CUDA, 32000 on CPU")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    p.add_argument("--warmup", type=float, default=None, help="ms of untimed calls (default: 25 CUDA, 300 CPU)")
    p.add_argument("--rep", type=float, default=None, help="ms of timed calls (default: 100 CUDA, 3000 CPU)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds, best kept (default: 1 CUDA, 3 CPU)")
    p.add_argument("--out", default=str(harness.ROOT / "bench/results/distill_loss.csv"))
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.N = args.N or ([1024, 4096, 8192] if cuda else [512])
    args.d = args.d or (4096 if cuda else 256)
    args.V = args.V or (128256 if cuda else 32000)
    args.warmup = args.warmup if args.warmup is not None else (25 if cuda else 300)
    args.rep = args.rep if args.rep is not None else (100 if cuda else 3000)
    args.rounds = args.rounds or (1 if cuda else 3)

    t0 = time.perf_counter()
    rows, refused = run(args)
    harness.append_rows(args.out, rows, args.device)
    print(f"\ndistill_loss (forward KL, T=1) d={args.d} V={args.V} {args.dtype} on {harness.device_name(args.device)}; "
          f"matmul ceiling {rows[0]['matmul_tflops']} TFLOP/s")
    print_table(rows)
    if not cuda:
        print("CPU run: only the ratios to eager measured side by side here count (time and peak RSS growth).")
    print(f"{len(rows)} rows appended to {args.out} in {time.perf_counter() - t0:.1f} s")
    if refused:
        print("refused or failed (not timed): " + ", ".join(refused))
    ours = [k for k in refused if k.startswith("mptkern-")]
    if ours:
        raise SystemExit(f"mptkern contenders refused (disagree with eager or failed): {', '.join(ours)}")
    return rows


if __name__ == "__main__":
    main()
