"""The worker's memory, estimated from model configs, matches what it holds; runs that cannot fit
are refused before anything loads."""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch
import yaml

from evomerge.plan import RunPlan
from evomerge.cli import main
from evomerge.config import config_from_dict
from evomerge.errors import ConfigError, InsufficientMemoryError
from evomerge.models import host_memory, memory
from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama
from evomerge.records import Candidate
from evomerge.workers.whitebox import WhiteBoxWorker

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    tokenizer = build_tokenizer()
    base = tiny_llama(tokenizer, hidden=32, layers=2, heads=2, seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for i in range(3):
        torch.manual_seed(i)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn_like(p))
        base.save_pretrained(root / f"expert{i}")
        tokenizer.save_pretrained(root / f"expert{i}")
    (root / "data.jsonl").write_text(json.dumps({"prompt": "12+30=", "target": "42"}) + "\n")
    return root


def _config(root, dtype="float32", base=True):
    document = {
        "executor": "inline",
        "run_dir": str(root / "runs" / dtype),
        "models": {"experts": [str(root / f"expert{i}") for i in range(3)], "device": "cpu", "dtype": dtype},
        "merge": {"method": "task_arithmetic" if base else "linear"},
        "populations": [{"name": "p", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 2},
    }
    if base:
        document["models"]["base"] = str(root / "base")
    return document


@pytest.mark.parametrize("dtype,base", [("float32", True), ("bfloat16", True), ("float32", False), ("auto", True)])
def test_estimate_equals_what_the_worker_holds(llamas, dtype, base):
    config = config_from_dict(_config(llamas, dtype, base))
    estimate = memory.tier_memory(config, CPU)["device"]
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    held = sum(p.numel() * p.element_size() for p in worker.models.model.parameters())
    for tensor in worker.models.materializer.tensors.values():
        held += tensor.stack.numel() * tensor.stack.element_size()
        if tensor.reference is not None:
            held += tensor.reference.numel() * tensor.reference.element_size()
    assert estimate.resident == held
    # float32 checkpoints load through the page cache; converted to bfloat16, each is built in memory
    assert (estimate.peak > estimate.resident) == (dtype == "bfloat16")


def test_a_run_that_fits_no_tier_is_refused_before_it_starts(llamas, tmp_path, monkeypatch, capsys):
    document = _config(llamas)
    document["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    tiers = memory.tier_memory(config_from_dict(document), CPU)
    need = tiers["mmap"].peak  # the smallest
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)  # a machine just too small

    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "fit no memory tier" in err and "lower workers.count" in err
    assert "in float32 (models.dtype)" in err
    for tier, figures in tiers.items():  # every tier with what it needs, and what there is
        assert f"memory tier '{tier}'" in err and memory.size(figures.peak) in err
    assert f"{memory.size(need - 1)} free" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "run.db").exists()


def test_fisher_merging_counts_each_experts_fisher(llamas):
    document = _config(llamas, base=False)
    document["merge"] = {"method": "fisher"}
    document["models"]["experts"] = [
        {"path": str(llamas / f"expert{i}"), "data": {"source": str(llamas / "data.jsonl")}} for i in range(3)
    ]
    config = config_from_dict(document)
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    held = sum(p.numel() * p.element_size() for p in worker.models.model.parameters())
    for name, tensor in worker.models.materializer.tensors.items():
        held += tensor.stack.numel() * tensor.stack.element_size()
        held += worker.models.materializer.fishers[name].numel() * worker.models.materializer.fishers[name].element_size()
    assert memory.tier_memory(config, CPU)["device"].resident == held


