"""Stop each row of a batched greedy generation once its stop string is settled.

``exact_match`` cuts every generation at its first stop string (``truncate_at_stop``), so nothing
a row generates after that can change its score: the row may stop there. ``generate`` marks rows
done one by one (a done row is padded while the others go on) and ends the batch when every row
is done or ``max_new_tokens`` is reached.

transformers' own ``stop_strings`` matches token strings at the end of the whole sequence, prompt
included, so a prompt ending in ``"\\n"`` and a first generated ``"\\n"`` would stop on ``"\\n\\n"``
that the generated text alone does not hold. Here each row's generated tokens are decoded as
the final text is (``skip_special_tokens``) and searched exactly as ``truncate_at_stop`` searches.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import StoppingCriteria


def first_stop_is_settled(text: str, stop: Sequence[str]) -> bool:
    """Whether more text cannot move the first stop string of ``text``.

    A later character could still complete a longer stop string starting before the one found,
    and decoding treats its last character as provisional (a partial multi-byte character, a space
    a following punctuation mark removes). So the earliest match counts once every window that
    could start before it ends inside the text without its last character.
    """
    text = text.rstrip("\ufffd")
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return cut >= 0 and cut + max(map(len, stop)) < len(text)


class StopAtStrings(StoppingCriteria):
    """Done for a row once :func:`first_stop_is_settled` holds for its generated text.

    One object serves one ``generate`` call: it remembers which rows are done, so a done row is
    not decoded again.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_width = prompt_width
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        open_rows = (~self.done).nonzero().flatten()
        generated = input_ids[open_rows.to(input_ids.device), self.prompt_width :].cpu()
        for row, text in zip(open_rows.tolist(), self.tokenizer.batch_decode(generated, skip_special_tokens=True)):
            self.done[row] = first_stop_is_settled(text, self.stop)
        return self.done.to(input_ids.device)
