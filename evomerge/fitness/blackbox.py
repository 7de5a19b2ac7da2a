"""Black-box fitness functions: ``async fn(model, examples) -> per-example scores``.

``model`` is a ``ServedModel``: the candidate merge as a model service exposes it. It offers the
two ways an OpenAI-compatible completions API can score text — the log-likelihood of a
continuation given a context (``/v1/completions`` with ``echo`` and ``logprobs``, lm-eval's
convention) and generation — and nothing else, so these functions never see weights, HTTP or
retries (``judge`` asks its judge through the house client, as the white-box judge does). They mirror the white-box functions of ``lm.py`` under the same names and options, so a
config's ``fitness`` works in both modes; examples are the same rendered text rows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence

from evomerge.fitness.harness import lm_eval_served
from evomerge.fitness.judge import judge_answers, judge_spec
from evomerge.fitness.lm import DEFAULT_ANSWER_REGEX, _require, extract_answer
from evomerge.fitness.result import FitnessResult


@dataclass(frozen=True)
class Loglikelihood:
    """A continuation's summed log-probability, its token count, and whether greedy decoding
    would have produced it token by token (lm-eval's ``is_greedy``)."""

    logprob: float
    tokens: int
    is_greedy: bool


class ServedModel(Protocol):
    async def loglikelihood(self, context: str, continuation: str) -> Loglikelihood: ...

    async def generate(self, prompt: str, *, max_tokens: int, stop: Sequence[str] = ()) -> str: ...


BlackBoxFitness = Callable[[ServedModel, Sequence[dict[str, Any]]], Awaitable[Sequence[float] | FitnessResult]]


async def negative_cross_entropy(model: ServedModel, examples: Sequence[dict[str, Any]]) -> list[float]:
    """Minus the mean cross-entropy of each target's tokens given its prompt."""
    _require(examples, ("target",), "negative_cross_entropy")
    results = await asyncio.gather(*(model.loglikelihood(e["prompt"], e["target"]) for e in examples))
    return [r.logprob / r.tokens for r in results]


async def multiple_choice_loglik(model: ServedModel, examples: Sequence[dict[str, Any]]) -> list[float]:
    """1 where the right choice has the highest summed log-likelihood (lm-eval's ``acc``), else 0."""
    _require(examples, ("choices", "label"), "multiple_choice_loglik")

    async def one(example: dict[str, Any]) -> float:
        scored = await asyncio.gather(*(model.loglikelihood(example["prompt"], c) for c in example["choices"]))
        best = max(range(len(scored)), key=lambda j: scored[j].logprob)
        return float(best == example["label"])

    return list(await asyncio.gather(*(one(e) for e in examples)))


async def exact_match(
    model: ServedModel,
    examples: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 32,
    answer_regex: str = DEFAULT_ANSWER_REGEX,
    stop: Sequence[str] = (),
) -> list[float]:
    """1 where the answer extracted from the greedy generation equals the stripped target."""
    _require(examples, ("target",), "exact_match")
    texts = await asyncio.gather(*(model.generate(e["prompt"], max_tokens=max_new_tokens, stop=stop) for e in examples))
    return [
        float((answer := extract_answer(text, answer_regex)) is not None and answer == str(e["target"]).strip())
        for e, text in zip(examples, texts)
    ]


async def judge(
    model: ServedModel,
    examples: Sequence[dict[str, Any]],
    *,
    judge: dict[str, Any],
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
) -> FitnessResult:
    """The candidate's greedy generations, each graded by a judge model (``evomerge.fitness.judge``)."""
    spec = judge_spec(judge, examples)
    answers = await asyncio.gather(*(model.generate(e["prompt"], max_tokens=max_new_tokens, stop=stop) for e in examples))
    return await judge_answers(spec, examples, answers)


BLACKBOX_FITNESS_FUNCTIONS: dict[str, BlackBoxFitness] = {
    "negative_cross_entropy": negative_cross_entropy,
    "multiple_choice_loglik": multiple_choice_loglik,
    "exact_match": exact_match,
    "judge": judge,
    "lm_eval": lm_eval_served,
}
