"""Streamed answers on the wire (raw httpx): the server-sent events themselves, a refusal before
the first byte as ordinary JSON, one after it as an error event, and a client that disconnects
mid-stream or stops reading, which must stop the generation and free the model and its admission slot."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from fixtures_service import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def events(response: httpx.Response) -> list:
    """The data of each server-sent event of ``response``: parsed JSON, or the bare ``[DONE]``."""
    data = [line[len("data: "):] for line in response.iter_lines() if line]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


@pytest.fixture(scope="module")
def host(tiny_models):
    from evomerge.server.model_host import ModelHost

    return ModelHost(str(tiny_models["base"]), "tiny-base", tiny_models["adapters"])


class Scripted:
    """The served model with ``after(pass number, output)`` run on each forward pass (the
    prompt's is pass 1), which always picks the token "7" so the text is known."""

    def __init__(self, model: torch.nn.Module, seven: int, after) -> None:
        self.model, self.seven, self.after, self.passes = model, seven, after, 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[..., self.seven] += 1e3
        self.passes += 1
        self.after(self.passes, out)
        return out


@pytest.fixture
def scripted(host, monkeypatch):
    """Make requests for the base run it through ``Scripted`` with the ``after`` given (the
    adapters run as they are); ``holder["model"]`` is the last one made."""
    running = host.running

    def script(after) -> dict:
        @contextmanager
        def wrapped(name: str):
            with running(name) as model:
                if name != host.base_name:
                    yield model
                    return
                holder["model"] = Scripted(model, host.tokenizer.convert_tokens_to_ids("7"), after)
                yield holder["model"]

        holder: dict = {}
        monkeypatch.setattr(host, "running", wrapped)
        return holder

    return script


def test_the_events_are_openai_chunks_then_the_usage_then_done(service):
    body = {"model": "addition", "prompt": "12+34=", "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    whole = httpx.post(service + "/v1/completions", json={**body, "stream": False, "stream_options": None}, headers=AUTH, timeout=60)
    with httpx.stream("POST", service + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        *chunks, usage, done = events(r)
    assert done == "[DONE]" and usage["choices"] == [] and usage["usage"] == whole.json()["usage"]
    assert {c["id"] for c in chunks} == {usage["id"]} and all(c["object"] == "text_completion" for c in chunks)
    assert [set(c["choices"][0]) for c in chunks] == [{"index", "text", "logprobs", "finish_reason"}] * len(chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.json()["choices"][0]["text"]
    assert all(c["usage"] is None for c in chunks)


def test_a_refusal_before_the_first_byte_is_json_and_after_it_an_error_event(host, scripted, serve_app):
    from evomerge.server.app import create_app

    def poison_from(first_bad: int):
        def after(number, out):
            if number >= first_bad:
                out.logits[:] = float("nan")
        return after

    body = {"model": "tiny-base", "prompt": "1", "max_tokens": 6, "temperature": 0, "stream": True}
    with serve_app(create_app(host, TOKEN)) as url:
        scripted(poison_from(1))  # the prompt's own logits
        r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "non_finite_output"
        scripted(poison_from(3))  # two tokens come out first
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200
            sent = events(r)
    assert [e["choices"][0]["text"] for e in sent[:-1]] == ["7", "7"]
    error = sent[-1]["error"]
    assert error["code"] == "non_finite_output" and error["type"] == "invalid_request_error" and error["message"]


def test_a_client_that_disconnects_mid_stream_stops_the_generation_and_frees_the_server(host, scripted, serve_app):
    from evomerge.server.app import create_app

    release = threading.Event()

    def hold_from_third_pass(number, out):
        if number >= 3:
            assert release.wait(30), "the test never released the model"

    gate = create_app(host, TOKEN, max_pending=1)
    asked = {"model": "addition", "prompt": "12+34=", "max_tokens": 4, "temperature": 0}
    with serve_app(gate) as url:
        before = httpx.post(url + "/v1/completions", json=asked, headers=AUTH, timeout=60).json()["choices"]
        holder = scripted(hold_from_third_pass)
        body = {"model": "tiny-base", "prompt": "1", "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as r:
                lines = r.iter_lines()  # kept: httpx closes the response when its iterator is collected
                assert json.loads(next(lines)[len("data: "):])["choices"][0]["text"] == "7"
                busy = httpx.post(url + "/v1/completions", json=asked, headers=AUTH, timeout=60)
                assert busy.status_code == 429  # the stream holds the only admission slot
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # the server has seen the close
        release.set()
        deadline = time.monotonic() + 30
        while gate.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.pending == 0
        assert holder["model"].passes <= 4  # stopped at the token after the disconnect, not at 40
        after = httpx.post(url + "/v1/completions", json=asked, headers=AUTH, timeout=60)
    assert after.status_code == 200
    assert after.json()["choices"] == before  # the base's context was left: the adapter is on again


def test_a_client_that_stops_reading_cannot_hold_the_model():
    """Its socket buffers fill and a send waits: the stream ends, and the lock and the events go."""
    from evomerge.server.streaming import EventStream

    closed = []

    def endless():
        try:
            while True:
                yield {"text": "7"}
        finally:
            closed.append(True)

    sent = []

    async def send(message):
        sent.append(message)
        if len(sent) > 3:
            await asyncio.Event().wait()  # the client takes in nothing more

    async def connected():
        await asyncio.Event().wait()

    async def main() -> bool:
        lock = asyncio.Lock()
        await asyncio.wait_for(EventStream(lock, endless, send_timeout=0.05)({"type": "http"}, connected, send), 30)
        return lock.locked()

    assert asyncio.run(main()) is False and closed == [True] and len(sent) == 4
