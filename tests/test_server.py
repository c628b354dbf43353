"""HTTP server over MultiTaskEngine: loopback only, tiny random Llama, bounded loops."""

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from mptkern.serve import MultiTaskEngine, Request, Server
from tests.test_engine import CharTokenizer, prompts, tiny_llama

TIMEOUT = 30


@pytest.fixture(scope="module")
def engine():
    model = tiny_llama()
    return MultiTaskEngine(model, CharTokenizer(), prompts(model), max_batch_tokens=64, max_running=8, max_seq_len=48)


@pytest.fixture
def server(engine):
    srv = Server(engine, port=0, max_queue=64, max_body=4096).start()
    yield srv
    srv.shutdown()


def call(url, method="GET", body=None, raw=None, headers=None):
    """(status, headers, body bytes) for one request; never raises on HTTP errors."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def post(srv, body, **kw):
    return call(srv.url + "/v1/completions", "POST", body, **kw)


def error_of(status_headers_body):
    _, _, data = status_headers_body
    err = json.loads(data)["error"]
    assert set(err) >= {"message", "type"} and err["message"]
    return err


def test_completions_match_engine(server, engine):
    bodies = [
        {"model": "ner", "prompt": "patientdenies", "max_tokens": 7},
        {"model": "cls", "prompt": "fever", "max_tokens": 5, "temperature": 1.3, "top_p": 0.9, "seed": 11},
        {"model": "qa", "prompt": "cough", "max_tokens": 9, "stop": ["zz", "q"]},
    ]
    expected = engine.generate([
        Request("ner", text="patientdenies", max_new_tokens=7),
        Request("cls", text="fever", max_new_tokens=5, temperature=1.3, top_p=0.9, seed=11),
        Request("qa", text="cough", max_new_tokens=9, stop=("zz", "q")),
    ])
    for body, exp in zip(bodies, expected):
        status, headers, data = post(server, body)
        assert status == 200 and headers["Content-Type"] == "application/json"
        out = json.loads(data)
        assert out["object"] == "text_completion" and out["model"] == body["model"]
        assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
        assert out["choices"][0]["text"] == exp.text and out["choices"][0]["index"] == 0
        assert out["choices"][0]["finish_reason"] == exp.finish_reason
        assert out["usage"] == {"prompt_tokens": exp.prompt_tokens, "completion_tokens": exp.completion_tokens,
                                "total_tokens": exp.prompt_tokens + exp.completion_tokens}
    # a single-string stop works like a one-element list
    status, _, data = post(server, {**bodies[2], "stop": "q"})
    assert status == 200 and json.loads(data)["choices"][0]["text"] == expected[2].text


def test_models_and_health(server, engine):
    status, _, data = call(server.url + "/v1/models")
    assert status == 200
    out = json.loads(data)
    assert out["object"] == "list" and [m["id"] for m in out["data"]] == engine.task_names == ["ner", "qa", "cls"]
    status, _, data = call(server.url + "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"


def test_stream_is_sse(server, engine):
    exp = engine.generate([Request("qa", text="abdominalpain", max_new_tokens=6)])[0]
    status, headers, data = post(server, {"model": "qa", "prompt": "abdominalpain", "max_tokens": 6, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = data.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1]) and chunks
    assert "".join(c["choices"][0]["text"] for c in chunks) == exp.text
    assert chunks[-1]["choices"][0]["finish_reason"] == exp.finish_reason
    assert all(c["object"] == "text_completion" and c["model"] == "qa" for c in chunks)


def test_client_errors(engine):
    srv = Server(engine, port=0, max_queue=8, max_body=512).start()
    try:
        ok = {"model": "ner", "prompt": "abc", "max_tokens": 2}
        cases = [
            (post(srv, None, raw=b"{not json"), 400, "malformed JSON"),
            (post(srv, None, raw=b"\xff\xfe"), 400, "malformed JSON"),
            (post(srv, ["a list"]), 400, "JSON object"),
            (post(srv, {"prompt": "abc"}), 400, "'model'"),
            (post(srv, {**ok, "model": "nope"}), 404, "unknown model"),
            (post(srv, {"model": "ner"}), 400, "'prompt'"),
            (post(srv, {**ok, "prompt": ""}), 400, "'prompt'"),
            (post(srv, {**ok, "prompt": 5}), 400, "'prompt'"),
            (post(srv, {**ok, "max_tokens": 0}), 400, "'max_tokens'"),
            (post(srv, {**ok, "max_tokens": "3"}), 400, "'max_tokens'"),
            (post(srv, {**ok, "temperature": -1}), 400, "'temperature'"),
            (post(srv, {**ok, "top_p": 0}), 400, "'top_p'"),
            (post(srv, {**ok, "top_p": 1.5}), 400, "'top_p'"),
            (post(srv, {**ok, "seed": "x"}), 400, "'seed'"),
            (post(srv, {**ok, "stop": [1]}), 400, "'stop'"),
            (post(srv, {**ok, "stop": ""}), 400, "'stop'"),
            (post(srv, {**ok, "stream": "yes"}), 400, "'stream'"),
            (post(srv, {**ok, "n": 2}), 400, "'n'"),
            (post(srv, {**ok, "max_tokens": 100}), 400, "exceeds max_seq_len"),  # the engine's ValueError
            (post(srv, {**ok, "prompt": "a" * 60}), 400, "exceeds max_seq_len"),
            (post(srv, None, raw=json.dumps({**ok, "prompt": "a" * 600}).encode()), 413, "exceeds the limit"),
            (call(srv.url + "/v1/nothing"), 404, "no such endpoint"),
            (call(srv.url + "/v1/models", "POST", ok), 405, "not allowed"),
            (call(srv.url + "/v1/completions"), 405, "not allowed"),
        ]
        for response, status, match in cases:
            assert response[0] == status, (response, status, match)
            assert response[1]["Content-Type"] == "application/json"
            assert match in error_of(response)["message"], (response, match)
        # the server is still fine afterwards
        assert post(srv, ok)[0] == 200
    finally:
        srv.shutdown()


def gate_steps(engine, monkeypatch):
    """Make the worker wait for a permit before every engine step; returns (permits, steps run)."""
    permits, steps = threading.Semaphore(0), []
    real = engine.step

    def gated():
        assert permits.acquire(timeout=TIMEOUT)
        steps.append(engine.num_pending)
        return real()

    monkeypatch.setattr(engine, "step", gated)
    return permits, steps


def wait_until(cond):
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stream_is_incremental(server, engine, monkeypatch):
    """Each engine step's text reaches the client before the next step runs."""
    exp = engine.generate([Request("ner", text="patientdenies", max_new_tokens=5)])[0]
    assert exp.finish_reason == "length" and len(exp.text) == 5  # one character per token
    permits, _ = gate_steps(engine, monkeypatch)
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/v1/completions", json.dumps({"model": "ner", "prompt": "patientdenies", "max_tokens": 5,
                                                            "stream": True}), {"Content-Type": "application/json"})
        permits.release()
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        for i in range(5):
            if i:
                permits.release()
            line, blank = resp.readline(), resp.readline()
            assert line.startswith(b"data: ") and blank == b"\n"
            chunk = json.loads(line[len(b"data: "):])
            assert chunk["choices"][0]["text"] == exp.text[i]
            assert chunk["choices"][0]["finish_reason"] == (None if i < 4 else "length")
            assert ("usage" in chunk) == (i == 4)
            if i < 4:
                assert engine.num_pending == 1  # still generating: the text came before the end
        assert resp.read() == b"data: [DONE]\n\n"
    finally:
        conn.close()


