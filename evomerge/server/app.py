"""The reference model service: a base model and LoRA adapters behind OpenAI-compatible routes.

``evomerge serve --model DIR_OR_HUB_ID [--adapters DIR] [--host 127.0.0.1] [--port N]
[--served-model-name NAME] [--max-loras N]`` (flags as vLLM names them; the bearer token comes
from the environment variable ``EVOMERGE_SERVE_TOKEN``). It implements the two black-box service
levels evomerge drives:

* the merge service of Evo-Merging (Chen et al., arXiv 2509.12951; the authors' routes):
  ``POST /v1/sessions``, ``/v1/sessions/{id}/materialize`` and ``/v1/sessions/{id}/evaluate`` with
  ``alpha``/``beta`` lists, merged server-side by evomerge's ``lora_compose``; ``evaluate`` answers
  the mean teacher-forced cross-entropy (``loss``) and, beyond the authors' service, each example's
  (``per_example_loss``); a materialized merge is served as a model name;
* vLLM's runtime LoRA: ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``;

plus ``/v1/models``, ``/v1/completions`` (see ``completion_engine``), ``/v1/chat/completions`` (the
tokenizer's chat template over the same engine), both with ``n`` choices per prompt (choice ``i``
seeded ``seed + i``), OpenAI's penalties and ``logit_bias`` (see ``sampling``), log-probabilities
in each route's shape, special tokens left out of the text unless ``skip_special_tokens`` is false
(vLLM's field and default), and both also streamed as server-sent events (``stream: true``, see
``streaming``), vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` (see
``tokenizer_routes``), and ``/health``. Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, a bug's too (500, logged, the
request not echoed). Requests run one at a time on one thread. Before a body is read, ``gate.Gate``
checks the token (401), the size (413) and how many requests are in progress (429); the request
models then bound every value the models compute with (temperatures, seeds, coefficients, text),
so a valid-JSON request the server cannot honour is a 4xx. ``connections`` bounds what idle and
slow connections hold. It binds 127.0.0.1 unless told otherwise.
"""


import asyncio
import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from evomerge.errors import UserError
from evomerge.server.completion_engine import NON_FINITE, Chunk, complete, stream
from evomerge.server.gate import INTERNAL_ERROR, Gate, error_body
from evomerge.server.model_host import MAX_LORAS, ModelHost, ServiceError
from evomerge.server.sampling import SamplingParams

TOKEN_ENV = "EVOMERGE_SERVE_TOKEN"
MAX_REQUEST_BYTES = 1 << 20
MAX_PROMPTS = 64
"""Prompts in one completions request (the batch limit)."""
MAX_LOGPROBS = 20
"""vLLM's default ``--max-logprobs``."""
MAX_PENDING = 64
MAX_STOP = 4
"""Stop strings per request, as in the OpenAI reference."""
MAX_MESSAGES = 256
"""Messages in one chat request."""
MAX_N = 16
"""Choices per prompt (``n``); each is generated in turn, so this bounds a request's work."""
MAX_CHOICES = 64
"""Choices in one request, over all its prompts (prompts × ``n``)."""
PENALTY_RANGE = (-2.0, 2.0)
"""OpenAI's range of ``presence_penalty`` and ``frequency_penalty``."""
BIAS_RANGE = (-100.0, 100.0)
"""OpenAI's range of a ``logit_bias`` value."""
MAX_BIASED_TOKENS = 300
"""Tokens in one ``logit_bias``, as OpenAI bounds it."""

BODY_TIMEOUT_S = 30.0
"""A request body must arrive whole within this (408 otherwise)."""
MIN_TEMPERATURE = 0.01
"""Below this (and above 0, greedy) logits / temperature overflow; vLLM warns at the same bound."""
MIN_TOP_P = 1e-5
"""vLLM's sampling epsilon; a smaller nucleus rounds to nothing in float32."""
MAX_COEFFICIENT = 1e3
"""|α| and |β| of a merge session; lora_compose searches β in [-1.5, 1.5] and clamps α to [0, 1]."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""What ``torch.Generator.manual_seed`` accepts."""
MAX_NAME = 256
MAX_PATH = 4096


class ServeError(UserError):
    """The service cannot start as asked (no token, no adapter directory): the message says why."""


