"""Conformance suite for executors: every entry of ``evomerge.executors.EXECUTORS`` is enrolled.

An executor may score candidates in any order and on any worker, but a run whose candidates do
not depend on the order results come back in (random search) must record exactly what the inline
executor records: the same candidates, populations, statuses, fitness and per-example scores.
``run_once(job)`` hands back the job's value from a worker, or its ``UserError`` as itself, and
every worker has run the executor's ``setup`` job before it does anything else.

To enrol, subclass ``ExecutorSuite`` in a test module and provide the fixture ``run_config``: a
callable ``run_config(executor: str) -> RunConfig`` for a small random-search run on that executor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from evomerge.config import RunConfig
from evomerge.errors import UserError
from evomerge.executors import EXECUTORS, make_executor
from evomerge.records import Evaluation


class MarkWorker:
    """Setup job: leaves a mark on the worker, so a later job can tell setup ran there first."""

    def __call__(self, worker: Any) -> None:
        worker.executor_suite_mark = True


class ReadMark:
    def __call__(self, worker: Any) -> bool:
        return getattr(worker, "executor_suite_mark", False)


class Refuse:
    def __call__(self, worker: Any) -> None:
        raise UserError("refused by the executor suite's job")


def recorded(config: RunConfig, run_dir: Path) -> dict[str, tuple]:
    """Run ``config`` to its budget; each evaluation as (population, status, fitness, scores, error)."""
    from evomerge.runs import start_run
    from evomerge.store import RunStore

    start_run(config, "executor-suite", run_dir)
    store = RunStore(run_dir, readonly=True)
    try:
        return {ev.candidate_id: _comparable(ev) for ev in store.evaluations(with_scores=True)}
    finally:
        store.close()


def _comparable(ev: Evaluation) -> tuple:
    scores = None if ev.per_example is None else tuple(np.asarray(ev.per_example).tolist())
    return ev.population, ev.status, ev.fitness, scores, ev.error


class ExecutorSuite:
    """The executor contract; see the module docstring for the fixture a subclass provides."""

    @pytest.fixture(params=sorted(EXECUTORS))
    def executor_name(self, request) -> str:
        return request.param

    def test_records_the_same_evaluations_as_the_inline_executor(
        self, run_config: Callable[[str], RunConfig], executor_name: str, tmp_path: Path
    ):
        expected = recorded(run_config("inline"), tmp_path / "reference")
        got = recorded(run_config(executor_name), tmp_path / executor_name)
        assert got == expected
        assert {status for _, status, *_ in got.values()} == {"ok"}

    def test_run_once_runs_a_job_on_a_worker_set_up_first(self, run_config: Callable[[str], RunConfig], executor_name: str):
        executor = make_executor(run_config(executor_name), setup=MarkWorker())
        try:
            assert executor.run_once(ReadMark()) is True
            with pytest.raises(UserError, match="refused by the executor suite's job"):
                executor.run_once(Refuse())
            assert executor.in_flight == 0 and executor.wait() == []
        finally:
            executor.shutdown()
