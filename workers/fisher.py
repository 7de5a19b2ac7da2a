"""The experts' diagonal Fisher information, estimated once per worker for Fisher merging.

Matena and Raffel (arXiv 2111.09832, §3) estimate each model's diagonal Fisher as the mean over
examples of the squared gradient of the log-likelihood. We use the empirical variant (the true
label's log-probability; see ``evomerge/merge/fisher.py``), with per-example gradients from
``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``) on up to ``FISHER_EXAMPLES``
examples of the expert's own data (``models.experts[i].data``), in batches of ``FISHER_BATCH``.
The estimate is made in float32 and kept by the worker's materializer for the whole run.
"""

from __future__ import annotations

import gc
from typing import Any, Mapping

import torch

from evomerge.config import RunConfig
from evomerge.errors import ConfigError
from evomerge.fitness.data import load_examples
from evomerge.models.loading import load_model

FISHER_EXAMPLES = 256
FISHER_BATCH = 32


def diagonal_fisher(model: torch.nn.Module, examples: Mapping[str, torch.Tensor], limit: int = FISHER_EXAMPLES) -> dict[str, torch.Tensor]:
    """Mean over examples of (∂ log p(y | x) / ∂θ)² per parameter, for a classifier's ``{"inputs", "labels"}``."""
    from torch.func import functional_call, grad, vmap

    if not isinstance(examples, Mapping) or "inputs" not in examples or "labels" not in examples:
        raise ConfigError(
            "Fisher merging estimates each expert's Fisher information on classification data"
            " ({inputs, labels}: .npz or sklearn sources); text data is not supported yet"
        )
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


def expert_fishers(config: RunConfig, device: torch.device, tensor_names: list[str]) -> dict[str, torch.Tensor]:
    """Each expert's diagonal Fisher on its own data, stacked per tensor: ``{name: [n_experts, *shape]}``."""
    per_expert: list[dict[str, torch.Tensor]] = []
    for i, expert in enumerate(config.models.experts):
        if expert.data is None:
            raise ConfigError(f"models.experts.{i}.data: Fisher merging needs each expert's own data")
        data = expert.data
        examples: Any = load_examples(
            data.source, data.split, data.classes, data.limit, config.base_dir,
            template=data.template, target=data.target, choices=data.choices, label=data.label,
        )
        model = load_model(config.model_ref(expert.path), device, torch.float32)
        per_expert.append(diagonal_fisher(model, examples))
        del model
        gc.collect()
    return {name: torch.stack([f[name] for f in per_expert]) for name in tensor_names}