def test_stream_holds_back_a_possible_stop_string(server, engine):
    free = engine.generate([Request("qa", text="cough", max_new_tokens=9)])[0]
    stop = free.text[4:6]  # a stop string that completes at the sixth token or earlier
    exp = engine.generate([Request("qa", text="cough", max_new_tokens=9, stop=(stop, free.text[1] + "zz"))])[0]
    status, _, data = post(server, {"model": "qa", "prompt": "cough", "max_tokens": 9, "stop": [stop, free.text[1] + "zz"],
                                    "stream": True})
    chunks = [json.loads(e[len("data: "):]) for e in data.decode().split("\n\n")[:-2]]
    assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks) == exp.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any(stop in c["choices"][0]["text"] for c in chunks)


def test_client_leaving_a_stream_frees_its_slot(server, engine, monkeypatch):
    permits, steps = gate_steps(engine, monkeypatch)
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps({"model": "cls", "prompt": "abc", "max_tokens": 40, "stream": True}),
                 {"Content-Type": "application/json"})
    permits.release()
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    resp.close()
    conn.close()
    for _ in range(39):  # one step at a time, giving the handler time to hit the closed socket
        if engine.num_pending == 0:
            break
        permits.release()
        time.sleep(0.05)
    wait_until(lambda: engine.num_pending == 0 and not server.active)
    assert len(steps) < 20, f"the request ran {len(steps)} steps after its client left"