def _unicode(text: str) -> str:
    """``text`` if it can be encoded (JSON's ``"\\ud800"`` decodes to a lone surrogate, which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Name = Annotated[str, Field(max_length=MAX_NAME), AfterValidator(_unicode)]
Coefficient = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_COEFFICIENT, le=MAX_COEFFICIENT)]
Penalty = Annotated[float, Field(allow_inf_nan=False, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])]
Bias = Annotated[float, Field(allow_inf_nan=False, ge=BIAS_RANGE[0], le=BIAS_RANGE[1])]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields a server may ignore (user, …)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(_Body):
    """What both completion routes take: how to sample, where to stop, whether to stream, and
    the reference's fields this server does not implement (refused unless left at their defaults).
    ``skip_special_tokens`` is vLLM's extra field (an SDK sends it in ``extra_body``)."""

    model: Name
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=MIN_TOP_P, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Bias] | None = Field(default=None, max_length=MAX_BIASED_TOKENS)
    skip_special_tokens: bool = True

    @field_validator("temperature")
    @classmethod
    def _greedy_or_stable(cls, value: float) -> float:
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    def unsupported(self) -> list[str]:
        """The fields set to something this server would otherwise silently ignore."""
        return []


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: Text | None = None

    def unsupported(self) -> list[str]:
        return (["best_of"] if self.best_of not in (None, self.n) else []) + (["suffix"] if self.suffix is not None else [])


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, … : nothing a chat template reads
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        """The message as chat templates read it: a role and one string (text parts joined)."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0, description="the newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        return (["tools"] if self.tools else []) + (
            ["response_format"] if self.response_format not in (None, {"type": "text"}) else []
        )


class LoadLoraRequest(_Body):
    lora_name: Name
    lora_path: Annotated[str, Field(max_length=MAX_PATH), AfterValidator(_unicode)]
    load_inplace: bool = False


class UnloadLoraRequest(_Body):
    lora_name: Name
    lora_int_id: int | None = None


class Example(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: Text
    target: Text


class SessionRequest(_Body):
    adapters: list[Name] | None = Field(default=None, description="adapters of the session (default: all in the root)")
    examples: list[Example] = Field(default_factory=list, description="the validation data /evaluate scores")


class CoefficientsRequest(_Body):
    alpha: list[Coefficient]
    beta: list[Coefficient]
    tag: Name | None = None


def _prompts(host: ModelHost, prompt: Any, skip_special_tokens: bool) -> list[tuple[list[int], str]]:
    """(token ids, echo text) per prompt, for each of the four prompt forms of the reference (a
    prompt of token ids echoes as their text, rendered as the completion is)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ServiceError(400, "prompt must not be empty.", "invalid_prompt")
    if len(prompt) > MAX_PROMPTS:
        raise ServiceError(400, f"At most {MAX_PROMPTS} prompts per request.", "too_many_prompts")
    vocab = len(host.tokenizer)
    out = []
    for item in prompt:
        if isinstance(item, str):
            ids = host.tokenizer(item)["input_ids"]
            text = item
        else:
            if any(not 0 <= t < vocab for t in item):
                raise ServiceError(400, f"Token ids must lie in [0, {vocab}).", "invalid_prompt")
            ids, text = list(item), host.tokenizer.decode(list(item), skip_special_tokens=skip_special_tokens)
        if not ids:
            raise ServiceError(400, "A prompt has no tokens.", "invalid_prompt")
        out.append((ids, text))
    return out


def _sampling(host: ModelHost, request: _Sampling, max_tokens: int, logprobs: int | None, **more: Any) -> SamplingParams:
    """The sampling parameters of a request this server can honour; a 400 naming what it cannot."""
    if request.stream_options is not None and not request.stream:
        raise ServiceError(400, "stream_options is only allowed when stream is true.", "invalid_stream_options", param="stream_options")
    if request.unsupported():
        unsupported = request.unsupported()
        raise ServiceError(400, f"Not supported by this server: {', '.join(unsupported)}.", "unsupported_parameter", param=unsupported[0])
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ServiceError(400, f"stop takes at most {MAX_STOP} non-empty strings.", "invalid_stop", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=stop,
        logprobs=logprobs,
        skip_special_tokens=request.skip_special_tokens,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=_logit_bias(host, request.logit_bias or {}),
        **more,
    )


def _logit_bias(host: ModelHost, bias: dict[str, float]) -> dict[int, float]:
    """``logit_bias`` keyed by token id, each a token of the model's vocabulary."""
    vocab = len(host.tokenizer)
    out = {}
    for key, value in bias.items():
        token = int(key) if key.isascii() and key.isdigit() else None
        if token is None or not 0 <= token < vocab:
            raise ServiceError(
                400, f"logit_bias: '{key[:40]}' is not a token id in [0, {vocab}).", "invalid_logit_bias", param="logit_bias"
            )
        out[token] = value
    return out


