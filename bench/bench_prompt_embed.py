"""Benchmark of ``mptkern.ops.decomposed_prompts`` against PEFT's MultitaskPromptEmbedding.

Contenders: every mptkern backend that can run on the device, PEFT's ``MultitaskPromptEmbedding``
with the same parameter values, and torch eager ``shared * torch.matmul(cols[ids], rows[ids])``.
Each must match eager in forward output and in all three gradients before it is timed.
Modes: ``fwd`` (parameters require grad, as in training, only the forward timed) and ``fwd+bwd``
(``torch.autograd.grad`` with a fixed random grad_output, so nothing accumulates).

    python bench/bench_prompt_embed.py                 # the issue's shape: B=64 l=100 d=4096 K=21 r=1
    python bench/plot.py bench/results/prompt_embed.csv
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

import harness
from mptkern import backends
from mptkern.ops import decomposed_prompts

DTYPES = harness.DTYPES
# agreement with eager, relative to the largest reference magnitude (atol) and per element (rtol)
TOLS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


Disagreement = harness.Disagreement


@dataclass
class Contender:
    name: str
    forward: Callable[[], torch.Tensor]  # inputs bound; returns (B, l, d)
    params: tuple  # leaves in the order (shared, task_cols, task_rows)


def eager(shared, cols, rows, ids):
    """The plain expression: what an MPT user writes without a fused op."""
    return shared * torch.matmul(cols[ids], rows[ids])


def make_inputs(B, l, d, K, r, dtype, device, seed=0):
    """Parameters (leaves requiring grad), task ids (B,) int64 and a random grad_output (B, l, d)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    shared, cols, rows = (mk(*s).requires_grad_() for s in ((l, d), (K, l, r), (K, r, d)))
    ids = torch.randint(0, K, (B,), generator=g).to(device)
    return shared, cols, rows, ids, mk(B, l, d)


def peft_contender(shared, cols, rows, ids):
    """PEFT's module with our parameter values copied in; returns (Contender, None) or (None, why)."""
    try:
        from peft.tuners.multitask_prompt_tuning import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
        from peft.tuners.multitask_prompt_tuning.model import MultitaskPromptEmbedding
    except ImportError as exc:
        return None, f"peft not importable: {exc}"
    (K, l, r), d = cols.shape, shared.shape[1]
    cfg = MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=l, token_dim=d, num_tasks=K, num_ranks=r,
        num_transformer_submodules=1, prompt_tuning_init=MultitaskPromptTuningInit.RANDOM,
    )
    word_embeddings = torch.nn.Embedding(2, d)  # only read by the TEXT / SAMPLE_VOCAB inits
    mod = MultitaskPromptEmbedding(cfg, word_embeddings).to(shared.device, shared.dtype)
    with torch.no_grad():
        mod.embedding.weight.copy_(shared)
        mod.prefix_task_cols.copy_(cols)
        mod.prefix_task_rows.copy_(rows)
    # what PeftModel passes: the virtual-token indices, one row per batch item
    indices = torch.arange(l, device=shared.device).expand(ids.shape[0], l)
    params = (mod.embedding.weight, mod.prefix_task_cols, mod.prefix_task_rows)
    return Contender("peft", lambda: mod(indices, ids), params), None


def make_contenders(shared, cols, rows, ids, device):
    """All contenders that can run on ``device``, and {name: reason} for those that cannot."""
    out, skipped = [], {}
    for b in backends.BACKENDS:
        name = f"mptkern-{b}"
        why = backends.why_unavailable(b, device)
        if why is None and b == "triton" and device.type == "cpu":
            why = "Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): far too slow to time"
        if why:
            skipped[name] = why
            continue
        out.append(Contender(name, lambda b=b: decomposed_prompts(shared, cols, rows, ids, backend=b), (shared, cols, rows)))
    peft, why = peft_contender(shared, cols, rows, ids)
    if peft:
        out.append(peft)
    else:
        skipped["peft"] = why
    out.append(Contender("eager", lambda: eager(shared, cols, rows, ids), (shared, cols, rows)))
    return out, skipped


def check_agreement(c: Contender, ref: Contender, grad_out) -> None:
    """Raise :class:`Disagreement` unless ``c``'s output and three gradients match ``ref``'s."""
    tol = TOLS[grad_out.dtype]
    got = (c.forward(), *torch.autograd.grad(c.forward(), c.params, grad_out))
    want = (ref.forward(), *torch.autograd.grad(ref.forward(), ref.params, grad_out))
    for what, a, b in zip(("output", "d_shared", "d_task_cols", "d_task_rows"), got, want):
        try:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol * b.abs().max().item())
        except AssertionError as exc:
            raise Disagreement(f"{c.name} {what} differs from {ref.name}: {exc}") from None


