"""When a row's first stop string can no longer move, and the criterion generate calls per step."""

from __future__ import annotations

import torch

from evomerge.fitness.stopping import StopAtStrings, first_stop_is_settled
from evomerge.models.zoo.tiny_lm import build_tokenizer


def test_a_stop_string_is_settled_once_a_character_follows_its_longest_window():
    assert not first_stop_is_settled("42", ["\n"])
    assert not first_stop_is_settled("42\n", ["\n"])  # the last character is provisional
    assert first_stop_is_settled("42\nx", ["\n"])
    # "bc" is found first, but "abcd" could still start one character earlier
    assert not first_stop_is_settled("xabc", ["bc", "abcd"])
    assert not first_stop_is_settled("xabcd", ["bc", "abcd"])
    assert first_stop_is_settled("xabcdy", ["bc", "abcd"])
    # a partial multi-byte character at the end is not text yet
    assert not first_stop_is_settled("42\n\ufffd\ufffd", ["\n"])


def test_the_criterion_marks_rows_done_one_by_one():
    """Called once per step on the prompt (2 tokens) and the tokens generated so far."""
    tokenizer = build_tokenizer()
    ids = torch.tensor([tokenizer("ab" + generated)["input_ids"] for generated in ["1=23", "3345", "=456"]])
    criterion = StopAtStrings(tokenizer, ["=", ""], prompt_width=2)
    steps = [criterion(ids[:, : 2 + k], None).tolist() for k in range(1, 5)]
    assert steps == [
        [False, False, False],
        [False, False, True],  # "=4": the stop string is followed by a character
        [True, False, True],
        [True, False, True],  # "3345" never stops; the others stay done
    ]
