import importlib

import pytest
import torch

from mptkern.ops import prefix_attention
from tests import reference as ref


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
    ([1], 1, 5, 2, 2, 8, [0], None, False),
    ([7, 1, 37], 2, 5, 4, 1, 16, [1, -1, 0], None, True),
    ([37, 7], 1, 100, 8, 1, 8, [0, 0], 16, True),  # window shorter than the prefix
    ([129], 0, 0, 4, 4, 8, None, 64, False),  # no prefix at all
    ([7, 37, 5], 3, 5, 4, 2, 16, [2, 2, -1], 300, True),  # window longer than prefix + input
    ([5, 9], 2, 12, 2, 2, 8, [1, 0], 6, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lens{c[0]}-P{c[1]}-Lp{c[2]}-g{c[3] // c[4]}-w{c[7]}-s{int(c[8])}")
def test_matches_float64_oracle_with_gradients(case):
    lens, P, Lp, hq, hkv, dim, pids, window, sinks = case
    q, k, v, cu, pk, pv, ids, s = _case(lens, P, Lp, hq, hkv, dim, pids, sinks=sinks)
    out, lse = prefix_attention(q, k, v, cu, pk, pv, ids, window=window, sinks=s, return_lse=True)
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


def test_prefix_lens_and_shared_prefix_gradient_sums_over_sequences():
    q, k, v, cu, pk, pv, ids, _ = _case([4, 6, 3], 2, 8, 2, 1, 8, [1, 1, 0])
    lens = torch.tensor([3, 8])
    out = prefix_attention(q, k, v, cu, pk, pv, ids, prefix_lens=lens)
    r_out, _ = ref.prefix_attention(q, k, v, cu, pk, pv, ids, prefix_lens=lens)
    torch.testing.assert_close(out.double(), r_out, atol=2e-6, rtol=1e-5)
    dpk, = torch.autograd.grad(out.sum(), pk)
    assert torch.count_nonzero(dpk[0, 3:]) == 0  # keys past prefix_lens are never seen
    # prefix 1 is used by sequences 0 and 1: its gradient is the sum of their separate gradients
    per_seq = []
    for b in (0, 1):
        sl = slice(int(cu[b]), int(cu[b + 1]))
        o = prefix_attention(q[sl], k[sl], v[sl], torch.tensor([0, sl.stop - sl.start], dtype=torch.int32), pk, pv, ids[b:b + 1])
        per_seq.append(torch.autograd.grad(o.sum(), pk)[0][1])
    torch.testing.assert_close(dpk[1], per_seq[0] + per_seq[1])


def test_bf16_within_twice_plain_torch_error():
    q, k, v, cu, pk, pv, ids, s = _case([7, 37], 2, 5, 4, 2, 16, [1, 0], dtype=torch.bfloat16, sinks=True)
    out = prefix_attention(q, k, v, cu, pk, pv, ids, sinks=s, window=20)
    r_out, _ = ref.prefix_attention(q, k, v, cu, pk, pv, ids, sinks=s, window=20)
    # plain torch in bf16: the oracle's math done on bf16 inputs rounded to bf16 output
    plain = r_out.to(torch.bfloat16)
    ref.assert_within_baseline(out, r_out, plain, name="bf16 out")


def test_memory_is_per_sequence_not_packed_batch(monkeypatch):
    """The torch path never builds an N x N score matrix over the packed batch."""
    mod = importlib.import_module("mptkern.ops.prefix_attention")

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
    (dict(cu_seqlens=torch.tensor([0, 2, 3], dtype=torch.int32)), "cu_seqlens must rise from 0 to N=4"),
    (dict(cu_seqlens=torch.tensor([0, 4.0])), "cu_seqlens must be an int32 tensor"),
    (dict(prefix_ids=torch.tensor([2])), "prefix_ids must lie in [-1, 2)"),
    (dict(prefix_k=torch.randn(2, 5, 2, 4)), "prefix_k and prefix_v must have shape (P, Lp, Hkv=2, D=8)"),
    (dict(prefix_v=None), "must be given together"),
    (dict(sinks=torch.randn(2)), "sinks must have shape (Hq=4,)"),
    (dict(window=0), "window must be a positive int"),
    (dict(k=torch.randn(4, 2, 8, dtype=torch.float64)), "k is torch.float64"),
    (dict(prefix_lens=torch.tensor([6, 1])), "prefix_lens must lie in [0, Lp=5]"),
]


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
    with pytest.raises(RuntimeError, match="not implemented for this op"):
        prefix_attention(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.tensor([0, 2], dtype=torch.int32), backend="cuda")
