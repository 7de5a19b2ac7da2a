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
``<|eot_id|>``). ``skip_special_tokens`` leaves special tokens out of the text, as vLLM does for
chat replies.
A model whose logits are not finite (a merge with huge coefficients) is refused, not sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@torch.inference_mode()
def complete(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[int],
    prompt_text: str,
    params: SamplingParams,
    generator: torch.Generator,
) -> Completion:
    """Score and continue one prompt; ``prompt_text`` is what ``echo`` returns for it."""
    device = next(model.parameters()).device
    ends = set(end_token_ids(model, tokenizer) or [])
    cache = _cache_name()
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=params.max_tokens > 0)
    prompt_logprobs = _finite(out.logits[0])
    past = getattr(out, cache)
    generated: list[int] = []
    generated_logprobs: list[torch.Tensor] = []
    finish = "length"
    step_logprobs = prompt_logprobs[-1]
    text = ""
    while len(generated) < params.max_tokens:
        token = _pick(step_logprobs, params, generator)
        if token in ends:
            finish = "stop"
            break
        generated.append(token)
        generated_logprobs.append(step_logprobs)
        text = tokenizer.decode(generated, skip_special_tokens=params.skip_special_tokens)
        if params.stop and any(s in text for s in params.stop):
            finish = "stop"
            break
        if len(generated) < params.max_tokens:
            step = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{cache: past})
            past = getattr(step, cache)
            step_logprobs = _finite(step.logits[0, -1])
    pieces = token_texts(tokenizer, generated)
    if params.skip_special_tokens:
        special = set(tokenizer.all_special_ids)
        pieces = ["" if token in special else piece for token, piece in zip(generated, pieces)]
    if finish == "stop" and params.stop:
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=len(text))
        kept, length = 0, 0
        while kept < len(pieces) and length + len(pieces[kept]) <= cut:
            length += len(pieces[kept])
            kept += 1
        text, pieces, generated, generated_logprobs = text[:cut], pieces[:kept], generated[:kept], generated_logprobs[:kept]
    choice: dict[str, Any] = {"text": (prompt_text + text) if params.echo else text, "logprobs": None, "finish_reason": finish}
    if params.logprobs is not None:
        tokens, token_logprobs, top_logprobs = [], [], []
        if params.echo:
            prompt_pieces = token_texts(tokenizer, prompt_ids)
            tokens += prompt_pieces
            token_logprobs.append(None)
            top_logprobs.append(None)
            for i in range(1, len(prompt_ids)):
                row = prompt_logprobs[i - 1]
                token_logprobs.append(float(row[prompt_ids[i]]))
                top_logprobs.append(_top(tokenizer, row, params.logprobs, prompt_ids[i], prompt_pieces[i]))
        for token, piece, row in zip(generated, pieces, generated_logprobs):
            tokens.append(piece)
            token_logprobs.append(float(row[token]))
            top_logprobs.append(_top(tokenizer, row, params.logprobs, token, piece))
        offsets, position = [], 0
        for piece in tokens:
            offsets.append(position)
            position += len(piece)
        choice["logprobs"] = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
    return Completion(choice, len(prompt_ids), len(generated))
