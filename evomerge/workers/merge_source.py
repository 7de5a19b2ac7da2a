"""PS+DFS: a parameter-space merge as a source of the data-flow space.

Akiba et al. (arXiv:2403.13187, §3.3) merge in the parameter space first and then search the
data-flow space over a collection that includes that merge. A source given as ``run:`` (a run
directory's best) or ``recipe:`` (the ``recipe.yaml`` its export wrote) is that merge: the
config that merged it and its genome (:mod:`evomerge.source_merges`) go through the same models
and codec as the white-box worker that scored it, once, when the data-flow worker starts. Only
the merge is built (no fitness examples are read: they play no part in the weights). The merged
working model is kept; the run's resident experts are dropped.
"""

from __future__ import annotations

import gc

import torch

from evomerge.plan import RunPlan
from evomerge.source_merges import RecordedMerge


def materialize_merge(merge: RecordedMerge, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, object | None]:
    """The recorded merge on ``device`` in ``dtype``, and its tokenizer."""
    from evomerge.workers.whitebox import merge_ready

    here = merge.config.models.model_copy(update={"device": str(device), "devices": 1})  # where the data-flow worker runs
    models, codecs, _ = merge_ready(RunPlan.from_config(merge.config.model_copy(update={"models": here})))
    models.materializer.apply(codecs[merge.population].decode(merge.genome))
    model, tokenizer = models.model, models.tokenizer
    del models, codecs
    gc.collect()
    return model.to(dtype=dtype).eval(), tokenizer
