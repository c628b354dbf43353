"""Benchmark of ``mptkern.ops.prefix_attention`` (Triton) against SDPA, FlexAttention and flash-attn.

Scenarios (bf16 by default, head dims 128 and 64; Hq/Hkv 32/8 at D=128 like Llama 3.1 8B, 64/8 at
D=64 like gpt-oss):
  * ``dense``: B=8 causal sequences of 2048 tokens, no prefix: the kernel against SDPA's flash
    backend on the same work. Goal: fwd >= 0.9x, fwd+bwd >= 0.8x SDPA-flash TFLOP/s.
  * ``shared``: the MPT training batch, l=100 prompt rows per task, 8 tasks, 64 sequences of 64-512
    tokens. mptkern packs each task's prompt once plus the inputs, the prefix read in place (as
    PromptedLM does); the baselines must materialise the prompt per sequence and process
    ``l + n_b`` tokens per sequence: SDPA-flash on the right-padded batch (is_causal), FlexAttention
    on the packed materialised stream (document + causal mask), flash-attn varlen where installed.
    TFLOP/s count the FLOPs mptkern needs (visible query-key pairs of the shared stream), so every
    contender's figure is directly a speed ratio. Only attention is timed (the materialised inputs
    are built outside the timed closure, which flatters the baselines).
  * ``decode``: one new token per sequence, 8 tasks' 100-row prefixes plus per-sequence caches of
    64-512 tokens, batch 1-256: ``prefix_attention_decode`` against SDPA on the materialised,
    padded cache with a key-padding mask (and flash-attn's ``flash_attn_with_kvcache`` where
    installed). Reported as tokens/s and GB/s of K/V read.

Every contender's output is checked against mptkern's before it is timed. FLOPs: 4*D per visible
(query, key) pair and head forward, 2.5x that for the backward (FlashAttention's convention).
Fractions are of ``harness.matmul_tflops`` (bf16 8192^3 matmul) measured in the same run.

On CPU the Triton kernels run only in the interpreter, which is not a benchmark: the script then
checks agreement on a tiny shape and refuses to time anything.

    python bench/bench_prefix_attention.py                  # GPU: all scenarios, CSV in bench/results/
    python bench/bench_prefix_attention.py --device cpu     # smoke check only
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch
import torch.nn.functional as F

import harness
from mptkern.ops import prefix_attention
from mptkern.ops.prefix_attention import prefix_attention_decode

DTYPES = harness.DTYPES
HEADS = {128: (32, 8), 64: (64, 8)}
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


Disagreement = harness.Disagreement


def _agree(name, got, want):
    tol = TOL[want.dtype]
    try:
        torch.testing.assert_close(got.float(), want.float(), atol=tol * max(want.abs().max().item(), 1.0), rtol=tol)
    except AssertionError as exc:
        raise Disagreement(f"{name} disagrees with mptkern: {exc}") from None


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def shared_batch(B, K, l, lo, hi, hq, hkv, dim, dtype, device, seed=0):
    """The shared-prefix stream as PromptedLM builds it and the same tokens materialised per sequence.

    Returns dict with: packed q/k/v (U prompts of l rows, then the inputs), cu, prefix ids, prefix
    K/V views, and the materialised per-sequence tensors (prompt rows copied before each input)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (B,), generator=g).tolist()
    tasks = torch.randint(0, K, (B,), generator=g)
    uniq, slot = torch.unique(tasks, return_inverse=True)
    U = uniq.numel()
    N = U * l + sum(lens)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    q, k, v = mk(N, hq, dim), mk(N, hkv, dim), mk(N, hkv, dim)
    cu = torch.tensor([0] + torch.tensor([l] * U + lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    ids = torch.cat([torch.full((U,), -1), slot]).to(device)
    # materialised: sequence b = [prompt rows of its task | its own rows]
    rows = []
    for b, n in enumerate(lens):
        p = int(slot[b])
        s = int(cu[U + b])
        rows.append(torch.cat([torch.arange(p * l, p * l + l), torch.arange(s, s + n)]))
    mat_lens = [l + n for n in lens]
    index = torch.cat(rows).to(device)
    mat_cu = torch.tensor([0] + torch.tensor(mat_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return dict(q=q, k=k, v=v, cu=cu, ids=ids, U=U, l=l, lens=lens, index=index, mat_cu=mat_cu, mat_lens=mat_lens)


def shared_flops(U, l, lens, hq, dim):
    """Visible (query, key) pairs of the shared stream x 4 D x heads: prompts causal once per task,
    inputs see the whole prompt and themselves causally."""
    pairs = U * l * (l + 1) // 2 + sum(n * l + n * (n + 1) // 2 for n in lens)
    return 4 * dim * hq * pairs


def _prefix_views(t, U, l):
    return t[: U * l].reshape(U, l, *t.shape[1:])


def mptkern_shared(d, backend="triton"):
    q, k, v, U, l = d["q"], d["k"], d["v"], d["U"], d["l"]
    return prefix_attention(q, k, v, d["cu"], _prefix_views(k, U, l), _prefix_views(v, U, l), d["ids"], backend=backend)


def _input_rows(d):
    """Rows of the packed stream holding the inputs, and of the materialised stream holding them."""
    U, l = d["U"], d["l"]
    own = torch.arange(U * l, d["q"].shape[0], device=d["q"].device)
    mat = torch.cat([torch.arange(int(s) + l, int(e)) for s, e in zip(d["mat_cu"][:-1], d["mat_cu"][1:])]).to(own.device)
    return own, mat


def sdpa_padded(q, k, v, lens_cu, hq, hkv):
    """(B, H, Lmax, D) right-padded batch for SDPA, K/V heads repeated to Hq (flash has no GQA)."""
    c = lens_cu.tolist()
    L = max(e - s for s, e in zip(c[:-1], c[1:]))
    B = len(c) - 1

    def pad(t):
        out = t.new_zeros(B, L, *t.shape[1:])
        for b, (s, e) in enumerate(zip(c[:-1], c[1:])):
            out[b, : e - s] = t[s:e]
        return out.transpose(1, 2)

    qp, kp, vp = pad(q), pad(k), pad(v)
    kp, vp = (t.repeat_interleave(hq // hkv, dim=1) for t in (kp, vp))
    return qp, kp, vp


def sdpa_flash(qp, kp, vp):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)


def flex_packed(q, k, v, cu, hq, hkv):
    """FlexAttention on a packed stream with a document + causal block mask; returns a closure."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    N = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device), (cu[1:] - cu[:-1]).long())

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (ki <= qi)

    block_mask = create_block_mask(mask_mod, None, None, N, N, device=q.device)
    flex = torch.compile(flex_attention)
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))

    def run():
        return flex(qt, kt, vt, block_mask=block_mask, enable_gqa=hq != hkv)[0].transpose(0, 1)

    return run


def flash_attn_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _time_modes(name, fwd, leaves, device, args):
    """(mode, ms, peak bytes) for fwd and fwd+bwd (a fixed random grad_output, no accumulation)."""
    out = fwd()
    grad = torch.randn_like(out)
    fns = {"fwd": fwd, "fwd+bwd": lambda: torch.autograd.grad(fwd(), leaves, grad)}
    res = []
    for mode, fn in fns.items():
        ms = harness.time_fn(fn, device=device, warmup=args.warmup, rep=args.rep)
        res.append((name, mode, ms, harness.peak_memory(fn, device)))
    return res


def run_training(args, device, dtype, dim, peak_tflops):
    hq, hkv = HEADS[dim]
    rows = []
    # dense: no prefix, equal lengths
    B, n = 8, 2048
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B * n, h, dim, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv))
    cu = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=device)
    flops = 4 * dim * hq * B * n * (n + 1) // 2
    contenders = {"mptkern-triton": (lambda: prefix_attention(q, k, v, cu, backend="triton"), (q, k, v))}
    qp, kp, vp = (t.detach().requires_grad_() for t in sdpa_padded(q.detach(), k.detach(), v.detach(), cu, hq, hkv))
    contenders["sdpa-flash"] = (lambda: sdpa_flash(qp, kp, vp).transpose(1, 2).reshape(B * n, hq, dim), (qp, kp, vp))
    fa = flash_attn_varlen()
    if fa:
        contenders["flash-attn-varlen"] = (lambda: fa(q, k, v, cu, cu, n, n, causal=True), (q, k, v))
    try:
        if args.no_flex:
            raise RuntimeError("--no-flex")
        contenders["flex"] = (flex_packed(q, k, v, cu, hq, hkv), (q, k, v))
    except Exception as exc:  # reported, not hidden
        print(f"skip flex (dense): {type(exc).__name__}: {exc}")
    rows += _measure("dense", contenders, flops, device, args, peak_tflops, dim)

    # shared prefix: l=100, 8 tasks, 64 sequences of 64-512 tokens
    d = shared_batch(64, 8, 100, 64, 512, hq, hkv, dim, dtype, device)
    for t in ("q", "k", "v"):
        d[t].requires_grad_()
    flops = shared_flops(d["U"], d["l"], d["lens"], hq, dim)
    own, mat = _input_rows(d)
    idx = d["index"]
    mq, mk_, mv = (d[t].detach()[idx].requires_grad_() for t in ("q", "k", "v"))
    contenders = {"mptkern-triton": (lambda: mptkern_shared(d)[own], (d["q"], d["k"], d["v"]))}
    qp, kp, vp = (t.detach().requires_grad_() for t in sdpa_padded(mq.detach(), mk_.detach(), mv.detach(), d["mat_cu"], hq, hkv))
    valid = torch.cat([torch.arange(n) + b * qp.shape[2] for b, n in enumerate(d["mat_lens"])]).to(device)

    def sdpa_shared():
        o = sdpa_flash(qp, kp, vp).transpose(1, 2).reshape(-1, hq, dim)[valid]
        return o[mat]

    contenders["sdpa-flash-materialised"] = (sdpa_shared, (qp, kp, vp))
    if fa:
        Lmax = max(d["mat_lens"])
        contenders["flash-attn-varlen-materialised"] = (lambda: fa(mq, mk_, mv, d["mat_cu"], d["mat_cu"], Lmax, Lmax, causal=True)[mat], (mq, mk_, mv))
    try:
        if args.no_flex:
            raise RuntimeError("--no-flex")
        flex_run = flex_packed(mq, mk_, mv, d["mat_cu"], hq, hkv)
        contenders["flex-materialised"] = (lambda: flex_run()[mat], (mq, mk_, mv))
    except Exception as exc:
        print(f"skip flex (shared): {type(exc).__name__}: {exc}")
    rows += _measure("shared-l100-8tasks-64seq", contenders, flops, device, args, peak_tflops, dim)
    return rows


def _measure(scenario, contenders, flops, device, args, peak_tflops, dim):
    ref_name = "mptkern-triton"
    with torch.no_grad():
        want = contenders[ref_name][0]()
    timed = []
    for name, (fwd, leaves) in contenders.items():
        if name != ref_name:
            try:
                with torch.no_grad():
                    _agree(name, fwd(), want)
            except Disagreement as exc:
                print(f"REFUSED {exc}")
                continue
        timed += _time_modes(name, fwd, leaves, device, args)
    base = {mode: ms for name, mode, ms, _ in timed if name.startswith("sdpa-flash")}
    rows = []
    for name, mode, ms, peak in timed:
        f = flops * (1.0 if mode == "fwd" else 3.5)
        tflops = f / (ms * 1e-3) / 1e12
        rows.append(dict(scenario=scenario, head_dim=dim, contender=name, mode=mode, batch="", ms=round(ms, 4),
                         tflops=round(tflops, 2), frac_matmul=round(tflops / peak_tflops, 3),
                         tokens_per_s="", gbs="", speedup_vs_sdpa=round(base[mode] / ms, 3) if mode in base else "",
                         peak_mib=round(peak / 2**20, 1) if peak is not None else ""))
        print(f"{scenario:<26} d{dim} {name:<32} {mode:<8} {ms:9.3f} ms {tflops:7.1f} TFLOP/s ({tflops / peak_tflops:.2f} of matmul)")
    return rows


def run_decode(args, device, dtype, dim, peak_tflops):
    hq, hkv = HEADS[dim]
    rows = []
    fa = None
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_with_kvcache as fa
    for B in args.decode_batches:
        g = torch.Generator().manual_seed(B)
        S, P, l = 512, 8, 100
        mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
        q, kc, vc, pk, pv = mk(B, hq, dim), mk(B, S, hkv, dim), mk(B, S, hkv, dim), mk(P, l, hkv, dim), mk(P, l, hkv, dim)
        lens = torch.randint(64, S + 1, (B,), generator=g).to(device)
        ids = torch.randint(0, P, (B,), generator=g).to(device)
        # materialised: [prefix | cache] per sequence, padded to l + S, with a key-padding mask
        km, vm = (torch.cat([p[ids], c], 1) for p, c in ((pk, kc), (pv, vc)))
        valid = torch.arange(l + S, device=device)[None] < (l + lens)[:, None]
        mask = valid[:, None, None, :]
        kmh, vmh = (t.transpose(1, 2).repeat_interleave(hq // hkv, 1) for t in (km, vm))
        contenders = {
            "mptkern-triton": lambda: prefix_attention_decode(q, kc, vc, lens, pk, pv, ids, backend="triton"),
            "sdpa-materialised": lambda: F.scaled_dot_product_attention(q[:, :, None], kmh, vmh, attn_mask=mask)[:, :, 0],
        }
        if fa is not None:
            lens32 = (l + lens).to(torch.int32)
            contenders["flash-attn-kvcache-materialised"] = lambda: fa(q[:, None], km, vm, cache_seqlens=lens32)[:, 0]
        want = contenders["mptkern-triton"]()
        kv_bytes = 2 * (int(lens.sum()) + P * l) * hkv * dim * q.element_size()
        for name, fn in contenders.items():
            try:
                if name != "mptkern-triton":
                    _agree(name, fn(), want)
            except Disagreement as exc:
                print(f"REFUSED {exc}")
                continue
            ms = harness.time_fn(fn, device=device, warmup=args.warmup, rep=args.rep)
            peak = harness.peak_memory(fn, device)
            flops = 4 * dim * hq * int((l + lens).sum())
            tflops = flops / (ms * 1e-3) / 1e12
            rows.append(dict(scenario="decode-l100-8tasks", head_dim=dim, contender=name, mode="decode", batch=B,
                             ms=round(ms, 4), tflops=round(tflops, 3), frac_matmul=round(tflops / peak_tflops, 4),
                             tokens_per_s=round(B / (ms * 1e-3)), gbs=round(kv_bytes / (ms * 1e-3) / 1e9, 1),
                             speedup_vs_sdpa="", peak_mib=round(peak / 2**20, 1) if peak is not None else ""))
            print(f"decode d{dim} B={B:<4} {name:<34} {ms:8.4f} ms {B / (ms * 1e-3):12.0f} tok/s")
    sd = {(r["batch"]): r["ms"] for r in rows if r["contender"] == "sdpa-materialised"}
    for r in rows:
        r["speedup_vs_sdpa"] = round(sd[r["batch"]] / r["ms"], 3) if r["batch"] in sd else ""
    return rows


# ----------------------------------------------------------------------------------------------
# CPU: agreement only
# ----------------------------------------------------------------------------------------------
def smoke(dtype=torch.float32) -> None:
    """Tiny agreement check that runs anywhere: mptkern (torch backend) on the shared stream equals
    causal attention on the materialised sequences; decode equals the materialised cache."""
    device = torch.device("cpu")
    hq, hkv, dim = 4, 2, 16
    d = shared_batch(5, 3, 7, 3, 11, hq, hkv, dim, dtype, device)
    own, mat = _input_rows(d)
    got = mptkern_shared(d, backend="torch")[own]
    idx = d["index"]
    mq, mk_, mv = (d[t][idx] for t in ("q", "k", "v"))
    c = d["mat_cu"].tolist()
    outs = []
    for s, e in zip(c[:-1], c[1:]):
        qh, kh, vh = (t[s:e].transpose(0, 1) for t in (mq, mk_, mv))
        kh, vh = (t.repeat_interleave(hq // hkv, 0) for t in (kh, vh))
        outs.append(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(0, 1))
    _agree("sdpa (materialised)", torch.cat(outs)[mat], got)
    g = torch.Generator().manual_seed(0)
    B, S, P, l = 3, 9, 2, 7
    q, kc, vc = torch.randn(B, hq, dim, generator=g), torch.randn(B, S, hkv, dim, generator=g), torch.randn(B, S, hkv, dim, generator=g)
    pk, pv = torch.randn(P, l, hkv, dim, generator=g), torch.randn(P, l, hkv, dim, generator=g)
    lens, ids = torch.tensor([1, 9, 4]), torch.tensor([1, 0, 1])
    got = prefix_attention_decode(q, kc, vc, lens, pk, pv, ids, backend="torch")
    km, vm = (torch.cat([p[ids], c], 1).transpose(1, 2).repeat_interleave(hq // hkv, 1) for p, c in ((pk, kc), (pv, vc)))
    mask = (torch.arange(l + S)[None] < (l + lens)[:, None])[:, None, None, :]
    _agree("sdpa decode (materialised)", F.scaled_dot_product_attention(q[:, :, None], km, vm, attn_mask=mask)[:, :, 0], got)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--scenarios", nargs="+", default=["training", "decode"], choices=["training", "decode"])
    p.add_argument("--no-flex", action="store_true", help="leave out FlexAttention (its torch.compile takes tens of seconds)")
    p.add_argument("--warmup", type=float, default=25)
    p.add_argument("--rep", type=float, default=100)
    p.add_argument("--out", default=str(harness.ROOT / "bench" / "results" / "prefix_attention.csv"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        smoke()
        print("agreement ok on a tiny CPU shape; timing refused: on CPU the Triton kernels run only in the "
              "interpreter (TRITON_INTERPRET=1), which is not a benchmark. Run on a GPU.")
        return 0
    dtype = DTYPES[args.dtype]
    peak = harness.matmul_tflops(device)
    print(f"{harness.device_name(device)}: bf16 matmul {peak:.1f} TFLOP/s")
    rows = []
    for dim in args.head_dims:
        if "training" in args.scenarios:
            rows += run_training(args, device, dtype, dim, peak)
        if "decode" in args.scenarios:
            rows += run_decode(args, device, dtype, dim, peak)
    for r in rows:
        r["matmul_tflops"] = round(peak, 1)
    path = harness.append_rows(args.out, rows, device)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
