"""Shared-prefix execution is the same function as PEFT-style concatenation."""

import pytest
import torch

from mptkern.models import PromptedLM, concat_prompt
from mptkern.prompts import MultitaskPrompt, TaskPrompts
from tests.tiny_models import tiny_gpt_oss, tiny_llama


def batch(B, n, vocab, lengths, left_pad, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, n), generator=g)
    mask = torch.zeros(B, n, dtype=torch.long)
    for b, length in enumerate(lengths):
        if left_pad:
            mask[b, n - length:] = 1
        else:
            mask[b, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : n // 3] = -100  # instruction tokens carry no loss
    labels[0, :] = ids[0, :].masked_fill(mask[0] == 0, -100)  # one row with a label on its first token
    return ids, mask, labels


def run(model, prompt, ids, mask, task_ids, labels, share):
    lm = PromptedLM(model, prompt, share_prefix=share)
    prompt.zero_grad(set_to_none=True)
    out = lm(ids, mask, task_ids, labels)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in prompt.named_parameters()}
    return out, grads


def assert_same(model, prompt_len, ids, mask, task_ids, labels, atol=2e-5, kind=MultitaskPrompt):
    if kind is MultitaskPrompt:
        prompt = MultitaskPrompt(5, prompt_len, model.config.hidden_size, rank=2)
        with torch.no_grad():
            prompt.prompt_embeddings.normal_(0, 1)
    else:
        prompt = TaskPrompts(5, prompt_len, model.config.hidden_size, init_std=1.0)
    shared, g_shared = run(model, prompt, ids, mask, task_ids, labels, True)
    concat, g_concat = run(model, prompt, ids, mask, task_ids, labels, False)
    real = mask.bool()
    torch.testing.assert_close(shared.hidden_states[real], concat.hidden_states[real], atol=atol, rtol=1e-4)
    torch.testing.assert_close(shared.logits[real], concat.logits[real], atol=atol, rtol=1e-4)
    torch.testing.assert_close(shared.loss, concat.loss, atol=atol, rtol=1e-5)
    for name in g_concat:
        torch.testing.assert_close(g_shared[name], g_concat[name], atol=atol, rtol=1e-4, msg=name)
        assert g_concat[name].abs().sum() > 0
    return shared, concat


@pytest.mark.parametrize("kind", [MultitaskPrompt, TaskPrompts], ids=lambda k: k.__name__)
@pytest.mark.parametrize("left_pad", [False, True], ids=["right-pad", "left-pad"])
def test_llama_shared_prefix_equals_concatenation(left_pad, kind):
    model = tiny_llama()
    ids, mask, labels = batch(6, 11, 128, [11, 4, 7, 1, 9, 11], left_pad)
    task_ids = torch.tensor([3, 0, 3, 3, 1, 0])  # repeated tasks; tasks 2 and 4 absent
    assert_same(model, 5, ids, mask, task_ids, labels, kind=kind)


@pytest.mark.parametrize("left_pad", [False, True], ids=["right-pad", "left-pad"])
def test_gpt_oss_sinks_window_shorter_than_prompt_plus_input(left_pad):
    model = tiny_gpt_oss(window=8)
    ids, mask, labels = batch(5, 12, 128, [12, 3, 9, 12, 6], left_pad)
    task_ids = torch.tensor([4, 4, 1, 0, 1])
    assert_same(model, 6, ids, mask, task_ids, labels)  # 6 + 12 > window 8


def test_concatenation_path_matches_hf_loss():
    """The reference path's loss is what Hugging Face computes on the concatenated prompt."""
    model = tiny_llama()
    ids, mask, labels = batch(3, 8, 128, [8, 8, 8], False)
    prompt = MultitaskPrompt(2, 4, 64)
    task_ids = torch.tensor([1, 0, 1])
    ours = PromptedLM(model, prompt, share_prefix=False)(ids, mask, task_ids, labels)
    embeds, full_mask = concat_prompt(prompt(task_ids), model.get_input_embeddings()(ids), mask)
    hf = model(inputs_embeds=embeds, attention_mask=full_mask,
               labels=torch.cat([torch.full((3, 4), -100), labels], 1))
    torch.testing.assert_close(ours.loss, hf.loss)
    torch.testing.assert_close(ours.logits, hf.logits[:, 4:])


