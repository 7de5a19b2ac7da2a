"""PS+DFS: a parameter-space run's best merge as a source of the data-flow space.

Akiba et al. (arXiv:2403.13187, §3.3) merge in the parameter space first and then search the
data-flow space over a collection that includes that merge. A source given as ``run:`` is that
merge: the run's own config (the one it started with, read from its run.db) and its best
genome go through the same white-box worker that scored it, once, when the data-flow worker
starts. The merged working model is kept; the run's resident experts are dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.errors import RunDirError
from evomerge.records import Candidate


def best_merge(run_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, object | None]:
    """The best merge of the run in ``run_dir`` on ``device`` in ``dtype``, and its tokenizer."""
    from evomerge.plan import RunPlan
    from evomerge.runs import recorded_best
    from evomerge.workers.whitebox import WhiteBoxWorker

    best, config = recorded_best(run_dir)
    if best is None:
        raise RunDirError(f"{run_dir}: no successful evaluation to use as a source yet")
    here = config.models.model_copy(update={"device": str(device), "devices": 1})  # where the data-flow worker runs
    worker = WhiteBoxWorker(RunPlan.from_config(config.model_copy(update={"models": here})), worker_id="run-source")
    worker.materialize(Candidate(best.candidate_id, best.population, best.genome))
    model, tokenizer = worker.models.model, worker.models.tokenizer
    worker.close()
    return model.to(dtype=dtype).eval(), tokenizer
