"""What a white-box worker measures on a candidate besides its fitness.

* ``fitness.tasks``: each named data set is scored with the run's fitness function and recorded as
  the metric of that name (its mean score) — the per-task objectives of NSGA-II and MAP, whose
  Pareto fronts the run reports.
* Populations whose strategy requires a gradient (AdaMerging): the entropy of the merged model's
  predictions and its gradient with respect to the genome (``loss`` / ``loss_gradient``, see
  :mod:`evomerge.workers.entropy_gradient`).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping

import numpy as np

from evomerge.records import Candidate


class ExtraMetrics:
    """Built once per worker; called with each candidate after it was materialized and scored."""

    def __init__(
        self,
        tasks: Mapping[str, Any],
        score: Callable[[Any], np.ndarray],
        gradient: Callable[[np.ndarray], dict[str, Any]] | None,
        gradient_populations: Collection[str],
    ) -> None:
        self.tasks = dict(tasks)
        self.score = score
        self.gradient = gradient
        self.gradient_populations = frozenset(gradient_populations)

    def task_metrics(self) -> dict[str, Any]:
        """Each ``fitness.tasks`` data set's mean score for the model as it is now."""
        return {name: float(np.mean(self.score(examples))) for name, examples in self.tasks.items()}

    def __call__(self, candidate: Candidate) -> dict[str, Any]:
        metrics = self.task_metrics()
        if self.gradient is not None and candidate.population in self.gradient_populations:
            metrics.update(self.gradient(candidate.genome))
        return metrics
