"""Incremental detokenization: each generated token's new text at a cost that does not grow with
the text already generated.

Decoding a token alone is wrong for most tokenizers (sentencepiece drops a word's leading space,
byte-level BPE splits a character over tokens), and decoding the whole sequence after each token
makes a stream quadratic. Like vLLM's ``detokenize_incrementally``, this decodes a short window:
the tokens from ``prefix_offset`` on, of which those before ``read_offset`` were already emitted
and only give context; the new text is what the window adds beyond its emitted part. While the
window ends in an incomplete character (decoded as U+FFFD) nothing is emitted and the offsets
stay, so the character comes out whole with the token that completes it. The window is primed
with the prompt's last tokens, so the first generated token gets the leading space it has in
context. With ``skip_special_tokens`` a special token adds no token to the window, hence no text.
"""

from __future__ import annotations

from typing import Any

PROMPT_CONTEXT = 5
"""Tokens of the prompt (and of emitted text) kept as left context, as in vLLM."""


class IncrementalDetokenizer:
    """The text of one generation, a token at a time (``add``), and whatever is left at the end (``flush``)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        tail = prompt_ids[-(PROMPT_CONTEXT + 2) :]
        self.tokens: list[str] = tokenizer.convert_ids_to_tokens(tail, skip_special_tokens=skip_special_tokens)
        self.prefix_offset = max(len(self.tokens) - PROMPT_CONTEXT, 0)
        self.read_offset = len(self.tokens)

    def _window(self) -> tuple[str, str]:
        """The window's emitted context and its whole text."""
        decode = self.tokenizer.convert_tokens_to_string
        return decode(self.tokens[self.prefix_offset : self.read_offset]), decode(self.tokens[self.prefix_offset :])

    def add(self, token_id: int) -> str:
        """The text ``token_id`` completes ("" while a character is incomplete)."""
        self.tokens += self.tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=self.skip_special_tokens)
        context, text = self._window()
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return text[len(context) :]

    def flush(self) -> str:
        """The text of tokens still held at the end (an incomplete character, as U+FFFD, as a
        one-shot decode renders it)."""
        context, text = self._window()
        self.prefix_offset = self.read_offset = len(self.tokens)
        return text[len(context) :]

    def holding(self) -> bool:
        """Whether tokens wait for the text they begin (an incomplete character)."""
        return self.read_offset < len(self.tokens)
