"""Black-box mode against a provider that misbehaves the way real ones do (``fixtures_provider``):
statuses retried with backoff that honours ``Retry-After`` and counted at the provider, refusals
sent once and reported with what to fix, garbage under a 200 never becoming a fitness value or a
cached answer, socket faults ridden out, and a run stopped by a fault that persists resuming to
its budget with nothing lost or scored twice."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

from evomerge.cli import EXIT_CANNOT_SUCCEED, EXIT_USER_ERROR, main
from evomerge.config import config_from_dict
from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.service.client import ApiClient, ApiError
from evomerge.store import RunStore
from evomerge.workers.blackbox import OUTAGE_CANDIDATES, BlackBoxWorker, ServiceUnreachable
from fixtures_provider import BOUND, GARBAGE, KEY, QUIRKS, RETRY_AFTER, SOCKET_FAULTS

KEY_ENV = "EVOMERGE_TEST_PROVIDER_KEY"
ROWS = [{"prompt": "12+3=", "target": "15"}, {"prompt": "4+4=", "target": "8"}, {"prompt": "7+2=", "target": "9"}]
PAYLOAD = {"model": "a", "prompt": "12+3=15", "echo": True, "max_tokens": 1, "logprobs": 1}
BACKOFF = 0.05
MIDDLE = np.full(4, 0.5)
"""A genome of the run's space: α and β per adapter."""