def test_smollm2_shared_prefix_equals_concatenation(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from mptkern.models import load_default

    try:
        model, tok = load_default(cache_dir=tmp_path)
    except ImportError as exc:
        pytest.skip(str(exc))
    texts = ["Patient denies chest pain.", "Order: metoprolol 25 mg PO BID. Route:", "Fever since yesterday, no cough."]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    assert_same(model, 4, enc["input_ids"], enc["attention_mask"], torch.tensor([2, 0, 2]), labels, atol=1e-4)


def test_unsupported_model_type_lists_supported():
    class Cfg:
        model_type = "bert"

    class Fake(torch.nn.Module):
        config = Cfg()

    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported; supported types: \['gemma2', 'gpt_oss', 'llama', 'mistral', 'qwen2', 'qwen3'\]"):
        PromptedLM(Fake(), MultitaskPrompt(1, 2, 4))


def test_bad_inputs():
    lm = PromptedLM(tiny_llama(), MultitaskPrompt(2, 3, 64))
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        lm(ids, torch.ones(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least one real token"):
        lm(ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="task_ids must be an integer tensor of shape"):
        lm(ids, torch.ones(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="task_ids must lie in"):
        lm(ids, torch.ones(2, 4), torch.tensor([0, 2]))


def test_model_attention_setting_is_restored():
    model = tiny_llama()
    before = model.config._attn_implementation
    lm = PromptedLM(model, MultitaskPrompt(2, 3, 64))
    lm(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4), torch.tensor([1]))
    assert model.config._attn_implementation == before


def test_loss_without_valid_labels_is_zero_with_zero_gradient():
    prompt = MultitaskPrompt(2, 3, 64)
    lm = PromptedLM(tiny_llama(), prompt)
    ids = torch.ones(2, 4, dtype=torch.long)
    out = lm(ids, torch.ones(2, 4), torch.tensor([0, 1]), torch.full((2, 4), -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in prompt.parameters())


@pytest.mark.parametrize("share", [True, False], ids=["shared", "concat"])
@pytest.mark.parametrize("kind", [MultitaskPrompt, TaskPrompts], ids=lambda k: k.__name__)
def test_float32_prompt_on_a_bfloat16_model(kind, share):
    """The trainer's mixed precision: float32 prompt parameters enter a bf16 backbone cast to bf16.
    Forward and gradients equal those of the same prompt held in bf16 (the rows are cast before
    anything reads them); the gradients arrive in float32."""
    model = tiny_llama().to(torch.bfloat16)
    ids, mask, labels = batch(4, 9, 128, [9, 5, 9, 3], False)
    task_ids = torch.tensor([1, 0, 1, 2])
    torch.manual_seed(0)
    master = kind(3, 4, 64, **({"rank": 2} if kind is MultitaskPrompt else {}))
    with torch.no_grad():
        for p in master.parameters():
            p.normal_(0, 1)
            p.copy_(p.bfloat16())  # values bf16 holds exactly, so the cast loses nothing
    low = kind(3, 4, 64, **({"rank": 2} if kind is MultitaskPrompt else {})).to(torch.bfloat16)
    low.load_state_dict({k: v.bfloat16() for k, v in master.state_dict().items()})
    out32, g32 = run(model, master, ids, mask, task_ids, labels, share)
    out16, g16 = run(model, low, ids, mask, task_ids, labels, share)
    assert out32.hidden_states.dtype == torch.bfloat16
    real = mask.bool()
    # TaskPrompts: the same bf16 rows reach the model; MultitaskPrompt: P* (u v) is computed in
    # float32 and cast once, against bf16 arithmetic, so the two differ by bf16 rounding
    exact = kind is TaskPrompts
    tol = dict(atol=0, rtol=0) if exact else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out32.hidden_states[real], out16.hidden_states[real], **tol)
    for name in g16:
        assert g32[name].dtype == torch.float32
        assert g32[name].abs().sum() > 0
        torch.testing.assert_close(g32[name].bfloat16(), g16[name], **(tol if exact else dict(atol=0.1, rtol=0.1)), msg=name)
