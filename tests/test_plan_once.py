"""Plan once, run many: inside the decoder layers (forward and backward), mptkern's code reads
nothing back from the device. The layout of a forward or an engine step is planned on the host
before the first layer, and every layer only runs the plan.

The guard wraps the Tensor methods that copy values to the host. While a decoder layer runs (and
during the whole backward) a call made from mptkern's own code is counted, and on a tensor outside
the CPU it raises, as a host sync would stall a GPU there. On a CPU-only machine the count is the
check: it must be zero."""

import collections
import contextlib
import sys

import pytest
import torch

from mptkern.backends import why_unavailable
from mptkern.models import PromptedLM
from mptkern.prompts import MultitaskPrompt
from mptkern.serve import MultiTaskEngine, Request
from tests.test_engine import CharTokenizer, prompts
from tests.test_prompted_lm import batch
from tests.tiny_models import tiny_gpt_oss, tiny_llama

HOST_READS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
BACKENDS = ["torch", "triton"]


@contextlib.contextmanager
def guard_host_reads(model):
    """Yields ``(reads, active)``: ``reads`` counts (method, module, line) of each host read made by
    mptkern code while ``active[0]``; the layers' hooks set it around every decoder-layer forward."""
    reads, active = collections.Counter(), [False]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guarded(name, fn):
        def read(self, *args, **kwargs):
            if active[0]:
                caller = sys._getframe(1)
                module = caller.f_globals.get("__name__", "")
                if module.startswith("mptkern"):
                    reads[(name, module, caller.f_lineno)] += 1
                    if self.device.type != "cpu":
                        raise RuntimeError(f"host sync Tensor.{name} in {module}:{caller.f_lineno} inside the layers")
            return fn(self, *args, **kwargs)
        return read

    layers = model.model.layers
    hooks = [layers[0].register_forward_pre_hook(lambda *a: active.__setitem__(0, True)),
             layers[-1].register_forward_hook(lambda *a: active.__setitem__(0, False))]
    for name, fn in originals.items():
        setattr(torch.Tensor, name, guarded(name, fn))
    try:
        yield reads, active
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        for h in hooks:
            h.remove()


def _backend(name, monkeypatch):
    if name == "triton" and why_unavailable("triton", torch.device("cpu")):
        pytest.skip(why_unavailable("triton", torch.device("cpu")))
    monkeypatch.setenv("MPTKERN_BACKEND", name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_gpt_oss(window=8)], ids=["llama", "gpt-oss"])
def test_prompted_lm_forward_backward_reads_nothing_inside_the_layers(make, backend, monkeypatch):
    _backend(backend, monkeypatch)
    model = make()
    ids, mask, labels = batch(5, 12, 128, [12, 3, 9, 12, 6], left_pad=True)
    prompt = MultitaskPrompt(5, 6, model.config.hidden_size, rank=2)
    lm = PromptedLM(model, prompt)
    with guard_host_reads(model) as (reads, active):
        out = lm(ids, mask, torch.tensor([4, 4, 1, 0, 1]), labels)
        assert not active[0] and not reads, f"forward: {dict(reads)}"
        active[0] = True  # the whole backward: the layers' and the loss's
        out.loss.backward()
        active[0] = False
    assert not reads, f"backward: {dict(reads)}"
    assert prompt.prompt_embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_steps_read_nothing_inside_the_layers(backend, monkeypatch):
    _backend(backend, monkeypatch)
    model = tiny_gpt_oss(window=8)
    engine = MultiTaskEngine(model, CharTokenizer(), prompts(model), max_batch_tokens=10, max_running=3, max_seq_len=32)
    requests = [Request("ner", input_ids=list(range(3, 17)), max_new_tokens=4),  # 14 tokens: prefilled in chunks
                Request("qa", input_ids=[5, 6, 7], max_new_tokens=6), Request("cls", input_ids=[9, 3], max_new_tokens=5)]
    with guard_host_reads(model) as (reads, _):
        results = engine.generate(requests)
    assert [r.completion_tokens for r in results] == [4, 6, 5]
    assert not reads, dict(reads)


def test_the_guard_catches_a_host_read_in_a_layer(monkeypatch):
    """The check can fail: a layer that reads the device (the unplanned call, which plans from the
    tensors it is given) is counted."""
    from mptkern.models import prompted
    from mptkern.ops import prefix_attention

    def unplanned(self, layer, q, k, v, *, scale, window, sinks, softcap):
        rows = self.num_prompts * self.prompt_len
        shape = (self.num_prompts, self.prompt_len, *k.shape[1:])
        plan = self.plan
        return prefix_attention(q, k, v, plan.cu_seqlens, k[:rows].view(shape), v[:rows].view(shape), plan.prefix_ids,
                                softmax_scale=scale, window=window, sinks=sinks)

    monkeypatch.setattr(prompted.PromptPack, "attend", unplanned)
    model = tiny_llama()
    ids, mask, labels = batch(3, 8, 128, [8, 3, 5], left_pad=False)
    with guard_host_reads(model) as (reads, _):
        PromptedLM(model, MultitaskPrompt(3, 4, model.config.hidden_size, rank=1))(ids, mask, torch.tensor([0, 2, 0]))
    assert {name for name, _, _ in reads} >= {"tolist"}
    assert sum(reads.values()) >= model.config.num_hidden_layers
