"""A candidate merge as a model service exposes it, scored through ``/v1/completions``.

``ApiServedModel`` is what black-box fitness functions receive (``evomerge.fitness.blackbox``):
log-likelihoods by lm-eval's convention — the context and continuation sent as one prompt with
``echo``, ``logprobs`` and ``max_tokens`` 1, the continuation's tokens found by their
``text_offset`` — and greedy generations. Answers are cached (``evomerge.service.response_cache``)
under the candidate's *merge identity* (adapters and coefficients, not the service's name for it)
with the request's parameters, so an answer the run already has is never asked for again.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from evomerge.fitness.blackbox import Loglikelihood
from evomerge.service.client import ApiClient, CompletionAnswer, MalformedResponse, parse_answer
from evomerge.service.response_cache import ResponseCache, cache_key

GREEDY_TOLERANCE = 1e-6
T = TypeVar("T")


class ApiServedModel:
    """One merge on the service; ``identity`` says which merge it is, for the cache.

    ``prepare`` makes the service serve the merge and returns its model name; it runs once, at the
    first answer not in the cache, so a candidate whose answers are all cached asks nothing.
    """

    def __init__(
        self, client: ApiClient, identity: str, cache: ResponseCache | None, prepare: Callable[[], Awaitable[str]]
    ) -> None:
        self.client = client
        self.identity = identity
        self.cache = cache
        self._prepare = prepare
        self._name: asyncio.Future[str] | None = None

    @property
    def prepared(self) -> bool:
        return self._name is not None

    async def name(self) -> str:
        if self._name is None:
            self._name = asyncio.ensure_future(self._prepare())
        return await self._name

    async def completion(self, payload: dict[str, Any], read: Callable[[CompletionAnswer], T]) -> T:
        """What ``read`` takes from this model's ``/v1/completions`` answer to ``payload``, from the
        cache when the same request was answered. An answer is cached only once ``read`` took what
        it needs, so one it refuses (``MalformedResponse``) is never kept for the run, and asked afresh."""
        key = cache_key(self.identity, payload)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return read(parse_answer(hit, CompletionAnswer, "/v1/completions"))
        answer = await self.client.completions({"model": await self.name(), **payload})
        value = read(answer)
        if self.cache is not None:
            self.cache.put(key, answer.model_dump())
        return value

    async def loglikelihood(self, context: str, continuation: str) -> Loglikelihood:
        payload = {"prompt": context + continuation, "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0.0}
        return await self.completion(payload, lambda answer: _loglikelihood(answer, context, continuation))

    async def generate(self, prompt: str, *, max_tokens: int, stop: Sequence[str] = ()) -> str:
        payload: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if stop:
            payload["stop"] = list(stop)
        return await self.completion(payload, lambda answer: answer.choices[0].text)


def _loglikelihood(answer: CompletionAnswer, context: str, continuation: str) -> Loglikelihood:
    """The continuation's log-likelihood from an echoed answer, found by its tokens' offsets."""
    text = context + continuation
    logprobs = answer.choices[0].logprobs
    if logprobs is None:
        raise MalformedResponse("the /v1/completions answer has no logprobs (the service must support echo with logprobs)")
    span = [i for i, offset in enumerate(logprobs.text_offset) if len(context) <= offset < len(text)]
    if not span or any(logprobs.token_logprobs[i] is None for i in span):
        raise MalformedResponse(f"the /v1/completions answer has no log-probabilities for the continuation {continuation!r}")
    total = sum(logprobs.token_logprobs[i] for i in span)  # type: ignore[misc]
    tops = logprobs.top_logprobs or []
    greedy = all(
        i < len(tops) and tops[i] and max(tops[i].values()) <= logprobs.token_logprobs[i] + GREEDY_TOLERANCE  # type: ignore[operator]
        for i in span
    )
    return Loglikelihood(float(total), len(span), greedy)

