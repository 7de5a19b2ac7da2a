"""Every registered strategy passes the shipped conformance suite (evomerge.testing.strategy_suite);
then what only CMA-ES and the Optuna samplers promise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.records import Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies import make_strategy
from evomerge.strategies.random_search import RandomSearch
from evomerge.testing.strategy_suite import DIM, POPULATION, SPEC, RegisteredStrategies, StrategySuite, scored


class TestRegisteredStrategies(RegisteredStrategies):
    pass


class TestAStrategyBuiltOutsideTheRegistry(StrategySuite):
    """How a plugin author runs the suite: override the factory fixture."""

    @pytest.fixture
    def new_strategy(self):
        return lambda population, spec, seed: RandomSearch(population, spec, seed, RandomSearch.Options())


def make(name: str, seed: int = 7):
    return make_strategy(name, POPULATION, SPEC, seed, {})


def test_cmaes_defaults_follow_the_recipe_paper():
    strategy = make("cmaes")
    assert strategy._run.es.popsize == 4 + int(3 * math.log(DIM))
    assert strategy._run.es.sigma0 == pytest.approx(1 / 6)


def test_cmaes_waits_for_its_generation():
    strategy = make("cmaes")
    generation = strategy.ask(100)
    assert len(generation) == strategy._run.es.popsize
    assert strategy.ask(1) == []  # the generation is not complete yet
    for cand in generation[:-1]:
        strategy.tell([scored(cand)])
    assert strategy.ask(1) == []
    strategy.tell([scored(generation[-1])])
    assert len(strategy.ask(1)) == 1


def test_cmaes_turns_separable_above_100_dimensions_unless_told():
    def diagonal(dim: int, **options) -> bool:
        es = make_strategy("cmaes", "pop", SearchSpec.unit_cube(dim), 0, options)._run.es
        return es.opts["CMA_diagonal"] is True

    assert not diagonal(100) and diagonal(101)
    assert diagonal(5, separable=True) and not diagonal(101, separable=False)


def test_cmaes_leaves_weight_space_unbounded():
    seed = np.array([-3.0, 2.0, 5.0])
    strategy = make_strategy("cmaes", "pop", SearchSpec.weights([seed]), 0, {"sigma0": 0.1})
    genomes = np.array([c.genome for c in strategy.ask(100)])
    assert np.all(np.abs(genomes - seed) < 1.0)  # sampled around the seed, not clipped into [0, 1]


def test_cmaes_puts_an_immigrant_into_its_next_generation():
    strategy = make("cmaes")
    generation = strategy.ask(100)
    immigrant = np.full(DIM, 0.3)
    strategy.immigrate(immigrant, Evaluation("other:1", "ok", 0.0))
    for cand in generation:
        strategy.tell([scored(cand)])
    nxt = strategy.ask(100)
    assert any(np.allclose(c.genome, immigrant) for c in nxt)


def test_optuna_immigrant_is_a_finished_trial():
    strategy = make("tpe")
    strategy.immigrate(np.full(DIM, 0.3), Evaluation("other:1", "ok", 0.75))
    trials = strategy.study.get_trials(deepcopy=False)
    assert trials[-1].value == 0.75 and trials[-1].params["x0"] == pytest.approx(0.3)
