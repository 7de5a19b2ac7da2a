"""Length-sorted packing, and the per-tokenizer cache of what scoring builds from texts alone."""

from __future__ import annotations

import gc
import weakref

from evomerge.fitness.packing import CACHE_ENTRIES, cached, pack, pack_continuations
from evomerge.models.zoo.tiny_lm import build_tokenizer


def test_pack_sorts_longest_first_and_pads_on_either_side():
    sequences = [[5], [6, 7, 8], [9, 10], [11, 12, 13]]
    left = pack(sequences, 2, 0, left=True)
    assert [b.rows for b in left] == [[1, 3], [2, 0]]  # stable among equal lengths
    assert left[1].input_ids.tolist() == [[9, 10], [0, 5]]
    assert left[1].attention_mask.tolist() == [[1, 1], [0, 1]]
    right = pack(sequences, 3, 0, left=False)
    assert right[0].input_ids.tolist() == [[6, 7, 8], [11, 12, 13], [9, 10, 0]]
    assert right[0].attention_mask.tolist()[2] == [1, 1, 0]
    assert right[1].input_ids.tolist() == [[5]]


def test_continuations_are_scored_from_the_logits_before_them():
    packed = pack_continuations([([1, 2], [3]), ([4, 5, 6, 7], [8, 9])], 4, 0)[0]
    assert packed.batch.rows == [1, 0]
    assert packed.row.tolist() == [0, 0, 1] and packed.lengths == [2, 1]
    assert packed.column.tolist() == [3, 4, 1] and packed.target.tolist() == [8, 9, 3]
    assert packed.kept.tolist() == [1, 3, 4] and packed.kept_index.tolist() == [1, 2, 0]


def test_cache_builds_once_per_tokenizer_and_key_and_stays_bounded():
    tokenizer, other = build_tokenizer(), build_tokenizer()
    builds = []

    def build(key):
        def make():
            builds.append(key)
            return [key]

        return make

    first = cached(tokenizer, ("texts", "a"), build("a"))
    assert cached(tokenizer, ("texts", "a"), build("a")) is first and builds == ["a"]
    cached(tokenizer, ("texts", "b"), build("b"))
    cached(other, ("texts", "a"), build("a"))  # another tokenizer object: its own entry
    assert builds == ["a", "b", "a"]
    tokenizer.add_tokens(["<new>"])  # the ids of the same texts may change: rebuilt
    assert cached(tokenizer, ("texts", "a"), build("a")) is not first
    builds.clear()
    fresh = build_tokenizer()
    for i in range(CACHE_ENTRIES):
        cached(fresh, i, build(i))
    cached(fresh, 0, build(0))  # used again: now the most recent
    cached(fresh, CACHE_ENTRIES, build(CACHE_ENTRIES))  # one too many: the least recent (1) goes
    cached(fresh, 0, build(0))
    cached(fresh, 1, build(1))
    assert builds == list(range(CACHE_ENTRIES + 1)) + [1]


def test_cache_does_not_keep_a_tokenizer_alive():
    tokenizer = build_tokenizer()
    cached(tokenizer, "key", lambda: [1])
    ref = weakref.ref(tokenizer)
    del tokenizer
    gc.collect()
    assert ref() is None
