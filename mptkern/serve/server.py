"""OpenAI-compatible HTTP server over :class:`~mptkern.serve.engine.MultiTaskEngine`.

``Server(engine, port=0).start()`` serves in background threads (``.url``); ``serve(engine, host,
port)`` blocks (Ctrl-C drains and stops). The ``model`` field of every request names a task.

Endpoints
---------
- ``GET /v1/models``: ``{"object": "list", "data": [{"id": TASK, "object": "model", ...}]}``, one per task.
- ``POST /v1/completions``: ``prompt`` a string, a list of strings, a list of token ids or a list of
  such lists. The answer has one choice per prompt x ``n``, indexed prompt-major as OpenAI does
  (choice ``i * n + j`` is sample ``j`` of prompt ``i``). ``logprobs: k`` (0..20) gives the legacy
  format ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``: each
  generated token's log-probability under the model's raw logits (before temperature and top-p),
  its ``k`` most likely alternatives plus the token itself, and ``text_offset`` the running sum of
  the listed token strings' lengths (as vLLM computes it). Token strings are the tokenizer's
  decoding of the single token, so two ids that decode alike share one key in a top dict (the
  likelier one is kept).
- ``POST /v1/chat/completions``: ``messages`` (roles system, developer, user, assistant; content a
  string or a list of ``{"type": "text"}`` parts) are rendered with the tokenizer's chat template
  (``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``); the engine then
  formats that text as it formats any text request of the task (its instruction, if it has one).
  ``logprobs: true`` with ``top_logprobs: k`` gives ``{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [k entries]}]}``.
- ``GET /health``: ``{"status": "ok", "queued", "running", "tasks"}``; 503 (an error object) while
  shutting down.
- ``GET /metrics``: Prometheus text format: ``mptkern_queue_depth`` (requests waiting in the server
  queue and in the engine), ``mptkern_server_queued``, ``mptkern_requests_running``,
  ``mptkern_kv_blocks_used`` / ``_total``, counters ``mptkern_generated_tokens_total`` (rate() of it
  is tokens/s), ``mptkern_prompt_tokens_total``, ``mptkern_preemptions_total`` and
  ``mptkern_http_requests_total{endpoint, status}``.

Fields, both generation endpoints: ``model``, ``max_tokens`` (default ``default_max_tokens``, 16,
OpenAI's completions default; chat also takes ``max_completion_tokens``), ``n`` (1..128 choices in
all), ``temperature`` (0..2, default 1 as in OpenAI; 0 is greedy, so ``n`` greedy copies are
identical), ``top_p`` (0 < p <= 1), ``seed`` (int64; sample ``j`` of each prompt uses ``seed + j``,
so the choices of one request differ and the same prompt, seed and ``n`` always give the same
choices, alone or in a list), ``stop`` (a string or up to 16 non-empty strings; the text is cut
before it), ``stream``, ``stream_options: {"include_usage": bool}`` (only with ``stream``),
``user`` (and chat's ``safety_identifier``: the caller's ids, accepted and not used).
Accepted only at their neutral value, else a 400 naming the field: ``frequency_penalty`` and
``presence_penalty`` (0), ``logit_bias`` (``{}``), completions' ``echo`` (false: the engine gives no
prompt log-probabilities), ``suffix`` (null), ``best_of`` (null or ``n``); chat's ``tools`` and
``functions`` (``[]``), ``tool_choice`` and ``function_call`` (``"none"``), ``response_format``
(``{"type": "text"}``), ``modalities`` (``["text"]``), ``store`` (false), ``service_tier``
(``"auto"``/``"default"``), ``parallel_tool_calls``, ``metadata``, ``audio``, ``prediction``,
``reasoning_effort`` (null). Any other field is a 400 (pydantic ``extra="forbid"``), and values are
checked strictly (``"3"`` is no integer).

Streaming (``"stream": true``): server-sent events ``data: {chunk}\\n\\n``, one per engine step that
settled new text for a choice, then ``data: [DONE]\\n\\n``. Completions chunks are
``text_completion`` objects with one choice each (``text``, ``logprobs`` of the chunk's tokens,
``finish_reason`` on the choice's last chunk); chat chunks are ``chat.completion.chunk`` objects
whose first chunk per choice has ``delta: {"role": "assistant", "content": ""}`` and the others
``delta: {"content": ...}``. Text a later token may still change (an incomplete character, the start
of a stop string) is held back until settled, so the chunks add up to the non-streamed text. With
``include_usage`` every chunk carries ``"usage": null`` and a last chunk ``"choices": []`` carries
the usage. An error after the stream started is sent as a ``data: {"error": {...}}`` event before
``[DONE]``; errors before it (the engine refusing the request) are plain HTTP errors.

Errors are OpenAI error objects ``{"error": {"message", "type", "param", "code"}}``, FastAPI's own
validation, 404 and 405 answers included: 400 malformed JSON, a body that is not an object, missing,
unknown, unsupported or invalid fields (``param`` names the field, e.g. ``temperature`` or
``messages.0.role``) and requests the engine refuses (its ``ValueError``: an input too long for
``max_seq_len``, ...); 404 unknown model (``code: model_not_found``) or path; 405 wrong method; 413
body over ``max_body`` bytes; 429 (``Retry-After``) when the bounded queue is full; 503
(``Retry-After``) while shutting down; 504 when a request waits longer than ``request_timeout``; 500
when the engine fails (every request it was running gets the 500; the server and the engine thread
go on) or anything else goes wrong.

Threading: uvicorn runs one asyncio event loop (in a background thread for :meth:`Server.start`, in
the caller's for :func:`serve`) for all HTTP work. One engine thread owns the engine (it alone calls
``submit``, ``step``, ``cancel`` and ``metrics``, as the engine is not thread-safe): handlers put
jobs and cancellations into its inbox; it moves jobs into the engine while it holds fewer than
``max_batch`` requests (a request the engine refuses fails alone), runs ``step()`` and hands every
job its updates back with ``loop.call_soon_threadsafe`` (one call per step). So a request joins the
running batch at the step after it arrives. Requests accepted and not yet in the engine are bounded
by ``max_queue`` (counted in choices). A client that disconnects, streaming or not, cancels its
request and frees its engine slot. :meth:`Server.shutdown` (or Ctrl-C) stops admitting (503), lets
the engine finish and answer every accepted request, for ``drain_timeout`` seconds at most (the
rest then get a 503 error object), and only then stops uvicorn: nothing accepted goes unanswered.

Libraries (the ``serve`` extra): FastAPI for routing, request validation into pydantic models and
exception handlers, so every error path has one place that shapes it; uvicorn, the ASGI server
FastAPI runs on, with graceful connection shutdown; pydantic for the request and response models
(:mod:`mptkern.serve.protocol`) with strict, forbid-extra validation and located errors;
prometheus-client for the ``/metrics`` exposition format. This is the stack vLLM's and SGLang's
OpenAI servers use, so clients and monitoring built for them work here.
"""

