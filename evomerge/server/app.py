"""The reference model service: a base model and LoRA adapters behind OpenAI-compatible routes.

``evomerge serve --model DIR_OR_HUB_ID [--adapters DIR] [--host 127.0.0.1] [--port N]
[--served-model-name NAME]`` (flags as vLLM names them; the bearer token comes from the environment
variable ``EVOMERGE_SERVE_TOKEN``). It implements the two black-box service levels evomerge drives:

* the merge service of Evo-Merging (Chen et al., arXiv 2509.12951; the authors' routes):
  ``POST /v1/sessions``, ``/v1/sessions/{id}/materialize`` and ``/v1/sessions/{id}/evaluate`` with
  ``alpha``/``beta`` lists, merged server-side by evomerge's ``lora_compose``; ``evaluate`` answers
  the mean teacher-forced cross-entropy (``loss``) and, beyond the authors' service, each example's
  (``per_example_loss``); a materialized merge is served as a model name;
* vLLM's runtime LoRA: ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``;

plus ``/v1/models``, ``/v1/completions`` (see ``completion_engine``) and ``/health``. Errors use
OpenAI's shape ``{"error": {"message", "type", "code"}}``. Requests run one at a time on one
thread; when more than ``max_pending`` wait, new ones get 429 with ``Retry-After``. Bodies over
``max_request_bytes`` get 413. It binds 127.0.0.1 unless told otherwise.
"""


import asyncio
import hmac
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import UserError
from evomerge.server.completion_engine import SamplingParams, complete
from evomerge.server.model_host import ModelHost, ServiceError

TOKEN_ENV = "EVOMERGE_SERVE_TOKEN"
MAX_REQUEST_BYTES = 1 << 20
MAX_PROMPTS = 64
"""Prompts in one completions request (the batch limit)."""
MAX_LOGPROBS = 20
"""vLLM's default ``--max-logprobs``."""
MAX_PENDING = 64
MAX_STOP = 4
"""Stop strings per request, as in the OpenAI reference."""

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}


class ServeError(UserError):
    """The service cannot start as asked (no token, no adapter directory): the message says why."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields a server may ignore (user, …)


class CompletionRequest(_Body):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    # fields of the reference this server does not implement: refused unless left at their defaults
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        """The fields set to something this server would otherwise silently ignore."""
        return [
            name
            for name, default in (("best_of", 1), ("suffix", None), ("presence_penalty", 0.0), ("frequency_penalty", 0.0))
            if getattr(self, name) not in (None, default)
        ] + (["logit_bias"] if self.logit_bias else [])


class LoadLoraRequest(_Body):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraRequest(_Body):
    lora_name: str
    lora_int_id: int | None = None


class Example(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    target: str


class SessionRequest(_Body):
    adapters: list[str] | None = Field(default=None, description="adapters of the session (default: all in the root)")
    examples: list[Example] = Field(default_factory=list, description="the validation data /evaluate scores")


class CoefficientsRequest(_Body):
    alpha: list[float]
    beta: list[float]
    tag: str | None = None


def error_body(status: int, message: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "code": code}}


class BodyLimit:
    """ASGI middleware answering 413 to a body over ``max_bytes`` (declared, or as it streams in)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = JSONResponse(
            error_body(413, f"The request body exceeds {self.max_bytes} bytes.", "request_too_large"), status_code=413
        )
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _TooLarge
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


class _TooLarge(Exception):
    pass


def _prompts(host: ModelHost, prompt: Any) -> list[tuple[list[int], str]]:
    """(token ids, echo text) per prompt, for each of the four prompt forms of the reference."""
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
            ids, text = list(item), host.tokenizer.decode(list(item))
        if not ids:
            raise ServiceError(400, "A prompt has no tokens.", "invalid_prompt")
        out.append((ids, text))
    return out


