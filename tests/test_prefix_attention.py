import importlib
import re

import pytest
import torch

from mptkern import backends
from mptkern.ops import prefix_attention
from mptkern.ops.prefix_attention import plan_paged_decode, prefix_attention_decode
from tests import reference as ref

MOD = importlib.import_module("mptkern.ops.prefix_attention")
TILES = importlib.import_module("mptkern.ops.prefix_attention.tiles")
DECODE = importlib.import_module("mptkern.ops.prefix_attention.decode")
# This file builds CPU tensors: its triton cases run in the interpreter (TRITON_INTERPRET=1, set by
# conftest on a machine without a GPU) and skip on a GPU machine, where the CUDA oracle tests of
# tests/test_gpu_check.py (run by bench/gpu_check.sh) cover the kernels on device tensors.
DEVICE = torch.device("cpu")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    reason = backends.why_unavailable(request.param, DEVICE)
    if reason:
        pytest.skip(f"{request.param} unavailable on {DEVICE.type}: {reason}")
    return request.param


def _case(lens, P, Lp, hq, hkv, dim, prefix_ids, dtype=torch.float32, seed=0, sinks=False):
    g = torch.Generator().manual_seed(seed)
    N = sum(lens)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(N, hq, dim), mk(N, hkv, dim), mk(N, hkv, dim)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    pk, pv = (mk(P, Lp, hkv, dim), mk(P, Lp, hkv, dim)) if P else (None, None)
    ids = torch.tensor(prefix_ids) if P else None
    s = mk(hq) if sinks else None
    return q, k, v, cu, pk, pv, ids, s


