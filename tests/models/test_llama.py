"""A search over tiny Llama experts with a user fitness plugin, a tokenizer, and an export."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.store import RunStore

VOCAB = ["<unk>", "<pad>"] + [str(d) for d in range(10)] + list("abcdefghijklmnopqrstuvwxyz+= ")


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    build_tokenizer().save_pretrained(root / "base")
    paths = []
    for i in range(2):
        torch.manual_seed(100 + i)
        expert = LlamaForCausalLM(config)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn_like(p))
        expert.save_pretrained(root / f"expert{i}")
        paths.append(root / f"expert{i}")
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, len(VOCAB), size=(16, 12))
    np.savez(root / "lm.npz", inputs=tokens, labels=np.zeros(16))
    return root, paths


PLUGIN = """
import torch

@torch.no_grad()
def neg_ce(model, tokenizer, examples):
    assert tokenizer is not None and tokenizer.pad_token == "<pad>"
    ids = examples["inputs"].long()
    logits = model(input_ids=ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return -ce.mean(dim=1)
"""


def test_ties_search_on_tiny_llamas_and_export(tmp_path, llama_models, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, experts = llama_models
    (tmp_path / "llama_fitness_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",  # the plugin lives on this process's sys.path only
        "models": {"base": str(root / "base"), "experts": [str(p) for p in experts], "device": "cpu"},
        "merge": {"method": "ties", "granularity": "per_layer_group", "layer_groups": 2},
        "populations": [{"name": "cma", "strategy": "cmaes"}],
        "fitness": {"name": "llama_fitness_plugin:neg_ce", "data": {"source": str(root / "lm.npz")}},
        "budget": {"evaluations": 12},
    }
    path = tmp_path / "llama.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0

    store = RunStore(tmp_path / "run", readonly=True)
    rows = list(store.evaluations(with_scores=True))
    best = store.best()
    store.close()
    assert len(rows) == 12 and all(r.status == "ok" for r in rows)
    assert all(r.per_example.shape == (16,) for r in rows)
    # ties: weight + density per expert per group (2 groups × 2 experts × 2) + lambda per group
    assert rows[0].genome.shape == (10,)

    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(tokenizer("a+1")["input_ids"]) == ["a", "+", "1"]
    import llama_fitness_plugin

    tokens = torch.as_tensor(np.load(root / "lm.npz")["inputs"], dtype=torch.float32)
    score = float(llama_fitness_plugin.neg_ce(model, tokenizer, {"inputs": tokens}).mean())
    assert score == pytest.approx(best.fitness, abs=1e-5)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())["recipe"]
    assert [g["name"] for g in recipe["groups"]] == ["layers 0-1", "layers 2-3"]