def _completions(host: ModelHost, request: CompletionRequest) -> dict[str, Any]:
    if request.stream:
        raise ServiceError(400, "Streaming is not supported by this server.", "unsupported_parameter")
    if request.n != 1:
        raise ServiceError(400, "Only n = 1 is supported by this server.", "unsupported_parameter")
    if request.unsupported():
        raise ServiceError(400, f"Not supported by this server: {', '.join(request.unsupported())}.", "unsupported_parameter")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ServiceError(400, f"stop takes at most {MAX_STOP} non-empty strings.", "invalid_stop")
    prompts = _prompts(host, request.prompt)
    for ids, _ in prompts:
        if len(ids) + request.max_tokens > host.max_positions:
            raise ServiceError(
                400,
                f"This model's maximum context length is {host.max_positions} tokens; the prompt has {len(ids)}"
                f" and max_tokens is {request.max_tokens}.",
                "context_length_exceeded",
            )
    params = SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=stop,
        logprobs=request.logprobs,
        echo=request.echo,
    )
    generator = torch.Generator()
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    with host.running(request.model) as model:
        for index, (ids, text) in enumerate(prompts):
            result = complete(model, host.tokenizer, ids, text, params, generator)
            choices.append({"index": index, **result.choice})
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
    return {
        "id": "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
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
    return {"loss": sum(losses) / len(losses), "per_example_loss": losses, "model": name}


def create_app(
    host: ModelHost,
    token: str,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_pending: int = MAX_PENDING,
) -> Any:
    """The FastAPI application over ``host``; every route but ``/health`` needs ``token``."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="evomerge model service", docs_url=None, redoc_url=None, openapi_url=None)
    lock = asyncio.Lock()
    pending = 0
    expected = f"Bearer {token}".encode()

    def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise ServiceError(401, "Missing or invalid bearer token.", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    async def run(fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread, after the requests already waiting; 429 when too many wait."""
        nonlocal pending
        if pending >= max_pending:
            raise ServiceError(
                429, f"The server is busy ({pending} requests waiting); retry later.", "rate_limit_exceeded", {"Retry-After": "1"}
            )
        pending += 1
        try:
            async with lock:
                return await asyncio.to_thread(fn)
        finally:
            pending -= 1

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.code), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        return JSONResponse(error_body(400, f"{where}: {first['msg']}" if where else first["msg"], "invalid_request"), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code), status_code=exc.status_code)

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "evomerge", "root": name, "parent": parent}
            for name, parent in host.model_names()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        return await run(lambda: _completions(host, body))

    @app.post("/v1/load_lora_adapter", dependencies=guarded)
    async def load_lora_adapter(body: LoadLoraRequest) -> PlainTextResponse:
        await run(lambda: host.load_adapter(body.lora_name, body.lora_path, body.load_inplace))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=guarded)
    async def unload_lora_adapter(body: UnloadLoraRequest) -> PlainTextResponse:
        await run(lambda: host.unload_adapter(body.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/sessions", dependencies=guarded)
    async def create_session(body: SessionRequest) -> dict[str, Any]:
        examples = [e.model_dump() for e in body.examples]
        session = await run(lambda: host.create_session(body.adapters, examples))
        return {"session_id": session.id, "adapters": session.adapters, "model": host.base_name}

    @app.post("/v1/sessions/{session_id}/materialize", dependencies=guarded)
    async def materialize(session_id: str, body: CoefficientsRequest) -> dict[str, Any]:
        def work() -> str:
            return host.materialize(host.session(session_id), body.alpha, body.beta, body.tag)

        return {"session_id": session_id, "model": await run(work), "tag": body.tag}

    @app.post("/v1/sessions/{session_id}/evaluate", dependencies=guarded)
    async def evaluate(session_id: str, body: CoefficientsRequest) -> dict[str, Any]:
        return await run(lambda: _evaluate(host, session_id, body))

    return BodyLimit(app, max_request_bytes)


def serve(
    model: str,
    adapters: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
) -> None:
    """Load the models and serve until interrupted (``evomerge serve``)."""
    import uvicorn

    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ServeError(f"set the environment variable {TOKEN_ENV} to the bearer token clients must send")
    if adapters is not None and not Path(adapters).is_dir():
        raise ServeError(f"--adapters: not a directory: {adapters}")
    from evomerge.models.loading import resolve_device

    model_host = ModelHost(model, served_model_name or model, None if adapters is None else Path(adapters), str(resolve_device("auto")))
    app = create_app(model_host, token)
    print(f"serving {model_host.base_name} and {len(model_host.adapters)} adapters on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
