"""bench/gpu_check.sh: its dry run passes on CPU, its stages fail and time out as recorded failures,
and the CUDA oracle tests it runs (every op and backend against tests/reference.py's float64
oracles, bf16 and fp16).

The oracle tests run where CUDA is, at the shapes the GPU's tiles serve (the paper's for
decomposed prompts and the distillation loss), and inside bench/gpu_check.sh (MPTKERN_GPU_CHECK=1),
whose dry run gives them tiny CPU shapes and Triton's interpreter; elsewhere they are skipped
(tests/test_decomposed_prompts.py, test_prefix_attention.py and test_distill_loss.py cover CPU).
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from mptkern import backends
from mptkern.ops import decomposed_prompts, fused_distill_loss, prefix_attention
from mptkern.ops.prefix_attention import prefix_attention_decode
from tests import reference as ref

ROOT = Path(__file__).resolve().parent.parent
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
IN_CHECK = os.environ.get("MPTKERN_GPU_CHECK") == "1"
HALF = [torch.bfloat16, torch.float16]
# ||got - oracle|| / ||oracle|| for every output and gradient: bf16 operands land between 1e-3 and
# 1e-2, fp16 (3 more mantissa bits) about 8x lower
REL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}

oracle = pytest.mark.skipif(not (CUDA or IN_CHECK), reason="CUDA oracle tests: run on a GPU or by bench/gpu_check.sh")


def _backend(name: str) -> None:
    why = backends.why_unavailable(name, DEVICE)
    if why:
        pytest.skip(f"{name} unavailable on {DEVICE.type}: {why}")


def _check(name, got, want, baseline, dtype):
    """``got`` has ``want``'s shape, is finite, within REL of the float64 oracle in norm and, where a
    ``baseline`` (plain torch in the same dtype) is given, within twice its error (tests/reference.py)."""
    got, want = got.detach().cpu(), want.detach().cpu().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    rel = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert rel <= REL[dtype], f"{name}: relative error {rel:.3g} > {REL[dtype]}"
    if baseline is not None:
        ref.assert_within_baseline(got, want, baseline.detach().cpu(), name=name)


def _randn(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


# ----------------------------------------------------------------------------------------------
# decomposed prompts: the paper's shape on CUDA
# ----------------------------------------------------------------------------------------------
DP_SHAPE = (100, 4096, 21, 1, 64) if CUDA else (5, 37, 3, 2, 4)  # l, d, K, r, B


@oracle
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_decomposed_prompts_oracle(backend, dtype):
    _backend(backend)
    l, d, K, r, B = DP_SHAPE
    g = torch.Generator().manual_seed(0)
    S, C, R = (_randn(g, *s, dtype=dtype).requires_grad_() for s in ((l, d), (K, l, r), (K, r, d)))
    ids = torch.randint(0, K, (B,), generator=g).to(DEVICE)
    grad = _randn(g, B, l, d, dtype=dtype)
    out = decomposed_prompts(S, C, R, ids, backend=backend)
    assert out.dtype == dtype
    got = torch.autograd.grad(out, (S, C, R), grad)
    plain = S * torch.matmul(C[ids], R[ids])
    plain_grads = torch.autograd.grad(plain, (S, C, R), grad)
    _check("out", out, ref.decomposed_prompts(S, C, R, ids), plain, dtype)
    want = ref.decomposed_prompts_grads(S, C, R, ids, grad)
    for name, a, w, b in zip(("d_shared", "d_task_cols", "d_task_rows"), got, want, plain_grads):
        _check(name, a, w, b, dtype)


# ----------------------------------------------------------------------------------------------
# prefix attention (training / prefill) and decode, dense and paged
# ----------------------------------------------------------------------------------------------
PA_CASES = [
    # lens, P, Lp, Hq, Hkv, D, prefix ids, window, sinks: lengths across tile edges, 100-row prefixes
    ([129, 37, 1], 2, 100, 4, 2, 128, [1, 0, -1], None, False),
    ([70, 129], 2, 100, 4, 1, 64, [0, 1], 120, True),
] if CUDA else [([7, 1, 12], 2, 5, 2, 1, 16, [1, -1, 0], None, True)]
_ORACLES: dict = {}  # (test, case, dtype) -> float64 results, shared by the backends


def _pa_inputs(case, dtype):
    lens, P, Lp, hq, hkv, dim, pids, window, sinks = PA_CASES[case]
    g = torch.Generator().manual_seed(case)
    N = sum(lens)
    q, k, v = (_randn(g, N, h, dim, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv))
    pk, pv = (_randn(g, P, Lp, hkv, dim, dtype=dtype).requires_grad_() for _ in range(2))
    s = _randn(g, hq, dtype=dtype).requires_grad_() if sinks else None
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    ids = torch.tensor(pids, device=DEVICE)
    grad = _randn(g, N, hq, dim, dtype=dtype)
    return q, k, v, cu, pk, pv, ids, s, window, grad


def _cpu64(t):
    return t.detach().cpu().double().requires_grad_() if t is not None else None


@oracle
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", range(len(PA_CASES)), ids=lambda i: f"case{i}-D{PA_CASES[i][5]}")
def test_prefix_attention_oracle(case, backend, dtype):
    _backend(backend)
    q, k, v, cu, pk, pv, ids, s, window, grad = _pa_inputs(case, dtype)
    leaves = [t for t in (q, k, v, pk, pv, s) if t is not None]
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dsinks"][: len(leaves)]
    out, lse = prefix_attention(q, k, v, cu, pk, pv, ids, window=window, sinks=s, return_lse=True, backend=backend)
    got = torch.autograd.grad(out, leaves, grad)
    base = prefix_attention(q, k, v, cu, pk, pv, ids, window=window, sinks=s, backend="torch")
    base_grads = torch.autograd.grad(base, leaves, grad)
    key = ("prefill", case, dtype)
    if key not in _ORACLES:
        r_leaves = [_cpu64(t) for t in leaves]
        rq, rk, rv, rpk, rpv = r_leaves[:5]
        rs = r_leaves[5] if s is not None else None
        r_out, r_lse = ref.prefix_attention(rq, rk, rv, cu.cpu(), rpk, rpv, ids.cpu(), window=window, sinks=rs)
        r_grads = torch.autograd.grad(r_out, r_leaves, grad.cpu().double())
        _ORACLES[key] = (r_out.detach(), r_lse.detach(), r_grads)
    r_out, r_lse, r_grads = _ORACLES[key]
    _check("out", out, r_out, r_out.to(dtype), dtype)
    _check("lse", lse, r_lse, None, dtype)
    for name, a, w, b in zip(names, got, r_grads, base_grads):
        _check(name, a, w, b, dtype)


DECODE_CASES = [
    # cache lens, slab length S, P, Lp, Hq, Hkv, D, prefix ids
    ([1, 60, 129, 160], 160, 2, 100, 8, 2, 128, [0, 1, -1, 1]),
    ([33, 200], 200, 1, 100, 8, 1, 64, [0, 0]),
] if CUDA else [([1, 9, 4], 9, 2, 7, 4, 2, 16, [1, 0, -1])]


def _paged(rows_per_seq, block, g, dtype):
    """One pool of shuffled blocks of ``block`` rows holding every sequence's (k, v) rows, NaN in
    the rows nobody writes, and each sequence's table row (padded with -1)."""
    hkv, dim = rows_per_seq[0][0].shape[1:]
    counts = [-(-k.shape[0] // block) for k, _ in rows_per_seq]
    perm = torch.randperm(sum(counts) + 2, generator=g)
    pools = [torch.full((perm.numel(), block, hkv, dim), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2)]
    tables, at = torch.full((len(rows_per_seq), max(counts)), -1, dtype=torch.int32), 0
    for b, ((k, v), c) in enumerate(zip(rows_per_seq, counts)):
        blocks = perm[at: at + c]
        at += c
        j = torch.arange(k.shape[0])
        for pool, rows in zip(pools, (k, v)):
            pool[blocks[j // block].to(DEVICE), (j % block).to(DEVICE)] = rows
        tables[b, :c] = blocks.to(torch.int32)
    return pools[0], pools[1], tables.to(DEVICE)


@oracle
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)), ids=lambda i: f"case{i}-D{DECODE_CASES[i][6]}")
def test_prefix_attention_decode_oracle(case, paged, backend, dtype):
    _backend(backend)
    n, S, P, Lp, hq, hkv, dim, pids = DECODE_CASES[case]
    g = torch.Generator().manual_seed(100 + case)
    B = len(n)
    q = _randn(g, B, hq, dim, dtype=dtype)
    kc, vc = (_randn(g, B, S, hkv, dim, dtype=dtype) for _ in range(2))
    pk, pv = (_randn(g, P, Lp, hkv, dim, dtype=dtype) for _ in range(2))
    earlier = [torch.randn(m - 1, hq, dim, generator=g).to(dtype) for m in n]  # the prefill's other queries
    lens, ids = torch.tensor(n, device=DEVICE), torch.tensor(pids, device=DEVICE)
    plens = torch.full((P,), Lp, device=DEVICE)
    if paged:
        seqs = [(kc[b, :m], vc[b, :m]) for b, m in enumerate(n)] + [(pk[p], pv[p]) for p in range(P)]
        pool_k, pool_v, tables = _paged(seqs, 16, g, dtype)
        out, lse = prefix_attention_decode(q, pool_k, pool_v, lens, pool_k, pool_v, ids, prefix_lens=plens,
                                           block_tables=tables[:B], prefix_block_tables=tables[B:], return_lse=True,
                                           backend=backend)
    else:
        out, lse = prefix_attention_decode(q, kc, vc, lens, pk, pv, ids, prefix_lens=plens, return_lse=True, backend=backend)
    key = ("decode", case, dtype)
    if key not in _ORACLES:  # the same tokens as a prefill in float64; decode is each sequence's last row
        qf = torch.cat([torch.cat([e, q[b: b + 1].cpu()]) for b, e in enumerate(earlier)]).double()
        kf, vf = (torch.cat([c[b, :m].cpu() for b, m in enumerate(n)]).double() for c in (kc, vc))
        cu = torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)
        r_out, r_lse = ref.prefix_attention(qf, kf, vf, cu, pk.cpu().double(), pv.cpu().double(), ids.cpu())
        last = cu[1:].long() - 1
        _ORACLES[key] = (r_out[last], r_lse[last])
    r_out, r_lse = _ORACLES[key]
    _check("out", out, r_out, r_out.to(dtype), dtype)
    _check("lse", lse, r_lse, None, dtype)


