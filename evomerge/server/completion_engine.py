"""OpenAI ``/v1/completions`` semantics on a transformers causal LM, one prompt at a time.

A prompt is run once over its whole length with the KV cache on: its logits give the prompt
tokens' log-probabilities (for ``echo``) and the first generated token; each further token is one
cached step. As in the OpenAI reference, ``echo`` returns the prompt followed by the completion,
and its ``logprobs`` cover the prompt's tokens (the first has no log-probability: nothing predicts
it) followed by the generated ones; ``top_logprobs`` holds the ``logprobs`` most likely tokens plus
the chosen one; ``text_offset`` is each token's character offset in the returned ``text``.
``stop`` strings end the generation and are left out of the text, as are the tokens from the one
that completes the stop string on. Log-probabilities are those of the model's own distribution;
``temperature`` and ``top_p`` only shape the sampling, which a ``seed`` makes reproducible.
Generation ends at any of the model's end tokens: the tokenizer's EOS and its generation config's
(a chat model ends its turn with a token of its own, Gemma's ``<end_of_turn>``, Llama 3's
``<|eot_id|>``). The end token is generated like any other, as in vLLM and the OpenAI reference:
it counts in ``usage`` and has its log-probability (with no text); lm-eval's API models read
``echo`` with ``max_tokens: 1`` as the prompt's log-probabilities followed by exactly one more. ``skip_special_tokens`` leaves special tokens out of the text, as vLLM does for
chat replies.
A model whose logits are not finite (a merge with huge coefficients) is refused, not sampled.

``stream`` yields a choice in chunks as it is generated (``stream: true``); ``complete`` is those
chunks joined, so a streamed answer and a whole one come from the same loop and never differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from evomerge.fitness.lm import end_token_ids
from evomerge.server.model_host import ServiceError

NON_FINITE = "non_finite_output"
DECODE_WINDOW = 6
"""Tokens of left context used to decode one token's text (enough for byte-level and sentencepiece
tokenizers to render word-initial spaces and multi-byte characters), so decoding stays linear."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    echo: bool = False
    skip_special_tokens: bool = False


@dataclass
class Completion:
    """One choice of a completions response, before its ``index`` is set, and its token counts."""

    choice: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Chunk:
    """A piece of one choice as it is streamed: new text, the log-probabilities of the tokens that
    came with it (when asked), the finish reason on the last chunk, and how many generated
    tokens it holds. The chunks of a choice joined are the choice."""

    text: str
    logprobs: dict[str, list[Any]] | None
    finish_reason: str | None
    completion_tokens: int


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text in context, so that the texts joined give the decoded sequence."""
    texts = []
    for i in range(len(ids)):
        start = max(0, i - DECODE_WINDOW)
        before = tokenizer.decode(ids[start:i]) if i > start else ""
        texts.append(tokenizer.decode(ids[start : i + 1])[len(before) :])
    return texts


def _top(tokenizer: Any, logprobs: torch.Tensor, k: int, chosen: int, chosen_text: str) -> dict[str, float]:
    top: dict[str, float] = {}
    if k > 0:
        values, ids = logprobs.topk(k)
        for value, token in zip(values.tolist(), ids.tolist()):
            top.setdefault(tokenizer.decode([token]), value)
    top[chosen_text] = float(logprobs[chosen])
    return top


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as log-probabilities, or a refusal when the model computed infinities or NaNs."""
    if not bool(torch.isfinite(logits).all()):
        raise ServiceError(400, "The model gives non-finite logits for this prompt (a merge with too large coefficients?).", NON_FINITE)
    return logits.float().log_softmax(-1)


