"""Expert weights as a worker keeps them in memory, and the passes every kernel shares.

A worker holds, per parameter tensor, either the base weights plus a stack of task vectors
(expert − base; the form task arithmetic, TIES and DARE need) or, when the run has no base, the
raw expert weights. Both forms support "a linear combination of the experts", so linear, SLERP and
the M2N2 crossover run on either. Per-tensor summaries that do not depend on a candidate — inner
products between the experts, magnitude histograms for top-k thresholds — are computed once and kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from evomerge.merge.fused import FusedKernel

MAGNITUDE_SAMPLE = 32768
"""Rows up to this size keep all their magnitudes sorted; larger rows keep a magnitude histogram
(see :meth:`ResidentTensor.magnitude_threshold`)."""
MAGNITUDE_INTERVALS = 4096
"""Intervals of about equal population into which a large row's magnitude range is cut."""
SCAN_BLOCK = 64
"""Elements per block when a threshold scan gathers the entries of one magnitude interval."""
GRAM_CHUNK = 1 << 20
"""Columns per float64 step of :meth:`ResidentTensor.gram` (bounds its transient memory)."""
# Magnitude histograms bin the bit patterns of |x| (monotone in |x|): the top bits kept per dtype.
_MAGNITUDE_BITS = {torch.float32: (torch.int32, 31, 20), torch.float64: (torch.int64, 63, 22)}
_HALF_BITS = (torch.int16, 15, 15)
HISTOGRAM_STEP = 1 << 20
"""Elements binned per step of a histogram build."""


class Scratch:
    """Reusable kernel buffers, so that chunked passes allocate nothing per chunk.

    A buffer is named by its purpose and grows to the largest size asked for; views of it are
    returned, for use until the next ``get`` of that purpose. A materializer keeps one for all its
    tensors and candidates, so a candidate's merge allocates (and page-faults) nothing after the
    first. Buffers with different names never alias.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        slot = (name, dtype, torch.device(device))
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < numel:
            # the smaller one goes first (callers keep no view of a buffer past a kernel call), so
            # growing peaks at the larger buffer alone, not both
            self._buffers.pop(slot, None)
            del buffer
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[slot] = buffer
        return buffer[:numel].view(shape)


@dataclass
class _MagnitudeIndex:
    """What a row keeps to find exact top-k thresholds: all magnitudes sorted (small rows), or
    interval edges with the exact count of magnitudes below each (large rows)."""

    sorted_values: np.ndarray | None = None
    edges: np.ndarray | None = None  # ascending, edges[0] = 0
    below: np.ndarray | None = None  # below[t] = #{|x| < edges[t]}, plus a final entry n


def chunk_bounds(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Yield ``[start, end)`` slices of a flat tensor, ``chunk`` elements each.

    Multi-pass kernels run on cache-sized chunks so that intermediate values never travel to main
    memory; this is what keeps them near the memory-traffic floor on CPUs.
    """
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