import asyncio
import collections
import functools
import importlib
import json
import socket
import threading
import time
import uuid

from mptkern.serve.engine import Request

__all__ = ["Server", "serve", "require_serve_stack"]

_SERVE_PACKAGES = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus-client"),
                   ("pydantic", "pydantic"))
_MIN_LOGPROB = -9999.0  # JSON has no -inf; a token the model rules out is reported with this


def require_serve_stack() -> None:
    """Raise :class:`~mptkern._optional.MissingDependency` (one line with the pip command) unless the
    ``serve`` extra's packages are importable."""
    missing = []
    for module, package in _SERVE_PACKAGES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] != module:
                raise
            missing.append(package)
    if missing:
        from mptkern._optional import MissingDependency, declared

        raise MissingDependency(f"the HTTP server needs {', '.join(missing)} (the 'serve' extra), not installed: "
                                "pip install " + " ".join(f"'{declared(p)}'" for p in missing))


class APIError(Exception):
    """An HTTP error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *, param=None, code=None,
                 headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _shutting_down(retry_after) -> APIError:
    return APIError(503, "the server is shutting down", "service_unavailable_error", code="shutting_down",
                    headers={"Retry-After": str(retry_after)})


class _Job:
    """One HTTP request's engine requests (its choices) on their way through the engine thread.

    ``future`` (resolved on the event loop) gets ``("admitted", None)`` for a streamed job once the
    engine took it, ``("done", results)`` for a non-streamed one, or ``("error", APIError)``;
    ``events`` (streamed jobs) then gets ``("update", (choice, Update, token strings))`` and at most
    one ``("error", APIError)``. The other fields belong to the engine thread."""

    __slots__ = ("requests", "stream", "logprobs", "loop", "future", "events", "rids", "results", "left",
                 "admitted", "closed")

    def __init__(self, requests, stream: bool, logprobs: bool, loop):
        self.requests, self.stream, self.logprobs, self.loop = requests, stream, logprobs, loop
        self.future = loop.create_future()
        self.events = asyncio.Queue() if stream else None
        self.rids: list[int] = []
        self.results = [None] * len(requests)
        self.left = len(requests)
        self.admitted = False
        self.closed = False  # answered, failed or cancelled: no more events


def _deliver(batch) -> None:
    """On the event loop: hand the engine thread's events to their jobs."""
    for job, kind, payload in batch:
        if kind == "update":
            job.events.put_nowait((kind, payload))
        elif not job.future.done():
            job.future.set_result((kind, payload))
        elif kind == "error" and job.events is not None:
            job.events.put_nowait((kind, payload))


