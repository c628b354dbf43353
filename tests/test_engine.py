"""MultiTaskEngine: greedy outputs equal HF generate on the PEFT-style concatenated prompt."""

import importlib
import types

import pytest
import torch

from mptkern.models import concat_prompt
from mptkern.models.attention import attention_implementation
from mptkern.models.registry import entry_for
from mptkern.prompts import MultitaskPrompt, TaskPrompts
from mptkern.serve import MultiTaskEngine, Request
from tests import tiny_models

EOS = 2


def tiny_llama():
    return tiny_models.tiny_llama(eos_token_id=EOS)


def tiny_gpt_oss(window=8):
    return tiny_models.tiny_gpt_oss(window, eos_token_id=EOS)


class CharTokenizer:
    """Token t <-> chr(ord('a') + t % 26), EOS is special (dropped by skip_special_tokens)."""

    eos_token_id = EOS

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - ord("a") + 3 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids if not (skip_special_tokens and t == EOS))


def prompts(model, seed=0):
    """Three tasks of two different prompt lengths: two from a MultitaskPrompt, one TaskPrompts."""
    torch.manual_seed(seed)
    d = model.config.hidden_size
    multi = MultitaskPrompt(2, 6, d, rank=2, task_names=["ner", "qa"])
    single = TaskPrompts(1, 4, d, init_std=1.0)
    with torch.no_grad():
        multi.prompt_embeddings.normal_(0, 1)
    return {"ner": (multi, 0), "qa": (multi, 1), "cls": single}


def concat_one(model, rows, ids):
    """(1, l + n, d) embeddings and (1, l + n) mask of one request: its prompt rows (l, d), then its
    tokens, by the library's reference layout (:func:`mptkern.models.concat_prompt`)."""
    embeds = model.get_input_embeddings()(torch.tensor([list(ids)]))
    return concat_prompt(rows[None], embeds, torch.ones(embeds.shape[:2], dtype=torch.long))


def hf_greedy(model, prompt_rows, ids, max_new_tokens):
    embeds, mask = concat_one(model, prompt_rows, ids)
    with attention_implementation(model, entry_for(model.config).reference_attention), torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=EOS, pad_token_id=0)
    return out[0].tolist()


def prompt_rows(spec):
    module, index = spec if isinstance(spec, tuple) else (spec, 0)
    with torch.no_grad():
        return module(torch.tensor([index]))[0]


def mixed_requests(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    tasks = ["ner", "qa", "cls"]
    reqs = []
    for i in range(n):
        length = int(torch.randint(1, 12, (1,), generator=g))
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        reqs.append(Request(tasks[i % 3], input_ids=ids, max_new_tokens=int(torch.randint(1, 10, (1,), generator=g))))
    return reqs


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt_oss], ids=["llama-gqa", "gpt-oss-sinks-window"])
def test_greedy_matches_hf_generate(make):
    model = make()
    specs = prompts(model)
    engine = MultiTaskEngine(model, CharTokenizer(), specs, max_batch_tokens=24, max_running=3, max_seq_len=32)
    reqs = mixed_requests(8)
    results = engine.generate(reqs)
    assert len(results) == len(reqs)
    for req, res in zip(reqs, results):
        expected = hf_greedy(model, prompt_rows(specs[req.task]), req.input_ids, req.max_new_tokens)
        assert res.token_ids == expected, req
        assert res.prompt_tokens == len(req.input_ids) and res.completion_tokens == len(expected)
        assert res.finish_reason == ("stop" if expected[-1] == EOS else "length")
        assert 0 < res.time_to_first_token <= res.total_time


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt_oss], ids=["llama-gqa", "gpt-oss-sinks-window"])
def test_tasks_without_a_prompt_run_beside_prompted_ones(make):
    """A task registered with None is the model as it is (e.g. a LoRA-adapted model): HF generate on
    the input alone, in the same batches as prompted tasks, and alone in an engine of no prompts."""
    model = make()
    specs = {**prompts(model), "plain": None}
    reqs = mixed_requests(6) + [Request("plain", input_ids=[4, 9, 30], max_new_tokens=6),
                                Request("plain", input_ids=[7] * 9, max_new_tokens=4)]
    empty = torch.zeros(0, model.config.hidden_size)
    for engine, batch in ((engine_for(model, specs), reqs), (engine_for(model, {"plain": None}), reqs[-2:])):
        for req, res in zip(batch, engine.generate(batch)):
            rows = empty if specs[req.task] is None else prompt_rows(specs[req.task])
            assert res.token_ids == hf_greedy(model, rows, req.input_ids, req.max_new_tokens), req


