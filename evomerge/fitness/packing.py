"""Scoring requests tokenized once and packed into length-sorted batches.

A worker calls the same fitness function with the same examples for every candidate it scores;
only the weights change between calls. Everything that does not depend on them (token ids,
padding, the order of the rows, where the scored positions are) is built once per tokenizer and
set of texts and reused, so a candidate costs its forward passes and little else.

Rows are sorted longest first, so a batch holds sequences of similar length (little padding) and
the batch that needs the most memory runs first; callers put results back in their own order.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence, TypeVar

import torch

T = TypeVar("T")

CACHE_ENTRIES = 8
"""Packed request sets kept per tokenizer: a worker's fitness data, its test data, a staged
subset and a few task sets fit; the least recently used one goes first."""

_cache: weakref.WeakKeyDictionary[Any, OrderedDict[Hashable, Any]] = weakref.WeakKeyDictionary()


def cached(tokenizer: Any, key: Hashable, build: Callable[[], T]) -> T:
    """``build()`` once per tokenizer object and ``key``, then the same value while it is cached.

    ``key`` must hold everything the value depends on besides the tokenizer (the texts
    themselves, the batch size, the pad id). The entries live as long as the tokenizer (a weak
    reference), and its length (vocabulary plus added tokens) is part of the key, so adding tokens
    rebuilds; other settings of a tokenizer are taken as fixed once it scores.
    """
    entries = _cache.setdefault(tokenizer, OrderedDict())
    full_key = (len(tokenizer), key)
    if full_key in entries:
        entries.move_to_end(full_key)
        return entries[full_key]
    value = build()
    entries[full_key] = value
    if len(entries) > CACHE_ENTRIES:
        entries.popitem(last=False)
    return value


@dataclass(frozen=True)
class Batch:
    """Rows of requests padded to one width, on the host (moved to the model's device per call)."""

    rows: list[int]
    """Index of each row's request in the caller's order."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def pack(sequences: Sequence[Sequence[int]], batch_size: int, pad: int, *, left: bool) -> list[Batch]:
    """Token sequences in batches of ``batch_size``, longest first, padded with ``pad``.

    Left padding ends every row at the same column (generation continues from there); right
    padding starts every row at column 0 (with causal attention, padding after a sequence cannot
    change its logits). The sort is stable, so equal lengths keep the caller's order.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(sequences[rows[0]])
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            n = len(sequences[i])
            columns = slice(width - n, width) if left else slice(0, n)
            ids[row, columns] = torch.tensor(sequences[i], dtype=torch.long)
            mask[row, columns] = 1
        batches.append(Batch(rows, ids, mask))
    return batches


@dataclass(frozen=True)
class ContinuationBatch:
    """A right-padded batch of ``context + continuation`` rows and where their scores come from:
    the logits at column ``t`` predict the token at ``t + 1``, so a continuation of ``k`` tokens
    after ``c`` context tokens is scored from columns ``c - 1 … c + k - 2``."""

    batch: Batch
    kept: torch.Tensor
    """The columns any row scores, ascending: the only logits the model need compute."""
    row: torch.Tensor
    """Batch row of each scored token, every row's tokens in order, rows in batch order."""
    column: torch.Tensor
    """Column of the logits that predict each scored token."""
    kept_index: torch.Tensor
    """Where each scored token's column is in ``kept``."""
    target: torch.Tensor
    """The scored token ids."""
    lengths: list[int]
    """Continuation tokens per row, in batch order (to split the flat scores by row)."""


def pack_continuations(
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, pad: int
) -> list[ContinuationBatch]:
    """(context ids, continuation ids) pairs packed as :func:`pack` does, with right padding."""
    batches = []
    for batch in pack([[*c, *k] for c, k in encoded], batch_size, pad, left=False):
        rows, columns, targets, lengths = [], [], [], []
        for row, i in enumerate(batch.rows):
            context, continuation = encoded[i]
            rows += [row] * len(continuation)
            columns += range(len(context) - 1, len(context) - 1 + len(continuation))
            targets += continuation
            lengths.append(len(continuation))
        column = torch.tensor(columns, dtype=torch.long)
        kept, kept_index = column.unique(sorted=True, return_inverse=True)
        batches.append(
            ContinuationBatch(
                batch,
                kept=kept,
                row=torch.tensor(rows, dtype=torch.long),
                column=column,
                kept_index=kept_index,
                target=torch.tensor(targets, dtype=torch.long),
                lengths=lengths,
            )
        )
    return batches
