"""HTTP front end for :class:`~mptkern.serve.engine.MultiTaskEngine` (standard library only).

Endpoints (OpenAI-style; ``model`` names the task):

- ``POST /v1/completions``: body ``{"model": TASK, "prompt": str, "max_tokens": int = 16,
  "temperature": float = 0.0, "top_p": float = 1.0, "seed": int | null, "stop": str | [str] | null,
  "stream": bool = false}``. Unknown extra fields are ignored; ``n`` other than 1 is refused. Note the
  default temperature is 0 (greedy), not OpenAI's 1. Answer: ``{"id", "object": "text_completion",
  "created", "model", "choices": [{"text", "index": 0, "finish_reason", "logprobs": null}], "usage":
  {"prompt_tokens", "completion_tokens", "total_tokens"}}``.
  With ``"stream": true`` the answer is server-sent events, one ``data: {...}\n\n`` chunk per
  engine step that made new text (same shape, ``choices[0].text`` the new text, ``finish_reason``
  null until the last chunk, which also carries ``usage``), then ``data: [DONE]\n\n``. Text that a
  later token may still change (an incomplete character, the start of a stop string) is held back
  until it is settled; the chunks' texts add up to the non-streamed answer. An error after the
  stream started is sent as a ``data: {"error": {...}}`` event and the connection closes.
- ``GET /v1/models``: ``{"object": "list", "data": [{"id": TASK, "object": "model", ...}]}``.
- ``GET /health``: ``{"status": "ok", "queued": n, "tasks": n}``.

Errors are JSON ``{"error": {"message", "type"}}``: 400 malformed JSON, missing or invalid fields
and requests the engine refuses (its ``ValueError``), 404 unknown task or path, 405 wrong method,
411 no ``Content-Length``, 413 body over ``max_body`` bytes, 503 (with ``Retry-After``) when the
bounded queue is full or the server is stopping, 504 when a request waits longer than
``request_timeout``, 500 for anything unexpected (the server keeps running).

Threading: :class:`http.server.ThreadingHTTPServer` parses requests on one thread per connection;
one worker thread owns the engine and runs continuous batching: it moves queued jobs into the
engine (``engine.submit``, up to ``max_batch`` requests in the engine at once; a request the engine
refuses gets its 400 alone), runs ``engine.step()`` and hands every request its update, so a request
joins the running batch at the next step after it arrives and leaves it at the step it finishes.
Handlers wait on their job; a client that disconnects mid-stream, or a handler that times out, marks
its job cancelled and the worker frees its engine slot.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mptkern.serve.engine import Request

__all__ = ["Server", "serve"]

class _HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers or {}


class _Job:
    """One HTTP request's way through the worker: ``events`` (streamed jobs) gets every update with
    new text and then, or instead, an error; ``done`` is set with ``result`` or ``error``."""

    __slots__ = ("request", "stream", "done", "result", "error", "events", "cancelled")

    def __init__(self, request: Request, stream: bool = False):
        self.request, self.stream = request, stream
        self.done = threading.Event()
        self.result = None
        self.error: _HTTPError | None = None
        self.events: queue.SimpleQueue | None = queue.SimpleQueue() if stream else None
        self.cancelled = False  # set by the handler (client gone, timeout); the worker drops the request

    def fail(self, error: _HTTPError) -> None:
        self.error = error
        if self.events is not None:
            self.events.put(error)
        self.done.set()

    def update(self, update) -> None:
        if self.events is not None and (update.text or update.result is not None):
            self.events.put(update)
        if update.result is not None:
            self.result = update.result
            self.done.set()


def _number(body, name, default, *, lo=None, hi=None, lo_open=False):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _HTTPError(400, f"'{name}' must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _HTTPError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise _HTTPError(400, f"'{name}' must be <= {hi}")
    return float(value)


def parse_completion(body, task_names) -> tuple[Request, bool]:
    """Validate a ``/v1/completions`` body; return the engine request and the ``stream`` flag."""
    if not isinstance(body, dict):
        raise _HTTPError(400, "request body must be a JSON object")
    task = body.get("model")
    if not isinstance(task, str) or not task:
        raise _HTTPError(400, "'model' (the task name) is required and must be a non-empty string")
    if task not in task_names:
        raise _HTTPError(404, f"unknown model (task) {task!r}; available: {sorted(task_names)}", "not_found_error")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _HTTPError(400, "'prompt' is required and must be a non-empty string")
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _HTTPError(400, "'max_tokens' must be an integer >= 1")
    temperature = _number(body, "temperature", 0.0, lo=0.0)
    top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise _HTTPError(400, "'seed' must be null or an integer in [0, 2**63)")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _HTTPError(400, "'stop' must be null, a string or a list of at most 16 strings")
    if not all(stop):
        raise _HTTPError(400, "'stop' strings must be non-empty")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _HTTPError(400, "'stream' must be a boolean")
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise _HTTPError(400, "only 'n' = 1 is supported")
    request = Request(task, text=prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      stop=stop)
    return request, stream


class Server:
    """An HTTP server over a :class:`MultiTaskEngine`.

    ``Server(engine, port=0).start()`` runs it in background threads (``.url`` gives the address;
    port 0 picks a free one); :meth:`serve_forever` runs it in the calling thread; :meth:`shutdown`
    stops both threads and answers 503 to whatever was still queued.

    Args:
        max_queue: requests waiting for the engine at most; more are answered 503.
        max_body: request body bytes at most (413 above).
        max_batch: requests in the engine at once at most (running or waiting for a slot); the rest
            wait in the queue, so a full engine makes the queue fill and answer 503.
        request_timeout: seconds a handler waits for its result (or, streaming, for its next text)
            before answering 504 and cancelling the request.
    """

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8000, *, max_queue: int = 256,
                 max_body: int = 1 << 20, max_batch: int = 64, request_timeout: float = 600.0):
        if max_queue < 1 or max_body < 1 or max_batch < 1:
            raise ValueError("max_queue, max_body and max_batch must be >= 1")
        self.engine = engine
        self.max_body, self.max_batch, self.request_timeout = max_body, max_batch, request_timeout
        self.queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self.active: dict[int, _Job] = {}  # engine request id -> job; the worker's alone
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="mptkern-engine", daemon=True)
        self._http_thread: threading.Thread | None = None
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Server:
        """Start the engine worker and the HTTP loop in background threads; returns self."""
        self._worker.start()
        self._http_thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                             name="mptkern-http", daemon=True)
        self._http_thread.start()
        return self

    def serve_forever(self) -> None:
        """Run in the calling thread until interrupted (Ctrl-C) or :meth:`shutdown`."""
        self._worker.start()
        try:
            self.httpd.serve_forever(poll_interval=0.1)
        except KeyboardInterrupt:
            pass
        finally:
            self._stop_worker()
            self.httpd.server_close()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._http_thread is not None:
            self.httpd.shutdown()
            self._http_thread.join(timeout)
            self._http_thread = None
        self.httpd.server_close()
        self._stop_worker(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _stop_worker(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._worker.is_alive():
            self._worker.join(timeout)
        self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            job.fail(_HTTPError(503, "server is shutting down", "unavailable_error"))

    # -- engine worker ----------------------------------------------------------------------------
    def submit(self, request: Request, stream: bool = False) -> _Job:
        if self._stopping.is_set():
            raise _HTTPError(503, "server is shutting down", "unavailable_error", {"Retry-After": "1"})
        job = _Job(request, stream)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise _HTTPError(503, f"request queue is full ({self.queue.maxsize} waiting); retry later",
                             "unavailable_error", {"Retry-After": "1"}) from None
        if self._stopping.is_set():  # shutdown began after the check above: its drain may have missed this job
            self._fail_queued()
        return job

    def _work(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._admit()
                    for rid in [rid for rid, job in self.active.items() if job.cancelled]:
                        self.engine.cancel(rid)
                        del self.active[rid]
                    if self.active:
                        self._step()
                except Exception as exc:  # noqa: BLE001 -- the worker must survive anything
                    self._drop_active(_HTTPError(500, f"engine error: {type(exc).__name__}: {exc}", "server_error"))
        finally:
            self._drop_active(_HTTPError(503, "server is shutting down", "unavailable_error"))

    def _admit(self) -> None:
        """Move queued jobs into the engine while it holds fewer than ``max_batch`` requests; wait
        briefly for the first one only when nothing is running."""
        while self.engine.num_pending < self.max_batch:
            try:
                job = self.queue.get_nowait() if self.active else self.queue.get(timeout=0.1)
            except queue.Empty:
                return
            if job.cancelled:
                continue
            try:
                self.active[self.engine.submit(job.request, stream=job.stream)] = job
            except (TypeError, ValueError) as exc:
                job.fail(_HTTPError(400, str(exc)))
            except Exception as exc:  # noqa: BLE001 -- e.g. the tokenizer failing on this text
                job.fail(_HTTPError(500, f"engine error: {type(exc).__name__}: {exc}", "server_error"))

    def _step(self) -> None:
        try:
            updates = self.engine.step()
        except Exception as exc:  # noqa: BLE001 -- the worker must survive anything
            self._drop_active(_HTTPError(500, f"engine error: {type(exc).__name__}: {exc}", "server_error"))
            return
        for update in updates:
            job = self.active.get(update.request_id)
            if job is None:
                continue
            if update.result is not None:
                del self.active[update.request_id]
            job.update(update)

    def _drop_active(self, error: _HTTPError) -> None:
        active, self.active = self.active, {}
        for rid, job in active.items():
            job.fail(error)
            try:
                self.engine.cancel(rid)
            except Exception:  # noqa: BLE001 -- every job is answered even if the engine is broken
                pass

    def complete(self, request: Request):
        """Queue ``request`` and wait for its :class:`Result` (raises :class:`_HTTPError`)."""
        job = self.submit(request)
        if not job.done.wait(self.request_timeout):
            job.cancelled = True
            raise _HTTPError(504, f"no result within {self.request_timeout} s", "timeout_error")
        if job.error is not None:
            raise job.error
        return job.result

    def next_event(self, job: _Job):
        """A streamed job's next :class:`~mptkern.serve.engine.Update` (raises :class:`_HTTPError`)."""
        try:
            item = job.events.get(timeout=self.request_timeout)
        except queue.Empty:
            job.cancelled = True
            raise _HTTPError(504, f"no new text within {self.request_timeout} s", "timeout_error") from None
        if isinstance(item, _HTTPError):
            raise item
        return item


