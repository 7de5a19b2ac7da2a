"""The black-box client: async httpx over an OpenAI-compatible model service.

One ``ApiClient`` per worker process holds a pooled ``httpx.AsyncClient`` and enforces:

* a concurrency limit (requests in flight) and an optional request rate (requests per second,
  paced evenly);
* a timeout per request that bounds the whole answer, not each read of it (a service trickling
  bytes would otherwise hold a request for ever), and retries of 429, 5xx, timeouts and
  connection failures with exponential backoff and jitter; a ``Retry-After`` on 429/503 is
  honoured instead. A request waiting to retry gives its place back, so the others keep the
  service busy;
* usage accounting: every HTTP attempt counts as a request; prompt and completion tokens come from
  the answers' ``usage``; cost is tokens times the configured per-token prices.

The API key is read once from the environment variable the config names; it lives only in the
request headers, never in messages, logs or the run store. An answer that is not what the
OpenAI reference promises (a field missing, text where JSON belongs, log-probabilities that are
none) raises ``MalformedResponse`` naming what is wrong, and a refused request raises ``ApiError``
with the service's own message; both fail only the candidate.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.errors import UserError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REFUSED_CREDENTIALS = frozenset({401, 403})
"""Statuses that refuse the key itself."""
SPENT_QUOTA = "insufficient_quota"
"""The OpenAI error code of a 429 that is no rate limit: the key's quota or credit is spent."""
MAX_RETRY_AFTER = 300.0
"""Longest ``Retry-After`` honoured, in seconds; a longer one is waited for this long."""
LOGPROB_TOLERANCE = 1e-6
"""How far above 0 a log-probability may round before it is no log-probability."""


class ApiError(Exception):
    """A request the service refused or that failed after every retry; ``status`` is None for
    transport failures. ``code`` is the OpenAI error code when the service sent one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def refuses_the_key(exc: ApiError) -> bool:
    """Whether the service refused the key itself (401/403, or a 429 saying its quota is spent):
    no retry, and no further request with that key, can succeed until the user acts."""
    return exc.status in REFUSED_CREDENTIALS or (exc.status == 429 and exc.code == SPENT_QUOTA)


class MalformedResponse(ApiError):
    """An answer without the fields the OpenAI reference promises."""


class ApiKeyMissing(UserError):
    """The environment variable that should hold the API key is not set."""


@dataclass
class Usage:
    """What the service was asked for: HTTP attempts, tokens, their cost, and retries among them."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    retries: int = 0

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def copy(self) -> "Usage":
        return Usage(**{f.name: getattr(self, f.name) for f in fields(self)})

    def metrics(self) -> dict[str, float]:
        """The evaluation metric ``usage``: requests, prompt_tokens, completion_tokens, cost."""
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": round(self.cost, 10),
        }


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")


AnswerT = TypeVar("AnswerT", bound=_Answer)


class LogprobsAnswer(_Answer):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]

    @model_validator(mode="after")
    def _sound(self) -> "LogprobsAnswer":
        """Refuse what would otherwise score as a number: a log-probability above 0 or NaN, or
        lists that do not line up token by token."""
        lengths = (len(self.token_logprobs), len(self.tokens), len(self.text_offset))
        if len(set(lengths)) > 1:
            raise ValueError(f"token_logprobs, tokens and text_offset differ in length {lengths}")
        bad = [x for x in self.token_logprobs if x is not None and not x <= LOGPROB_TOLERANCE]
        if bad:
            raise ValueError(f"{bad[0]} is no log-probability (NaN or above 0)")
        return self


class ChoiceAnswer(_Answer):
    index: int = 0
    text: str
    logprobs: LogprobsAnswer | None = None
    finish_reason: str | None = None


class UsageAnswer(_Answer):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class CompletionAnswer(_Answer):
    choices: list[ChoiceAnswer] = Field(min_length=1)
    usage: UsageAnswer | None = None


class MessageAnswer(_Answer):
    content: str | None = None
    """None where the model answered otherwise (a refusal, a tool call): no text to read."""


class ChatChoiceAnswer(_Answer):
    index: int = 0
    message: MessageAnswer
    finish_reason: str | None = None


class ChatAnswer(_Answer):
    choices: list[ChatChoiceAnswer] = Field(min_length=1)
    usage: UsageAnswer | None = None


def api_key_from_env(variable: str | None) -> str | None:
    """The key in ``variable`` (None: the service needs none); a missing variable is the user's to fix."""
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise ApiKeyMissing(f"set the environment variable {variable} to the API key (api.api_key_env names it)")
    return key


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(moment.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER)