CASES = [
    # lens, P, Lp, Hq, Hkv, D, prefix_ids, window, sinks
    ([1], 1, 5, 2, 2, 16, [0], None, False),
    ([7, 1, 37], 2, 5, 4, 1, 16, [1, -1, 0], None, True),
    ([37, 7], 1, 100, 8, 1, 16, [0, 0], 16, True),  # window shorter than the prefix
    ([129], 0, 0, 4, 4, 16, None, 64, False),  # no prefix at all
    ([7, 37, 5], 3, 5, 4, 2, 16, [2, 2, -1], 300, True),  # window longer than prefix + input
    ([5, 9], 2, 12, 2, 2, 16, [1, 0], 6, False),
    ([37, 1, 20, 7], 3, 100, 8, 1, 32, [2, 0, 2, -1], 120, True),  # 100-token prefix shared, window inside it
    ([37, 129], 2, 100, 4, 4, 16, [1, 1], None, False),  # prefix 0 unused
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lens{c[0]}-P{c[1]}-Lp{c[2]}-g{c[3] // c[4]}-d{c[5]}-w{c[7]}-s{int(c[8])}")
def test_matches_float64_oracle_with_gradients(case, backend):
    lens, P, Lp, hq, hkv, dim, pids, window, sinks = case
    q, k, v, cu, pk, pv, ids, s = _case(lens, P, Lp, hq, hkv, dim, pids, sinks=sinks)
    out, lse = prefix_attention(q, k, v, cu, pk, pv, ids, window=window, sinks=s, return_lse=True, backend=backend)
    args = [t.detach().double().requires_grad_() if t is not None and t.is_floating_point() else t for t in (q, k, v, cu, pk, pv, ids, s)]
    r_out, r_lse = ref.prefix_attention(*args[:7], window=window, sinks=args[7])
    torch.testing.assert_close(out.double(), r_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), r_lse, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    leaves = [t for t in (q, k, v, pk, pv, s) if t is not None]
    r_leaves = [t for t in (args[0], args[1], args[2], args[4], args[5], args[7]) if t is not None]
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(r_out, r_leaves, grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_prefix_lens_and_shared_prefix_gradient_sums_over_sequences(backend):
    q, k, v, cu, pk, pv, ids, _ = _case([4, 6, 3], 2, 8, 2, 1, 16, [1, 1, 0])
    lens = torch.tensor([3, 8])
    out = prefix_attention(q, k, v, cu, pk, pv, ids, prefix_lens=lens, backend=backend)
    r_out, _ = ref.prefix_attention(q, k, v, cu, pk, pv, ids, prefix_lens=lens)
    torch.testing.assert_close(out.double(), r_out, atol=2e-6, rtol=1e-5)
    dpk, = torch.autograd.grad(out.sum(), pk)
    assert torch.count_nonzero(dpk[0, 3:]) == 0  # keys past prefix_lens are never seen
    # prefix 1 is used by sequences 0 and 1: its gradient is the sum of their separate gradients
    per_seq = []
    for b in (0, 1):
        sl = slice(int(cu[b]), int(cu[b + 1]))
        o = prefix_attention(q[sl], k[sl], v[sl], torch.tensor([0, sl.stop - sl.start], dtype=torch.int32), pk, pv, ids[b:b + 1],
                             backend=backend)
        per_seq.append(torch.autograd.grad(o.sum(), pk)[0][1])
    torch.testing.assert_close(dpk[1], per_seq[0] + per_seq[1])


@pytest.mark.parametrize("shipped_blocks", [False, True], ids=["small-tiles", "shipped-tiles"])
def test_bf16_within_twice_plain_torch_error(backend, shipped_blocks, monkeypatch):
    if shipped_blocks:
        if backend == "torch":
            pytest.skip("tile sizes are the triton backend's")
        monkeypatch.setattr(TILES, "INTERPRET_BLOCK", None)  # the GPU's 16-bit configurations
    q, k, v, cu, pk, pv, ids, s = _case([7, 37, 129], 2, 100, 4, 2, 16, [1, 0, 1], dtype=torch.bfloat16, sinks=True)
    out = prefix_attention(q, k, v, cu, pk, pv, ids, sinks=s, window=120, backend=backend)
    args = [t.detach().double().requires_grad_() if t is not None and t.is_floating_point() else t for t in (q, k, v, cu, pk, pv, ids, s)]
    r_out, _ = ref.prefix_attention(*args[:7], sinks=args[7], window=120)
    # plain torch in bf16: the oracle's math done on bf16 inputs rounded to bf16 output
    plain = r_out.to(torch.bfloat16)
    ref.assert_within_baseline(out, r_out, plain, name="bf16 out")
    # gradients: the baseline is the torch backend run in bf16
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    leaves = (q, k, v, pk, pv, s)
    got = torch.autograd.grad(out, leaves, grad)
    base = torch.autograd.grad(prefix_attention(q, k, v, cu, pk, pv, ids, sinks=s, window=120, backend="torch"), leaves, grad)
    want = torch.autograd.grad(r_out, [args[i] for i in (0, 1, 2, 4, 5, 7)], grad.double())
    for name, a, b, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v", "dsinks"), got, base, want):
        ref.assert_within_baseline(a, w, b, name=f"bf16 {name}")


def test_memory_is_per_sequence_not_packed_batch(monkeypatch):
    """The torch path never builds an N x N score matrix over the packed batch."""
    mod = importlib.import_module("mptkern.ops.prefix_attention.reference")

    seen = []
    real = mod._attend_one

    def spy(q, k, *a, **kw):
        seen.append((q.shape[0], k.shape[0]))
        return real(q, k, *a, **kw)

    monkeypatch.setattr(mod, "_attend_one", spy)
    q, k, v, cu, pk, pv, ids, _ = _case([30, 40, 50], 1, 10, 2, 2, 8, [0, -1, 0])
    prefix_attention(q, k, v, cu, pk, pv, ids)
    assert seen == [(30, 40), (40, 40), (50, 60)]


BAD = [
    (dict(q=torch.randn(4, 3, 8)), "heads (3) must be a multiple"),
    (dict(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "cu_seqlens must rise from 0 to N=4"),
    (dict(cu_seqlens=torch.tensor([0, 4.0])), "cu_seqlens must be an int32 tensor"),
    (dict(prefix_ids=torch.tensor([2])), "prefix_ids must lie in [-1, 2)"),
    (dict(prefix_k=torch.randn(2, 5, 2, 4)), "prefix_k and prefix_v must have shape (P, Lp, Hkv=2, D=8)"),
    (dict(prefix_v=None), "must be given together"),
    (dict(sinks=torch.randn(2)), "sinks must have shape (Hq=4,)"),
    (dict(window=0), "window must be a positive int"),
    (dict(k=torch.randn(4, 2, 8, dtype=torch.float64)), "k is torch.float64"),
    (dict(prefix_lens=torch.tensor([6, 1])), "prefix_lens must lie in [0, Lp=5]"),
]


BAD_PLANS = [
    (dict(seqlens=[]), "seqlens must hold B >= 1 lengths"),
    (dict(seqlens=[0, 0]), "with a positive sum"),
    (dict(seqlens=[2, -1]), "lengths >= 0"),
    (dict(seqlens=[2, 1.5]), "seqlens must hold ints"),
    (dict(prefix_ids=[0, 2], prefix_shape=(2, 5)), "prefix_ids must lie in [-1, 2)"),
    (dict(prefix_ids=[0], prefix_shape=(2, 5)), "prefix_ids must have 2 entries"),
    (dict(prefix_ids=[0, 1]), "prefix_ids and prefix_shape go together"),
    (dict(prefix_ids=[0, 1], prefix_shape=(2, 5), prefix_lens=[5, 6]), "prefix_lens must lie in [0, Lp=5]"),
    (dict(prefix_lens=[3]), "prefix_lens given without prefix_ids"),
]


@pytest.mark.parametrize("override,message", BAD_PLANS, ids=[m for _, m in BAD_PLANS])
def test_bad_plan(override, message):
    args = dict(seqlens=[3, 1]) | override
    with pytest.raises(ValueError) as info:
        MOD.plan_prefix_attention(args.pop("seqlens"), args.pop("prefix_ids", None), **args)
    assert message in str(info.value)


def test_softcap_matches_float64_oracle_with_gradients():
    """Soft-capped scores (Gemma 2), the torch path, against the oracle: out, LSE and every gradient
    (through the cap); and ``auto``/triton on a softcap: auto takes torch, triton refuses."""
    q, k, v, cu, pk, pv, ids, sinks = _case([5, 3], 2, 4, 4, 2, 8, [1, -1], sinks=True)
    q = q * 4  # scores large enough for the cap to bind
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv, sinks)]
    out, lse = prefix_attention(*leaves[:3], cu, *leaves[3:5], ids, window=6, sinks=leaves[5], softcap=1.5,
                                return_lse=True, backend="torch")
    ref_out, ref_lse = ref.prefix_attention(*leaves[:3], cu, *leaves[3:5], ids, window=6, sinks=leaves[5], softcap=1.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    uncapped = ref.prefix_attention(*leaves[:3], cu, *leaves[3:5], ids, window=6, sinks=leaves[5])[0]
    assert (uncapped - ref_out).abs().max() > 0.05  # the cap binds
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum() + lse.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * w).sum() + ref_lse.sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "pk", "pv", "sinks"), grads, ref_grads):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="no logit soft-capping"):
        prefix_attention(q.float(), k, v, cu, pk, pv, ids, softcap=1.5, backend="triton")
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        prefix_attention(q, k, v, cu, pk, pv, ids, softcap=0.0)


