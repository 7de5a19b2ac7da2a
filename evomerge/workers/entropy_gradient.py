"""AdaMerging's worker side: a differentiable merge, and the entropy gradient it gives.

Yang et al. (arXiv 2310.02575, §3.2) minimise the mean Shannon entropy H = −Σ_c p_c log p_c of
the merged model's predictions on unlabelled inputs with respect to the merge coefficients. Here
the merge is written as a function of the unit-cube genome in torch — the space's decode (bounds,
per-model or shared values, fixed parameters) followed by ``linear`` or ``task_arithmetic``'s
combination of the resident experts — and the model is run on those tensors through
``torch.func.functional_call``, so one backward pass gives dH/dgenome. The in-place materializer
is untouched: the worker still scores each step's fitness on the merge it writes.

Choices made: the unlabelled inputs are the first ``ADAMERGING_INPUTS`` inputs of ``fitness.data``
(their labels are not read; the paper uses the test inputs, which a held-out comparison must not).
For a classifier the entropy is that of its class probabilities; for a causal LM (text rows) that of
its next-token distributions at every prompt position, averaged over positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evomerge.errors import ConfigError
from evomerge.fitness.classification import features_for
from evomerge.merge.linear import WEIGHT_SUM_EPS
from evomerge.space.merge_space import Space

ADAMERGING_INPUTS = 512
ADAMERGING_PROMPTS = 64


def genome_values(space: Space, unit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Space.decode in torch: per parameter, its values as ``[n_groups, n_models or 1]``."""
    unit = unit.clamp(0.0, 1.0)
    values: dict[str, torch.Tensor] = {}
    for gene in space.genes:
        if gene.levels is not None:
            raise ValueError(f"'{gene.name}' is discrete; a differentiable merge has only continuous genes")
        chunk = unit[gene.start : gene.stop].view(gene.groups, gene.size // gene.groups)
        real = gene.low + chunk * (gene.high - gene.low)
        if space.method.param(gene.name).per_model and gene.size == gene.groups:
            real = real.expand(gene.groups, space.n_models)
        values[gene.name] = real
    for name, value in space.fixed.items():
        width = space.n_models if space.method.param(name).per_model else 1
        values[name] = torch.full((len(space.group_names), width), float(value), dtype=unit.dtype)
    return values


def merged_parameters(space: Space, tensors: dict[str, Any], unit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every merged tensor as a differentiable function of the genome ``unit``."""
    if not space.method.differentiable:
        raise ValueError(f"merge method '{space.method.name}' is not differentiable in its genes")
    values = genome_values(space, unit)
    normalize = space.options.get("normalize", False)
    merged = {}
    for name, tensor in tensors.items():
        g = space.tensor_groups[name]
        weights = values["weight"][g]
        if normalize:
            total = weights.sum()
            weights = weights / torch.where(total.abs() < WEIGHT_SUM_EPS, torch.ones_like(total), total)
        stack = tensor.stack
        # the genes live on the CPU (a float64 genome); the experts on the worker's device
        coefs = weights.to(device=stack.device, dtype=stack.dtype)
        if "lambda" in values:  # task arithmetic's scale of the combined task vector
            coefs = coefs * values["lambda"][g][0].to(device=stack.device, dtype=stack.dtype)
        combined = torch.tensordot(coefs, stack, dims=1)
        if tensor.reference is not None:
            # task arithmetic (needs a base): base + Σ c_i τ_i; linear over task vectors: the base weighs Σ c_i
            ref_coef = 1.0 if space.method.needs_base else coefs.sum()
            combined = combined + ref_coef * tensor.reference
        merged[name] = combined
    return merged


def prediction_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy of the softmax of ``logits`` [..., classes] over the positions where
    ``mask`` (shaped like ``logits[..., 0]``) is 1, or over all of them."""
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    if mask is None:
        return entropy.mean()
    mask = mask.to(entropy.dtype)
    return (entropy * mask).sum() / mask.sum().clamp_min(1.0)


class EntropyGradient:
    """``genome → {"loss": H, "loss_gradient": dH/dgenome}`` for one white-box worker."""

    def __init__(self, space: Space, models: Any, examples: Any, device: torch.device) -> None:
        self.space = space
        self.model = models.model
        self.tensors = models.materializer.tensors
        if isinstance(examples, dict) and "inputs" in examples:  # a classifier's inputs
            self.args: tuple = (features_for(self.model, examples["inputs"][:ADAMERGING_INPUTS]),)
            self.kwargs, self.mask = {}, None
        else:  # a causal LM's prompts, right-padded
            tokenizer = models.tokenizer
            if tokenizer is None:
                raise ConfigError("adamerging on text data needs the model's tokenizer")
            prompts = [row["prompt"] for row in list(examples)[:ADAMERGING_PROMPTS]]
            ids = [tokenizer(p)["input_ids"] for p in prompts]
            width = max(map(len, ids))
            input_ids = torch.zeros((len(ids), width), dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, seq in enumerate(ids):
                input_ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            self.args = ()
            self.kwargs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
            self.mask = mask.to(device)

    def entropy(self, unit: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        params = merged_parameters(self.space, self.tensors, unit)
        output = functional_call(self.model, params, self.args, self.kwargs)
        logits = output.logits if hasattr(output, "logits") else output
        return prediction_entropy(logits.float(), self.mask)

    def __call__(self, genome: np.ndarray) -> dict[str, Any]:
        unit = torch.tensor(np.asarray(genome, dtype=np.float64), requires_grad=True)
        with torch.enable_grad():
            loss = self.entropy(unit)
            loss.backward()
        assert unit.grad is not None
        return {"loss": float(loss.detach()), "loss_gradient": unit.grad.tolist()}
