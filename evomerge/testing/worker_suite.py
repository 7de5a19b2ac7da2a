"""Conformance suite for workers: white-box and black-box workers honour one contract.

``worker.evaluate(candidate) -> Evaluation`` never raises for the candidate's own failure: a
fitness that raises gives status ``failed`` with the reason, a NaN fitness gives ``failed``
("fitness is NaN or infinite"); a good candidate comes back ``ok`` with one score per example
whose mean is its fitness, under the candidate's id and population. ``worker.run(job)`` is
``job(worker)``. A worker never writes the run store.

To enrol a worker kind, subclass ``WorkerSuite`` in a test module and provide two fixtures:

* ``worker_config``: a callable ``worker_config(fitness=None) -> RunConfig`` for a small run of that
  kind; ``fitness`` (a ``module:function`` name) replaces the config's fitness function;
* ``genome``: a genome of that config's search space.

The failing fitness functions are in this module, so every process (a Ray actor too) finds them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pytest

from evomerge.config import RunConfig
from evomerge.errors import PluginError
from evomerge.records import Candidate, Status

REFUSAL = "refused by the worker suite's fitness"


def _count(examples: Any) -> int:
    return len(next(iter(examples.values()))) if isinstance(examples, dict) else len(examples)


def raising_fitness(model: Any, tokenizer: Any, examples: Any) -> list[float]:
    raise RuntimeError(REFUSAL)


def nan_fitness(model: Any, tokenizer: Any, examples: Any) -> list[float]:
    return [math.nan] * _count(examples)


def short_fitness(model: Any, tokenizer: Any, examples: Any) -> list[float]:
    return [0.5]


async def raising_fitness_api(model: Any, examples: Any) -> list[float]:
    raise RuntimeError(REFUSAL)


async def nan_fitness_api(model: Any, examples: Any) -> list[float]:
    return [math.nan] * _count(examples)


async def short_fitness_api(model: Any, examples: Any) -> list[float]:
    return [0.5]


def _candidate(config: RunConfig, number: int, genome: np.ndarray) -> Candidate:
    """Candidate ``number`` of the config's first population (workers decode by population)."""
    population = config.populations[0].name
    return Candidate(f"{population}:{number}", population, genome)


class _WorkerClass:
    """A job: the worker's class name (what ``run`` must hand back from the worker itself)."""

    def __call__(self, worker: Any) -> str:
        return type(worker).__name__


class WorkerSuite:
    """The worker contract; see the module docstring for the fixtures a subclass provides."""

    @pytest.fixture
    def make(self, worker_config: Callable[..., RunConfig]):
        """``make(kind)``: a worker scoring with the config's fitness (None) or this module's
        ``raising``, ``nan`` or ``short`` fitness of the worker's kind; closed after the test."""
        from evomerge.workers import make_worker

        made = []

        def build(kind: str | None = None):
            config = worker_config()
            if kind is not None:
                suffix = "_api" if config.api is not None else ""
                config = worker_config(f"{__name__}:{kind}_fitness{suffix}")
            made.append((make_worker(config, "suite"), config))
            return made[-1]

        yield build
        for worker, _ in made:
            worker.close()

    def test_a_good_candidate_has_per_example_scores_whose_mean_is_its_fitness(self, make, genome):
        worker, config = make()
        ev = worker.evaluate(_candidate(config, 0, genome))
        pop = config.populations[0].name
        assert (ev.candidate_id, ev.population, ev.status) == (f"{pop}:0", pop, Status.OK), ev.error
        assert ev.usable and ev.error is None and ev.worker
        scores = np.asarray(ev.per_example)
        assert scores.ndim == 1 and len(scores) > 0 and np.all(np.isfinite(scores))
        assert ev.fitness == pytest.approx(float(np.mean(scores)))
        assert ev.started > 0 and ev.duration >= 0
        again = worker.evaluate(_candidate(config, 1, genome))
        assert again.fitness == ev.fitness  # the same genome scores the same
        assert not (config.run_path() / "run.db").exists()  # workers never write the run store

    def test_a_raising_fitness_fails_the_candidate_with_its_reason(self, make, genome):
        worker, config = make("raising")
        ev = worker.evaluate(_candidate(config, 0, genome))
        pop = config.populations[0].name
        assert (ev.candidate_id, ev.population, ev.status) == (f"{pop}:0", pop, Status.FAILED)
        assert ev.fitness == -math.inf and not ev.usable
        assert ev.error == f"RuntimeError: {REFUSAL}"
        following = worker.evaluate(_candidate(config, 1, genome))
        assert following.status == Status.FAILED  # the worker lives on: it answers the next candidate

    def test_a_nan_fitness_fails_the_candidate(self, make, genome):
        worker, config = make("nan")
        ev = worker.evaluate(_candidate(config, 0, genome))
        assert (ev.population, ev.status, ev.error) == (config.populations[0].name, Status.FAILED, "fitness is NaN or infinite")
        assert ev.fitness == -math.inf

    def test_scores_of_the_wrong_shape_stop_the_run(self, make, genome):
        worker, config = make("short")
        with pytest.raises(PluginError, match="returned scores of shape"):
            worker.evaluate(_candidate(config, 0, genome))

    def test_run_calls_the_job_with_the_worker(self, make):
        worker, config = make()
        assert worker.run(_WorkerClass()) == type(worker).__name__