def test_text_requests_of_a_task_with_an_instruction_are_formatted_as_in_training():
    from mptkern.data import Collator, InputFormat, make_suite
    from tests.test_data import word_tokenizer

    suite = make_suite(seed=0, n_train=2, n_eval=1)
    task = suite["targets"][0]
    tok = word_tokenizer(suite, bos=True)
    model = tiny_models.tiny_llama(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    engine = MultiTaskEngine(model, tok, {"t": None}, instructions={"t": task.instruction}, max_seq_len=128)
    ex = task.eval[0]
    batch = Collator(tok, {task.name: 0})([ex])
    source = [t for t, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) if lab == -100]
    assert InputFormat(tok).source(task.instruction, ex.input)[0] == source
    formatted = engine.generate([Request("t", text=ex.input, max_new_tokens=3)])[0]
    by_ids = engine.generate([Request("t", input_ids=source, max_new_tokens=3)])[0]
    raw = engine.generate([Request("t", text=ex.input, max_new_tokens=3, raw=True)])[0]
    assert formatted.token_ids == by_ids.token_ids and formatted.prompt_tokens == len(source)
    assert raw.prompt_tokens == len(tok(ex.input, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="unknown task"):
        engine.set_instruction("nope", "x")
    with pytest.raises(TypeError, match="instruction must be a string"):
        engine.set_instruction("t", 3)


def engine_for(model, specs=None, **kw):
    kw = {"max_batch_tokens": 24, "max_running": 3, "max_seq_len": 32, **kw}
    return MultiTaskEngine(model, CharTokenizer(), prompts(model) if specs is None else specs, **kw)


def test_eos_stops_like_hf():
    model = tiny_llama()
    specs = prompts(model)
    req = Request("qa", input_ids=[5, 9, 40, 77], max_new_tokens=8)
    free = engine_for(model, specs).generate([req])[0].token_ids
    model.generation_config.eos_token_id = free[2]  # make the third generated token the EOS
    res = engine_for(model, specs).generate([req])[0]
    assert res.token_ids == free[: free.index(free[2]) + 1]
    assert res.finish_reason == "stop"
    embeds, _ = concat_one(model, prompt_rows(specs["qa"]), req.input_ids)
    with torch.no_grad():
        hf = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                            do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert res.token_ids == hf[0].tolist()


def test_stop_strings_and_max_new_tokens():
    model = tiny_llama()
    engine = engine_for(model)
    base = Request("ner", text="patientdenies", max_new_tokens=9)
    free = engine.generate([base])[0]
    assert free.finish_reason == "length" and free.completion_tokens == 9 and len(free.text) == 9
    stop = free.text[3:5]
    cut = free.text.find(stop)
    short, stopped = engine.generate([
        Request("ner", text="patientdenies", max_new_tokens=2),
        Request("ner", text="patientdenies", max_new_tokens=9, stop=("zzzzzz", stop)),
    ])
    assert short.token_ids == free.token_ids[:2] and short.finish_reason == "length"
    assert stopped.text == free.text[:cut] and stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: cut + len(stop)]  # up to the token that completed the stop string
    assert stopped.prompt_tokens == len("patientdenies")


def test_seeded_sampling_is_reproducible():
    model = tiny_gpt_oss()
    engine = engine_for(model)
    sample = lambda seed: Request("cls", input_ids=[4, 8, 15, 16], max_new_tokens=12, temperature=1.5, top_p=0.9, seed=seed)  # noqa: E731
    a = engine.generate([sample(7)])[0]
    b, _, c = engine.generate([sample(7), *mixed_requests(1), sample(8)])  # other requests around it
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert a.token_ids != c.token_ids
    greedy = engine.generate([Request("cls", input_ids=[4, 8, 15, 16], max_new_tokens=12)])[0]
    assert greedy.token_ids != a.token_ids


