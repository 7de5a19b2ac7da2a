"""The black-box client against loopback endpoints: faults retried and accounted, refusals and
malformed answers reported with the service's reason, the API key kept out of every message."""

from __future__ import annotations

import asyncio
import email.utils
import time

import httpx
import pytest

from evomerge.service.client import ApiClient, ApiError, ApiKeyMissing, MalformedResponse, api_key_from_env, retry_after_seconds

PAYLOAD = {"model": "m", "prompt": "12+13=25", "echo": True, "max_tokens": 0, "logprobs": 1}


async def _many(client: ApiClient, n: int) -> list:
    try:
        return await asyncio.gather(*(client.completions(PAYLOAD) for _ in range(n)), return_exceptions=True)
    finally:
        await client.aclose()


@pytest.mark.parametrize("endpoint", ["429,503,500,slow,ok,ok"], indirect=True)
def test_429_5xx_and_timeouts_are_retried_and_every_attempt_is_accounted(endpoint):
    client = ApiClient(endpoint, concurrency=4, timeout=0.5, max_retries=12, backoff=0.01, max_backoff=0.05,
                       prompt_token_price=0.5, seed=0)
    results = asyncio.run(_many(client, 8))
    assert all(not isinstance(r, Exception) for r in results), results
    stats = httpx.get(endpoint + "/stats").json()
    assert stats["faulted"] > 0
    assert client.usage.requests == stats["received"]
    assert client.usage.retries == stats["received"] - 8
    assert client.usage.prompt_tokens == 8 * len(PAYLOAD["prompt"])
    assert client.usage.cost == pytest.approx(0.5 * client.usage.prompt_tokens)
    assert client.usage.metrics() == {"requests": stats["received"], "prompt_tokens": 64, "completion_tokens": 0, "cost": 32.0}


@pytest.mark.parametrize("endpoint", ["malformed"], indirect=True)
def test_a_malformed_answer_fails_with_its_reason_and_is_not_retried(endpoint):
    client = ApiClient(endpoint, max_retries=5, backoff=0.01)
    (result,) = asyncio.run(_many(client, 1))
    assert isinstance(result, MalformedResponse)
    assert "choices" in str(result)
    assert client.usage.requests == 1


@pytest.mark.parametrize("endpoint", ["500"], indirect=True)
def test_retries_end_with_the_services_reason(endpoint):
    client = ApiClient(endpoint, max_retries=2, backoff=0.01)
    (result,) = asyncio.run(_many(client, 1))
    assert isinstance(result, ApiError) and result.status == 500
    assert "injected 500" in str(result) and "3 attempts" in str(result)
    assert client.usage.requests == 3 and client.usage.retries == 2


def test_a_refused_key_is_not_retried_and_never_repeated(service):
    key = "sk-do-not-print-me"
    client = ApiClient(service, key, max_retries=5, backoff=0.01)
    (result,) = asyncio.run(_many(client, 1))
    assert isinstance(result, ApiError) and result.status == 401 and result.code == "invalid_api_key"
    assert key not in str(result) and key not in repr(result)
    assert client.usage.requests == 1


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.delenv("EVOMERGE_TEST_MISSING_KEY", raising=False)
    with pytest.raises(ApiKeyMissing, match="EVOMERGE_TEST_MISSING_KEY"):
        api_key_from_env("EVOMERGE_TEST_MISSING_KEY")
    monkeypatch.setenv("EVOMERGE_TEST_KEY", "k")
    assert api_key_from_env("EVOMERGE_TEST_KEY") == "k"
    assert api_key_from_env(None) is None


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds(later) <= 30
