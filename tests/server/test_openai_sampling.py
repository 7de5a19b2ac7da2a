"""The sampling features OpenAI clients use, through the official ``openai`` SDK over loopback:
chat ``logprobs``/``top_logprobs``, ``n`` choices (seeded per choice), ``presence_penalty``,
``frequency_penalty``, ``logit_bias``, and special tokens left out of the text unless
``skip_special_tokens`` is false (vLLM's field, sent as ``extra_body``)."""

from __future__ import annotations

from collections import Counter

import pytest

from evomerge.models.zoo.tiny_lm import build_tokenizer
from fixtures_service import chat_text

PROMPT = "12+34="
MESSAGES = [{"role": "user", "content": "12+34="}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def shown(tokens) -> str:
    """Chat log-probability tokens joined as the content shows them: a token is its own text, a
    special one by its name (as vLLM writes it), which the content leaves out."""
    return "".join(t.token for t in tokens if t.token not in build_tokenizer().all_special_tokens)


def test_chat_logprobs_are_the_completions_routes_with_the_top_alternatives_sorted(chat_client):
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 4}):
        asked = {"model": "tiny-base", "messages": MESSAGES, "max_tokens": 8, **sampling}
        answer = chat_client.chat.completions.create(**asked, logprobs=True, top_logprobs=5)
        (choice,) = answer.choices
        content = choice.logprobs.content
        assert shown(content) == choice.message.content and len(content) == answer.usage.completion_tokens
        plain = chat_client.completions.create(
            model="tiny-base", prompt=chat_text(MESSAGES), max_tokens=8, logprobs=0, **sampling
        ).choices[0]
        assert plain.text == choice.message.content
        assert [t.logprob for t in content] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
        for entry in content:
            top = entry.top_logprobs
            assert len(top) == 5 and [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
            assert entry.bytes == list(entry.token.encode()) and all(t.bytes == list(t.token.encode()) for t in top)
            assert entry.logprob <= top[0].logprob + 1e-6
            if sampling["temperature"] == 0:
                assert (top[0].token, top[0].logprob) == (entry.token, pytest.approx(entry.logprob))
        without = chat_client.chat.completions.create(**asked, logprobs=True).choices[0].logprobs.content
        assert [t.top_logprobs for t in without] == [[]] * len(content)
        assert chat_client.chat.completions.create(**asked).choices[0].logprobs is None


def test_streamed_chat_logprobs_join_to_the_whole_ones(chat_client):
    asked = {"model": "tiny-base", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    whole = chat_client.chat.completions.create(**asked).choices[0].logprobs.content
    chunks = list(chat_client.chat.completions.create(**asked, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in whole]
    for c in chunks:  # each chunk's tokens are the text it carries
        if c.choices[0].logprobs:
            assert shown(c.choices[0].logprobs.content) == (c.choices[0].delta.content or "")


def test_n_choices_differ_under_sampling_and_each_is_reproducible_by_its_seed(client):
    asked = {"model": "tiny-base", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "logprobs": 0}
    answer = client.completions.create(**asked, n=4, seed=7)
    texts = [c.text for c in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1, 2, 3] and len(set(texts)) > 1
    for index, text in enumerate(texts):  # choice i is the n = 1 answer seeded seed + i
        assert client.completions.create(**asked, seed=7 + index).choices[0].text == text
    assert answer.usage.prompt_tokens == len(PROMPT)  # the prompt counts once
    assert answer.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in answer.choices)
    greedy = client.completions.create(**{**asked, "temperature": 0}, n=3)
    assert len({c.text for c in greedy.choices}) == 1 and len(greedy.choices) == 3


def test_streamed_n_choices_join_per_index_to_the_whole_ones(client, chat_client):
    asked = {"model": "tiny-base", "prompt": ["12+34=", "ab>"], "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2}
    whole = client.completions.create(**asked).choices
    chunks = list(client.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    assert [c.index for c in whole] == [0, 1, 2, 3]
    for choice in whole:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == choice.finish_reason
    usage = chunks[-1].usage
    assert usage == client.completions.create(**asked).usage and usage.prompt_tokens == len("12+34=") + len("ab>")
    chat = {"model": "tiny-base", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 3}
    whole = chat_client.chat.completions.create(**chat).choices
    streamed = list(chat_client.chat.completions.create(**chat, stream=True))
    for choice in whole:
        mine = [c.choices[0] for c in streamed if c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert mine[-1].finish_reason == choice.finish_reason


def test_penalties_pick_the_best_token_after_openais_subtraction(client, tokenizer):
    """With the raw log-probabilities reported, each picked token must win once
    ``frequency_penalty * count + presence_penalty * (count > 0)`` is subtracted, and the
    repeats greedy makes (reversing "aaaaaaa") must be rarer under a large presence penalty."""
    asked = {"model": "reversal", "prompt": "aaaaaaa>", "max_tokens": 10, "temperature": 0, "logprobs": 20,
             "extra_body": {"skip_special_tokens": False}}  # a special token keeps its name, as its alternatives do
    greedy = client.completions.create(**asked).choices[0]
    repeats = lambda text: len(text) - len(set(text))  # noqa: E731
    assert repeats(greedy.text) >= 4
    for presence, frequency in ((2.0, 0.0), (0.0, 1.5), (2.0, 2.0), (-0.5, 0.0)):
        choice = client.completions.create(**asked, presence_penalty=presence, frequency_penalty=frequency).choices[0]
        counts: Counter = Counter()
        for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
            def adjusted(text: str, value: float) -> float:
                return value - frequency * counts[text] - presence * (counts[text] > 0)

            assert all(adjusted(token, logprob) >= adjusted(t, v) - 1e-4 for t, v in top.items()), (token, top, counts)
            counts[token] += 1
        if presence == 2.0:  # greedy writes "aaaaaaaaaa"; the trained adapter's runners-up then take turns
            assert repeats(choice.text) < repeats(greedy.text) / 2, (choice.text, greedy.text)


def test_logit_bias_bans_and_forces_tokens(client, tokenizer):
    asked = {"model": "tiny-base", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    greedy = client.completions.create(**asked).choices[0].text
    common = Counter(greedy).most_common(1)[0][0]
    banned = client.completions.create(**asked, logit_bias={str(tokenizer.convert_tokens_to_ids(common)): -100}).choices[0]
    assert greedy.count(common) > 0 and common not in banned.text and banned.text != greedy
    forced_char = next(c for c in "xyz#" if c not in greedy)
    forced_id = str(tokenizer.convert_tokens_to_ids(forced_char))
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 1}):
        forced = client.completions.create(**{**asked, **sampling}, logit_bias={forced_id: 100}).choices[0]
        assert forced.text == forced_char * 8 and forced.finish_reason == "length"


def test_special_tokens_are_left_out_of_the_text_unless_kept(client, tokenizer):
    """A +100 bias on the pad token makes the model write it: the text leaves it out by default,
    keeps it with ``skip_special_tokens: false``, and echoed log-probabilities stay aligned with the text."""
    pad = tokenizer.pad_token_id
    prompt_ids = tokenizer(PROMPT)["input_ids"] + [pad]
    asked = {"model": "tiny-base", "prompt": prompt_ids, "max_tokens": 3, "temperature": 0, "logit_bias": {str(pad): 100},
             "echo": True, "logprobs": 1}
    for keep, text in ((None, PROMPT), (False, PROMPT + "<pad>" * 4)):
        extra = {} if keep is None else {"extra_body": {"skip_special_tokens": keep}}
        answer = client.completions.create(**asked, **extra)
        (choice,) = answer.choices
        logprobs = choice.logprobs
        assert choice.text == text and answer.usage.completion_tokens == 3
        assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == len(prompt_ids) + 3
        assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
        streamed = "".join(c.choices[0].text for c in client.completions.create(**asked, **extra, stream=True))
        assert streamed == choice.text
