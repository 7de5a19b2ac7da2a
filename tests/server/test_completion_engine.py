"""The completion engine on a model whose next token is fixed: where a generation ends, and what
its text holds, follow from the model's end tokens and the request."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from evomerge.models.zoo.tiny_lm import build_tokenizer
from evomerge.server.completion_engine import SamplingParams, complete


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
    assert ended.choice == {"text": "3", "logprobs": None, "finish_reason": "stop"} and ended.completion_tokens == 1
    runs_on = run(Repeats([three, end], len(tokenizer)), tokenizer, max_tokens=8)
    assert runs_on.choice["text"] == "3" + "+" * 7 and runs_on.choice["finish_reason"] == "length"


def test_special_tokens_are_left_out_only_when_asked(tokenizer):
    three, four = tokenizer.convert_tokens_to_ids(["3", "4"])
    pad = tokenizer.pad_token_id
    model = lambda: Repeats([three, pad, four], len(tokenizer))  # noqa: E731
    raw = run(model(), tokenizer, max_tokens=3)
    assert raw.choice["text"] == "3" + tokenizer.pad_token + "4"
    clean = run(model(), tokenizer, max_tokens=3, skip_special_tokens=True)
    assert clean.choice["text"] == "34" and clean.completion_tokens == 3
    stopped = run(model(), tokenizer, max_tokens=3, skip_special_tokens=True, stop=["4"])
    assert stopped.choice["text"] == "3" and stopped.choice["finish_reason"] == "stop"
