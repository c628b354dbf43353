"""Every registered backbone on a tiny random config: shared-prefix PromptedLM equals PEFT-style
concatenation (logits, loss and prompt gradients), and the engine's greedy output equals Hugging
Face ``generate``. Plus what the registry declares: an attention keyword a model passes without its
entry declaring it is refused, and the backends each config can run on."""

import pytest
import torch
import transformers as hf

from mptkern.models import PromptedLM, concat_prompt
from mptkern.models.registry import REGISTRY, ModelEntry, attention_backends, fallback_note
from mptkern.prompts import MultitaskPrompt
from mptkern.serve import MultiTaskEngine
from tests.test_engine import EOS, CharTokenizer, hf_greedy, mixed_requests, prompt_rows, prompts
from tests.test_prompted_lm import assert_same, batch
from tests.tiny_models import tiny_gpt_oss

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS)


def _build(config_cls, model_cls, **overrides):
    torch.manual_seed(0)
    return model_cls(config_cls(**{**SMALL, **overrides})).float().eval()


BACKBONES = {
    "qwen2": lambda: _build(hf.Qwen2Config, hf.Qwen2ForCausalLM),
    # QK-norm; a sliding window on the first layer, shorter than prompt + input
    "qwen3": lambda: _build(hf.Qwen3Config, hf.Qwen3ForCausalLM, head_dim=16, use_sliding_window=True, sliding_window=8,
                            max_window_layers=1, layer_types=["sliding_attention", "full_attention"]),
    "mistral": lambda: _build(hf.MistralConfig, hf.MistralForCausalLM, sliding_window=8),
    # softcapped attention scores and logits (caps low enough to bind), alternating sliding layers
    "gemma2": lambda: _build(hf.Gemma2Config, hf.Gemma2ForCausalLM, head_dim=16, sliding_window=8,
                             attn_logit_softcapping=2.0, final_logit_softcapping=0.3),
    # Meditron3 is a Llama 3.1 fine-tune: its attention dims (4096 wide, 32/8 heads of 128) and
    # rope scaling llama3, one layer and a small MLP and vocab to fit a CPU test
    "meditron3-dims": lambda: _build(hf.LlamaConfig, hf.LlamaForCausalLM, hidden_size=4096, num_attention_heads=32,
                                     num_key_value_heads=8, intermediate_size=256, num_hidden_layers=1, rope_theta=500000.0,
                                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_shared_prefix_equals_concatenation(name):
    model = BACKBONES[name]()
    ids, mask, labels = batch(5, 12, 128, [12, 3, 9, 12, 6], left_pad=True)
    assert_same(model, 6, ids, mask, torch.tensor([4, 4, 1, 0, 1]), labels, atol=1e-4)  # 6 + 12 > window 8


@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "meditron3-dims"])
def test_engine_greedy_equals_hf_generate(name):
    model = BACKBONES[name]()
    specs = prompts(model)
    engine = MultiTaskEngine(model, CharTokenizer(), specs, max_batch_tokens=24, max_running=3, max_seq_len=32)
    reqs = mixed_requests(6)
    for req, res in zip(reqs, engine.generate(reqs)):
        assert res.token_ids == hf_greedy(model, prompt_rows(specs[req.task]), req.input_ids, req.max_new_tokens), req


def test_final_softcap_reaches_logits_and_loss():
    """Gemma 2's final soft-capping: PromptedLM's logits and loss are Hugging Face's on the concatenation."""
    model = BACKBONES["gemma2"]()
    ids, mask, labels = batch(3, 8, 128, [8, 8, 8], False)
    prompt = MultitaskPrompt(2, 4, 64)
    task_ids = torch.tensor([1, 0, 1])
    ours = PromptedLM(model, prompt)(ids, mask, task_ids, labels)
    embeds, full_mask = concat_prompt(prompt(task_ids), model.get_input_embeddings()(ids), mask)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=full_mask,
                    labels=torch.cat([torch.full((3, 4), -100), labels], 1))
        raw = model.lm_head(model.model(inputs_embeds=embeds).last_hidden_state)
    assert (raw - ref.logits).abs().max() > 0.1  # the cap binds
    torch.testing.assert_close(ours.logits, ref.logits[:, 4:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-4, rtol=1e-4)


def test_an_undeclared_attention_keyword_is_refused(monkeypatch):
    model = tiny_gpt_oss()
    monkeypatch.setitem(REGISTRY, "gpt_oss", ModelEntry(frozenset({"scaling", "dropout", "sliding_window"}),
                                                         reference_attention="eager"))
    lm = PromptedLM(model, MultitaskPrompt(2, 3, 64))
    with pytest.raises(ValueError, match=r"gpt_oss's attention passed \['s_aux'\], which its registry entry does not declare"):
        lm(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4), torch.tensor([1]))


def test_attention_backends_name_what_the_triton_kernels_lack():
    assert attention_backends(BACKBONES["qwen2"]().config) == {"torch": None, "triton": None}
    assert "soft-capping" in attention_backends(BACKBONES["gemma2"]().config)["triton"]
    gemma_256 = hf.Gemma2Config(**{**SMALL, "head_dim": 256})
    assert "head_dim 256 is outside the Triton kernels' head dims" in attention_backends(gemma_256)["triton"]
    with pytest.raises(ValueError, match="not supported"):
        attention_backends(hf.BertConfig())
    note = fallback_note(gemma_256, torch.device("cuda"))
    assert note.startswith("gemma2: the attention runs mptkern's torch path on this GPU") and "head_dim 256" in note
    assert fallback_note(gemma_256, torch.device("cpu")) is None
    assert fallback_note(BACKBONES["qwen2"]().config, torch.device("cuda")) is None
