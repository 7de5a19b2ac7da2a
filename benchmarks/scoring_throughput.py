"""Scoring throughput of the built-in LM fitness functions against plain transformers calls.

Usage::

    python benchmarks/scoring_throughput.py --json [--vocab 32000] [--hidden 256] [--layers 4]
                                                  [--examples 64] [--max-new-tokens 32] [--repeats 3]
                                                  [--device D] [--threads T]

Built here (random weights, nothing downloaded): a Llama-architecture model with a ``--vocab``-entry
word-level vocabulary (the printable characters, which prompts are written in, and filler words
the model may generate) and ``--examples`` prompts of 20–240 characters (one token each), each
with a 3–8 token target.

* ``exact_match``: ``evomerge.fitness.lm.exact_match`` (stop strings ``"\\n"`` and ``"Q:"``, the
  usual GSM8K-style setting), examples per second at its best ``batch_size`` of 4, 8, 16 and 32.
  Floor: a plain ``model.generate`` loop over the same prompts in their own order, left-padded,
  greedy, the same ``max_new_tokens``, no stop handling, at its best of the same batch sizes.
  An untrained model seldom writes a stop string or EOS, so this mostly measures what early
  stopping and length sorting cost when they do not pay; ``new_tokens_per_example`` says how
  many tokens the fitness function generated on average.
* ``loglik``: ``negative_cross_entropy`` (batch 16). Floor: a plain forward pass (no
  log-softmax) over the same tokens in the same right-padded, length-sorted batches.

Each figure is the best of ``--repeats`` timed passes after one untimed pass (which tokenizes and
packs once; later passes reuse that, as a worker does for every candidate after its first), ours
and the floors interleaved in every round so that load from elsewhere falls on both. Each
``ratio`` is ours / floor in examples per second (target ≥ 0.8 for both).

Threads: ``--threads`` (default 1) sets torch's CPU threads, as a Ray worker with
``cpus_per_worker: 1`` runs; see ``materialize_lm.py`` on why two threads on a shared 2-core
machine mislead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time
from functools import partial
from typing import Any, Callable

import torch

BATCH_SIZES = (4, 8, 16, 32)
STOP = ["\n", "Q:"]
LOGLIK_BATCH = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_tokenizer(vocab: int):
    """Characters (one token each, so prompt lengths are exact) and filler words up to ``vocab``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<eos>", "<unk>", *string.printable]
    tokens += [f"w{i} " for i in range(vocab - len(tokens))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        context = " ".join(rng.choice(["some", "words", "before", "the", "question"]) for _ in range(rng.randint(2, 40)))
        prompt = f"{context}\nQ: {a}+{b}?\nA:"[-240:]
        examples.append({"prompt": prompt, "target": f" {a + b}" + "." * rng.randint(0, 5)})
    return examples


def best_seconds(runs: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best time of each run over ``repeats`` rounds, the runs interleaved within a round so that
    load from elsewhere on a shared machine falls on ours and the floor alike."""
    for run in runs.values():
        run()  # untimed: tokenizing and packing happen once, as for a worker's first candidate
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def plain_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, device) -> None:
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], padding=True, padding_side="left", return_tensors="pt")
            model.generate(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
            )


def plain_forward(model, batches, device) -> None:
    with torch.no_grad():
        for packed in batches:
            model(input_ids=packed.batch.input_ids.to(device), attention_mask=packed.batch.attention_mask.to(device))


def figure(n: int, ours: float, floor: float, **extra: Any) -> dict[str, Any]:
    return {
        "examples_per_s": round(n / ours, 2),
        "floor_examples_per_s": round(n / floor, 2),
        "ratio": round(floor / ours, 3),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON figures")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a Ray worker's cpus_per_worker)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.fitness.lm import encode_pair, exact_match, negative_cross_entropy
    from evomerge.fitness.packing import pack_continuations
    from evomerge.models.loading import quiet_transformers, resolve_device

    quiet_transformers()
    device = resolve_device(args.device)
    tokenizer = build_tokenizer(args.vocab)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    examples = build_examples(args.examples)
    prompts = [e["prompt"] for e in examples]
    n, max_new = len(examples), args.max_new_tokens

    new_tokens = {}
    for bs in BATCH_SIZES:
        steps = []  # one forward pass per generated token of a batch
        handle = model.register_forward_hook(lambda *_: steps.append(1))
        exact_match(model, tokenizer, examples, batch_size=bs, max_new_tokens=max_new, stop=STOP)
        handle.remove()
        new_tokens[bs] = len(steps) * bs / n  # an upper bound: a batch runs until its last row stops
    runs: dict[str, Callable[[], Any]] = {}
    for bs in BATCH_SIZES:
        runs[f"ours{bs}"] = partial(exact_match, model, tokenizer, examples, batch_size=bs, max_new_tokens=max_new, stop=STOP)
        runs[f"floor{bs}"] = partial(plain_generate, model, tokenizer, prompts, bs, max_new, device)
    pairs = [encode_pair(tokenizer, e["prompt"], e["target"]) for e in examples]
    batches = pack_continuations(pairs, LOGLIK_BATCH, tokenizer.pad_token_id)
    runs["ours_loglik"] = partial(negative_cross_entropy, model, tokenizer, examples, batch_size=LOGLIK_BATCH)
    runs["floor_loglik"] = partial(plain_forward, model, batches, device)
    seconds = best_seconds(runs, args.repeats, device)
    best_ours = min(BATCH_SIZES, key=lambda bs: seconds[f"ours{bs}"])
    best_floor = min(BATCH_SIZES, key=lambda bs: seconds[f"floor{bs}"])

    figures = {
        "exact_match": figure(
            n, seconds[f"ours{best_ours}"], seconds[f"floor{best_floor}"], batch_size=best_ours, floor_batch_size=best_floor,
            new_tokens_per_example=round(new_tokens[best_ours], 1), max_new_tokens=max_new,
        ),
        "loglik": figure(n, seconds["ours_loglik"], seconds["floor_loglik"], batch_size=LOGLIK_BATCH),
        "vocab": args.vocab,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "threads": args.threads,
    }
    if not args.json:
        print(__doc__.splitlines()[0], file=sys.stderr)
    print(json.dumps(figures, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