def test_bad_request_fails_alone(engine, monkeypatch):
    """An engine-refused request among queued ones gets 400; the others are still answered."""
    srv = Server(engine, port=0, max_queue=8)
    permits, _ = gate_steps(engine, monkeypatch)
    srv.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(post, srv, {"model": "ner", "prompt": "abc", "max_tokens": 2})
            wait_until(lambda: srv.active)
            bodies = [{"model": "qa", "prompt": "abc", "max_tokens": 3}, {"model": "qa", "prompt": "abc", "max_tokens": 99},
                      {"model": "cls", "prompt": "de", "max_tokens": 2}]
            futures = [pool.submit(post, srv, b) for b in bodies]
            wait_until(lambda: srv.queue.qsize() == 3)  # queued while the worker waits in a step
            permits.release(20)
            assert first.result(TIMEOUT)[0] == 200
            assert [f.result(TIMEOUT)[0] for f in futures] == [200, 400, 200]
    finally:
        permits.release(100)
        srv.shutdown()


def test_queue_full_is_503(engine, monkeypatch):
    srv = Server(engine, port=0, max_queue=1, max_batch=1)
    permits, _ = gate_steps(engine, monkeypatch)
    srv.start()
    body = {"model": "ner", "prompt": "abc", "max_tokens": 2}
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, srv, body)  # in the engine, its step waiting for a permit
            wait_until(lambda: srv.active)
            queued = pool.submit(post, srv, body)  # fills the queue of one (the engine holds max_batch = 1)
            wait_until(lambda: srv.queue.qsize() == 1)
            status, headers, data = post(srv, body)
            assert status == 503 and headers["Retry-After"] == "1"
            assert "queue is full" in error_of((status, headers, data))["message"]
            permits.release(10)
            assert running.result(TIMEOUT)[0] == 200 and queued.result(TIMEOUT)[0] == 200
        permits.release(10)
        assert post(srv, body)[0] == 200  # room again
    finally:
        permits.release(100)
        srv.shutdown()


def test_engine_crash_is_500_and_server_survives(engine, monkeypatch):
    srv = Server(engine, port=0).start()
    try:
        real = engine.step
        monkeypatch.setattr(engine, "step", lambda: 1 / 0)
        response = post(srv, {"model": "ner", "prompt": "abc", "max_tokens": 2})
        assert response[0] == 500 and error_of(response)["type"] == "server_error"
        assert engine.num_pending == 0  # the failed request left the engine
        monkeypatch.setattr(engine, "step", real)
        assert post(srv, {"model": "ner", "prompt": "abc", "max_tokens": 2})[0] == 200
    finally:
        srv.shutdown()


