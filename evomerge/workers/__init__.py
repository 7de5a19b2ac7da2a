"""Code that runs in worker processes: the Worker contract, the white-box and black-box workers,
the materializer, and the jobs an executor may run on one worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evomerge.config import RunConfig
    from evomerge.workers.base import Worker


def make_worker(config: "RunConfig", worker_id: str) -> "Worker":
    """The worker a run needs: black-box (``config.api`` set) or white-box, built in this process
    from the run's plan (the same plan, with the same codecs, on every process)."""
    from evomerge.plan import RunPlan

    plan = RunPlan.from_config(config)
    if config.api is not None:
        from evomerge.workers.blackbox import BlackBoxWorker

        return BlackBoxWorker(plan, worker_id)
    from evomerge.workers.whitebox import WhiteBoxWorker

    return WhiteBoxWorker(plan, worker_id)