def test_add_and_remove_tasks_at_run_time(tmp_path):
    model = tiny_llama()
    multi = prompts(model)["ner"][0]
    engine = MultiTaskEngine(model, CharTokenizer(), multi, max_batch_tokens=24, max_running=2, max_seq_len=32)
    assert engine.task_names == ["ner", "qa"]
    ids = [7, 21, 3, 99, 42]
    engine.generate([Request("ner", input_ids=ids, max_new_tokens=4)])
    torch.manual_seed(5)
    new = TaskPrompts(1, 3, 64, init_std=1.0)
    engine.add_task("new", new)
    res = engine.generate([Request("new", input_ids=ids, max_new_tokens=6), Request("qa", input_ids=ids, max_new_tokens=6)])
    assert res[0].token_ids == hf_greedy(model, prompt_rows(new), ids, 6)
    assert res[1].token_ids == hf_greedy(model, prompt_rows((multi, 1)), ids, 6)
    engine.remove_task("qa")
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        engine.generate([Request("qa", input_ids=ids)])
    # a name re-registered with another prompt gets its own prefix K/V
    engine.remove_task("new")
    one = MultitaskPrompt(1, 5, 64, rank=1)
    with torch.no_grad():
        one.prompt_embeddings.normal_(0, 1)
    one.to_peft(tmp_path / "adapter")
    engine.add_task("new", tmp_path / "adapter")
    res = engine.generate([Request("new", input_ids=ids, max_new_tokens=6)])[0]
    assert res.token_ids == hf_greedy(model, prompt_rows(one), ids, 6)
    with pytest.raises(ValueError, match="already registered"):
        engine.add_task("new", new)
    with pytest.raises(ValueError, match="holds 2 tasks"):
        engine.add_task("both", multi)


def test_errors():
    model = tiny_llama()
    engine = engine_for(model, max_batch_tokens=10, max_seq_len=20)
    cases = [
        (Request("nope", input_ids=[5]), "unknown task 'nope'"),
        (Request("ner", input_ids=[]), "empty input"),
        (Request("ner", text=""), "empty input"),
        (Request("ner"), "exactly one of text and input_ids"),
        (Request("ner", input_ids=[5], logprobs=21), "logprobs must be"),
        (Request("ner", input_ids=[5], logprobs=True), "logprobs must be"),
        (Request("ner", input_ids=[5] * 8, max_new_tokens=13), "exceeds max_seq_len"),
        (Request("ner", input_ids=[500]), "token ids must lie in"),
        (Request("ner", input_ids=[5], max_new_tokens=0), "max_new_tokens must be"),
        (Request("ner", input_ids=[5], top_p=0.0), "top_p"),
        (Request("ner", input_ids=[5], stop="x"), "stop must be"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match="request 1: .*" + match):
            engine.generate([Request("qa", input_ids=[5], max_new_tokens=2), bad])
    with pytest.raises(ValueError, match="unknown task"):
        engine.remove_task("nope")
    assert engine.generate([]) == []
    small = engine_for(model, kv_memory=4 * block_bytes(model, 4) / 2**30, block_size=4)
    with pytest.raises(ValueError, match="need 6 K/V blocks but the pool has 4; raise kv_memory"):
        small.generate([Request("ner", input_ids=[5] * 8, max_new_tokens=6)])  # prompt 6 -> 2 blocks, 8 + 6 -> 4
    with pytest.raises(ValueError, match="kv_memory must be a positive"):
        engine_for(model, kv_memory=0)
    with pytest.raises(ValueError, match="holds no block"):
        engine_for(model, kv_memory=1e-9)


def block_bytes(model, block_size):
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * head_dim * 4


def test_smollm2_greedy_matches_hf_generate(tmp_path):
    pytest.importorskip("gguf")
    from mptkern.models import load_default

    try:
        model, tok = load_default(cache_dir=tmp_path)
    except ImportError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    multi = MultitaskPrompt(2, 4, model.config.hidden_size, rank=1, task_names=["triage", "meds"])
    with torch.no_grad():
        multi.prompt_embeddings.normal_(0, 0.05)
    engine = MultiTaskEngine(model, tok, multi, max_batch_tokens=32, max_running=2, max_seq_len=64)
    texts = [("triage", "Patient denies chest pain."), ("meds", "Order: metoprolol 25 mg PO BID. Route:"),
             ("triage", "Fever since yesterday, no cough.")]
    reqs = [Request(task, text=text, max_new_tokens=6) for task, text in texts]
    results = engine.generate(reqs)
    for req, res in zip(reqs, results):
        ids = tok.encode(req.text, add_special_tokens=False)
        embeds, _ = concat_one(model, prompt_rows((multi, multi.task_index(req.task))), ids)
        with attention_implementation(model, "sdpa"), torch.no_grad():
            hf = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                do_sample=False, max_new_tokens=6)
        assert res.token_ids == hf[0].tolist(), req
        assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)


