"""The run plan: declarations checked once, one codec per population, budgets as data."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from evomerge.budget import Budget, BudgetState
from evomerge.config import BudgetConfig, config_from_dict, load_config
from evomerge.errors import ConfigError
from evomerge.plan import RunPlan
from evomerge.space.codec import MergeCodec, SeedRecipeCodec
from evomerge.space.merge_space import Recipe
from evomerge.space.seed_recipes import PiecewiseRecipe, SeedRecipe

LAYOUT = {"layers.0.weight": (3, 2), "layers.0.bias": (3,), "layers.1.weight": (2, 3)}


def test_one_codec_per_population_decodes_what_its_strategy_asks(digits_config):
    populations = [
        {"name": "cma", "strategy": "cmaes"},
        {"name": "m2n2", "strategy": "m2n2", "options": {"archive": "seed_recipes", "split_grid": "rows"}},
    ]
    plan = RunPlan.from_config(load_config(digits_config(populations=populations)))
    space = plan.space(list(LAYOUT))
    codecs = plan.codecs(space, LAYOUT)
    assert isinstance(codecs["cma"], MergeCodec) and isinstance(codecs["m2n2"], SeedRecipeCodec)
    assert [p.cache_scope for p in plan.populations] == ["space", "seed_recipes:rows"]
    assert isinstance(codecs["cma"].decode(space.x0()), Recipe)
    genome = SeedRecipe(np.array([0, 2, 6]), np.array([[1.0, 0.0], [0.25, 0.75]])).encode()
    pieces = codecs["m2n2"].decode(genome)
    assert isinstance(pieces, PiecewiseRecipe)
    assert pieces.edges.tolist() == [0, 4, 15]  # blocks: rows of 2, the bias whole, rows of 3
    again = pickle.loads(pickle.dumps(codecs))  # plain data: codecs travel to workers
    np.testing.assert_array_equal(again["m2n2"].decode(genome).edges, pieces.edges)
    assert again["cma"].decode(space.x0()).method is plan.method


def test_strategy_requirements_are_checked_before_anything_loads(digits_config):
    path = digits_config(populations=[{"name": "evo", "strategy": "evo_merging"}])
    with pytest.raises(ConfigError, match="populations.0.strategy: evo_merging searches the genes alpha and beta"):
        RunPlan.from_config(load_config(path), str(path))


def test_budget_stop_says_which_limits_are_reached():
    budget = Budget.from_config(BudgetConfig(max_time=10, target_fitness=0.9, patience=3, requests=100))
    state = BudgetState(elapsed=11.0, now=0.0, evaluations=5, best=0.95, best_at=4, usage={"requests": 100})
    reasons = budget.stop(state)
    assert reasons == {"max_time": 10.0, "target_fitness": 0.9, "requests": 100}
    assert budget.describe(reasons, state) == "max_time reached"
    assert budget.stop(BudgetState(1.0, 0.0, 5, 0.5, 4, {"requests": 1})) == {}


def test_black_box_runs_cannot_freeze_towers(tmp_path):
    data = {
        "models": {"base": "tiny-base", "experts": ["a", "b"]},
        "merge": {"method": "lora_compose", "granularity": "per_model", "frozen": ["vision_tower"]},
        "fitness": {"name": "negative_cross_entropy", "data": {"source": "train.jsonl"}},
        "populations": [{"name": "p", "strategy": "random"}],
        "budget": {"evaluations": 2},
        "api": {"level": "merge_service", "base_url": "http://127.0.0.1:1"},
    }
    with pytest.raises(ConfigError, match="merge.frozen: black-box runs merge no weights"):
        RunPlan.from_config(config_from_dict(data, "bb.yaml", tmp_path), "bb.yaml")