def test_planned_call_checks_the_call_against_the_plan():
    q, k, v, cu, pk, pv, ids, _ = _case([3, 1], 2, 5, 4, 2, 8, [1, -1])
    plan = MOD.plan_prefix_attention([3, 1], [1, -1], prefix_shape=(2, 5))
    torch.testing.assert_close(prefix_attention(q, k, v, None, pk, pv, plan=plan), prefix_attention(q, k, v, cu, pk, pv, ids))
    for call, message in [
        (lambda: prefix_attention(q[:3], k[:3], v[:3], None, pk, pv, plan=plan), "q must have shape (N=4, Hq, D)"),
        (lambda: prefix_attention(q, k, v, None, pk[:1], pv[:1], plan=plan), "prefix_k must have shape (P, Lp) = (2, 5)"),
        (lambda: prefix_attention(q, k, v, None, plan=plan), "go with a plan made with prefix_ids"),
        (lambda: prefix_attention(q, k, v, cu, pk, pv, plan=plan), "come from the plan"),
        (lambda: prefix_attention(q, k, v, None, pk, pv), "give cu_seqlens (or a plan)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    with pytest.raises(TypeError, match="PrefixAttentionPlan"):
        prefix_attention(q, k, v, None, pk, pv, plan=object())


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_input(override, message):
    args = dict(q=torch.randn(4, 4, 8), k=torch.randn(4, 2, 8), v=torch.randn(4, 2, 8), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32),
                prefix_k=torch.randn(2, 5, 2, 8), prefix_v=torch.randn(2, 5, 2, 8), prefix_ids=torch.tensor([1]))
    sinks, window, plens = override.pop("sinks", None), override.pop("window", None), override.pop("prefix_lens", None)
    args.update(override)
    with pytest.raises(ValueError) as info:
        prefix_attention(**args, sinks=sinks, window=window, prefix_lens=plens)
    assert message in str(info.value)


def test_forced_backend_without_kernel_says_so():
    with pytest.raises(RuntimeError, match=r"prefix_attention has no 'cuda' backend \(it has torch, triton\)"):
        prefix_attention(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.tensor([0, 2], dtype=torch.int32), backend="cuda")


# ----------------------------------------------------------------------------------------------
# triton backend specifics
# ----------------------------------------------------------------------------------------------
def _triton_or_skip():
    reason = backends.why_unavailable("triton", DEVICE)
    if reason:
        pytest.skip(f"triton unavailable on {DEVICE.type}: {reason}")


def _grads(out, leaves, seed=5):
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, [t for t in leaves if t is not None], grad)