def test_submit_step_cancel_and_streamed_text():
    """The server's way to drive the engine: requests join mid-run and leave by cancel; the streamed
    texts add up to the result's text; outputs equal running each request alone."""
    model = tiny_llama()
    engine = engine_for(model)
    a = Request("ner", text="patientdenies", max_new_tokens=9, stop=("zzzz",))
    b = Request("qa", input_ids=[5, 9, 40], max_new_tokens=9)
    c = Request("cls", text="fever", max_new_tokens=6)
    alone = {id(r): engine.generate([r])[0] for r in (a, c)}
    ra, rb = engine.submit(a, stream=True), engine.submit(b)
    streamed, results = [], {}
    for _ in range(2):
        for u in engine.step():
            streamed += [u.text] if u.request_id == ra else []
            assert u.text == "" or u.request_id == ra  # only streamed requests carry text
    rc = engine.submit(c)  # joins the running batch
    assert engine.num_pending == 3
    with pytest.raises(RuntimeError, match="in flight"):
        engine.generate([c])
    assert engine.cancel(rb) and not engine.cancel(rb)
    while engine.num_pending:
        for u in engine.step():
            assert u.request_id != rb
            streamed += [u.text] if u.request_id == ra else []
            if u.result is not None:
                results[u.request_id] = u.result
    assert results[ra].token_ids == alone[id(a)].token_ids and results[rc].token_ids == alone[id(c)].token_ids
    assert "".join(streamed) == results[ra].text == alone[id(a)].text
    assert engine.step() == [] and engine.generate([b])[0].completion_tokens == 9  # idle again, all slots free
    with pytest.raises(ValueError, match="unknown task"):
        engine.submit(Request("nope", input_ids=[5]))
    assert engine.num_pending == 0


def test_streamed_text_holds_back_unsettled_characters():
    from mptkern.serve.engine import _unsettled

    assert _unsettled("abc", ()) == 0
    assert _unsettled("ab\ufffd\ufffd", ()) == 2  # an incomplete UTF-8 character
    assert _unsettled("pain: wor", ("world", "xyz")) == 3  # may become "world"
    assert _unsettled("pain: w", ("wx", "world")) == 1
    assert _unsettled("ab", ("abcd",)) == 2 and _unsettled("ab", ("b",)) == 0
    assert _unsettled("ok \ufffd", (" \u4f60",)) == 2  # the character may complete the stop string


