"""Discrete genes (layer swapping's expert choice, consensus' k) in every registered strategy."""

from __future__ import annotations


import numpy as np
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution

from evomerge import plaindata
from evomerge.records import Evaluation
from evomerge.space.genes import GeneRange, SearchSpec
from evomerge.strategies import STRATEGIES, make_strategy

# evo_merging needs lora_compose's alpha and beta; two discrete genes of 3 levels follow them
GENES = (
    GeneRange("alpha", 0, 2, 0.0, 1.0),
    GeneRange("beta", 2, 4, -1.5, 1.5),
    GeneRange("expert", 4, 6, 0.0, 2.0, levels=3),
)
SPEC = SearchSpec(6, np.array([0.5, 0.5, 0.5, 0.5, 0.5, 1 / 6]), GENES)
TARGET = np.array([2, 0])  # the levels the objective rewards


def fitness(genome: np.ndarray) -> float:
    levels = GENES[2].level(genome)
    return float(np.sum(levels == TARGET)) - float(np.sum((genome[:4] - 0.3) ** 2))


def loss_gradient(genome: np.ndarray) -> list[float]:
    """What gradient strategies receive: d(−fitness)/d(genome) (zero for the discrete genes)."""
    grad = np.zeros_like(genome)
    grad[:4] = 2 * (genome[:4] - 0.3)
    return grad.tolist()


def evaluation(cand) -> Evaluation:
    return Evaluation(cand.id, "ok", fitness(cand.genome), metrics={"loss_gradient": loss_gradient(cand.genome)})


def run(strategy, n: int, rng: np.random.Generator) -> list:
    seen = []
    while len(seen) < n:
        batch = strategy.ask(3)
        assert batch
        for cand in [batch[i] for i in rng.permutation(len(batch))]:
            strategy.tell([evaluation(cand)])
            seen.append(cand)
    return seen


@pytest.fixture(params=sorted(STRATEGIES))
def name(request):
    return request.param


def test_discrete_genes_are_handed_out_as_bin_centres(name):
    strategy = make_strategy(name, "pop", SPEC, 5, {})
    for cand in run(strategy, 25, np.random.default_rng(0)):
        centres = (GENES[2].level(cand.genome) + 0.5) / 3
        np.testing.assert_allclose(cand.genome[4:], centres, rtol=0, atol=1e-12)


def test_discrete_genes_round_trip_through_the_state(name):
    a = make_strategy(name, "pop", SPEC, 9, {})
    run(a, 10, np.random.default_rng(1))
    b = make_strategy(name, "pop", SPEC, 9, {})
    b.load_state_dict(plaindata.loads(plaindata.dumps(a.state_dict())))
    for cand in a.outstanding():
        for s in (a, b):
            s.tell([evaluation(cand)])
    for _ in range(3):
        ca, cb = a.ask(2), b.ask(2)
        assert [c.id for c in ca] == [c.id for c in cb]
        for x, y in zip(ca, cb):
            np.testing.assert_array_equal(x.genome, y.genome)
            a.tell([evaluation(x)])
            b.tell([evaluation(y)])


@pytest.mark.parametrize("strategy", ["cmaes", "m2n2", "ga", "random", "tpe", "optuna_cmaes", "nsga2"])
def test_finds_the_rewarded_levels(strategy):
    options = {"population_size": 10} if strategy == "nsga2" else {}
    s = make_strategy(strategy, "pop", SPEC, 3, options)
    run(s, 120, np.random.default_rng(2))
    best = s.best()
    assert best is not None and list(GENES[2].level(best[1])) == list(TARGET)


def test_optuna_asks_discrete_genes_natively():
    tpe = make_strategy("tpe", "pop", SPEC, 0, {})
    cma = make_strategy("optuna_cmaes", "pop", SPEC, 0, {})
    assert isinstance(tpe._distributions["x4"], CategoricalDistribution)
    assert isinstance(cma._distributions["x4"], IntDistribution)
    first = tpe.ask(1)[0]
    assert tpe.study.trials[0].params["x5"] == 0  # x0's 1/6 is level 0 …
    assert first.genome[5] == pytest.approx(1 / 6)  # … handed out as that level's centre
