"""Evo-Merging's two-stage CMA-ES on tiny, hand-checked cases (the shared contract is in test_strategies)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge import plaindata
from evomerge.records import Evaluation
from evomerge.merge import MERGE_METHODS
from evomerge.space.merge_space import Space
from evomerge.space.genes import GeneRange, SearchSpec
from evomerge.strategies import make_strategy

N = 3  # adapters
LORA_NAMES = ["layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"]
SMALL = {"popsize": 4, "stage1_budget": 10, "stage2_budget": 13}  # 2 and 3 whole generations


def lora_spec(**space_kw) -> SearchSpec:
    return Space.build(MERGE_METHODS["lora_compose"], LORA_NAMES, N, **space_kw).search_spec()


def make(options: dict | None = None, seed: int = 5):
    return make_strategy("evo_merging", "pop", lora_spec(), seed, SMALL if options is None else options)


def alpha_of(s, genome: np.ndarray) -> np.ndarray:
    return s.alpha.real(genome)


def beta_of(s, genome: np.ndarray) -> np.ndarray:
    return s.beta.real(genome)


def prefers_big_alpha(genome: np.ndarray) -> float:
    """Raw fitness rising with α and falling as β leaves 0.2: a penalty of λ = 10 reverses the α order."""
    return float(np.mean(genome[:N])) - float(np.sum((genome[N:] - 0.2) ** 2))


def run(s, n_evals: int, fitness=prefers_big_alpha, rng: np.random.Generator | None = None) -> list:
    """Ask 3 at a time, tell in shuffled order, until n_evals were told; returns (candidate, fitness)."""
    rng = rng or np.random.default_rng(0)
    told = []
    while len(told) < n_evals:
        batch = s.ask(min(3, n_evals - len(told)))
        assert batch
        for i in rng.permutation(len(batch)):
            cand = batch[i]
            f = fitness(cand.genome)
            s.tell([Evaluation(cand.id, "ok", f)])
            told.append((cand, f))
    return told


def test_defaults_are_the_authors():
    s = make({})
    es = s._run.es
    assert es.popsize == 20 and es.opts["maxiter"] == 20  # 400 // 20
    assert es.sigma0 == pytest.approx(0.05)
    o = s.options
    assert (o.stage1_budget, o.stage2_budget, o.stage1_l1, o.stage2_l1, o.stage2_sigma) == (400, 800, 0.05, 0.05, 0.05)


def test_stage1_moves_only_alpha_from_one_and_holds_beta_at_one_over_n():
    s = make()
    generation = s.ask(100)
    assert len(generation) == 4 and s.ask(1) == []  # generational
    np.testing.assert_allclose(s._run.es.x0, np.ones(N))  # α = 1: no pruning
    for cand in generation:
        np.testing.assert_allclose(beta_of(s, cand.genome), np.full(N, 1 / N))
        alpha = alpha_of(s, cand.genome)
        assert np.all((alpha >= 0) & (alpha <= 1)) and not np.allclose(alpha, 1.0)


def test_penalty_is_lambda_times_mean_abs_of_real_values():
    s = make({**SMALL, "stage1_l1": 0.1, "stage2_l1": 0.2})
    genome = np.array([1.0, 0.5, 0.0, 0.0, 0.5, 1.0])  # α = (1, .5, 0); β = (-1.5, 0, 1.5)
    assert s._objective(genome, -2.0) == pytest.approx(2.0 + 0.1 * 0.5)
    assert s._objective(genome, -math.inf) == math.inf
    s._stage = 2
    assert s._objective(genome, -2.0) == pytest.approx(2.0 + 0.2 * 1.0)  # mean|β| on [-1.5, 1.5], not 0.5


def test_pycma_is_told_the_penalised_losses_and_failures_as_worst_plus_one():
    s = make({**SMALL, "stage1_l1": 0.1})
    generation = s.ask(4)
    fitness = [-1.0, -2.0, None, -0.5]
    expected = []
    for cand, f in zip(generation, fitness):
        if f is None:
            s.tell([Evaluation.failure(cand.id, "boom")])
        else:
            s.tell([Evaluation(cand.id, "ok", f)])
            expected.append(-f + 0.1 * float(np.mean(alpha_of(s, cand.genome))))
    told = sorted(s._run.es.fit.fit)
    np.testing.assert_allclose(told, sorted(expected) + [max(expected) + 1.0])
    assert s._stage1_best[0] == pytest.approx(min(expected))


def test_hand_over_when_stage1_budget_is_spent_with_alpha_at_the_penalised_best():
    s = make({**SMALL, "stage1_l1": 10.0})
    told = run(s, 7)
    assert s._stage == 1
    told += run(s, 1)  # 8 = 2 whole generations of 4: the budget of 10 rounded down
    assert s._stage == 2 and s.stop() == {}
    objective = [-f + 10.0 * np.mean(alpha_of(s, c.genome)) for c, f in told]
    by_objective = told[int(np.argmin(objective))][0].genome
    by_fitness = told[int(np.argmax([f for _, f in told]))][0].genome
    assert not np.array_equal(by_objective[:N], by_fitness[:N])  # the penalty decides, not raw fitness
    np.testing.assert_array_equal(s._base[:N], by_objective[:N])
    np.testing.assert_array_equal(s.best()[1], by_fitness)  # best() stays by raw fitness


def test_stage2_moves_only_beta_from_one_over_n_within_its_bounds():
    s = make()
    run(s, 8)
    alpha = s._base[:N].copy()
    es = s._run.es
    np.testing.assert_allclose(s.beta.low + np.asarray(es.x0) * 3.0, np.full(N, 1 / N))
    assert es.sigma0 == pytest.approx(0.05 / 3.0)  # 0.05 in β units, over a range of 3
    for cand, _ in run(s, 12):
        np.testing.assert_array_equal(cand.genome[:N], alpha)
        beta = beta_of(s, cand.genome)
        assert np.all((beta >= -1.5) & (beta <= 1.5))
        assert not np.allclose(beta, 1 / N)


def test_stops_after_both_budgets_in_whole_generations():
    s = make()
    run(s, 8 + 12)  # stage 2's 13 rounds down to 3 generations of 4
    assert s.ask(1) == []
    assert s.stop() == {"stage1 maxiter": 2, "stage2 maxiter": 3}
    assert s.n_told == 20


def test_other_searched_genes_stay_at_x0_and_a_configured_init_is_the_start():
    spec = Space.build(MERGE_METHODS["lora_compose"], LORA_NAMES, N, init={"beta": 0.5}).search_spec()
    other = GeneRange("x", spec.dim, spec.dim + 1, 0.0, 1.0)
    extra = SearchSpec(spec.dim + 1, np.append(spec.x0, 0.25), (*spec.genes, other))
    s = make_strategy("evo_merging", "pop", extra, 0, SMALL)
    told = run(s, 8)
    np.testing.assert_allclose(s.beta.low + np.asarray(s._run.es.x0) * 3.0, np.full(N, 0.5))
    told += run(s, 12)
    assert all(cand.genome[-1] == 0.25 for cand, _ in told)


def test_needs_the_lora_compose_genes():
    with pytest.raises(ValueError, match="alpha and beta.*lora_compose"):
        make_strategy("evo_merging", "pop", SearchSpec.unit_cube(4), 0, {})
    only_alpha = lora_spec(search=["alpha"])
    with pytest.raises(ValueError, match="this space has: alpha"):
        make_strategy("evo_merging", "pop", only_alpha, 0, {})


def test_a_budget_must_hold_one_generation():
    with pytest.raises(ValueError, match="stage2_budget must allow at least one generation"):
        make({"popsize": 20, "stage2_budget": 19})


@pytest.mark.parametrize("stop_at", [5, 8, 14], ids=["mid-stage1", "handover", "mid-stage2"])
def test_state_round_trip_gives_identical_next_asks(stop_at):
    a = make()
    run(a, stop_at)
    pending = a.ask(2)  # leave candidates outstanding across the checkpoint
    b = make()
    b.load_state_dict(plaindata.loads(plaindata.dumps(a.state_dict())))
    assert [c.id for c in b.outstanding()] == [c.id for c in pending]
    for cand in pending:
        for s in (a, b):
            s.tell([Evaluation(cand.id, "ok", prefers_big_alpha(cand.genome))])
    while True:
        ca, cb = a.ask(3), b.ask(3)
        assert [c.id for c in ca] == [c.id for c in cb]
        for x, y in zip(ca, cb):
            np.testing.assert_array_equal(x.genome, y.genome)
            a.tell([Evaluation(x.id, "ok", prefers_big_alpha(x.genome))])
            b.tell([Evaluation(y.id, "ok", prefers_big_alpha(y.genome))])
        if not ca:
            break
    assert a.stop() == b.stop() != {} and a.n_told == b.n_told == 20
