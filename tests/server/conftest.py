"""The ``openai`` SDK pointed at the reference services (tests/fixtures_service.py), for the tests
that drive ``evomerge serve`` as a real OpenAI client does."""

from __future__ import annotations

import pytest

from fixtures_service import openai_client


@pytest.fixture(scope="module")
def client(service):
    return openai_client(service)


@pytest.fixture(scope="module")
def chat_client(judge_service):
    return openai_client(judge_service)
