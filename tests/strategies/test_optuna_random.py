"""Behaviour of random search and the Optuna-backed strategies beyond the conformance suite."""

from __future__ import annotations

import numpy as np
import pytest
from optuna.trial import TrialState

from evomerge.records import Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies import make_strategy

DIM = 4
OPTUNA = ("tpe", "optuna_cmaes", "nsga2")


def sphere(genome: np.ndarray, centre: float = 0.3) -> float:
    return -float(np.sum((genome - centre) ** 2))


def genomes(strategy, n: int) -> np.ndarray:
    return np.array([c.genome for c in strategy.ask(n)])


def test_random_search_is_seeded_and_uniform():
    spec = SearchSpec.unit_cube(DIM)
    options = {"include_x0": False}
    a, b, c = (make_strategy("random", "pop", spec, seed, options) for seed in (1, 1, 2))
    xa, xb, xc = genomes(a, 4000), genomes(b, 4000), genomes(c, 4000)
    np.testing.assert_array_equal(xa, xb)
    assert not np.any(np.all(xa == xc, axis=1))
    assert np.all((xa >= 0) & (xa < 1))
    counts = np.stack([np.histogram(xa[:, d], bins=10, range=(0, 1))[0] for d in range(DIM)])
    assert np.all(np.abs(counts - 400) < 80)  # about 4 standard deviations of a bin count


def test_random_search_evaluates_x0_then_the_clipped_seeds_first():
    x0 = np.full(DIM, 0.25)
    seeds = [np.full(DIM, 0.9), np.array([-1.0, 0.5, 2.0, 0.1])]
    spec = SearchSpec.unit_cube(DIM, x0, seeds)
    first = genomes(make_strategy("random", "pop", spec, 0, {}), 4)
    np.testing.assert_array_equal(first[0], x0)
    np.testing.assert_array_equal(first[1], seeds[0])
    np.testing.assert_array_equal(first[2], [0.0, 0.5, 1.0, 0.1])
    without_x0 = genomes(make_strategy("random", "pop", spec, 0, {"include_x0": False}), 1)
    np.testing.assert_array_equal(without_x0[0], seeds[0])


def test_random_search_resumes_mid_seed_queue():
    spec = SearchSpec.unit_cube(DIM, seeds=[np.full(DIM, 0.1), np.full(DIM, 0.2)])
    a = make_strategy("random", "pop", spec, 5, {})
    a.ask(2)  # x0 and the first seed
    b = make_strategy("random", "pop", spec, 5, {})
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(genomes(a, 3), genomes(b, 3))


@pytest.mark.parametrize("name", OPTUNA)
def test_optuna_searches_start_at_x0(name):
    x0 = np.array([0.1, 0.7, 1.4, 0.2])  # out of the cube: enqueued clipped
    strategy = make_strategy(name, "pop", SearchSpec.unit_cube(DIM, x0), 0, {})
    first = strategy.ask(1)[0]
    np.testing.assert_array_equal(first.genome, [0.1, 0.7, 1.0, 0.2])
    assert strategy.study.trials[0].params == {"x0": 0.1, "x1": 0.7, "x2": 1.0, "x3": 0.2}


def test_optuna_cmaes_centres_its_first_generation_on_x0():
    x0 = np.full(DIM, 0.3)  # off the centre the sampler would default to, ~2 σ0 from the bound
    strategy = make_strategy("optuna_cmaes", "pop", SearchSpec.unit_cube(DIM, x0), 0, {})
    start = strategy.ask(1)[0]
    strategy.tell([Evaluation(start.id, "ok", sphere(start.genome))])  # the one startup trial
    generation = genomes(strategy, 200)  # all drawn from the untold first generation
    assert np.all(np.abs(generation.mean(axis=0) - 0.3) < 0.05)
    assert np.all(np.abs(generation.std(axis=0) - 1 / 6) < 0.05)  # σ0 = 1/6, a little less by the bound