def test_step_that_raises_puts_admitted_requests_back():
    model = tiny_llama()
    engine = engine_for(model)
    req = Request("qa", input_ids=[5, 9, 40, 77], max_new_tokens=5)
    expected = engine.generate([req])[0].token_ids
    rid = engine.submit(req)
    hook = model.lm_head.register_forward_hook(lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        engine.step()
    hook.remove()
    assert engine.num_pending == 1
    results = [u.result for _ in range(5) for u in engine.step() if u.result is not None]
    assert [r.token_ids for r in results] == [expected] and engine.num_pending == 0 and rid == 1


def test_greedy_pick_takes_the_first_of_tied_maxima():
    """HF greedy search takes argmax, the first index of a tie; the engine's batched pick must agree."""
    engine = engine_for(tiny_llama())
    logits = torch.zeros(3, 1000)
    logits[0, [7, 900]] = 5.0
    logits[1, [2, 3, 999]] = 1.0
    logits[2] = -1.0
    rows = [type("R", (), {"request": Request("ner", input_ids=[5])})()] * 3
    assert engine._sample(logits, rows) == logits.argmax(-1).tolist() == [7, 2, 0]


def test_tokenizer_failing_mid_step_leaves_the_engine_consistent():
    """An exception after the model ran (here the tokenizer, on a streamed request's text) drops
    that request, requeues the unstarted ones, keeps the others running; nothing leaks."""

    class Flaky(CharTokenizer):
        fail = False

        def decode(self, ids, skip_special_tokens=True):
            if self.fail:
                raise RuntimeError("tokenizer failure")
            return super().decode(ids, skip_special_tokens)

    model = tiny_llama()
    tok = Flaky()
    engine = MultiTaskEngine(model, tok, prompts(model), max_batch_tokens=24, max_running=3, max_seq_len=32)
    reqs = [Request("ner", input_ids=[5, 9, 40], max_new_tokens=6), Request("qa", input_ids=[7, 8], max_new_tokens=6),
            Request("cls", input_ids=[4, 4, 4, 4], max_new_tokens=6)]
    alone = [engine.generate([r])[0].token_ids for r in reqs]
    first = engine.submit(reqs[0])
    engine.step()  # reqs[0] is running
    streamed = engine.submit(reqs[1], stream=True)
    last = engine.submit(reqs[2])
    tok.fail = True
    with pytest.raises(RuntimeError, match="tokenizer failure"):
        engine.step()
    tok.fail = False
    assert engine.num_pending == 2 and not engine.cancel(streamed)  # the failing request is gone
    results = {}
    while engine.num_pending:
        results.update((u.request_id, u.result) for u in engine.step() if u.result is not None)
    assert results[first].token_ids == alone[0] and results[last].token_ids == alone[2]
    assert [r.token_ids for r in engine.generate(reqs)] == alone  # all three slots free again


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt_oss], ids=["llama-gqa", "gpt-oss-sinks-window"])
def test_engine_on_the_triton_kernels_matches_hf_generate(make, monkeypatch):
    """What runs on a GPU: the Triton prefill and decode kernels (here in the interpreter) reading the
    engine's head-major slabs and prefix pool through their strides."""
    from mptkern.backends import why_unavailable

    if why_unavailable("triton", torch.device("cpu")):
        pytest.skip(why_unavailable("triton", torch.device("cpu")))
    monkeypatch.setenv("MPTKERN_BACKEND", "triton")
    pa = importlib.import_module("mptkern.ops.prefix_attention")  # the module (mptkern.ops exports the function)
    ran = lambda *a, **k: pytest.fail("the torch path ran")  # noqa: E731 -- prove the torch paths stay unused
    for name in ("_decode_torch", "_decode_torch_paged"):
        monkeypatch.setattr(pa, name, ran)
    monkeypatch.setattr(pa, "TorchPrefixAttention", types.SimpleNamespace(apply=ran))
    model = make()
    specs = prompts(model)
    engine = MultiTaskEngine(model, CharTokenizer(), specs, max_batch_tokens=24, max_running=3, max_seq_len=32)
    reqs = mixed_requests(4, seed=3)
    for req, res in zip(reqs, engine.generate(reqs)):
        assert res.token_ids == hf_greedy(model, prompt_rows(specs[req.task]), req.input_ids, req.max_new_tokens), req