def test_head_dim_64_with_shipped_tiles(monkeypatch):
    """The shipped fp32 tile sizes (not the interpreter's small ones) on a D=64 case."""
    _triton_or_skip()
    monkeypatch.setattr(TILES, "INTERPRET_BLOCK", None)
    q, k, v, cu, pk, pv, ids, s = _case([129, 37], 2, 100, 4, 1, 64, [1, 1], sinks=True)
    out, lse = prefix_attention(q, k, v, cu, pk, pv, ids, window=50, sinks=s, return_lse=True, backend="triton")
    args = [t.detach().double().requires_grad_() if t is not None and t.is_floating_point() else t for t in (q, k, v, cu, pk, pv, ids, s)]
    r_out, r_lse = ref.prefix_attention(*args[:7], window=50, sinks=args[7])
    torch.testing.assert_close(out.double(), r_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), r_lse, atol=2e-6, rtol=1e-5)
    got = _grads(out, (q, k, v, pk, pv, s))
    want = _grads(r_out, [args[i] for i in (0, 1, 2, 4, 5, 7)])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_triton_gradients_are_bit_identical_across_runs():
    _triton_or_skip()
    q, k, v, cu, pk, pv, ids, s = _case([37, 7, 20, 1], 2, 100, 4, 1, 16, [1, 1, -1, 1], sinks=True)
    runs = []
    for _ in range(2):
        out = prefix_attention(q, k, v, cu, pk, pv, ids, window=64, sinks=s, backend="triton")
        runs.append((out, *_grads(out, (q, k, v, pk, pv, s))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_window_skips_tiles_nobody_sees():
    """Prefix keys 0..79 are outside every query's window (positions >= 100, window 16): the kernels
    must never load them, so NaN there cannot reach any output or gradient."""
    _triton_or_skip()
    q, k, v, cu, pk, pv, ids, _ = _case([129, 20], 1, 100, 2, 1, 16, [0, 0])
    with torch.no_grad():
        pk[0, :80] = float("nan")
        pv[0, :80] = float("nan")
    out = prefix_attention(q, k, v, cu, pk, pv, ids, window=16, backend="triton")
    assert torch.isfinite(out).all()
    dq, dk, dv, dpk, dpv = _grads(out, (q, k, v, pk, pv))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert torch.count_nonzero(dpk[0, :80]) == 0 and torch.count_nonzero(dpv[0, :80]) == 0
    clean = [t.detach().clone().requires_grad_() for t in (pk, pv)]
    with torch.no_grad():
        for t in clean:
            t[0, :80] = 0.0
    r_out, _ = ref.prefix_attention(q, k, v, cu, clean[0], clean[1], ids, window=16)
    torch.testing.assert_close(out.double(), r_out, atol=2e-6, rtol=1e-5)


def test_strided_views_as_prompted_lm_passes_them():
    """q/k/v as transposed (1, H, N, D) views and the prefix as rows of k itself, as in PromptedLM."""
    _triton_or_skip()
    g = torch.Generator().manual_seed(4)
    U, l, lens, hq, hkv, dim = 2, 5, [7, 9, 3], 4, 2, 16
    N = U * l + sum(lens)
    qh, kh, vh = (torch.randn(1, h, N, dim, generator=g).requires_grad_() for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + torch.tensor([l] * U + lens).cumsum(0).tolist(), dtype=torch.int32)
    ids = torch.tensor([-1] * U + [1, 0, 1])
    outs = {}
    for b in ("torch", "triton"):
        q, k, v = (t[0].transpose(0, 1) for t in (qh, kh, vh))
        pk, pv = (t[: U * l].reshape(U, l, hkv, dim) for t in (k, v))
        out = prefix_attention(q, k, v, cu, pk, pv, ids, window=8, backend=b)
        outs[b] = (out, *_grads(out, (qh, kh, vh)))
    for a, b in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_unsupported_head_dim_raises_when_forced_and_falls_back_on_auto(monkeypatch):
    _triton_or_skip()
    q, k, v, cu, pk, pv, ids, _ = _case([5], 1, 3, 2, 2, 8, [0])
    with pytest.raises(ValueError, match="head dims"):
        prefix_attention(q, k, v, cu, pk, pv, ids, backend="triton")
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    out = prefix_attention(q, k, v, cu, pk, pv, ids)  # torch, since the kernels do not take D=8
    torch.testing.assert_close(out, prefix_attention(q, k, v, cu, pk, pv, ids, backend="torch"))


def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    if backends.why_unavailable("triton", torch.device("cuda")) is None:
        assert backends.resolve("auto", torch.device("cuda"), supported=MOD.SUPPORTED_BACKENDS) == "triton"
    assert backends.resolve("auto", torch.device("cpu"), supported=MOD.SUPPORTED_BACKENDS) == "torch"


def test_torch_compile_fullgraph_triton():
    _triton_or_skip()
    q, k, v, cu, pk, pv, ids, s = _case([7, 5], 2, 5, 4, 2, 16, [1, 0], sinks=True)
    plan = MOD.plan_prefix_attention([7, 5], [1, 0], prefix_shape=tuple(pk.shape[:2]))  # made outside, as documented

    def f(q, k, v, pk, pv, s):
        return (prefix_attention(q, k, v, None, pk, pv, plan=plan, window=6, sinks=s, backend="triton") * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = (q, k, v, pk, pv, s)
    loss = compiled(*leaves)
    expect = f(*leaves)
    torch.testing.assert_close(loss, expect)
    for a, b in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expect, leaves)):
        torch.testing.assert_close(a, b)


def test_opcheck_triton_ops():
    _triton_or_skip()
    q, k, v, cu, pk, pv, ids, s = _case([3, 4], 2, 3, 2, 1, 16, [1, -1], sinks=True)
    plan = MOD.plan_from_tensors(cu, ids, None, pk, q.shape[0])
    args = (q, k, v, plan.cu_seqlens, pk, pv, plan.prefix_ids, plan.prefix_lens, s, 0.25, 4, plan.query_schedule(16),
            plan.query_schedule(16), *plan.key_schedule(16))
    torch.library.opcheck(torch.ops.mptkern.prefix_attention_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------
DECODE_CASES = [
    # cache_lens, S, P, Lp, Hq, Hkv, D, prefix_ids, prefix_lens, window, sinks
    ([1, 40, 17, 5], 40, 2, 37, 8, 2, 16, [0, 1, -1, 1], [37, 20], None, True),
    ([3, 129], 129, 1, 100, 8, 1, 32, [0, 0], None, 16, True),  # window shorter than the prefix
    ([7, 1], 8, 0, 0, 4, 4, 16, None, None, 5, False),  # no prefix
    ([37], 40, 1, 5, 4, 1, 64, [0], None, 300, False),  # window longer than prefix + cache
]


def _decode_inputs(case, g):
    """q, caches, prefixes, prefix ids, prefix lengths (None: Lp) and sinks of a DECODE_CASES row, drawn from g."""
    n, S, P, Lp, hq, hkv, dim, pids, plens, window, sinks = case
    B = len(n)
    q = torch.randn(B, hq, dim, generator=g)
    kc, vc = torch.randn(B, S, hkv, dim, generator=g), torch.randn(B, S, hkv, dim, generator=g)
    pk, pv = (torch.randn(P, Lp, hkv, dim, generator=g) for _ in range(2)) if P else (None, None)
    ids = torch.tensor(pids) if P else None
    lens = torch.tensor(plens) if plens else None
    s = torch.randn(hq, generator=g) if sinks else None
    return q, kc, vc, pk, pv, ids, lens, s


@pytest.mark.parametrize("head_major", [False, True], ids=["token-major", "head-major"])
@pytest.mark.parametrize("splits", [1, 64], ids=["one-split", "split-k"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"n{c[0]}-Lp{c[3]}-g{c[4] // c[5]}-d{c[6]}-w{c[9]}-s{int(c[10])}")
def test_decode_is_the_last_row_of_prefill(case, splits, head_major, backend, monkeypatch):
    """head_major: caches stored (B, Hkv, S, D) / (P, Hkv, Lp, D), passed as transpose(1, 2) views
    (the engine's layout), read through their strides."""
    if backend == "torch" and splits > 1:
        pytest.skip("split-K is the triton kernel's")
    monkeypatch.setattr(DECODE, "DECODE_TARGET_PROGRAMS", splits)
    n, S, P, Lp, hq, hkv, dim, pids, plens, window, sinks = case
    g = torch.Generator().manual_seed(7)
    q, kc, vc, pk, pv, ids, lens, s = _decode_inputs(case, g)
    if head_major:
        kc, vc, pk, pv = (None if t is None else t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kc, vc, pk, pv))
        assert hkv == 1 or not kc.is_contiguous()
    out, lse = prefix_attention_decode(q, kc, vc, torch.tensor(n), pk, pv, ids, prefix_lens=lens, window=window, sinks=s,
                                       return_lse=True, backend=backend)
    # the same tokens as a prefill: earlier queries are arbitrary, the last one is q
    qf = torch.cat([torch.cat([torch.randn(m - 1, hq, dim, generator=g), q[b : b + 1]]) for b, m in enumerate(n)])
    kf, vf = (torch.cat([c[b, :m] for b, m in enumerate(n)]) for c in (kc, vc))
    cu = torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)
    r_out, r_lse = ref.prefix_attention(qf, kf, vf, cu, pk, pv, ids, prefix_lens=lens, window=window, sinks=s)
    last = cu[1:].long() - 1
    torch.testing.assert_close(out.double(), r_out[last], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), r_lse[last], atol=2e-6, rtol=1e-5)


