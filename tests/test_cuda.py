"""On a CUDA device, in bfloat16 as a GPU run holds 7B models, everything a white-box worker does
works and agrees with the CPU in float32 (issue 18, GPU readiness): every registered merge method in
every memory tier, the worker's materializer and scoring end to end, every built-in fitness, the
memory check on the device's own free memory, and a materialization's peak device memory within
the memory module's estimate.

Every test here is marked ``cuda`` and skips where torch sees no GPU (tests/conftest.py); run them
with ``pytest -m cuda`` on a GPU machine (``benchmarks/gpu_check.sh``).

Tolerances, per tensor as ``‖got − want‖ / ‖want‖``:

* float32 on CUDA against float32 on the CPU: ``FLOAT32_BOUND``. The inputs are the same bits and
  every elementwise op rounds once on both devices; only reductions (Gram matrices, PCB's softmax
  sums) and contracted multiply-adds change the last bits (~1e-7). A merge that differs by device
  (a mask drawn from a CUDA generator, a wrong tensor read) is off by 1e-2 or more.
* bfloat16 on CUDA against bfloat16 on the CPU: ``SAME_DTYPE_BOUND``. The same ops on the same
  bfloat16 inputs, each result rounded to bfloat16 on both; a last-bit difference (2⁻⁸ relative) in
  a few entries, or a trim or consensus vote it flips, stays well under 1e-2.
* bfloat16 on CUDA against float32 on the CPU: ``BFLOAT16_BOUND`` = 0.1, the merge suite's bound
  (``test_other_dtypes_agree_with_float32``): bfloat16 keeps ~3 significant digits, so a task
  vector (expert − base, a tenth of the weights here) loses a few percent, and TIES / DARE /
  consensus trims and sign elections flip some entries; measured on the CPU on this layout the
  worst method is at 0.045.
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

from evomerge.config import config_from_dict
from evomerge.merge import MERGE_METHODS
from evomerge.merge.fused import FusedKernel
from evomerge.models import memory
from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.space.merge_space import Space
from evomerge.testing.merge_suite import ADAPTER_METHODS, MergeSetup, method_cases
from evomerge.testing.tiny_models import LORA_LAYOUT, char_llama
from evomerge.workers.tiers import TIERS, method_refusals

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
FLOAT32_BOUND = 1e-5
SAME_DTYPE_BOUND = 1e-2
BFLOAT16_BOUND = 0.1
SCORE_BOUND = 0.05
"""Per-example negative cross-entropy (nats per target token, ~ −4 for these untrained models) in
bfloat16 against float32: logits keep ~3 digits; measured on the CPU, the largest difference is
0.017. A model merged or read wrongly is off by far more."""
ALLOWANCE = 64 << 10
"""What the memory estimate, counting parameters, leaves out of a device's peak: the models'
non-parameter buffers (rotary frequencies), a merge's few scalar tensors and the allocator's
512-byte granularity — a few KiB for these models, under 2 % of every figure checked against it."""


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double().cpu()
    return float((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-12))


# --- every registered merge method, in every memory tier -----------------------------------------


@pytest.fixture(scope="module")
def llama_layout() -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a real (tiny) Llama: embeddings, attention, MLP, norms, head."""
    model, _ = char_llama()
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _tiered_cases() -> list:
    """Every registered method in every setup it accepts (``method_cases``), in every tier it can read."""
    cases = []
    for case in method_cases():
        method = case.values[0][0]
        for tier in TIERS:
            if tier not in method_refusals(method):
                cases.append(pytest.param(case.values[0], tier, id=f"{case.id}-{tier}"))
    return cases


def _merged(setup: MergeSetup, recipe, device: torch.device, tier: str, folder) -> dict[str, torch.Tensor]:
    targets = {name: t.to(device) for name, t in setup.targets().items()}
    setup.materializer(targets, tier=tier, folder=folder).apply(recipe)
    return targets


