"""TALL masks / Consensus merging against the paper's formula on hand-computed tensors."""

from __future__ import annotations

import torch

from evomerge.merge import MERGE_METHODS
from evomerge.merge.resident import ResidentTensor

BASE = torch.tensor([0.5, 0.5, 0.5, 0.5])
TAUS = torch.tensor([[1.0, 0.0, 2.0, -1.0], [1.0, 3.0, -1.0, 0.0]])


def _merge(method: str, make_ctx, tensor: ResidentTensor, **params) -> torch.Tensor:
    out = torch.empty(4)
    MERGE_METHODS[method].kernel(out, tensor, params, {"normalize": False}, make_ctx(tensor, chunk=3))
    return out


def _tensor() -> ResidentTensor:
    return ResidentTensor("w", TAUS.clone(), BASE.clone())


def test_consensus_by_hand(make_ctx):
    # τ_MTL = [2, 3, 1, -1]; with λ_t = 0.5: m_1 = [1, 0, 1, 1], m_2 = [1, 1, 1, 0]; votes [2, 1, 2, 1]
    common = dict(weight=[1.0, 1.0], mask_lambda=[0.5, 0.5])
    k2 = _merge("consensus_task_arithmetic", make_ctx, _tensor(), **common, k=2.0, **{"lambda": 1.0})
    torch.testing.assert_close(k2, torch.tensor([2.5, 0.5, 1.5, 0.5]))
    k1 = _merge("consensus_task_arithmetic", make_ctx, _tensor(), **common, k=1.0, **{"lambda": 0.5})
    torch.testing.assert_close(k1, BASE + 0.5 * torch.tensor([2.0, 3.0, 1.0, -1.0]))


def test_k1_and_zero_lambda_is_the_unmasked_merge(make_ctx):
    weights = [0.7, 1.3]
    for consensus, plain, extra in (
        ("consensus_task_arithmetic", "task_arithmetic", {}),
        ("consensus_ties", "ties", {"density": [0.5, 0.75]}),
    ):
        params = {"weight": weights, "lambda": 0.8, **extra}
        masked = _merge(consensus, make_ctx, _tensor(), **params, mask_lambda=[0.0, 0.0], k=1.0)
        unmasked = _merge(plain, make_ctx, _tensor(), **params)
        torch.testing.assert_close(masked, unmasked)


def test_k_above_every_vote_keeps_the_base(make_ctx):
    out = _merge("consensus_task_arithmetic", make_ctx, _tensor(), weight=[1.0, 1.0], mask_lambda=[0.5, 0.5], k=3.0, **{"lambda": 1.0})
    torch.testing.assert_close(out, BASE)
