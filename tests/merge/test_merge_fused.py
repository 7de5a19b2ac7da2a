"""Fused (torch.compile) kernels: the same results as their functions run eagerly, no recompiles
from one candidate to the next, exact top-k thresholds, and the eager fallback when compiling fails."""

from __future__ import annotations

import warnings

import pytest
import torch

from evomerge.merge import MERGE_METHODS, fused
from evomerge.merge.resident import ResidentTensor
from evomerge.merge.fused import FusedKernel
from evomerge.merge.kernel import TensorContext

N = 70_001  # rows above FUSED_MIN_NUMEL, not a multiple of any vector width or of the scan block
WEIGHTS = [0.7, 1.3, 0.4]


def experts(n: int = N) -> ResidentTensor:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g)
    return ResidentTensor("w", (torch.randn(3, n, generator=g) * 0.01).contiguous(), base)


def merge(
    method: str, tensor: ResidentTensor, chunk: int, seed: int = 3, total: int | None = None, **overrides
) -> torch.Tensor:
    spec = MERGE_METHODS[method]
    params = {"weight": WEIGHTS, "density": [0.3, 0.55, 1.0], "lambda": 0.85, **overrides}
    options = spec.default_options()
    if "normalize" in overrides:
        options["normalize"] = params.pop("normalize")
    out = torch.full(tuple(tensor.shape), float("nan"))
    ctx = TensorContext("w", 0, total or tensor.numel, torch.Generator().manual_seed(seed), chunk)
    spec.kernel(out, tensor, params, options, ctx)
    return out


@pytest.mark.parametrize(
    "method, overrides",
    [("ties", {}), ("dare_linear", {}), ("dare_ties", {}), ("dare_ties", {"normalize": True})],
)
def test_compiled_kernels_equal_eager(monkeypatch, method, overrides):
    # one untrimmed row (density 1) and λ ≠ 1; several compiled calls, so chunks start past 0
    tensor = experts()
    monkeypatch.setattr(fused, "FUSED_STEP", 1 << 14)
    compiled = merge(method, tensor, chunk=4096, **overrides)
    monkeypatch.setattr(fused, "FUSED_MIN_NUMEL", N + 1)
    eager = merge(method, tensor, chunk=4099, **overrides)
    assert not compiled.isnan().any()
    # on CPUs inductor's C++ rounds every operation as the eager ops do (no contraction)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_a_big_models_small_tensors_run_compiled_and_equal_eager(monkeypatch, method):
    tensor = experts(1000)
    compiled = merge(method, tensor, chunk=4096, total=fused.FUSED_MIN_NUMEL)
    monkeypatch.setattr(fused, "FUSED_MIN_NUMEL", fused.FUSED_MIN_NUMEL + 1)
    assert torch.equal(compiled, merge(method, tensor, chunk=4096, total=fused.FUSED_MIN_NUMEL - 1))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_a_new_candidate_compiles_nothing(monkeypatch, method):
    # one compiled loop serves every chunk offset and length, weight, density, λ and seed
    merge(method, experts(), chunk=4096)  # the whole tensor in one call
    monkeypatch.setattr(fused, "FUSED_STEP", 3 << 12)
    with torch.compiler.set_stance("fail_on_recompile"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a recompile would fail, fall back and warn
        other = {"weight": [1.9, 0.0, 0.25], "density": [0.05, 0.9, 0.6], "lambda": 1.0}
        merge(method, experts(), chunk=4096, seed=8, **other)
        merge(method, experts(N + 977), chunk=4096)


@pytest.mark.parametrize("compiled", [True, False])
def test_scan_thresholds_are_exact_in_both_paths(monkeypatch, compiled):
    g = torch.Generator().manual_seed(2)
    rows = torch.stack([torch.randn(N, generator=g) * s for s in (1.0, 1e-3, 50.0)])
    rows[1, ::7] = 0.0  # many ties at zero
    monkeypatch.setattr(fused, "FUSED_STEP", 1 << 14)
    if not compiled:
        monkeypatch.setattr(fused, "FUSED_MIN_NUMEL", N + 1)
    tensor = ResidentTensor("w", rows)
    descending = rows.abs().sort(dim=1, descending=True).values
    for keeps in ([1, 2, 3], [N // 3, N // 7, N - 1], [N, 40_000, 12_345]):
        found = tensor.magnitude_thresholds(keeps, chunk=4096)
        assert found == [float(descending[r, k - 1]) for r, k in enumerate(keeps)], keeps


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    kernel = FusedKernel(lambda x: x * 2)
    run, step = kernel.plan(fused.FUSED_MIN_NUMEL, 64)
    assert step == fused.FUSED_STEP
    with pytest.warns(RuntimeWarning, match="no C.. compiler here"):
        assert torch.equal(run(torch.ones(3)), torch.full((3,), 2.0))
    run, step = kernel.plan(fused.FUSED_MIN_NUMEL, 64)
    assert (run, step) == (kernel.eager, 64)  # eager from then on, at the eager step


def test_small_rows_run_eagerly():
    kernel = FusedKernel(lambda x: x)
    assert kernel.plan(fused.FUSED_MIN_NUMEL - 1, 123) == (kernel.eager, 123)


def test_more_specializations_than_torchs_default_limit_stay_compiled():
    # each expert count, dtype and option is one specialization; torch gives up after 8 by default
    def repeat_double(x: torch.Tensor, times: int) -> torch.Tensor:
        for _ in range(times):
            x = x * 2
        return x

    kernel = FusedKernel(repeat_double)
    run, _ = kernel.plan(fused.FUSED_MIN_NUMEL, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for times in range(1, 11):
            assert torch.equal(run(torch.ones(4), times), torch.full((4,), 2.0**times))
    assert kernel.failure is None