def test_engine_refusing_a_request_unexpectedly_is_500_alone(engine, monkeypatch):
    srv = Server(engine, port=0).start()
    real = engine.submit

    def flaky(request, **kw):
        if request.text == "boom":
            raise RuntimeError("tokenizer failure")
        return real(request, **kw)

    monkeypatch.setattr(engine, "submit", flaky)
    try:
        response = post(srv, {"model": "ner", "prompt": "boom", "max_tokens": 2})
        assert response[0] == 500 and "tokenizer failure" in error_of(response)["message"]
        assert post(srv, {"model": "ner", "prompt": "abc", "max_tokens": 2})[0] == 200  # the worker lives on
    finally:
        srv.shutdown()


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _load_body(i):
    """Every 10th body malformed in some way; the rest valid, mixed tasks and lengths."""
    tasks = ["ner", "qa", "cls"]
    if i % 10 == 7:
        bad = [b"{oops", json.dumps({"model": "nope", "prompt": "x"}).encode(),
               json.dumps({"model": "qa", "prompt": "x", "max_tokens": -1}).encode(), b'"just a string"']
        return bad[(i // 10) % len(bad)]
    body = {"model": tasks[i % 3], "prompt": "abcdefghij"[: 1 + i % 9], "max_tokens": 1 + i % 6}
    if i % 4 == 1:
        body.update(temperature=0.8, top_p=0.95, seed=i)
    if i % 5 == 3:
        body["stream"] = True
    return json.dumps(body).encode()


def _fire(srv, n, start=0, clients=16):
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda i: post(srv, None, raw=_load_body(i))[0], range(start, start + n)))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc for RSS")
def test_load_mixed_concurrent_clients(engine, monkeypatch):
    """Thousands of requests from concurrent clients, 10% malformed, a fifth streamed: every one is
    answered, requests share engine steps, and memory stays flat after warmup."""
    in_flight = []
    real = engine.step
    monkeypatch.setattr(engine, "step", lambda: in_flight.append(engine.num_pending) or real())
    srv = Server(engine, port=0, max_queue=32).start()
    try:
        t0 = time.perf_counter()
        warm = _fire(srv, 200)
        assert set(warm) <= {200, 400, 404, 503}
        rss = [_rss_bytes()]
        statuses = []
        for start in range(200, 2200, 500):
            statuses += _fire(srv, 500, start=start)
            rss.append(_rss_bytes())
        elapsed = time.perf_counter() - t0
        assert len(statuses) == 2000 and set(statuses) <= {200, 400, 404, 503}
        assert statuses.count(200) >= 1700, statuses  # 1800 valid requests; 503 only if the queue overflowed
        assert statuses.count(400) + statuses.count(404) >= 200  # the malformed ones
        assert max(rss) - rss[0] < 32 * 2**20, rss
        assert call(srv.url + "/health")[0] == 200
        assert max(in_flight) > 1  # concurrent clients shared engine steps
        wait_until(lambda: not srv.active and engine.num_pending == 0)  # nothing left behind
        print(f"load: 2200 requests in {elapsed:.1f}s, statuses { {s: statuses.count(s) for s in set(statuses)} }, "
              f"RSS MiB after warmup and every 500: {[round(r / 2**20) for r in rss]}, most in flight {max(in_flight)}")
    finally:
        srv.shutdown()


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
    seen = {}
    monkeypatch.setattr(mptkern.models, "load_default", lambda **kw: (model, CharTokenizer()))
    monkeypatch.setattr(mptkern.serve, "serve", lambda engine, host, port, **kw: seen.update(engine=engine, host=host, port=port, **kw))
    rc = cli.main(["serve", "--adapter", str(tmp_path / "multi"), "--task", f"extra={tmp_path / 'one'}", "--port", "0",
                   "--device", "cpu", "--max-seq-len", "64", "--max-queue", "5"])
    assert rc == 0 and seen["engine"].task_names == ["ner", "qa", "extra"]
    assert seen["host"] == "127.0.0.1" and seen["port"] == 0 and seen["max_queue"] == 5
    assert cli.main(["serve", "--task", "broken"]) == 2
