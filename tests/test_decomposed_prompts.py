import os

import pytest
import torch

from mptkern import backends
from mptkern.ops import decomposed_prompts
from tests import reference as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backend_or_skip(backend):
    reason = backends.why_unavailable(backend, DEVICE)
    if reason:
        pytest.skip(f"{backend} unavailable on {DEVICE.type}: {reason}")
    return backend


@pytest.fixture(params=["torch", "triton", "cuda"])
def backend(request):
    return _backend_or_skip(request.param)


def _params(l, d, K, r, dtype, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_(requires_grad)  # noqa: E731
    return mk(l, d), mk(K, l, r), mk(K, r, d)


def _plain(shared, cols, rows, ids):
    """What PEFT computes, in the parameters' dtype: the baseline error of the tolerance rule."""
    return shared * torch.matmul(cols[ids], rows[ids])


# l, d, K, r, task ids: odd sizes, repeated tasks, absent tasks, rank > 1, a realistic shape
SHAPES = [
    (1, 1, 1, 1, [0]),
    (7, 37, 3, 2, [2, 0, 2, 2, 1]),
    (37, 129, 5, 1, [4, 4, 0, 3, 4, 0, 3]),
    (5, 300, 6, 3, [5]),
    (100, 576, 8, 1, [0, 7, 3, 3, 5, 0, 1, 7, 7, 2, 6, 4, 4, 1, 2, 5]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_forward_backward_against_oracle(backend, dtype, shape):
    l, d, K, r, ids = shape
    ids = torch.tensor(ids, device=DEVICE)
    S, C, R = _params(l, d, K, r, dtype)
    grad = torch.randn(len(ids), l, d, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)

    out = decomposed_prompts(S, C, R, ids, backend=backend)
    assert out.shape == (len(ids), l, d) and out.dtype == dtype
    grads = torch.autograd.grad(out, (S, C, R), grad)

    plain = _plain(S, C, R, ids)
    plain_grads = torch.autograd.grad(plain, (S, C, R), grad)
    oracle = ref.decomposed_prompts(S, C, R, ids)
    oracle_grads = ref.decomposed_prompts_grads(S, C, R, ids, grad)
    ref.assert_within_baseline(out, oracle, plain, name="out")
    for name, g, pg, og in zip(("dshared", "dcols", "drows"), grads, plain_grads, oracle_grads):
        assert g.shape == og.shape and g.dtype == dtype
        ref.assert_within_baseline(g, og, pg, name=name)


def test_absent_tasks_get_zero_gradient(backend):
    S, C, R = _params(7, 37, 5, 2, torch.float32)
    out = decomposed_prompts(S, C, R, torch.tensor([1, 3, 1], device=DEVICE), backend=backend)
    _, dC, dR = torch.autograd.grad(out.square().sum(), (S, C, R))
    for t in (0, 2, 4):
        assert torch.count_nonzero(dC[t]) == 0 and torch.count_nonzero(dR[t]) == 0
    assert torch.count_nonzero(dC[1]) > 0 and torch.count_nonzero(dR[3]) > 0


def test_non_contiguous_inputs(backend):
    S0, C0, R0 = _params(37, 7, 3, 2, torch.float32)
    S = S0.detach().t().requires_grad_()  # (7, 37) non-contiguous view
    C = torch.randn(3, 7, 4, device=DEVICE)[:, :, ::2].requires_grad_()
    R = torch.randn(3, 37, 2, device=DEVICE).transpose(1, 2).requires_grad_()
    ids = torch.tensor([2, 1, 2, 0], device=DEVICE)[::1].to(torch.int32)
    assert not (S.is_contiguous() or C.is_contiguous() or R.is_contiguous())
    out = decomposed_prompts(S, C, R, ids, backend=backend)
    grad = torch.randn_like(out)
    ref.assert_within_baseline(out, ref.decomposed_prompts(S, C, R, ids), _plain(S, C, R, ids.long()))
    for g, og, pg in zip(torch.autograd.grad(out, (S, C, R), grad), ref.decomposed_prompts_grads(S, C, R, ids, grad),
                         torch.autograd.grad(_plain(S, C, R, ids.long()), (S, C, R), grad)):
        ref.assert_within_baseline(g, og, pg)


def test_backward_is_deterministic(backend):
    S, C, R = _params(37, 300, 6, 2, torch.bfloat16)
    ids = torch.randint(0, 6, (33,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grad = torch.randn(33, 37, 300, device=DEVICE, dtype=torch.bfloat16)
    runs = [torch.autograd.grad(decomposed_prompts(S, C, R, ids, backend=backend), (S, C, R), grad) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_buffer_with_row_offsets(backend, dtype):
    """Prompt rows land in a packed buffer; other rows are untouched and keep their gradient."""
    l, d = 5, 37
    S, C, R = _params(l, d, 4, 1, dtype)
    ids = torch.tensor([3, 0, 3], device=DEVICE)
    offs = torch.tensor([2, 20, 9], device=DEVICE)
    base = torch.randn(31, d, device=DEVICE, dtype=dtype, requires_grad=True)
    buf = base * 1  # a non-leaf buffer, as an embedding gather would produce
    out = decomposed_prompts(S, C, R, ids, out=buf, row_offsets=offs, backend=backend)
    assert out is buf

    rows = (offs[:, None] + torch.arange(l, device=DEVICE)).flatten()
    expect = base.detach().clone()
    expect[rows] = _plain(S, C, R, ids).detach().flatten(0, 1)
    kept = torch.ones(31, dtype=torch.bool, device=DEVICE)
    kept[rows] = False
    assert torch.equal(out.detach()[kept], expect[kept])
    oracle = ref.decomposed_prompts(S, C, R, ids).flatten(0, 1)
    ref.assert_within_baseline(out.detach()[rows], oracle, expect[rows])

    grad = torch.randn(31, d, device=DEVICE, dtype=dtype)
    gbase, *gparams = torch.autograd.grad(out, (base, S, C, R), grad)
    assert torch.equal(gbase[kept], grad[kept]) and torch.count_nonzero(gbase[rows]) == 0
    og = ref.decomposed_prompts_grads(S, C, R, ids, grad[rows].view(3, l, d))
    pg = torch.autograd.grad(_plain(S, C, R, ids), (S, C, R), grad[rows].view(3, l, d))
    for g, o, p in zip(gparams, og, pg):
        ref.assert_within_baseline(g, o, p)


def test_out_buffer_without_grad(backend):
    S, C, R = _params(3, 16, 2, 1, torch.float32, requires_grad=False)
    buf = torch.zeros(10, 16, device=DEVICE)
    with torch.no_grad():
        decomposed_prompts(S, C, R, torch.tensor([1], device=DEVICE), out=buf, row_offsets=torch.tensor([7], device=DEVICE), backend=backend)
    torch.testing.assert_close(buf[7:], S * (C[1] @ R[1]))
    assert torch.count_nonzero(buf[:7]) == 0


def test_gradcheck_float64():
    S, C, R = (t.double() for t in _params(4, 6, 3, 2, torch.float32))
    ids = torch.tensor([2, 0, 2], device=DEVICE)
    assert torch.autograd.gradcheck(lambda s, c, r: decomposed_prompts(s, c, r, ids, backend="torch"), (S, C, R))


def test_torch_compile_fullgraph():
    S, C, R = _params(7, 37, 3, 1, torch.float32)
    ids = torch.tensor([2, 0, 2])

    def f(s, c, r, i):
        return (decomposed_prompts(s.cpu(), c.cpu(), r.cpu(), i, backend="torch") * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(S, C, R, ids)
    grads = torch.autograd.grad(loss, (S, C, R))
    expect = torch.autograd.grad(f(S, C, R, ids), (S, C, R))
    torch.testing.assert_close(loss, f(S, C, R, ids))
    for a, b in zip(grads, expect):
        torch.testing.assert_close(a, b)


def test_opcheck():
    S, C, R = _params(5, 12, 3, 2, torch.float32)
    torch.library.opcheck(torch.ops.mptkern.decomposed_prompts.default, (S, C, R, torch.tensor([1, 2, 1], device=DEVICE), "torch"))


BAD_INPUTS = [
    ("shared", dict(shared=torch.randn(2, 3, 4)), "shared must have shape (l, d)"),
    ("task_cols", dict(task_cols=torch.randn(3, 6, 1)), "task_cols must have shape (K, l=5"),
    ("task_rows", dict(task_rows=torch.randn(3, 1, 9)), "task_rows must have shape (K=3, r=1, d=8)"),
    ("float ids", dict(task_ids=torch.tensor([0.0, 1.0])), "task_ids must be an integer tensor of shape (B,)"),
    ("2-d ids", dict(task_ids=torch.zeros(2, 2, dtype=torch.long)), "task_ids must be an integer tensor of shape (B,)"),
    ("empty", dict(task_ids=torch.zeros(0, dtype=torch.long)), "task_ids is empty"),
    ("id too big", dict(task_ids=torch.tensor([0, 3])), "task_ids must lie in [0, 3)"),
    ("negative id", dict(task_ids=torch.tensor([-1])), "task_ids must lie in [0, 3)"),
    ("dtype mix", dict(task_rows=torch.randn(3, 1, 8, dtype=torch.float64)), "task_rows has dtype torch.float64"),
    ("device mix", dict(task_ids=torch.tensor([0], device="meta")), "task_ids is on meta"),
    ("out shape", dict(out=torch.zeros(10, 7), row_offsets=torch.tensor([0])), "out must be a contiguous tensor of shape (R, d=8)"),
    ("offsets missing", dict(out=torch.zeros(10, 8)), "out is given without row_offsets"),
    ("offsets range", dict(out=torch.zeros(10, 8), row_offsets=torch.tensor([6])), "row_offsets must lie in [0, 5]"),
    ("offsets shape", dict(out=torch.zeros(10, 8), row_offsets=torch.tensor([0, 1])), "row_offsets must be an integer tensor of shape (B=1,)"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(case):
    _, override, message = case
    args = dict(shared=torch.randn(5, 8), task_cols=torch.randn(3, 5, 1), task_rows=torch.randn(3, 1, 8), task_ids=torch.tensor([0]))
    args.update(override)
    with pytest.raises(ValueError) as info:
        decomposed_prompts(**args, backend="torch")
    assert message in str(info.value)


def test_dispatch(monkeypatch):
    S, C, R = _params(3, 4, 2, 1, torch.float32)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        decomposed_prompts(S, C, R, torch.tensor([0], device=DEVICE), backend="cudnn")
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("auto", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backends.resolve("auto", torch.device("cpu"))
    assert backends.resolve("torch", torch.device("cpu")) == "torch"  # the argument wins
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backends.why_unavailable("triton", torch.device("cpu")) is None:
        assert backends.resolve("auto", torch.device("cpu")) == "triton"


def test_cuda_backend_reports_why_unavailable():
    from mptkern import _ext

    reason = backends.why_unavailable("cuda", torch.device("cpu"))
    assert reason  # CPU tensors never run on the cuda backend
    if not _ext.loaded():
        assert "cmake" in _ext.why_not()
        with pytest.raises(RuntimeError, match="cuda"):
            backends.resolve("cuda", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("MPTKERN_BIG_TESTS"), reason="needs > 2^31-element buffer: GPU or MPTKERN_BIG_TESTS=1")
def test_row_offsets_beyond_int32(backend):
    """Row offset x d exceeds 2^31: the kernels must use 64-bit offsets."""
    d, l = 4, 3
    rows = 2**31 // d + 8
    buf = torch.zeros(rows, d, device=DEVICE, dtype=torch.float16)
    S, C, R = _params(l, d, 2, 1, torch.float16, requires_grad=False)
    offs = torch.tensor([rows - l], device=DEVICE)
    with torch.no_grad():
        decomposed_prompts(S, C, R, torch.tensor([1], device=DEVICE), out=buf, row_offsets=offs, backend=backend)
    torch.testing.assert_close(buf[-l:], (S * (C[1] @ R[1])))
