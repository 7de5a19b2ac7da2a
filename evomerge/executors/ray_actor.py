"""The Ray actor behind ``RayExecutor``: one process that holds the models once and scores candidates.

Construction is deliberately cheap and ``load`` does the heavy work, so the executor can tell an
actor the cluster cannot place (``ping`` never answers) from one that is slowly reading models
(``ping`` answered, ``load`` still running), and so an error while loading comes back as the
original exception (a ``UserError`` such as a missing model or a broken fitness plugin) instead
of Ray's opaque "actor died in its creation task".

The executor creates these with ``max_restarts=0``: a dead actor stays dead and the executor
replaces it itself, so it alone decides how often a candidate is retried.
"""

from __future__ import annotations

from typing import Any

import ray

from evomerge.config import RunConfig
from evomerge.executors.base import Job
from evomerge.records import Candidate, Evaluation
from evomerge.workers import make_worker


@ray.remote(max_restarts=0, max_task_retries=0)
class EvaluationActor:
    """A worker (white-box or black-box) in its own Ray worker process; ``index`` numbers actors
    within a run."""

    def __init__(self, config: RunConfig, index: int) -> None:
        self.config = config
        self.worker_id = f"ray-{ray.util.get_node_ip_address()}-{index}"
        self.worker = None

    def ping(self) -> str:
        """Answers once the actor is placed and running; returns its worker id."""
        return self.worker_id

    def load(self, setup: Job | None) -> None:
        """Load the base, the experts and the fitness data, then run ``setup`` (the executor's
        per-worker job, e.g. seeding a response cache); the executor calls this once, first."""
        self.worker = make_worker(self.config, self.worker_id)
        if setup is not None:
            self.worker.run(setup)

    def evaluate(self, candidate: Candidate) -> Evaluation:
        return self.worker.evaluate(candidate)

    def run(self, job: Job) -> Any:
        return self.worker.run(job)