class _Worker:
    """The engine thread: the only caller of the engine."""

    def __init__(self, engine, *, max_queue: int, max_batch: int, retry_after: int):
        self.engine = engine
        self.max_queue, self.max_batch, self.retry_after = max_queue, max_batch, retry_after
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.queued = 0  # choices accepted and not yet in the engine (under _lock)
        self._closed = False  # under _lock: the thread has stopped taking jobs
        self.draining = False
        self._deadline = None
        self._waiting: collections.deque[_Job] = collections.deque()
        self._active: dict[int, tuple[_Job, int]] = {}  # engine request id -> (job, choice)
        self._outbox: list = []
        self._names: dict[int, str] = {}
        self.metrics: dict = {}
        self.on_exit = None
        self.thread = threading.Thread(target=self._run, name="mptkern-engine", daemon=True)

    # -- from any thread ---------------------------------------------------------------------------
    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._closed or self.draining:
                raise _shutting_down(self.retry_after)
            if self.queued + len(job.requests) > self.max_queue:
                raise APIError(429, f"the request queue is full ({self.queued} of {self.max_queue} waiting); retry later",
                               "rate_limit_error", code="queue_full", headers={"Retry-After": str(self.retry_after)})
            self.queued += len(job.requests)
            self._inbox.append(("job", job))
        self._wake.set()

    def cancel(self, job: _Job) -> None:
        self._inbox.append(("cancel", job))
        self._wake.set()

    def drain(self, timeout: float) -> None:
        """Stop taking jobs; finish the accepted ones within ``timeout`` seconds, then fail the rest."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self.draining = True  # after the deadline: the engine thread reads them in this order
        self._wake.set()

    @property
    def num_active(self) -> int:
        return len(self._active)

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not (self._active or self._waiting or self._inbox):
                    if self.draining:
                        break
                    self._wake.wait(0.1)
                    self._wake.clear()
                self._read_inbox()
                if self.draining and time.monotonic() >= self._deadline:
                    self._fail_all(APIError(503, "the server shut down before this request finished (drain timeout)",
                                            "service_unavailable_error", code="shutting_down"))
                    break
                self._admit()
                self._snapshot()  # also while a step runs, /metrics shows what it runs
                self._flush()  # streams start (their headers go out) before their first step
                if self._active:
                    self._step()
                    self._snapshot()
                self._flush()
        except BaseException as exc:  # noqa: BLE001 -- never expected; still answer everyone below
            self._fail_all(APIError(500, f"server error: {type(exc).__name__}: {exc}", "server_error"))
        finally:
            with self._lock:
                self._closed = True
            self._read_inbox()
            self._fail_all(_shutting_down(self.retry_after))
            self._snapshot()
            self._flush()
            if self.on_exit is not None:
                self.on_exit()

    def _read_inbox(self) -> None:
        while self._inbox:
            kind, job = self._inbox.popleft()
            if kind == "job":
                self._waiting.append(job)
            elif not job.closed:  # a cancellation: the client left
                job.closed = True
                if job.admitted:
                    self._release(job)
                else:
                    self._waiting.remove(job)
                    self._dequeued(job)

    def _dequeued(self, job: _Job) -> None:
        with self._lock:
            self.queued -= len(job.requests)

    def _release(self, job: _Job) -> None:
        """Take the job's requests out of the engine."""
        for rid in job.rids:
            if self._active.pop(rid, None) is not None:
                self._cancel_in_engine(rid)

    def _cancel_in_engine(self, rid: int) -> None:
        try:
            self.engine.cancel(rid)
        except Exception:  # noqa: BLE001 -- the job is answered even if the engine is broken
            pass

    def _fail(self, job: _Job, error: APIError) -> None:
        if not job.closed:
            job.closed = True
            self._release(job)
            self._outbox.append((job, "error", error))

    def _fail_all(self, error: APIError) -> None:
        while self._waiting:
            job = self._waiting.popleft()
            self._dequeued(job)
            self._fail(job, error)
        for job, _ in list(self._active.values()):
            self._fail(job, error)

    def _admit(self) -> None:
        while self._waiting and self.engine.num_pending < self.max_batch:
            job = self._waiting.popleft()
            self._dequeued(job)
            try:
                for request in job.requests:
                    job.rids.append(self.engine.submit(request, stream=job.stream))
            except (TypeError, ValueError) as exc:
                where = f"choice {len(job.rids)}: " if len(job.requests) > 1 else ""
                error = APIError(400, f"{where}{exc}")
            except Exception as exc:  # noqa: BLE001 -- e.g. the tokenizer failing on this text
                error = APIError(500, f"engine error: {type(exc).__name__}: {exc}", "server_error")
            else:
                job.admitted = True
                self._active.update((rid, (job, i)) for i, rid in enumerate(job.rids))
                if job.stream:
                    self._outbox.append((job, "admitted", None))
                continue
            for rid in job.rids:  # the choices submitted before the one refused
                self._cancel_in_engine(rid)
            self._fail(job, error)

    def _step(self) -> None:
        try:
            updates = self.engine.step()
        except Exception as exc:  # noqa: BLE001 -- fail what ran, keep serving
            self._fail_all_active(APIError(500, f"engine error: {type(exc).__name__}: {exc}", "server_error"))
            return
        for update in updates:
            entry = self._active.get(update.request_id)
            if entry is None:
                continue
            job, choice = entry
            result = update.result
            if result is not None:
                del self._active[update.request_id]
            if job.closed:
                continue
            if job.stream:
                self._outbox.append((job, "update", (choice, update, self._strings(job, update, None))))
            elif result is not None:
                job.results[choice] = (result, self._strings(job, None, result))
            if result is not None:
                job.left -= 1
                if job.left == 0:
                    job.closed = True
                    if not job.stream:
                        self._outbox.append((job, "done", job.results))

    def _fail_all_active(self, error: APIError) -> None:
        for job, _ in list(self._active.values()):
            self._fail(job, error)

    def _strings(self, job: _Job, update, result) -> dict | None:
        """Token id -> string for the ids a logprobs answer names (decoded here, on the tokenizer's thread)."""
        if not job.logprobs:
            return None
        if update is not None:
            ids = [update.token_id, *(t for t, _ in update.top_logprobs or ())]
        else:
            ids = [*result.token_ids, *(t for top in result.top_logprobs or () for t, _ in top)]
        names = self._names
        if len(names) > 1 << 16:
            names.clear()
        out = {}
        for t in ids:
            if t not in names:
                names[t] = self.engine.tokenizer.decode([t], skip_special_tokens=False)
            out[t] = names[t]
        return out

    def _snapshot(self) -> None:
        try:
            m = dict(self.engine.metrics())
        except Exception:  # noqa: BLE001 -- metrics must never take the engine thread down
            m = {}
        m["server_queued"] = self.queued
        self.metrics = m

    def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        by_loop: dict = {}
        for item in batch:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is gone: nobody is left to answer
                pass


