"""The completion engine on a model whose next token is fixed: where a generation ends, and what
its text holds, follow from the model's end tokens and the request; streamed, its chunks join to
the whole answer and never send text that may still change (part of a stop string, half a character)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from evomerge.models.zoo.tiny_lm import build_tokenizer
from evomerge.server.completion_engine import SamplingParams, complete, stream


class Repeats(torch.nn.Module):
    """Predicts ``tokens[i]`` at the i-th generated step (the last one from then on)."""

    def __init__(self, tokens: list[int], vocab: int, eos: int | list[int] | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokens, self.vocab, self.step = tokens, vocab, 0
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def forward(self, input_ids, use_cache, **_):
        logits = torch.zeros((1, input_ids.shape[1], self.vocab))
        logits[0, -1, self.tokens[min(self.step, len(self.tokens) - 1)]] = 50.0
        self.step += 1
        return SimpleNamespace(logits=logits, cache=None, past_key_values=None)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def run(model, tokenizer, **params):
    return complete(model, tokenizer, tokenizer("1+2=")["input_ids"], "1+2=", SamplingParams(**params), torch.Generator())


@pytest.mark.parametrize("configured", [lambda end: end, lambda end: [end, 0]], ids=["int", "list"])
def test_a_generation_ends_at_the_generation_configs_end_token(tokenizer, configured):
    """A chat model ends its turn with a token of its own that is not the tokenizer's EOS."""
    three, end = tokenizer.convert_tokens_to_ids(["3", "+"])
    assert end != tokenizer.eos_token_id
    ended = run(Repeats([three, end], len(tokenizer), configured(end)), tokenizer, max_tokens=8)
    assert ended.choice == {"text": "3", "logprobs": None, "finish_reason": "stop"}
    assert ended.completion_tokens == 2  # the end token is generated too (usage counts it, as vLLM's does)
    scored = run(Repeats([three, end], len(tokenizer), configured(end)), tokenizer, max_tokens=8, logprobs=0)
    assert scored.choice["logprobs"]["tokens"] == ["3", ""] and scored.choice["logprobs"]["token_logprobs"][1] is not None
    runs_on = run(Repeats([three, end], len(tokenizer)), tokenizer, max_tokens=8)
    assert runs_on.choice["text"] == "3" + "+" * 7 and runs_on.choice["finish_reason"] == "length"


def test_special_tokens_are_left_out_unless_asked_to_keep_them(tokenizer):
    """vLLM's default (``skip_special_tokens``) on both routes; the text and its tokens' pieces agree."""
    three, four = tokenizer.convert_tokens_to_ids(["3", "4"])
    pad = tokenizer.pad_token_id
    model = lambda: Repeats([three, pad, four], len(tokenizer))  # noqa: E731
    clean = run(model(), tokenizer, max_tokens=3, logprobs=0)
    assert clean.choice["text"] == "34" and clean.completion_tokens == 3
    assert clean.choice["logprobs"]["tokens"] == ["3", "", "4"] and clean.choice["logprobs"]["text_offset"] == [0, 1, 1]
    raw = run(model(), tokenizer, max_tokens=3, skip_special_tokens=False, logprobs=0)
    assert raw.choice["text"] == "3" + tokenizer.pad_token + "4"
    assert "".join(raw.choice["logprobs"]["tokens"]) == raw.choice["text"]
    stopped = run(model(), tokenizer, max_tokens=3, stop=["4"])
    assert stopped.choice["text"] == "3" and stopped.choice["finish_reason"] == "stop"


def chunks(model, tokenizer, prompt="1+2=", **params):
    return list(stream(model, tokenizer, tokenizer(prompt)["input_ids"], prompt, SamplingParams(**params), torch.Generator()))


@pytest.mark.parametrize("stop, texts, finish", [
    (["45"], ["", "3", "4", ""], "stop"),  # the 4 before 5 is held back, then cut with the stop string
    (["4x"], ["", "3", "4", "45"], "length"),  # held back while it may begin "4x", sent once it cannot
    ([], ["", "3", "4", "4", "5"], "length"),
])
def test_a_stream_holds_back_what_may_begin_a_stop_string(tokenizer, stop, texts, finish):
    tokens = tokenizer.convert_tokens_to_ids(["3", "4", "4", "5"])
    streamed = chunks(Repeats(tokens, len(tokenizer)), tokenizer, max_tokens=4, stop=stop, logprobs=0)
    assert [c.text for c in streamed] == texts and streamed[-1].finish_reason == finish
    assert all(c.finish_reason is None for c in streamed[:-1])
    for c in streamed:  # each chunk carries the tokens of its own text
        assert "".join(c.logprobs["tokens"]) == c.text and c.completion_tokens == len(c.logprobs["tokens"])
    whole = run(Repeats(tokens, len(tokenizer)), tokenizer, max_tokens=4, stop=stop, logprobs=0)
    assert whole.choice["text"] == "".join(texts) and whole.completion_tokens == sum(c.completion_tokens for c in streamed)


def test_an_echoed_prompt_is_the_first_chunk_and_offsets_run_on_across_chunks(tokenizer):
    tokens = tokenizer.convert_tokens_to_ids(["3", "4"])
    streamed = chunks(Repeats(tokens, len(tokenizer)), tokenizer, max_tokens=2, echo=True, logprobs=1)
    assert [c.text for c in streamed] == ["1+2=", "3", "4"]
    assert streamed[0].logprobs["token_logprobs"][0] is None and streamed[0].completion_tokens == 0
    assert [c.logprobs["text_offset"] for c in streamed] == [[0, 1, 2, 3], [4], [5]]


