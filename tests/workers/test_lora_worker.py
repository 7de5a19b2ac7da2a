"""LoRA adapters as experts: composed in a resident peft slot (lora_compose) or as dense experts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.config import config_from_dict
from evomerge.errors import ModelLoadError, ModelMismatchError
from evomerge.workers.materializer import Materializer
from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama
from evomerge.workers.whitebox import WhiteBoxWorker

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _adapter(base_dir, out_dir, seed: int, r: int = 4, alpha: int = 8):
    """A LoRA adapter with random (non-zero) A and B, saved the way peft saves trained adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer = build_tokenizer()
    base = tiny_llama(tokenizer, hidden=32, layers=2, heads=2, seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    # Different lora_alpha: the second adapter's scaling (4) differs from the first's (2).
    adapters = [_adapter(root / "base", root / "add", 1, alpha=8), _adapter(root / "base", root / "rev", 2, alpha=16)]
    _adapter(root / "base", root / "rank8", 3, r=8, alpha=16)
    rows = [{"prompt": "12+30=", "target": "42"}, {"prompt": "abc>", "target": "cba"}]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, adapters


def _config(root, experts, method: str, dtype: str = "float32", **merge):
    return config_from_dict(
        {
            "executor": "inline",
            "models": {"base": str(root / "base"), "experts": [str(e) for e in experts], "device": "cpu", "dtype": dtype},
            "merge": {"method": method, "granularity": "per_model", **merge},
            "populations": [{"name": "p", "strategy": "random"}],
            "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
            "budget": {"evaluations": 4},
        }
    )


def _peft_logits(base_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[4, 5, 40, 6, 7, 43, 8]])


def test_lora_compose_one_hot_beta_reproduces_each_adapter_as_peft_loads_it(lora_models):
    root, adapters = lora_models
    worker = WhiteBoxWorker(RunPlan.from_config(_config(root, adapters, "lora_compose")))
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in worker.models.tensor_names)
    for i, adapter in enumerate(adapters):
        genome = worker.space.encode({"alpha": 1.0, "beta": np.eye(2)[i]})
        worker.materialize(Candidate("p:0", "p", genome))
        with torch.no_grad():
            logits = worker.models.model(input_ids=IDS).logits
        torch.testing.assert_close(logits, _peft_logits(root / "base", adapter, IDS), rtol=1e-5, atol=1e-5)


def test_worker_merge_equals_the_merge_engine_bit_for_bit(lora_models):
    """The worker's loading (adapter keys, scaling folded into B) feeds the engine the same stacks
    as the adapter files themselves; a random candidate lands in the working model unchanged."""
    from safetensors.torch import load_file

    root, adapters = lora_models
    worker = WhiteBoxWorker(RunPlan.from_config(_config(root, adapters, "lora_compose")))
    genome = np.random.default_rng(0).uniform(size=worker.space.dim)
    worker.materialize(Candidate("p:0", "p", genome))

    files = [load_file(a / "adapter_model.safetensors") for a in adapters]
    ratio = (16 / 4) / (8 / 4)
    files[1] = {k: v * ratio if "lora_B" in k else v for k, v in files[1].items()}
    outputs = {k: torch.empty_like(v) for k, v in files[0].items()}
    engine = Materializer.from_state_dicts(outputs, [(str(i), f) for i, f in enumerate(files)], 2)
    engine.apply(worker.space.decode(genome))
    working = dict(zip(worker.models.tensor_names, worker.models.materializer.targets.values()))
    assert set(working) == set(outputs)
    for name, tensor in outputs.items():
        assert torch.equal(working[name], tensor), name


def test_adapters_as_dense_experts_for_task_vector_methods(lora_models):
    """Under linear merging an adapter is base + scaling · B A, as peft's merge_and_unload gives it."""
    root, adapters = lora_models
    worker = WhiteBoxWorker(RunPlan.from_config(_config(root, adapters, "linear")))
    worker.materialize(Candidate("p:0", "p", worker.space.encode({"weight": np.eye(2)[1]})))
    with torch.no_grad():
        logits = worker.models.model(input_ids=IDS).logits
    torch.testing.assert_close(logits, _peft_logits(root / "base", adapters[1], IDS), rtol=1e-4, atol=1e-5)


def test_lora_compose_keeps_the_configured_dtype(lora_models):
    root, adapters = lora_models
    worker = WhiteBoxWorker(RunPlan.from_config(_config(root, adapters, "lora_compose", dtype="bfloat16")))
    assert {t.dtype for t in worker.models.materializer.targets.values()} == {torch.bfloat16}
    evaluation = worker.evaluate(Candidate("p:0", "p", worker.space.encode({"alpha": 0.5, "beta": 0.5})))
    assert evaluation.status == "ok" and evaluation.per_example.shape == (2,)


def test_adapters_of_another_rank_are_named_in_the_error(lora_models):
    root, adapters = lora_models
    with pytest.raises(ModelMismatchError, match=r"expert 'rank8' has .*lora_A\.weight of shape \(8, 32\)"):
        WhiteBoxWorker(RunPlan.from_config(_config(root, [adapters[0], root / "rank8"], "lora_compose")))


def test_lora_compose_refuses_full_models_and_adapters_need_a_base(lora_models):
    root, adapters = lora_models
    with pytest.raises(ModelLoadError, match="expert 'base' is not a LoRA adapter"):
        WhiteBoxWorker(RunPlan.from_config(_config(root, [adapters[0], root / "base"], "lora_compose")))
    config = _config(root, adapters, "linear")
    config.models.base = None
    with pytest.raises(ModelLoadError, match="models.base"):
        WhiteBoxWorker(RunPlan.from_config(config))


def test_memory_estimate_of_a_lora_compose_worker_is_what_it_holds(lora_models):
    from evomerge.models.memory import tier_memory

    root, adapters = lora_models
    config = _config(root, adapters, "lora_compose")
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    held = sum(p.numel() * p.element_size() for p in worker.models.model.parameters())
    held += sum(t.stack.numel() * t.stack.element_size() for t in worker.models.materializer.tensors.values())
    assert tier_memory(config, torch.device("cpu"))["device"].resident == held
