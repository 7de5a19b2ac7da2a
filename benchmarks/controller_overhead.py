"""The controller's own cost and the asynchronous scheduler's worker utilisation.

(a) ``noop_evals_per_s`` / ``overhead_ms``: a run whose fitness does nothing, through the Ray
    pool with 2 workers — what the whole machinery (ask, store, Ray round trip, tell) costs.
(b) ``async_utilization`` / ``barrier_utilization``: the same Ray pool of 2 workers, evaluation
    times lognormal with a mean of 50 ms (heavy-tailed), measured in the same run: the
    steady-state controller keeps every worker busy, a generation-barrier loop (submit one batch
    per worker, wait for all) idles the workers that finish early. Utilisation = time workers
    spent evaluating / (workers × wall time).
(c) ``sim_controller_evals_per_s`` / ``store_mb_per_10k_evals``: the real controller and run
    store driving a simulated pool of 256 workers on a virtual clock (evaluation times as in (b),
    1,000 per-example scores each, continuous so they barely compress), so what is timed is the
    controller's own work per evaluation: ask, tell, two store writes, checkpoints.

    python benchmarks/controller_overhead.py --json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.records import Candidate, Evaluation
from evomerge.config import config_from_dict
from evomerge.controller import Controller, Population
from evomerge.executors import Executor, Job, RayExecutor
from evomerge.store import RunStore
from evomerge.space.genes import SearchSpec
from evomerge.strategies import make_strategy

MEAN_SECONDS = 0.05
SIGMA = 1.0  # lognormal shape: a long right tail (the slowest of 2 is often 3× the mean)


def lognormal_durations(rng: np.random.Generator, n: int) -> np.ndarray:
    mu = math.log(MEAN_SECONDS) - SIGMA**2 / 2  # so that the mean is MEAN_SECONDS
    return rng.lognormal(mu, SIGMA, n)


class SimulatedPool(Executor):
    """``workers`` slots on a virtual clock: a candidate finishes a drawn duration after it starts."""

    def __init__(self, workers: int, n_examples: int, seed: int = 0) -> None:
        self.capacity = workers
        self.n_examples = n_examples
        self.rng = np.random.default_rng(seed)
        self.clock = 0.0
        self.busy_time = 0.0
        self._running: list[tuple[float, int, Candidate, float]] = []
        self._count = 0

    def submit(self, candidate: Candidate) -> None:
        duration = float(lognormal_durations(self.rng, 1)[0])
        self.busy_time += duration
        heapq.heappush(self._running, (self.clock + duration, self._count, candidate, duration))
        self._count += 1

    def wait(self) -> list[Evaluation]:
        finish, _, cand, duration = heapq.heappop(self._running)
        self.clock = finish
        scores = self.rng.random(self.n_examples)
        return [
            Evaluation(cand.id, "ok", float(scores.mean()), scores, {}, "sim", finish - duration, duration, population=cand.population)
        ]

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def run_once(self, job: Job) -> Any:
        raise NotImplementedError("the simulated pool holds no models")


def new_store(root: Path, name: str, populations: list[Population]) -> RunStore:
    store = RunStore(root / name, create=True)
    store.init_run(name, "{}\n", {})
    for p in populations:
        store.add_population(p.name, "random", p.budget, {})
    return store


def random_population(name: str, budget: int, dim: int = 32, seed: int = 0) -> Population:
    strategy = make_strategy("random", name, SearchSpec.unit_cube(dim), seed, {})
    return Population(name, strategy, budget, 1.0)


def simulated_controller(root: Path, workers: int, evaluations: int) -> dict[str, float]:
    pops = [random_population(f"p{i}", evaluations // 2, seed=i) for i in range(2)]
    store = new_store(root, "sim", pops)
    pool = SimulatedPool(workers, n_examples=1000)
    start = time.perf_counter()
    Controller(store, pool, pops, checkpoint_every=10).run()
    seconds = time.perf_counter() - start
    store.close()
    size = sum(f.stat().st_size for f in (root / "sim").glob("run.db*"))
    return {
        "sim_workers": workers,
        "sim_controller_evals_per_s": evaluations / seconds,
        "store_mb_per_10k_evals": size / 2**20 * 10_000 / evaluations,
        "sim_utilization": pool.busy_time / (workers * pool.clock),
    }


class TimedPool(Executor):
    """Wraps a real pool to time what the controller spends blocked waiting for it."""

    def __init__(self, pool: Executor) -> None:
        self.pool = pool
        self.capacity = pool.capacity
        self.waiting = 0.0
        self.busy = 0.0

    def submit(self, candidate: Candidate) -> None:
        self.pool.submit(candidate)

    def wait(self) -> list[Evaluation]:
        tic = time.perf_counter()
        done = self.pool.wait()
        self.waiting += time.perf_counter() - tic
        self.busy += sum(ev.duration for ev in done)
        return done

    @property
    def in_flight(self) -> int:
        return self.pool.in_flight

    def run_once(self, job: Job) -> Any:
        return self.pool.run_once(job)


def ray_pool(root: Path, fitness: str, workers: int) -> RayExecutor:
    """A Ray pool of ``workers`` actors over tiny digit MLPs scoring with ``fitness``."""
    from evomerge.demo import prepare_digit_experts

    models = root / "models"
    if not (models / "base").exists():
        prepare_digit_experts(models / "base", [models / "a", models / "b"], seed=0)
    config = config_from_dict(
        {
            "executor": "ray",
            "workers": {"count": workers, "cpus_per_worker": 1},
            "models": {"base": str(models / "base"), "experts": [str(models / "a"), str(models / "b")], "device": "cpu"},
            "merge": {"method": "task_arithmetic", "granularity": "per_model", "search": ["weight"], "fixed": {"lambda": 1.0}},
            "populations": [{"name": "p", "strategy": "random"}],
            "fitness": {"name": f"overhead_fitness:{fitness}", "data": {"source": "sklearn:digits", "limit": 16}},
            "budget": {"evaluations": 1},
        },
        str(root / "config.yaml"),
        root,
    )
    return RayExecutor(config)


def noop_through_ray(root: Path, evaluations: int) -> dict[str, float]:
    pool = TimedPool(ray_pool(root, "noop", 2))
    try:
        pops = [random_population("p", evaluations, dim=2)]
        store = new_store(root, "noop", pops)
        start = time.perf_counter()
        Controller(store, pool, pops, checkpoint_every=10).run()
        seconds = time.perf_counter() - start
        failed = store.counts().get("p", {}).get("failed", 0)
        store.close()
        if failed:
            raise RuntimeError(f"{failed} no-op evaluations failed: the figures would not mean anything")
    finally:
        pool.pool.shutdown()
    return {
        "noop_evals_per_s": evaluations / seconds,
        "overhead_ms": (seconds - pool.waiting) / evaluations * 1000,
    }


def utilization_through_ray(root: Path, evaluations: int) -> dict[str, float]:
    """The same pool, the same duration distribution: steady state, then one batch per barrier."""
    pool = TimedPool(ray_pool(root, "lognormal", 2))
    try:
        pops = [random_population("p", evaluations, dim=2)]
        store = new_store(root, "async", pops)
        start = time.perf_counter()
        Controller(store, pool, pops, checkpoint_every=10).run()
        asynchronous = pool.busy / (pool.capacity * (time.perf_counter() - start))
        store.close()
        pool.busy = 0.0
        strategy = random_population("b", evaluations, dim=2, seed=1).strategy
        start = time.perf_counter()
        for _ in range(evaluations // pool.capacity):
            batch = strategy.ask(pool.capacity)
            for cand in batch:
                pool.submit(cand)
            done: list[Evaluation] = []
            while len(done) < len(batch):
                done += pool.wait()
            strategy.tell(done)
        barrier = pool.busy / (pool.capacity * (time.perf_counter() - start))
    finally:
        pool.pool.shutdown()
    return {"async_utilization": asynchronous, "barrier_utilization": barrier}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop-evaluations", type=int, default=1000)
    parser.add_argument("--utilization-evaluations", type=int, default=200)
    parser.add_argument("--sim-workers", type=int, default=256)
    parser.add_argument("--sim-evaluations", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(Path(__file__).parent))  # the workers import overhead_fitness too
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result.update(noop_through_ray(root, args.noop_evaluations))
        result.update(utilization_through_ray(root, args.utilization_evaluations))
        result.update(simulated_controller(root, args.sim_workers, args.sim_evaluations))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