@pytest.mark.parametrize("case,tier", _tiered_cases())
def test_every_merge_method_in_every_tier_agrees_with_the_cpu(case, tier, llama_layout, tmp_path):
    method, n_models, with_base = case
    layout = LORA_LAYOUT if method.name in ADAPTER_METHODS else llama_layout
    space = Space.build(method, list(layout), n_models, granularity="global" if method.global_only else "per_tensor")
    recipe = space.decode(np.random.default_rng(0).uniform(0.05, 0.95, space.dim), seed=1)

    def merged(dtype: torch.dtype, device: torch.device, in_tier: str) -> dict[str, torch.Tensor]:
        setup = MergeSetup(method, n_models, with_base, dtype, layout)
        return _merged(setup, recipe, device, in_tier, tmp_path / f"{in_tier}-{dtype}-{device.type}")

    want = merged(torch.float32, CPU, "device")
    cpu16 = merged(torch.bfloat16, CPU, "device")
    got32, got16 = merged(torch.float32, CUDA, tier), merged(torch.bfloat16, CUDA, tier)
    for name in want:
        assert got16[name].device.type == CUDA.type and got16[name].dtype == torch.bfloat16, name
        assert torch.isfinite(got16[name]).all(), name
        assert relative_error(got32[name], want[name]) < FLOAT32_BOUND, name
        assert relative_error(got16[name], cpu16[name]) < SAME_DTYPE_BOUND, name
        assert relative_error(got16[name], want[name]) < BFLOAT16_BOUND, name


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_fused_kernels_compile_on_cuda_and_agree_with_eager(method, monkeypatch):
    """A model of at least ``FUSED_MIN_NUMEL`` runs TIES and DARE as compiled (Triton) loops on a GPU;
    they agree with the eager ops on the CPU, and none fell back."""
    from evomerge.merge import fused, resident, task_arithmetic

    layout = {f"model.layers.{i}.mlp.up_proj.weight": (256, 128) for i in range(4)}  # 2¹⁷ entries
    setup = MergeSetup(MERGE_METHODS[method], 3, True, torch.float32, layout)
    space = Space.build(setup.method, list(layout), 3, granularity="per_tensor")
    recipe = space.decode(np.random.default_rng(2).uniform(0.05, 0.95, space.dim), seed=3)
    with monkeypatch.context() as eager:
        eager.setattr(fused, "FUSED_MIN_NUMEL", 1 << 62)  # the CPU reference runs the eager ops
        want = _merged(setup, recipe, CPU, "device", None)
    kernels: list[FusedKernel] = [task_arithmetic._CONSENSUS, task_arithmetic._DARE_SUM, resident._INTERVAL_BLOCKS]
    got = _merged(setup, recipe, CUDA, "device", None)
    used = [k for k in kernels if k._compiled is not None]
    assert used, "no fused kernel was compiled"
    assert all(k.failure is None for k in kernels), [k.failure for k in kernels]
    for name in want:
        assert relative_error(got[name], want[name]) < FLOAT32_BOUND, name


# --- the white-box worker end to end -----------------------------------------------------------------


