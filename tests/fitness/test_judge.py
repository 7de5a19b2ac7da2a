"""The judge fitness against ``evomerge serve`` of an untrained tiny model as the judge: its
replies are random text, so these tests check how replies are read, counted and paid for —
one score per example, the same scores for the same replies, unparsable replies scored 0 and
counted, the judge's requests and tokens in the run's budgets — never the judge's taste."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import numpy as np
import pytest

from evomerge.config import config_from_dict
from evomerge.errors import PluginError
from evomerge.fitness.blackbox import judge as blackbox_judge
from evomerge.fitness.judge import JudgeSpec, judge
from evomerge.fitness.lm import greedy_generations
from evomerge.models.zoo.tiny_lm import skill_examples
from evomerge.runs import start_run
from evomerge.service.client import ApiClient
from evomerge.service.served_model import ApiServedModel
from evomerge.store import RunStore
from evomerge.testing.tiny_models import char_llama
from fixtures_service import app_in_thread, chat_text, free_port

SPEC = {"base_url": "http://127.0.0.1:9", "model": "m", "rubric": "Q: {prompt} A: {answer} Score:"}


@pytest.fixture(scope="module")
def candidate():
    return char_llama(seed=1)


@pytest.fixture(scope="module")
def examples():
    return skill_examples("addition", 5, seed=4)


def judge_replies(url: str, options: dict, prompts: list[str]) -> list[str]:
    """What the judge answers each rubric prompt, asked directly (greedy, as the fitness asks): as
    the user's message of a chat, or as a raw prompt (``options["api"]``)."""
    headers = {"Authorization": "Bearer test-serve-token"}
    body = {"model": options["model"], "max_tokens": options["max_tokens"], "temperature": 0.0}
    if options.get("api", "chat") == "chat":
        asked = [{**body, "messages": [{"role": "user", "content": p}]} for p in prompts]
        answers = [httpx.post(f"{url}/v1/chat/completions", json=a, headers=headers).json() for a in asked]
        return [a["choices"][0]["message"]["content"] for a in answers]
    return [
        httpx.post(f"{url}/v1/completions", json={**body, "prompt": p}, headers=headers).json()["choices"][0]["text"]
        for p in prompts
    ]


def sent_text(options: dict, prompt: str) -> str:
    """What the judge model reads for a rubric prompt: the chat template's rendering, or the prompt."""
    return chat_text([{"role": "user", "content": prompt}]) if options.get("api", "chat") == "chat" else prompt


def test_a_reply_is_read_through_the_regex_and_mapped_from_the_scale():
    spec = JudgeSpec.parse({**SPEC, "score_regex": r"\[\[(\d+(?:\.\d+)?)\]\]"})
    assert spec.score("Fine. Rating: [[7]] and [[2]]") == pytest.approx(6 / 9)  # the first match, 1–10 → [0, 1]
    assert spec.score("[[10]]") == 1.0 and spec.score("[[1]]") == 0.0
    assert spec.score("Rating: 7") is None  # no match
    assert spec.score("[[11]]") is None  # off the scale
    plain = JudgeSpec.parse({**SPEC, "scale": [0, 1]})
    assert plain.score("score 0.25, not 3") == 0.25


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"temperature": 0.5}, r"options\.judge\.temperature: Extra inputs"),
        ({"rubric": "Grade {prompt}"}, r"options\.judge\.rubric: .*must contain \{answer\}"),
        ({"rubric": "{answer} {question}"}, r"not \{question\}"),
        ({"rubric": "{answer} {"}, "write a literal brace"),
        ({"score_regex": "(\\d"}, r"score_regex: .*not a regular expression"),
        ({"scale": [10, 1]}, "the lowest score comes first"),
        ({"model": None}, r"options\.judge\.model"),
    ],
)
def test_a_wrong_judge_option_is_one_line_naming_it(change, message):
    with pytest.raises(PluginError, match=message) as err:
        JudgeSpec.parse({**SPEC, **change})
    assert "\n" not in str(err.value)