def config_dict(url: str, tmp_path, **api) -> dict:
    """A merge-service run over two adapters, scoring negative cross-entropy on ``ROWS``: every
    answer of the fake provider scores exactly -1 per example."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {
        "name": "faults",
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "score_experts": False,
        "models": {"base": "fake-base", "experts": ["a", "b"]},
        "merge": {"method": "lora_compose", "granularity": "per_model"},
        "populations": [{"name": "random", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(data)}},
        "budget": {"evaluations": 6},
        "checkpoint_every": 2,
        "api": {"level": "merge_service", "base_url": url, "api_key_env": KEY_ENV, "concurrency": 4,
                "timeout": 0.5, "max_retries": 2, "backoff": 0.01, "max_backoff": 0.02, **api},
    }


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def ask(client: ApiClient) -> list:
    """One completion request, its answer or its exception in a list, the client closed after it."""
    async def go() -> list:
        try:
            return await asyncio.gather(client.completions(PAYLOAD), return_exceptions=True)
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["429-retry-after", "429-date"])
def test_retry_after_in_seconds_or_as_a_date_is_waited_out(provider, kind):
    """The refused request is sent again only once the window the provider asked for has passed
    (not after the far shorter backoff of its own), and once."""
    provider.fail_next(kind)
    client = ApiClient(provider.url, KEY, max_retries=2, backoff=BACKOFF)
    (result,) = ask(client)
    assert not isinstance(result, Exception), result
    refused, again = provider.requests()
    assert again.at - refused.at >= RETRY_AFTER - 0.05 and client.usage.requests == 2 and client.usage.retries == 1


def test_a_5xx_burst_is_ridden_out_with_growing_backoff(provider):
    provider.fail_next("500", "502", "503", "429")
    client = ApiClient(provider.url, KEY, max_retries=5, backoff=BACKOFF, max_backoff=10.0, seed=0)
    (result,) = ask(client)
    assert not isinstance(result, Exception), result
    seen = provider.requests()
    assert [s.kind for s in seen] == ["500", "502", "503", "429", "ok"]
    gaps = [b.at - a.at for a, b in zip(seen, seen[1:])]
    assert all(gap >= BACKOFF * 2**i / 2 for i, gap in enumerate(gaps)), gaps  # equal jitter: at least half the step
    assert client.usage.requests == 5 and client.usage.retries == 4


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [
        ("401", 401, "Incorrect API key"),
        ("403", 403, "not allowed"),
        ("404", 404, "model `a` does not exist"),
        ("400-context", 400, "maximum context length"),
    ],
)
def test_a_refusal_is_sent_once_with_the_providers_reason(provider, kind, status, reason):
    provider.fail_next(kind)
    client = ApiClient(provider.url, KEY, max_retries=5, backoff=BACKOFF)
    (result,) = ask(client)
    assert isinstance(result, ApiError) and result.status == status
    assert reason in str(result) and KEY not in str(result)
    assert len(provider.requests()) == 1 and client.usage.retries == 0


def worker(provider, tmp_path, **api) -> BlackBoxWorker:
    return BlackBoxWorker(RunPlan.from_config(config_from_dict(config_dict(provider.url, tmp_path, **api), "t", tmp_path)))


GARBAGE_REASONS = {
    "not-json": "not valid JSON",
    "no-choices": "choices",
    "empty-choices": "choices",
    "null-logprobs": "no logprobs",
    "null-text": "text",
    "html-200": "text, not JSON: '<html>",
    "sse": "text, not JSON: 'data: {",
    "positive-logprob": "log-probability",
    "nan-logprob": "log-probability",
    "ragged-logprobs": "token_logprobs",
    "400-context": "maximum context length",
}


@pytest.mark.parametrize("kind", sorted(GARBAGE | {"400-context"}))
def test_a_garbage_answer_fails_its_candidate_and_is_never_kept(provider, tmp_path, keyed, kind):
    """The candidate fails naming what was wrong, after one request for the spoiled answer; the
    answers it keeps for the run (``Evaluation.responses``) are all sound ones."""
    w = worker(provider, tmp_path)
    try:
        provider.fail_next(kind)
        ev = w.evaluate(Candidate("c", "random", MIDDLE))
        again = w.evaluate(Candidate("c2", "random", MIDDLE))  # the same merge, asked again
    finally:
        w.close()
    assert ev.status == "failed" and ev.per_example is None and GARBAGE_REASONS[kind] in ev.error, ev.error
    assert [s.kind for s in provider.requests()].count(kind) == 1 and ev.metrics["api_retries"] == 0
    for answer in {**ev.responses, **again.responses}.values():
        assert answer["choices"][0]["logprobs"]["token_logprobs"][1:] == [-1.0] * (len(answer["choices"][0]["text"]) - 1)
    assert again.status == "ok" and again.fitness == -1.0  # the spoiled answer was not cached: it was asked afresh


@pytest.mark.parametrize("kind", sorted(QUIRKS | SOCKET_FAULTS | {"500", "502", "503", "429", "404"}))
def test_a_passing_fault_or_a_quirk_leaves_the_score_exact(provider, tmp_path, keyed, kind):
    """Faults that pass are retried (a 404 sets the merge up again: the service forgot it); quirks
    are read as they are. Either way the candidate scores exactly what a clean answer scores."""
    w = worker(provider, tmp_path)
    try:
        provider.fail_next(kind)
        ev = w.evaluate(Candidate("c", "random", MIDDLE))
    finally:
        w.close()
    assert ev.status == "ok", ev.error
    assert ev.fitness == -1.0 and list(ev.per_example) == [-1.0] * len(ROWS)
    if kind == "404":  # set up again, and asked again what the first set-up had not answered yet
        assert provider.sessions == 2 and len(ROWS) < len(provider.requests()) <= 2 * len(ROWS)
        return
    retried = kind not in QUIRKS
    assert ev.metrics["api_retries"] == retried and len(provider.requests()) == len(ROWS) + retried
    if kind == "trickle":  # the timeout bounds the whole answer, not each byte of it
        assert provider.abandoned.wait(BOUND)


def test_answers_without_usage_are_said_once_to_go_uncounted(provider, tmp_path, keyed, caplog):
    """A provider that reports no ``usage``: tokens stay 0, so a tokens or cost budget could never
    stop the run; the worker says so once, not once per answer."""
    w = worker(provider, tmp_path)
    try:
        provider.fallback = "no-usage"
        with caplog.at_level(logging.WARNING, logger="evomerge.service.client"):
            evs = [w.evaluate(Candidate(f"c{i}", "random", MIDDLE)) for i in range(2)]
    finally:
        w.close()
    assert [ev.status for ev in evs] == ["ok", "ok"] and all(ev.metrics["usage"]["prompt_tokens"] == 0 for ev in evs)
    warned = [r.getMessage() for r in caplog.records if "carry no usage" in r.getMessage()]
    assert len(warned) == 1 and "budget.tokens" in warned[0], warned


def stored(run_dir) -> tuple[list, dict, dict]:
    store = RunStore(run_dir, readonly=True)
    try:
        return list(store.evaluations(with_scores=True)), store.evaluation_counts(), store.run_info()
    finally:
        store.close()


@pytest.mark.parametrize(("kind", "names"), [("503", "resume the run"), ("429", "resume the run"),
                                             ("hang", "resume the run"), ("401", "api.api_key_env"),
                                             ("429-quota", "api.api_key_env")])
def test_a_fault_that_persists_stops_the_run_resumably_and_resume_finishes_it(
    provider, tmp_path, keyed, capsys, kind, names
):
    """Mid-run the provider goes down (or starts refusing the key) for good: the run stops with
    one line naming what to do, after a bounded number of requests; once the provider is back,
    ``resume`` finishes the budget, each candidate evaluated once and every score a clean one."""
    path = tmp_path / "run.yaml"
    config = config_dict(provider.url, tmp_path, max_retries=1)
    path.write_text(json.dumps(config))
    provider.faulty = ("/v1/completions", "/materialize", "/v1/sessions")
    provider.fail_next(*["ok"] * (2 * len(ROWS) + 3))  # two candidates: the session, each merge, its answers
    provider.fallback = kind
    assert main(["run", str(path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err and "Traceback" not in err, err
    faulted = [s for s in provider.seen if s.kind == kind]
    per_candidate = 1 if kind in ("401", "429-quota") else OUTAGE_CANDIDATES  # a refused key or spent quota: at once
    assert 0 < len(faulted) <= per_candidate * (len(ROWS) + 1) * 2  # a bounded number of tries, then a stop
    rows, counts, info = stored(tmp_path / "run")
    assert info["state"] == "failed" and counts["random"][1] >= 2
    checks = [s for s in provider.seen if s.path == "/v1/models"]  # the start's, no candidate's
    assert sum(r.metrics["usage"]["requests"] for r in rows) == len(provider.seen) - len(checks)  # the budget saw them all

    provider.fallback = "ok"
    assert main(["resume", str(tmp_path / "run")]) == 0
    rows, counts, info = stored(tmp_path / "run")
    ids = [r.candidate_id for r in rows]
    assert info["state"] == "finished" and len(ids) == len(set(ids)) == 6 == counts["random"][0] == counts["random"][1]
    ok = [r for r in rows if r.status == "ok"]
    assert len(ok) == 6 - per_candidate  # the candidates the fault failed are recorded, not asked again
    assert all(r.fitness == -1.0 and list(r.per_example) == [-1.0] * len(ROWS) for r in ok)


@pytest.mark.parametrize("status", ["401", "403", "429-quota"])
def test_a_refused_key_at_start_is_one_line_naming_the_key_setting(provider, tmp_path, keyed, capsys, status):
    provider.faulty = ("/v1/models",)
    provider.fallback = status
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config_dict(provider.url, tmp_path)))
    assert main(["run", str(path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "api.api_key_env" in err and KEY not in err, err
    assert len(provider.seen) == 1  # a refused key is not retried


def test_a_provider_without_a_listed_model_is_refused_at_start_naming_it(provider, tmp_path, keyed):
    provider.models = ("fake-base", "a")
    with pytest.raises(ServiceUnreachable, match="does not serve b"):
        worker(provider, tmp_path)


def test_a_web_page_where_the_api_should_be_is_refused_at_start_naming_the_url_setting(provider, tmp_path, keyed):
    provider.faulty = ("/v1/models",)
    provider.fallback = "html-200"
    with pytest.raises(ServiceUnreachable, match=r"api\.base_url.*without a model list: '<html>"):
        worker(provider, tmp_path)


@pytest.mark.parametrize("kind", ["400-context", "null-logprobs", "sse"])
def test_a_provider_that_answers_every_candidate_alike_wrongly_stops_the_run_with_its_reason(
    provider, tmp_path, keyed, capsys, kind
):
    """A prompt over the model's context, or a provider without echo and logprobs, fails every
    candidate alike: the run stops after ``budget.max_failures_at_start`` of them (exit 3), each
    request sent once, with the provider's reason in one line."""
    config = config_dict(provider.url, tmp_path)
    config["budget"]["max_failures_at_start"] = 3
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    provider.fallback = kind
    assert main(["run", str(path)]) == EXIT_CANNOT_SUCCEED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "first 3 candidates all failed" in err and GARBAGE_REASONS[kind] in err, err
    assert len(provider.requests()) == 3 * len(ROWS)
    rows, _, info = stored(tmp_path / "run")
    assert info["state"] == "failed" and [r.status for r in rows] == ["failed"] * 3