def test_nsga2_tells_every_objective_and_keeps_a_non_dominated_front():
    spec = SearchSpec.unit_cube(DIM)
    strategy = make_strategy("nsga2", "pop", spec, 0, {"objectives": ["fitness", "near_0.8"], "population_size": 8})
    for _ in range(10):
        for cand in strategy.ask(8):
            metrics = {"near_0.8": sphere(cand.genome, 0.8)}
            strategy.tell([Evaluation(cand.id, "ok", sphere(cand.genome), metrics=metrics)])
    study = strategy.study
    trials = study.get_trials(states=[TrialState.COMPLETE])
    assert len(trials) == 80
    for t in trials:
        x = np.array([t.params[f"x{i}"] for i in range(DIM)])
        assert t.values == pytest.approx([sphere(x), sphere(x, 0.8)])
    front = study.best_trials
    values = np.array([t.values for t in front])
    for v in values:  # no member of the front is dominated by another
        assert not np.any(np.all(values >= v, axis=1) & np.any(values > v, axis=1))
    by_fitness = max(trials, key=lambda t: t.values[0])
    assert by_fitness.number in {t.number for t in front}
    assert strategy.best()[2] == pytest.approx(by_fitness.values[0])  # best() ranks by fitness alone
    assert len(front) > 1  # the objectives conflict: more than one trade-off survives


def test_nsga2_fails_a_trial_without_its_objective_metric():
    strategy = make_strategy("nsga2", "pop", SearchSpec.unit_cube(DIM), 0, {"objectives": ["fitness", "size"]})
    a, b = strategy.ask(2)
    strategy.tell([Evaluation(a.id, "ok", -1.0, metrics={"size": 3.0}), Evaluation(b.id, "ok", -0.5)])
    assert [t.state for t in strategy.study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert strategy.study.trials[0].values == [-1.0, 3.0]


@pytest.mark.parametrize("name", OPTUNA)
def test_failed_results_do_not_break_the_sampler(name):
    options = {"population_size": 6} if name == "nsga2" else {}
    strategy = make_strategy(name, "pop", SearchSpec.unit_cube(DIM), 0, options)
    for cand in strategy.ask(20):  # every early result fails, through the startup trials
        strategy.tell([Evaluation.failure(cand.id, "merge crashed")])
    assert strategy.best() is None
    for _ in range(15):
        batch = strategy.ask(4)
        assert len(batch) == 4
        for i, cand in enumerate(batch):
            ok = i % 2 == 0
            ev = Evaluation(cand.id, "ok", sphere(cand.genome)) if ok else Evaluation(cand.id, "ok", float("nan"))
            strategy.tell([ev])
    states = [t.state for t in strategy.study.trials]
    assert states.count(TrialState.FAIL) == 20 + 30 and states.count(TrialState.COMPLETE) == 30
    assert strategy.best()[2] > sphere(np.full(DIM, 0.5))


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("random", {"bogus": 1}, "options.bogus: unknown option"),
        ("tpe", {"n_startup_trials": -1}, "options.n_startup_trials"),
        ("tpe", {"sigma0": 0.1}, "options.sigma0: unknown option"),
        ("optuna_cmaes", {"sigma0": 0}, "options.sigma0"),
        ("optuna_cmaes", {"popsize": 1}, "options.popsize"),
        ("nsga2", {"objectives": []}, "options.objectives"),
        ("nsga2", {"objectives": ["fitness", "fitness"]}, "objectives must be distinct"),
        ("nsga2", {"population_size": 1}, "options.population_size"),
        ("nsga2", {"mutation_prob": 1.5}, "options.mutation_prob"),
    ],
)
def test_bad_options_are_value_errors(name, options, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        make_strategy(name, "pop", SearchSpec.unit_cube(DIM), 0, options)


@pytest.mark.parametrize("name", ("random", *OPTUNA))
def test_weight_spaces_are_refused(name):
    with pytest.raises(ValueError, match="unbounded"):
        make_strategy(name, "pop", SearchSpec.weights([np.array([-3.0, 2.0])]), 0, {})