def test_a_missing_key_or_target_is_named_before_any_request(candidate, examples, monkeypatch):
    model, tokenizer = candidate
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(PluginError, match="set the environment variable NO_SUCH_JUDGE_KEY"):
        judge(model, tokenizer, examples, judge={**SPEC, "api_key_env": "NO_SUCH_JUDGE_KEY"}, max_new_tokens=2)
    with pytest.raises(PluginError, match="example 0 has no target"):
        judge(model, tokenizer, [{"prompt": "1+2="}], judge={**SPEC, "rubric": "{answer} vs {target}"})


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_each_answer_is_judged_once_and_its_grade_read_from_the_reply(candidate, examples, judge_options, judge_service, api):
    model, tokenizer = candidate
    judge_options = {**judge_options, "api": api}
    result = judge(model, tokenizer, examples, judge=judge_options, max_new_tokens=4)
    answers = greedy_generations(
        model, tokenizer, [e["prompt"] for e in examples], batch_size=16, max_new_tokens=4, stop=(), fitness="judge"
    )
    prompts = [f"{e['prompt']}{a}|" for e, a in zip(examples, answers)]
    replies = judge_replies(judge_service, judge_options, prompts)
    digits = [re.search(r"\d", r) for r in replies]
    assert result.scores == [0.0 if d is None else int(d.group(0)) / 9 for d in digits]
    assert result.metrics["judge_unparsable"] == sum(d is None for d in digits)
    assert 0 < result.metrics["judge_unparsable"] < len(examples)  # read and unreadable replies both met
    usage = result.metrics["usage"]
    assert usage["requests"] == len(examples)
    assert usage["prompt_tokens"] == sum(len(sent_text(judge_options, p)) for p in prompts)  # one token per character
    assert 0 < usage["completion_tokens"] <= judge_options["max_tokens"] * len(examples)
    again = judge(model, tokenizer, examples, judge=judge_options, max_new_tokens=4)
    assert again.scores == result.scores and again.metrics == result.metrics


def test_a_judge_that_never_grades_scores_zero_and_counts_every_reply(candidate, examples, judge_options):
    model, tokenizer = candidate
    never = {**judge_options, "score_regex": r"~(\d)", "prompt_token_price": 0.5}  # "~" is not in its vocabulary
    result = judge(model, tokenizer, examples, judge=never, max_new_tokens=2)
    assert result.scores == [0.0] * len(examples)
    assert result.metrics["judge_unparsable"] == len(examples)
    assert result.metrics["usage"]["cost"] == pytest.approx(0.5 * result.metrics["usage"]["prompt_tokens"])


def test_black_box_answers_come_from_the_service_then_the_judge(examples, judge_options, judge_service):
    async def score():
        client = ApiClient(judge_service, "test-serve-token")

        async def name() -> str:
            return "tiny-base"

        try:
            served = ApiServedModel(client, "served:tiny-base", None, name)
            return await blackbox_judge(served, examples, judge=judge_options, max_new_tokens=3), client.usage
        finally:
            await client.aclose()

    result, candidate_usage = asyncio.run(score())
    assert candidate_usage.requests == len(examples)  # the candidate's generations
    assert result.metrics["usage"]["requests"] == len(examples)  # the judge's, counted apart
    assert len(result.scores) == len(examples) and all(0.0 <= s <= 1.0 for s in result.scores)


@pytest.fixture
def run_config(tmp_path, examples, judge_options):
    """A white-box run over three tiny character Llamas scored by the loopback judge."""
    for name, seed in (("base", 0), ("e0", 1), ("e1", 2)):
        model, tokenizer = char_llama(seed)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[:4]))

    def make(**judge):
        return config_from_dict(
            {
                "run_dir": str(tmp_path / "run"),
                "executor": "inline",
                "score_experts": False,
                "models": {"base": "base", "experts": ["e0", "e1"], "device": "cpu"},
                "merge": {"method": "linear", "granularity": "per_model"},
                "populations": [{"name": "random", "strategy": "random"}],
                "fitness": {"name": "judge", "options": {"judge": {**judge_options, **judge}, "max_new_tokens": 3},
                            "data": {"source": "train.jsonl"}},
                "budget": {"requests": 10},
            },
            "test-config",
            tmp_path,
        )

    return make


def test_a_run_counts_the_judges_requests_in_its_budget(run_config):
    config = run_config()
    summary = start_run(config, "test-config")
    store = RunStore(config.run_path(), readonly=True)
    rows = list(store.evaluations(with_scores=True))
    usage = store.api_usage()
    store.close()
    assert len(rows) == 3 and "requests budget reached" in json.dumps(summary)  # 4, 8, then 12 ≥ 10
    assert all(r.status == "ok" and r.metrics["usage"]["requests"] == 4 for r in rows)
    assert all(r.per_example.shape == (4,) and "judge_unparsable" in r.metrics for r in rows)
    assert usage["requests"] == 12 and usage["tokens"] == sum(
        r.metrics["usage"]["prompt_tokens"] + r.metrics["usage"]["completion_tokens"] for r in rows
    )
    assert np.all([np.isfinite(r.fitness) for r in rows])


def test_a_judge_that_cannot_be_reached_fails_the_candidate_with_its_requests_counted(run_config):
    from evomerge.plan import RunPlan
    from evomerge.records import Candidate
    from evomerge.workers.whitebox import WhiteBoxWorker

    config = run_config(base_url=f"http://127.0.0.1:{free_port()}", max_retries=1)  # nothing listens there
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    ev = worker.evaluate(Candidate("c", "random", np.full(worker.space.dim, 0.5)))
    worker.close()
    assert ev.status == "failed" and "the judge at http://127.0.0.1:" in ev.error
    assert ev.metrics["usage"]["requests"] == 4 * 2 and ev.metrics["judge_retries"] == 4  # each example tried twice