def test_decode_bad_input():
    q, kc = torch.randn(2, 4, 16), torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="k_cache and v_cache must have shape"):
        prefix_attention_decode(q, kc, torch.randn(2, 8, 2, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cache_lens must be an integer tensor of shape"):
        prefix_attention_decode(q, kc, kc, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="heads"):
        prefix_attention_decode(torch.randn(2, 3, 16), kc, kc, torch.tensor([1, 2]))


# paged layout: the same cases scattered into pools of shuffled blocks
def _scatter_into_pool(seqs, block_size, g):
    """One K and one V pool of shuffled blocks holding every (k, v) pair of ``seqs`` (rows (n, Hkv, D)),
    and each pair's list of block ids. Rows no sequence writes (a last block's tail, the spare
    blocks) hold NaN, so that reading one shows."""
    hkv, dim = seqs[0][0].shape[1:]
    counts = [-(-k.shape[0] // block_size) for k, _ in seqs]
    perm = torch.randperm(sum(counts) + 3, generator=g)  # 3 spare blocks nobody uses
    pools = [torch.full((perm.numel(), block_size, hkv, dim), float("nan")) for _ in range(2)]
    ids, at = [], 0
    for (k, v), c in zip(seqs, counts):
        blocks = perm[at : at + c]
        at += c
        j = torch.arange(k.shape[0])
        for pool, rows in zip(pools, (k, v)):
            pool[blocks[j // block_size], j % block_size] = rows
        ids.append(blocks.tolist())
    return pools[0], pools[1], ids


def _tables(ids, dtype):
    """(rows, max blocks + 1) tables padded with -1, and one padding entry far out of range."""
    t = torch.full((len(ids), max(map(len, ids)) + 1), -1, dtype=dtype)
    for r, row in enumerate(ids):
        t[r, : len(row)] = torch.tensor(row, dtype=dtype)
    t[0, -1] = 10**6
    return t


PAGED_CASES = DECODE_CASES[:3] + [
    # cache_lens and prefix lengths on block edges: 4 divides them all, 6 and 16 some
    ([16, 48, 24, 32], 48, 2, 48, 4, 1, 16, [1, -1, 0, 0], [48, 24], 40, False),
    # no prefix shared by two sequences: the torch path reads [prefix | cache] in one softmax
    ([5, 30, 12], 30, 3, 20, 8, 2, 16, [2, -1, 0], [20, 7, 13], 10, True),
    ([37], 40, 1, 24, 4, 1, 64, [0], [17], None, False),
]


# (block size, head-major pool, table dtype): a size not a power of two, both pool layouts, int64 tables
PAGED_LAYOUTS = [(4, False, torch.int32), (6, True, torch.int64), (16, False, torch.int64), (16, True, torch.int32)]


@pytest.mark.parametrize("layout", PAGED_LAYOUTS, ids=lambda c: f"bs{c[0]}-{'head' if c[1] else 'token'}-major-{str(c[2])[6:]}")
@pytest.mark.parametrize("splits", [1, 64], ids=["one-split", "split-k"])
@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: f"n{c[0]}-Lp{c[3]}-g{c[4] // c[5]}-d{c[6]}-w{c[9]}-s{int(c[10])}")
def test_decode_paged_equals_dense(case, splits, layout, backend, monkeypatch):
    """The dense case's caches and prefixes scattered into one pool of shuffled blocks (the prefixes'
    blocks among the caches', as an engine keeps them): the same output and LSE. head_major: the
    pool stored (num_blocks, Hkv, block_size, D), passed as its transpose(1, 2) view."""
    block_size, head_major, dtype = layout
    if backend == "torch" and splits > 1:
        pytest.skip("split-K is the triton kernel's")
    monkeypatch.setattr(DECODE, "DECODE_TARGET_PROGRAMS", splits)
    n, S, P, Lp, hq, hkv, dim, pids, plens, window, sinks = case
    g = torch.Generator().manual_seed(11)
    B = len(n)
    q, kc, vc, pk, pv, ids, lens, s = _decode_inputs(case, g)
    if P and lens is None:
        lens = torch.full((P,), Lp)  # paged prefixes need their lengths
    dense = prefix_attention_decode(q, kc, vc, torch.tensor(n), pk, pv, ids, prefix_lens=lens, window=window, sinks=s,
                                    return_lse=True, backend=backend)

    seqs = [(kc[b, :m], vc[b, :m]) for b, m in enumerate(n)] + [(pk[p, :m], pv[p, :m]) for p, m in enumerate(lens.tolist() if P else [])]
    pool_k, pool_v, blocks = _scatter_into_pool(seqs, block_size, g)
    if head_major:
        pool_k, pool_v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (pool_k, pool_v))
        assert hkv == 1 or not pool_k.is_contiguous()
    tables = _tables(blocks[:B], dtype)
    ptables = _tables(blocks[B:], dtype) if P else None
    paged = prefix_attention_decode(q, pool_k, pool_v, torch.tensor(n), pool_k if P else None, pool_v if P else None, ids,
                                    prefix_lens=lens, block_tables=tables, prefix_block_tables=ptables, window=window,
                                    sinks=s, return_lse=True, backend=backend)
    for got, want in zip(paged, dense):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # planned once (as an engine step plans for all its layers): the same numbers
    plan = plan_paged_decode(torch.tensor(n), tables, block_size=block_size, num_blocks=pool_k.shape[0],
                             prefix_ids=ids if P else None, prefix_lens=lens if P else None, prefix_block_tables=ptables)
    planned = prefix_attention_decode(q, pool_k, pool_v, None, pool_k if P else None, pool_v if P else None, plan=plan,
                                      window=window, sinks=s, return_lse=True, backend=backend)
    for got, want in zip(planned, paged):
        assert torch.equal(got, want)


def test_decode_plan_bad_input():
    pool = torch.randn(6, 4, 2, 16)
    tables = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    lens = torch.tensor([7, 3])
    plan = plan_paged_decode(lens, tables, block_size=4, num_blocks=6)
    q = torch.randn(2, 4, 16)
    cases = [
        (lambda: plan_paged_decode(lens, tables, block_size=4, num_blocks=2), r"block_tables\[1, 0\] = 2 is in use"),
        (lambda: plan_paged_decode(torch.tensor([9, 3]), tables, block_size=4, num_blocks=6), r"cache_lens must lie in \[1, max_blocks"),
        (lambda: plan_paged_decode(lens, tables, block_size=4, num_blocks=6, prefix_ids=torch.tensor([0, 0])), "go together"),
        (lambda: plan_paged_decode(lens.float(), tables, block_size=4, num_blocks=6), "cache_lens must be"),
        (lambda: plan_paged_decode(lens, tables, block_size=0, num_blocks=6), "block_size and num_blocks"),
        (lambda: plan_paged_decode(lens, tables, block_size=4, num_blocks=6, prefix_ids=torch.tensor([0, 1]),
                                   prefix_lens=torch.tensor([4]), prefix_block_tables=torch.tensor([[3]])), r"prefix_ids must lie in \[-1, 1\)"),
        (lambda: prefix_attention_decode(q, pool, pool, lens, plan=plan), "come from the plan"),
        (lambda: prefix_attention_decode(q, pool, pool), "give cache_lens"),
        (lambda: prefix_attention_decode(q[:1], pool, pool, plan=plan), r"q must have shape \(B=2"),
        (lambda: prefix_attention_decode(q, pool[:, :2], pool[:, :2], plan=plan), "block_size=4"),
        (lambda: prefix_attention_decode(q, pool, pool, prefix_k=pool, prefix_v=pool, plan=plan), "go with a plan made with prefix_ids"),
        (lambda: prefix_attention_decode(q.double(), pool, pool, plan=plan), "k_cache is torch.float32"),
        (lambda: prefix_attention_decode(q, pool, pool, plan=plan, window=0), "window must be"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="PagedDecodePlan"):
        prefix_attention_decode(q, pool, pool, plan=(lens, tables))


def test_decode_paged_shipped_tiles_bf16(monkeypatch):
    """bf16 with the GPU's decode tiles (64 keys): each tile spans blocks of 6 rows from all over the pool."""
    _triton_or_skip()
    monkeypatch.setattr(TILES, "INTERPRET_BLOCK", None)
    g = torch.Generator().manual_seed(12)
    n, hq, hkv, dim, plens = [130, 7, 64], 8, 2, 64, [100, 6]
    q = torch.randn(3, hq, dim, generator=g).bfloat16()
    kc, vc = (torch.randn(3, 130, hkv, dim, generator=g).bfloat16() for _ in range(2))
    pk, pv = (torch.randn(2, 100, hkv, dim, generator=g).bfloat16() for _ in range(2))
    ids, lens, s = torch.tensor([0, 1, 0]), torch.tensor(plens), torch.randn(hq, generator=g)
    dense = prefix_attention_decode(q, kc, vc, torch.tensor(n), pk, pv, ids, prefix_lens=lens, sinks=s, window=150,
                                    return_lse=True, backend="triton")
    seqs = [(kc[b, :m], vc[b, :m]) for b, m in enumerate(n)] + [(pk[p, :m], pv[p, :m]) for p, m in enumerate(plens)]
    pool_k, pool_v, blocks = _scatter_into_pool([(k.float(), v.float()) for k, v in seqs], 6, g)
    pool_k, pool_v = pool_k.bfloat16(), pool_v.bfloat16()
    paged = prefix_attention_decode(q, pool_k, pool_v, torch.tensor(n), pool_k, pool_v, ids, prefix_lens=lens,
                                    block_tables=_tables(blocks[:3], torch.int32), prefix_block_tables=_tables(blocks[3:], torch.int32),
                                    sinks=s, window=150, return_lse=True, backend="triton")
    torch.testing.assert_close(paged[0], dense[0])
    torch.testing.assert_close(paged[1], dense[1], atol=2e-6, rtol=1e-5)


def _paged_args():
    """A valid paged step: B=2, pool of 5 blocks of 4 rows, Hkv=2; sequences of 5 and 3 keys; one
    prefix of 6 keys in blocks 3 and 4 of the same pool."""
    g = torch.Generator().manual_seed(13)
    pool_k, pool_v = torch.randn(5, 4, 2, 16, generator=g), torch.randn(5, 4, 2, 16, generator=g)
    return dict(q=torch.randn(2, 4, 16, generator=g), k_cache=pool_k, v_cache=pool_v, cache_lens=torch.tensor([5, 3]),
                prefix_k=pool_k, prefix_v=pool_v, prefix_ids=torch.tensor([0, -1]), prefix_lens=torch.tensor([6]),
                block_tables=torch.tensor([[0, 1], [2, -1]], dtype=torch.int32),
                prefix_block_tables=torch.tensor([[3, 4]], dtype=torch.int32))


META = torch.device("meta")  # a device other than q's, on any machine
# the dense layout with the same shapes: slabs of S=8, two prefixes of 6 keys
DENSE = dict(block_tables=None, prefix_block_tables=None, k_cache=torch.randn(2, 8, 2, 16), v_cache=torch.randn(2, 8, 2, 16),
             prefix_k=torch.randn(2, 6, 2, 16), prefix_v=torch.randn(2, 6, 2, 16), prefix_lens=None)
DECODE_BAD = [
    # paged layout: shapes, dtypes, devices
    (dict(block_tables=torch.tensor([[0.0, 1.0], [2.0, 3.0]])),
     "block_tables must be an int32 (or int64) tensor of shape (B=2, max_blocks) on cpu"),
    (dict(block_tables=torch.tensor([0, 1], dtype=torch.int32)), "block_tables must be an int32 (or int64) tensor of shape (B=2"),
    (dict(block_tables=torch.zeros(3, 2, dtype=torch.int32)), "block_tables must be an int32 (or int64) tensor of shape (B=2"),
    (dict(block_tables=torch.zeros(2, 2, dtype=torch.int32, device=META)), "got torch.int32 (2, 2) on meta"),
    (dict(block_tables=torch.zeros(2, 0, dtype=torch.int32)), "block_tables must have at least one column"),
    (dict(k_cache=torch.randn(5, 4, 32)),
     "with block_tables, k_cache and v_cache must be pools of shape (num_blocks >= 1, block_size >= 1, Hkv, D=16)"),
    (dict(v_cache=torch.randn(5, 8, 2, 16)), "must be pools of shape"),
    (dict(k_cache=torch.randn(5, 4, 2, 16, dtype=torch.float64)), "k_cache is torch.float64"),
    (dict(k_cache=torch.randn(5, 4, 3, 16), v_cache=torch.randn(5, 4, 3, 16)), "q's heads (4) must be a multiple of the cache's heads (3)"),
    (dict(prefix_k=torch.randn(2, 5, 2, 16), prefix_v=torch.randn(2, 5, 2, 16), prefix_block_tables=None), "the prefix must be paged too"),
    (dict(prefix_block_tables=torch.tensor([[3.0, 4.0]])),
     "prefix_block_tables must be an int32 (or int64) tensor of shape (P=1, max_blocks)"),
    (dict(prefix_block_tables=torch.tensor([3, 4], dtype=torch.int32)), "prefix_block_tables must be an int32 (or int64) tensor"),
    (dict(prefix_block_tables=torch.zeros(1, 2, dtype=torch.int32, device=META)), "prefix_block_tables must be an int32 (or int64) tensor"),
    (dict(prefix_lens=None), "with prefix_block_tables, prefix_lens (P,) is required"),
    (dict(prefix_lens=torch.tensor([6, 2])), "prefix_lens must be an integer tensor of shape (P=1,)"),
    (dict(prefix_k=torch.randn(5, 8, 2, 16), prefix_v=torch.randn(5, 8, 2, 16)),
     "the prefix pools' block_size (8) must equal the cache pools' (4)"),
    (dict(prefix_k=torch.randn(5, 4, 1, 16), prefix_v=torch.randn(5, 4, 1, 16)),
     "prefix_k and prefix_v must have shape pools (num_blocks, block_size, Hkv=2, D=16)"),
    (dict(prefix_k=None, prefix_v=None, prefix_ids=None, prefix_lens=None), "prefix_block_tables given without prefix_k"),
    (dict(k_cache=torch.randn(2, 8, 2, 16), v_cache=torch.randn(2, 8, 2, 16), block_tables=None),
     "prefix_block_tables given without block_tables"),
    # values (CPU tensors only)
    (dict(cache_lens=torch.tensor([0, 3])), "cache_lens must lie in [1, max_blocks * block_size=8], got values in [0, 3]"),
    (dict(cache_lens=torch.tensor([9, 3])), "cache_lens must lie in [1, max_blocks * block_size=8], got values in [3, 9]"),
    (dict(prefix_ids=torch.tensor([1, -1])), "prefix_ids must lie in [-1, 1)"),
    (dict(prefix_ids=torch.tensor([0, -2])), "prefix_ids must lie in [-1, 1)"),
    (dict(prefix_lens=torch.tensor([9])), "prefix_lens must lie in [0, max_prefix_blocks * block_size=8]"),
    (dict(block_tables=torch.tensor([[0, -1], [2, -1]], dtype=torch.int32)), "block_tables[0, 1] = -1 is in use (row 0 holds 5 keys)"),
    (dict(block_tables=torch.tensor([[0, 1], [5, -1]], dtype=torch.int32)),
     "block_tables[1, 0] = 5 is in use (row 1 holds 3 keys) but is not a block of the pool [0, 5)"),
    (dict(prefix_block_tables=torch.tensor([[3, 7]], dtype=torch.int32)), "prefix_block_tables[0, 1] = 7 is in use"),
    # dense layout: the new value checks
    (dict(DENSE, cache_lens=torch.tensor([0, 3])), "cache_lens must lie in [1, S=8], got values in [0, 3]"),
    (dict(DENSE, cache_lens=torch.tensor([9, 3])), "cache_lens must lie in [1, S=8], got values in [3, 9]"),
    (dict(DENSE, prefix_ids=torch.tensor([2, 0])), "prefix_ids must lie in [-1, 2)"),
]


@pytest.mark.parametrize("override,message", DECODE_BAD, ids=[m for _, m in DECODE_BAD])
def test_decode_paged_bad_input(override, message):
    args = _paged_args()
    prefix_attention_decode(**args)  # the base case is valid
    args.update(override)
    with pytest.raises(ValueError) as info:
        prefix_attention_decode(**args, backend="torch")
    assert message in str(info.value)


def test_decode_paged_torch_path_makes_no_host_sync():
    """On meta tensors (no values) any host read raises. A step planned from host lists (as the engine
    plans it) runs the paged torch path, validation included, without one; unplanned, the call reads
    the prefix ids on the host, and the dense path the largest cache length: both fail there."""
    a = _paged_args()
    plan = plan_paged_decode([5, 3], [[0, 1], [2, -1]], block_size=4, num_blocks=5, prefix_ids=[0, -1], prefix_lens=[6],
                             prefix_block_tables=[[3, 4]], device=META)
    meta = {k: (v.to(META) if torch.is_tensor(v) else v) for k, v in a.items()}
    out, lse = prefix_attention_decode(meta["q"], meta["k_cache"], meta["v_cache"], prefix_k=meta["prefix_k"],
                                       prefix_v=meta["prefix_v"], plan=plan, window=3, sinks=torch.zeros(4, device=META),
                                       return_lse=True, backend="torch")
    assert out.shape == (2, 4, 16) and lse.shape == (2, 4) and out.device == META
    cpu_plan = plan_paged_decode([5, 3], [[0, 1], [2, -1]], block_size=4, num_blocks=5, prefix_ids=[0, -1],
                                 prefix_lens=[6], prefix_block_tables=[[3, 4]])
    planned = prefix_attention_decode(a["q"], a["k_cache"], a["v_cache"], prefix_k=a["prefix_k"], prefix_v=a["prefix_v"],
                                      plan=cpu_plan, window=3, backend="torch")
    torch.testing.assert_close(planned, prefix_attention_decode(**a, window=3, backend="torch"), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="meta"):
        prefix_attention_decode(**meta, backend="torch")
    dense = dict(meta, k_cache=torch.zeros(2, 8, 2, 16, device=META), v_cache=torch.zeros(2, 8, 2, 16, device=META),
                 prefix_k=None, prefix_v=None, prefix_ids=None, prefix_lens=None, block_tables=None, prefix_block_tables=None)
    with pytest.raises(RuntimeError, match="meta"):
        prefix_attention_decode(**dense, backend="torch")


def test_opcheck_triton_decode_op_paged():
    _triton_or_skip()
    a = _paged_args()
    args = (a["q"], a["k_cache"], a["v_cache"], a["cache_lens"], a["prefix_k"], a["prefix_v"], a["prefix_ids"].to(torch.int32),
            a["prefix_lens"].to(torch.int32), None, 0.25, 3, a["block_tables"], a["prefix_block_tables"])
    torch.library.opcheck(torch.ops.mptkern.prefix_attention_decode.default, args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# model level: PromptedLM with the triton backend equals the torch backend
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "gpt_oss"])
def test_prompted_lm_triton_matches_torch(model_type, monkeypatch):
    import functools

    from mptkern.models import PromptedLM, prompted
    from mptkern.prompts import MultitaskPrompt
    from tests.test_prompted_lm import batch
    from tests.tiny_models import tiny_gpt_oss, tiny_llama

    _triton_or_skip()
    model = tiny_llama() if model_type == "llama" else tiny_gpt_oss(window=8)  # gpt-oss: sinks, window < l + n
    ids, mask, labels = batch(5, 12, 128, [12, 3, 9, 12, 6], left_pad=True)
    task_ids = torch.tensor([4, 4, 1, 0, 1])
    prompt = MultitaskPrompt(5, 6, model.config.hidden_size, rank=2)
    with torch.no_grad():
        prompt.prompt_embeddings.normal_(0, 1)
    calls = []
    real_fwd, real_bwd = MOD._fwd_triton, MOD._bwd_triton
    monkeypatch.setattr(MOD, "_fwd_triton", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(MOD, "_bwd_triton", lambda *a: calls.append("bwd") or real_bwd(*a))
    results = {}
    for b in ("torch", "triton"):
        monkeypatch.setattr(prompted, "prefix_attention", functools.partial(prefix_attention, backend=b))
        prompt.zero_grad(set_to_none=True)
        out = PromptedLM(model, prompt)(ids, mask, task_ids, labels)
        out.loss.backward()
        results[b] = (out.loss.detach(), {k: p.grad.clone() for k, p in prompt.named_parameters()})
    assert calls.count("fwd") == calls.count("bwd") == model.config.num_hidden_layers
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    for name, g in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], g, atol=2e-5, rtol=1e-4, msg=name)
        assert g.abs().sum() > 0


def test_torch_backward_gradcheck_float64_with_lse_sinks_window():
    """The torch path's hand-written backward, against finite differences, through out and LSE."""
    g = torch.Generator().manual_seed(5)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    q, k, v = mk(7, 4, 8), mk(7, 2, 8), mk(7, 2, 8)
    pk, pv, sinks = mk(2, 3, 2, 8), mk(2, 3, 2, 8), mk(4)
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)  # an empty sequence in the middle
    ids = torch.tensor([1, 0, -1])

    def f(q, k, v, pk, pv, sinks):
        out, lse = prefix_attention(q, k, v, cu, pk, pv, ids, window=4, sinks=sinks, return_lse=True, backend="torch")
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, pk, pv, sinks))


def test_torch_sinks_far_above_every_score_do_not_overflow():
    """A sink ~100 above the scores dominates the softmax: the LSE is the sink, its gradient 1."""
    q, k, v, cu, pk, pv, ids, _ = _case([3, 4], 1, 5, 2, 1, 16, [0, -1])
    s = torch.full((2,), 100.0, requires_grad=True)
    out, lse = prefix_attention(q, k, v, cu, pk, pv, ids, sinks=s, return_lse=True, backend="torch")
    r_out, r_lse = ref.prefix_attention(*(t.detach().double() if torch.is_tensor(t) and t.is_floating_point() else t
                                          for t in (q, k, v, cu, pk, pv, ids)), sinks=s.detach().double())
    torch.testing.assert_close(lse.double(), r_lse, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.double(), r_out, atol=1e-6, rtol=1e-5)
    (d_sink,) = torch.autograd.grad(lse.sum(), s)
    torch.testing.assert_close(d_sink, torch.full((2,), 7.0), atol=1e-4, rtol=1e-5)  # 7 rows, each d lse/d sink ~ 1