def _choice_generators(request: _Sampling) -> list[torch.Generator]:
    """One sampling generator per choice of a prompt: seeded ``seed + index`` (as vLLM seeds
    parallel samples), so each choice is the same whatever ``n`` and the other prompts."""
    generators = []
    for index in range(request.n):
        generator = torch.Generator()
        if request.seed is None:
            generator.seed()
        else:  # torch reads a negative seed s as 2⁶⁴ − 1 + s; the sum wraps around 2⁶⁴
            seed = request.seed if request.seed >= 0 else 2**64 - 1 + request.seed
            generator.manual_seed((seed + index) % 2**64)
        generators.append(generator)
    return generators


def _check_room(host: ModelHost, request: _Sampling, prompts: list[tuple[list[int], str]], max_tokens: int) -> None:
    """Refuse a request whose prompts or choices do not fit (the context, ``MAX_CHOICES``)."""
    if len(prompts) * request.n > MAX_CHOICES:
        raise ServiceError(
            400,
            f"n = {request.n} over {len(prompts)} prompts asks for {len(prompts) * request.n} choices; at most {MAX_CHOICES}.",
            "too_many_choices",
            param="n",
        )
    for ids, _ in prompts:
        if len(ids) + max_tokens > host.max_positions:
            raise ServiceError(
                400,
                f"This model's maximum context length is {host.max_positions} tokens; the prompt has {len(ids)}"
                f" and max_tokens is {max_tokens}.",
                "context_length_exceeded",
            )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


Choice = tuple[int, torch.nn.Module, list[int], str, torch.Generator]
"""One choice to make: its index, the model, its prompt's ids and text, and its sampling generator."""


def _choices(
    host: ModelHost, request: _Sampling, prompts: list[tuple[list[int], str]], max_tokens: int
) -> Iterator[Choice]:
    """Each choice of a request on ``request.model`` in turn: ``n`` per prompt, indexed
    ``prompt × n + choice`` as in the reference. The model stays in use until the iterator
    ends or is closed."""
    _check_room(host, request, prompts, max_tokens)
    with host.running(request.model) as model:
        for p, (ids, text) in enumerate(prompts):
            for c, generator in enumerate(_choice_generators(request)):
                yield p * request.n + c, model, ids, text, generator


