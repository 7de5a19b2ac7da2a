"""MAP: the quadratic surrogate, the Pareto front on it, and Pareto fronts of runs."""

from __future__ import annotations

import numpy as np

from evomerge.records import Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies import make_strategy
from evomerge.strategies.map import fit_quadratic, latin_hypercube, quadratic_features
from evomerge.strategies.pareto import non_dominated, pareto_front

A, B = np.array([0.2, 0.3, 0.7]), np.array([0.8, 0.6, 0.2])


def test_surrogate_recovers_a_known_quadratic():
    rng = np.random.default_rng(0)
    hessian = np.array([[-2.0, 0.5, 0.0], [0.5, -1.0, 0.3], [0.0, 0.3, -3.0]])
    linear, constant = np.array([0.4, -0.2, 1.0]), 0.7

    def f(x):
        return 0.5 * np.einsum("ni,ij,nj->n", x, hessian, x) + x @ linear + constant

    x = latin_hypercube(rng, 25, 3)
    coefficients = fit_quadratic(x, f(x)[:, None], full=True)
    fresh = rng.random((50, 3))
    np.testing.assert_allclose(quadratic_features(fresh, True) @ coefficients[:, 0], f(fresh), atol=1e-4)


def test_latin_hypercube_fills_every_stratum():
    x = latin_hypercube(np.random.default_rng(1), 7, 4)
    for column in x.T:
        assert sorted((column * 7).astype(int)) == list(range(7))


def test_non_dominated():
    values = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [1.0, 0.0]])
    assert non_dominated(values).tolist() == [0, 1, 2]  # [0.4, 0.4] is dominated, the copy of row 0 dropped


def _two_tasks(cand) -> Evaluation:
    g = cand.genome
    task_a, task_b = -float(np.sum((g - A) ** 2)), -float(np.sum((g - B) ** 2))
    return Evaluation(cand.id, "ok", (task_a + task_b) / 2, metrics={"task_a": task_a, "task_b": task_b})


def _distance_to_segment(x: np.ndarray) -> float:
    t = np.clip(np.dot(x - A, B - A) / np.dot(B - A, B - A), 0.0, 1.0)
    return float(np.linalg.norm(x - (A + t * (B - A))))


def test_front_rounds_lie_on_the_true_pareto_set():
    # two quadratic tasks: the Pareto set is the segment between their optima
    spec = SearchSpec.unit_cube(3, np.full(3, 0.5))
    strategy = make_strategy("map", "pop", spec, 0, {"objectives": ["task_a", "task_b"], "front_size": 6})
    design = strategy.ask(100)
    assert len(design) == 20  # 2 × (1 + 3 + 6) coefficients, then it waits for the results
    assert strategy.ask(1) == []
    np.testing.assert_array_equal(design[0].genome, np.full(3, 0.5))  # x0 first
    for cand in design:
        strategy.tell([_two_tasks(cand)])
    front = strategy.ask(100)
    assert len(front) == 6
    assert max(_distance_to_segment(c.genome) for c in front) < 0.05
    values = np.array([[_two_tasks(c).metrics["task_a"], _two_tasks(c).metrics["task_b"]] for c in front])
    assert len(non_dominated(values)) == 6  # a spread of trade-offs, none dominating another


def test_one_objective_converges_to_the_maximiser():
    spec = SearchSpec.unit_cube(3, np.full(3, 0.5))
    strategy = make_strategy("map", "pop", spec, 1, {})
    for _ in range(3):
        for cand in strategy.ask(100):
            strategy.tell([Evaluation(cand.id, "ok", -float(np.sum((cand.genome - A) ** 2)))])
    assert np.linalg.norm(strategy.best()[1] - A) < 0.02


def test_pareto_front_of_recorded_evaluations():
    rows = [
        Evaluation("p:0", "ok", 0.5, metrics={"a": 1.0, "b": 0.0}),
        Evaluation("p:1", "ok", 0.5, metrics={"a": 0.0, "b": 1.0}),
        Evaluation("p:2", "ok", 0.2, metrics={"a": 0.0, "b": 0.0}),
        Evaluation("p:3", "failed", float("nan"), metrics={"a": 9.0, "b": 9.0}),
    ]
    front = pareto_front(rows, ["a", "b"])
    assert front == [
        {"candidate_id": "p:0", "objectives": {"a": 1.0, "b": 0.0}},
        {"candidate_id": "p:1", "objectives": {"a": 0.0, "b": 1.0}},
    ]


def test_non_dominated_agrees_with_pairwise_dominance():
    rng = np.random.default_rng(3)
    for k in (1, 2, 3):
        values = np.round(rng.random((60, k)), 1)  # coarse values: many ties and duplicates
        dominated = [
            any(np.all(values[j] >= values[i]) and (np.any(values[j] > values[i]) or j < i) for j in range(60) if j != i)
            for i in range(60)
        ]
        assert non_dominated(values).tolist() == [i for i in range(60) if not dominated[i]]


def test_runs_report_the_pareto_front_of_per_task_objectives(tmp_path, digits_config, capsys):
    import json

    from evomerge.cli import main
    from evomerge.store import RunStore

    tasks = {
        "digits_low": {"source": "sklearn:digits", "classes": [0, 1, 2, 3, 4], "limit": 60},
        "digits_high": {"source": "sklearn:digits", "classes": [5, 6, 7, 8, 9], "limit": 60},
    }
    objectives = ["digits_low", "digits_high"]
    path = digits_config(
        fitness={"name": "classification_accuracy", "data": {"source": "sklearn:digits", "limit": 60}, "tasks": tasks},
        merge={"method": "task_arithmetic", "granularity": "per_model", "search": ["weight"], "fixed": {"lambda": 1.0}},
        populations=[
            {"name": "map", "strategy": "map", "options": {"objectives": objectives, "design_size": 6, "front_size": 3}},
            {"name": "nsga", "strategy": "nsga2", "options": {"objectives": objectives, "population_size": 4}},
        ],
        budget={"evaluations": 18},
    )
    run_dir = tmp_path / "run"
    assert main(["run", str(path)]) == 0
    store = RunStore(run_dir, readonly=True)
    rows = list(store.evaluations())
    assert all(set(objectives) <= set(r.metrics) for r in rows)  # every candidate scored per task
    summary = store.run_info()["summary"]
    store.close()
    for population in ("map", "nsga"):
        front = summary["populations"][population]["pareto_front"]
        mine = [r for r in rows if r.population == population]
        assert front and all(
            not any(
                r.metrics["digits_low"] >= p["objectives"]["digits_low"]
                and r.metrics["digits_high"] >= p["objectives"]["digits_high"]
                and r.metrics["digits_low"] + r.metrics["digits_high"] > sum(p["objectives"].values())
                for r in mine
            )
            for p in front
        )  # nobody in the population dominates a front member
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {p["name"]: p["pareto_front"] for p in status["populations"]} == {
        name: summary["populations"][name]["pareto_front"] for name in ("map", "nsga")
    }


def test_config_names_an_objective_that_nothing_measures(digits_config):
    import pytest

    from evomerge.config import load_config
    from evomerge.errors import ConfigError
    from evomerge.plan import RunPlan

    path = digits_config(populations=[{"name": "m", "strategy": "map", "options": {"objectives": ["fitness", "digits_lo"]}}])
    with pytest.raises(ConfigError, match="objectives: 'digits_lo' is neither 'fitness' nor a task of fitness.tasks"):
        RunPlan.from_config(load_config(path))
