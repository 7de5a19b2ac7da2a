"""Conformance suite every registered strategy passes (Optuna-style, parametrized over the registry)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge import plaindata
from evomerge.records import Evaluation
from evomerge.space.genes import GeneRange, SearchSpec
from evomerge.strategies import STRATEGIES, make_strategy

DIM = 6
# one space every strategy accepts: evo_merging needs lora_compose's alpha and beta genes
SPEC = SearchSpec(DIM, np.full(DIM, 0.5), (GeneRange("alpha", 0, 3, 0.0, 1.0), GeneRange("beta", 3, 6, -1.5, 1.5)))


def sphere_fitness(genome: np.ndarray) -> float:
    return -float(np.sum((genome - 0.3) ** 2))


def scored(cand) -> Evaluation:
    """The candidate's sphere fitness, with the gradient of its loss (−fitness) that gradient
    strategies (AdaMerging) receive from white-box workers and the others ignore."""
    gradient = 2 * (cand.genome - 0.3)
    return Evaluation(cand.id, "ok", sphere_fitness(cand.genome), metrics={"loss_gradient": gradient.tolist()})


def make(name: str, seed: int = 7):
    return make_strategy(name, "pop", SPEC, seed, {})


def drain(strategy, n_evals: int, rng: np.random.Generator, shuffle: bool = True) -> list[tuple[str, np.ndarray]]:
    """Ask/tell until n_evals results were told; results are told in a shuffled order."""
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


@pytest.fixture(params=sorted(STRATEGIES))
def name(request):
    return request.param


def test_candidates_are_in_the_unit_cube_with_unique_ids(name):
    strategy = make(name)
    seen = drain(strategy, 30, np.random.default_rng(0))
    ids = [cid for cid, _ in seen]
    assert len(set(ids)) == len(ids)
    for _, genome in seen:
        assert genome.shape == (DIM,)
        assert np.all(genome >= 0) and np.all(genome <= 1)


def test_improves_on_a_simple_objective(name):
    strategy = make(name)
    start = sphere_fitness(np.full(DIM, 0.5))
    drain(strategy, 200, np.random.default_rng(0))
    assert strategy.best()[2] > start


def test_state_round_trip_gives_identical_next_asks(name):
    a = make(name)
    drain(a, 13, np.random.default_rng(1))  # stop mid-generation on purpose
    blob = plaindata.dumps(a.state_dict())  # JSON values and arrays, never a pickle
    b = make(name)
    b.load_state_dict(plaindata.loads(blob))
    outstanding_a = [c.id for c in a.outstanding()]
    assert [c.id for c in b.outstanding()] == outstanding_a
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


def test_same_seed_same_candidates_regardless_of_global_rng(name):
    a, b = make(name, seed=3), make(name, seed=3)
    ga = a.ask(4)
    np.random.seed(12345)
    np.random.rand(100)  # global RNG noise must not change a strategy's draws
    gb = b.ask(4)
    for x, y in zip(ga, gb):
        np.testing.assert_array_equal(x.genome, y.genome)


def test_failed_and_nan_results_never_become_best(name):
    strategy = make(name)
    told = 0
    while told < 20:
        for i, cand in enumerate(strategy.ask(4)):
            if told % 3 == 0:
                ev = Evaluation.failure(cand.id, "boom")
            elif told % 3 == 1:
                ev = Evaluation(cand.id, "ok", math.nan)
            else:
                ev = scored(cand)
            strategy.tell([ev])
            told += 1
    best = strategy.best()
    assert best is not None and math.isfinite(best[2])


def test_telling_an_unknown_candidate_is_an_error(name):
    strategy = make(name)
    strategy.ask(1)
    with pytest.raises(KeyError):
        strategy.tell([Evaluation("pop:999", "ok", 1.0)])


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