def _cache_name() -> str:
    """The KV-cache keyword and output field: ``cache`` in transformers ≥ 5.2x, ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keep the smallest nucleus
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _logprobs(
    tokenizer: Any, k: int, pieces: list[str], scored: list[tuple[int, torch.Tensor] | None], offset: int
) -> dict[str, list[Any]]:
    """The reference's ``logprobs`` object for tokens with these texts, each scored as
    ``(token, log-probability row)`` (``None``: nothing predicts it), the first at ``offset``."""
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets = []
    for piece, score in zip(pieces, scored):
        offsets.append(offset)
        offset += len(piece)
        if score is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token, row = score
            token_logprobs.append(float(row[token]))
            top_logprobs.append(_top(tokenizer, row, k, token, piece))
    return {"tokens": list(pieces), "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


class _Text:
    """The generated tokens, their text as decoded so far, and how much of it has been sent.

    The text is decoded whole after each token (so it is what a one-shot decode gives); a chunk
    sends what is new of it, holding back what may still change: a trailing partial character
    (a multi-byte character split over tokens decodes to U+FFFD until it is complete) and a
    suffix that may be the start of a stop string (vLLM holds it back too), so that no part of a
    stop string reaches a stream. A token goes out with the chunk its text ends in."""

    def __init__(self, tokenizer: Any, params: SamplingParams, offset: int) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.special = set(tokenizer.all_special_ids) if params.skip_special_tokens else set()
        self.ids: list[int] = []
        self.rows: list[torch.Tensor] = []
        self.pieces: list[str] = []
        self.ends: list[int] = []
        """Where each token's piece ends in the text (the pieces' cumulative length)."""
        self.text = ""
        self.sent = 0
        self.sent_tokens = 0
        self.offset = offset
        """``text_offset`` of the next token sent (after an echoed prompt)."""

    def add(self, token: int, row: torch.Tensor, shown: bool = True) -> None:
        """Take a generated token; one not ``shown`` (the end token) is counted and scored but adds no text."""
        self.ids.append(token)
        self.rows.append(row)
        shown = shown and token not in self.special
        piece = token_texts(self.tokenizer, self.ids[-DECODE_WINDOW - 1 :])[-1] if shown else ""
        self.pieces.append(piece)
        self.ends.append((self.ends[-1] if self.ends else 0) + len(piece))
        if shown:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=self.params.skip_special_tokens)

    def stop_at(self) -> int | None:
        """Where the first stop string in the text begins, if one is there."""
        return min((i for i in (self.text.find(s) for s in self.params.stop) if i >= 0), default=None)

    def safe(self) -> int:
        """How much of the text can be sent now."""
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        held = [k for s in self.params.stop for k in range(1, len(s)) if self.text.endswith(s[:k], self.sent, end)]
        return end - max(held, default=0)

    def chunk(self, end: int, finish: str | None = None, every_token: bool = False) -> Chunk:
        """The text up to ``end`` not sent yet, the tokens whose piece ends in it (with
        ``every_token``, all the others too), and their log-probabilities when asked."""
        first = self.sent_tokens
        last = first
        while last < len(self.ids) and (every_token or self.ends[last] <= end):
            last += 1
        chunk = Chunk(self.text[self.sent : max(end, self.sent)], None, finish, last - first)
        if self.params.logprobs is not None:
            pieces = self.pieces[first:last]
            chunk.logprobs = _logprobs(
                self.tokenizer, self.params.logprobs, pieces, list(zip(self.ids[first:last], self.rows[first:last])), self.offset
            )
            self.offset += sum(len(p) for p in pieces)
        self.sent, self.sent_tokens = max(end, self.sent), last
        return chunk


@torch.inference_mode()
def stream(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[int],
    prompt_text: str,
    params: SamplingParams,
    generator: torch.Generator,
) -> Iterator[Chunk]:
    """Score and continue one prompt, chunk by chunk; ``prompt_text`` is what ``echo`` returns.

    The first chunk comes once the prompt is read: the prompt with ``echo`` (and its
    log-probabilities), otherwise empty. Then a chunk for each token whose text can be sent
    (see ``_Text``), each before the next token is computed, so a consumer that stops iterating
    stops the generation; the last chunk carries the finish reason and any text held back (at
    ``max_tokens`` it is the last token's chunk)."""
    device = next(model.parameters()).device
    ends = set(end_token_ids(model, tokenizer) or [])
    cache = _cache_name()
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=params.max_tokens > 0)
    prompt_logprobs = _finite(out.logits[0])
    past = getattr(out, cache)
    echoed = params.echo and params.logprobs is not None
    prompt_pieces = token_texts(tokenizer, prompt_ids) if echoed else []
    first = Chunk(prompt_text if params.echo else "", None, None, 0)
    if params.logprobs is not None:
        scored = [None] + [(prompt_ids[i], prompt_logprobs[i - 1]) for i in range(1, len(prompt_ids))] if echoed else []
        first.logprobs = _logprobs(tokenizer, params.logprobs, prompt_pieces, scored, 0)
    yield first
    text = _Text(tokenizer, params, sum(len(p) for p in prompt_pieces))
    step_logprobs = prompt_logprobs[-1]
    while len(text.ids) < params.max_tokens:
        token = _pick(step_logprobs, params, generator)
        if token in ends:  # a generated token like any other (usage, logprobs), without text
            text.add(token, step_logprobs, shown=False)
            yield text.chunk(len(text.text), "stop", every_token=True)
            return
        text.add(token, step_logprobs)
        cut = text.stop_at()
        if cut is not None:
            yield text.chunk(cut, "stop")
            return
        if len(text.ids) == params.max_tokens:
            break
        if text.safe() > text.sent:
            yield text.chunk(text.safe())
        step = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{cache: past})
        past = getattr(step, cache)
        step_logprobs = _finite(step.logits[0, -1])
    yield text.chunk(len(text.text), "length", every_token=True)


def complete(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[int],
    prompt_text: str,
    params: SamplingParams,
    generator: torch.Generator,
) -> Completion:
    """One prompt's whole choice: the chunks of ``stream`` joined, so a streamed answer and a
    whole one never differ."""
    chunks = list(stream(model, tokenizer, prompt_ids, prompt_text, params, generator))
    logprobs = None
    if params.logprobs is not None:
        logprobs = {key: [value for c in chunks for value in c.logprobs[key]] for key in chunks[0].logprobs}
    choice = {"text": "".join(c.text for c in chunks), "logprobs": logprobs, "finish_reason": chunks[-1].finish_reason}
    return Completion(choice, len(prompt_ids), sum(c.completion_tokens for c in chunks))
