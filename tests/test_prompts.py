"""Prompt modules: forward/backward, validation, init modes (checked against PEFT's own init path),
add_task, safetensors save/load, and PEFT MultitaskPromptTuning adapter import/export."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from mptkern import prompts as prompts_mod
from mptkern.prompts import MultitaskPrompt, TaskPrompts

K, L, D, R = 4, 5, 64, 2


def _randomized(module, seed=0):
    """Give every parameter distinct values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


def _naive(p, ids):
    P, U, V = (t.double() for t in (p.prompt_embeddings, p.prefix_task_cols, p.prefix_task_rows))
    return P * (U[ids] @ V[ids])


# ----------------------------------------------------------------------------------------------
# shapes, forward, backward, validation
# ----------------------------------------------------------------------------------------------
def test_task_prompts_forward_backward():
    tp = _randomized(TaskPrompts(K, L, 7))
    assert (tp.num_tasks, tp.prompt_len, tp.hidden_size) == (K, L, 7)
    assert tp.prompts.shape == (K, L, 7) and tp.dtype == torch.float32
    ids = torch.tensor([2, 0, 2, 3])
    out = tp(ids)
    assert out.shape == (4, L, 7)
    assert torch.equal(out, tp.prompts[ids])
    g = torch.randn_like(out)
    out.backward(g)
    expect = torch.zeros_like(tp.prompts).index_add_(0, ids, g)
    torch.testing.assert_close(tp.prompts.grad, expect)
    assert torch.all(tp.prompts.grad[1] == 0)  # absent task


def test_multitask_prompt_forward_backward():
    p = _randomized(MultitaskPrompt(K, L, D, rank=R, backend="torch"))
    assert (p.num_tasks, p.prompt_len, p.hidden_size, p.rank) == (K, L, D, R)
    ids = torch.tensor([3, 1, 3])
    out = p(ids)
    assert out.shape == (3, L, D)
    torch.testing.assert_close(out.double(), _naive(p, ids))
    g = torch.randn_like(out)
    out.backward(g)
    ref = [t.detach().double().requires_grad_() for t in (p.prompt_embeddings, p.prefix_task_cols, p.prefix_task_rows)]
    (ref[0] * (ref[1][ids] @ ref[2][ids])).backward(g.double())
    for got, want in zip((p.prompt_embeddings, p.prefix_task_cols, p.prefix_task_rows), ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [TaskPrompts, MultitaskPrompt])
@pytest.mark.parametrize(
    "ids, err",
    [
        (torch.tensor([0, K]), ValueError),
        (torch.tensor([-1, 0]), ValueError),
        (torch.tensor([0.0, 1.0]), ValueError),
        (torch.tensor([True, False]), ValueError),
        (torch.tensor([], dtype=torch.long), ValueError),
        (torch.tensor([[0, 1]]), ValueError),
        ([0, 1], TypeError),
    ],
)
def test_task_id_validation(cls, ids, err):
    with pytest.raises(err):
        cls(K, L, D)(ids)


def test_constructor_validation():
    with pytest.raises(ValueError, match="init"):
        MultitaskPrompt(K, L, D, init="zeros")
    with pytest.raises(ValueError, match=">= 1"):
        MultitaskPrompt(0, L, D)
    with pytest.raises(ValueError, match=">= 1"):
        TaskPrompts(K, 0, D)


@pytest.mark.parametrize("cls", [TaskPrompts, MultitaskPrompt])
def test_task_names(cls):
    names = ["ner", "re", "qa", "nli"]
    m = cls(K, L, D, task_names=names)
    assert m.task_names == names and m.task_index("qa") == 2
    m.task_names.append("x")  # a copy: the module is unchanged
    assert m.task_names == names
    with pytest.raises(KeyError):
        m.task_index("summ")
    with pytest.raises(ValueError, match="no task_names"):
        cls(K, L, D).task_index("ner")
    with pytest.raises(ValueError, match="entries"):
        cls(K, L, D, task_names=names[:3])
    with pytest.raises(ValueError, match="unique"):
        cls(K, L, D, task_names=["a", "a", "b", "c"])


