"""OpenAI ``/v1/completions`` semantics on a transformers causal LM, one prompt at a time.

A prompt is run once over its whole length with the KV cache on: its logits give the prompt
tokens' log-probabilities (for ``echo``) and the first generated token; each further token is one
cached step. As in the OpenAI reference, ``echo`` returns the prompt followed by the completion,
and its ``logprobs`` cover the prompt's tokens (the first has no log-probability: nothing predicts
it) followed by the generated ones; ``top_logprobs`` holds the ``logprobs`` most likely tokens plus
the chosen one; ``text_offset`` is each token's character offset in the returned ``text``. Chat's
``logprobs`` are one ``{token, logprob, bytes, top_logprobs}`` per generated token instead.
``stop`` strings end the generation and are left out of the text, as are the tokens from the one
that completes the stop string on. Log-probabilities are those of the model's own distribution;
the sampling parameters (see ``sampling``) only shape the pick, which a ``seed`` makes reproducible.
Generation ends at any of the model's end tokens: the tokenizer's EOS and its generation config's
(a chat model ends its turn with a token of its own, Gemma's ``<end_of_turn>``, Llama 3's
``<|eot_id|>``). The end token is generated like any other, as in vLLM and the OpenAI reference:
it counts in ``usage`` and has its log-probability (with no text); lm-eval's API models read
``echo`` with ``max_tokens: 1`` as the prompt's log-probabilities followed by exactly one more.
``skip_special_tokens`` (the default, as in vLLM) leaves special tokens out of
the text, the echoed prompt's included. The text is decoded incrementally (``detokenizer``).
A model whose logits are not finite (a merge with huge coefficients) is refused, not sampled.

``stream`` yields a choice in chunks as it is generated (``stream: true``); ``complete`` is those
chunks joined, so a streamed answer and a whole one come from the same loop and never differ.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from evomerge.fitness.lm import end_token_ids
from evomerge.server.detokenizer import IncrementalDetokenizer
from evomerge.server.model_host import ServiceError
from evomerge.server.sampling import Sampler, SamplingParams

NON_FINITE = "non_finite_output"
DECODE_WINDOW = 6
"""Tokens of left context used to decode one prompt token's text (enough for byte-level and
sentencepiece tokenizers to render word-initial spaces and multi-byte characters), so decoding stays linear."""


@dataclass
class Completion:
    """One choice of a response, before its ``index`` is set, and how many tokens it generated."""

    choice: dict[str, Any]
    completion_tokens: int


@dataclass
class Chunk:
    """A piece of one choice as it is streamed: new text, the log-probabilities of the tokens that
    came with it (when asked, in the route's shape: a dict of lists each chunk extends), the
    finish reason on the last chunk, and how many generated tokens it holds. The chunks of a
    choice joined are the choice."""

    text: str
    logprobs: dict[str, list[Any]] | None
    finish_reason: str | None
    completion_tokens: int


@dataclass
class _Scored:
    """A token with its log-probability and the most likely alternatives at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_texts(tokenizer: Any, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    """Each token's text in context, so that the texts joined give the decoded sequence."""
    texts = []
    for i in range(len(ids)):
        start = max(0, i - DECODE_WINDOW)
        before = tokenizer.decode(ids[start:i], skip_special_tokens=skip_special_tokens) if i > start else ""
        texts.append(tokenizer.decode(ids[start : i + 1], skip_special_tokens=skip_special_tokens)[len(before) :])
    return texts


def prompt_pieces(tokenizer: Any, ids: list[int], text: str, skip_special_tokens: bool) -> list[str]:
    """Each prompt token's text in the echoed ``text``, so that ``text_offset`` indexes it: the
    pieces as the completion renders them when they spell ``text``; otherwise (a prompt string
    holds a special token written in it, a chat marker, while the tokenizer added one of its own,
    a BOS) special tokens keep their names except those at the ends that ``text`` does not hold."""
    pieces = token_texts(tokenizer, ids, skip_special_tokens)
    if "".join(pieces) == text:
        return pieces
    kept = token_texts(tokenizer, ids, False)
    special = set(tokenizer.all_special_ids)
    start, end = 0, len(ids)
    while start < end and "".join(kept[start:end]) != text:
        if ids[start] in special and not text.startswith(kept[start]):
            start += 1
        elif ids[end - 1] in special and not text.endswith(kept[end - 1]):
            end -= 1
        else:
            break
    if "".join(kept[start:end]) == text:
        return [""] * start + kept[start:end] + [""] * (len(ids) - end)
    return pieces


def _score(row: torch.Tensor, token: int, k: int) -> _Scored:
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = row.topk(k)
        top = list(zip(ids.tolist(), values.tolist()))
    return _Scored(token, float(row[token]), top)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as log-probabilities, or a refusal when the model computed infinities or NaNs."""
    if not bool(torch.isfinite(logits).all()):
        raise ServiceError(400, "The model gives non-finite logits for this prompt (a merge with too large coefficients?).", NON_FINITE)
    return logits.float().log_softmax(-1)


def _cache_name() -> str:
    """The KV-cache keyword and output field: ``cache`` in transformers ≥ 5.2x, ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _completion_logprobs(
    tokenizer: Any, pieces: list[str], scored: list[_Scored | None], offset: int
) -> dict[str, list[Any]]:
    """The completions ``logprobs`` object for tokens with these texts (``None``: nothing predicts
    the token), the first at ``offset``: ``top_logprobs`` holds the alternatives (by their text
    alone) plus the chosen token (by its text in context)."""
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets = []
    for piece, score in zip(pieces, scored):
        offsets.append(offset)
        offset += len(piece)
        if score is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(score.logprob)
        top: dict[str, float] = {}
        for token, value in score.top:
            top.setdefault(tokenizer.decode([token]), value)
        top[piece] = score.logprob
        top_logprobs.append(top)
    return {"tokens": list(pieces), "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _token_logprob(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    """A chat ``{token, logprob, bytes}``: the token's own text (as vLLM renders it) and the bytes it stands for."""
    text = tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": token_bytes(tokenizer, token, text)}


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), read back to the byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token: int, text: str) -> list[int]:
    """The UTF-8 bytes a token stands for, so that a client can join the bytes of a character
    split over tokens (the purpose of OpenAI's ``bytes``): such a token's text alone is U+FFFD,
    so its bytes are read from its vocabulary entry instead, a sentencepiece byte ``<0xE2>`` or a
    byte-level BPE entry; any other token's bytes are those of its text."""
    if "\ufffd" in text:
        (piece,) = tokenizer.convert_ids_to_tokens([token])
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return [int(piece[3:5], 16)]
        alphabet = _byte_level_alphabet()
        if piece and all(c in alphabet for c in piece):
            return [alphabet[c] for c in piece]
    return list(text.encode("utf-8"))


def _chat_logprobs(tokenizer: Any, scored: list[_Scored]) -> dict[str, list[Any]]:
    """The chat ``logprobs`` object: per token, its log-probability and the ``top_logprobs``
    most likely tokens at its position, most likely first."""
    content = [
        _token_logprob(tokenizer, s.token, s.logprob) | {"top_logprobs": [_token_logprob(tokenizer, t, v) for t, v in s.top]}
        for s in scored
    ]
    return {"content": content}


class _Text:
    """The generated tokens, their text, and how much of it has been sent.

    Each token's text comes from the incremental detokenizer (``detokenizer``), so the cost of a
    token does not grow with the text. A chunk sends what is new, holding back a suffix that may
    be the start of a stop string (vLLM holds it back too), so that no part of a stop string
    reaches a stream; only the unsent text is kept as a string, so a stop string is searched in
    it alone (what was sent cannot begin one). A token goes out with the chunk its text ends in;
    a token whose character is still incomplete goes out with the one that completes it."""

    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_ids: list[int], offset: int) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.count = 0
        """Tokens generated."""
        self.scored: list[_Scored] = []
        """Their log-probabilities (only when asked for)."""
        self.pieces: list[str] = []
        self.ends: list[int] = []
        """Where each token's piece ends in the text, for the tokens whose text is complete."""
        self.length = 0
        self.unsent = ""
        self.sent = 0
        self.sent_tokens = 0
        self.offset = offset
        """``text_offset`` of the next token sent (after an echoed prompt)."""

    def add(self, token: int, row: torch.Tensor) -> None:
        self.count += 1
        if self.params.logprobs is not None:
            self.scored.append(_score(row, token, self.params.logprobs))
        self._extend(self.detokenizer.add(token))

    def _extend(self, new: str) -> None:
        """Give the last token the text ``new`` (resolving every token before it still held)."""
        while len(self.pieces) < self.count:
            self.pieces.append("")
        self.pieces[-1] += new
        self.length += len(new)
        self.unsent += new
        if new or not self.detokenizer.holding():
            self.ends += [self.length] * (self.count - len(self.ends))

    def flush(self) -> None:
        """The text of tokens still held (the generation ends with them)."""
        if self.count:
            self._extend(self.detokenizer.flush())

    def end(self, token: int, row: torch.Tensor) -> None:
        """Take the end token: generated like any other (counted, scored) but without text."""
        self.flush()
        self.count += 1
        if self.params.logprobs is not None:
            self.scored.append(_score(row, token, self.params.logprobs))
        self.pieces.append("")
        self.ends.append(self.length)

    def stop_at(self) -> int | None:
        """Where the first stop string in the text begins, if one is there."""
        found = (self.unsent.find(s) for s in self.params.stop)
        return min((self.sent + i for i in found if i >= 0), default=None)

    def safe(self) -> int:
        """How much of the text can be sent now."""
        held = [k for s in self.params.stop for k in range(1, len(s)) if self.unsent.endswith(s[:k])]
        return self.length - max(held, default=0)

    def chunk(self, end: int, finish: str | None = None, every_token: bool = False) -> Chunk:
        """The text up to ``end`` not sent yet, the tokens whose piece ends in it (with
        ``every_token``, all the others too), and their log-probabilities when asked."""
        first = last = self.sent_tokens
        while last < self.count and (every_token or (last < len(self.ends) and self.ends[last] <= end)):
            last += 1
        cut = max(end - self.sent, 0)
        chunk = Chunk(self.unsent[:cut], None, finish, last - first)
        if self.params.logprobs is not None:
            pieces, scored = self.pieces[first:last], self.scored[first:last]
            if self.params.chat_logprobs:
                chunk.logprobs = _chat_logprobs(self.tokenizer, scored)
            else:
                chunk.logprobs = _completion_logprobs(self.tokenizer, pieces, list(scored), self.offset)
                self.offset += sum(len(p) for p in pieces)
        self.unsent = self.unsent[cut:]
        self.sent, self.sent_tokens = self.sent + cut, last
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
    sampler = Sampler(params, generator)
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=params.max_tokens > 0)
    prompt_logprobs = _finite(out.logits[0])
    past = getattr(out, cache)
    first = Chunk(prompt_text if params.echo else "", None, None, 0)
    if params.logprobs is not None:
        if params.chat_logprobs:
            first.logprobs = _chat_logprobs(tokenizer, [])
        elif params.echo:
            pieces = prompt_pieces(tokenizer, prompt_ids, prompt_text, params.skip_special_tokens)
            scored = [None] + [_score(prompt_logprobs[i - 1], prompt_ids[i], params.logprobs) for i in range(1, len(prompt_ids))]
            first.logprobs = _completion_logprobs(tokenizer, pieces, scored, 0)
        else:
            first.logprobs = _completion_logprobs(tokenizer, [], [], 0)
    yield first
    text = _Text(tokenizer, params, prompt_ids, len(first.text))
    step_logprobs = prompt_logprobs[-1]
    while text.count < params.max_tokens:
        token = sampler.pick(step_logprobs)
        if token in ends:
            text.end(token, step_logprobs)
            yield text.chunk(text.length, "stop", every_token=True)
            return
        text.add(token, step_logprobs)
        cut = text.stop_at()
        if cut is not None:
            yield text.chunk(cut, "stop")
            return
        if text.count == params.max_tokens:
            break
        if text.safe() > text.sent:
            yield text.chunk(text.safe())
        step = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{cache: past})
        past = getattr(step, cache)
        step_logprobs = _finite(step.logits[0, -1])
    text.flush()
    cut = text.stop_at()  # the flushed text may complete a stop string
    yield text.chunk(text.length if cut is None else cut, "length" if cut is None else "stop", every_token=cut is None)


def complete(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[int],
    prompt_text: str,
    params: SamplingParams,
    generator: torch.Generator,
) -> Completion:
    """One choice whole: the chunks of ``stream`` joined, so a streamed answer and a whole one never differ."""
    chunks = list(stream(model, tokenizer, prompt_ids, prompt_text, params, generator))
    logprobs = None
    if params.logprobs is not None:
        logprobs = {key: [value for c in chunks for value in c.logprobs[key]] for key in chunks[0].logprobs}
    choice = {"text": "".join(c.text for c in chunks), "logprobs": logprobs, "finish_reason": chunks[-1].finish_reason}
    return Completion(choice, sum(c.completion_tokens for c in chunks))
