"""The contract every search strategy keeps, as pytest test classes (``optuna.testing`` style).

``RegisteredStrategies`` runs the contract once per entry of ``STRATEGIES``, so a newly registered
strategy is checked without writing a test. A plugin author checks their own strategy by
subclassing ``StrategySuite`` in a test module and overriding the ``new_strategy`` fixture::

    from evomerge.testing.strategy_suite import StrategySuite

    class TestMyStrategy(StrategySuite):
        @pytest.fixture
        def new_strategy(self):
            return lambda population, spec, seed: MyStrategy(population, spec, seed, MyStrategy.Options())

The contract: candidates stay in the unit cube with unique ids; results told in any order are
matched by id; a simple objective improves; a checkpoint (plain data, never a pickle) restores the
exact next asks; draws depend on the seed only, never on numpy's global generator; failed, cancelled and
NaN results never become the best; telling an unknown candidate is an error.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest

from evomerge import plaindata
from evomerge.records import Candidate, Evaluation, Status
from evomerge.space.genes import GeneRange, SearchSpec
from evomerge.strategies import STRATEGIES, Strategy, make_strategy

POPULATION = "pop"
DIM = 6
SPEC = SearchSpec(DIM, np.full(DIM, 0.5), (GeneRange("alpha", 0, 3, 0.0, 1.0), GeneRange("beta", 3, 6, -1.5, 1.5)))
"""One space every built-in strategy accepts: Evo-Merging needs lora_compose's alpha and beta genes."""

StrategyFactory = Callable[[str, SearchSpec, int], Strategy]
"""``(population, spec, seed) -> Strategy``: what a suite needs to build the strategy under test."""


def sphere_fitness(genome: np.ndarray) -> float:
    """A smooth objective with its optimum inside the cube, at 0.3 in every gene."""
    return -float(np.sum((genome - 0.3) ** 2))


def scored(cand: Candidate) -> Evaluation:
    """The candidate's sphere fitness, with the gradient of its loss (−fitness) that gradient
    strategies (AdaMerging) receive from white-box workers and the others ignore."""
    gradient = 2 * (cand.genome - 0.3)
    return Evaluation(cand.id, "ok", sphere_fitness(cand.genome), metrics={"loss_gradient": gradient.tolist()})


def drain(strategy: Strategy, n_evals: int, rng: np.random.Generator, shuffle: bool = True) -> list[tuple[str, np.ndarray]]:
    """Ask/tell until ``n_evals`` results were told, each batch told in a shuffled order (results
    come back from workers in any order)."""
    seen = []
    told = 0
    while told < n_evals:
        batch = strategy.ask(4)
        assert batch, "a strategy with nothing outstanding must propose something"
        if shuffle:
            batch = [batch[i] for i in rng.permutation(len(batch))]
        for cand in batch:
            strategy.tell([scored(cand)])
            seen.append((cand.id, cand.genome))
            told += 1
    return seen


class StrategySuite:
    """The strategy contract. A subclass provides the ``new_strategy`` fixture, a factory
    ``(population, spec, seed) -> Strategy``; pytest names it as missing if it does not."""

    @pytest.fixture
    def make(self, new_strategy: StrategyFactory) -> Callable[..., Strategy]:
        """The strategy under test on ``SPEC``, seeded."""
        return lambda seed=7: new_strategy(POPULATION, SPEC, seed)

    def test_candidates_are_in_the_unit_cube_with_unique_ids(self, make):
        seen = drain(make(), 30, np.random.default_rng(0))
        ids = [cid for cid, _ in seen]
        assert len(set(ids)) == len(ids)
        for _, genome in seen:
            assert genome.shape == (DIM,)
            assert np.all(genome >= 0) and np.all(genome <= 1)

    def test_improves_on_a_simple_objective(self, make):
        strategy = make()
        start = sphere_fitness(np.full(DIM, 0.5))
        drain(strategy, 200, np.random.default_rng(0))
        assert strategy.best()[2] > start

    def test_state_round_trip_gives_identical_next_asks(self, make):
        a = make()
        drain(a, 13, np.random.default_rng(1))  # stop mid-generation on purpose
        blob = plaindata.dumps(a.state_dict())  # JSON values and arrays, never a pickle
        b = make()
        b.load_state_dict(plaindata.loads(blob))
        assert [c.id for c in b.outstanding()] == [c.id for c in a.outstanding()]
        for cand in a.outstanding():
            for s in (a, b):
                s.tell([scored(cand)])
        for _ in range(3):
            ca, cb = a.ask(3), b.ask(3)
            assert [c.id for c in ca] == [c.id for c in cb]
            for x, y in zip(ca, cb):
                np.testing.assert_array_equal(x.genome, y.genome)
            for x, y in zip(ca, cb):
                a.tell([scored(x)])
                b.tell([scored(y)])

    def test_same_seed_same_candidates_regardless_of_global_rng(self, make):
        a, b = make(seed=3), make(seed=3)
        ga = a.ask(4)
        np.random.seed(12345)
        np.random.rand(100)  # global RNG noise must not change a strategy's draws
        gb = b.ask(4)
        for x, y in zip(ga, gb):
            np.testing.assert_array_equal(x.genome, y.genome)

    def test_failed_cancelled_and_nan_results_never_become_best(self, make):
        strategy = make()
        told = 0
        while told < 20:
            for cand in strategy.ask(4):
                if told % 4 == 0:
                    ev = Evaluation.failure(cand.id, "boom")
                elif told % 4 == 1:
                    ev = Evaluation(cand.id, "ok", math.nan)
                elif told % 4 == 2:  # a stopped run cancelled it: told like a failure
                    ev = Evaluation(cand.id, Status.CANCELLED, -math.inf, error="cancelled")
                else:
                    ev = scored(cand)
                strategy.tell([ev])
                told += 1
        best = strategy.best()
        assert best is not None and math.isfinite(best[2])

    def test_telling_an_unknown_candidate_is_an_error(self, make):
        strategy = make()
        strategy.ask(1)
        with pytest.raises(KeyError):
            strategy.tell([Evaluation(f"{POPULATION}:999", "ok", 1.0)])


class RegisteredStrategies(StrategySuite):
    """The contract for every entry of ``STRATEGIES``, with its default options."""

    @pytest.fixture(params=sorted(STRATEGIES))
    def new_strategy(self, request) -> StrategyFactory:
        return lambda population, spec, seed: make_strategy(request.param, population, spec, seed, {})
