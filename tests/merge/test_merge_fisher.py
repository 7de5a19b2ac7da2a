"""Fisher-weighted averaging: the formula on small tensors, and the worker's Fisher estimate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.merge import MERGE_METHODS
from evomerge.merge.resident import ResidentTensor
from evomerge.space.merge_space import Space


def test_fisher_by_hand(make_ctx):
    experts = torch.tensor([[1.0, 2.0, 5.0], [3.0, 6.0, 7.0]])
    fisher = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 2.0]])
    tensor = ResidentTensor("w", experts.clone())
    out = torch.empty(3)
    ctx = make_ctx(tensor)
    ctx.fisher = fisher
    MERGE_METHODS["fisher"].kernel(out, tensor, {"weight": [1.0, 0.5]}, {}, ctx)
    # (λ_1 F_1 θ_1 + λ_2 F_2 θ_2) / (λ_1 F_1 + λ_2 F_2), element by element
    expected = torch.tensor([(1 + 0.5 * 9) / (1 + 1.5), (0 + 0.5 * 6) / (0 + 0.5), (10 + 7) / (2 + 1)])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("with_base", [False, True])
def test_equal_fishers_give_the_plain_average(make_setup, with_base):
    setup = make_setup("fisher", 3, with_base)
    weights = [0.2, 0.5, 0.9]
    fisher_space = Space.build(setup.method, setup.names, 3)
    linear_space = Space.build(MERGE_METHODS["linear"], setup.names, 3)
    merged = setup.targets()
    materializer = setup.materializer(merged)
    materializer.set_fishers({n: torch.full((3, *s), 0.7) for n, s in setup.layout.items()}, floor=1e-8)
    materializer.apply(fisher_space.decode(fisher_space.encode({"weight": weights})))
    average = setup.targets()
    setup.materializer(average).apply(linear_space.decode(linear_space.encode({"weight": weights})))
    for name in merged:
        torch.testing.assert_close(merged[name], average[name], rtol=1e-5, atol=1e-6)


def test_worker_estimate_is_the_mean_squared_per_example_gradient():
    from evomerge.workers.fisher_estimate import diagonal_fisher

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    inputs, labels = torch.randn(40, 4), torch.randint(0, 3, (40,))
    estimate = diagonal_fisher(model, {"inputs": inputs, "labels": labels})
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in zip(inputs, labels):  # one backward pass per example
        model.zero_grad()
        torch.log_softmax(model(x.unsqueeze(0)), -1)[0, y].backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.square() / len(labels)
    for name in expected:
        torch.testing.assert_close(estimate[name], expected[name], rtol=1e-4, atol=1e-7)


def test_a_worker_merges_with_the_experts_fishers(tmp_path, digits_config, digit_models):
    from evomerge.config import load_config
    from evomerge.workers.whitebox import WhiteBoxWorker

    own = [{"source": "sklearn:digits", "classes": [0, 1, 2, 3, 4], "limit": 64},
           {"source": "sklearn:digits", "classes": [5, 6, 7, 8, 9], "limit": 64}]
    path = digits_config(
        models={
            "base": str(digit_models["base"]),
            "experts": [{"path": str(digit_models[k]), "data": d} for k, d in zip(("low", "high"), own)],
            "device": "cpu",
        },
        merge={"method": "fisher", "granularity": "per_model"},
    )
    worker = WhiteBoxWorker(RunPlan.from_config(load_config(path)))
    fishers = worker.models.materializer.fishers
    assert fishers is not None and set(fishers) == set(worker.models.tensor_names)
    first = worker.models.tensor_names[0]
    assert fishers[first].shape[0] == 2 and bool((fishers[first] > 0).all())
    evaluation = worker.evaluate(Candidate("cma:0", "cma", worker.space.x0()))
    assert evaluation.status == "ok" and 0.0 <= evaluation.fitness <= 1.0
    assert np.isfinite(evaluation.per_example).all()


def test_config_asks_for_each_experts_data(digits_config, digit_models):
    from evomerge.config import load_config
    from evomerge.errors import ConfigError

    path = digits_config(
        models={
            "base": str(digit_models["base"]),
            "experts": [{"path": str(digit_models["low"]), "data": {"source": "sklearn:digits"}}, str(digit_models["high"])],
            "device": "cpu",
        },
        merge={"method": "fisher"},
    )
    with pytest.raises(ConfigError, match="models.experts.1.data: merge method 'fisher' estimates each expert's"):
        RunPlan.from_config(load_config(path))
