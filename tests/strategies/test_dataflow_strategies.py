"""Every strategy that searches genomes searches the data-flow space through the same ask/tell;
those that need merge parameters or the experts' weights are refused by the plan."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.config import RunConfig
from evomerge.errors import ConfigError
from evomerge.plan import RunPlan
from evomerge.records import Evaluation
from evomerge.space.paths import PathError, PathSpace
from evomerge.strategies import make_strategy

SPACE = PathSpace((3, 3), repeats=2, max_layers=8)


def path_scores(genome: np.ndarray) -> np.ndarray | None:
    """Per-example scores of a path (None: it does not decode): long paths of source 1 score best."""
    try:
        path = SPACE.decode(genome)
    except PathError:
        return None
    return np.array([sum(s for s, _ in path.layers) / 8, float(len(path) == 5), -abs(np.log(path.scales).sum())])


@pytest.mark.parametrize("name", ["cmaes", "m2n2", "ga", "random", "tpe", "optuna_cmaes"])
def test_genome_strategies_search_paths(name):
    options = {"archive_size": 4} if name in ("m2n2", "ga") else {}
    strategy = make_strategy(name, "p", SPACE.search_spec(), 0, options)
    told, decoded = 0, set()
    while told < 16:
        batch = strategy.ask(4)
        assert batch
        evaluations = []
        for cand in batch:
            assert cand.genome.shape == (SPACE.dim,) and np.all((cand.genome >= 0) & (cand.genome <= 1))
            scores = path_scores(cand.genome)
            if scores is None:
                evaluations.append(Evaluation.failure(cand.id, "PathError", "w", 0.0, 0.0, "p"))
            else:
                decoded.add(SPACE.decode(cand.genome).layers)
                evaluations.append(Evaluation(cand.id, "ok", float(scores.mean()), per_example=scores))
        strategy.tell(evaluations[::-1])
        told += len(batch)
    assert len(decoded) > 1


def _config(strategy: str, options: dict) -> RunConfig:
    return RunConfig.model_validate({
        "executor": "inline",
        "models": {"experts": ["/nonexistent/a", "/nonexistent/b"]},
        "merge": {"space": "dataflow"},
        "populations": [{"name": "p", "strategy": strategy, "options": options}],
        "fitness": {"name": "exact_match", "data": {"source": "data.jsonl"}},
        "budget": {"evaluations": 4},
    })


@pytest.mark.parametrize(
    "strategy, options",
    [("evo_merging", {}), ("adamerging", {}), ("m2n2", {"archive": "seed_recipes"})],
)
def test_strategies_that_need_merge_parameters_or_weights_are_refused(strategy, options):
    with pytest.raises(ConfigError, match=f"populations.0.strategy: {strategy} with these options searches merge parameters"):
        RunPlan.from_config(_config(strategy, options))