@pytest.fixture(scope="module")
def bf16_llamas(llamas, tmp_path_factory):
    """The same models saved in bfloat16, as 7B checkpoints are."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bf16")
    tokenizer = build_tokenizer()
    for name in ("base", "expert0", "expert1", "expert2"):
        AutoModelForCausalLM.from_pretrained(llamas / name, dtype=torch.bfloat16).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "data.jsonl").write_text((llamas / "data.jsonl").read_text())
    return root


def test_auto_holds_bfloat16_checkpoints_in_bfloat16(bf16_llamas):
    config = config_from_dict(_config(bf16_llamas, "auto"))
    assert config.models.dtype == "auto"  # the default is auto too
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    assert {p.dtype for p in worker.models.model.parameters()} == {torch.bfloat16}
    estimate = memory.tier_memory(config, CPU)["device"]
    assert estimate.dtype == "bfloat16"
    held = sum(p.numel() * p.element_size() for p in worker.models.model.parameters())
    for tensor in worker.models.materializer.tensors.values():
        held += tensor.stack.numel() * tensor.stack.element_size() + tensor.reference.numel() * tensor.reference.element_size()
    assert estimate.resident == held


def test_the_refusal_names_the_dtype_auto_chose(bf16_llamas, monkeypatch):
    document = _config(bf16_llamas, "auto")
    del document["models"]["dtype"]
    config = config_from_dict(document)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    with pytest.raises(InsufficientMemoryError) as info:
        memory.check_memory(config, 1, torch.device("cpu"))
    message = str(info.value)
    assert "in bfloat16 (models.dtype auto: the checkpoints' own)" in message and "memory tier 'mmap'" in message
    assert "use models.dtype bfloat16" not in message  # already there: not advice


def test_auto_takes_the_fastest_tier_that_fits(llamas):
    config = config_from_dict(_config(llamas))
    tiers = memory.tier_memory(config, CPU)
    assert list(tiers) == ["device", "host", "mmap"]
    # the mapped tier keeps only the working model and a few tensor-sized buffers
    assert tiers["mmap"].peak < tiers["device"].peak <= tiers["host"].peak

    def chosen(free: int, device: torch.device = CPU, host: int | None = None) -> str:
        return memory.check_memory(config, 1, device, memory.FreeMemory(free, free if host is None else host)).tier

    assert chosen(tiers["host"].peak) == "device"
    assert chosen(tiers["device"].peak - 1) == "mmap"  # on a CPU host memory is the same memory
    assert chosen(tiers["mmap"].peak) == "mmap"
    # on a GPU too small for the experts, host memory that holds them streams them in
    gpu = memory.tier_memory(config, torch.device("cuda"))
    roomy = gpu["host"].host_peak
    assert chosen(gpu["device"].device_peak - 1, torch.device("cuda"), roomy) == "host"
    assert chosen(gpu["host"].device_peak, torch.device("cuda"), roomy - 1) == "mmap"  # nor host memory
    assert chosen(gpu["device"].device_peak, torch.device("cuda"), roomy) == "device"


def test_a_local_ray_pool_leaves_out_what_rays_memory_monitor_keeps_free(llamas, monkeypatch):
    """Two 1 B-parameter workers fitted the device tier in MemAvailable with 0.5 GiB to spare, but
    Ray's memory monitor kills workers once 95 % of the machine is in use: they were killed while
    loading. The pool's check leaves that margin out, so it takes the mapped tier instead."""
    from evomerge.executors.ray import pool_memory

    config = config_from_dict(_config(llamas))
    tiers = memory.tier_memory(config, CPU)
    total = 20 * tiers["device"].peak  # Ray keeps one device-tier worker's peak free
    free = 2 * tiers["device"].peak + total // 100  # two workers fit, with 1 % of the machine to spare
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    monkeypatch.setattr(memory, "total_bytes", lambda: total)
    monkeypatch.setattr(host_memory, "process_anon_bytes", lambda: 0)  # counted in the next test
    monkeypatch.delenv("RAY_memory_usage_threshold", raising=False)
    monkeypatch.delenv("RAY_memory_monitor_refresh_ms", raising=False)
    monkeypatch.delenv("RAY_min_memory_free_bytes", raising=False)
    assert memory.check_memory(config, 2, CPU).tier == "device"  # what the pool took before
    assert pool_memory(config, 2, 0.0)[0].tier == "mmap"
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")  # the monitor is off: nothing to keep free
    assert pool_memory(config, 2, 0.0)[0].tier == "device"

    monkeypatch.delenv("RAY_memory_monitor_refresh_ms")
    monkeypatch.setattr(memory, "available_bytes", lambda device: tiers["mmap"].peak)
    with pytest.raises(InsufficientMemoryError) as refused:
        pool_memory(config, 2, 0.0)
    reserve = total - int(total * 0.95)
    assert f"free after the {memory.size(reserve)} Ray's memory monitor keeps free (RAY_memory_usage_threshold)" in str(
        refused.value
    )


def test_a_local_ray_pool_counts_what_each_worker_process_holds_before_loading(llamas, monkeypatch):
    """With the monitor's margin left out, two 1 B-parameter workers still fitted the device tier
    by 0.5 GiB, and were killed: each Ray worker process holds ~0.4 GiB of its own (Python, torch,
    transformers) that the per-worker figures do not count."""
    from evomerge.executors.ray import pool_memory

    config = config_from_dict(_config(llamas))
    tiers = memory.tier_memory(config, CPU)
    process = tiers["device"].peak // 4
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * tiers["device"].peak + process)
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")
    monkeypatch.setattr(host_memory, "process_anon_bytes", lambda: process)
    assert pool_memory(config, 2, 0.0)[0].tier == "mmap"
    monkeypatch.setattr(host_memory, "process_anon_bytes", lambda: process // 2)
    assert pool_memory(config, 2, 0.0)[0].tier == "device"

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * process)
    with pytest.raises(InsufficientMemoryError, match=rf"after the {memory.size(2 * process // 2)} 2 worker processes take"):
        pool_memory(config, 2, 0.0)


