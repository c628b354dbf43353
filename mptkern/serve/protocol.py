"""Request and response models of the OpenAI-compatible server (:mod:`mptkern.serve.server`).

Requests are validated strictly (``strict=True``: ``"3"`` is no integer, ``true`` no number;
``extra="forbid"``: a field the server does not know is a 400, never silently ignored). Fields that
OpenAI defines but this server does not implement are declared and accept only their neutral value
(``presence_penalty: 0``, ``logit_bias: {}``, ``tools: []``, ...), so a client that sends them as
their defaults works and one that asks for the feature gets a 400 naming the field. The field by
field list is in the server's module docstring.

Responses are the OpenAI shapes (``text_completion``, ``chat.completion``, ``chat.completion.chunk``,
``model``/``list``, ``{"error": {...}}``); the streamed chunks are built by the server as plain
dicts (thousands per second) with the same fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20  # top alternatives per token at most (the engine's limit)
MAX_CHOICES = 128  # prompts x n per request at most
MAX_STOP = 16  # stop strings at most
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is an int64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _neutral(name: str, value: Any, allowed: tuple, what: str) -> Any:
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise ValueError(f"'{name}' is not supported by this server; only {what} is accepted")
    return value


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str = Field(min_length=1, description="the task name (GET /v1/models lists them)")
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Any = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    user: str | None = None  # an end-user id for the caller's own tracking; not used
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("'stop' must be null, a string or a list of strings")
        if len(v) > MAX_STOP:
            raise ValueError(f"'stop' holds at most {MAX_STOP} strings")
        if not all(v):
            raise ValueError("'stop' strings must be non-empty")
        return tuple(v)

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        return _neutral(info.field_name, v, (None, 0, 0.0), "0")

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        return _neutral("logit_bias", v, (None, {}), "null or {}")

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed with 'stream': true")
        return self


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Any = Field(description="a string, a list of strings, a list of token ids or a list of such lists")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        """-> a list of prompts, each a non-empty string or a non-empty list of token ids."""
        def ids(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)

        if isinstance(v, str):
            v = [v]
        elif ids(v):
            v = [v]
        if not isinstance(v, list) or not v or not all((isinstance(p, str) and p) or ids(p) for p in v):
            raise ValueError("'prompt' must be a non-empty string, a list of non-empty strings, a list of token "
                             "ids (ints >= 0) or a list of such lists")
        if len(v) > MAX_CHOICES:
            raise ValueError(f"'prompt' holds at most {MAX_CHOICES} prompts")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        return _neutral("echo", v, (None, False), "false")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        return _neutral("suffix", v, (None,), "null")

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("'best_of' is not supported by this server; only null or best_of == n is accepted")
        if len(self.prompt) * (self.n or 1) > MAX_CHOICES:
            raise ValueError(f"'n': len(prompt) x n = {len(self.prompt) * (self.n or 1)} choices; at most {MAX_CHOICES}")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = Field(description='a string or a list of {"type": "text", "text": ...} parts')
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        """-> the text (parts joined)."""
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                       and isinstance(p["text"], str) for p in v):
            v = "".join(p["text"] for p in v)
        if not isinstance(v, str):
            raise ValueError("'content' must be a string or a list of {\"type\": \"text\", \"text\": string} parts "
                             "(this server takes text only)")
        return v

    def as_template_input(self) -> dict:
        message = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    safety_identifier: str | None = None  # like user: the caller's own id; not used
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    store: Any = None
    metadata: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        return _neutral("response_format", v, (None, {"type": "text"}), 'null or {"type": "text"}')

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v, info):
        return _neutral(info.field_name, v, (None, []), "null or []")

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v, info):
        return _neutral(info.field_name, v, (None, "none"), 'null or "none"')

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, v):
        return _neutral("modalities", v, (None, ["text"]), 'null or ["text"]')

    @field_validator("store")
    @classmethod
    def _no_store(cls, v):
        return _neutral("store", v, (None, False), "null or false")

    @field_validator("service_tier")
    @classmethod
    def _tier(cls, v):
        return _neutral("service_tier", v, (None, "auto", "default"), 'null, "auto" or "default"')

    @field_validator("parallel_tool_calls", "metadata", "audio", "prediction", "reasoning_effort")
    @classmethod
    def _null_only(cls, v, info):
        return _neutral(info.field_name, v, (None,), "null")

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("'max_tokens' and 'max_completion_tokens' differ; give one of them")
        return self


# -- responses ---------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions format: per token its string, log-probability, the top alternatives as
    ``{token string: logprob}`` and its offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class _Choice(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"] | None = None


class _Answer(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "mptkern"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