@pytest.mark.parametrize("cls", [TaskPrompts, MultitaskPrompt])
def test_dtype_and_device_follow_to(cls):
    m = cls(K, L, D)
    assert m.dtype == torch.float32 and m.device == torch.device("cpu")
    m = m.to(torch.float64)
    assert m.dtype == torch.float64 and m(torch.tensor([1, 0])).dtype == torch.float64
    m = cls(K, L, D, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_near_ones_default_starts_every_task_near_the_shared_prompt():
    p = MultitaskPrompt(K, L, D, rank=R)
    W = p.prefix_task_cols @ p.prefix_task_rows
    assert (W - 1).abs().max() < 0.25
    assert 0.015 < p.prompt_embeddings.std() < 0.025


# ----------------------------------------------------------------------------------------------
# init modes
# ----------------------------------------------------------------------------------------------
def _text_expect(weight, ids, l):
    rep = (ids * (l // len(ids) + 1))[:l]
    return weight[torch.tensor(rep)]


@pytest.mark.parametrize("token_ids", [[5, 9, 2], list(range(10, 20))])  # shorter and longer than l
def test_init_from_text(token_ids):
    emb = torch.nn.Embedding(32, D)
    p = MultitaskPrompt(K, L, D)
    cols = p.prefix_task_cols.detach().clone()
    p.init_from_text(emb, token_ids)
    assert torch.equal(p.prompt_embeddings, _text_expect(emb.weight.detach(), token_ids, L))
    assert torch.equal(p.prefix_task_cols, cols)  # PEFT's TEXT sets P* only

    tp = TaskPrompts(K, L, D)
    before = tp.prompts.detach().clone()
    tp.init_from_text(emb.weight, torch.tensor(token_ids), task=1)
    assert torch.equal(tp.prompts[1], _text_expect(emb.weight.detach(), token_ids, L))
    assert torch.equal(tp.prompts[[0, 2, 3]], before[[0, 2, 3]])
    tp.init_from_text(emb, token_ids)
    assert all(torch.equal(tp.prompts[k], tp.prompts[1]) for k in range(K))
    with pytest.raises(ValueError, match="at least one"):
        tp.init_from_text(emb, [])


def _peft():
    return pytest.importorskip("peft")


def _peft_embedding(mode, path=None, task=0, num_tasks=1, seed=0):
    peft = _peft()
    from peft.tuners.multitask_prompt_tuning import MultitaskPromptEmbedding

    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=L, token_dim=D, num_transformer_submodules=1,
        num_tasks=num_tasks, num_ranks=R, prompt_tuning_init=mode,
        prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=task,
    )
    word_embeddings = torch.nn.Embedding(32, D)
    torch.manual_seed(seed)
    return MultitaskPromptEmbedding(config, word_embeddings)


def _assert_same_params(ours, theirs):
    assert torch.equal(ours.prompt_embeddings, theirs.embedding.weight)
    assert torch.equal(ours.prefix_task_cols, theirs.prefix_task_cols)
    assert torch.equal(ours.prefix_task_rows, theirs.prefix_task_rows)


def test_peft_random_init_gives_peft_draws():
    theirs = _peft_embedding("RANDOM", num_tasks=K, seed=7)
    torch.manual_seed(7)
    ours = MultitaskPrompt(K, L, D, rank=R, init="peft")
    _assert_same_params(ours, theirs)


@pytest.mark.parametrize("writer", ["to_peft", "save"])
@pytest.mark.parametrize("mode", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_from_source_matches_peft_init(tmp_path, mode, writer):
    """PEFT's own init path, fed our file as ``prompt_tuning_init_state_dict_path``, and
    ``from_source`` give the same tensors, random draws of ONLY_SOURCE_SHARED included."""
    source = _randomized(MultitaskPrompt(K, L, D, rank=R, task_names=["a", "b", "c", "d"]))
    if writer == "to_peft":
        path = os.path.join(source.to_peft(tmp_path / "src"), "adapter_model.safetensors")
    else:
        path = str(tmp_path / "src.safetensors")
        source.save(path)
    theirs = _peft_embedding(mode, path, task=2, seed=3)
    torch.manual_seed(3)
    ours = MultitaskPrompt.from_source(source, mode.lower(), task=2 if mode == "EXACT_SOURCE_TASK" else None,
                                       init="peft")
    _assert_same_params(ours, theirs)
    assert ours.num_tasks == 1 and ours.rank == R
    if mode == "EXACT_SOURCE_TASK":  # by name, and with PEFT's enum as the mode
        from peft import MultitaskPromptTuningInit

        by_name = MultitaskPrompt.from_source(source, MultitaskPromptTuningInit.EXACT_SOURCE_TASK, task="c")
        assert torch.equal(by_name.prefix_task_rows, ours.prefix_task_rows)


def test_from_source_semantics_and_errors():
    source = _randomized(MultitaskPrompt(K, L, D, rank=R))
    avg = MultitaskPrompt.from_source(source, "average_source_tasks", num_tasks=3, task_names=["x", "y", "z"])
    assert avg.num_tasks == 3 and avg.task_names == ["x", "y", "z"]
    assert torch.equal(avg.prompt_embeddings, source.prompt_embeddings)
    for t in range(3):  # each target task gets the mean factors
        assert torch.equal(avg.prefix_task_cols[t], source.prefix_task_cols.mean(0))
        assert torch.equal(avg.prefix_task_rows[t], source.prefix_task_rows.mean(0))
    shared = MultitaskPrompt.from_source(source, "only_source_shared")
    assert shared.init == source.init == "near_ones"
    assert (shared.prefix_task_cols @ shared.prefix_task_rows - 1).abs().max() < 0.25
    with pytest.raises(ValueError, match="mode"):
        MultitaskPrompt.from_source(source, "average")
    with pytest.raises(ValueError, match="task is required"):
        MultitaskPrompt.from_source(source, "exact_source_task")
    with pytest.raises(ValueError, match="task is required"):
        MultitaskPrompt.from_source(source, "average_source_tasks", task=1)
    with pytest.raises(ValueError, match="out of range"):
        MultitaskPrompt.from_source(source, "exact_source_task", task=K)


# ----------------------------------------------------------------------------------------------
# add_task
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["average", "random", 1])
def test_multitask_add_task(init):
    p = _randomized(MultitaskPrompt(K, L, D, rank=R, task_names=["a", "b", "c", "d"]))
    old = {k: v.detach().clone() for k, v in p.state_dict().items()}
    old_params = (p.prefix_task_cols, p.prefix_task_rows)
    torch.manual_seed(0)
    t = p.add_task(init, name="new")
    assert t == K and p.num_tasks == K + 1 and p.task_names[-1] == "new" and p.task_index("new") == K
    assert p.prefix_task_cols is not old_params[0] and p.prefix_task_cols.requires_grad
    assert torch.equal(p.prompt_embeddings, old["prompt_embeddings"])
    assert torch.equal(p.prefix_task_cols[:K], old["prefix_task_cols"])  # bit-identical
    assert torch.equal(p.prefix_task_rows[:K], old["prefix_task_rows"])
    u, v = p.prefix_task_cols[K].detach().clone(), p.prefix_task_rows[K].detach().clone()
    if init == "average":
        assert torch.equal(u, old["prefix_task_cols"].mean(0)) and torch.equal(v, old["prefix_task_rows"].mean(0))
    elif init == 1:
        assert torch.equal(u, old["prefix_task_cols"][1]) and torch.equal(v, old["prefix_task_rows"][1])
    else:
        torch.manual_seed(0)
        u0, v0 = p._random_factors(1, L, R, D)
        assert torch.equal(u, u0[0]) and torch.equal(v, v0[0])
    # the new task trains with a rebuilt optimizer, the others stay put when their grads are unused
    opt = torch.optim.SGD(p.parameters(), lr=0.1)
    p(torch.tensor([t])).square().sum().backward()
    opt.step()
    assert not torch.equal(p.prefix_task_cols[K], u)
    assert torch.equal(p.prefix_task_cols[:K], old["prefix_task_cols"])


@pytest.mark.parametrize("init", ["average", "random", 2])
def test_task_prompts_add_task(init):
    tp = _randomized(TaskPrompts(K, L, D))
    old = tp.prompts.detach().clone()
    torch.manual_seed(0)
    t = tp.add_task(init)
    assert t == K and tp.prompts.shape == (K + 1, L, D) and tp.task_names is None
    assert torch.equal(tp.prompts[:K], old)
    if init == "average":
        assert torch.equal(tp.prompts[K], old.mean(0))
    elif init == 2:
        assert torch.equal(tp.prompts[K], old[2])
    else:
        torch.manual_seed(0)
        assert torch.equal(tp.prompts[K], torch.randn(L, D) * 0.02)
    assert tp(torch.tensor([K])).shape == (1, L, D)


@pytest.mark.parametrize("cls", [TaskPrompts, MultitaskPrompt])
def test_add_task_errors_leave_the_module_unchanged(cls):
    named = cls(K, L, D, task_names=["a", "b", "c", "d"])
    for bad in (dict(init="average"), dict(init="average", name="a"), dict(init="mean", name="e"),
                dict(init=K, name="e"), dict(init=True, name="e")):
        with pytest.raises((ValueError, TypeError)):
            named.add_task(**bad)
    assert named.num_tasks == K and named.task_names == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="no task_names"):
        cls(K, L, D).add_task("average", name="e")


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [TaskPrompts, MultitaskPrompt])
def test_save_load_round_trip(tmp_path, cls, dtype):
    m = _randomized(cls(K, L, D, task_names=["a", "b", "c", "d"], dtype=dtype))
    if cls is MultitaskPrompt:
        m.add_task(0, name="e")
    path = tmp_path / "sub" / "prompt.safetensors"
    m.save(path)
    rng = torch.random.get_rng_state()
    back = cls.load(path)
    assert torch.equal(torch.random.get_rng_state(), rng)  # loading draws no random numbers
    assert type(back) is cls and back.task_names == m.task_names
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == dtype and torch.equal(sd[k], sd2[k])
    assert all(p.requires_grad for p in back.parameters())
    ids = torch.tensor([0, m.num_tasks - 1])
    assert torch.equal(back(ids), m(ids))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["mptkern.class"] == cls.__name__
    assert json.loads(meta["mptkern.shapes"]) == {k: list(v.shape) for k, v in sd.items()}
    if cls is MultitaskPrompt:
        assert json.loads(meta["mptkern.config"])["rank"] == 1


