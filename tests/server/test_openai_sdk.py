"""The reference service as the official ``openai`` SDK sees it, over loopback: completions (echo,
logprobs, stop, max_tokens, seed), chat, both streamed (the deltas joined are the whole answer),
``stream_options.include_usage``, the model list, and the SDK's error classes for the service's
refusals (retries off, so a refusal is one request)."""

from __future__ import annotations

import openai
import pytest

from fixtures_service import openai_client


@pytest.fixture(scope="module")
def cuttable(client) -> tuple[dict, str]:
    """A greedy completion (its request and text) that a two-character stop string cuts after its
    first character, so a stream must hold that stop string's first character back."""
    for model in ("reversal", "addition", "subtraction", "tiny-base"):
        for prompt in ("hello>", "abcdef>", "12+34=", "55-21=", "27+38="):
            asked = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
            text = client.completions.create(**asked).choices[0].text
            if len(text) >= 3 and text.find(text[1:3]) == 1:
                return asked, text
    pytest.fail("no greedy completion of the tiny models has three characters to cut")


def joined_stream(client: openai.OpenAI, **asked) -> tuple[str, dict | None, list]:
    """A streamed completion's text and logprobs, each joined over its chunks, and the chunks."""
    chunks = list(client.completions.create(stream=True, **asked))
    text = "".join(c.choices[0].text for c in chunks)
    logprobs = None
    if asked.get("logprobs") is not None:
        parts = [c.choices[0].logprobs for c in chunks]
        logprobs = {key: [v for p in parts for v in getattr(p, key)] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    return text, logprobs, chunks


def test_the_model_list_names_the_base_then_its_adapters(client):
    models = client.models.list().data
    assert [(m.id, m.object) for m in models][:4] == [
        ("tiny-base", "model"), ("addition", "model"), ("reversal", "model"), ("subtraction", "model")
    ]


def test_completions_with_echo_logprobs_stop_and_seed(client, cuttable):
    asked, full = cuttable
    answer = client.completions.create(**asked, echo=True, logprobs=2)
    (choice,) = answer.choices
    assert answer.object == "text_completion" and choice.text == asked["prompt"] + full
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and logprobs.token_logprobs[0] is None
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert all(len(top) >= 2 for top in logprobs.top_logprobs[1:])
    assert answer.usage.prompt_tokens == len(asked["prompt"]) and answer.usage.completion_tokens == len(full)
    cut = client.completions.create(**asked, stop=[full[1:3]]).choices[0]
    assert cut.text == full[0] and cut.finish_reason == "stop"
    short = client.completions.create(**{**asked, "max_tokens": 2}).choices[0]
    assert short.text == full[:2] and short.finish_reason == "length"
    sampled = {**asked, "temperature": 1.0, "seed": 11, "max_tokens": 8}
    assert len({client.completions.create(**sampled).choices[0].text for _ in range(2)}) == 1


@pytest.mark.parametrize("extra", [
    {"echo": True, "logprobs": 2},
    {"logprobs": 0},
    {"temperature": 1.0, "seed": 5, "max_tokens": 8},
], ids=["greedy-echo-logprobs", "greedy-logprobs", "seeded"])
def test_a_streamed_completion_joins_to_the_whole_one(client, cuttable, extra):
    asked = {**cuttable[0], **extra}
    whole = client.completions.create(**asked).choices[0]
    text, logprobs, chunks = joined_stream(client, **asked)
    assert text == whole.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [whole.finish_reason]
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    if logprobs is not None:
        assert logprobs["tokens"] == whole.logprobs.tokens and logprobs["text_offset"] == whole.logprobs.text_offset
        assert logprobs["token_logprobs"] == pytest.approx(whole.logprobs.token_logprobs)


def test_a_streamed_prompt_list_answers_each_prompt_in_turn(client):
    asked = {"model": "addition", "prompt": ["hello>", "12+34="], "max_tokens": 4, "temperature": 0}
    whole = client.completions.create(**asked).choices
    chunks = list(client.completions.create(**asked, stream=True))
    indices = [c.choices[0].index for c in chunks]
    assert indices == sorted(indices) and set(indices) == {0, 1}
    for choice in whole:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == choice.finish_reason


def test_a_stop_string_never_reaches_a_stream_in_part(client, cuttable):
    asked, full = cuttable
    for stop, expected in ((full[1:3], full[0]), (full[1] + "\u00a7", full)):  # cut there; never completed
        text, _, chunks = joined_stream(client, **asked, stop=[stop])
        assert text == expected == client.completions.create(**asked, stop=[stop]).choices[0].text
        assert len(chunks) >= 1 and all(c.choices[0].text or c.choices[0].finish_reason for c in chunks)


def test_a_streamed_chat_answer_joins_to_the_whole_one_and_ends_with_the_usage(chat_client):
    messages = [{"role": "user", "content": "12+34="}]
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        asked = {"model": "tiny-base", "messages": messages, "max_tokens": 12, **sampling}
        whole = chat_client.chat.completions.create(**asked)
        chunks = list(chat_client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
        *answer, last = chunks
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert answer[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in answer) == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in answer] == [None] * (len(answer) - 1) + [whole.choices[0].finish_reason]
        assert all(c.usage is None for c in answer) and last.choices == [] and last.usage == whole.usage


def test_a_chat_stream_without_options_ends_with_its_finish_reason(chat_client):
    chunks = list(chat_client.chat.completions.create(
        model="tiny-base", messages=[{"role": "user", "content": "ab>"}], max_tokens=3, temperature=0, stream=True
    ))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and all(c.usage is None for c in chunks)


def test_refusals_raise_the_sdks_error_classes(service, client, chat_client):
    with pytest.raises(openai.AuthenticationError):
        openai_client(service, "wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        openai_client(service, "wrong").completions.create(model="tiny-base", prompt="1", stream=True)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as missing:
            client.completions.create(model="nope", prompt="1", max_tokens=2, stream=stream)
        assert missing.value.code == "model_not_found"
    refusals = [
        (client.completions.create, {"model": "tiny-base", "prompt": "1", "temperature": 5}, "invalid_request"),
        (client.completions.create, {"model": "tiny-base", "prompt": "1", "n": 1000, "stream": True}, "invalid_request"),
        (client.completions.create, {"model": "tiny-base", "prompt": ["1"] * 9, "n": 8}, "too_many_choices"),
        (client.completions.create, {"model": "tiny-base", "prompt": "1", "max_tokens": 100, "stream": True}, "context_length_exceeded"),
        (chat_client.chat.completions.create,
         {"model": "tiny-base", "messages": [{"role": "user", "content": "1"}], "top_logprobs": 2, "stream": True}, "invalid_request"),
    ]
    params = ["temperature", "n", "n", None, "top_logprobs"]
    for (create, asked, code), param in zip(refusals, params):
        with pytest.raises(openai.BadRequestError) as refused:
            create(**asked)
        assert refused.value.code == code and refused.value.param == param, refused.value
