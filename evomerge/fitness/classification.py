"""Classification accuracy, one score per example (1 = correct), as M2N2's resource competition needs.

torch is imported when scores are computed, not with the module: ``evomerge validate`` checks
``fitness.options`` against the signature without importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

BATCH_SIZE = 4096


def features_for(model: Any, features: torch.Tensor) -> torch.Tensor:
    """Feature rows as ``model`` takes them: on its device and, when they are floating point, in
    its dtype (data loads as float32, and a model held in bfloat16 refuses float32 inputs)."""
    param = next(model.parameters())
    return features.to(device=param.device, dtype=param.dtype if features.is_floating_point() else features.dtype)


def classification_accuracy(model: Any, tokenizer: Any, examples: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``examples["inputs"]`` feature rows, ``examples["labels"]`` class ids → 0/1 per example."""
    import torch

    inputs, labels = examples["inputs"], examples["labels"]
    scores = torch.empty(len(labels), dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, len(labels), BATCH_SIZE):
            batch = features_for(model, inputs[start : start + BATCH_SIZE])
            output = model(batch)
            logits = output.logits if hasattr(output, "logits") else output
            predicted = logits.argmax(dim=-1).cpu()
            scores[start : start + BATCH_SIZE] = (predicted == labels[start : start + BATCH_SIZE]).float()
    return scores