def test_rays_monitor_reserve_follows_its_settings():
    from evomerge.executors.ray import monitor_reserve

    gib = 1 << 30
    assert monitor_reserve(100 * gib, {}) == 5 * gib  # memory_usage_threshold 0.95
    assert monitor_reserve(100 * gib, {"RAY_memory_usage_threshold": "0.8"}) == 20 * gib
    # the monitor kills at the later of the two limits: the smaller reserve
    assert monitor_reserve(100 * gib, {"RAY_min_memory_free_bytes": str(gib)}) == gib
    assert monitor_reserve(100 * gib, {"RAY_memory_monitor_refresh_ms": "0"}) == 0
    assert monitor_reserve(None, {}) == 0


def test_models_residency_overrides_the_choice(llamas):
    document = _config(llamas)
    document["models"]["residency"] = "host"
    config = config_from_dict(document)
    plenty = memory.FreeMemory(1 << 50, 1 << 50)
    assert memory.check_memory(config, 1, CPU, plenty).tier == "host"
    need = memory.tier_memory(config, CPU)["host"].peak
    with pytest.raises(InsufficientMemoryError, match="models.residency host"):  # only the named tier is tried
        memory.check_memory(config, 1, CPU, memory.FreeMemory(need - 1, need - 1))


def test_a_tier_the_method_cannot_use_is_refused_with_the_reason(llamas):
    document = _config(llamas, base=False)
    document["merge"] = {"method": "fisher"}
    document["models"]["residency"] = "mmap"
    document["models"]["experts"] = [
        {"path": str(llamas / f"expert{i}"), "data": {"source": str(llamas / "data.jsonl")}} for i in range(3)
    ]
    config = config_from_dict(document)
    with pytest.raises(ConfigError, match="models.residency is mmap but fisher keeps each expert's Fisher"):
        memory.check_memory(config, 1, CPU)
    assert list(memory.tier_memory(config, CPU)) == ["device", "host"]


@pytest.mark.parametrize("residency", ["host", "mmap"])
def test_a_worker_merges_identically_in_every_tier(llamas, residency):
    """Real checkpoints: the mapped tier finds every parameter under its name in the files."""

    def merged(tier: str) -> dict[str, torch.Tensor]:
        document = _config(llamas)
        document["models"]["residency"] = tier
        worker = WhiteBoxWorker(RunPlan.from_config(config_from_dict(document)))
        genome = np.linspace(0.2, 0.8, worker.space.dim)
        worker.materialize(Candidate(id="p:1", population="p", genome=genome))
        params = {n: p.detach().clone() for n, p in worker.models.model.named_parameters()}
        worker.close()
        return params

    want, got = merged("device"), merged(residency)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_the_phase_line_names_the_chosen_tier(llamas):
    from evomerge.executors.base import InlineExecutor

    document = _config(llamas)
    document["models"]["residency"] = "mmap"
    phases: list[str] = []
    executor = InlineExecutor(config_from_dict(document), on_phase=phases.append)
    assert phases == [
        "loading models (memory tier mmap: the working model on cpu, 3 experts and the base mapped from their"
        f" files, {memory.size(memory.tier_memory(config_from_dict(document), CPU)['mmap'].peak)} per worker at its peak)"
    ]
    assert executor.worker.models.materializer.tier.name == "mmap"


def test_a_dataflow_estimate_equals_what_its_worker_holds(llamas):
    document = _config(llamas, base=False)
    document["merge"] = {"space": "dataflow", "dataflow": {"repeats": 2}}
    config = config_from_dict(document)
    assert list(memory.tier_memory(config, CPU)) == ["device"]
    estimate = memory.tier_memory(config, CPU)["device"]
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    held = {p.data_ptr(): p.numel() * p.element_size() for p in worker.models.model.parameters()}
    for source in worker.models.materializer.layers:
        held.update({p.data_ptr(): p.numel() * p.element_size() for layer in source for p in layer.parameters()})
    whole = sum(p.numel() * p.element_size() for p in worker.models.model.parameters())
    assert estimate.resident == sum(held.values())
    assert estimate.peak == 3 * whole  # the three sources load whole before the others' heads go