def traffic_bytes(B, l, d, esize):
    """Bytes a mode must move at least (the (K, l, r) and (K, r, d) factors are ignored):
    fwd reads shared and writes the prompts; bwd also reads grad_output, reads shared, writes d_shared."""
    fwd = (l * d + B * l * d) * esize
    return {"fwd": fwd, "fwd+bwd": fwd + (B * l * d + 2 * l * d) * esize}


def run(args) -> tuple[list[dict], dict]:
    """Check, time and measure every contender; returns (CSV rows, {refused name: reason})."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    B, l, d, K, r = args.B, args.l, args.d, args.K, args.r
    shared, cols, rows, ids, grad_out = make_inputs(B, l, d, K, r, dtype, device)
    contenders, skipped = make_contenders(shared, cols, rows, ids, device)
    for name, why in skipped.items():
        print(f"skip {name}: {why}")
    ref = next(c for c in contenders if c.name == "eager")
    refused = {}
    for c in contenders:
        if c is not ref:
            try:
                check_agreement(c, ref, grad_out)
            except Disagreement as exc:
                refused[c.name] = str(exc)
                print(f"REFUSED {c.name}: {exc}")
    contenders = [c for c in contenders if c.name not in refused]

    copy_gbs = harness.copy_bandwidth(device)
    nbytes = traffic_bytes(B, l, d, shared.element_size())
    timed = []
    for c in contenders:
        fns = {"fwd": c.forward, "fwd+bwd": lambda c=c: torch.autograd.grad(c.forward(), c.params, grad_out)}
        for mode, fn in fns.items():
            ms = harness.time_fn(fn, device=device, warmup=args.warmup, rep=args.rep)
            timed.append((c.name, mode, ms, harness.peak_memory(fn, device)))
    peft_ms = {mode: ms for name, mode, ms, _ in timed if name == "peft"}
    out = []
    for name, mode, ms, peak in timed:
        gbs = nbytes[mode] / (ms * 1e-3) / 1e9
        out.append(dict(
            op="decomposed_prompts", contender=name, mode=mode, B=B, l=l, d=d, K=K, r=r, dtype=args.dtype,
            ms=round(ms, 5), gbs=round(gbs, 2), copy_gbs=round(copy_gbs, 2), frac_copy=round(gbs / copy_gbs, 4),
            speedup_vs_peft=round(peft_ms[mode] / ms, 3) if mode in peft_ms else "",
            peak_mem_mb=round(peak / 2**20, 2) if peak is not None else "",
        ))
    return out, refused


def print_table(rows, device):
    cpu = torch.device(device).type == "cpu"
    cols = ["contender", "mode", "ms", "speedup_vs_peft"] + ([] if cpu else ["gbs", "frac_copy", "peak_mem_mb"])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in sorted(rows, key=lambda r: (r["mode"], r["contender"])):
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    if cpu:
        print("CPU run: only the ratios to PEFT measured side by side here count; absolute ms and the "
              "GB/s written to the CSV are not a roofline figure.")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    for k, v in dict(B=64, l=100, d=4096, K=21, r=1).items():
        p.add_argument(f"--{k}", type=int, default=v)
    p.add_argument("--warmup", type=float, default=None, help="ms of untimed calls (default: 25 CUDA, 300 CPU)")
    p.add_argument("--rep", type=float, default=None, help="ms of timed calls (default: 100 CUDA, 3000 CPU)")
    p.add_argument("--out", default=str(harness.ROOT / "bench/results/prompt_embed.csv"))
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (25 if cuda else 300)
    args.rep = args.rep if args.rep is not None else (100 if cuda else 3000)

    t0 = time.perf_counter()
    rows, refused = run(args)
    harness.append_rows(args.out, rows, args.device)
    print(f"\ndecomposed_prompts B={args.B} l={args.l} d={args.d} K={args.K} r={args.r} {args.dtype} "
          f"on {harness.device_name(args.device)}; copy ceiling {rows[0]['copy_gbs']} GB/s")
    print_table(rows, args.device)
    print(f"{len(rows)} rows appended to {args.out} in {time.perf_counter() - t0:.1f} s")
    if refused:
        raise SystemExit(f"refused (disagree with eager, not timed): {', '.join(refused)}")
    return rows


if __name__ == "__main__":
    main()
