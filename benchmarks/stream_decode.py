"""Per-token cost of turning a streamed generation into text, as the text grows.

Usage::

    python benchmarks/stream_decode.py --json [--tokens 8192] [--window 64] [--repeats 5]

A byte-level BPE tokenizer is built here (GPT-2's byte alphabet, one token per byte; nothing
downloaded), and a text of ``--tokens`` tokens mixing ASCII and multi-byte characters (so some
characters are split over tokens and must be held back). At each checkpoint length L (powers of
two up to ``--tokens``) the next ``--window`` tokens are timed (best of ``--repeats``), per token:

* ``incremental_us``: the server's path, ``completion_engine._Text.add`` (the incremental
  detokenizer, ``evomerge.server.detokenizer``) plus the stop-string search and hold-back of a
  stream with two stop strings, after the first L tokens were added;
* ``whole_decode_us``: what the server did before, ``tokenizer.decode`` of all L + i tokens
  after each token (the stop search then ran over that whole text too; not counted here).

``incremental_growth`` and ``whole_growth`` are each cost at the longest length over its cost at
the shortest. The goal: ``incremental_growth`` ≤ 2 (flat: the cost of a token does not depend on
the text before it), while ``whole_growth`` grows with the length (the floor it is compared with
is the incremental cost at the shortest length, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from evomerge.server.completion_engine import _Text
    from evomerge.server.sampling import SamplingParams

    tokenizer = byte_tokenizer()
    sentence = "The merged model answers: é, 日本, 👍 and plain words. "
    text = sentence * (args.tokens // len(sentence.encode()) + 2)
    ids = tokenizer(text)["input_ids"][: args.tokens + args.window]
    prompt = tokenizer("Q: ")["input_ids"]
    params = SamplingParams(max_tokens=len(ids), stop=["\n\n", "STOP"])
    row = torch.zeros(1)
    lengths = [n for n in (2**k for k in range(6, 40)) if n <= args.tokens]

    incremental, whole = [], []
    for length in lengths:
        def grown() -> _Text:
            state = _Text(tokenizer, params, prompt, 0)
            for token in ids[:length]:
                state.add(token, row)
                state.chunk(state.safe())
            return state

        def whole_path() -> None:
            for i in range(length, length + args.window):
                tokenizer.decode(ids[: i + 1])

        best = float("inf")
        for _ in range(args.repeats):  # the growing is untimed; only the window after it is
            state = grown()
            start = time.perf_counter()
            for token in ids[length : length + args.window]:
                state.add(token, row)
                assert state.stop_at() is None
                state.chunk(state.safe())
            best = min(best, time.perf_counter() - start)
        incremental.append(best / args.window * 1e6)
        whole.append(timed(whole_path, args.repeats) / args.window * 1e6)

    result = {
        "tokenizer": "byte-level BPE, one token per byte",
        "window": args.window,
        "lengths": lengths,
        "incremental_us": [round(x, 2) for x in incremental],
        "whole_decode_us": [round(x, 2) for x in whole],
        "incremental_growth": round(incremental[-1] / incremental[0], 2),
        "whole_growth": round(whole[-1] / whole[0], 2),
        "whole_over_incremental_at_longest": round(whole[-1] / incremental[-1], 2),
        "target": "incremental_growth <= 2",
        "met": incremental[-1] / incremental[0] <= 2,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
