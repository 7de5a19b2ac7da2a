"""Executors run candidates on workers: ``submit`` a candidate, ``wait`` for finished evaluations,
``run_once`` a one-off job on any one worker.

``EXECUTORS`` is the registry ``config.executor`` names: ``"inline"`` scores in the controller's
own process (tests, debugging, small CPU runs), ``"ray"`` runs a pool of Ray actors. The Ray
module imports ray only when a pool starts, so ``import evomerge.executors`` stays light.
"""

from __future__ import annotations

from typing import Callable

from evomerge.config import RunConfig
from evomerge.executors.base import Executor, InlineExecutor, Job, WorkerError
from evomerge.executors.ray import RayExecutor

EXECUTORS: dict[str, type[Executor]] = {"inline": InlineExecutor, "ray": RayExecutor}


def make_executor(
    config: RunConfig, setup: Job | None = None, on_phase: Callable[[str], None] = lambda text: None
) -> Executor:
    """The executor ``config.executor`` names; every worker runs ``setup`` once after loading
    (a replacement worker too), before any candidate. ``on_phase`` hears what starting takes
    its time on (starting Ray, loading the models), for a progress display."""
    return EXECUTORS[config.executor](config, setup, on_phase)


__all__ = ["EXECUTORS", "Executor", "InlineExecutor", "Job", "RayExecutor", "WorkerError", "make_executor"]