def _save_llamas(root, dtype: torch.dtype) -> None:
    """A base and three experts (base + 0.01 · noise) of a Llama with ~2 M parameters, with the
    character tokenizer, saved in ``dtype``; eight addition rows to score."""
    from evomerge.models.zoo.tiny_lm import build_tokenizer, skill_examples, tiny_llama

    tokenizer = build_tokenizer()
    model = tiny_llama(tokenizer, hidden=256, layers=2, heads=4, seed=0)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    for i, name in enumerate(["base", "expert0", "expert1", "expert2"]):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, p in model.named_parameters():
                p.copy_(base[key] + (0.01 * torch.randn(p.shape, generator=generator) if i else 0.0))
        model.to(dtype).save_pretrained(root / name)
        model.float()
        tokenizer.save_pretrained(root / name)
    rows = skill_examples("addition", 8, 0)
    (root / "data.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "target": r["target"]}) + "\n" for r in rows))


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-llamas")
    _save_llamas(root, torch.float32)
    return root


@pytest.fixture(scope="module")
def bf16_llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-bf16-llamas")
    _save_llamas(root, torch.bfloat16)
    return root


def _config(root, device: str, dtype: str, residency: str = "auto", method: str = "task_arithmetic"):
    return config_from_dict({
        "executor": "inline",
        "run_dir": str(root / "runs"),
        "models": {
            "base": str(root / "base"), "experts": [str(root / f"expert{i}") for i in range(3)],
            "device": device, "dtype": dtype, "residency": residency,
        },
        "merge": {"method": method},
        "populations": [{"name": "p", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 2},
    })


def _evaluated(config) -> tuple[dict[str, torch.Tensor], np.ndarray, str]:
    """A worker's merged parameters, per-example scores and memory tier for one fixed candidate."""
    from evomerge.workers.whitebox import WhiteBoxWorker

    worker = WhiteBoxWorker(RunPlan.from_config(config))
    try:
        genome = np.linspace(0.2, 0.8, worker.space.dim)
        evaluation = worker.evaluate(Candidate(id="p:1", population="p", genome=genome))
        assert evaluation.status == "ok", evaluation.error
        params = {name: p.detach().clone() for name, p in worker.models.model.named_parameters()}
        return params, np.asarray(evaluation.per_example), worker.models.materializer.tier.name
    finally:
        worker.close()


@pytest.mark.parametrize("residency", TIERS)
def test_a_worker_merges_and_scores_on_cuda_in_bfloat16(llamas, residency):
    want, want_scores, _ = _evaluated(_config(llamas, "cpu", "float32"))
    got, scores, tier = _evaluated(_config(llamas, "cuda", "bfloat16", residency))
    assert tier == residency
    assert {p.device.type for p in got.values()} == {"cuda"} and {p.dtype for p in got.values()} == {torch.bfloat16}
    for name in want:
        assert relative_error(got[name], want[name]) < BFLOAT16_BOUND, name
    assert scores.shape == want_scores.shape and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, want_scores, atol=SCORE_BOUND)


def test_auto_holds_bfloat16_checkpoints_in_bfloat16_on_cuda(bf16_llamas):
    """``models.device: auto`` picks the GPU, ``models.dtype: auto`` the checkpoints' bfloat16; the
    result is what the CPU computes from the same bfloat16 checkpoints."""
    want, want_scores, _ = _evaluated(_config(bf16_llamas, "cpu", "auto"))
    got, scores, _ = _evaluated(_config(bf16_llamas, "auto", "auto"))
    assert {p.device.type for p in got.values()} == {"cuda"} and {p.dtype for p in got.values()} == {torch.bfloat16}
    for name in want:
        assert relative_error(got[name], want[name]) < SAME_DTYPE_BOUND, name
    np.testing.assert_allclose(scores, want_scores, atol=SCORE_BOUND)


# --- every built-in fitness ------------------------------------------------------------------------

NEEDS = {"lm_eval": ("lm_eval",), "judge": ("fastapi", "uvicorn", "httpx"), "classification_accuracy": ("sklearn",)}
"""Modules a built-in needs beyond torch and transformers (the GPU image may lack them)."""


def _fitness_names() -> list[str]:
    from evomerge.fitness import FITNESS_FUNCTIONS

    return sorted(FITNESS_FUNCTIONS)


@pytest.mark.parametrize("name", _fitness_names())
def test_every_builtin_fitness_scores_on_cuda(name, request):
    from evomerge.fitness import FITNESS_FUNCTIONS, SCORE_RANGES, with_options
    from evomerge.testing.fitness_suite import EXAMPLE_KINDS, INPUT_BUILDERS, JUDGED, OPTIONS, FitnessSuite, _scores

    for module in NEEDS.get(name, ()):
        pytest.importorskip(module)
    options = OPTIONS[name]() if name in OPTIONS else {}
    if name in JUDGED:
        options = {**options, "judge": request.getfixturevalue("judge_options")}
    fitness = with_options(FITNESS_FUNCTIONS[name], name, options)
    build = INPUT_BUILDERS[EXAMPLE_KINDS[name]]

    want = _scores(fitness, build())  # float32 on the CPU
    on_gpu = build()
    on_gpu.model.to(CUDA)
    np.testing.assert_allclose(_scores(fitness, on_gpu), want, rtol=1e-4, atol=1e-4)  # float32 on CUDA: the same

    in_bf16 = build()
    in_bf16.model.to(CUDA, torch.bfloat16)
    suite = FitnessSuite()  # the fitness contract, on the GPU in bfloat16
    suite.test_one_finite_score_per_example(fitness, in_bf16)
    suite.test_any_number_of_examples_gives_as_many_scores(fitness, in_bf16)
    suite.test_same_model_same_scores(fitness, in_bf16)
    suite.test_leaves_the_model_as_it_was(fitness, in_bf16)
    scores = _scores(fitness, in_bf16)
    bounds = SCORE_RANGES[name]
    if bounds is not None:
        assert ((scores >= bounds[0]) & (scores <= bounds[1])).all(), scores
    elif name == "negative_cross_entropy":  # continuous: close to float32
        np.testing.assert_allclose(scores, want, atol=SCORE_BOUND)


# --- the memory check and the tiers' peaks ----------------------------------------------------------


def _warm_cuda() -> None:
    """Make the device's one-off allocations (the CUDA context, cuBLAS workspaces for each dtype)
    before a peak is measured: they are the process's, not a worker's."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        a = torch.ones(64, 64, dtype=dtype, device=CUDA)
        (a @ a).sum().item()
    gc.collect()
    torch.cuda.synchronize(CUDA)


def test_the_memory_check_reads_the_devices_free_memory(llamas):
    free_now, total = torch.cuda.mem_get_info(CUDA)
    free = memory.FreeMemory.measure(CUDA)
    assert free.device is not None and 0 < free.device <= total
    assert abs(free.device - free_now) <= 64 << 20  # nothing of size allocates in between
    assert free.host is not None and free.host > 0
    config = _config(llamas, "cuda:0", "bfloat16")  # an explicit index: the same device
    tiers = memory.tier_memory(config, CUDA)
    assert memory.check_memory(config, 1, torch.device("cuda:0")).tier == "device"  # a few MiB fit any GPU
    assert tiers["device"].device_peak < free.device
    # a device with less room than the device tier needs streams the experts from host memory
    short = memory.FreeMemory(tiers["device"].device_peak - 1, free.host)
    assert memory.check_memory(config, 1, CUDA, short).tier == "host"
    # a worker with residency auto makes the same measured choice, and on a GPU pins the host tier
    from evomerge.models.memory import worker_placement

    tier, placement = worker_placement(_config(llamas, "cuda", "bfloat16"))
    assert tier == "device" and placement.primary.type == "cuda"


def test_the_host_tier_pins_the_experts_on_a_gpu(llamas):
    from evomerge.workers.whitebox import WhiteBoxWorker

    worker = WhiteBoxWorker(RunPlan.from_config(_config(llamas, "cuda", "bfloat16", "host")))
    try:
        tensors = worker.models.materializer.tensors.values()
        assert all(t.stack.device.type == "cpu" and t.stack.is_pinned() for t in tensors)
        assert all(t.reference is not None and t.reference.is_pinned() for t in tensors)
        assert {p.device.type for p in worker.models.model.parameters()} == {"cuda"}
    finally:
        worker.close()


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear"])
@pytest.mark.parametrize("tier", TIERS)
def test_loading_and_a_merge_peak_within_the_memory_estimate(llamas, tier, method):
    """The memory check's device figure for a tier is an upper bound on what loading the worker and
    merging a candidate allocate on the GPU (``torch.cuda.max_memory_allocated``): the working
    model, what the tier holds there, one expert while it loads, and the streamed blocks.

    Measured twice: over loading, and over a merge after a first one (which compiles DARE's fused
    kernel: Triton's one-off allocations while it tunes are the process's, as cuBLAS workspaces are).

    Linear combinations (and DARE's masked one), whose work the tiers' claim is about. TIES is left
    out: its magnitude histograms keep buffers the estimate's work term does not count (2¹⁵ or
    2²⁰ bins of counts and sums, 16 bytes per entry of a row up to 2²⁰), which on a model this
    small exceed the term, as the chunk it is sized by is capped by the model's size."""
    from evomerge.workers.whitebox import WhiteBoxWorker

    config = _config(llamas, "cuda", "bfloat16", tier, method)
    need = memory.tier_memory(config, CUDA)[tier].device_peak
    assert ALLOWANCE < 0.02 * need  # the allowance is small beside what is checked
    _warm_cuda()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(CUDA)
    torch.cuda.reset_peak_memory_stats(CUDA)
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    try:
        loading = torch.cuda.max_memory_allocated(CUDA) - before
        space = worker.space
        worker.materialize(Candidate(id="p:0", population="p", genome=np.full(space.dim, 0.5)))
        torch.cuda.synchronize(CUDA)
        torch.cuda.reset_peak_memory_stats(CUDA)
        genome = np.random.default_rng(1).uniform(0.2, 0.8, space.dim)
        worker.materialize(Candidate(id="p:1", population="p", genome=genome))
        torch.cuda.synchronize(CUDA)
        merging = torch.cuda.max_memory_allocated(CUDA) - before
        model = sum(p.numel() * p.element_size() for p in worker.models.model.parameters())
    finally:
        worker.close()
    for phase, peak in (("loading", loading), ("merging", merging)):
        assert peak <= need + ALLOWANCE, f"{phase}: {memory.size(peak)} against an estimate of {memory.size(need)}"
        assert peak >= model, phase  # the working model at least: the measurement saw the worker
