"""vLLM's tokenizer routes of the reference service (``/tokenize``, ``/detokenize``,
``/tokenizer_info``): the served tokenizer's own ids, for clients that tokenize on the server
(lm-eval's API models; their end-to-end check is in tests/fitness/test_harness.py)."""

from __future__ import annotations

import httpx
import pytest

from evomerge.models.zoo.tiny_lm import build_tokenizer
from fixtures_service import CHAT_TEMPLATE, TOKEN, chat_text

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=AUTH, timeout=60)


def test_tokenize_gives_the_served_tokenizers_ids_and_detokenize_inverts_it(service):
    tokenizer = build_tokenizer()
    text = "12+34=46"
    answer = post(service, "/tokenize", {"model": "addition", "prompt": text, "return_token_strs": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["tokens"] == tokenizer(text)["input_ids"] and body["count"] == len(body["tokens"])
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    assert body["max_model_len"] == post(service, "/tokenize", {"prompt": "1"}).json()["max_model_len"] > 0
    assert post(service, "/detokenize", {"tokens": body["tokens"]}).json() == {"prompt": text}
    with_eos = body["tokens"] + [tokenizer.eos_token_id]
    assert post(service, "/detokenize", {"tokens": with_eos}).json()["prompt"] == tokenizer.decode(with_eos)


def test_chat_messages_tokenize_as_the_chat_route_renders_them(judge_service):
    messages = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "46"}, {"role": "user", "content": "7+1="}]
    tokenized = post(judge_service, "/tokenize", {"messages": messages}).json()
    assert post(judge_service, "/detokenize", {"tokens": tokenized["tokens"]}).json()["prompt"] == chat_text(messages)
    chat = post(judge_service, "/v1/chat/completions", {"model": "tiny-base", "messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == tokenized["count"]
    info = httpx.get(judge_service + "/tokenizer_info", headers=AUTH).json()
    assert info["chat_template"] == CHAT_TEMPLATE and info["eos_token"] == build_tokenizer().eos_token


@pytest.mark.parametrize("path, body, status, code", [
    ("/tokenize", {"prompt": "1", "model": "nope"}, 404, "model_not_found"),
    ("/tokenize", {}, 400, "invalid_request"),
    ("/tokenize", {"prompt": "1", "messages": [{"role": "user", "content": "1"}]}, 400, "invalid_request"),
    ("/tokenize", {"messages": [{"role": "user", "content": "1"}]}, 400, "no_chat_template"),
    ("/detokenize", {"tokens": [10**9]}, 400, "invalid_tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "invalid_tokens"),
    ("/detokenize", {"tokens": "12"}, 400, "invalid_request"),
])
def test_refusals_name_what_to_change(service, path, body, status, code):
    answer = post(service, path, body)
    assert answer.status_code == status and answer.json()["error"]["code"] == code, answer.text


def test_the_routes_need_the_token(service):
    assert httpx.get(service + "/tokenizer_info").status_code == 401
    assert httpx.post(service + "/tokenize", json={"prompt": "1"}).status_code == 401
