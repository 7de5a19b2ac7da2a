"""Expert weights as a worker keeps them in memory, and the passes every kernel shares.

A worker holds, per parameter tensor, either the base weights plus a stack of task vectors
(expert − base; the form task arithmetic, TIES and DARE need) or, when the run has no base, the
raw expert weights. Both forms support "a linear combination of the experts", so linear, SLERP and
the M2N2 crossover run on either. Per-tensor summaries that do not depend on a candidate — inner
products between the experts, magnitude samples for top-k thresholds — are computed once and kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

MAGNITUDE_SAMPLE = 32768
"""Sorted-sample size for exact top-k thresholds (see :meth:`ResidentTensor.magnitude_threshold`)."""


def chunk_bounds(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Yield ``[start, end)`` slices of a flat tensor, ``chunk`` elements each.

    Multi-pass kernels run on cache-sized chunks so that intermediate values never travel to main
    memory; this is what keeps them near the memory-traffic floor on CPUs.
    """
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


@dataclass
class ResidentTensor:
    """One parameter tensor of every expert, stacked.

    ``reference`` is the base tensor when the run has a base (``stack`` then holds task vectors),
    or ``None`` (``stack`` then holds the raw expert tensors). ``stack`` has shape
    ``[n_models, *shape]`` and is contiguous.
    """

    name: str
    stack: torch.Tensor
    reference: torch.Tensor | None = None
    _gram: torch.Tensor | None = field(default=None, repr=False)
    _samples: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def n_models(self) -> int:
        return int(self.stack.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.stack.shape[1:]

    @property
    def numel(self) -> int:
        return int(self.stack[0].numel())

    def flat_stack(self) -> torch.Tensor:
        return self.stack.view(self.n_models, -1)

    def flat_reference(self) -> torch.Tensor | None:
        return None if self.reference is None else self.reference.view(-1)

    def gram(self) -> torch.Tensor:
        """Inner products of the rows ``[reference?, expert_1, …]`` in float64, computed once.

        With a reference, row 0 is the base and row ``1 + i`` the task vector of expert ``i``, so
        ``<x_i, x_j>`` follows from this matrix without touching the weights again.
        """
        if self._gram is None:
            rows = self.flat_stack()
            if self.reference is not None:
                rows = torch.cat([self.reference.view(1, -1), rows], dim=0)
            rows64 = rows.to(torch.float64)
            self._gram = (rows64 @ rows64.T).cpu()
        return self._gram

    def model_basis(self) -> torch.Tensor:
        """Rows of coefficients expressing each expert over the rows of :meth:`gram`."""
        m = self.n_models
        if self.reference is None:
            return torch.eye(m, dtype=torch.float64)
        basis = torch.zeros(m, m + 1, dtype=torch.float64)
        basis[:, 0] = 1.0
        basis[:, 1:] = torch.eye(m, dtype=torch.float64)
        return basis

    def magnitude_threshold(self, row: int, keep: int) -> float:
        """The ``keep``-th largest ``|stack[row]|`` exactly (``keep`` ≥ 1).

        A sorted random sample of the magnitudes (kept per row) brackets the answer; one pass over
        the row counts the elements below the bracket and collects those inside it, and a
        ``kthvalue`` on that small set gives the exact order statistic. This avoids a full sort or
        a full-size ``kthvalue`` per candidate, which would dominate TIES' cost on CPUs.
        """
        flat = self.flat_stack()[row]
        n = flat.numel()
        position = n - keep  # 0-based ascending position of the answer
        wide = torch.promote_types(flat.dtype, torch.float32)  # float64 stays exact
        sample = self._magnitude_sample(row)
        if sample.numel() == n:
            return float(sample[position])
        s = sample.numel()
        # The sample quantile's rank error has std ≈ sqrt(q(1-q)/s); take a generous bracket.
        q = position / max(n - 1, 1)
        margin = 6.0 * (max(q * (1 - q), 1.0 / s) / s) ** 0.5 + 2.0 / s
        lo_idx = max(0, int((q - margin) * (s - 1)))
        hi_idx = min(s - 1, int((q + margin) * (s - 1)) + 1)
        lo = float(sample[lo_idx]) if lo_idx > 0 else float("-inf")
        hi = float(sample[hi_idx]) if hi_idx < s - 1 else float("inf")
        below = 0
        inside: list[torch.Tensor] = []
        for start, end in chunk_bounds(n, 1 << 20):
            mag = flat[start:end].abs()
            below += int((mag < lo).sum())
            inside.append(mag[(mag >= lo) & (mag <= hi)])
        candidates = torch.cat(inside)
        rank = position - below
        if not 0 <= rank < candidates.numel():  # the sample misled us: fall back to the exact path
            return float(torch.kthvalue(flat.abs().to(wide), position + 1).values)
        return float(torch.kthvalue(candidates.to(wide), rank + 1).values)

    def _magnitude_sample(self, row: int) -> torch.Tensor:
        sample = self._samples.get(row)
        if sample is None:
            flat = self.flat_stack()[row]
            n = flat.numel()
            wide = torch.promote_types(flat.dtype, torch.float32)
            if n <= MAGNITUDE_SAMPLE:
                sample = flat.abs().to(wide).sort().values
            else:
                gen = torch.Generator(device="cpu").manual_seed(0x5EED + row)
                idx = torch.randint(0, n, (MAGNITUDE_SAMPLE,), generator=gen).to(flat.device)
                sample = flat[idx].abs().to(wide).sort().values
            self._samples[row] = sample
        return sample


def combine_(
    out: torch.Tensor,
    tensor: ResidentTensor,
    model_coefs: Sequence[float],
    chunk: int,
    segment: tuple[int, int] | None = None,
) -> None:
    """``out = Σ_i c_i · x_i`` over the experts, written in place, one streaming pass.

    With a reference the experts are ``base + τ_i``, so the base gets the coefficient ``Σ c_i``.
    ``segment`` restricts the write to a ``[start, end)`` range of the flattened tensor.
    """
    flat_out = out.view(-1)
    rows = tensor.flat_stack()
    ref = tensor.flat_reference()
    start, end = segment if segment is not None else (0, flat_out.numel())
    active = [(i, float(c)) for i, c in enumerate(model_coefs) if c != 0.0]
    ref_coef = float(sum(model_coefs))
    for s, e in chunk_bounds(end - start, chunk):
        s, e = s + start, e + start
        out_c = flat_out[s:e]
        if ref is not None:
            torch.mul(ref[s:e], ref_coef, out=out_c)
        elif active:
            i, c = active[0]
            torch.mul(rows[i, s:e], c, out=out_c)
        else:
            out_c.zero_()
        for i, c in active if ref is not None else active[1:]:
            out_c.add_(rows[i, s:e], alpha=c)