def _interval_blocks(rows: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Per row ``j`` and ``SCAN_BLOCK``-element block of ``rows`` (a whole number of blocks long),
    1 where the block holds an entry with ``bounds[j, 0] ≤ |x| < bounds[j, 1]``, else 0 (a float
    maximum: compiled, it runs closer to the read bandwidth than a boolean ``any``; eager, a cast
    beats ``torch.where``, a scalar loop on CPUs)."""
    magnitude = rows.abs()
    inside = ((magnitude >= bounds[:, :1]) & (magnitude < bounds[:, 1:])).to(rows.dtype)
    return inside.view(rows.shape[0], -1, SCAN_BLOCK).amax(dim=2)


_INTERVAL_BLOCKS = FusedKernel(_interval_blocks)


@dataclass
class TensorSummaries:
    """What :class:`ResidentTensor` computes once per tensor and keeps (a few kilobytes).

    Kept apart from the weights so that a memory tier that streams a tensor's weights in for each
    merge hands every streamed copy the same summaries: they are computed on the first merge only.
    """

    gram: torch.Tensor | None = None
    magnitudes: dict[int, _MagnitudeIndex] = field(default_factory=dict)


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
    summaries: TensorSummaries = field(default_factory=TensorSummaries, repr=False)

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

    def gram(self, scratch: Scratch | None = None) -> torch.Tensor:
        """Inner products of the rows ``[reference?, expert_1, …]`` in float64, computed once.

        With a reference, row 0 is the base and row ``1 + i`` the task vector of expert ``i``, so
        ``<x_i, x_j>`` follows from this matrix without touching the weights again. The rows are
        widened to float64 ``GRAM_CHUNK`` columns at a time, in a ``scratch`` buffer if given.
        """
        if self.summaries.gram is None:
            rows = self.flat_stack()
            ref = self.flat_reference()
            k = self.n_models + (ref is not None)
            gram = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
            width = min(GRAM_CHUNK, self.numel)
            block = (scratch or Scratch()).get("gram_block", (k, width), torch.float64, rows.device)
            for s, e in chunk_bounds(self.numel, GRAM_CHUNK):  # float64 one chunk at a time
                b = block[:, : e - s]
                if ref is not None:
                    b[0].copy_(ref[s:e])
                b[k - self.n_models :].copy_(rows[:, s:e])
                gram.addmm_(b, b.T)
            self.summaries.gram = gram.cpu()
        return self.summaries.gram

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
        """The ``keep``-th largest ``|stack[row]|`` exactly (``keep`` ≥ 1); see :meth:`magnitude_thresholds`."""
        keeps: list[int | None] = [None] * self.n_models
        keeps[row] = keep
        value = self.magnitude_thresholds(keeps)[row]
        assert value is not None
        return value

    def magnitude_thresholds(
        self, keeps: Sequence[int | None], chunk: int = 1 << 20, scratch: Scratch | None = None
    ) -> list[float | None]:
        """Per row, the ``keeps[row]``-th largest ``|stack[row]|`` exactly (``None`` where ``keeps[row]`` is).

        Small rows keep their magnitudes sorted. A large row keeps, from a histogram of the bit
        patterns of its magnitudes built once, about ``MAGNITUDE_INTERVALS`` interval edges with the
        exact count of magnitudes below each: they name the interval that holds the answer and its
        rank there. One pass over the rows then gathers just those intervals' entries (see
        :meth:`_interval_values`), and a partial sort of those few gives the exact order statistics. A full
        sort, a full-size ``kthvalue`` or boolean masks over whole rows would dominate TIES' cost.
        """
        rows = self.flat_stack()
        n = self.numel
        wide = torch.promote_types(rows.dtype, torch.float32)  # float64 stays exact
        result: list[float | None] = [None] * self.n_models
        scans: list[tuple[int, float, float, int, int]] = []  # row, [lo, hi), rank inside, count inside
        for row, keep in enumerate(keeps):
            if keep is None:
                continue
            if not 1 <= keep <= n:
                raise ValueError(f"{self.name}: keep must be between 1 and {n}, got {keep}")
            position = n - keep  # 0-based ascending position of the answer
            index = self._magnitude_index(row, scratch)
            if index.sorted_values is not None:
                result[row] = float(index.sorted_values[position])
            elif index.edges is None or index.below is None:  # a dtype without a histogram
                result[row] = float(torch.kthvalue(rows[row].abs().to(wide), position + 1).values)
            else:
                t = int(np.searchsorted(index.below, position, side="right")) - 1
                lo = float(index.edges[t])
                hi = float(index.edges[t + 1]) if t + 1 < len(index.edges) else math.inf
                below, above = int(index.below[t]), int(index.below[t + 1])
                scans.append((row, lo, hi, position - below, above - below))
        if not scans:
            return result
        found = self._interval_values(scans, chunk)
        for row, _, _, rank, count in scans:
            values = found[row]
            if len(values) == count:
                result[row] = float(np.partition(values, rank)[rank])
            else:  # NaNs: take the exact way
                keep = keeps[row]
                assert keep is not None
                result[row] = float(torch.kthvalue(rows[row].abs().to(wide), n - keep + 1).values)
        return result

    def _interval_values(
        self, scans: Sequence[tuple[int, float, float, int, int]], chunk: int
    ) -> dict[int, np.ndarray]:
        """Per scanned row, its magnitudes in its interval ``[lo, hi)`` (as a numpy array).

        One fused pass over the rows flags the ``SCAN_BLOCK``-element blocks that hold such an
        entry (see :func:`_interval_blocks`); only those blocks are gathered, and numpy sorts the
        few entries out (a handful of microseconds per op, where small torch ops cost tens with
        several threads). The pass reads every row (a row not scanned gets the empty interval
        ``[∞, ∞)``), so one compiled loop serves any subset of rows.
        """
        rows = self.flat_stack()
        m, n = self.n_models, self.numel
        head = n - n % SCAN_BLOCK
        interval = [(math.inf, math.inf)] * m
        for row, lo, hi, _, _ in scans:
            interval[row] = (lo, hi)
        bounds = torch.tensor(interval, dtype=rows.dtype, device=rows.device)
        kernel, step = _INTERVAL_BLOCKS.plan(n, work_step(chunk, m))
        step = max(SCAN_BLOCK, step - step % SCAN_BLOCK)
        blocks, owners = [], []
        for s, e in chunk_bounds(head, step):
            hit_rows, hit_blocks = kernel(rows[:, s:e], bounds).nonzero(as_tuple=True)
            blocks.append(rows[:, s:e].reshape(m, -1, SCAN_BLOCK)[hit_rows, hit_blocks])
            owners.append(hit_rows)
        if head < n:  # the last partial block of every row, padded with NaN (in no interval)
            blocks.append(torch.nn.functional.pad(rows[:, head:], (0, head + SCAN_BLOCK - n), value=math.nan))
            owners.append(torch.arange(m, device=rows.device))
        gathered = (torch.cat(blocks) if len(blocks) > 1 else blocks[0]).cpu()
        magnitudes = np.abs((gathered.float() if gathered.dtype == torch.bfloat16 else gathered).numpy())
        owner = (torch.cat(owners) if len(owners) > 1 else owners[0]).cpu().numpy()
        found = {}
        for row, lo, hi, _, _ in scans:
            values = magnitudes[owner == row].ravel()
            found[row] = values[(values >= lo) & (values < hi)]
        return found

    def _magnitude_index(self, row: int, scratch: Scratch | None = None) -> _MagnitudeIndex:
        index = self.summaries.magnitudes.get(row)
        if index is None:
            flat = self.flat_stack()[row]
            if flat.numel() <= MAGNITUDE_SAMPLE:
                wide = torch.promote_types(flat.dtype, torch.float32)
                index = _MagnitudeIndex(sorted_values=flat.abs().to(wide).sort().values.cpu().numpy())
            else:
                index = _histogram_index(flat, scratch or Scratch())
            self.summaries.magnitudes[row] = index
        return index


def _histogram_index(flat: torch.Tensor, scratch: Scratch) -> _MagnitudeIndex:
    """Interval edges of about equal population over ``|flat|``, with exact counts below each.

    The bit pattern of a non-negative float grows with its value, so the top bits of ``|x|``'s
    pattern bin it exactly (bins of relative width 2⁻¹² for float32; every value for half types);
    edges are chosen among the bins' lower bounds, which are values of the row's own dtype. The
    counts accumulate in reusable buffers: a build allocates nothing per chunk.
    """
    if flat.dtype in _MAGNITUDE_BITS:
        int_dtype, magnitude_bits, kept = _MAGNITUDE_BITS[flat.dtype]
    elif flat.dtype in (torch.float16, torch.bfloat16):
        int_dtype, magnitude_bits, kept = _HALF_BITS
    else:
        return _MagnitudeIndex()
    n = flat.numel()
    shift = magnitude_bits - kept
    bins = 1 << kept
    step = min(n, HISTOGRAM_STEP)
    counts = scratch.get("histogram_counts", (bins,), torch.int64, flat.device)
    counts.zero_()
    bits = scratch.get("histogram_bits", (step,), torch.int64, flat.device)
    ones = scratch.get("histogram_ones", (step,), torch.int64, flat.device)
    ones.fill_(1)
    for s, e in chunk_bounds(n, step):
        b = bits[: e - s]
        torch.bitwise_and(flat[s:e].view(int_dtype), (1 << magnitude_bits) - 1, out=b)  # |x|'s pattern
        if shift:
            b.bitwise_right_shift_(shift)
        counts.scatter_add_(0, b, ones[: e - s])
    upto = torch.cumsum(counts, 0, out=scratch.get("histogram_upto", (bins,), torch.int64, flat.device))
    # upto[b] = #{|x| in bins ≤ b} = #{|x| < lower bound of bin b + 1}; an edge at bin e has
    # #{|x| < edge} = upto[e − 1]: the edges whose counts first reach each target population
    targets = (torch.arange(1, MAGNITUDE_INTERVALS, device=flat.device) * n) // MAGNITUDE_INTERVALS
    edge_bins = torch.unique(torch.cat([torch.zeros(1, dtype=torch.int64, device=flat.device),
                                        torch.searchsorted(upto, targets) + 1]))
    edge_bins = edge_bins[edge_bins < bins]
    below_edges = torch.where(edge_bins > 0, upto[(edge_bins - 1).clamp_min(0)], 0)
    edges = (edge_bins << shift).to(int_dtype).view(flat.dtype).to(torch.float64).cpu().numpy()
    below = np.concatenate([below_edges.cpu().numpy(), [n]])
    return _MagnitudeIndex(edges=edges, below=below)


def histogram_bytes(dtype: torch.dtype, largest: int) -> int:
    """Bytes of the reusable buffers :func:`_histogram_index` builds a magnitude histogram in, for
    tensors of up to ``largest`` elements: two int64 rows of one per bin, two of one step."""
    if largest <= MAGNITUDE_SAMPLE:
        return 0  # small rows are sorted, not binned
    kept = _MAGNITUDE_BITS[dtype][2] if dtype in _MAGNITUDE_BITS else _HALF_BITS[2]
    return 2 * 8 * ((1 << kept) + min(largest, HISTOGRAM_STEP))


def work_step(chunk: int, rows: int) -> int:
    """Columns per step of a multi-pass kernel that keeps about ``rows + 1`` chunk-long work rows.

    ``chunk`` sizes one streaming row and its output for the cache; a pass with several work rows
    steps over proportionally fewer columns (a power of two when that is large) so its working set
    stays the same size instead of spilling to memory between its ops.
    """
    step = max(1, chunk // (rows + 1))
    return 1 << (step.bit_length() - 1) if step >= 64 else step


def shrink_bound(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value below ``threshold``: ``torch.hardshrink`` at this bound keeps
    exactly the entries with ``|x| ≥ threshold`` (it zeroes ``|x| ≤ bound``), in one float op."""
    return float(shrink_bounds([threshold], dtype, torch.device("cpu"))[0])


