"""Code that runs in worker processes (installed as ``evomerge.workers``)."""

from __future__ import annotations

from typing import Any


def make_worker(config: Any, worker_id: str) -> Any:
    """The worker a run needs: black-box (``config.api`` set) or white-box, built in this process."""
    if config.api is not None:
        from evomerge.workers.blackbox import BlackBoxWorker

        return BlackBoxWorker(config, worker_id)
    from evomerge.workers.whitebox import WhiteBoxWorker

    return WhiteBoxWorker(config, worker_id)
