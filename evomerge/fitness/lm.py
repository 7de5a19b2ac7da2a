"""Fitness functions for causal language models, one score per example.

Examples are the rendered text rows of ``evomerge.fitness.data``: dicts with ``"prompt"`` and, as
the function needs them, ``"target"``, ``"choices"`` and ``"label"``. Options such as
``batch_size`` come from the config's ``fitness.options`` as keyword arguments.

Continuations are tokenized as lm-eval does: the prompt and ``prompt + continuation`` are encoded
with the tokenizer's special tokens and the continuation is what the longer encoding adds, so
tokens merging across the boundary are scored as the model would see them. A tokenizer without a
pad token pads with its eos token: padded positions are masked out, so the id only has to exist.
Sequences are not truncated; keep prompts within the model's context.

torch is imported by the functions that compute, not by the module: ``evomerge validate`` checks
``fitness.options`` against these signatures without importing it.
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from evomerge.errors import PluginError

if TYPE_CHECKING:
    import torch

DEFAULT_ANSWER_REGEX = r"-?\d+(?:\.\d+)?"


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode and no autograd while scoring, then the model's training state as it was."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _require(examples: Sequence[dict[str, Any]], keys: tuple[str, ...], fitness: str) -> None:
    """Fail once, before any forward pass, when the data config does not provide what is scored."""
    if isinstance(examples, dict) or any(not isinstance(e, dict) for e in examples):
        raise PluginError(f"fitness '{fitness}' needs text examples (.jsonl or .csv data), not tensors")
    for i, example in enumerate(examples):
        missing = [k for k in keys if k not in example]
        if missing:
            raise PluginError(
                f"fitness '{fitness}': example {i} has no {', '.join(missing)}"
                " (set the data config's template/target/choices/label fields)"
            )


def _pad_id(tokenizer: Any, fitness: str) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise PluginError(f"fitness '{fitness}': the tokenizer has neither a pad nor an eos token")
    return int(pad)


def encode_pair(tokenizer: Any, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids), split as lm-eval does; a prompt's trailing spaces move to
    the continuation so that word-initial tokens are scored whole."""
    stripped = prompt.rstrip(" ")
    continuation = prompt[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation)["input_ids"]
    context = tokenizer(stripped)["input_ids"]
    return context, whole[len(context):]