def _run_prompts(
    host: ModelHost, request: _Sampling, prompts: list[tuple[list[int], str]], params: SamplingParams
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Each choice completed: the choices and the request's usage (each prompt counted once)."""
    choices, completion_tokens = [], 0
    for index, model, ids, text, generator in _choices(host, request, prompts, params.max_tokens):
        result = complete(model, host.tokenizer, ids, text, params, generator)
        choices.append({"index": index, **result.choice})
        completion_tokens += result.completion_tokens
    return choices, _usage(sum(len(ids) for ids, _ in prompts), completion_tokens)


def _streamed(
    host: ModelHost, request: _Sampling, prompts: list[tuple[list[int], str]], params: SamplingParams,
    chunk_choice: Callable[[int, Chunk, bool], dict[str, Any] | None], head: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """The events of a streamed request: ``head`` plus each chunk's choice (``chunk_choice(index,
    chunk, first of its choice)``, ``None`` to send nothing), choice after choice, then the usage
    when asked for. With ``include_usage`` every chunk carries ``usage: null`` and a last one,
    without choices, the usage."""
    with_usage = request.stream_options is not None and request.stream_options.include_usage
    head = {**head, "created": int(time.time()), "model": request.model}
    completion_tokens = 0
    for index, model, ids, text, generator in _choices(host, request, prompts, params.max_tokens):
        for number, chunk in enumerate(stream(model, host.tokenizer, ids, text, params, generator)):
            completion_tokens += chunk.completion_tokens
            choice = chunk_choice(index, chunk, number == 0)
            if choice is not None:
                yield {**head, "choices": [choice]} | ({"usage": None} if with_usage else {})
    if with_usage:
        yield {**head, "choices": [], "usage": _usage(sum(len(ids) for ids, _ in prompts), completion_tokens)}


def _completion_chunk(index: int, chunk: Chunk, first: bool) -> dict[str, Any] | None:
    """A completions chunk; an empty one (the prompt read, nothing echoed) is not sent."""
    if not (chunk.text or chunk.finish_reason or (chunk.logprobs and chunk.logprobs["tokens"])):
        return None
    return {"index": index, "text": chunk.text, "logprobs": chunk.logprobs, "finish_reason": chunk.finish_reason}


def _chat_chunk(index: int, chunk: Chunk, first: bool) -> dict[str, Any] | None:
    """A chat chunk: the first names the role (the prompt read), later ones carry the content
    and, when asked, the log-probabilities of its tokens."""
    if first:
        delta: dict[str, str] = {"role": "assistant", "content": chunk.text}
    elif chunk.text:
        delta = {"content": chunk.text}
    elif chunk.finish_reason or (chunk.logprobs and chunk.logprobs["content"]):
        delta = {}
    else:
        return None
    logprobs = chunk.logprobs if chunk.logprobs and chunk.logprobs["content"] else None
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": chunk.finish_reason}


def _completion_job(
    host: ModelHost, request: CompletionRequest
) -> tuple[list[tuple[list[int], str]], SamplingParams]:
    """The prompts and sampling parameters of a completions request."""
    params = _sampling(host, request, request.max_tokens, request.logprobs, echo=request.echo)
    return _prompts(host, request.prompt, request.skip_special_tokens), params


def _completion_events(host: ModelHost, request: CompletionRequest) -> Iterator[dict[str, Any]]:
    prompts, params = _completion_job(host, request)
    head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion"}
    yield from _streamed(host, request, prompts, params, _completion_chunk, head)


def _completions(host: ModelHost, request: CompletionRequest) -> dict[str, Any]:
    prompts, params = _completion_job(host, request)
    choices, usage = _run_prompts(host, request, prompts, params)
    return {
        "id": "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": usage,
    }


def _chat_prompt(host: ModelHost, request: ChatRequest) -> tuple[list[int], str]:
    """The conversation rendered by the tokenizer's chat template, ending where the assistant's
    turn begins, and its token ids (the template writes the special tokens itself)."""
    from jinja2 import TemplateError

    if not getattr(host.tokenizer, "chat_template", None):
        raise ServiceError(
            400, "This model's tokenizer has no chat template; send the prompt to /v1/completions.", "no_chat_template"
        )
    try:
        text = host.tokenizer.apply_chat_template(
            [m.as_template_input() for m in request.messages], add_generation_prompt=True, tokenize=False
        )
    except TemplateError as exc:  # templates raise on what they refuse (a system turn, roles out of order)
        raise ServiceError(400, f"The chat template refused the messages: {exc}", "invalid_messages") from None
    ids = host.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ServiceError(400, "The messages render to no tokens.", "invalid_messages")
    return ids, text


def _chat_job(host: ModelHost, request: ChatRequest) -> tuple[list[tuple[list[int], str]], SamplingParams]:
    """The rendered conversation (the one prompt) and the sampling parameters of a chat request."""
    if request.top_logprobs is not None and not request.logprobs:
        raise ServiceError(400, "top_logprobs needs logprobs set to true.", "invalid_request", param="top_logprobs")
    ids, text = _chat_prompt(host, request)
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_tokens = max(0, host.max_positions - len(ids)) if limit is None else limit  # the reference: up to the context
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return [(ids, text)], _sampling(host, request, max_tokens, logprobs, chat_logprobs=True)


def _chat_events(host: ModelHost, request: ChatRequest) -> Iterator[dict[str, Any]]:
    prompts, params = _chat_job(host, request)
    head = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk"}
    yield from _streamed(host, request, prompts, params, _chat_chunk, head)


def _chat_completions(host: ModelHost, request: ChatRequest) -> dict[str, Any]:
    prompts, params = _chat_job(host, request)
    choices, usage = _run_prompts(host, request, prompts, params)
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "logprobs": c["logprobs"],
                "finish_reason": c["finish_reason"],
            }
            for c in choices
        ],
        "usage": usage,
    }


def _evaluate(host: ModelHost, session_id: str, body: CoefficientsRequest) -> dict[str, Any]:
    from evomerge.errors import PluginError
    from evomerge.fitness.lm import continuation_logprobs

    session = host.session(session_id)
    if not session.examples:
        raise ServiceError(400, "This session was created without examples to evaluate on.", "no_examples")
    name = host.materialize(session, body.alpha, body.beta, body.tag)
    pairs = [(e["prompt"], e["target"]) for e in session.examples]
    with host.running(name) as model:
        try:
            logprobs = continuation_logprobs(model, host.tokenizer, pairs, 16, "evaluate")
        except PluginError as exc:
            raise ServiceError(400, str(exc), "invalid_examples") from None
    losses = [-float(lp.mean()) for lp in logprobs]
    if not all(math.isfinite(x) for x in losses):
        raise ServiceError(400, f"The merge '{name}' gives non-finite losses; its coefficients are too large.", NON_FINITE)
    return {"loss": sum(losses) / len(losses), "per_example_loss": losses, "model": name}


