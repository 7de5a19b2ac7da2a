"""Reproduce M2N2's "MNIST" experiment (sklearn's 8×8 digits) with evomerge's strategies.

Set up as the authors' code (``SakanaAI/natural_niches``) does: the first 1,437 images train and
the last 360 test, raw pixels 0–16, an MLP 64-256-10 (19,210 parameters, flat layout W1, b1, W2,
b2), an archive of 20, one forward pass = one child scored on the whole training split, and the
reported test accuracy is that of the archive member with the best training accuracy.

* from scratch: two seeds drawn from N(0, 0.01²), 50,000 passes, mutation σ = 0.01;
* ``--pretrained``: two specialists trained with Adam (lr 3e-3, 10 full-batch steps) on digits
  0–4 and 5–9, 10,000 passes, no mutation; the brute-force SLERP line between them is reported.

Speed: the forward passes are timed inside the search loop, so ``forward_only_passes_per_s``
(what the bare forward pass allows) and ``overhead_share`` (the rest: strategy, crossover,
bookkeeping) come from the same run and the same machine load. ``--method cmaes`` runs separable CMA-ES
on the 19,210 weights (σ0 = 0.01, popsize 20, as the paper's baseline but diagonal: the full
covariance needs ~9 GB and seconds per generation here); ``--method random`` samples the split
point and mix ratio of a SLERP between the two seeds uniformly.

    python benchmarks/m2n2_digits.py --method m2n2 --seeds 42 43 44 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits

from evomerge.records import Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies import make_strategy

N_TRAIN = 1437
HIDDEN = 256
SHAPES = ((64, HIDDEN), (HIDDEN,), (HIDDEN, 10), (10,))
N_PARAMS = sum(math.prod(s) for s in SHAPES)  # 19,210
SPECIALIST_SEED = 42


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @classmethod
    def load(cls) -> "Digits":
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32)  # unnormalised pixels, as the paper's code
        y = torch.tensor(data.target, dtype=torch.int64)
        return cls(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])


def unflatten(flat: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in SHAPES:
        size = math.prod(shape)
        out.append(flat[offset : offset + size].view(shape))
        offset += size
    return out


def logits(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = unflatten(flat)
    return torch.relu(x @ w1 + b1) @ w2 + b2


def correct(genome: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """One forward pass: per-example correctness (the score M2N2 competes on)."""
    flat = torch.from_numpy(genome).to(torch.float32)
    return (logits(flat, x).argmax(dim=1) == y).numpy().astype(np.float64)


def random_seeds(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.01, N_PARAMS) for _ in range(2)]


def specialists(data: Digits) -> list[np.ndarray]:
    """Two MLPs trained briefly on digits 0–4 and 5–9 (the paper's pre-trained seeds)."""
    out = []
    generator = torch.Generator().manual_seed(SPECIALIST_SEED)
    for digits in (range(0, 5), range(5, 10)):
        keep = torch.isin(data.y_train, torch.tensor(list(digits)))
        flat = torch.nn.Parameter(torch.randn(N_PARAMS, generator=generator) * 0.01)
        optimiser = torch.optim.Adam([flat], lr=3e-3)
        for _ in range(10):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits(flat, data.x_train[keep]), data.y_train[keep])
            loss.backward()
            optimiser.step()
        out.append(flat.detach().double().numpy())
    return out


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    if math.sin(omega) <= 1e-6:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def brute_force_slerp(seeds: list[np.ndarray], data: Digits, steps: int = 10_000) -> dict[str, float]:
    """The best SLERP coefficient on train, scored on test (the paper's horizontal line)."""
    best_t, best_train = 0.0, -1.0
    for t in np.linspace(0.0, 1.0, steps):
        train = correct(slerp(float(t), *seeds), data.x_train, data.y_train).mean()
        if train > best_train:
            best_t, best_train = float(t), float(train)
    test = correct(slerp(best_t, *seeds), data.x_test, data.y_test).mean()
    return {"t": best_t, "train_acc": best_train, "test_acc": float(test)}


