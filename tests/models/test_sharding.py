"""A worker spanning several devices (``models.devices``): the shard plan and its per-device memory
arithmetic for made-up device capacities, the refusals, and the sharded loading and merging path
run on the CPU (every shard on cpu), which must merge exactly as a worker on one device does. The
same run across two real GPUs is the CUDA test at the end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.config import config_from_dict
from evomerge.errors import ConfigError, InsufficientMemoryError
from evomerge.models import memory
from evomerge.models.loading import meta_model
from evomerge.models.sharding import Placement, ShardCost, model_units, plan_shards
from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama
from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.workers.whitebox import WhiteBoxWorker, load_resident_models

CUDA = torch.device("cuda")
LAYERS = 6
EXPERTS = 2


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A base and two experts (tiny Llamas of six layers) with a tokenizer, and a fitness data file."""
    root = tmp_path_factory.mktemp("shard-llamas")
    tokenizer = build_tokenizer()
    model = tiny_llama(tokenizer, hidden=32, layers=LAYERS, heads=2, seed=0)
    for name in ("base", *(f"expert{i}" for i in range(EXPERTS))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    (root / "data.jsonl").write_text(json.dumps({"prompt": "12+30=", "target": "42"}) + "\n")
    return root


def _document(root, devices: int = 4, device: str = "cuda", method: str = "linear", base: bool = False) -> dict:
    document = {
        "executor": "inline",
        "run_dir": str(root / "runs" / f"{devices}-{method}"),
        "models": {
            "experts": [str(root / f"expert{i}") for i in range(EXPERTS)],
            "device": device,
            "devices": devices,
            "dtype": "float32",
        },
        "merge": {"method": method},
        "populations": [{"name": "p", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 2},
    }
    if base:
        document["models"]["base"] = str(root / "base")
    return document


def _free(capacity: int, devices: int = 4) -> memory.FreeMemory:
    return memory.FreeMemory(capacity, 1 << 50, (capacity,) * devices)


def _shards_by_unit(device_map: dict[str, int], names) -> dict[str, int]:
    """The device of every parameter: the device map's one key that is its module (or itself)."""
    placed = {}
    for name in names:
        keys = [key for key in device_map if name == key or name.startswith(key + ".")]
        assert len(keys) == 1, (name, keys)
        placed[name] = device_map[keys[0]]
    return placed


def test_the_plan_keeps_layers_whole_in_order_within_each_device(llamas):
    config = config_from_dict(_document(llamas))
    model = meta_model(str(llamas / "base"))
    per_param = {name: p.numel() * 4 for name, p in model.named_parameters()}
    unbounded = memory.check_memory(config, 1, CUDA, memory.FreeMemory(None, None, (None,) * 4))
    capacity = max(unbounded.shards.peaks) + 1000
    need = memory.check_memory(config, 1, CUDA, _free(capacity))
    assert need.tier == "device" and need.shards is not None
    device_map = need.shards.device_map
    # decoder layers whole: each is one key of the map, and every parameter has exactly one key
    assert all(f"model.layers.{i}" in device_map for i in range(LAYERS))
    where = _shards_by_unit(device_map, per_param)
    assert list(where.values()) == sorted(where.values())  # contiguous, in model order
    assert where["model.embed_tokens.weight"] == 0 and where["lm_head.weight"] == 3
    assert set(where.values()) == {0, 1, 2, 3}  # balanced: every device holds a share
    for d in range(4):
        shard = sum(size for name, size in per_param.items() if where[name] == d)
        # a linear merge without a base: the shard, each expert's copy of it, and one more expert's
        # shard while the tier loads on a GPU (an elementwise method has no work buffers)
        assert need.shards.peaks[d] == shard * (1 + EXPERTS + 1) <= capacity
    assert need.device_peak == max(need.shards.peaks)
    assert "on 4 cuda devices" in need.description and "beside its shards" in need.description
    assert ", ".join(memory.size(p) for p in need.shards.peaks) + " of its 4 cuda devices" in memory.summary(need, CUDA)


def test_the_plan_makes_the_largest_device_as_small_as_it_can_be(llamas):
    document = _document(llamas)
    document["models"]["residency"] = "device"
    config = config_from_dict(document)
    best = memory.check_memory(config, 1, CUDA, memory.FreeMemory(None, None, (None,) * 4)).shards
    assert memory.check_memory(config, 1, CUDA, _free(max(best.peaks))).shards == best
    with pytest.raises(InsufficientMemoryError):  # a byte less and no split of whole layers fits
        memory.check_memory(config, 1, CUDA, _free(max(best.peaks) - 1))
    document["models"]["residency"] = "auto"  # then the experts stream from host memory, shard by shard
    streamed = memory.check_memory(config_from_dict(document), 1, CUDA, _free(max(best.peaks) - 1))
    assert streamed.tier == "host" and max(streamed.shards.peaks) < max(best.peaks)


def test_a_device_with_less_free_memory_takes_a_smaller_shard(llamas):
    config = config_from_dict(_document(llamas, devices=2))
    best = memory.check_memory(config, 1, CUDA, memory.FreeMemory(None, None, (None, None))).shards
    small = min(best.peaks) * 2 // 3
    plan = memory.check_memory(config, 1, CUDA, memory.FreeMemory(small, 1 << 50, (small, 1 << 40))).shards
    assert plan.peaks[0] <= small < plan.peaks[1]


def test_a_model_too_large_for_its_devices_is_refused_with_each_devices_figures(llamas):
    document = _document(llamas)
    document["models"]["residency"] = "mmap"
    config = config_from_dict(document)
    best = memory.check_memory(config, 1, CUDA, memory.FreeMemory(None, None, (None,) * 4)).shards
    too_small = max(best.peaks) - 1
    with pytest.raises(InsufficientMemoryError) as info:
        memory.check_memory(config, 1, CUDA, _free(too_small))
    message = str(info.value)
    assert "memory tier 'mmap'" in message and "cuda:0 to cuda:3 at best (decoder layers whole)" in message
    assert ", ".join(memory.size(p) for p in best.peaks) in message
    assert f"they have {', '.join([memory.size(too_small)] * 4)} free" in message
    assert "raise models.devices" in message and "lower workers.count" not in message


def test_tied_embeddings_stay_on_one_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    units = model_units(model, 4, {name for name, _ in model.named_parameters()})
    head = next(u for u in units if u.name == "lm_head")
    assert head.tied_to == "model.embed_tokens" and head.size == 0
    plan = plan_shards(units, ShardCost(held_rows=2), [None] * 3)
    assert plan.device_map["lm_head"] == plan.device_map["model.embed_tokens"] == 0
    assert sum(u.size for u in units) == sum(p.numel() * 4 for p in model.parameters())  # the tie counted once


def test_a_unit_larger_than_every_device_fits_nowhere():
    units = model_units(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 64)), 4, set())
    cost = ShardCost()
    assert plan_shards(units, cost, [300, 10_000]).device_map == {"0": 0, "1": 1}
    assert plan_shards(units, cost, [2000, 2000]) is None  # 64·8 + 64 floats: 2304 bytes, never split