def create_app(
    host: ModelHost,
    token: str,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_pending: int = MAX_PENDING,
    body_timeout: float = BODY_TIMEOUT_S,
) -> Any:
    """The ASGI application over ``host``; every route but ``/health`` needs ``token``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    from evomerge.server.streaming import EventStream

    app = FastAPI(title="evomerge model service", docs_url=None, redoc_url=None, openapi_url=None)
    lock = asyncio.Lock()

    async def run(fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread, after the requests already waiting (``Gate`` bounds how many)."""
        async with lock:
            return await asyncio.to_thread(fn)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.code, exc.param), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return JSONResponse(error_body(400, message, "invalid_request", where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # starlette raises the exception on after this answer; Gate logs it
        return JSONResponse(error_body(500, INTERNAL_ERROR, "internal_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "evomerge", "root": name, "parent": parent}
            for name, parent in host.model_names()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> dict[str, Any] | EventStream:
        if body.stream:
            return EventStream(lock, lambda: _completion_events(host, body))
        return await run(lambda: _completions(host, body))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> dict[str, Any] | EventStream:
        if body.stream:
            return EventStream(lock, lambda: _chat_events(host, body))
        return await run(lambda: _chat_completions(host, body))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest) -> PlainTextResponse:
        await run(lambda: host.load_adapter(body.lora_name, body.lora_path, body.load_inplace))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest) -> PlainTextResponse:
        await run(lambda: host.unload_adapter(body.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/sessions")
    async def create_session(body: SessionRequest) -> dict[str, Any]:
        examples = [e.model_dump() for e in body.examples]
        session = await run(lambda: host.create_session(body.adapters, examples))
        return {"session_id": session.id, "adapters": session.adapters, "model": host.base_name}

    @app.post("/v1/sessions/{session_id}/materialize")
    async def materialize(session_id: str, body: CoefficientsRequest) -> dict[str, Any]:
        def work() -> str:
            return host.materialize(host.session(session_id), body.alpha, body.beta, body.tag)

        return {"session_id": session_id, "model": await run(work), "tag": body.tag}

    @app.post("/v1/sessions/{session_id}/evaluate")
    async def evaluate(session_id: str, body: CoefficientsRequest) -> dict[str, Any]:
        return await run(lambda: _evaluate(host, session_id, body))

    from evomerge.server import tokenizer_routes

    @app.post("/tokenize")
    async def tokenize(body: tokenizer_routes.TokenizeRequest) -> dict[str, Any]:
        return await run(lambda: tokenizer_routes.tokenize(host, body))

    @app.post("/detokenize")
    async def detokenize(body: tokenizer_routes.DetokenizeRequest) -> dict[str, str]:
        return await run(lambda: tokenizer_routes.detokenize(host, body))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return tokenizer_routes.tokenizer_info(host)

    return Gate(app, token, max_request_bytes, max_pending, body_timeout)


def serve(
    model: str,
    adapters: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    max_loras: int | None = None,
) -> None:
    """Load the models and serve until interrupted (``evomerge serve``)."""
    import uvicorn

    from evomerge.server.connections import server_config

    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ServeError(f"set the environment variable {TOKEN_ENV} to the bearer token clients must send")
    if adapters is not None and not Path(adapters).is_dir():
        raise ServeError(f"--adapters: not a directory: {adapters}")
    if adapters is not None and not os.access(adapters, os.R_OK | os.X_OK):
        raise ServeError(f"--adapters: cannot list {adapters} (permission denied); make it readable to this user")
    max_loras = MAX_LORAS if max_loras is None else max_loras
    if max_loras < 0:
        raise ServeError(f"--max-loras: must be 0 or more, not {max_loras}")
    from evomerge.models.loading import resolve_device

    listener = bind(host, port)  # before the model loads (minutes for a large one)
    console = logging.StreamHandler()  # skipped adapters and the tracebacks of bugs, on stderr
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("evomerge").addHandler(console)
    model_host = ModelHost(
        model, served_model_name or model, None if adapters is None else Path(adapters), str(resolve_device("auto")), max_loras
    )
    app = create_app(model_host, token)
    print(f"serving {model_host.base_name} and {len(model_host.adapters)} adapters on http://{host}:{port}", flush=True)
    uvicorn.Server(server_config(app, host, port)).run(sockets=[listener])


def bind(host: str, port: int) -> socket.socket:
    """The listening socket of ``--host`` and ``--port``; a ``ServeError`` naming the flag when
    the host does not resolve or the address is taken (uvicorn would log it and exit 3)."""
    from evomerge.server.connections import BACKLOG

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses a port in TIME_WAIT
        listener.bind(address)
        listener.listen(BACKLOG)
    except OSError as exc:
        listener.close()
        raise ServeError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return listener
