"""vLLM prompt_embeds export: file format, round trip and the PEFT-style concatenation, without vLLM."""

import pytest
import torch
from safetensors import safe_open

from mptkern.models import PromptedLM
from mptkern.prompts import MultitaskPrompt, TaskPrompts
from mptkern.serve import export_prompt_embeds
from mptkern.serve.export import FORMAT, KEY, build_prompt_embeds, load_prompt_embeds, task_prompt_rows
from tests.tiny_models import tiny_llama


def multi(d=64):
    torch.manual_seed(1)
    p = MultitaskPrompt(3, 5, d, rank=2, task_names=["ner", "qa", "cls"])
    with torch.no_grad():
        p.prompt_embeddings.normal_(0, 1)
    return p


def test_round_trip_shape_dtype_metadata(tmp_path):
    model, prompt = tiny_llama(), multi()
    path = export_prompt_embeds(prompt, "qa", tmp_path / "qa.safetensors", model=model)
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == [KEY]
        raw = f.metadata()
    assert raw["mptkern.format"] == FORMAT and raw["mptkern.task"] == "qa"
    rows, meta = load_prompt_embeds(path)
    assert rows.shape == (5, 64) and rows.dtype == torch.float32
    assert meta["task"] == "qa" and meta["hidden_size"] == 64 and meta["prompt_len"] == 5
    assert meta["dtype"] == "float32" and meta["model_type"] == "llama"
    assert torch.equal(rows, prompt(torch.tensor([1]))[0].detach())
    assert torch.equal(rows, task_prompt_rows(prompt, 1))
    assert meta["instruction"] is None


def test_the_instruction_travels_for_the_input_format(tmp_path):
    from safetensors.torch import save_file

    prompt = multi()
    path = export_prompt_embeds(prompt, "qa", tmp_path / "qa.safetensors", instruction="Answer the question.")
    rows, meta = load_prompt_embeds(path)
    assert meta["instruction"] == "Answer the question." and "input_format" not in meta
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    save_file({KEY: rows}, tmp_path / "old.safetensors", metadata={**raw, "mptkern.input_format": "v0"})
    with pytest.raises(ValueError, match="input format"):
        load_prompt_embeds(tmp_path / "old.safetensors")
    with pytest.raises(TypeError, match="instruction must be a string"):
        export_prompt_embeds(prompt, "qa", tmp_path / "x.safetensors", instruction=3)


def test_model_dtype_and_explicit_dtype(tmp_path):
    model, prompt = tiny_llama().to(torch.bfloat16), multi()
    rows, meta = load_prompt_embeds(export_prompt_embeds(prompt, 0, tmp_path / "a.safetensors", model=model))
    assert rows.dtype == torch.bfloat16 and meta["dtype"] == "bfloat16" and meta["task"] == "ner"
    expected = prompt(torch.tensor([0]))[0].detach().to(torch.bfloat16)
    assert torch.equal(rows, expected)
    rows, meta = load_prompt_embeds(export_prompt_embeds(prompt, "cls", tmp_path / "b.safetensors", dtype=torch.float16))
    assert rows.dtype == torch.float16 and meta["dtype"] == "float16" and "model_type" not in meta


def test_task_prompts_and_module_index_pair(tmp_path):
    torch.manual_seed(0)
    single = TaskPrompts(2, 3, 64)  # no names: the id is the name
    rows, meta = load_prompt_embeds(export_prompt_embeds((single, 1), None, tmp_path / "t.safetensors"))
    assert meta["task"] == "1" and torch.equal(rows, single(torch.tensor([1]))[0].detach())


def test_concatenation_equals_prompted_lm_concat_embeddings():
    """build_prompt_embeds == the inputs_embeds PromptedLM(share_prefix=False) feeds the model (one row,
    no padding), and the model run on it gives PromptedLM's hidden states of the input tokens."""
    model, prompt = tiny_llama(), multi()
    lm = PromptedLM(model, prompt, share_prefix=False)
    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 120]])
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = lm(ids, torch.ones_like(ids), torch.tensor([2]))
    finally:
        hook.remove()
    built = build_prompt_embeds(task_prompt_rows(prompt, "cls"), model.get_input_embeddings(), ids[0].tolist())
    assert built.shape == (5 + 7, 64)
    torch.testing.assert_close(built, seen["embeds"][0], rtol=0, atol=0)
    # the weight tensor works as well as the module
    assert torch.equal(build_prompt_embeds(task_prompt_rows(prompt, "cls"), model.get_input_embeddings().weight, ids[0]), built)
    with torch.no_grad():
        h = model.model(inputs_embeds=built[None]).last_hidden_state[0, 5:]
    torch.testing.assert_close(h, out.hidden_states[0], rtol=1e-5, atol=1e-5)


def test_file_rows_rebuild_the_same_input(tmp_path):
    model, prompt = tiny_llama(), multi()
    rows, _ = load_prompt_embeds(export_prompt_embeds(prompt, "ner", tmp_path / "n.safetensors", model=model))
    a = build_prompt_embeds(rows, model.get_input_embeddings(), [1, 2, 3])
    b = build_prompt_embeds(task_prompt_rows(prompt, "ner"), model.get_input_embeddings(), [1, 2, 3])
    assert torch.equal(a, b)


def test_errors(tmp_path):
    model, prompt = tiny_llama(), multi()
    with pytest.raises(KeyError, match="unknown task"):
        export_prompt_embeds(prompt, "nope", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="out of range"):
        export_prompt_embeds(prompt, 3, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="hidden size"):
        export_prompt_embeds(multi(d=32), "ner", tmp_path / "x.safetensors", model=model)
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="embedding size"):
        build_prompt_embeds(torch.zeros(4, 32), model.get_input_embeddings(), [1, 2])
    with pytest.raises(ValueError, match="1-D"):
        build_prompt_embeds(torch.zeros(4, 64), model.get_input_embeddings(), [])
    with pytest.raises(ValueError, match="lie in"):
        build_prompt_embeds(torch.zeros(4, 64), model.get_input_embeddings(), [128])
    with pytest.raises(ValueError, match=r"\(l, d\)"):
        build_prompt_embeds(torch.zeros(64), model.get_input_embeddings(), [1])
    other = tmp_path / "other.safetensors"
    prompt.save(other)
    with pytest.raises(ValueError, match="not a prompt_embeds"):
        load_prompt_embeds(other)
