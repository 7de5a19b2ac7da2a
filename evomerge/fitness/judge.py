"""LLM-as-a-judge fitness: a model behind an OpenAI-compatible API grades each generated answer.

Model Swarms (arXiv 2410.11163) and AC/DC score merged models with a judge where no reference
answer can be matched exactly (open-ended instructions, "human interests"). Here the candidate
answers greedily (white-box: :func:`evomerge.fitness.lm.greedy_generations`, as ``exact_match``; black-box: the
service's completions), each answer is put into the ``rubric`` with its prompt and target, and
the judge's greedy reply (the rubric as the user's message of a chat, or as a raw prompt: ``api``) is
read through ``score_regex``: the first match (its first group when
it has one) is a number on the rubric's ``scale``, mapped linearly to [0, 1]. A reply without a
number, or with one off the scale, scores 0 and is counted (``judge_unparsable``): a judge that
wanders off its rubric lowers a candidate's fitness, it never fails the candidate.

The judge is asked through the house client (:mod:`evomerge.service.client`: concurrency,
retries, usage), one request per example, at most ``concurrency`` at once. Its requests, tokens
and cost come back in the result's ``usage``, so the run's budgets count them as they count a
black-box run's own requests; a judge that fails after its retries fails the candidate, its
requests still counted (:class:`~evomerge.fitness.result.FitnessFailed`).
"""

from __future__ import annotations

import asyncio
import re
import string
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import PluginError, UserError
from evomerge.fitness.result import FitnessFailed, FitnessResult
from evomerge.service.client import ApiClient, ApiError, api_key_from_env, refuses_the_key

RUBRIC_FIELDS = frozenset({"prompt", "answer", "target"})
DEFAULT_SCORE_REGEX = r"-?\d+(?:\.\d+)?"


