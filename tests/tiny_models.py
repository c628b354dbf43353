"""Small backbones the tests share: random tiny Llama / gpt-oss configs and a 2-layer SmolLM2."""

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM


def tiny_llama(**config):
    """Random Llama, GQA (4 query / 2 key-value heads), hidden 64, 2 layers, vocab 128 (``config`` overrides)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256), **config})
    return LlamaForCausalLM(cfg).float().eval()


def tiny_gpt_oss(window=8, **config):
    """Random gpt-oss: MoE, a sliding layer with ``window``, a full layer, nonzero sinks."""
    torch.manual_seed(0)
    cfg = GptOssConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                 num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                 max_position_embeddings=256), "sliding_window": window, **config})
    model = GptOssForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 1)  # nonzero sinks
    return model


def small_smollm(cache_dir):
    """The embedded SmolLM2 cut to 2 layers: its real tokenizer and embeddings at a fraction of the
    compute. Skips the calling test when the package is missing."""
    pytest.importorskip("gguf")
    from mptkern.models import load_default
    from mptkern.models.default import gguf_path

    try:
        gguf_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    model, tok = load_default(cache_dir=cache_dir)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model, tok