# -- answer formats ----------------------------------------------------------------------------------
def _lp(x: float) -> float:
    return x if x > _MIN_LOGPROB else _MIN_LOGPROB


class _Answer:
    """Builds one request's response or chunks, in the completions or the chat format."""

    def __init__(self, chat: bool, model: str, n: int, choices: int, top: int | None, include_usage: bool):
        self.chat, self.model, self.n, self.top, self.include_usage = chat, model, n, top, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.offsets = [0] * choices  # completions logprobs: text_offset of each choice's next token
        self.pending = [[] for _ in range(choices)]  # streamed tokens whose text is not sent yet
        self.results = [None] * choices

    # logprobs of tokens (id, logprob, [(id, logprob)...]) in this format
    def logprobs(self, choice: int, tokens, names) -> dict | None:
        if self.top is None:
            return None
        if self.chat:
            def entry(t, lp):
                s = names[t]
                return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in tops]}
                                for t, lp, tops in tokens], "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, tops in tokens:
            s = names[t]
            top = {}
            for a, b in tops:
                top.setdefault(names[a], _lp(b))
            top.setdefault(s, _lp(lp))
            out["tokens"].append(s)
            out["token_logprobs"].append(_lp(lp))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offsets[choice])
            self.offsets[choice] += len(s)
        return out

    def usage(self) -> dict:
        results = [r for r in self.results if r is not None]
        prompt = sum(r.prompt_tokens for i, r in enumerate(self.results) if r is not None and i % self.n == 0)
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model}

    def _chunk(self, choice: int, text: str | None, logprobs, finish_reason, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            c = {"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            c = {"index": choice, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        chunk = {**self._head(), "choices": [c]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def start_chunks(self) -> list[dict]:
        return [self._chunk(i, None, None, None, role=True) for i in range(len(self.results))] if self.chat else []

    def update_chunk(self, choice: int, update, names) -> dict | None:
        """The chunk for one engine update, or None while its text is held back."""
        if self.top is not None:
            self.pending[choice].append((update.token_id, update.logprob, update.top_logprobs or ()))
        result = update.result
        if result is not None:
            self.results[choice] = result
        elif not update.text:
            return None
        tokens, self.pending[choice] = self.pending[choice], []
        return self._chunk(choice, update.text or (None if self.chat else ""), self.logprobs(choice, tokens, names),
                           None if result is None else result.finish_reason)

    def usage_chunk(self) -> dict:
        return {**self._head(), "choices": [], "usage": self.usage()}

    def response(self, results) -> dict:
        """The non-streamed answer from ``[(Result, token strings)]`` in choice order."""
        choices = []
        for i, (result, names) in enumerate(results):
            self.results[i] = result
            lps = None
            if self.top is not None:
                tokens = zip(result.token_ids, result.logprobs or (), result.top_logprobs or ())
                lps = self.logprobs(i, tokens, names)
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": result.text}, "logprobs": lps,
                                "finish_reason": result.finish_reason})
            else:
                choices.append({"index": i, "text": result.text, "logprobs": lps, "finish_reason": result.finish_reason})
        return {**self._head(), "object": "chat.completion" if self.chat else "text_completion", "choices": choices,
                "usage": self.usage()}