def _long_rows_dataflow(llamas, tmp_path, **dataflow) -> dict:
    """A data-flow run over the three 2-layer llamas scoring long rows: the KV cache of a long path
    outweighs these tiny models."""
    rows = [{"prompt": "1234567890+" * (4 + i), "target": "42" * (i + 1)} for i in range(3)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    document = _config(llamas, base=False)
    document["run_dir"] = str(tmp_path / "run")
    document["merge"] = {"space": "dataflow", "dataflow": {"repeats": 2, **dataflow}}
    document["fitness"] = {"name": "negative_cross_entropy", "data": {"source": str(tmp_path / "long.jsonl")}, "options": {"batch_size": 2}}
    return document


def test_a_dataflow_estimate_counts_the_kv_cache_a_path_position_holds(llamas, tmp_path):
    from evomerge.models.path_memory import with_path_length
    from evomerge.space.paths import Path

    config = config_from_dict(_long_rows_dataflow(llamas, tmp_path))
    need = memory.tier_memory(config, CPU)["device"]
    assert need.path.positions == 12 and need.path.shortest == 2  # 2 repeats of 3 × 2 layers; the head's depth
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    try:
        tokenizer = worker.models.tokenizer
        longest = "1234567890+" * 6 + "42" * 3  # the longest row: two of its size fill a batch
        ids = torch.tensor([tokenizer(longest)["input_ids"]] * 2)
        path = Path(((0, 0), (1, 1), (2, 0), (0, 0), (1, 1)), (1.0,) * 5)
        worker.models.materializer.apply(path)
        with torch.no_grad():
            cache = worker.models.model(ids, use_cache=True).past_key_values
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    finally:
        worker.close()
    assert held == 5 * need.path.per_position
    assert with_path_length(need, 5).device_peak == max(need.path.loading_peak, need.resident + held)


def test_a_path_too_long_for_memory_is_refused_naming_max_layers(llamas, tmp_path, monkeypatch, capsys):
    from evomerge.models.path_memory import with_path_length

    document = _long_rows_dataflow(llamas, tmp_path)
    need = memory.tier_memory(config_from_dict(document), CPU)["device"]
    room = with_path_length(need, 7).peak  # paths of 7 layers fit, 8 do not
    assert need.path.loading_peak < room < need.peak  # the sources fit: what does not is the longest paths' cache
    monkeypatch.setattr(memory, "available_bytes", lambda device: room)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "merge.dataflow.max_layers: 1 worker(s) scoring paths of up to 12 layers (every slot" in err
    assert "set merge.dataflow.max_layers to 7 or less" in err and "batches of 2 × " in err
    assert not (tmp_path / "run" / "run.db").exists()
    # bounded there, the run fits; bounded higher, it is refused the same way
    fits = config_from_dict(_long_rows_dataflow(llamas, tmp_path, max_layers=7))
    assert memory.check_memory(fits, 1, CPU).path.positions == 7
    with pytest.raises(InsufficientMemoryError, match=r"up to 9 layers \(merge.dataflow.max_layers\).*to 7 or less"):
        memory.check_memory(config_from_dict(_long_rows_dataflow(llamas, tmp_path, max_layers=9)), 1, CPU)


def test_a_ties_estimate_counts_the_magnitude_histogram_it_builds(tmp_path):
    """TIES ranks each task vector's magnitudes from a histogram built in reusable buffers (32 MiB
    in float32 whatever the model's size): the estimate's work term holds them and every other
    buffer the merge kept."""
    tokenizer = build_tokenizer()
    base = tiny_llama(tokenizer, hidden=128, layers=1, heads=2, seed=0)  # 128 × 512 MLP rows: binned, not sorted
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    for i in range(2):
        torch.manual_seed(i)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn_like(p))
        base.save_pretrained(tmp_path / f"expert{i}")
        tokenizer.save_pretrained(tmp_path / f"expert{i}")
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "12+30=", "target": "42"}) + "\n")
    document = _config(tmp_path)
    document["models"]["experts"] = [str(tmp_path / f"expert{i}") for i in range(2)]
    document["merge"] = {"method": "ties"}
    config = config_from_dict(document)
    estimate = memory.tier_memory(config, CPU)["device"]
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    try:
        worker.materialize(Candidate(id="p:1", population="p", genome=np.full(worker.space.dim, 0.5)))
        buffers = {name: b.numel() * b.element_size() for (name, _, _), b in worker.models.materializer._scratch._buffers.items()}
    finally:
        worker.close()
    assert sum(v for name, v in buffers.items() if name.startswith("histogram")) > 0  # the merge did bin magnitudes
    assert sum(buffers.values()) <= estimate.peak - estimate.resident  # float32 loads through the page cache: the rest is work