def byte_tokenizer():
    """A byte-level BPE without merges: one token per byte, so a multi-byte character spans
    several tokens, each alone decoding to U+FFFD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_a_character_split_over_tokens_is_sent_whole():
    """A byte-level tokenizer spells "é" as two tokens; the first alone decodes to U+FFFD."""
    tokenizer = byte_tokenizer()
    ids = tokenizer("aé")["input_ids"]
    assert len(ids) == 3 and tokenizer.decode(ids[:2]) == "a\ufffd"
    streamed = chunks(Repeats(ids, len(tokenizer)), tokenizer, prompt="x", max_tokens=3)
    assert [c.text for c in streamed] == ["", "a", "é"] and [c.completion_tokens for c in streamed] == [0, 1, 2]


class Fixed(torch.nn.Module):
    """Gives the same logits at every step."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logits = logits
        self.generation_config = SimpleNamespace(eos_token_id=None)

    def forward(self, input_ids, use_cache, **_):
        return SimpleNamespace(logits=self.logits.expand(1, input_ids.shape[1], -1), cache=None, past_key_values=None)


@pytest.mark.parametrize("adjust, text", [
    ({}, "aaaaaa"),
    ({"presence_penalty": 1.0}, "abaaaa"),  # a loses 1 once it has appeared, whatever its count
    ({"frequency_penalty": 1.0}, "ababab"),  # each one loses 1 per appearance
    ({"presence_penalty": -1.0}, "aaaaaa"),
    ({"logit_bias": {"b": 1.0}}, "bbbbbb"),
])
def test_penalties_and_bias_change_the_pick_as_openai_defines_them(tokenizer, adjust, text):
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    logits = torch.full((len(tokenizer),), -10.0)
    logits[a], logits[b] = 1.0, 0.5
    if "logit_bias" in adjust:
        adjust = {"logit_bias": {tokenizer.convert_tokens_to_ids(k): v for k, v in adjust["logit_bias"].items()}}
    done = run(Fixed(logits), tokenizer, max_tokens=6, temperature=0, logprobs=0, **adjust)
    assert done.choice["text"] == text
    raw = logits.log_softmax(-1)  # the reported log-probabilities are the model's, before any adjustment
    assert done.choice["logprobs"]["token_logprobs"] == pytest.approx([float(raw[a if c == "a" else b]) for c in text])


def metaspace_tokenizer():
    """A sentencepiece-like tokenizer: words carry their leading space as "▁", which a word
    decoded alone at the start of a text loses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "▁say", "▁hello", "▁world"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_incremental_detokenization_gives_the_whole_decodes_text(kind):
    """Token by token, the texts joined are what decoding prompt and completion whole adds to the prompt."""
    import random

    from evomerge.server.detokenizer import IncrementalDetokenizer

    if kind == "metaspace":
        tokenizer = metaspace_tokenizer()
        sample = "say hello world hello say world hello"
    else:
        tokenizer = byte_tokenizer()
        sample = "say é 日本 👍 done"
    ids = tokenizer(sample)["input_ids"]
    rng = random.Random(0)
    for _ in range(20):
        cut = rng.randrange(1, len(ids))
        prompt, completion = ids[:cut], ids[cut:]
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
        pieces = [detokenizer.add(t) for t in completion] + [detokenizer.flush()]
        whole = tokenizer.decode(prompt + completion)
        assert whole.startswith(tokenizer.decode(prompt)) or "\ufffd" in tokenizer.decode(prompt)
        if "\ufffd" not in tokenizer.decode(prompt):
            assert "".join(pieces) == whole[len(tokenizer.decode(prompt)):]
        assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("skip", [True, False])
def test_echoed_offsets_index_the_prompt_as_written(skip):
    """A tokenizer that adds a BOS (here "<eos>") to a prompt that holds a special token written
    in it ("<pad>", as a chat marker would be): the echo is the prompt as sent, its tokens spell it,
    the added BOS has no text and the written one keeps its name."""
    from tokenizers import processors

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", tokenizer.eos_token_id)]
    )
    prompt = "1+<pad>2="
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.eos_token_id and tokenizer.pad_token_id in ids
    three = tokenizer.convert_tokens_to_ids("3")
    params = SamplingParams(max_tokens=1, echo=True, logprobs=0, skip_special_tokens=skip)
    done = complete(Repeats([three], len(tokenizer)), tokenizer, ids, prompt, params, torch.Generator())
    logprobs = done.choice["logprobs"]
    assert done.choice["text"] == prompt + "3"
    assert logprobs["tokens"] == ["", "1", "+", "<pad>", "2", "=", "3"]
    assert logprobs["text_offset"] == [0, 0, 1, 2, 7, 8, 9]


def test_chat_logprob_bytes_join_to_the_text_of_characters_split_over_tokens():
    """Byte-level BPE spells "é" and "日" over several tokens, each alone decoding to U+FFFD:
    their ``bytes`` are the real bytes, so a client joining them gets the text back."""
    tokenizer = byte_tokenizer()
    ids = tokenizer("aé日")["input_ids"]
    params = SamplingParams(max_tokens=len(ids), logprobs=2, chat_logprobs=True)
    done = complete(Repeats(ids, len(tokenizer)), tokenizer, tokenizer("x")["input_ids"], "x", params, torch.Generator())
    content = done.choice["logprobs"]["content"]
    assert done.choice["text"] == "aé日" and len(content) == len(ids) == 6
    assert "\ufffd" in content[1]["token"] and bytes(b for t in content for b in t["bytes"]).decode() == "aé日"
    assert all(len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["bytes"] == t["bytes"] for t in content)
