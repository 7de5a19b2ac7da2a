"""AdaMerging: the differentiable merge, its entropy gradient, and descent on a tiny case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.plan import RunPlan
from evomerge.records import Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies import make_strategy


def test_adam_steps_follow_the_loss_gradient():
    spec = SearchSpec.unit_cube(2, np.array([0.5, 0.5]))
    strategy = make_strategy("adamerging", "pop", spec, 0, {"lr": 0.1})
    first = strategy.ask(3)
    assert len(first) == 1 and strategy.ask(1) == []  # one step at a time
    strategy.tell([Evaluation(first[0].id, "ok", 0.0, metrics={"loss_gradient": [1.0, -2.0]})])
    np.testing.assert_allclose(strategy.ask(1)[0].genome, [0.4, 0.6])  # Adam's first step: lr·sign(g)


def test_adamerging_lowers_the_entropy_on_digit_experts(digits_config):
    from evomerge.config import load_config
    from evomerge.workers.whitebox import WhiteBoxWorker

    path = digits_config(
        merge={"method": "task_arithmetic", "granularity": "per_layer_group", "search": ["weight"],
               "fixed": {"lambda": 1.0}, "init": {"weight": 0.3}},
        populations=[{"name": "ada", "strategy": "adamerging", "options": {"lr": 0.1}}],
    )
    worker = WhiteBoxWorker(RunPlan.from_config(load_config(path)))
    strategy = make_strategy("adamerging", "ada", worker.space.search_spec(), 0, {"lr": 0.1})
    entropies = []
    for _ in range(8):
        cand = strategy.ask(1)[0]
        evaluation = worker.evaluate(cand)
        assert evaluation.status == "ok" and len(evaluation.metrics["loss_gradient"]) == worker.space.dim
        entropies.append(evaluation.metrics["loss"])
        strategy.tell([evaluation])
    assert entropies[-1] < 0.8 * entropies[0]


def test_a_bfloat16_classifier_gets_its_entropy_gradient(digits_config, digit_models):
    from evomerge.config import load_config
    from evomerge.workers.whitebox import WhiteBoxWorker

    models = {"base": str(digit_models["base"]), "experts": [str(digit_models["low"]), str(digit_models["high"])],
              "device": "cpu", "dtype": "bfloat16"}
    path = digits_config(models=models, populations=[{"name": "ada", "strategy": "adamerging"}])
    worker = WhiteBoxWorker(RunPlan.from_config(load_config(path)))
    result = worker.extra_metrics.gradient(np.full(worker.space.dim, 0.4))
    assert np.isfinite(result["loss"]) and result["loss"] > 0
    assert len(result["loss_gradient"]) == worker.space.dim and np.isfinite(result["loss_gradient"]).all()


def test_the_gradient_matches_finite_differences(digits_config):
    from evomerge.config import load_config
    from evomerge.workers.whitebox import WhiteBoxWorker

    path = digits_config(populations=[{"name": "ada", "strategy": "adamerging"}])
    worker = WhiteBoxWorker(RunPlan.from_config(load_config(path)))
    gradient = worker.extra_metrics.gradient
    genome = np.full(worker.space.dim, 0.4)
    analytic = np.array(gradient(genome)["loss_gradient"])
    for i in range(worker.space.dim):
        step = np.zeros_like(genome)
        step[i] = 1e-3
        up = float(gradient.entropy(torch.tensor(genome + step)))
        down = float(gradient.entropy(torch.tensor(genome - step)))
        assert analytic[i] == pytest.approx((up - down) / 2e-3, rel=2e-2, abs=1e-4)


def test_config_refuses_adamerging_on_a_method_without_gradients(digits_config):
    from evomerge.config import load_config
    from evomerge.errors import ConfigError

    path = digits_config(
        merge={"method": "ties", "granularity": "per_model"},
        populations=[{"name": "ada", "strategy": "adamerging"}],
    )
    with pytest.raises(ConfigError, match="populations.0.strategy: adamerging learns linear or task_arithmetic"):
        RunPlan.from_config(load_config(path))
