"""Tiny base + LoRA adapters trained on different synthetic skills, and the reference service
(``evomerge serve``) started on loopback over them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

TOKEN = "test-serve-token"
SKILLS = ("addition", "reversal", "subtraction")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_models(root: Path) -> dict[str, Path]:
    """A base trained briefly on another skill (so it reads the characters), and one LoRA adapter
    per skill: each adapter knows its skill, the base none of them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from evomerge.models.zoo.tiny_lm import build_tokenizer, skill_examples, tiny_llama, train_causal_lm

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    base = tiny_llama(tokenizer, hidden=64, layers=2, seed=0)
    train_causal_lm(base, tokenizer, skill_examples("sorting", 200, seed=0), steps=60, lr=3e-3, batch_size=32)
    paths = {"base": root / "base", "adapters": root / "adapters"}
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    for i, skill in enumerate(SKILLS):
        model = AutoModelForCausalLM.from_pretrained(paths["base"])
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0)
        peft_model = get_peft_model(model, lora)
        train_causal_lm(peft_model, tokenizer, skill_examples(skill, 300, seed=1), steps=100, lr=1e-2, batch_size=32, seed=i)
        peft_model.save_pretrained(paths["adapters"] / skill)
    return paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return train_models(tmp_path_factory.mktemp("blackbox-models"))


@contextmanager
def serve_process(base: Path, adapters: Path | None, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``evomerge serve`` in a child process on 127.0.0.1; yields (base URL, process) once healthy."""
    port = port or free_port()
    env = {**os.environ, "EVOMERGE_SERVE_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "evomerge.cli", "serve", "--model", str(base), "--port", str(port),
               "--served-model-name", "tiny-base"] + (["--adapters", str(adapters)] if adapters is not None else [])
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def openai_client(url: str, key: str = TOKEN):
    """The ``openai`` SDK on a service at ``url``, retries off so a refusal is one request."""
    import openai  # here: only the tests that drive a service as the SDK does need it

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def wait_healthy(url: str, proc: subprocess.Popen) -> None:
    """Poll /health until it answers; a child that exits first fails with its stderr."""
    import httpx  # here, not at the top: a GPU image without the black-box client still runs the other tests

    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the service at {url} did not become healthy within {STARTUP_SECONDS}s")


@pytest.fixture(scope="session")
def service(tiny_models) -> Iterator[str]:
    """One reference service for the session's tests (they only add and remove their own adapters)."""
    with serve_process(tiny_models["base"], tiny_models["adapters"]) as (url, _):
        yield url


JUDGE_KEY_ENV = "EVOMERGE_TEST_JUDGE_KEY"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
    "{{ m['role'] }}:{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
"""The judge model's chat template: characters of its vocabulary only, and a refusal of system
turns as Gemma's template refuses them."""


def chat_text(messages: list[dict[str, str]]) -> str:
    """What ``CHAT_TEMPLATE`` renders ``messages`` to, ready for the assistant's turn."""
    return "".join(f"{m['role']}:{m['content']}|" for m in messages) + "assistant:"


@pytest.fixture(scope="session")
def judge_service(tmp_path_factory) -> Iterator[str]:
    """``evomerge serve`` over an untrained character Llama, as a judge: its replies are random
    text, but greedy, so the same rubric prompt always gets the same reply."""
    from evomerge.testing.tiny_models import char_llama

    root = tmp_path_factory.mktemp("judge-model")
    model, tokenizer = char_llama(seed=3)
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    with serve_process(root, None) as (url, _):
        yield url


@pytest.fixture
def judge_options(judge_service, monkeypatch) -> dict:
    """``fitness.options.judge`` for the loopback judge: a digit in its reply is the grade (0–9)."""
    monkeypatch.setenv(JUDGE_KEY_ENV, TOKEN)
    return {
        "base_url": judge_service, "model": "tiny-base", "api_key_env": JUDGE_KEY_ENV,
        "rubric": "{prompt}{answer}|", "score_regex": r"(\d)", "scale": [0, 9], "max_tokens": 4,
    }


@contextmanager
def app_in_thread(app, limits=None) -> Iterator[str]:
    """An ASGI app served on 127.0.0.1 in a thread of this process, under the service's uvicorn
    configuration (``evomerge.server.connections``; ``limits``: its ``ConnectionLimits``)."""
    import uvicorn

    from evomerge.server.connections import ConnectionLimits, server_config

    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, limits or ConnectionLimits()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def auth() -> dict[str, str]:
    """Headers that pass the service's bearer-token check."""
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def start_service():
    """``serve_process`` for tests that need a service of their own (to kill and restart it)."""
    return serve_process


@pytest.fixture
def serve_app():
    """``app_in_thread`` for tests that run an app with non-default limits in this process."""
    return app_in_thread


@pytest.fixture
def endpoint(request) -> Iterator[str]:
    """The benchmark's loopback endpoint (benchmarks/loopback_endpoint.py) in its own process,
    answering at once by the fault script the test passes as its parameter."""
    port = free_port()
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "loopback_endpoint.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--latency", "0", "--slow-seconds", "3", "--script", request.param],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.kill()
        proc.wait()
