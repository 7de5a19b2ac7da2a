"""Fitness functions for benchmarks/controller_overhead.py (imported by the Ray workers).

``noop`` scores nothing, so a run measures only the machinery around the fitness; ``lognormal``
sleeps a heavy-tailed time (mean 50 ms) first, like evaluations whose cost varies per candidate.
"""

from __future__ import annotations

import math
import time

import numpy as np

MEAN_SECONDS = 0.05
SIGMA = 1.0
_rng = np.random.default_rng()


def _count(examples) -> int:
    return len(next(iter(examples.values()))) if isinstance(examples, dict) else len(examples)


def noop(model, tokenizer, examples) -> np.ndarray:
    return np.zeros(_count(examples))


def lognormal(model, tokenizer, examples) -> np.ndarray:
    time.sleep(float(_rng.lognormal(math.log(MEAN_SECONDS) - SIGMA**2 / 2, SIGMA)))
    return np.zeros(_count(examples))