# ----------------------------------------------------------------------------------------------
# fused distillation loss: d=4096, V=128256 on CUDA (the paper's head), every term
# ----------------------------------------------------------------------------------------------
FD_SHAPE = (300, 4096, 128256) if CUDA else (7, 32, 300)  # N, d, V
FD_TERMS = dict(temperature=2.0, kl_weight=1.0, ce_weight=0.7, hidden_weight=0.3)


def _plain_distill(hs, ht, W, labels, temperature, kl_weight, ce_weight, hidden_weight):
    """Full logits in the inputs' dtype, what a user writes: the baseline of the tolerance rule."""
    F = torch.nn.functional
    T = temperature
    zs, zt = hs @ W.T, ht @ W.T
    kl = F.kl_div(torch.log_softmax(zs / T, -1), torch.log_softmax(zt / T, -1), log_target=True, reduction="none").sum(-1)
    loss = kl_weight * T * T * kl + hidden_weight * (hs - ht).square().mean(-1)
    loss = loss + ce_weight * F.cross_entropy(zs, labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    return torch.where(valid, loss, torch.zeros_like(loss)).sum() / valid.sum()


@oracle
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_distill_loss_oracle(backend, dtype):
    _backend(backend)
    N, d, V = FD_SHAPE
    g = torch.Generator().manual_seed(0)
    W = _randn(g, V, d, dtype=dtype, scale=d**-0.5)
    h = torch.randn(N, d, generator=g) * 2
    ht = (h + torch.randn(N, d, generator=g)).to(DEVICE, dtype)
    hs = h.to(DEVICE, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    labels[0] = 1  # at least one valid token
    labels = labels.to(DEVICE)
    out = fused_distill_loss(hs, ht, W, labels, backend=backend, **FD_TERMS)
    grad_out = (torch.rand(out.shape, generator=g) + 0.5).to(DEVICE, out.dtype)  # not one
    (dx,) = torch.autograd.grad(out, hs, grad_out)
    plain = _plain_distill(hs, ht, W, labels, **FD_TERMS)
    (plain_dx,) = torch.autograd.grad(plain, hs, grad_out.to(plain.dtype))
    assert dx.dtype == dtype
    _check("loss", out, ref.fused_distill_loss(hs, ht, W, labels, **FD_TERMS), plain, dtype)
    _check("d_student", dx, ref.fused_distill_loss_grad(hs, ht, W, labels, grad_out, **FD_TERMS), plain_dx, dtype)


# ----------------------------------------------------------------------------------------------
# the script
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_check

    return gpu_check


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(IN_CHECK, reason="inside bench/gpu_check.sh: the check does not run itself")
def test_dry_run_passes_every_stage_and_writes_at_most_8_files(tmp_path, gpu_check):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MPTKERN_GPU_CHECK", "TRITON_INTERPRET")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    print(f"dry run: {wall:.0f} s")
    assert "DRY RUN" in log and "sequential caps:" in log
    for name, cap in gpu_check.CAPS.items():
        assert f"{name:<17} cap {cap:>4.0f} s" in log, f"no budget line for {name}"
        if name == "build":
            assert "[gpu-check] END build: skipped: dry run" in log
        else:
            assert f"[gpu-check] BEGIN {name} (cap {cap} s" in log and f"[gpu-check] END {name}: ok in" in log, name
    files = {p.name for p in out.iterdir()}
    assert len(files) <= 8, files
    assert {"gpu_check.log", "stages.csv", "summary.csv", "kernels.csv", "models.csv", "tests.xml", "speedups.png"} <= files
    assert {r["stage"]: r["status"] for r in _rows(out / "stages.csv")}.keys() == gpu_check.CAPS.keys()
    # every benchmark that times on CPU wrote rows (prefix attention only checks agreement there)
    assert {r["bench"] for r in _rows(out / "kernels.csv")} == {"prompt_embed", "distill_loss"}
    assert {r["bench"] for r in _rows(out / "models.csv")} == {"train_step", "shared_prefix", "engine"}
    summary = _rows(out / "summary.csv")
    assert {r["bench"] for r in summary if r["contender"].startswith("mptkern")} == {
        "prompt_embed", "distill_loss", "train_step", "shared_prefix", "engine"}
    assert all(float(r["ratio"]) > 0 and r["frac_of_h200_peak"] == "" for r in summary)
    # the oracle tests ran (in the interpreter), none was skipped for want of a backend but cuda's
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0
    assert ran >= 14, f"only {ran} oracle tests ran"


def _stages(gpu_check, py):
    S = gpu_check.Stage
    return lambda ctx: [
        S("bg", 20, "background", cmd=[py, "-c", "print('from the background')"], background=True),
        S("bg_slow", 1, "background, outruns its cap", cmd=["bash", "-c", "sleep 60; echo never"], background=True),
        S("boom", 20, "exits 3", cmd=[py, "-c", "raise SystemExit(3)"]),
        S("slow", 1, "outruns its cap", cmd=["bash", "-c", "sleep 60; echo never"]),
        S("fine", 20, "passes after the failures", cmd=[py, "-c", "print('still ran')"], after="bg"),
        S("broken", 20, "raises in process", fn=lambda: 1 / 0),
        S("skipped", 20, "cannot run here", cmd=["false"], skip="no such tool"),
        S("report", 20, "report", fn=lambda: None),
    ]


def test_failing_and_overlong_stages_are_recorded_and_the_rest_run(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "build_stages", _stages(gpu_check, sys.executable))
    t0 = time.monotonic()
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert time.monotonic() - t0 < 30, "the 1 s cap did not stop a 60 s stage"
    status = {r["stage"]: r["status"] for r in _rows(tmp_path / "stages.csv")}
    assert status == {"bg": "ok", "bg_slow": "TIMEOUT", "boom": "FAILED (exit 3)", "slow": "TIMEOUT", "fine": "ok",
                      "broken": "FAILED (ZeroDivisionError: division by zero)", "skipped": "skipped: no such tool",
                      "report": "ok"}
    log = (tmp_path / "gpu_check.log").read_text()
    assert "from the background" in log and "still ran" in log and "never" not in log.splitlines()
    assert "FAILED: boom, slow, broken, bg_slow" in log


def test_only_runs_the_stages_named(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "build_stages", _stages(gpu_check, sys.executable))
    assert gpu_check.main(["--out", str(tmp_path), "--only", "fine,bg"]) == 0
    status = {r["stage"]: r["status"] for r in _rows(tmp_path / "stages.csv")}
    assert status["fine"] == status["bg"] == status["report"] == "ok"
    assert status["boom"] == status["slow"] == status["broken"] == status["bg_slow"] == "skipped: not selected (--only)"
    assert gpu_check.main(["--out", str(tmp_path), "--only", "nope"]) == 2


def test_caps_fit_the_budget(gpu_check):
    caps = gpu_check.CAPS
    assert sum(v for k, v in caps.items() if k != "build") <= gpu_check.BUDGET_S
    # the background build is joined before "tests": it must be done by then even at its cap
    ctx = gpu_check.Context(dry=True, py=sys.executable, out=Path("."), work=Path("."), env={})
    names = [s.name for s in gpu_check.build_stages(ctx)]
    before_tests = names[1: names.index("tests")]
    assert caps["build"] <= sum(caps[n] for n in before_tests)


def test_summary_ratios_and_peak_fractions(gpu_check):
    rows = [dict(contender="mptkern-triton", mode="fwd", B=64, l=100, d=4096, K=21, gbs=2400.0, frac_copy=0.55,
                 speedup_vs_peft=3.0),
            dict(contender="peft", mode="fwd", B=64, l=100, d=4096, K=21, gbs=800.0, frac_copy=0.2, speedup_vs_peft=1.0)]
    (s,) = gpu_check.summarize("prompt_embed", rows)
    assert (s["anchor"], s["ratio"], s["achieved"], s["unit"], s["frac_of_h200_peak"]) == ("peft", 3.0, 2.4, "TB/s", 0.5)
    rows = [dict(contender="mptkern", op="distill_step", B=16, K=8, l=100, tokens_per_s=10000.0, speedup_vs_peft=2.0)]
    (s,) = gpu_check.summarize("train_step", rows, "1b")
    import harness

    assert math.isclose(s["achieved"], 6 * harness.model_params("1b") * 1e4 / 1e12, rel_tol=1e-3)
    assert 1.2e9 < harness.model_params("1b") < 1.3e9  # Llama-3.2-1B: 1.24B parameters