# -- paged K/V ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt_oss], ids=["llama-gqa", "gpt-oss-sinks-window"])
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_block_sizes_and_chunked_prefill_match_hf_generate(make, block_size):
    """Inputs longer than the step's token budget are prefilled in chunks over several steps (each
    chunk attends to the prefix and the earlier chunks, gathered from the pool); any block size."""
    model = make()
    specs = prompts(model)
    engine = MultiTaskEngine(model, CharTokenizer(), specs, max_batch_tokens=8, max_running=3, max_seq_len=48,
                             block_size=block_size)
    g = torch.Generator().manual_seed(4)
    reqs = [Request(t, input_ids=torch.randint(3, 128, (n,), generator=g).tolist(), max_new_tokens=m)
            for t, n, m in [("ner", 23, 5), ("qa", 3, 9), ("cls", 17, 4), ("ner", 9, 7), ("qa", 1, 6)]]
    for req, res in zip(reqs, engine.generate(reqs)):
        assert res.token_ids == hf_greedy(model, prompt_rows(specs[req.task]), req.input_ids, req.max_new_tokens), req
    assert engine.metrics()["kv_blocks_used"] == sum(-(-p.length // block_size) for p in engine.kv.prefixes.values())


def test_a_long_prefill_does_not_stall_decoding_requests():
    model = tiny_llama()
    engine = engine_for(model, max_batch_tokens=6, max_seq_len=64)
    short = engine.submit(Request("ner", input_ids=[5, 6], max_new_tokens=12))
    engine.step()
    long = engine.submit(Request("qa", input_ids=list(range(3, 43)), max_new_tokens=2))
    steps = []
    while long not in steps[-1:]:
        ids = [u.request_id for u in engine.step()]
        assert short in ids  # a token every step while the long input is prefilled beside it
        steps.append(long if long in ids else None)
    assert len(steps) == 8  # 40 input tokens in chunks of 5 (the budget of 6 less the decoding row)


def test_preemption_recomputes_and_loses_nothing():
    """A pool too small for every running request: the newest is preempted when a decoding request
    needs a block, requeued with what it generated, recomputed later; every output equals HF's."""
    model = tiny_llama()
    specs = prompts(model)
    engine = MultiTaskEngine(model, CharTokenizer(), specs, max_batch_tokens=32, max_running=6, max_seq_len=32,
                             block_size=2, kv_memory=24 * block_bytes(model, 2) / 2**30)
    reqs = mixed_requests(12, seed=5) + [Request("ner", input_ids=[9] * 10, max_new_tokens=12)]
    results = engine.generate(reqs)
    m = engine.metrics()
    assert m["preemptions_total"] > 0 and m["kv_blocks_peak"] <= 24
    for req, res in zip(reqs, results):
        assert res.token_ids == hf_greedy(model, prompt_rows(specs[req.task]), req.input_ids, req.max_new_tokens), req
    assert m["generated_tokens_total"] == sum(r.completion_tokens for r in results)
    assert m["prompt_tokens_total"] > sum(r.prompt_tokens for r in results)  # recomputation counted


def test_prefix_blocks_are_shared_reference_counted_and_evicted_lru():
    model = tiny_llama()
    specs = prompts(model)  # prompt lengths: ner/qa 6, cls 4
    engine = MultiTaskEngine(model, CharTokenizer(), specs, max_batch_tokens=32, max_running=8, max_seq_len=24,
                             block_size=4, kv_memory=9 * block_bytes(model, 4) / 2**30)
    for _ in range(4):
        engine.submit(Request("ner", input_ids=[5, 6, 7], max_new_tokens=1))
    engine.step()  # four requests of one task in one step: its 6-token prefix in 2 blocks, once; 1 block each
    assert engine.kv.prefixes["ner"].users == 0 and engine.metrics()["kv_blocks_used"] == 2  # all four finished
    ner_blocks = list(engine.kv.prefixes["ner"].blocks)
    engine.generate([Request("qa", input_ids=[5], max_new_tokens=1)])
    assert set(engine.kv.prefixes) == {"ner", "qa"}  # idle prefixes stay cached
    engine.generate([Request("ner", input_ids=[5], max_new_tokens=1)])  # ner used last: qa is the LRU one
    # cls's prefix (1 block) + 15 + 2 cached tokens (5 blocks) > the 5 blocks not cached: one idle prefix goes, qa's
    res = engine.generate([Request("cls", input_ids=[5] * 15, max_new_tokens=3)])[0]
    assert set(engine.kv.prefixes) == {"ner", "cls"} and engine.kv.prefixes["ner"].blocks == ner_blocks
    assert res.token_ids == hf_greedy(model, prompt_rows(specs["cls"]), [5] * 15, 3)
    again = engine.generate([Request("qa", input_ids=[5, 9], max_new_tokens=4)])[0]  # recomputed
    assert again.token_ids == hf_greedy(model, prompt_rows(specs["qa"]), [5, 9], 4)
    engine.remove_task("qa")
    assert "qa" not in engine.kv.prefixes


def test_logprobs_are_the_models_log_softmax():
    model = tiny_llama()
    specs = prompts(model)
    engine = engine_for(model, specs)
    req = Request("qa", input_ids=[5, 9, 40], max_new_tokens=5, logprobs=3)
    rid = engine.submit(req, stream=True)
    updates = []
    while engine.num_pending:
        updates += [u for u in engine.step() if u.request_id == rid]
    res = updates[-1].result
    embeds, _ = concat_one(model, prompt_rows(specs["qa"]), req.input_ids)
    with attention_implementation(model, "sdpa"), torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             do_sample=False, max_new_tokens=5, eos_token_id=EOS, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    logp = torch.log_softmax(torch.cat(out.logits).float(), -1)
    assert res.token_ids == out.sequences[0].tolist()
    for i, (t, lp, top) in enumerate(zip(res.token_ids, res.logprobs, res.top_logprobs)):
        assert lp == pytest.approx(float(logp[i, t]), abs=1e-5)
        values, ids = logp[i].topk(3)
        assert [tid for tid, _ in top] == ids.tolist() and [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)
        assert top[0][0] == t  # greedy: the chosen token is the most likely
    assert [u.logprob for u in updates] == res.logprobs and [u.top_logprobs for u in updates] == res.top_logprobs
    plain = engine.generate([Request("qa", input_ids=[5, 9, 40], max_new_tokens=5)])[0]
    assert plain.logprobs is None and plain.top_logprobs is None and plain.token_ids == res.token_ids


def test_adapters_carry_their_instructions(tmp_path):
    """An adapter written with instructions formats its text requests as training did, read by
    add_task, by a prompts mapping and by a multi-task adapter directory given whole."""
    from mptkern.data import InputFormat, make_suite
    from mptkern.prompts import read_peft_instructions
    from tests.test_data import word_tokenizer

    suite = make_suite(seed=0, n_train=2, n_eval=1)
    a, b = suite["targets"][:2]
    tok = word_tokenizer(suite, bos=True)
    model = tiny_models.tiny_llama(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    multi = MultitaskPrompt(2, 3, model.config.hidden_size, task_names=[a.name, b.name])
    multi.to_peft(tmp_path / "multi", instructions={a.name: a.instruction, b.name: b.instruction})
    single = TaskPrompts(1, 3, model.config.hidden_size, task_names=[a.name])
    single.to_peft(tmp_path / "one", instructions={a.name: a.instruction})
    single.to_peft(tmp_path / "bare")
    assert read_peft_instructions(tmp_path / "one") == {a.name: a.instruction} and read_peft_instructions(tmp_path / "bare") == {}
    fmt = InputFormat(tok)
    whole = MultiTaskEngine(model, tok, tmp_path / "multi", max_seq_len=128)
    mapped = MultiTaskEngine(model, tok, {"x": tmp_path / "one", "y": tmp_path / "bare"}, max_seq_len=128)
    assert whole.instruction(a.name) == a.instruction and whole.instruction(b.name) == b.instruction
    assert mapped.instruction("x") == a.instruction and mapped.instruction("y") is None
    ex = a.eval[0]
    res = mapped.generate([Request("x", text=ex.input, max_new_tokens=2), Request("y", text=ex.input, max_new_tokens=2)])
    assert res[0].prompt_tokens == len(fmt.source(a.instruction, ex.input)[0])
    assert res[1].prompt_tokens == len(tok(ex.input, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="instructions name tasks"):
        multi.to_peft(tmp_path / "bad", instructions={"nope": "x"})


def test_streamed_text_is_decoded_incrementally():
    """Streamed and stop-string requests decode a window of recent tokens per step, not their whole text."""

    class Counting(CharTokenizer):
        longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return super().decode(ids, skip_special_tokens)

    model = tiny_llama()
    tok = Counting()
    engine = MultiTaskEngine(model, tok, prompts(model), max_batch_tokens=24, max_running=3, max_seq_len=64)
    rid = engine.submit(Request("ner", input_ids=[5, 6], max_new_tokens=40, stop=("zzzzzzzz",)), stream=True)
    texts, result = [], None
    while engine.num_pending:
        for u in engine.step():
            texts.append(u.text)
            result = u.result or result
    assert result.completion_tokens == 40 and tok.longest <= 2
    assert "".join(texts) == result.text == CharTokenizer().decode(result.token_ids)
