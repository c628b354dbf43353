"""Every MPTKERN_BACKEND setting: each op runs a backend it has, or raises an error naming the op and
its backends; the training losses never fail because of the setting."""

import pytest
import torch

from mptkern import backends
from mptkern.ops import decomposed_prompts, fused_distill_loss, prefix_attention, prefix_attention_decode

CPU = torch.device("cpu")


def _calls():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    pk, pv = r(1, 4, 2, 16), r(1, 4, 2, 16)
    return {
        "decomposed_prompts": lambda: decomposed_prompts(r(4, 16), torch.rand(3, 4, 1), torch.rand(3, 1, 16), torch.tensor([2, 0])),
        "prefix_attention": lambda: prefix_attention(r(5, 4, 16), r(5, 2, 16), r(5, 2, 16), cu, pk, pv, torch.tensor([0, -1])),
        "prefix_attention_decode": lambda: prefix_attention_decode(r(2, 4, 16), r(2, 6, 2, 16), r(2, 6, 2, 16),
                                                                   torch.tensor([3, 6]), pk, pv, torch.tensor([0, 0])),
        "fused_distill_loss": lambda: fused_distill_loss(r(4, 16), r(4, 16), r(50, 16), torch.tensor([1, 2, -100, 7]),
                                                         ce_weight=1.0, hidden_weight=1.0),
    }


@pytest.mark.parametrize("setting", ["torch", "triton", "cuda"])
def test_every_setting_runs_or_explains(setting, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, setting)
    for op, call in _calls().items():
        has = {"decomposed_prompts": backends.BACKENDS}.get(op, ("torch", "triton"))
        usable = setting not in has or backends.why_unavailable(setting, CPU) is None
        if usable:
            assert torch.isfinite(call()).all(), (op, setting)  # a backend it has, or its default
        else:
            with pytest.raises(RuntimeError, match=f"{op}: backend '{setting}' is unavailable: "):
                call()


@pytest.mark.parametrize("setting", ["torch", "triton", "cuda"])
def test_the_distillation_loss_never_fails_on_the_setting(setting, monkeypatch):
    if setting == "triton" and backends.why_unavailable("triton", CPU):
        pytest.skip(backends.why_unavailable("triton", CPU))
    monkeypatch.setenv(backends.ENV_VAR, setting)
    hs = torch.randn(4, 16, requires_grad=True)
    loss = fused_distill_loss(hs, torch.randn(4, 16), torch.randn(50, 16), torch.tensor([1, 2, -100, 7]), ce_weight=1.0)
    loss.backward()
    assert torch.isfinite(hs.grad).all()


def test_a_forced_backend_an_op_lacks_names_the_op_and_its_backends():
    with pytest.raises(RuntimeError, match=r"fused_distill_loss has no 'cuda' backend \(it has torch, triton\)"):
        fused_distill_loss(torch.randn(2, 8), torch.randn(2, 8), torch.randn(9, 8), backend="cuda")
    with pytest.raises(RuntimeError, match=r"decomposed_prompts: backend 'cuda' is unavailable"):
        decomposed_prompts(torch.randn(4, 16), torch.rand(3, 4, 1), torch.rand(3, 1, 16), torch.tensor([2]), backend="cuda")


def test_cpu_bf16_native_reads_the_cpu_flags(tmp_path):
    cases = {"zen4": ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n", True),
             "skylake": ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n", False),  # AVX-512, no BF16
             "sapphire": ("flags\t\t: fpu amx_bf16 amx_tile\n", True)}
    for name, (text, native) in cases.items():  # one file each: the answer is cached per path
        (tmp_path / name).write_text(text)
        assert backends.cpu_bf16_native(str(tmp_path / name)) is native, name
    assert not backends.cpu_bf16_native(str(tmp_path / "missing"))  # no /proc/cpuinfo (e.g. macOS)