def _sse(payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"


async def _disconnected(receive) -> None:
    """Return when the client has gone (the request body was read before)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# -- the server --------------------------------------------------------------------------------------
class Server:
    """An OpenAI-compatible HTTP server over a :class:`MultiTaskEngine` (see the module docstring).

    ``Server(engine, port=0).start()`` runs uvicorn in a background thread (``.url``; port 0 picks
    a free port, bound in the constructor) and the engine thread; :meth:`serve_forever` runs uvicorn
    in the calling thread until Ctrl-C or :meth:`shutdown`; a ``with Server(...) as s:`` block starts
    and shuts it down.

    Args:
        max_queue: choices (prompts x ``n``) accepted and waiting for the engine at most; more get 429.
        max_body: request body bytes at most (413 above).
        max_batch: requests in the engine at once (running or waiting there) at most.
        request_timeout: seconds a request may wait for its answer (streamed: for its next event)
            before a 504 and its cancellation.
        drain_timeout: seconds :meth:`shutdown` lets accepted requests finish; the rest get 503.
        default_max_tokens: ``max_tokens`` of a request that gives none.
        retry_after: the ``Retry-After`` seconds of 429 and 503 answers.
        log_level: uvicorn's.
    """

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8000, *, max_queue: int = 256,
                 max_body: int = 1 << 20, max_batch: int = 64, request_timeout: float = 600.0,
                 drain_timeout: float = 30.0, default_max_tokens: int = 16, retry_after: int = 1,
                 log_level: str = "warning"):
        require_serve_stack()
        if min(max_queue, max_body, max_batch, default_max_tokens) < 1:
            raise ValueError("max_queue, max_body, max_batch and default_max_tokens must be >= 1")
        if request_timeout <= 0 or drain_timeout < 0:
            raise ValueError("request_timeout must be > 0 and drain_timeout >= 0")
        import uvicorn

        self.engine = engine
        self.max_queue, self.max_body, self.request_timeout = max_queue, max_body, request_timeout
        self.drain_timeout, self.default_max_tokens, self.retry_after = drain_timeout, default_max_tokens, retry_after
        self._worker = _Worker(engine, max_queue=max_queue, max_batch=max_batch, retry_after=retry_after)
        self._worker.on_exit = self._engine_thread_done
        self.registry, self._http_requests = _metrics_registry(self)
        self.app = _FrontDoor(_build_app(self), self)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self._address = self._socket.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level=log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=10, backlog=4096)
        self._uvicorn = _uvicorn_class()(config, self)
        self._thread: threading.Thread | None = None
        self._shutdown_started = False

    # -- state -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def queued(self) -> int:
        """Choices accepted and not yet in the engine."""
        return self._worker.queued

    @property
    def active(self) -> int:
        """Choices in the engine (waiting there or running)."""
        return self._worker.num_active

    @property
    def accepting(self) -> bool:
        return not self._worker.draining

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "Server":
        """Start the engine thread and uvicorn in background threads; returns self once serving."""
        self._worker.thread.start()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="mptkern-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.shutdown(drain_timeout=0)
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until Ctrl-C (drain, then stop) or :meth:`shutdown`."""
        self._worker.thread.start()
        try:
            self._uvicorn.run(sockets=[self._socket])
        except KeyboardInterrupt:
            pass
        finally:
            self._begin_shutdown(0)
            self._worker.thread.join(10)
            self._socket.close()

    def shutdown(self, drain_timeout: float | None = None, timeout: float = 30.0) -> None:
        """Stop admitting (503), let the accepted requests finish for ``drain_timeout`` seconds (the
        constructor's by default) and answer them, then stop uvicorn and the engine thread."""
        self._begin_shutdown(self.drain_timeout if drain_timeout is None else drain_timeout)
        if self._worker.thread.is_alive():
            self._worker.thread.join((self.drain_timeout if drain_timeout is None else drain_timeout) + timeout)
        if self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout)
            self._thread = None
        self._socket.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _begin_shutdown(self, drain_timeout: float) -> None:
        self._shutdown_started = True
        if self._worker.thread.is_alive():
            self._worker.drain(drain_timeout)
        else:
            self._worker.draining = True
            self._engine_thread_done()

    def _engine_thread_done(self) -> None:
        """Every accepted request is answered: let uvicorn send the last bytes and stop."""
        self._uvicorn.should_exit = True

    # -- requests (on the event loop) --------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model not in self.engine.task_names:
            raise APIError(404, f"the model {model!r} does not exist; the models (tasks) are {self.engine.task_names}",
                           param="model", code="model_not_found")

    def _engine_request(self, body, j: int, top: int | None, **source) -> Request:
        max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None) or self.default_max_tokens
        return Request(body.model, max_new_tokens=max_tokens,
                       temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=1.0 if body.top_p is None else body.top_p,
                       seed=None if body.seed is None else body.seed + j,  # sample j of a prompt: seed + j
                       stop=body.stop or (), logprobs=top, **source)

    async def _run(self, request, body, answer: _Answer, requests, top):
        """Submit the job and answer it: a JSON response, or the SSE stream."""
        from starlette.responses import Response, StreamingResponse

        if len(requests) > self.max_queue:
            raise APIError(400, f"'n': the request asks for {len(requests)} choices; this server queues {self.max_queue} "
                           "at most", param="n")
        job = _Job(requests, bool(body.stream), top is not None, asyncio.get_running_loop())
        self._worker.submit(job)
        kind, payload = await self._wait(job, request)
        if kind == "error":
            raise payload
        if not body.stream:
            return Response(json.dumps(answer.response(payload), separators=(",", ":")), media_type="application/json")
        return StreamingResponse(self._stream(job, answer), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _wait(self, job: _Job, request):
        """The job's future, or a cancellation when the client leaves or the wait times out."""
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({job.future, watcher}, timeout=self.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._worker.cancel(job)
            raise
        finally:
            watcher.cancel()
        if job.future.done():
            return job.future.result()
        self._worker.cancel(job)
        if watcher in done:
            return "error", APIError(499, "the client closed the connection")  # nobody reads it
        return "error", APIError(504, f"no answer within {self.request_timeout} s", "timeout_error", code="timeout")

    async def _stream(self, job: _Job, answer: _Answer):
        finished = False
        try:
            for chunk in answer.start_chunks():
                yield _sse(chunk)
            left = len(job.requests)
            while left:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), self.request_timeout)
                except asyncio.TimeoutError:
                    yield _sse(APIError(504, f"no new text within {self.request_timeout} s", "timeout_error",
                                        code="timeout").body())
                    break
                if kind == "error":
                    yield _sse(payload.body())
                    break
                choice, update, names = payload
                if update.result is not None:
                    left -= 1
                chunk = answer.update_chunk(choice, update, names)
                if chunk is not None:
                    yield _sse(chunk)
            else:
                finished = True
                if answer.include_usage:
                    yield _sse(answer.usage_chunk())
            yield _sse("[DONE]")
        finally:
            if not finished:  # the client left, the stream failed or timed out: free the engine slots
                self._worker.cancel(job)

    async def completions(self, body, request):
        self._check_model(body.model)
        n = body.n or 1
        top = body.logprobs
        requests = [self._engine_request(body, j, top, **({"text": p} if isinstance(p, str) else {"input_ids": p}))
                    for p in body.prompt for j in range(n)]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        answer = _Answer(False, body.model, n, len(requests), top, include_usage)
        return await self._run(request, body, answer, requests, top)

    async def chat_completions(self, body, request):
        self._check_model(body.model)
        n = body.n or 1
        top = (body.top_logprobs or 0) if body.logprobs else None
        tokenizer = self.engine.tokenizer
        if not hasattr(tokenizer, "apply_chat_template"):
            raise APIError(400, "'messages': this model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        try:
            text = tokenizer.apply_chat_template([m.as_template_input() for m in body.messages], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 -- a template that refuses these messages (or none set)
            raise APIError(400, f"'messages': the chat template failed: {exc}", param="messages") from None
        requests = [self._engine_request(body, j, top, text=text) for j in range(n)]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        answer = _Answer(True, body.model, n, n, top, include_usage)
        return await self._run(request, body, answer, requests, top)


@functools.cache
def _uvicorn_class():
    import uvicorn

    class Uvicorn(uvicorn.Server):
        """uvicorn whose Ctrl-C first drains the engine (a second Ctrl-C forces the exit)."""

        def __init__(self, config, owner):
            super().__init__(config)
            self._owner = owner

        def handle_exit(self, sig, frame):
            if self._owner._shutdown_started:
                self.should_exit = self.force_exit = True
            else:
                self._owner._begin_shutdown(self._owner.drain_timeout)

    return Uvicorn


def _metrics_registry(server: Server):
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class EngineCollector:
        def collect(self):
            m = {**server._worker.metrics, "server_queued": server._worker.queued}
            gauges = {"mptkern_queue_depth": ("requests waiting: in the server queue and in the engine",
                                              m.get("server_queued", 0) + m.get("waiting", 0)),
                      "mptkern_server_queued": ("choices accepted by the server, not yet in the engine",
                                                m.get("server_queued", 0)),
                      "mptkern_requests_running": ("requests running in the engine", m.get("running", 0)),
                      "mptkern_kv_blocks_used": ("K/V cache blocks in use", m.get("kv_blocks_used", 0)),
                      "mptkern_kv_blocks_total": ("K/V cache blocks in the pool", m.get("kv_blocks_total", 0))}
            for name, (doc, value) in gauges.items():
                yield GaugeMetricFamily(name, doc, value=value)
            counters = {"mptkern_generated_tokens": ("tokens generated (rate() is tokens/s)", "generated_tokens_total"),
                        "mptkern_prompt_tokens": ("prompt tokens prefilled", "prompt_tokens_total"),
                        "mptkern_preemptions": ("requests preempted for K/V memory", "preemptions_total")}
            for name, (doc, key) in counters.items():
                yield CounterMetricFamily(name, doc, value=m.get(key, 0))

        def describe(self):
            return []

    registry = CollectorRegistry()
    registry.register(EngineCollector())
    http = Counter("mptkern_http_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"],
                   registry=registry)
    return registry, http


_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _FrontDoor:
    """ASGI middleware in front of FastAPI: reads the body with the ``max_body`` limit (413), so
    that every POST body is parsed as JSON whatever its Content-Type, and counts answers by status."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/") or "/"
        endpoint = path if path in _ENDPOINTS else "other"
        status = []

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body, too_large = await self._read(receive)
                if body is None:  # the client left before sending its body
                    return
                if too_large:
                    return await _send_json(counted_send, APIError(
                        413, f"the request body exceeds the limit of {self.server.max_body} bytes",
                        code="request_too_large"), close=True)
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")]}
                receive = _replay(body, receive)
            await self.app(scope, receive, counted_send)
        finally:
            if status:
                self.server._http_requests.labels(endpoint, str(status[0])).inc()

    async def _read(self, receive):
        """(body, too large); a refused body is read and dropped up to 16x the limit, so the client
        gets the 413 rather than a reset connection."""
        limit = self.server.max_body
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, False
            data = message.get("body", b"")
            size += len(data)
            if size <= limit:
                chunks.append(data)
            elif size > 16 * limit:
                return b"", True
            more = message.get("more_body", False)
        return (b"", True) if size > limit else (b"".join(chunks), False)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send, error: APIError, close: bool = False) -> None:
    data = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _error_response(error: APIError):
    from starlette.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_error(exc) -> APIError:
    """FastAPI's RequestValidationError -> a 400 naming the first bad field."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ())]
    if loc[:1] == ["body"]:
        loc = loc[1:]
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid value"))
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(400, f"malformed JSON body: {detail} at character {loc[0] if loc else '?'}")
    param = ".".join(loc) or None
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if param is None and msg.startswith("'") and "'" in msg[1:]:
        param = msg[1:msg.index("'", 1)]  # a whole-body check names its field first
    if kind == "missing" and not loc:
        return APIError(400, "the request body must be a JSON object")
    if kind in ("model_attributes_type", "model_type", "dict_type") and not loc:
        return APIError(400, "the request body must be a JSON object")
    if kind == "extra_forbidden":
        return APIError(400, f"unsupported field '{param}': this server does not implement it", param=param,
                        code="unsupported_field")
    if kind == "missing":
        return APIError(400, f"'{param}' is required", param=param)
    if msg.startswith("'"):  # the models' own checks name their field first
        return APIError(400, msg, param=param)
    got = err.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    return APIError(400, f"'{param}': {msg} (got {shown})", param=param)


def _build_app(server: Server):
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response

    from mptkern.serve import protocol

    app = FastAPI(title="mptkern", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        return _error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        if exc.status_code == 404:
            error = APIError(404, f"no such endpoint: {request.method} {request.url.path}", "not_found_error",
                             code="not_found")
        elif exc.status_code == 405:
            error = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                             code="method_not_allowed", headers=exc.headers)
        else:
            error = APIError(exc.status_code, str(exc.detail),
                             "invalid_request_error" if exc.status_code < 500 else "server_error", headers=exc.headers)
        return _error_response(error)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    ok = {200: {"description": "the answer, or server-sent events with stream=true"}}

    @app.post("/v1/completions", response_model=None, responses={**ok, 200: {"model": protocol.CompletionResponse}})
    async def completions(body: protocol.CompletionRequest, request: HTTPRequest):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", response_model=None,
              responses={**ok, 200: {"model": protocol.ChatCompletionResponse}})
    async def chat_completions(body: protocol.ChatCompletionRequest, request: HTTPRequest):
        return await server.chat_completions(body, request)

    @app.get("/v1/models", response_model=protocol.ModelList)
    async def models():
        return protocol.ModelList(data=[protocol.ModelCard(id=name) for name in server.engine.task_names])

    @app.get("/health")
    async def health():
        if not server.accepting:
            raise _shutting_down(server.retry_after)
        return JSONResponse({"status": "ok", "queued": server.queued, "running": server.active,
                             "tasks": len(server.engine.task_names)})

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(engine, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Serve ``engine`` on ``host:port`` in the calling thread until Ctrl-C (see :class:`Server`
    for the keyword arguments)."""
    server = Server(engine, host, port, **kwargs)
    print(f"mptkern: serving tasks {engine.task_names} on {server.url}", flush=True)
    server.serve_forever()