def test_a_judge_that_refuses_the_key_stops_the_run_naming_the_key_setting(candidate, examples, judge_options, monkeypatch):
    """A revoked or wrong judge key fails every candidate alike: a PluginError (the run stops,
    resumably) naming the variable, never the key itself."""
    model, tokenizer = candidate
    monkeypatch.setenv(judge_options["api_key_env"], "sk-wrong-judge-key")
    with pytest.raises(PluginError, match=r"refused the key in \$\w+ \(fitness\.options\.judge\.api_key_env\)") as err:
        judge(model, tokenizer, examples[:2], judge=judge_options, max_new_tokens=2)
    assert "sk-wrong-judge-key" not in str(err.value) and "\n" not in str(err.value)


def test_an_openai_style_base_url_ending_in_v1_reaches_the_same_judge(candidate, examples, judge_options):
    model, tokenizer = candidate
    plain = judge(model, tokenizer, examples, judge=judge_options, max_new_tokens=3)
    sdk_style = judge(model, tokenizer, examples, judge={**judge_options, "base_url": judge_options["base_url"] + "/v1/"}, max_new_tokens=3)
    assert sdk_style.scores == plain.scores and sdk_style.metrics == plain.metrics


def test_a_chat_judge_on_a_service_without_chat_completions_fails_saying_which_option_to_set(candidate, examples, judge_options):
    from starlette.applications import Starlette

    from evomerge.fitness.result import FitnessFailed

    model, tokenizer = candidate
    with app_in_thread(Starlette()) as url:  # every route answers 404
        with pytest.raises(FitnessFailed, match=r"404.*fitness.options.judge.api: completions"):
            judge(model, tokenizer, examples[:1], judge={**judge_options, "base_url": url, "max_retries": 0}, max_new_tokens=2)


@pytest.mark.parametrize(
    ("fitness", "budget", "words"),
    [
        ({"name": "judge", "options": {"judge": {**SPEC, "scale": [5, 5]}}}, {"evaluations": 4},
         ("fitness.options.judge", "the lowest score comes first")),
        ({"name": "judge", "options": {"max_new_tokens": 4}}, {"evaluations": 4}, ("needs fitness.options.judge",)),
        ({"name": "exact_match"}, {"requests": 10}, ("budget", "fitness 'exact_match' has none", "api section")),
    ],
    ids=["bad-scale", "no-judge", "usage-budget-without-api"],
)
def test_validate_refuses_a_judge_config_in_one_line(tmp_path, capsys, fitness, budget, words):
    from evomerge.cli import main

    (tmp_path / "run.yaml").write_text(json.dumps({
        "models": {"base": "base", "experts": ["e0", "e1"], "device": "cpu"},
        "merge": {"method": "linear", "granularity": "per_model"},
        "populations": [{"name": "random", "strategy": "random"}],
        "fitness": {**fitness, "data": {"source": "train.jsonl"}},
        "budget": budget,
    }))
    assert main(["validate", str(tmp_path / "run.yaml"), "--no-files"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines


@pytest.mark.parametrize("reachable", [True, False], ids=["judge-up", "judge-down"])
def test_a_black_box_evaluation_adds_the_judges_usage_to_the_candidates(tmp_path, examples, judge_options, judge_service, reachable):
    from evomerge.plan import RunPlan
    from evomerge.records import Candidate
    from evomerge.workers.blackbox import BlackBoxWorker

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    judge_at = judge_options if reachable else {**judge_options, "base_url": f"http://127.0.0.1:{free_port()}", "max_retries": 0}
    config = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "executor": "inline",
            "models": {"experts": ["tiny-base", "tiny-base"]},  # the served model, as a plain hosted one
            "merge": {"method": "linear", "granularity": "per_model"},
            "populations": [{"name": "random", "strategy": "random"}],
            "fitness": {"name": "judge", "options": {"judge": judge_at, "max_new_tokens": 3}, "data": {"source": "train.jsonl"}},
            "budget": {"requests": 100},
            "api": {"level": "openai", "base_url": judge_service, "api_key_env": judge_options["api_key_env"]},
        },
        "test-config",
        tmp_path,
    )
    worker = BlackBoxWorker(RunPlan.from_config(config))
    ev = worker.evaluate(Candidate("c", "random", worker.space.encode({"weight": [1.0, 0.0]})))
    worker.close()
    n = len(examples)
    assert ev.metrics["usage"]["requests"] == n + n  # the candidate's generations, then the judge's grades
    assert (ev.status == "ok") is reachable
