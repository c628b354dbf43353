"""OpenAI-compatible server over MultiTaskEngine: loopback only, tiny random Llama, bounded loops.

Driven with the official ``openai`` client, raw ``httpx`` and ``http.client`` (for byte-level SSE and
disconnects), and ``hypothesis`` for malformed bodies.
"""

import asyncio
import contextlib
import http.client
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from mptkern.serve import MultiTaskEngine, Request, Server, protocol  # noqa: E402
from tests.test_engine import CharTokenizer, prompts, tiny_llama  # noqa: E402

TIMEOUT = 30


class ChatTokenizer(CharTokenizer):
    """CharTokenizer with a chat template: each message is its role's initial and its content, and
    the generation prompt is 'a' (all lowercase letters, so every rendered chat encodes)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        return "".join(m["role"][0] + m["content"] for m in messages) + ("a" if add_generation_prompt else "")


def make_engine(**kw):
    model = tiny_llama()
    kw = {"max_batch_tokens": 64, "max_running": 8, "max_seq_len": 48, **kw}
    return MultiTaskEngine(model, ChatTokenizer(), prompts(model), **kw)


@pytest.fixture(scope="module")
def engine():
    return make_engine()


@contextlib.contextmanager
def serving(engine, **kw):
    """A started server and an openai client on it (no retries: every answer is seen as it is)."""
    srv = Server(engine, port=0, **{"max_queue": 64, "max_body": 4096, **kw}).start()
    try:
        yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
    finally:
        srv.shutdown(drain_timeout=5)


def raw(srv, path="/v1/completions", body=None, *, content=None, method="POST", headers=None):
    """One request with httpx; never raises on HTTP errors."""
    kw = {"json": body} if content is None and body is not None else {"content": content}
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        return c.request(method, path, headers={"content-type": "application/json", **(headers or {})}, **kw)


def error_of(response, status):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"], err
    return err


def sse_events(text):
    """The data payloads of an SSE body, checking the framing: ``data: ...`` blocks, [DONE] last."""
    blocks = text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]", text[-200:]
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [json.loads(b[len("data: "):]) for b in blocks[:-2]]


def gate_steps(engine, monkeypatch):
    """Make the engine thread wait for a permit before every engine step; returns (permits, steps run)."""
    permits, steps = threading.Semaphore(0), []
    real = engine.step

    def gated():
        assert permits.acquire(timeout=TIMEOUT)
        steps.append(engine.num_pending)
        return real()

    monkeypatch.setattr(engine, "step", gated)
    return permits, steps


def wait_until(cond, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- answers equal the engine's -----------------------------------------------------------------------
def test_completions_match_engine(engine):
    cases = [
        (dict(model="ner", prompt="patientdenies", max_tokens=7, temperature=0),
         Request("ner", text="patientdenies", max_new_tokens=7)),
        (dict(model="cls", prompt="fever", max_tokens=5, temperature=1.3, top_p=0.9, seed=11),
         Request("cls", text="fever", max_new_tokens=5, temperature=1.3, top_p=0.9, seed=11)),
        (dict(model="qa", prompt="cough", max_tokens=9, temperature=0, stop=["zz", "q"]),
         Request("qa", text="cough", max_new_tokens=9, stop=("zz", "q"))),
        (dict(model="qa", prompt=[5, 6, 7], max_tokens=4, temperature=0),  # token ids
         Request("qa", input_ids=[5, 6, 7], max_new_tokens=4)),
        (dict(model="ner", prompt="abc"),  # defaults: max_tokens 16, temperature 1 (seeded here)
         None),
    ]
    expected = engine.generate([r for _, r in cases if r is not None])
    with serving(engine) as (srv, client):
        for (body, _), exp in zip(cases, expected):
            out = client.completions.create(**body)
            assert out.object == "text_completion" and out.model == body["model"]
            assert out.id.startswith("cmpl-") and isinstance(out.created, int)
            assert len(out.choices) == 1 and out.choices[0].index == 0 and out.choices[0].logprobs is None
            assert out.choices[0].text == exp.text and out.choices[0].finish_reason == exp.finish_reason
            assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
                exp.prompt_tokens, exp.completion_tokens, exp.prompt_tokens + exp.completion_tokens)
        raw_answer = raw(srv, body=cases[0][0]).json()
        assert protocol.CompletionResponse.model_validate(raw_answer).choices[0].text == expected[0].text
        # a single-string stop works like a one-element list
        assert client.completions.create(**{**cases[2][0], "stop": "q"}).choices[0].text == expected[2].text
        default = client.completions.create(**cases[4][0], seed=5)
        assert default.usage.completion_tokens == 16 or default.choices[0].finish_reason == "stop"


def test_list_prompts_n_and_seeds(engine):
    """One choice per prompt x n, indexed prompt-major; sample j of a prompt uses seed + j."""
    prompts_, n, seed = ["fever", "cough"], 2, 40
    reqs = [Request("cls", text=p, max_new_tokens=6, temperature=1.0, seed=seed + j) for p in prompts_ for j in range(n)]
    expected = engine.generate(reqs)
    greedy = engine.generate([Request("cls", text="fever", max_new_tokens=6)])[0]
    with serving(engine) as (srv, client):
        out = client.completions.create(model="cls", prompt=prompts_, n=n, max_tokens=6, temperature=1.0, seed=seed)
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        assert [c.text for c in out.choices] == [e.text for e in expected]
        assert out.choices[0].text != out.choices[1].text  # different seeds, different samples
        # prompt tokens count once per prompt, completion tokens once per choice
        assert out.usage.prompt_tokens == expected[0].prompt_tokens + expected[2].prompt_tokens
        assert out.usage.completion_tokens == sum(e.completion_tokens for e in expected)
        again = client.completions.create(model="cls", prompt="fever", n=n, max_tokens=6, temperature=1.0, seed=seed)
        assert [c.text for c in again.choices] == [e.text for e in expected[:2]]  # same seed, same text, alone or in a list
        copies = client.completions.create(model="cls", prompt="fever", n=3, max_tokens=6, temperature=0)
        assert [c.text for c in copies.choices] == [greedy.text] * 3


def test_logprobs_completions(engine):
    exp = engine.generate([Request("ner", text="patientdenies", max_new_tokens=6, logprobs=3)])[0]
    name = lambda t: engine.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    with serving(engine) as (srv, client):
        out = client.completions.create(model="ner", prompt="patientdenies", max_tokens=6, temperature=0, logprobs=3)
        lp = out.choices[0].logprobs
        assert lp.tokens == [name(t) for t in exp.token_ids]
        assert lp.token_logprobs == pytest.approx(exp.logprobs)
        assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(lp.tokens))]
        for top, pairs, token, token_lp in zip(lp.top_logprobs, exp.top_logprobs, exp.token_ids, exp.logprobs):
            want = {}
            for t, p in pairs:
                want.setdefault(name(t), p)
            want.setdefault(name(token), token_lp)  # the sampled token is always listed
            assert top == pytest.approx(want)
            assert max(top.values()) == pytest.approx(pairs[0][1])
        # the streamed chunks' logprobs add up to the same lists
        tokens, lps = [], []
        for chunk in client.completions.create(model="ner", prompt="patientdenies", max_tokens=6, temperature=0,
                                               logprobs=3, stream=True):
            if chunk.choices and chunk.choices[0].logprobs is not None:
                tokens += chunk.choices[0].logprobs.tokens
                lps += chunk.choices[0].logprobs.token_logprobs
        assert tokens == lp.tokens and lps == pytest.approx(lp.token_logprobs)
        zero = client.completions.create(model="ner", prompt="patientdenies", max_tokens=2, temperature=0, logprobs=0)
        assert [list(d) for d in zero.choices[0].logprobs.top_logprobs] == [[t] for t in lp.tokens[:2]]


def test_chat_matches_engine(engine):
    messages = [{"role": "system", "content": "brief"}, {"role": "user", "content": [{"type": "text", "text": "fe"},
                                                                                      {"type": "text", "text": "ver"}]}]
    text = ChatTokenizer().apply_chat_template([{"role": "system", "content": "brief"},
                                                {"role": "user", "content": "fever"}],
                                               add_generation_prompt=True)
    exp, sampled = engine.generate([Request("qa", text=text, max_new_tokens=8),
                                    Request("qa", text=text, max_new_tokens=8, temperature=1.0, seed=3)])
    with serving(engine) as (srv, client):
        out = client.chat.completions.create(model="qa", messages=messages, max_tokens=8, temperature=0, user="u1")
        assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "qa"
        assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == exp.text
        assert out.choices[0].finish_reason == exp.finish_reason and out.choices[0].logprobs is None
        assert out.usage.prompt_tokens == exp.prompt_tokens and out.usage.completion_tokens == exp.completion_tokens
        answer = raw(srv, "/v1/chat/completions", {"model": "qa", "messages": messages, "max_tokens": 8, "temperature": 0})
        assert protocol.ChatCompletionResponse.model_validate(answer.json()).choices[0].message.content == exp.text
        # max_completion_tokens is max_tokens; seeds as in completions
        out = client.chat.completions.create(model="qa", messages=messages, max_completion_tokens=8, seed=3)
        assert out.choices[0].message.content == sampled.text
        chunks = list(client.chat.completions.create(model="qa", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
        assert all(c.choices[0].delta.role is None for c in chunks[1:])
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == exp.text
        assert [c.choices[0].finish_reason for c in chunks][-1] == exp.finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_logprobs(engine):
    text = ChatTokenizer().apply_chat_template([{"role": "user", "content": "abc"}], add_generation_prompt=True)
    exp = engine.generate([Request("ner", text=text, max_new_tokens=5, logprobs=2)])[0]
    name = lambda t: engine.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    with serving(engine) as (srv, client):
        out = client.chat.completions.create(model="ner", messages=[{"role": "user", "content": "abc"}], max_tokens=5,
                                             temperature=0, logprobs=True, top_logprobs=2)
        content = out.choices[0].logprobs.content
        assert [c.token for c in content] == [name(t) for t in exp.token_ids]
        assert [c.logprob for c in content] == pytest.approx(exp.logprobs)
        assert all(c.bytes == list(c.token.encode()) for c in content)
        for c, pairs in zip(content, exp.top_logprobs):
            assert [(t.token, t.logprob) for t in c.top_logprobs] == [(name(t), pytest.approx(p)) for t, p in pairs]
        plain = client.chat.completions.create(model="ner", messages=[{"role": "user", "content": "abc"}], max_tokens=5,
                                               temperature=0, logprobs=True)
        assert [c.top_logprobs for c in plain.choices[0].logprobs.content] == [[]] * 5


# -- streaming ------------------------------------------------------------------------------------------
def test_stream_sse_framing_and_usage(engine):
    exp = engine.generate([Request("qa", text="abdominalpain", max_new_tokens=6)])[0]
    body = {"model": "qa", "prompt": "abdominalpain", "max_tokens": 6, "temperature": 0, "stream": True}
    with serving(engine) as (srv, client):
        r = raw(srv, body=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(r.text)
        assert "".join(c["choices"][0]["text"] for c in chunks) == exp.text
        assert all(c["object"] == "text_completion" and c["model"] == "qa" and "usage" not in c for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [exp.finish_reason]
        r = raw(srv, body={**body, "stream_options": {"include_usage": True}})
        chunks = sse_events(r.text)
        *text_chunks, last = chunks
        assert all(c["usage"] is None and len(c["choices"]) == 1 for c in text_chunks)
        assert last["choices"] == [] and last["usage"] == {"prompt_tokens": exp.prompt_tokens, "completion_tokens":
                                                            exp.completion_tokens, "total_tokens": exp.prompt_tokens
                                                            + exp.completion_tokens}
        # through the official client: the same text and the usage chunk
        streamed = list(client.completions.create(**{k: v for k, v in body.items() if k != "stream"}, stream=True,
                                                  stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in streamed if c.choices) == exp.text
        assert streamed[-1].usage.completion_tokens == exp.completion_tokens
        # n x prompts streamed: every choice's chunks add up to its text
        reqs = [Request("ner", text=p, max_new_tokens=5, temperature=1.0, seed=7 + j) for p in ("ab", "cd") for j in (0, 1)]
        r = raw(srv, body={"model": "ner", "prompt": ["ab", "cd"], "n": 2, "max_tokens": 5, "seed": 7, "stream": True})
        texts = ["", "", "", ""]
        for c in sse_events(r.text):
            texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
    assert texts == [e.text for e in engine.generate(reqs)]


def test_stream_is_incremental(engine, monkeypatch):
    """Each engine step's text reaches the client before the next step runs."""
    exp = engine.generate([Request("ner", text="patientdenies", max_new_tokens=5)])[0]
    assert exp.finish_reason == "length" and len(exp.text) == 5  # one character per token
    with serving(engine) as (srv, _):
        permits, _ = gate_steps(engine, monkeypatch)
        host, port = srv.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        try:
            conn.request("POST", "/v1/completions", json.dumps({"model": "ner", "prompt": "patientdenies", "max_tokens": 5,
                                                                "temperature": 0, "stream": True}),
                         {"Content-Type": "application/json"})
            permits.release()
            resp = conn.getresponse()
            assert resp.status == 200
            for i in range(5):
                if i:
                    permits.release()
                line, blank = resp.readline(), resp.readline()
                assert line.startswith(b"data: ") and blank == b"\n", (line, blank)
                chunk = json.loads(line[len(b"data: "):])
                assert chunk["choices"][0]["text"] == exp.text[i]
                assert chunk["choices"][0]["finish_reason"] == (None if i < 4 else "length")
                if i < 4:
                    assert engine.num_pending == 1  # still generating: the text came before the end
            assert resp.readline() == b"data: [DONE]\n"
        finally:
            conn.close()
            permits.release(100)