def shrink_bounds(thresholds: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`shrink_bound` of several thresholds at once, as a tensor on ``device``."""
    values = torch.tensor(thresholds, dtype=dtype, device=device)
    return torch.nextafter(values, torch.tensor(-math.inf, dtype=dtype, device=device))


def combine_(
    out: torch.Tensor,
    tensor: ResidentTensor,
    model_coefs: Sequence[float],
    chunk: int,
    segment: tuple[int, int] | None = None,
    ref_coef: float | None = None,
) -> None:
    """``out = Σ_i c_i · x_i`` over the experts, written in place, one streaming pass.

    With a reference the experts are ``base + τ_i``, so the base gets the coefficient ``Σ c_i``
    (or ``ref_coef``: task arithmetic's ``base + Σ c_i τ_i`` passes 1). ``segment`` restricts the
    write to a ``[start, end)`` range of the flattened tensor. Each chunk is one op per expert:
    the first reads the base and writes ``out``, the others accumulate while it is in cache.
    """
    flat_out = out.view(-1)
    rows = tensor.flat_stack()
    ref = tensor.flat_reference()
    start, end = segment if segment is not None else (0, flat_out.numel())
    active = [(i, float(c)) for i, c in enumerate(model_coefs) if c != 0.0]
    ref_coef = float(sum(model_coefs)) if ref_coef is None else float(ref_coef)
    # bfloat16/float16 weights are summed in a float32 chunk and rounded once: rounding after every
    # expert's term (as a half-precision accumulator does) put a 1 B-parameter bf16 task-arithmetic
    # merge up to 1.4 units in the last place off the exact sum (60 % of entries correctly rounded)
    widen = out.is_floating_point() and out.element_size() < 4
    accumulator = torch.empty(min(chunk, end - start), dtype=torch.float32, device=out.device) if widen else None
    for s, e in chunk_bounds(end - start, chunk):
        s, e = s + start, e + start
        if accumulator is not None:  # every term widened before it is scaled or added
            acc = accumulator[: e - s]
            terms = ([(ref, ref_coef)] if ref is not None else []) + [(rows[i], c) for i, c in active]
            if not terms:
                acc.zero_()
            for k, (row, c) in enumerate(terms):
                if k == 0:
                    acc.copy_(row[s:e]).mul_(c)
                else:
                    acc.add_(row[s:e], alpha=c)  # computed in float32, the accumulator's dtype
            flat_out[s:e].copy_(acc)
            continue
        out_c = flat_out[s:e]
        if ref is not None and ref_coef == 1.0 and active:
            # base + c_0·τ_0 in one op (the same rounding as 1·base, then += c_0·τ_0)
            i, c = active[0]
            torch.add(ref[s:e], rows[i, s:e], alpha=c, out=out_c)
            for i, c in active[1:]:
                out_c.add_(rows[i, s:e], alpha=c)
        else:
            if ref is not None:
                torch.mul(ref[s:e], ref_coef, out=out_c)
            elif active:
                i, c = active[0]
                torch.mul(rows[i, s:e], c, out=out_c)
            else:
                out_c.zero_()
            for i, c in active if ref is not None else active[1:]:
                out_c.add_(rows[i, s:e], alpha=c)
