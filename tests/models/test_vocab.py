"""Experts whose tokenizers add tokens merge over the union vocabulary, as mergekit's
``tokenizer_source: union`` merges them; renumbered shared tokens are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.models.vocab import Vocabulary, VocabularyMismatchError, plan_vocabulary
from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama

ROWS = [{"prompt": "12+30=", "target": "42"}, {"prompt": "abc>", "target": "cba"}]


def _vocab(tokens: list[str], rows: int | None = None, added: tuple[str, ...] = ()) -> Vocabulary:
    ids = {t: i for i, t in enumerate(tokens)}
    return Vocabulary(ids, len(tokens) if rows is None else rows, len(tokens), frozenset(added))


def test_shared_tokens_with_different_ids_are_refused_by_name():
    with pytest.raises(VocabularyMismatchError, match=r"expert 'x' gives token 'c' id 1 but the base model gives it id 2"):
        plan_vocabulary(_vocab(["a", "b", "c"]), "the base model", [("expert 'x'", _vocab(["a", "c", "b"]))], True)


def test_added_tokens_are_matched_by_content_whatever_their_ids():
    reference = _vocab(["a", "b", "<x>", "<y>"], added=("<x>", "<y>"))
    expert = _vocab(["a", "b", "<y>", "<x>"], added=("<x>", "<y>"))
    plan = plan_vocabulary(reference, "expert 'e0'", [("expert 'e0'", reference), ("expert 'e1'", expert)], False)
    np.testing.assert_array_equal(plan.sources[1], [0, 1, 3, 2])
    assert plan.fills == {}


def test_equal_vocabularies_need_no_alignment():
    assert plan_vocabulary(_vocab(["a", "b"]), "the base model", [("e", _vocab(["a", "b"]))], True) is None


def test_union_appends_new_tokens_in_expert_order_and_fills_rows_by_mergekit_rules():
    base = _vocab(["a", "b"])
    e0 = _vocab(["a", "b", "y"], added=("y",))
    e1 = _vocab(["a", "b", "x", "y"], added=("x", "y"))
    plan = plan_vocabulary(base, "the base model", [("e0", e0), ("e1", e1)], True)
    assert plan.new_token_ids() == {"y": 2, "x": 3}
    np.testing.assert_array_equal(plan.sources[0], [0, 1, -1, -1])
    np.testing.assert_array_equal(plan.sources[1], [0, 1, 2, -1])
    np.testing.assert_array_equal(plan.sources[2], [0, 1, 3, 2])
    assert plan.fills == {2: (1, 2), 3: (2,)}  # y: mean of both experts; x: the only model with it


def test_base_vocabulary_drops_tokens_only_experts_have():
    plan = plan_vocabulary(_vocab(["a", "b"]), "the base model", [("e", _vocab(["a", "b", "x"]))], True, union=False)
    assert plan.size == 2 and plan.new_tokens == []
    np.testing.assert_array_equal(plan.sources[1], [0, 1])


def test_padding_rows_past_a_tokenizer_are_kept_only_where_the_union_has_them():
    base = _vocab(["a", "b"], rows=4)  # two unnamed padding rows
    expert = _vocab(["a", "b", "x"], rows=6, added=("x",))
    plan = plan_vocabulary(base, "the base model", [("e", expert)], True)
    assert plan.size == 4 and plan.new_token_ids() == {"x": 2}
    np.testing.assert_array_equal(plan.sources[0], [0, 1, -1, 3])
    np.testing.assert_array_equal(plan.sources[1], [0, 1, 2, 3])


# --- end to end, cross-checked with mergekit ---------------------------------------------------------


def _perturbed(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
ADDED = {  # case -> (expert name -> tokens its fine-tune added; <|end|> is special), tied embeddings
    "one expert adds two tokens": ({"expert1": ["<|user|>", "<|end|>"]}, False),
    "both add a token, one adds two": ({"expert0": ["<|end|>"], "expert1": ["<|user|>", "<|end|>"]}, False),
    "one expert adds two tokens, tied embeddings": ({"expert1": ["<|user|>", "<|end|>"]}, True),
}


def _tiny_llama(tokenizer, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama(tokenizer, hidden=32, layers=2, heads=2, seed=0)
    if not tied:
        return model
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": True}))


@pytest.fixture(scope="module")
def vocab_models(request, tmp_path_factory):
    """Base and experts of one ``ADDED`` case (``request.param``): each test names the cases it
    needs, so the suite builds and merges only those."""
    from tokenizers import AddedToken

    root = tmp_path_factory.mktemp("vocab")
    tokenizer = build_tokenizer()
    added, tied = ADDED[request.param]
    _tiny_llama(tokenizer, tied).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for i, name in enumerate(("expert0", "expert1")):
        own = build_tokenizer()
        for token in added.get(name, []):
            own.add_tokens([AddedToken(token, special=token == "<|end|>")])
        expert = _tiny_llama(tokenizer, tied)
        expert.resize_token_embeddings(len(own), mean_resizing=False)
        _perturbed(expert, 10 + i).save_pretrained(root / name)
        own.save_pretrained(root / name)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root, added


def _run_and_export(root, tmp_path, merge: dict, base: bool, vocabulary: str = "union") -> object:
    models = {"experts": [str(root / "expert0"), str(root / "expert1")], "device": "cpu", "vocabulary": vocabulary}
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "models": {"base": str(root / "base"), **models} if base else models,
        "merge": merge,
        "populations": [{"name": "search", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    return out


MERGES = {
    "task_arithmetic": ({"method": "task_arithmetic", "granularity": "per_model"}, True),
    "linear": ({"method": "linear"}, True),
    "linear without base": ({"method": "linear"}, False),
}


# Every case and every merge, each case with a different merge: cases x merges would add a minute
# of runs and exports to the suite for no path the pairs below leave out.
@pytest.mark.parametrize(
    "vocab_models, merge",
    [
        ("one expert adds two tokens", "task_arithmetic"),
        ("both add a token, one adds two", "linear without base"),
        ("one expert adds two tokens, tied embeddings", "linear"),
    ],
    indirect=["vocab_models"],
)
def test_experts_with_added_tokens_merge_as_mergekit_union_merges_them(vocab_models, tmp_path, merge):
    pytest.importorskip("mergekit", reason="the cross-check needs the mergekit extra: pip install 'evomerge[mergekit]'")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    root, added = vocab_models
    out = _run_and_export(root, tmp_path, *MERGES[merge])
    document = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert document["tokenizer_source"] == "union"
    rebuilt = tmp_path / "mergekit-out"
    run_merge(
        MergeConfiguration.model_validate(document),
        str(rebuilt),
        options=MergeOptions(write_model_card=False, quiet=True),
    )
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(rebuilt)
    vocab, their_vocab = ours.get_vocab(), theirs.get_vocab()
    assert set(vocab) == set(their_vocab)
    base_vocab = build_tokenizer().get_vocab()
    assert all(vocab[t] == their_vocab[t] == i for t, i in base_vocab.items())
    # new tokens follow the experts' order and ids (mergekit numbers one tokenizer's new tokens in
    # hash order, which changes from run to run: rows are compared token by token)
    order = list(dict.fromkeys(t for name in ("expert0", "expert1") for t in added.get(name, [])))
    assert {t: vocab[t] for t in order} == {t: len(base_vocab) + k for k, t in enumerate(order)}
    special = {info.content: info.special for info in ours.added_tokens_decoder.values()}
    assert special["<|end|>"] and not special["<|user|>"]
    assert AutoConfig.from_pretrained(out).vocab_size == len(ours)
    weights, reference = load_file(out / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert set(weights) == set(reference)
    their_rows = torch.tensor([their_vocab[t] for t in sorted(vocab, key=vocab.get)])
    for name, tensor in weights.items():
        expected = reference[name][their_rows] if name in VOCABULARY_TENSORS else reference[name]
        torch.testing.assert_close(expected, tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    expert1 = load_file(root / "expert1" / "model.safetensors")
    user = ours.convert_tokens_to_ids("<|user|>")  # only expert1 has it: its rows, whatever the weights
    user1 = AutoTokenizer.from_pretrained(root / "expert1").convert_tokens_to_ids("<|user|>")
    for name in [n for n in VOCABULARY_TENSORS if n in weights]:  # tied: no lm_head
        torch.testing.assert_close(weights[name][user], expert1[name][user1])


@pytest.mark.parametrize("vocab_models", ["both add a token, one adds two"], indirect=True)
def test_base_vocabulary_merges_as_mergekit_tokenizer_source_base(vocab_models, tmp_path):
    pytest.importorskip("mergekit", reason="the cross-check needs the mergekit extra: pip install 'evomerge[mergekit]'")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    root, _added = vocab_models
    out = _run_and_export(root, tmp_path, *MERGES["task_arithmetic"], vocabulary="base")
    document = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert document["tokenizer_source"] == "base"
    run_merge(MergeConfiguration.model_validate(document), str(tmp_path / "mk"), options=MergeOptions(quiet=True))
    assert AutoTokenizer.from_pretrained(out).get_vocab() == build_tokenizer().get_vocab()
    weights, reference = load_file(out / "model.safetensors"), load_file(tmp_path / "mk" / "model.safetensors")
    assert set(weights) == set(reference)
    for name, tensor in weights.items():
        torch.testing.assert_close(reference[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("vocab_models", ["both add a token, one adds two"], indirect=True)
def test_an_exported_tokenizer_source_must_number_tokens_as_the_union(vocab_models, tmp_path, capsys):
    from transformers import AutoTokenizer

    root, added = vocab_models
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "models": {"base": str(root / "base"), "experts": [str(root / "expert0"), str(root / "expert1")], "device": "cpu"},
        "merge": {"method": "task_arithmetic"},
        "populations": [{"name": "search", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 1},
        "export": {"tokenizer_source": "expert1"},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    code = main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    order = list(dict.fromkeys(t for name in ("expert0", "expert1") for t in added.get(name, [])))
    own = AutoTokenizer.from_pretrained(root / "expert1")
    if [own.convert_tokens_to_ids(t) for t in order] == [len(build_tokenizer()) + k for k in range(len(order))]:
        assert code == 0  # expert1 numbers its tokens as the union does
        assert AutoTokenizer.from_pretrained(tmp_path / "merged").get_vocab() == own.get_vocab()
    else:
        assert code == 2
        assert "export.tokenizer_source: 'expert1' gives token '<|" in capsys.readouterr().err


@pytest.mark.parametrize("vocab_models", ["both add a token, one adds two"], indirect=True)
def test_fisher_merging_aligns_the_experts_fishers_too(vocab_models, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    root, added = vocab_models
    data = {"source": str(root / "data.jsonl")}
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "models": {
            "base": str(root / "base"),
            "experts": [{"path": str(root / name), "data": data} for name in ("expert0", "expert1")],
            "device": "cpu",
        },
        "merge": {"method": "fisher"},
        "populations": [{"name": "search", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": data},
        "budget": {"evaluations": 2},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    expert1 = load_file(root / "expert1" / "model.safetensors")
    user = AutoTokenizer.from_pretrained(tmp_path / "merged").convert_tokens_to_ids("<|user|>")
    user1 = AutoTokenizer.from_pretrained(root / "expert1").convert_tokens_to_ids("<|user|>")
    assert weights["model.embed_tokens.weight"].shape[0] == len(build_tokenizer()) + len(set(sum(added.values(), [])))
    torch.testing.assert_close(weights["model.embed_tokens.weight"][user], expert1["model.embed_tokens.weight"][user1])


@pytest.mark.parametrize("vocab_models", ["one expert adds two tokens"], indirect=True)
def test_the_mmap_tier_refuses_experts_whose_vocabularies_are_aligned(vocab_models, tmp_path):
    from evomerge.config import config_from_dict
    from evomerge.errors import ConfigError
    from evomerge.plan import RunPlan
    from evomerge.workers.whitebox import WhiteBoxWorker

    root, _ = vocab_models
    document = {
        "run_dir": str(tmp_path / "run"),
        "models": {"base": str(root / "base"), "experts": [str(root / "expert0"), str(root / "expert1")],
                   "device": "cpu", "residency": "mmap"},
        "merge": {"method": "task_arithmetic"},
        "populations": [{"name": "search", "strategy": "random"}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": 2},
    }
    with pytest.raises(ConfigError, match="models.residency mmap: the experts' vocabularies differ"):
        WhiteBoxWorker(RunPlan.from_config(config_from_dict(document)))