def test_stream_holds_back_a_possible_stop_string(engine):
    free = engine.generate([Request("qa", text="cough", max_new_tokens=9)])[0]
    stop = free.text[4:6]  # a stop string that completes at the sixth token or earlier
    stops = [stop, free.text[1] + "zz"]
    exp = engine.generate([Request("qa", text="cough", max_new_tokens=9, stop=tuple(stops))])[0]
    with serving(engine) as (srv, _):
        chunks = sse_events(raw(srv, body={"model": "qa", "prompt": "cough", "max_tokens": 9, "temperature": 0,
                                           "stop": stops, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == exp.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any(stop in c["choices"][0]["text"] for c in chunks)


# -- models, health, metrics --------------------------------------------------------------------------
def metrics(srv):
    """(sample name, sorted labels) -> value, parsed from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    r = raw(srv, "/metrics", method="GET")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_models_health_metrics(engine):
    with serving(engine) as (srv, client):
        assert [m.id for m in client.models.list().data] == engine.task_names == ["ner", "qa", "cls"]
        assert all(m.object == "model" for m in client.models.list().data)
        health = raw(srv, "/health", method="GET")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["tasks"] == 3
        before = metrics(srv)
        client.completions.create(model="ner", prompt="abc", max_tokens=4, temperature=0)
        error_of(raw(srv, body={"model": "ner"}), 400)
        tokens = ("mptkern_generated_tokens_total", ())
        wait_until(lambda: metrics(srv)[tokens] >= before[tokens] + 4)
        after = metrics(srv)
        ok = ("mptkern_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
        bad = ("mptkern_http_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))
        assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
        assert after[("mptkern_prompt_tokens_total", ())] >= before[("mptkern_prompt_tokens_total", ())] + 3
        assert after[("mptkern_kv_blocks_total", ())] == engine.metrics()["kv_blocks_total"] > 0
        for gauge in ("mptkern_queue_depth", "mptkern_requests_running", "mptkern_kv_blocks_used",
                      "mptkern_preemptions_total"):
            assert (gauge, ()) in after


def test_metrics_report_queue_and_running(engine, monkeypatch):
    with serving(engine, max_batch=1) as (srv, client):
        permits, _ = gate_steps(engine, monkeypatch)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(client.completions.create, model="ner", prompt="abc", max_tokens=2, temperature=0)
                       for _ in range(3)]
            wait_until(lambda: srv.active == 1 and srv.queued == 2)
            try:
                m = metrics(srv)  # one waits in the engine for its first step
                gauge = lambda name: m[(f"mptkern_{name}", ())]  # noqa: E731
                assert (gauge("server_queued"), gauge("queue_depth"), gauge("requests_running")) == (2, 3, 0)
                tokens = gauge("generated_tokens_total")
                permits.release()  # its first step: prefill and one token; the second step waits
                wait_until(lambda: metrics(srv)[("mptkern_generated_tokens_total", ())] == tokens + 1)
                m = metrics(srv)
                assert (gauge("server_queued"), gauge("queue_depth"), gauge("requests_running")) == (2, 2, 1)
                assert gauge("kv_blocks_used") >= 1
            finally:
                permits.release(100)
            assert all(f.result(TIMEOUT).choices[0].finish_reason for f in futures)


# -- errors ---------------------------------------------------------------------------------------------
def test_client_errors(engine):
    ok = {"model": "ner", "prompt": "abc", "max_tokens": 2}
    chat = {"model": "ner", "messages": [{"role": "user", "content": "abc"}], "max_tokens": 2}
    cases = [  # (body or raw bytes, path, status, param, message part)
        (b"{not json", None, 400, None, "malformed JSON"),
        (b"\xff\xfe", None, 400, None, ""),
        (["a list"], None, 400, None, "JSON object"),
        (b"", None, 400, None, "JSON object"),
        ({"prompt": "abc"}, None, 400, "model", "required"),
        ({**ok, "model": "nope"}, None, 404, "model", "does not exist"),
        ({"model": "ner"}, None, 400, "prompt", "required"),
        ({**ok, "prompt": ""}, None, 400, "prompt", "'prompt'"),
        ({**ok, "prompt": 5}, None, 400, "prompt", "'prompt'"),
        ({**ok, "prompt": [[]]}, None, 400, "prompt", "'prompt'"),
        ({**ok, "max_tokens": 0}, None, 400, "max_tokens", "greater than or equal to 1"),
        ({**ok, "max_tokens": "3"}, None, 400, "max_tokens", "valid integer"),
        ({**ok, "temperature": -1}, None, 400, "temperature", ""),
        ({**ok, "temperature": 2.5}, None, 400, "temperature", ""),
        ({**ok, "temperature": True}, None, 400, "temperature", ""),
        ({**ok, "top_p": 0}, None, 400, "top_p", ""),
        ({**ok, "top_p": 1.5}, None, 400, "top_p", ""),
        ({**ok, "seed": "x"}, None, 400, "seed", ""),
        ({**ok, "seed": 2**64}, None, 400, "seed", ""),
        ({**ok, "stop": [1]}, None, 400, "stop", "'stop'"),
        ({**ok, "stop": ""}, None, 400, "stop", "non-empty"),
        ({**ok, "stop": ["a"] * 17}, None, 400, "stop", "at most"),
        ({**ok, "stream": "yes"}, None, 400, "stream", "boolean"),
        ({**ok, "n": 0}, None, 400, "n", ""),
        ({**ok, "n": 129}, None, 400, "n", ""),
        ({**ok, "n": 65}, None, 400, "n", "queues 64 at most"),  # more choices than the queue holds
        ({**ok, "logprobs": 21}, None, 400, "logprobs", ""),
        ({**ok, "stream_options": {"include_usage": True}}, None, 400, "stream_options", "'stream': true"),
        ({**ok, "stream": True, "stream_options": {"continuous_usage_stats": True}}, None, 400,
         "stream_options.continuous_usage_stats", "unsupported field"),
        # fields OpenAI defines that this server does not implement
        ({**ok, "logit_bias": {"5": 10}}, None, 400, "logit_bias", "not supported"),
        ({**ok, "presence_penalty": 0.5}, None, 400, "presence_penalty", "not supported"),
        ({**ok, "frequency_penalty": -1}, None, 400, "frequency_penalty", "not supported"),
        ({**ok, "best_of": 3}, None, 400, "best_of", "not supported"),
        ({**ok, "suffix": "x"}, None, 400, "suffix", "not supported"),
        ({**ok, "echo": True}, None, 400, "echo", "not supported"),
        ({**ok, "foo": 1}, None, 400, "foo", "unsupported field"),
        ({**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "/v1/chat/completions", 400, "tools",
         "not supported"),
        ({**chat, "response_format": {"type": "json_object"}}, "/v1/chat/completions", 400, "response_format", ""),
        ({**chat, "top_logprobs": 2}, "/v1/chat/completions", 400, "top_logprobs", "needs 'logprobs'"),
        ({**chat, "max_tokens": 2, "max_completion_tokens": 3}, "/v1/chat/completions", 400, "max_tokens", ""),
        ({**chat, "messages": []}, "/v1/chat/completions", 400, "messages", ""),
        ({**chat, "messages": [{"role": "tool", "content": "x"}]}, "/v1/chat/completions", 400, "messages.0.role", ""),
        ({**chat, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "/v1/chat/completions", 400,
         "messages.0.tool_calls", "unsupported field"),
        ({**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "/v1/chat/completions", 400, "messages.0.content", ""),
        ({**chat, "prompt": "abc"}, "/v1/chat/completions", 400, "prompt", "unsupported field"),
        # the engine's refusals
        ({**ok, "max_tokens": 100}, None, 400, None, "exceeds max_seq_len"),
        ({**ok, "prompt": "a" * 60}, None, 400, None, "exceeds max_seq_len"),
        ({**ok, "prompt": [500]}, None, 400, None, "token ids"),
        ({**ok, "prompt": "ABC"}, None, 400, None, "token ids"),  # CharTokenizer: no id for capitals
    ]
    with serving(engine, max_body=1024) as (srv, client):
        for body, path, status, param, match in cases:
            if isinstance(body, bytes):
                r = raw(srv, path or "/v1/completions", content=body)
            else:
                r = raw(srv, path or "/v1/completions", body)
            err = error_of(r, status)
            assert err["param"] == param and match in err["message"], (body, err)
        err = error_of(raw(srv, content=json.dumps({**ok, "prompt": "a" * 2000}).encode()), 413)
        assert "exceeds the limit" in err["message"]
        # the JSON parser takes NaN; the models refuse it
        nan = raw(srv, content=b'{"model": "ner", "prompt": "a", "temperature": NaN}')
        assert error_of(nan, 400)["param"] == "temperature"
        # a body sent as text/plain is still JSON
        assert raw(srv, content=json.dumps(ok).encode(), headers={"content-type": "text/plain"}).status_code == 200
        err = error_of(raw(srv, "/v1/nothing", method="GET"), 404)
        assert err["code"] == "not_found"
        err = error_of(raw(srv, "/v1/models", ok), 405)
        assert "not allowed" in err["message"]
        error_of(raw(srv, "/v1/completions", method="GET"), 405)
        # through the official client: its exception classes carry the status and our error body
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="nope", prompt="abc")
        assert info.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="ner", prompt="abc", temperature=5)
        assert info.value.body["param"] == "temperature"
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="ner", messages=[{"role": "user", "content": "abc"}], presence_penalty=1)
        assert info.value.body["param"] == "presence_penalty"
        # neutral values of unimplemented fields are accepted, as the official client may send them
        out = client.chat.completions.create(model="ner", messages=[{"role": "user", "content": "abc"}], max_tokens=2,
                                             presence_penalty=0, frequency_penalty=0, logit_bias={}, tools=[],
                                             tool_choice="none", response_format={"type": "text"}, store=False)
        assert out.choices[0].finish_reason
        assert client.completions.create(model="ner", prompt="abc", max_tokens=2, best_of=1, echo=False).choices
        assert raw(srv, body=ok).status_code == 200  # still fine afterwards


def test_chat_template_errors(engine):
    class NoTemplate(CharTokenizer):
        def apply_chat_template(self, *a, **k):
            raise ValueError("tokenizer.chat_template is not set")

    model = tiny_llama()
    plain = MultiTaskEngine(model, CharTokenizer(), prompts(model), max_batch_tokens=64, max_running=8, max_seq_len=48)
    none = MultiTaskEngine(model, NoTemplate(), prompts(model), max_batch_tokens=64, max_running=8, max_seq_len=48)
    body = {"model": "ner", "messages": [{"role": "user", "content": "abc"}]}
    for eng, match in ((plain, "no chat template"), (none, "chat_template is not set")):
        with serving(eng) as (srv, _):
            err = error_of(raw(srv, "/v1/chat/completions", body), 400)
            assert err["param"] == "messages" and match in err["message"]


def test_queue_full_is_429_with_retry_after(engine, monkeypatch):
    with serving(engine, max_queue=2, max_batch=1, retry_after=3) as (srv, client):
        permits, _ = gate_steps(engine, monkeypatch)
        body = {"model": "ner", "prompt": "abc", "max_tokens": 2, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(raw, srv, "/v1/completions", body)  # in the engine, its step waiting for a permit
            wait_until(lambda: srv.active == 1)
            queued = pool.submit(raw, srv, "/v1/completions", {**body, "prompt": ["ab", "cd"]})  # two choices: full
            wait_until(lambda: srv.queued == 2)
            r = raw(srv, body=body)
            err = error_of(r, 429)
            assert r.headers["retry-after"] == "3" and err["type"] == "rate_limit_error" and err["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                client.completions.create(**body)
            permits.release(20)
            assert running.result(TIMEOUT).status_code == 200 and queued.result(TIMEOUT).status_code == 200
        permits.release(20)
        assert raw(srv, body=body).status_code == 200  # room again


def test_bad_request_fails_alone(engine, monkeypatch):
    """An engine-refused request among queued ones gets its 400 alone; the others are answered."""
    with serving(engine, max_queue=8) as (srv, _):
        permits, _ = gate_steps(engine, monkeypatch)
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(raw, srv, "/v1/completions", {"model": "ner", "prompt": "abc", "max_tokens": 2})
            wait_until(lambda: srv.active)
            bodies = [{"model": "qa", "prompt": "abc", "max_tokens": 3},
                      {"model": "qa", "prompt": ["abc", "b" * 50], "max_tokens": 3},  # its second prompt is too long
                      {"model": "cls", "prompt": "de", "max_tokens": 2, "stream": True}]
            futures = [pool.submit(raw, srv, "/v1/completions", b) for b in bodies]
            wait_until(lambda: srv.queued == 4)  # queued while the engine thread waits in a step
            permits.release(40)
            assert first.result(TIMEOUT).status_code == 200
            answers = [f.result(TIMEOUT) for f in futures]
        assert [a.status_code for a in answers] == [200, 400, 200]
        assert "choice 1" in error_of(answers[1], 400)["message"]
        sse_events(answers[2].text)
        wait_until(lambda: engine.num_pending == 0)  # the refused request's first choice left the engine too


def test_engine_crash_is_500_and_server_survives(engine, monkeypatch):
    with serving(engine) as (srv, client):
        real = engine.step
        monkeypatch.setattr(engine, "step", lambda: 1 / 0)
        err = error_of(raw(srv, body={"model": "ner", "prompt": "abc", "max_tokens": 2}), 500)
        assert err["type"] == "server_error" and "ZeroDivisionError" in err["message"]
        wait_until(lambda: engine.num_pending == 0)  # the failed request left the engine
        r = raw(srv, body={"model": "ner", "prompt": "abc", "max_tokens": 2, "stream": True})
        assert r.status_code == 200  # the stream had started: the error is its last event
        blocks = r.text.split("\n\n")
        assert blocks[-2] == "data: [DONE]" and json.loads(blocks[-3][6:])["error"]["type"] == "server_error"
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="ner", prompt="abc", max_tokens=2)
        monkeypatch.setattr(engine, "step", real)
        assert client.completions.create(model="ner", prompt="abc", max_tokens=2).choices[0].finish_reason
        assert raw(srv, "/health", method="GET").status_code == 200


def test_engine_refusing_a_request_unexpectedly_is_500_alone(engine, monkeypatch):
    real = engine.submit

    def flaky(request, **kw):
        if request.text == "boom":
            raise RuntimeError("tokenizer failure")
        return real(request, **kw)

    with serving(engine) as (srv, _):
        monkeypatch.setattr(engine, "submit", flaky)
        err = error_of(raw(srv, body={"model": "ner", "prompt": "boom", "max_tokens": 2}), 500)
        assert "tokenizer failure" in err["message"]
        assert raw(srv, body={"model": "ner", "prompt": "abc", "max_tokens": 2}).status_code == 200


# -- disconnects and shutdown ---------------------------------------------------------------------------
def _open(srv, body):
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn


def step_until_idle(engine, srv, permits, steps):
    """Release the gated steps one at a time (giving the server time to see the closed socket) until
    the engine is empty; the 40-token request must have left well before its end."""
    for _ in range(39):
        if engine.num_pending == 0:
            break
        permits.release()
        time.sleep(0.05)
    wait_until(lambda: engine.num_pending == 0 and not srv.active)
    assert len(steps) < 20, f"the request ran {len(steps)} steps after its client left"


def test_client_leaving_a_stream_frees_its_slot(engine, monkeypatch):
    with serving(engine) as (srv, _):
        permits, steps = gate_steps(engine, monkeypatch)
        conn = _open(srv, {"model": "cls", "prompt": "abc", "max_tokens": 40, "temperature": 0, "stream": True})
        permits.release()
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")
        resp.close()
        conn.close()
        step_until_idle(engine, srv, permits, steps)
        permits.release(100)


def test_client_leaving_a_plain_request_frees_its_slot(engine, monkeypatch):
    with serving(engine) as (srv, _):
        permits, steps = gate_steps(engine, monkeypatch)
        conn = _open(srv, {"model": "cls", "prompt": "abc", "max_tokens": 40, "temperature": 0})
        permits.release()
        wait_until(lambda: steps)  # running in the engine
        conn.close()
        step_until_idle(engine, srv, permits, steps)
        # one still waiting in the queue leaves it too
        monkeypatch.setattr(srv._worker, "max_batch", 0)
        conn = _open(srv, {"model": "cls", "prompt": "abc", "max_tokens": 4})
        wait_until(lambda: srv.queued == 1)
        conn.close()
        wait_until(lambda: srv.queued == 0)
        permits.release(100)


def test_graceful_shutdown_answers_every_accepted_request(engine, monkeypatch):
    srv = Server(engine, port=0, max_queue=16, max_batch=2, drain_timeout=20).start()
    permits, _ = gate_steps(engine, monkeypatch)
    bodies = [{"model": "ner", "prompt": "abc", "max_tokens": 3, "temperature": 0},
              {"model": "qa", "prompt": "abd", "max_tokens": 4, "temperature": 0, "stream": True},
              {"model": "cls", "prompt": "abe", "max_tokens": 2, "temperature": 0},
              {"model": "cls", "prompt": ["ab", "cd"], "max_tokens": 2, "temperature": 0, "stream": True}]
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(raw, srv, "/v1/completions", bodies[0])]
            wait_until(lambda: srv.active == 1)  # in the engine, its first step waiting for a permit
            futures += [pool.submit(raw, srv, "/v1/completions", b) for b in bodies[1:]]
            wait_until(lambda: srv.queued == 4)
            stopper = pool.submit(srv.shutdown)
            wait_until(lambda: not srv.accepting)
            r = raw(srv, body=bodies[0])  # new requests are refused while it drains
            assert error_of(r, 503)["code"] == "shutting_down" and r.headers["retry-after"] == "1"
            error_of(raw(srv, "/health", method="GET"), 503)
            permits.release(100)
            answers = [f.result(TIMEOUT) for f in futures]
            stopper.result(TIMEOUT)
        assert [a.status_code for a in answers] == [200] * 4
        assert answers[0].json()["choices"][0]["finish_reason"] and answers[2].json()["choices"][0]["finish_reason"]
        for a in (answers[1], answers[3]):
            assert all(c["choices"][0]["finish_reason"] is None or c["choices"][0]["finish_reason"] in ("stop", "length")
                       for c in sse_events(a.text))
        assert engine.num_pending == 0
        with pytest.raises(httpx.ConnectError):
            raw(srv, body=bodies[0])  # stopped
    finally:
        permits.release(100)
        srv.shutdown(drain_timeout=0)


def test_shutdown_after_drain_timeout_answers_503(engine, monkeypatch):
    srv = Server(engine, port=0, max_queue=16, max_batch=1).start()
    permits, _ = gate_steps(engine, monkeypatch)  # no step ever runs
    try:
        with ThreadPoolExecutor(3) as pool:
            plain = pool.submit(raw, srv, "/v1/completions", {"model": "ner", "prompt": "abc", "max_tokens": 3})
            wait_until(lambda: srv.active == 1)
            queued = pool.submit(raw, srv, "/v1/completions", {"model": "ner", "prompt": "abd", "max_tokens": 3})
            wait_until(lambda: srv.queued == 1)
            t0 = time.monotonic()
            stopper = pool.submit(srv.shutdown, drain_timeout=0.5)
            wait_until(lambda: not srv._worker.thread.is_alive() or time.monotonic() - t0 > 1.5)
            permits.release(100)  # the engine thread is stuck in the step: let it return
            for f in (plain, queued):
                err = error_of(f.result(TIMEOUT), 503)
                assert "shut" in err["message"]
            stopper.result(TIMEOUT)
        assert engine.num_pending == 0
    finally:
        permits.release(100)
        srv.shutdown(drain_timeout=0)


def test_request_timeout_is_504_and_cancels(engine, monkeypatch):
    with serving(engine, request_timeout=0.5) as (srv, _):
        permits, _ = gate_steps(engine, monkeypatch)  # no step runs until the end
        try:
            # admitted (the stream starts with its role chunk), then no token comes
            r = raw(srv, "/v1/chat/completions", {"model": "ner", "messages": [{"role": "user", "content": "abc"}],
                                                  "max_tokens": 3, "stream": True})
            events = r.text.split("\n\n")
            assert r.status_code == 200 and json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"
            assert json.loads(events[-3][6:])["error"]["type"] == "timeout_error" and events[-2] == "data: [DONE]"
            # queued behind the engine thread's blocked step: a plain 504
            err = error_of(raw(srv, body={"model": "ner", "prompt": "abc", "max_tokens": 3}), 504)
            assert err["type"] == "timeout_error"
        finally:
            permits.release(100)
        wait_until(lambda: engine.num_pending == 0 and not srv.active)  # both left the engine


# -- load -----------------------------------------------------------------------------------------------
def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


LOAD_N = 1000
LOAD_CLIENTS = 20
RSS_BOUND_MIB = 32


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for RSS")
def test_load_1000_concurrent_streams():
    """LOAD_N concurrent requests over loopback, three rounds: non-streamed, streamed (with the first,
    the warm-up) and streamed again (measured). Every request is answered exactly once (one [DONE],
    one finish per stream; the server counts 3 x LOAD_N answers), the non-streamed texts equal
    engine.generate, each streamed text equals its non-streamed one, and RSS grows less than
    RSS_BOUND_MIB over the measured round."""
    engine = make_engine(max_batch_tokens=512, max_running=64, max_seq_len=24)
    tasks, letters = ["ner", "qa", "cls"], "abcdefghijklmnop"
    bodies = [{"model": tasks[i % 3], "prompt": letters[i % 11: i % 11 + 1 + i % 5], "max_tokens": 1 + i % 4,
               "temperature": 0} for i in range(LOAD_N)]
    expected = [r.text for r in engine.generate([Request(b["model"], text=b["prompt"], max_new_tokens=b["max_tokens"])
                                                 for b in bodies])]

    async def one(client, body, stream):
        t0 = time.perf_counter()
        if not stream:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"], time.perf_counter() - t0
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            data = (await r.aread()).decode()
        chunks = sse_events(data)  # exactly one [DONE], at the end
        assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1
        return "".join(c["choices"][0]["text"] for c in chunks), time.perf_counter() - t0

    async def round_(srv, stream):
        """Every body at once, over LOAD_CLIENTS clients (httpx's pool slows down with its size)."""
        per = -(-LOAD_N // LOAD_CLIENTS)
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
        clients = [httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=120) for _ in range(LOAD_CLIENTS)]
        try:
            return await asyncio.gather(*(one(clients[i % LOAD_CLIENTS], b, stream) for i, b in enumerate(bodies)))
        finally:
            for c in clients:
                await c.aclose()

    async def run(srv):
        rss = [_rss_mib()]
        plain = await round_(srv, False)
        warm = await round_(srv, True)  # the warm-up: every path has run once
        rss.append(_rss_mib())
        t0 = time.perf_counter()
        streamed = await round_(srv, True)
        rss.append(_rss_mib())
        return plain, warm, streamed, time.perf_counter() - t0, rss

    srv = Server(engine, port=0, max_queue=LOAD_N, max_batch=128).start()
    try:
        plain, warm, streamed, elapsed, rss = asyncio.run(run(srv))
        metrics = raw(srv, "/metrics", method="GET").text
    finally:
        srv.shutdown(drain_timeout=5)
    assert [t for t, _ in plain] == expected
    assert [t for t, _ in warm] == [t for t, _ in plain] and [t for t, _ in streamed] == [t for t, _ in plain]
    assert f'mptkern_http_requests_total{{endpoint="/v1/completions",status="200"}} {3.0 * LOAD_N}' in metrics
    lat = sorted(t for _, t in streamed)
    p50, p99 = lat[len(lat) // 2], lat[math.ceil(0.99 * len(lat)) - 1]
    print(f"\nload: {LOAD_N} concurrent streams in {elapsed:.1f} s, latency p50 {p50 * 1e3:.0f} ms p99 {p99 * 1e3:.0f} ms; "
          f"RSS MiB at start / after the warm-up (one non-streamed and one streamed round) / after the measured "
          f"streamed round: {[round(r) for r in rss]}")
    assert rss[2] - rss[1] < RSS_BOUND_MIB, rss
    assert engine.num_pending == 0


# -- fuzzing --------------------------------------------------------------------------------------------
def test_fuzz_malformed_bodies(engine):
    """Random JSON values, wrong-typed fields, unknown fields and junk bytes: every answer is a 4xx
    with an OpenAI error object, and the server keeps answering /health."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                          max_leaves=8)
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    intish = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    valid = {  # field -> is this value acceptable (those are filtered out: only invalid ones are sent)
        "model": lambda v: v in engine.task_names,
        "prompt": lambda v: isinstance(v, (str, list)),
        "max_tokens": lambda v: v is None or (intish(v) and v >= 1),
        "temperature": lambda v: v is None or (num(v) and 0 <= v <= 2),
        "top_p": lambda v: v is None or (num(v) and 0 < v <= 1),
        "n": lambda v: v is None or (intish(v) and 1 <= v <= 128),
        "seed": lambda v: v is None or (intish(v) and -2**63 <= v < 2**63),
        "stop": lambda v: v is None or (isinstance(v, str) and v != "") or (isinstance(v, list) and len(v) <= 16
                                                                           and all(isinstance(s, str) and s for s in v)),
        "stream": lambda v: v is None or isinstance(v, bool),
        "logprobs": lambda v: v is None or (intish(v) and 0 <= v <= 20),
        "presence_penalty": lambda v: v is None or (num(v) and v == 0),
        "logit_bias": lambda v: v is None or v == {},
        "echo": lambda v: v is None or v is False,
        "best_of": lambda v: v is None or v == 1,
    }
    chat_valid = {**{k: f for k, f in valid.items() if k not in ("prompt", "logprobs", "echo", "best_of")},
                  "messages": lambda v: isinstance(v, list) and v and all(
                      isinstance(m, dict) and m.get("role") in ("system", "developer", "user", "assistant") for m in v),
                  "logprobs": lambda v: v is None or isinstance(v, bool),
                  "tools": lambda v: v is None or v == []}
    base = {"/v1/completions": {"model": "ner", "prompt": "abc", "max_tokens": 2},
            "/v1/chat/completions": {"model": "ner", "messages": [{"role": "user", "content": "abc"}], "max_tokens": 2}}

    def wrong_field(path, table):
        return st.sampled_from(sorted(table)).flatmap(
            lambda f: values.filter(lambda v, f=f: not table[f](v)).map(
                lambda v, f=f: (path, json.dumps({**base[path], f: v}).encode())))

    def unknown_field(path, table):
        return st.tuples(st.text(min_size=1, max_size=10).filter(lambda k: k not in table and k not in base[path]
                                                                 and k not in ("user", "suffix", "frequency_penalty",
                                                                               "stream_options", "max_completion_tokens",
                                                                               "top_logprobs", "safety_identifier")),
                         values).map(lambda kv: (path, json.dumps({**base[path], kv[0]: kv[1]}).encode()))

    paths = st.sampled_from(sorted(base))
    bodies = st.one_of(
        st.tuples(paths, values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())),
        st.tuples(paths, st.dictionaries(st.text(max_size=8).filter(lambda k: k != "model"), values, max_size=4)
                  .map(lambda d: json.dumps(d).encode())),
        wrong_field("/v1/completions", valid), wrong_field("/v1/chat/completions", chat_valid),
        unknown_field("/v1/completions", valid), unknown_field("/v1/chat/completions", chat_valid),
        st.tuples(paths, st.binary(max_size=48)),
    )
    seen = []
    with serving(engine) as (srv, _), httpx.Client(base_url=srv.url, timeout=TIMEOUT) as http_:

        @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(bodies)
        def check(case):
            path, content = case
            r = http_.post(path, content=content, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (content, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), r.text
            seen.append(r.status_code)
            if len(seen) % 50 == 0:
                assert http_.get("/health").status_code == 200

        check()
        assert http_.get("/health").json()["status"] == "ok"
    assert len(seen) >= 100


# -- the command line -----------------------------------------------------------------------------------
def test_cli_serve_builds_engine_from_adapters(tmp_path, monkeypatch):
    """`mptkern serve` wiring, with the default model and the blocking serve() replaced."""
    import mptkern.models
    import mptkern.serve
    from mptkern import cli
    from mptkern.prompts import MultitaskPrompt

    model = tiny_llama()
    multi = MultitaskPrompt(2, 4, model.config.hidden_size, rank=1, task_names=["ner", "qa"])
    multi.to_peft(tmp_path / "multi")
    MultitaskPrompt(1, 3, model.config.hidden_size, rank=1).to_peft(tmp_path / "one")
    seen, made = {}, {}
    real_engine = mptkern.serve.MultiTaskEngine

    def engine_spy(*args, **kw):
        made.update(kw)
        kw.pop("kv_memory", None), kw.pop("block_size", None)  # recorded; the tiny engine gets its defaults
        return real_engine(*args, **kw)

    monkeypatch.setattr(mptkern.models, "load_default", lambda **kw: (model, CharTokenizer()))
    monkeypatch.setattr(mptkern.serve, "MultiTaskEngine", engine_spy)
    monkeypatch.setattr(mptkern.serve, "serve",
                        lambda engine, host, port, **kw: seen.update(engine=engine, host=host, port=port, **kw))
    rc = cli.main(["serve", "--adapter", str(tmp_path / "multi"), "--task", f"extra={tmp_path / 'one'}", "--port", "0",
                   "--device", "cpu", "--max-seq-len", "64", "--max-queue", "5", "--kv-memory", "0.5", "--block-size", "8",
                   "--drain-timeout", "3", "--max-batch", "7"])
    assert rc == 0 and seen["engine"].task_names == ["ner", "qa", "extra"]
    assert seen["host"] == "127.0.0.1" and seen["port"] == 0 and seen["max_queue"] == 5
    assert seen["drain_timeout"] == 3 and seen["max_batch"] == 7
    assert made["kv_memory"] == 0.5 and made["block_size"] == 8 and made["max_seq_len"] == 64
    made.clear()
    assert cli.main(["serve", "--adapter", str(tmp_path / "multi"), "--device", "cpu"]) == 0
    assert "kv_memory" not in made and "block_size" not in made  # absent flags leave the engine's defaults
    assert cli.main(["serve", "--task", "broken"]) == 2


def model_folder(tmp_path):
    """A Hugging Face folder of the tiny Llama with a one-character-per-token tokenizer, and a
    one-task adapter for it: (model dir, adapter dir)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mptkern.prompts import MultitaskPrompt

    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    vocab = {"<unk>": 0, "<eos>": 2, **{chr(ord("a") + i): 3 + i for i in range(26)}, " ": 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path / "llama")
    MultitaskPrompt(1, 3, model.config.hidden_size, rank=1).to_peft(tmp_path / "one")
    return tmp_path / "llama", tmp_path / "one"


def test_cli_serve_loads_a_model_folder(tmp_path, monkeypatch, capsys):
    import mptkern.models
    import mptkern.serve
    from mptkern import cli
    from transformers import GPT2Config

    model_folder(tmp_path)
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    seen = {}
    monkeypatch.setattr(mptkern.models, "load_default", lambda **kw: pytest.fail("--model must not load the default"))
    monkeypatch.setattr(mptkern.serve, "serve", lambda engine, host, port, **kw: seen.update(engine=engine))
    assert cli.main(["serve", "--model", str(tmp_path / "llama"), "--task", f"t={tmp_path / 'one'}", "--device", "cpu",
                     "--max-seq-len", "32", "--max-running", "2", "--max-batch-tokens", "32"]) == 0
    engine = seen["engine"]
    assert engine.model.config.model_type == "llama"
    assert engine.tokenizer.encode("abc", add_special_tokens=False) == [3, 4, 5]
    assert engine.generate([Request("t", text="abc", max_new_tokens=3)])[0].completion_tokens >= 1
    capsys.readouterr()
    assert cli.main(["serve", "--model", str(tmp_path / "gpt2"), "--task", f"t={tmp_path / 'one'}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "model_type 'gpt2' is not supported" in err and "llama" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["serve", "--model", str(tmp_path / "missing"), "--task", f"t={tmp_path / 'one'}"]) == 2
    assert "cannot load --model" in capsys.readouterr().err


def test_cli_serve_without_the_serve_extra(monkeypatch, capsys):
    from mptkern import cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert cli.main(["serve", "--task", "x=y"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'fastapi" in err and "'uvicorn" in err and "serve" in err
    from mptkern._optional import MissingDependency

    with pytest.raises(MissingDependency):
        Server(None)


def test_cli_serve_end_to_end_and_ctrl_c(tmp_path):
    """`mptkern serve --model DIR` in its own process: it answers, and Ctrl-C (SIGINT) drains: every
    stream in flight or queued when it came still ends with its last chunk and [DONE]; then the
    process exits 0."""
    import queue as queue_
    import signal
    import subprocess

    model_dir, adapter = model_folder(tmp_path)
    cmd = [sys.executable, "-m", "mptkern.cli", "serve", "--model", str(model_dir), "--task", f"t={adapter}",
           "--device", "cpu", "--port", "0", "--max-running", "2", "--max-batch-tokens", "32", "--max-seq-len", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = queue_.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if "serving tasks" in line:
                url = line.split(" on ")[-1].strip()
        body = {"model": "t", "prompt": "abc", "max_tokens": 60, "temperature": 0, "stream": True}

        def stream(i):
            with httpx.Client(base_url=url, timeout=TIMEOUT) as c, c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                return sse_events("".join(r.iter_text()))

        def accepted():
            from prometheus_client.parser import text_string_to_metric_families

            m = {(s.name, s.labels.get("endpoint"), s.labels.get("status")): s.value
                 for f in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in f.samples}
            in_flight = m[("mptkern_queue_depth", None, None)] + m[("mptkern_requests_running", None, None)]
            return in_flight, in_flight + m.get(("mptkern_http_requests_total", "/v1/completions", "200"), 0)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stream, i) for i in range(8)]  # 2 run at once, the others wait
            wait_until(lambda: accepted()[1] == 8)
            assert accepted()[0] > 0, "too late: every request had finished"
            proc.send_signal(signal.SIGINT)
            results = [f.result(TIMEOUT) for f in futures]
        assert all(r[-1]["choices"][0]["finish_reason"] in ("stop", "length") for r in results)
        assert len({"".join(c["choices"][0]["text"] for c in r) for r in results}) == 1  # greedy: all the same
        assert proc.wait(TIMEOUT) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
