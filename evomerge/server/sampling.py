"""How one choice picks its next token: OpenAI's sampling parameters over the model's log-probabilities.

``logit_bias`` adds its value to its token's logit; ``frequency_penalty`` and
``presence_penalty`` subtract, as OpenAI defines them, ``frequency_penalty * c[j] +
presence_penalty * (c[j] > 0)`` where ``c[j]`` counts token ``j`` in the choice's generated
tokens so far (not the prompt, as in vLLM). The adjusted logits are then sampled with
``temperature`` and ``top_p``, or taken greedily at temperature 0. Log-probabilities are
shifted logits (softmax ignores a constant), so the adjustments apply to them alike. The
log-probabilities a response reports stay those of the model's own distribution (vLLM's default,
``raw_logprobs``): the adjustments only change which token is picked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    """Alternatives reported per token (``None``: no log-probabilities)."""
    chat_logprobs: bool = False
    """Report them in the chat shape (``content``: one object per token) rather than the completions one."""
    echo: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)


class Sampler:
    """The token picker of one choice: its generator and the counts its penalties read."""

    def __init__(self, params: SamplingParams, generator: torch.Generator) -> None:
        self.params = params
        self.generator = generator
        self.penalised = bool(params.presence_penalty or params.frequency_penalty)
        self.counts: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def pick(self, logprobs: torch.Tensor) -> int:
        """The next token, given the model's log-probabilities for it (one row over the vocabulary)."""
        logits = logprobs.float()
        if self.params.logit_bias or self.penalised:
            logits = logits + self._adjustment(logits)
        token = self._sample(logits)
        if self.counts is not None:
            self.counts[token] += 1
        return token

    def _adjustment(self, logits: torch.Tensor) -> torch.Tensor:
        """What the bias and the penalties add to each logit now (sized to the model's logits on
        first use; a bias on an id beyond them concerns no token the model can give)."""
        if self.counts is None:
            size = logits.shape[-1]
            self.counts = torch.zeros(size, device=logits.device)
            self.bias = torch.zeros(size, device=logits.device)
            for token, value in self.params.logit_bias.items():
                if token < size:
                    self.bias[token] = value
        seen = (self.counts > 0).float()
        return self.bias - self.params.frequency_penalty * self.counts - self.params.presence_penalty * seen

    def _sample(self, logits: torch.Tensor) -> int:
        params = self.params
        if params.temperature == 0.0:
            return int(logits.argmax())
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keep the smallest nucleus
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