def _make_handler(server: Server):
    class Handler(_Handler):
        app = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    app: Server
    protocol_version = "HTTP/1.1"
    server_version = "mptkern"
    timeout = 60  # seconds a connection may idle (keep-alive) or stall mid-request

    def log_message(self, format, *args):  # noqa: A002 -- quiet by default
        pass

    # -- responses -------------------------------------------------------------------------------
    def _send_json(self, status: int, payload, headers=None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self._responded = True

    def _send_error_json(self, err: _HTTPError) -> None:
        self._send_json(err.status, {"error": {"message": err.message, "type": err.type}}, err.headers)

    def send_error(self, code, message=None, explain=None):
        """JSON bodies also for the errors http.server raises itself (bad request line, 414, ...)."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_json(code, {"error": {"message": message or phrase, "type": "invalid_request_error"}})

    # -- dispatch ----------------------------------------------------------------------------------
    _routes = {("GET", "/health"): "_health", ("GET", "/v1/models"): "_models",
               ("POST", "/v1/completions"): "_completions"}

    def _dispatch(self) -> None:
        self._responded = False
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            name = self._routes.get((self.command, path))
            if name is None:
                if any(p == path for _, p in self._routes):
                    self._discard_body()
                    raise _HTTPError(405, f"method {self.command} not allowed on {path}")
                self._discard_body()
                raise _HTTPError(404, f"no such endpoint: {self.command} {path}", "not_found_error")
            getattr(self, name)()
        except _HTTPError as err:
            if not self._responded:
                self._send_error_json(err)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 -- answer 500, keep serving
            self.close_connection = True
            if not self._responded:
                try:
                    self._send_error_json(_HTTPError(500, f"internal error: {type(exc).__name__}", "server_error"))
                except OSError:
                    pass

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _discard_body(self) -> None:
        """Read a small body so keep-alive stays in sync; close the connection otherwise."""
        length = self.headers.get("Content-Length")
        if length is None:
            return
        try:
            n = int(length)
        except ValueError:
            n = -1
        if 0 <= n <= self.app.max_body:
            self.rfile.read(n)
        else:
            self.close_connection = True
            self._drain(n)

    def _drain(self, n: int) -> None:
        """Read and drop a refused body of moderate size, so that closing the socket with unread data
        does not reset the connection before the client reads the error; a huge one is left unread."""
        if n > 16 * self.app.max_body:
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                return
            n -= len(chunk)

    def _read_json(self):
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _HTTPError(411, "chunked bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise _HTTPError(411, "Content-Length is required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise _HTTPError(400, "invalid Content-Length") from None
        if n > self.app.max_body:
            self.close_connection = True
            self._drain(n)
            raise _HTTPError(413, f"request body of {n} bytes exceeds the limit of {self.app.max_body} bytes",
                             "request_too_large")
        raw = self.rfile.read(n)
        if len(raw) != n:
            self.close_connection = True
            raise _HTTPError(400, "request body shorter than Content-Length")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise _HTTPError(400, f"malformed JSON body: {exc}") from None

    # -- endpoints -------------------------------------------------------------------------------
    def _health(self) -> None:
        self._send_json(200, {"status": "ok", "queued": self.app.queue.qsize(), "tasks": len(self.app.engine.task_names)})

    def _models(self) -> None:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "mptkern"}
                for name in self.app.engine.task_names]
        self._send_json(200, {"object": "list", "data": data})

    def _completions(self) -> None:
        body = self._read_json()
        request, stream = parse_completion(body, set(self.app.engine.task_names))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": request.task}
        if not stream:
            result = self.app.complete(request)
            self._send_json(200, {**head, "choices": [_choice(result.text, result.finish_reason)], "usage": _usage(result)})
            return
        job = self.app.submit(request, stream=True)
        try:
            update = self.app.next_event(job)  # errors before the first text are plain JSON answers
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self._responded = True
            while True:
                result = update.result
                chunk = {**head, "choices": [_choice(update.text, None if result is None else result.finish_reason)]}
                if result is not None:
                    chunk["usage"] = _usage(result)
                self._event(chunk)
                if result is not None:
                    self._event("[DONE]")
                    return
                try:
                    update = self.app.next_event(job)
                except _HTTPError as err:
                    self._event({"error": {"message": err.message, "type": err.type}})
                    return
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled = True  # the client left: free the engine slot
            raise

    def _event(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(b"data: " + data.encode() + b"\n\n")
        self.wfile.flush()


def _choice(text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": 0, "finish_reason": finish_reason, "logprobs": None}


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def serve(engine, host: str = "127.0.0.1", port: int = 8000, *, max_queue: int = 256, max_body: int = 1 << 20,
          max_batch: int = 64) -> None:
    """Serve ``engine`` on ``host:port`` in the calling thread until interrupted."""
    server = Server(engine, host, port, max_queue=max_queue, max_body=max_body, max_batch=max_batch)
    print(f"mptkern: serving tasks {engine.task_names} on {server.url}", flush=True)
    server.serve_forever()