class JudgeSpec(BaseModel):
    """``fitness.options.judge``: where the judge is, how it is asked, how its reply is read."""

    model_config = ConfigDict(extra="forbid")

    base_url: str
    model: str
    rubric: str = Field(description="the judge's prompt: a template over {prompt}, {answer} and {target}")
    api: Literal["chat", "completions"] = Field(
        default="chat",
        description="chat: the rubric as the user's message on /v1/chat/completions (the judge's chat template"
        " applies; what hosted instruct models answer); completions: the rubric as a raw prompt on /v1/completions",
    )
    api_key_env: str | None = None
    score_regex: str = DEFAULT_SCORE_REGEX
    scale: tuple[float, float] = (1.0, 10.0)
    max_tokens: int = Field(default=16, ge=1)
    concurrency: int = Field(default=8, ge=1)
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    prompt_token_price: float = Field(default=0.0, ge=0)
    completion_token_price: float = Field(default=0.0, ge=0)

    @field_validator("rubric")
    @classmethod
    def _template(cls, rubric: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(rubric) if name is not None}
        except ValueError as exc:
            raise ValueError(f"not a template ({exc}); write a literal brace as {{{{ or }}}}") from None
        if not names <= RUBRIC_FIELDS:
            raise ValueError(f"takes only {{prompt}}, {{answer}} and {{target}}, not {{{sorted(names - RUBRIC_FIELDS)[0]}}}")
        if "answer" not in names:
            raise ValueError("must contain {answer}: the judge grades the candidate's answer")
        return rubric

    @field_validator("score_regex")
    @classmethod
    def _regex(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _scale(self) -> "JudgeSpec":
        if not self.scale[0] < self.scale[1]:
            raise ValueError(f"scale: the lowest score comes first ({self.scale[0]:g} is not below {self.scale[1]:g})")
        return self

    @classmethod
    def parse(cls, options: Any) -> "JudgeSpec":
        """The spec, or one line naming the option to fix."""
        try:
            return cls.model_validate(options)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(["judge", *map(str, first["loc"])])
            raise PluginError(f"fitness 'judge': fitness.options.{where}: {first['msg']}") from None

    def uses_target(self) -> bool:
        return "{target}" in self.rubric

    def score(self, reply: str) -> float | None:
        """The reply's grade mapped to [0, 1]; None when it holds none on the scale."""
        match = re.search(self.score_regex, reply)
        if match is None:
            return None
        try:
            value = float(match.group(1) if match.re.groups else match.group(0))
        except ValueError:
            return None
        low, high = self.scale
        if not low <= value <= high:
            return None
        return (value - low) / (high - low)


def check_options(options: dict[str, Any]) -> None:
    """``fitness.options`` of ``judge`` checked before a run (and by ``evomerge validate``)."""
    if "judge" not in options:
        raise PluginError("fitness 'judge' needs fitness.options.judge (base_url, model and rubric at least)")
    JudgeSpec.parse(options["judge"])


def judge_spec(options: Any, examples: Sequence[Any]) -> JudgeSpec:
    """The spec, checked against the examples: text rows with what the rubric reads."""
    spec = JudgeSpec.parse(options)
    keys = ("prompt", "target") if spec.uses_target() else ("prompt",)
    for i, example in enumerate(examples):
        if not isinstance(example, dict):
            raise PluginError("fitness 'judge' needs text examples (.jsonl or .csv data), not tensors")
        missing = [k for k in keys if k not in example]
        if missing:
            raise PluginError(f"fitness 'judge': example {i} has no {', '.join(missing)} (the rubric reads it)")
    return spec


async def judge_answers(spec: JudgeSpec, examples: Sequence[dict[str, Any]], answers: Sequence[str]) -> FitnessResult:
    """Each answer graded by the judge: scores in [0, 1] (0 where the reply is unparsable), with
    the judge's usage and the count of unparsable replies."""
    try:
        key = api_key_from_env(spec.api_key_env)
    except UserError:
        raise PluginError(
            f"fitness 'judge': set the environment variable {spec.api_key_env} to the judge's API key"
            " (fitness.options.judge.api_key_env names it)"
        ) from None
    client = ApiClient(
        spec.base_url,
        key,
        concurrency=spec.concurrency,
        timeout=spec.timeout,
        max_retries=spec.max_retries,
        prompt_token_price=spec.prompt_token_price,
        completion_token_price=spec.completion_token_price,
    )

    async def grade(example: dict[str, Any], answer: str) -> float | None:
        prompt = spec.rubric.format(prompt=example["prompt"], answer=answer, target=example.get("target", ""))
        return spec.score(await ask(client, spec, prompt))

    try:  # every request runs to its end, so what a failing judge was asked is counted whole
        outcomes = await asyncio.gather(*(grade(e, a) for e, a in zip(examples, answers)), return_exceptions=True)
    finally:
        await client.aclose()
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        if not isinstance(failures[0], ApiError):
            raise failures[0]
        if refuses_the_key(failures[0]):  # every further candidate would fail alike: stop the run
            key = f"the key in ${spec.api_key_env}" if spec.api_key_env else "requests without a key"
            raise PluginError(
                f"fitness 'judge': the judge at {spec.base_url} refused {key} (fitness.options.judge.api_key_env):"
                f" {failures[0]}; resume the run once it is accepted"
            ) from None
        spent = {"usage": client.usage.metrics(), "judge_retries": client.usage.retries}
        hint = " (a service without chat completions: set fitness.options.judge.api: completions)" if (
            spec.api == "chat" and failures[0].status == 404
        ) else ""
        raise FitnessFailed(f"the judge at {spec.base_url} failed: {failures[0]}{hint}", spent) from None
    grades: list[float | None] = outcomes  # type: ignore[assignment]
    metrics = {
        "usage": client.usage.metrics(),
        "judge_unparsable": sum(g is None for g in grades),
        "judge_retries": client.usage.retries,
    }
    return FitnessResult([0.0 if g is None else g for g in grades], metrics)


async def ask(client: ApiClient, spec: JudgeSpec, prompt: str) -> str:
    """The judge's greedy reply to ``prompt`` on the route ``spec.api`` names ("" when a chat
    answer has no text: a refusal reads as an unparsable grade)."""
    asked = {"model": spec.model, "max_tokens": spec.max_tokens, "temperature": 0.0}
    if spec.api == "chat":
        answer = await client.chat_completions({**asked, "messages": [{"role": "user", "content": prompt}]})
        return answer.choices[0].message.content or ""
    return (await client.completions({**asked, "prompt": prompt})).choices[0].text


def judge(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    *,
    judge: dict[str, Any],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
) -> FitnessResult:
    """The candidate's greedy answers, each graded by the judge (see the module docstring)."""
    from evomerge.fitness.lm import greedy_generations

    spec = judge_spec(judge, examples)
    answers = greedy_generations(
        model, tokenizer, [e["prompt"] for e in examples], batch_size=batch_size, max_new_tokens=max_new_tokens,
        stop=stop, fitness="judge",
    )
    return _run(judge_answers(spec, examples, answers))


def _run(coroutine: Any) -> Any:
    """``asyncio.run``, also from a thread whose loop is running (a notebook's inline run)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
