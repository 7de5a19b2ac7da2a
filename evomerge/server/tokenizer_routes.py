"""vLLM's tokenizer routes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``.

Clients that tokenize on the server need them: lm-eval's API models look for ``/tokenizer_info``
and ``/tokenize`` first (``tokenizer_backend=auto``) and, when both answer, count and cut context
with the served model's own tokenizer, so a user points lm-eval at ``evomerge serve`` with no copy
of the tokenizer beside it. The shapes are vLLM's: ``/tokenize`` takes a ``prompt`` (special tokens
added unless ``add_special_tokens`` is false) or chat ``messages`` (rendered by the chat template,
as ``/v1/chat/completions`` renders them; ``add_special_tokens: true`` adds the tokenizer's own on
top, as in vLLM) and answers ``{count, max_model_len, tokens}`` (and
``token_strs`` when asked); ``/detokenize`` answers ``{prompt}``; ``/tokenizer_info`` the
tokenizer's configuration (its special tokens, chat template, class and maximum length). Every
model the server serves (the base, its adapters and merges) shares the base's tokenizer; a
``model`` that is named must be one of them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from evomerge.server.app import MAX_MESSAGES, ChatMessage, ChatRequest, Name, Text, _Body, _chat_prompt
from evomerge.server.model_host import ModelHost, ServiceError, _not_found

MAX_DETOKENIZE = 1 << 17
"""Token ids in one ``/detokenize`` request (the request size limit bounds it too)."""


class TokenizeRequest(_Body):
    """vLLM's ``TokenizeCompletionRequest`` and ``TokenizeChatRequest`` in one: ``prompt`` or ``messages``."""

    model: Name | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: Name | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE)


def _known(host: ModelHost, model: str | None) -> None:
    """A 404 for a ``model`` the server does not serve (its tokenizer would be a guess)."""
    if model is not None and model not in {name for name, _ in host.model_names()}:
        raise _not_found("model", model)


def tokenize(host: ModelHost, request: TokenizeRequest) -> dict[str, Any]:
    _known(host, request.model)
    if (request.prompt is None) == (request.messages is None):
        raise ServiceError(400, "Send either prompt or messages.", "invalid_request")
    if request.messages is not None:
        if not request.add_generation_prompt:
            raise ServiceError(400, "Only add_generation_prompt: true is supported.", "unsupported_parameter")
        chat = ChatRequest(model=request.model or host.base_name, messages=request.messages)
        ids, text = _chat_prompt(host, chat)  # as the chat route reads them: the template writes the special tokens
        if request.add_special_tokens:  # vLLM's option to add the tokenizer's own on top
            ids = host.tokenizer(text, add_special_tokens=True)["input_ids"]
    else:
        special = True if request.add_special_tokens is None else request.add_special_tokens
        ids = host.tokenizer(request.prompt, add_special_tokens=special)["input_ids"]
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": host.max_positions, "tokens": ids}
    if request.return_token_strs:
        answer["token_strs"] = host.tokenizer.convert_ids_to_tokens(ids)
    return answer


def detokenize(host: ModelHost, request: DetokenizeRequest) -> dict[str, str]:
    _known(host, request.model)
    vocab = len(host.tokenizer)
    if any(not 0 <= t < vocab for t in request.tokens):
        raise ServiceError(400, f"Token ids must lie in [0, {vocab}).", "invalid_tokens")
    return {"prompt": host.tokenizer.decode(request.tokens)}


def tokenizer_info(host: ModelHost) -> dict[str, Any]:
    """The tokenizer's configuration as vLLM's ``/tokenizer_info`` gives it: what ``tokenizer_config.json``
    holds (special tokens as their text) and the chat template."""
    tokenizer = host.tokenizer
    info: dict[str, Any] = {
        "tokenizer_class": type(tokenizer).__name__,
        "model_max_length": host.max_positions,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        info[name] = getattr(tokenizer, name, None)
    info["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    return info
