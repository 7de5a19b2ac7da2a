"""Library-backed strategies (pycma, Optuna) checkpoint as a replayable log, not as the library's object."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge import plaindata
from evomerge.records import Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies import make_strategy

DIM = 40


def run(name: str, seed: int, n: int):
    strategy = make_strategy(name, "pop", SearchSpec.unit_cube(DIM), seed, {})
    told = 0
    while told < n:
        for cand in strategy.ask(4):
            strategy.tell([Evaluation(cand.id, "ok", -float(np.sum((cand.genome - 0.2) ** 2)))])
            told += 1
    return strategy


@pytest.mark.parametrize("name", ["cmaes", "tpe", "optuna_cmaes", "nsga2"])
def test_a_checkpoint_replayed_on_another_seed_is_refused_or_differs(name):
    """The log is replayed on a fresh library object built from the strategy's own seed; a state
    loaded into a differently seeded strategy cannot silently continue as the saved one."""
    saved = run(name, 1, 24)
    state = plaindata.loads(plaindata.dumps(saved.state_dict()))
    other = make_strategy(name, "pop", SearchSpec.unit_cube(DIM), 2, {})
    try:
        other.load_state_dict(state)
    except ValueError as err:
        assert "recorded" in str(err)
        return
    a, b = saved.ask(2), other.ask(2)
    assert any(not np.array_equal(x.genome, y.genome) for x, y in zip(a, b))


def test_cmaes_checkpoint_grows_with_evaluations_not_with_dimension():
    """The ES log keeps losses and a digest per generation, never the members themselves."""
    small = len(plaindata.dumps(run("cmaes", 0, 200).state_dict()))
    many_dims = make_strategy("cmaes", "pop", SearchSpec.unit_cube(2000), 0, {})
    told = 0
    while told < 200:
        for cand in many_dims.ask(8):
            many_dims.tell([Evaluation(cand.id, "ok", float(cand.genome[0]))])
            told += 1
    outstanding = sum(c.genome.nbytes for c in many_dims.outstanding())
    big = len(plaindata.dumps(many_dims.state_dict())) - outstanding
    assert big < 4 * small + 20_000, (small, big)
