"""PCB merging against the paper's formulas, written out independently in numpy."""

from __future__ import annotations

import numpy as np
import torch

from evomerge.merge import MERGE_METHODS
from evomerge.merge.resident import ResidentTensor


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _norm(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def _expected(base: np.ndarray, taus: np.ndarray, densities: list[int], lam: float) -> np.ndarray:
    n_tasks, n = taus.shape
    beta = np.zeros_like(taus)
    for i in range(n_tasks):
        intra = _softmax(n_tasks * _norm(taus[i] * taus[i]))
        inter = sum(_softmax(_norm(taus[i] * taus[j])) for j in range(n_tasks))
        beta[i] = intra * inter
        keep = int(densities[i] * n)
        beta[i][np.argsort(beta[i])[: n - keep]] = 0.0  # the lowest-scored entries are dropped
    total = beta.sum(0)
    return base + lam * np.where(total > 0, (beta * taus).sum(0) / np.where(total > 0, total, 1.0), 0.0)


def test_pcb_matches_the_formula(make_ctx):
    rng = np.random.default_rng(0)
    base, taus = rng.normal(size=10), rng.normal(size=(3, 10))
    for densities in ([1.0, 1.0, 1.0], [0.5, 0.8, 0.3]):
        for chunk in (1 << 16, 3):  # whole-tensor statistics gathered over chunks give the same scores
            tensor = ResidentTensor("w", torch.tensor(taus), torch.tensor(base))
            out = torch.empty(10, dtype=torch.float64)
            ctx = make_ctx(tensor, chunk=chunk)
            MERGE_METHODS["pcb"].kernel(out, tensor, {"density": densities, "lambda": 0.7}, {}, ctx)
            np.testing.assert_allclose(out.numpy(), _expected(base, taus, densities, 0.7), rtol=1e-12)


def test_pcb_of_one_kept_entry_per_task_is_that_entry(make_ctx):
    # each task keeps only its largest entry; where just one task keeps an entry, it is copied
    taus = torch.tensor([[4.0, 0.1, 0.0], [0.0, 0.2, -5.0]], dtype=torch.float64)
    tensor = ResidentTensor("w", taus, torch.zeros(3, dtype=torch.float64))
    out = torch.empty(3, dtype=torch.float64)
    MERGE_METHODS["pcb"].kernel(out, tensor, {"density": [1 / 3, 1 / 3], "lambda": 1.0}, {}, make_ctx(tensor))
    torch.testing.assert_close(out, torch.tensor([4.0, 0.0, -5.0], dtype=torch.float64))
