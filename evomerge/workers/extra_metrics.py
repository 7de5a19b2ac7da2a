"""What a white-box worker measures on a candidate besides its fitness.

* ``fitness.tasks``: each named data set is scored with the run's fitness function and recorded as
  the metric of that name (its mean score) — the per-task objectives of NSGA-II and MAP, whose
  Pareto fronts the run reports.
* AdaMerging populations: the entropy of the merged model's predictions and its gradient with
  respect to the genome (``loss`` / ``loss_gradient``, see :mod:`evomerge.workers.entropy_gradient`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ExtraMetrics:
    """Built once per worker; called with each candidate after it was materialized and scored."""

    def __init__(self, worker: Any) -> None:
        config = worker.config
        self.worker = worker
        self.tasks = {name: worker._examples(data) for name, data in config.fitness.tasks.items()}
        self.gradient_populations = {p.name for p in config.populations if p.strategy == "adamerging"}
        self._entropy = None
        if self.gradient_populations:
            from evomerge.workers.entropy_gradient import EntropyGradient

            self._entropy = EntropyGradient(worker)

    def __call__(self, genome: np.ndarray, population: str | None) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            name: float(np.mean(self.worker.score(examples))) for name, examples in self.tasks.items()
        }
        if self._entropy is not None and population in self.gradient_populations:
            metrics.update(self._entropy(genome))
        return metrics
