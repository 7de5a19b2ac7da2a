"""``/v1/chat/completions`` of the reference service: the conversation rendered by the model's chat
template and continued by the same engine as ``/v1/completions``, in the OpenAI chat shape, and
the requests it cannot honour refused in OpenAI's error shape."""

from __future__ import annotations

import httpx
import pytest

from evomerge.models.zoo.tiny_lm import build_tokenizer
from fixtures_service import TOKEN, chat_text

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=AUTH, timeout=60)


def test_a_chat_answer_is_the_completion_of_the_rendered_conversation(judge_service):
    messages = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "46"}, {"role": "user", "content": "ab>"}]
    asked = {"model": "tiny-base", "max_tokens": 6, "temperature": 0}
    chat = post(judge_service, "/v1/chat/completions", {**asked, "messages": messages})
    assert chat.status_code == 200, chat.text
    answer = chat.json()
    plain = post(judge_service, "/v1/completions", {**asked, "prompt": chat_text(messages)}).json()
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    (choice,) = answer["choices"]
    completed = plain["choices"][0]["text"]
    for special in build_tokenizer().all_special_tokens:  # a chat reply leaves them out, as vLLM's does
        completed = completed.replace(special, "")
    assert choice["message"] == {"role": "assistant", "content": completed}
    assert choice["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert answer["usage"] == plain["usage"]
    assert answer["usage"]["prompt_tokens"] == len(chat_text(messages))  # one token per character, no BOS added


def test_text_parts_read_as_one_message_and_max_completion_tokens_bounds_the_answer(judge_service):
    parts = [{"type": "text", "text": "12+"}, {"type": "text", "text": "34="}]
    asked = {"model": "tiny-base", "temperature": 0}
    joined = post(judge_service, "/v1/chat/completions", {**asked, "max_tokens": 5, "messages": [{"role": "user", "content": "12+34="}]})
    split = post(judge_service, "/v1/chat/completions", {**asked, "max_tokens": 5, "messages": [{"role": "user", "content": parts}]})
    assert split.json()["choices"] == joined.json()["choices"]
    capped = post(judge_service, "/v1/chat/completions", {
        **asked, "max_tokens": 5, "max_completion_tokens": 2, "messages": [{"role": "user", "content": "12+34="}],
    }).json()
    whole = joined.json()
    assert capped["usage"]["completion_tokens"] == min(2, whole["usage"]["completion_tokens"])
    assert whole["choices"][0]["message"]["content"].startswith(capped["choices"][0]["message"]["content"])


def test_without_a_limit_the_answer_may_run_to_the_end_of_the_context(judge_service):
    messages = [{"role": "user", "content": "12+34="}]
    answer = post(judge_service, "/v1/chat/completions", {"model": "tiny-base", "temperature": 0, "messages": messages}).json()
    room = 64 - len(chat_text(messages))  # the judge model's 64 positions
    used = answer["usage"]["completion_tokens"]
    assert 0 < used <= room
    assert answer["choices"][0]["finish_reason"] == ("length" if used == room else "stop")


@pytest.mark.parametrize("change, code, words", [
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1"}]}, "invalid_messages", "no system turns"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "unsupported_parameter", "tools"),
    ({"response_format": {"type": "json_object"}}, "unsupported_parameter", "response_format"),
    ({"top_logprobs": 2}, "invalid_request", "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "invalid_request", "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "invalid_stream_options", "stream is true"),
    ({"n": 17}, "invalid_request", "n"),
    ({"presence_penalty": 2.5}, "invalid_request", "presence_penalty"),
    ({"logit_bias": {"50": 1}}, "invalid_logit_bias", "not a token id in [0, 50)"),
    ({"logit_bias": {"a": 1}}, "invalid_logit_bias", "logit_bias"),
    ({"logit_bias": {"5": 101}}, "invalid_request", "logit_bias"),
    ({"messages": []}, "invalid_request", "messages"),
    ({"messages": [{"role": "tool", "content": "1"}]}, "invalid_request", "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "invalid_request", "content"),
    ({"max_tokens": 80}, "context_length_exceeded", "maximum context length"),
])
def test_refusals_name_what_to_change(judge_service, change, code, words):
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": "1"}], **change}
    r = post(judge_service, "/v1/chat/completions", body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == code and words in error["message"], error


def test_a_model_without_a_chat_template_sends_the_client_to_completions(service):
    r = post(service, "/v1/chat/completions", {"model": "tiny-base", "messages": [{"role": "user", "content": "1"}]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "no_chat_template" and "/v1/completions" in error["message"]
