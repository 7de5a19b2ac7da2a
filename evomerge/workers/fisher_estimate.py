"""The experts' diagonal Fisher information, estimated once per worker for Fisher merging.

Matena and Raffel (arXiv 2111.09832, §3) estimate each model's diagonal Fisher as the mean over
examples of the squared gradient of the log-likelihood. We use the empirical variant (the true
label's log-probability; see ``evomerge/merge/fisher.py``) on up to ``FISHER_EXAMPLES`` examples
of the expert's own data (``models.experts[i].data``):

* classifiers (``{"inputs", "labels"}``): per-example gradients from ``torch.func`` (``vmap`` over
  ``grad`` of a ``functional_call``), in batches of ``FISHER_BATCH``;
* causal LMs (text rows): one backward pass per example, of the summed log-probability of its
  target (or of its right choice), tokenized as the LM fitness functions do.

The estimate is made in float32 and kept by the worker's materializer for the whole run.
"""

from __future__ import annotations

import gc
from typing import Any, Mapping

import torch

from evomerge.config import RunConfig
from evomerge.errors import ConfigError
from evomerge.fitness.data import load_examples
from evomerge.fitness.lm import encode_pair
from evomerge.models.loading import load_model, load_tokenizer
from evomerge.models.vocab import VocabularyAlignment

FISHER_EXAMPLES = 256
FISHER_BATCH = 32


def diagonal_fisher(model: torch.nn.Module, examples: Any, tokenizer: Any = None, limit: int = FISHER_EXAMPLES) -> dict[str, torch.Tensor]:
    """Mean over examples of (∂ log p(y | x) / ∂θ)² per parameter: a classifier's
    ``{"inputs", "labels"}``, or a causal LM's text rows (with its ``tokenizer``)."""
    if isinstance(examples, Mapping):
        if "inputs" not in examples or "labels" not in examples:
            raise ConfigError("Fisher merging needs labelled data: {inputs, labels} or text rows with targets")
        return _classifier_fisher(model, examples, limit)
    return _lm_fisher(model, tokenizer, list(examples)[:limit])


def _classifier_fisher(model: torch.nn.Module, examples: Mapping[str, torch.Tensor], limit: int) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    device = next(iter(params.values())).device

    def log_likelihood(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (x.unsqueeze(0),))
        return torch.log_softmax(logits, dim=-1)[0].gather(0, y.unsqueeze(0))[0]

    per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    inputs, labels = examples["inputs"][:limit], examples["labels"][:limit]
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(labels), FISHER_BATCH):
            grads = per_example(params, inputs[s : s + FISHER_BATCH].to(device), labels[s : s + FISHER_BATCH].to(device))
            for name, g in grads.items():
                total[name] += g.square().sum(0)
    finally:
        model.train(was_training)
    return {name: t / max(len(labels), 1) for name, t in total.items()}


def _lm_fisher(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        raise ConfigError("Fisher merging on text data needs the expert's tokenizer")
    named = [(n, p) for n, p in model.named_parameters()]
    device = named[0][1].device
    total = {n: torch.zeros_like(p) for n, p in named}
    was_training = model.training
    model.eval()
    model.requires_grad_(True)
    try:
        for row in rows:
            if "target" in row:
                continuation = row["target"]
            elif "choices" in row and "label" in row:
                continuation = row["choices"][row["label"]]
            else:
                raise ConfigError("Fisher merging on text data needs a target (or choices and a label) in every row")
            context, cont = encode_pair(tokenizer, row["prompt"], continuation)
            ids = torch.tensor([context + cont], device=device)
            logits = model(input_ids=ids).logits[0, len(context) - 1 : len(context) - 1 + len(cont)]
            target = torch.tensor(cont, device=device).unsqueeze(-1)
            log_likelihood = torch.log_softmax(logits.float(), dim=-1).gather(-1, target).sum()
            grads = torch.autograd.grad(log_likelihood, [p for _, p in named], allow_unused=True)
            for (name, _), g in zip(named, grads):
                if g is not None:
                    total[name] += g.square()
    finally:
        model.requires_grad_(False)
        model.train(was_training)
    return {name: t / max(len(rows), 1) for name, t in total.items()}


def expert_fishers(
    config: RunConfig, device: torch.device, tensor_names: list[str], vocabulary: VocabularyAlignment | None = None
) -> dict[str, torch.Tensor]:
    """Each expert's diagonal Fisher on its own data, stacked per tensor: ``{name: [n_experts, *shape]}``.

    With experts of different vocabularies, each Fisher is laid out over the union like the
    weights; a row an expert lacks gets zero information (the floor), as it knows nothing of it."""
    first = 1 if config.models.base is not None else 0  # the plan's models: the base, then the experts
    per_expert: list[dict[str, torch.Tensor]] = []
    for i, expert in enumerate(config.models.experts):
        if expert.data is None:
            raise ConfigError(f"models.experts.{i}.data: Fisher merging needs each expert's own data")
        data = expert.data
        examples: Any = load_examples(
            data.source, data.split, data.classes, data.limit, config.base_dir,
            template=data.template, target=data.target, choices=data.choices, label=data.label,
        )
        ref = config.expert_model(expert)
        model = load_model(ref, device, torch.float32)
        tokenizer = None if isinstance(examples, Mapping) else load_tokenizer(ref)
        fisher = diagonal_fisher(model, examples, tokenizer)
        per_expert.append(fisher if vocabulary is None else vocabulary.align(first + i, fisher, record=False))
        del model
        gc.collect()
    return {name: torch.stack([f[name] for f in per_expert]) for name in tensor_names}
