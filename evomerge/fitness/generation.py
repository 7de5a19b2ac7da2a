"""Greedy answers of a causal language model, for fitness functions that score free text.

The same decoding ``exact_match`` scores (greedy, prompts left-padded so each row's generation
starts right after its prompt, cut at the first stop string), exposed as text so that another
scorer (a judge model) can read what the candidate answered. torch is imported when called.
"""

from __future__ import annotations

from typing import Any, Sequence

from evomerge.errors import PluginError
from evomerge.fitness.lm import _inference, _pad_id, truncate_at_stop


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
    fitness: str = "judge",
) -> list[str]:
    """Each prompt's greedy continuation (special tokens dropped), cut at the first stop string."""
    import torch

    if tokenizer is None:
        raise PluginError(f"fitness '{fitness}' needs the model's tokenizer")
    pad = _pad_id(tokenizer, fitness)
    answers: list[str] = []
    with _inference(model) as device:
        for start in range(0, len(prompts), batch_size):
            encoded = [tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]]
            width = max(map(len, encoded))
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, seq in enumerate(encoded):
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
            texts = tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
            answers.extend(truncate_at_stop(text, stop) for text in texts)
    return answers