def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    fitness: str,
) -> list[torch.Tensor]:
    """Log-probability of each continuation token given the prompt and the tokens before it.

    Pairs are packed longest first with right padding and an attention mask (``packing``), once
    per tokenizer and set of pairs. Where the model's forward takes ``logits_to_keep``, it
    computes logits only at the columns a batch scores; either way only the scored rows of the
    logits are upcast to float32 and log-softmaxed, never the whole ``[batch, seq, vocab]``.
    """
    import torch

    from evomerge.fitness.packing import cached, pack_continuations

    if tokenizer is None:
        raise PluginError(f"fitness '{fitness}' needs the model's tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad  # any id: padded positions are masked and never scored

    def build() -> list:
        encoded = []
        for prompt, continuation in pairs:
            context, cont = encode_pair(tokenizer, prompt, continuation)
            if not context or not cont:
                raise PluginError(
                    f"fitness '{fitness}': prompt {prompt!r} or continuation {continuation!r} has no tokens"
                )
            encoded.append((context, cont))
        return pack_continuations(encoded, batch_size, pad)

    batches = cached(tokenizer, ("continuations", batch_size, pad, tuple(pairs)), build)
    keep = _logits_to_keep(model)
    results: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    with _inference(model) as device:
        for packed in batches:
            ids, width = packed.batch.input_ids, packed.batch.input_ids.shape[1]
            options = {}
            if keep is not None:
                name, takes_positions = keep
                options[name] = packed.kept.to(device) if takes_positions else width - int(packed.kept[0])
            logits = model(input_ids=ids.to(device), attention_mask=packed.batch.attention_mask.to(device), **options).logits
            if keep is not None and keep[1]:
                columns = packed.kept_index
            else:  # the last columns, or all of them
                columns = packed.column - (width - logits.shape[1])
            scored = logits[packed.row.to(device), columns.to(device)].float().log_softmax(-1)
            token_logprobs = scored.gather(-1, packed.target.to(device).unsqueeze(-1)).squeeze(-1).cpu()
            for i, logprobs in zip(packed.batch.rows, token_logprobs.split(packed.lengths)):
                results[i] = logprobs
    return results


def _logits_to_keep(model: torch.nn.Module) -> tuple[str, bool] | None:
    """The forward argument that limits which logits a model computes, and whether it takes the
    positions to keep (``logits_to_keep``, transformers ≥ 4.50) or only a count of last positions
    (``num_logits_to_keep`` before, and models written to that convention). None: the model
    computes them all and only the scored ones are used."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return name, "Tensor" in str(parameters[name].annotation)
    return None


def multiple_choice_loglik(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]], *, batch_size: int = 16
) -> torch.Tensor:
    """1 where the right choice has the highest summed log-likelihood given the prompt, else 0.

    The sum, not the mean, is lm-eval's ``acc``; it favours short choices, which is the
    convention results are compared under.
    """
    import torch

    _require(examples, ("choices", "label"), "multiple_choice_loglik")
    pairs = [(e["prompt"], c) for e in examples for c in e["choices"]]
    totals = [lp.sum().item() for lp in continuation_logprobs(model, tokenizer, pairs, batch_size, "multiple_choice_loglik")]
    scores, offset = [], 0
    for example in examples:
        n = len(example["choices"])
        best = max(range(n), key=lambda j: totals[offset + j])
        scores.append(float(best == example["label"]))
        offset += n
    return torch.tensor(scores, dtype=torch.float64)


def negative_cross_entropy(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]], *, batch_size: int = 16
) -> torch.Tensor:
    """Minus the mean cross-entropy of the target's tokens given the prompt (the prompt's own
    tokens do not count), so a model that predicts the answers better scores higher."""
    import torch

    _require(examples, ("target",), "negative_cross_entropy")
    pairs = [(e["prompt"], e["target"]) for e in examples]
    logprobs = continuation_logprobs(model, tokenizer, pairs, batch_size, "negative_cross_entropy")
    return torch.tensor([lp.mean().item() for lp in logprobs], dtype=torch.float64)


def extract_answer(text: str, answer_regex: str = DEFAULT_ANSWER_REGEX) -> str | None:
    """The last match of ``answer_regex`` in ``text`` (its first group when it has one)."""
    matches = list(re.finditer(answer_regex, text))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.re.groups else last.group(0)).strip()


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (the stop string left out)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def _answer_extractor(answer_regex: str, answer_fn: str | None) -> Callable[[str], str | None]:
    if answer_fn is None:
        return lambda text: extract_answer(text, answer_regex)
    from evomerge.fitness.plugins import load_function

    fn = load_function(answer_fn, "answer_fn")

    def extract(text: str) -> str | None:
        answer = fn(text)
        return None if answer is None else str(answer).strip()

    return extract


def exact_match(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    answer_regex: str = DEFAULT_ANSWER_REGEX,
    target_regex: str | None = None,
    stop: Sequence[str] = (),
    answer_fn: str | None = None,
) -> torch.Tensor:
    """1 where the answer extracted from the greedy generation equals the stripped target.

    A generation is cut at the first of the ``stop`` strings (lm-eval's ``until``), so text the
    model goes on with after its answer (a next question) is not searched. The answer is the last
    match of ``answer_regex``, or what ``answer_fn`` (``"package.module:function"``, text → answer
    or None) returns. ``target_regex`` extracts the reference answer from targets that hold more
    than the answer (GSM8K's ``"… #### 72"``); without it the whole stripped target is the answer.
    Generation is :func:`greedy_generations`.
    """
    import torch

    _require(examples, ("target",), "exact_match")
    extract = _answer_extractor(answer_regex, answer_fn)
    texts = greedy_generations(
        model, tokenizer, [e["prompt"] for e in examples], batch_size=batch_size, max_new_tokens=max_new_tokens,
        stop=stop, fitness="exact_match",
    )
    scores = []
    for example, text in zip(examples, texts):
        answer = extract(text)
        target = str(example["target"]).strip()
        if target_regex is not None:
            target = extract_answer(target, target_regex)
        scores.append(float(answer is not None and answer == target))
    return torch.tensor(scores, dtype=torch.float64)


def greedy_generations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str],
    fitness: str,
) -> list[str]:
    """Each prompt's greedy generation (special tokens dropped), cut at its first ``stop`` string:
    what ``exact_match`` extracts its answer from and what the judge fitness has graded.

    Generation stops for each row at an EOS token (the model's generation config's and the
    tokenizer's) or once its first stop string is settled; the batch ends when every row has.
    Prompts are tokenized once per tokenizer and set of prompts, sorted by length and left-padded,
    so that every row's generation starts right after its prompt.
    """
    from transformers import StoppingCriteriaList

    from evomerge.fitness.packing import cached, pack
    from evomerge.fitness.stopping import StopAtStrings

    if tokenizer is None:
        raise PluginError(f"fitness '{fitness}' needs the model's tokenizer")
    pad = _pad_id(tokenizer, fitness)
    stop = [s for s in stop if s]
    prompts = tuple(prompts)
    batches = cached(
        tokenizer, ("prompts", batch_size, pad, prompts),
        lambda: pack([tokenizer(p)["input_ids"] for p in prompts], batch_size, pad, left=True),
    )
    eos = end_token_ids(model, tokenizer)
    texts = [""] * len(prompts)
    with _inference(model) as device:
        for batch in batches:
            width = batch.input_ids.shape[1]
            out = model.generate(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                stopping_criteria=StoppingCriteriaList([StopAtStrings(tokenizer, stop, width)] if stop else []),
            )
            for i, text in zip(batch.rows, tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)):
                texts[i] = truncate_at_stop(text, stop)
    return texts


def end_token_ids(model: Any, tokenizer: Any) -> list[int] | None:
    """The ids that end a generation: the model's generation config's and the tokenizer's EOS (a
    chat model ends its turn with a token of its own: Gemma's ``<end_of_turn>``). The reference
    service stops at the same ones."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if config is None else [config] if isinstance(config, int) else list(config)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids or None