def test_load_rejects_the_other_class(tmp_path):
    TaskPrompts(K, L, D).save(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="TaskPrompts"):
        MultitaskPrompt.load(tmp_path / "t.safetensors")


def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError("disk full")


def test_save_is_atomic(tmp_path, monkeypatch):
    m = _randomized(MultitaskPrompt(K, L, D))
    path = tmp_path / "p.safetensors"
    monkeypatch.setattr(prompts_mod, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        m.save(path)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary file

    monkeypatch.undo()
    m.save(path)
    good = path.read_bytes()
    monkeypatch.setattr(prompts_mod, "save_file", _failing_save_file)
    m.add_task("average")
    with pytest.raises(OSError):
        m.save(path)
    with pytest.raises(OSError):
        m.to_peft(tmp_path / "adapter")
    assert path.read_bytes() == good  # the old file survives a failed overwrite
    assert sorted(os.listdir(tmp_path)) == ["adapter", "p.safetensors"] and os.listdir(tmp_path / "adapter") == []


# ----------------------------------------------------------------------------------------------
# PEFT interop on a tiny random Llama
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_config():
    transformers = pytest.importorskip("transformers")
    _peft()
    return transformers.LlamaConfig(
        hidden_size=D, num_hidden_layers=2, vocab_size=128, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )


def _tiny_llama(config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _concat_logits(model, prompt, ids, mask, task_ids):
    """PEFT-style concatenation with our prompt."""
    p = prompt(task_ids)
    embeds = torch.cat([p, model.get_input_embeddings()(ids)], 1)
    mask = torch.cat([mask.new_ones(mask.shape[0], p.shape[1]), mask], 1)
    return model(inputs_embeds=embeds, attention_mask=mask).logits


def test_to_peft_loads_in_peft(tmp_path, llama_config):
    from peft import PeftModel

    ours = _randomized(MultitaskPrompt(K, L, D, rank=R, task_names=["a", "b", "c", "d"], backend="torch"))
    directory = ours.to_peft(tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = PeftModel.from_pretrained(_tiny_llama(llama_config), directory).eval()
    cfg = pm.peft_config["default"]
    assert (cfg.num_tasks, cfg.num_ranks, cfg.num_virtual_tokens, cfg.token_dim) == (K, R, L, D)
    assert cfg.base_model_name_or_path == "tiny-llama"
    task_ids = torch.tensor([3, 0, 3, 1, 2])
    with torch.no_grad():
        theirs = pm.get_prompt(batch_size=5, task_ids=task_ids)
        torch.testing.assert_close(theirs, ours(task_ids), rtol=0, atol=0)
        ids = torch.randint(0, 128, (5, 7))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        peft_logits = pm(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
        our_logits = _concat_logits(_tiny_llama(llama_config), ours, ids, mask, task_ids)
    torch.testing.assert_close(peft_logits, our_logits, rtol=1e-5, atol=1e-5)

    back = MultitaskPrompt.from_peft(directory)  # and back, names included
    assert back.task_names == ["a", "b", "c", "d"]
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


def test_task_prompts_to_peft_is_the_prompt_bit_for_bit(tmp_path, llama_config):
    from peft import PeftModel

    ours = TaskPrompts(3, L, D, task_names=["x", "y", "z"])
    with torch.no_grad():
        ours.prompts.normal_()
    directory = ours.to_peft(tmp_path / "pt", task="y")
    back = MultitaskPrompt.from_peft(directory)
    assert back.task_names == ["y"] and back.num_tasks == 1
    torch.testing.assert_close(back(torch.tensor([0])), ours(torch.tensor([1])), rtol=0, atol=0)
    pm = PeftModel.from_pretrained(_tiny_llama(llama_config), directory).eval()  # PEFT reads it too
    with torch.no_grad():
        torch.testing.assert_close(pm.get_prompt(batch_size=1, task_ids=torch.tensor([0])), ours(torch.tensor([1])),
                                   rtol=0, atol=0)
    with pytest.raises(KeyError):
        ours.to_peft(tmp_path / "bad", task="nope")


@pytest.mark.parametrize("safe_serialization", [True, False])  # adapter_model.safetensors / .bin
def test_from_peft_reads_a_peft_saved_adapter(tmp_path, llama_config, safe_serialization):
    from peft import MultitaskPromptTuningConfig, get_peft_model

    config = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L, num_tasks=3, num_ranks=R)
    pm = get_peft_model(_tiny_llama(llama_config), config)
    enc = pm.prompt_encoder["default"]
    _randomized(enc, seed=5)  # trained values, not the init
    pm.save_pretrained(tmp_path / "peft", safe_serialization=safe_serialization)
    assert os.path.exists(tmp_path / "peft" / ("adapter_model.safetensors" if safe_serialization else "adapter_model.bin"))
    ours = MultitaskPrompt.from_peft(tmp_path / "peft", task_names=["x", "y", "z"], backend="torch")
    assert (ours.num_tasks, ours.prompt_len, ours.hidden_size, ours.rank) == (3, L, D, R)
    assert ours.task_names == ["x", "y", "z"]
    _assert_same_params(ours, enc)
    task_ids = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(ours(task_ids), pm.get_prompt(batch_size=4, task_ids=task_ids), rtol=0, atol=0)


def test_from_peft_errors(tmp_path):
    m = MultitaskPrompt(K, L, D)
    directory = m.to_peft(tmp_path / "a")
    cfg_path = os.path.join(directory, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "num_tasks": K + 1}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="config says"):
        MultitaskPrompt.from_peft(directory)
    json.dump({**cfg, "peft_type": "PROMPT_TUNING"}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        MultitaskPrompt.from_peft(directory)
    json.dump({**cfg, "num_transformer_submodules": 2}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="submodules"):
        MultitaskPrompt.from_peft(directory)
    with pytest.raises(ValueError, match="task_type"):
        m.to_peft(tmp_path / "b", task_type="SEQ_2_SEQ_LM")