class RatePacer:
    """At most ``rate`` request starts per second, evenly spaced."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        now = asyncio.get_running_loop().time()
        start = max(now, self._next)
        self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


class ApiClient:
    """A pooled async client of one service. Create and use it inside one event loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        concurrency: int = 32,
        requests_per_second: float | None = None,
        timeout: float = 60.0,
        max_retries: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        prompt_token_price: float = 0.0,
        completion_token_price: float = 0.0,
        seed: int | None = None,
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = service_root(base_url)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._transport_errors = (httpx.TimeoutException, httpx.TransportError)
        self.timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._pacer = RatePacer(requests_per_second) if requests_per_second else None
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.prices = (prompt_token_price, completion_token_price)
        self.usage = Usage()
        self._uncounted_warned = False
        self._jitter = random.Random(seed)

    async def aclose(self) -> None:
        await self._http.aclose()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        return ceiling / 2 + self._jitter.uniform(0.0, ceiling / 2)  # "equal jitter": never a stampede at 0

    async def request(self, method: str, path: str, payload: Any = None) -> Any:
        """The answer's JSON (or text) after retries; ``ApiError`` when refused or out of retries."""
        what = f"{method} {path}"
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            async with self._slots:
                if self._pacer is not None:
                    await self._pacer.wait()
                self.usage.requests += 1
                try:
                    response = await asyncio.wait_for(self._http.request(method, path, json=payload), self.timeout)
                except asyncio.TimeoutError:
                    failure = ApiError(f"{what}: no complete answer from {self.base_url} within {self.timeout:g}s")
                except self._transport_errors as exc:
                    failure = ApiError(f"{what}: {type(exc).__name__} talking to {self.base_url}: {exc}".rstrip(": "))
                else:
                    if response.status_code < 400:
                        return _decode(response, what)
                    failure = _refusal(response, what)
                    if response.status_code not in RETRY_STATUSES or refuses_the_key(failure):
                        raise failure
                    if response.status_code in (429, 503):
                        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == self.max_retries:
                raise ApiError(f"{failure} (gave up after {attempt + 1} attempts)", failure.status, failure.code)
            self.usage.retries += 1
            await asyncio.sleep(self._delay(attempt, retry_after))
        raise AssertionError("unreachable")

    async def completions(self, payload: dict[str, Any]) -> CompletionAnswer:
        """``POST /v1/completions``, validated, with its tokens and cost accounted."""
        answer = parse_answer(await self.request("POST", "/v1/completions", payload), CompletionAnswer, "/v1/completions")
        self._account(answer.usage)
        return answer

    async def chat_completions(self, payload: dict[str, Any]) -> ChatAnswer:
        """``POST /v1/chat/completions``, validated, with its tokens and cost accounted."""
        answer = parse_answer(await self.request("POST", "/v1/chat/completions", payload), ChatAnswer, "/v1/chat/completions")
        self._account(answer.usage)
        return answer

    def _account(self, usage: UsageAnswer | None) -> None:
        """Count an answer's tokens and cost; an answer without ``usage`` counts none, said once,
        since a ``tokens`` or ``cost`` budget would then never stop the run."""
        if usage is None:
            if not self._uncounted_warned:
                self._uncounted_warned = True
                log.warning(
                    "answers from %s carry no usage: their tokens and cost are not counted, so budget.tokens and"
                    " budget.cost cannot stop the run (budget.requests still can)", self.base_url,
                )
            return
        self.usage.prompt_tokens += usage.prompt_tokens
        self.usage.completion_tokens += usage.completion_tokens
        self.usage.cost += usage.prompt_tokens * self.prices[0] + usage.completion_tokens * self.prices[1]


def service_root(base_url: str) -> str:
    """The service's root, which the ``/v1/...`` routes are appended to: ``base_url`` as given,
    or without its trailing ``/v1`` (the form OpenAI's SDK takes, ``https://api.openai.com/v1``)."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def parse_answer(raw: Any, shape: type[AnswerT], route: str) -> AnswerT:
    """``raw`` read as ``shape``; ``MalformedResponse`` naming the first field that is not as
    the OpenAI reference promises."""
    if isinstance(raw, str):  # an error page or an event stream under a 200
        raise MalformedResponse(f"malformed {route} answer: text, not JSON: {raw[:60]!r}")
    try:
        return shape.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "the body"
        raise MalformedResponse(f"malformed {route} answer: {where}: {first['msg']}") from None


def _decode(response: Any, what: str) -> Any:
    if "json" not in response.headers.get("content-type", ""):
        return response.text
    try:
        return response.json()
    except ValueError:
        raise MalformedResponse(f"{what}: the answer is not valid JSON") from None


def _refusal(response: Any, what: str) -> ApiError:
    """The service's own message and code from the OpenAI error shape, else the bare status."""
    message, code = response.reason_phrase, None
    try:
        error = response.json().get("error")
        if isinstance(error, dict):
            message, code = str(error.get("message") or message), error.get("code")
    except (ValueError, AttributeError):
        pass
    return ApiError(f"{what}: {response.status_code} {message}", response.status_code, code)