def make_search(method: str, seeds: list[np.ndarray], seed: int, mutation: float, flags: dict[str, bool]):
    """The strategy and the map from its genomes to MLP weights."""
    if method in ("m2n2", "ga"):
        options: dict[str, Any] = {"archive_size": 20, "mutation": mutation, "split_point": not flags["no_splitpoint"]}
        options["crossover"] = not flags["no_crossover"]
        if method == "m2n2":
            options["attraction"] = not flags["no_attraction"]
        return make_strategy(method, method, SearchSpec.weights(seeds), seed, options), lambda g: g
    if method == "cmaes":
        spec = SearchSpec.weights(seeds)
        spec = SearchSpec(spec.dim, np.mean(seeds, axis=0), spec.genes, False, spec.seeds)
        options = {"sigma0": 0.01, "popsize": 20, "separable": True}
        return make_strategy("cmaes", "cmaes", spec, seed, options), lambda g: g
    if method == "random":
        a, b = seeds

        def weights(genome: np.ndarray) -> np.ndarray:
            split, mix = int(genome[0] * N_PARAMS), float(genome[1])
            return np.concatenate([slerp(mix, a, b)[:split], slerp(1.0 - mix, a, b)[split:]])

        return make_strategy("random", "random", SearchSpec.unit_cube(2), seed, {}), weights
    raise ValueError(f"unknown method {method}")


def archive_best(strategy, weights, data: Digits, best_seen: tuple[float, np.ndarray]) -> tuple[float, float]:
    """Train and test accuracy of the member with the best training accuracy."""
    members = getattr(strategy, "_members", None)
    if members is not None:
        scores = strategy._scores
        filled = [i for i, m in enumerate(members) if m is not None]
        best = max(filled, key=lambda i: scores[i].mean())
        train, genome = float(scores[best].mean()), members[best]
    else:
        train, genome = best_seen
    return train, float(correct(weights(genome), data.x_test, data.y_test).mean())


def run(method: str, seed: int, passes: int, pretrained: bool, flags: dict[str, bool], data: Digits) -> dict[str, float]:
    """One search; ``forward_seconds`` is the time inside forward passes, timed in the same loop."""
    torch.manual_seed(seed)
    seeds = specialists(data) if pretrained else random_seeds(seed)
    mutation = 0.0 if pretrained else 0.01
    strategy, weights = make_search(method, seeds, seed, mutation, flags)
    best_seen: tuple[float, np.ndarray] = (-1.0, seeds[0])
    start = time.perf_counter()
    done, forward_seconds = 0, 0.0
    while done < passes:
        batch = strategy.ask(1)
        if not batch:
            break
        cand = batch[0]
        genome = weights(cand.genome)
        tic = time.perf_counter()
        scores = correct(genome, data.x_train, data.y_train)
        forward_seconds += time.perf_counter() - tic
        fitness = float(scores.mean())
        if fitness > best_seen[0]:
            best_seen = (fitness, cand.genome)
        strategy.tell([Evaluation(cand.id, "ok", fitness, per_example=scores)])
        done += 1
    seconds = time.perf_counter() - start
    train, test = archive_best(strategy, weights, data, best_seen)
    return {
        "train_acc": train,
        "test_acc": test,
        "passes": done,
        "seconds": seconds,
        "passes_per_s": done / seconds,
        "forward_seconds": forward_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("m2n2", "ga", "cmaes", "random"), default="m2n2")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--passes", type=int, default=None, help="default 50,000 (10,000 with --pretrained)")
    parser.add_argument("--no-attraction", action="store_true")
    parser.add_argument("--no-splitpoint", action="store_true")
    parser.add_argument("--no-crossover", action="store_true")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    passes = args.passes or (10_000 if args.pretrained else 50_000)
    flags = {"no_attraction": args.no_attraction, "no_splitpoint": args.no_splitpoint, "no_crossover": args.no_crossover}
    data = Digits.load()
    per_seed = {}
    for seed in args.seeds:
        per_seed[str(seed)] = run(args.method, seed, passes, args.pretrained, flags, data)
        if not args.json:
            print(f"seed {seed}: {per_seed[str(seed)]}", file=sys.stderr)
    keys = ("train_acc", "test_acc", "passes", "seconds", "passes_per_s")
    mean = {k: float(np.mean([r[k] for r in per_seed.values()])) for k in keys}
    total_passes = sum(r["passes"] for r in per_seed.values())
    forward = sum(r.pop("forward_seconds") for r in per_seed.values())
    mean["forward_only_passes_per_s"] = total_passes / forward
    mean["overhead_share"] = 1.0 - forward / sum(r["seconds"] for r in per_seed.values())
    result: dict[str, Any] = {"seeds": per_seed, "mean": mean}
    if args.pretrained:
        result["brute_force_slerp"] = brute_force_slerp(specialists(data), data)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
