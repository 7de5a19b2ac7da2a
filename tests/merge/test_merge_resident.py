"""ResidentTensor: exact top-k thresholds, Gram matrices, and the shared streaming combination."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.resident import MAGNITUDE_SAMPLE, ResidentTensor, chunk_bounds, combine_


def kth_largest_magnitude(x: torch.Tensor, k: int) -> float:
    return float(x.reshape(-1).abs().sort(descending=True).values[k - 1])


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n_large = 200_000
    many_zeros = torch.randn(n_large, generator=g)
    many_zeros[torch.rand(n_large, generator=g) < 0.9] = 0.0  # ~90% exact zeros
    few_values = torch.randint(-3, 4, (n_large,), generator=g).float()  # 7 distinct values, ±3 share |3|
    heavy_tail = torch.randn(n_large, generator=g) ** 5
    return {
        "small": torch.randn(1000, generator=g),
        "at_sample_size": torch.randn(MAGNITUDE_SAMPLE, generator=g),
        "large": torch.randn(n_large, generator=g),
        "large_2d": torch.randn(400, 500, generator=g),
        "many_zeros": many_zeros,
        "few_values": few_values,
        "heavy_tail": heavy_tail,
        "small_dupes": torch.tensor([0.0, 2.0, -2.0, 0.0, 1.0, 2.0, 0.0, -1.0]),
    }


TENSORS = _tensors()


@pytest.mark.parametrize("key", list(TENSORS))
def test_magnitude_threshold_is_the_exact_kth_largest(key):
    x = TENSORS[key]
    n = x.numel()
    resident = ResidentTensor(key, x.unsqueeze(0).contiguous())
    ks = sorted({1, 2, 3, n // 10, n // 3, n // 2, (9 * n) // 10, n - 1, n} - {0})
    descending = x.reshape(-1).abs().sort(descending=True).values
    for k in ks:
        want = float(descending[k - 1])
        # independent second opinion: torch.kthvalue counts from the smallest
        assert want == float(torch.kthvalue(x.reshape(-1).abs(), n - k + 1).values)
        assert resident.magnitude_threshold(0, k) == want, f"k={k}"


def test_magnitude_threshold_per_row():
    g = torch.Generator().manual_seed(1)
    rows = torch.stack([torch.randn(60_000, generator=g) * s for s in (1.0, 10.0, 0.01)])
    resident = ResidentTensor("w", rows)
    for k in (1, 777, 30_000, 59_999):
        for row in range(3):  # samples are cached per row; a mix-up would give another row's scale
            assert resident.magnitude_threshold(row, k) == kth_largest_magnitude(rows[row], k)


def test_magnitude_threshold_when_the_sample_misleads():
    # Everything equal except a handful of large entries: the bracket holds only ties or nothing.
    x = torch.ones(100_000)
    x[:5] = torch.tensor([50.0, -40.0, 30.0, 20.0, -10.0])
    resident = ResidentTensor("w", x.unsqueeze(0))
    for k in (1, 3, 5, 6, 50_000, 100_000):
        assert resident.magnitude_threshold(0, k) == kth_largest_magnitude(x, k)


def test_chunk_bounds_cover_the_range_once():
    assert list(chunk_bounds(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(chunk_bounds(8, 4)) == [(0, 4), (4, 8)]
    assert list(chunk_bounds(0, 4)) == []


@pytest.mark.parametrize("with_base", [False, True])
def test_combine_writes_the_linear_combination_in_a_segment(with_base):
    g = torch.Generator().manual_seed(2)
    experts = torch.randn(3, 7, 5, generator=g)
    base = torch.randn(7, 5, generator=g)
    tensor = (
        ResidentTensor("w", (experts - base).contiguous(), base.clone())
        if with_base
        else ResidentTensor("w", experts.clone())
    )
    coefs = [0.5, 0.0, -2.0]
    out = torch.full((7, 5), float("nan"))
    combine_(out, tensor, coefs, chunk=4, segment=(3, 29))
    expected = sum(c * e for c, e in zip(coefs, experts)).reshape(-1)
    flat = out.reshape(-1)
    torch.testing.assert_close(flat[3:29], expected[3:29], rtol=1e-5, atol=1e-6)
    assert flat[:3].isnan().all() and flat[29:].isnan().all()  # nothing outside the segment
    combine_(out, tensor, [0.0, 0.0, 0.0], chunk=4)
    assert torch.equal(out, torch.zeros(7, 5))


def test_gram_is_inner_products_of_base_and_task_vectors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=g)
    taus = torch.randn(2, 6, 4, generator=g)
    tensor = ResidentTensor("w", taus.clone(), base.clone())
    rows = torch.stack([base.reshape(-1), taus[0].reshape(-1), taus[1].reshape(-1)]).double()
    torch.testing.assert_close(tensor.gram(), rows @ rows.T)
    # the model basis turns it into inner products of the experts themselves
    experts = (base + taus).reshape(2, -1).double()
    basis = tensor.model_basis()
    torch.testing.assert_close(basis @ tensor.gram() @ basis.T, experts @ experts.T)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1000, 100_000])
def test_magnitude_threshold_is_exact_in_every_dtype(dtype, n):
    # float64 must not be rounded through float32; half types have many ties
    x = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    resident = ResidentTensor("w", x.unsqueeze(0))
    descending = x.abs().double().sort(descending=True).values
    for k in (1, 17, n // 4, n // 2, n - 1, n):
        assert resident.magnitude_threshold(0, k) == float(descending[k - 1]), f"k={k}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_base", [True, False])
def test_combine_rounds_a_half_precision_sum_once(dtype, with_base):
    """A bf16 task-arithmetic merge of a 1 B-parameter Llama was up to 1.4 units in the last place
    off the exact sum, as the half-precision output accumulated each expert's term with a rounding
    of its own; summed in float32 and rounded once, each entry is the exact sum correctly rounded
    (up to float32's own rounding before it, 2⁻²⁴ of the sum)."""
    gen = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(4096, generator=gen)).to(dtype)
    experts = [(base.float() + 0.002 * torch.randn(4096, generator=gen)).to(dtype) for _ in range(3)]
    coefs = [1.7469714025578926, 1.6225271115902493, 0.6742356166791397]
    if with_base:
        tensor = ResidentTensor("w", torch.stack([e - base for e in experts]), base)
        exact = base.double() + sum(c * (e - base).double() for c, e in zip(coefs, experts))
        combine_ref = 1.0
    else:
        tensor = ResidentTensor("w", torch.stack(experts), None)
        exact = sum(c * e.double() for c, e in zip(coefs, experts))
        combine_ref = None
    out = torch.empty(4096, dtype=dtype)
    combine_(out, tensor, coefs, chunk=1000, ref_coef=combine_ref)
    rounded = exact.to(dtype).double()
    assert ((out.double() - exact).abs() <= (rounded - exact).abs() + exact.abs() * 2.0**-24).all()