@pytest.mark.parametrize("tier", ["device", "host", "mmap"])
def test_sharded_loading_merges_exactly_as_one_device(llamas, tier):
    """The sharded path on the CPU: the working model loads by device map, every tier keeps each
    expert tensor on its target's device, and the merge is bit for bit the one-device merge."""
    method = "ties"  # a kernel with work buffers, a base and per-tensor thresholds
    one_device = _document(llamas, devices=1, device="cpu", method=method, base=True)
    one_device["models"]["residency"] = tier
    worker = WhiteBoxWorker(RunPlan.from_config(config_from_dict(one_device)))
    genome = np.linspace(0.2, 0.8, worker.space.dim)
    worker.materialize(Candidate(id="p:1", population="p", genome=genome))
    want = {name: p.detach().clone() for name, p in worker.models.model.named_parameters()}
    worker.close()

    config = config_from_dict(_document(llamas, devices=2, device="cuda", method=method, base=True))
    plan = RunPlan.from_config(config)
    shards = memory.check_memory(config, 1, CUDA, memory.FreeMemory(None, None, (None, None))).shards
    placement = Placement((torch.device("cpu"), torch.device("cpu")), shards.device_map)
    loaded = load_resident_models(plan, placement, tier)
    assert loaded.materializer.tier.name == tier
    layout = {name: tuple(t.shape) for name, t in loaded.materializer.targets.items()}
    loaded.materializer.apply(plan.codecs(loaded.space, layout)["p"].decode(genome))
    got = dict(loaded.model.named_parameters())
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_more_devices_than_a_cpu_has_is_refused_naming_the_field(llamas, tmp_path, capsys):
    with pytest.raises(ConfigError, match="models.devices: a worker spanning 2 devices shards the model over CUDA GPUs"):
        config_from_dict(_document(llamas, devices=2, device="cpu"))
    with pytest.raises(ConfigError, match="models.devices: .*'cuda:1' names one device"):
        config_from_dict(_document(llamas, devices=2, device="cuda:1"))
    visible = torch.cuda.device_count()
    document = _document(llamas, devices=max(2, visible + 1))
    document["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"models.devices is {max(2, visible + 1)} but {visible} CUDA device(s) are visible" in err
    assert "Traceback" not in err


def test_what_a_spanning_worker_cannot_do_is_refused_naming_the_field(llamas):
    document = _document(llamas)
    document["merge"] = {"space": "dataflow"}
    with pytest.raises(ConfigError, match="models.devices: a data-flow worker runs the sources' own layers"):
        RunPlan.from_config(config_from_dict(document))
    document = _document(llamas)
    document["workers"] = {"gpus_per_worker": 1}
    with pytest.raises(ConfigError, match="workers.gpus_per_worker is 1 but models.devices is 4"):
        config_from_dict(document)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_worker_spanning_two_gpus_merges_and_scores_as_one_gpu(llamas):
    def evaluated(devices: int):
        document = _document(llamas, devices=devices, base=True, method="ties")
        worker = WhiteBoxWorker(RunPlan.from_config(config_from_dict(document)))
        genome = np.linspace(0.2, 0.8, worker.space.dim)
        evaluation = worker.evaluate(Candidate(id="p:1", population="p", genome=genome))
        params = {name: p.detach().cpu() for name, p in worker.models.model.named_parameters()}
        used = {p.device for p in worker.models.model.parameters()}
        worker.close()
        return evaluation, params, used

    one, one_params, one_devices = evaluated(1)
    two, two_params, two_devices = evaluated(2)
    assert one_devices == {torch.device("cuda", 0)}
    assert two_devices == {torch.device("cuda", 0), torch.device("cuda", 1)}
    for name in one_params:
        assert torch.equal(two_params[name], one_params[name]), name
    assert two.status == one.status and two.fitness == pytest.approx(one.fitness, rel=1e-5)
