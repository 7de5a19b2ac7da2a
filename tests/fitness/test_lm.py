"""Language-model fitness functions on a tiny random Llama, checked against unbatched forward passes,
and text data (.jsonl/.csv) rendered through the data config's templates."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch

from evomerge.plan import RunPlan
from evomerge.config import config_from_dict
from evomerge.errors import ConfigError, PluginError
from evomerge.fitness import FITNESS_FUNCTIONS, with_options
from evomerge.fitness.data import load_examples
from evomerge.fitness.lm import exact_match, extract_answer, multiple_choice_loglik, negative_cross_entropy

# One token per printable character: 103 ids, within the tiny Llama's vocabulary of 128.
VOCAB = ["<unk>", "<pad>", "<eos>"] + list(string.printable)
TINY_LLAMA = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    intermediate_size=64, tie_word_embeddings=False,
)


def build_tokenizer(pad: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", **extra)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, eos_token_id=2, pad_token_id=1)).eval()


def reference_logprobs(model, tokenizer, prompt: str, continuation: str) -> torch.Tensor:
    """Log-probs of the continuation's tokens from one unpadded forward pass (char-level: no merges)."""
    context = tokenizer(prompt)["input_ids"]
    cont = tokenizer(continuation)["input_ids"]
    ids = torch.tensor([context + cont])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return torch.stack([logprobs[len(context) - 1 + k, tok] for k, tok in enumerate(cont)])


PROMPTS = ["Q: 2+2?\nA:", "x", "The capital of France is", "1, 2, 3,", "Say yes or no:", "abc abc abc abc abc"]
TARGETS = [" 4", " y", " Paris", " 4, 5", " no", " abc"]


def test_negative_cross_entropy_matches_unbatched_forward_passes(model, tokenizer):
    examples = [{"prompt": p, "target": t} for p, t in zip(PROMPTS, TARGETS)]
    expected = [reference_logprobs(model, tokenizer, p, t).mean().item() for p, t in zip(PROMPTS, TARGETS)]
    model.train()  # the function scores in eval mode and gives the state back
    for batch_size in (1, 4, 16):
        scores = negative_cross_entropy(model, tokenizer, examples, batch_size=batch_size)
        assert scores.shape == (len(examples),)
        np.testing.assert_allclose(scores.numpy(), expected, atol=1e-5, rtol=0)
    assert model.training
    model.eval()
    assert all(s < 0 for s in expected)  # minus a cross-entropy: log-probs of real tokens


def test_multiple_choice_picks_the_choice_with_the_highest_summed_loglik(model, tokenizer):
    choice_sets = [[" 4", " 5", " 22"], [" yes", " no"], [" a", " bb", " ccc", " d"]]
    prompts = PROMPTS[:3]
    totals = [
        [reference_logprobs(model, tokenizer, p, c).sum().item() for c in choices]
        for p, choices in zip(prompts, choice_sets)
    ]
    best = [int(np.argmax(t)) for t in totals]
    assert all(sorted(t)[-1] - sorted(t)[-2] > 1e-3 for t in totals)  # no near-ties to hide an error
    # the first two label their best choice, the last one a worse choice
    labels = [best[0], best[1], (best[2] + 1) % 4]
    examples = [{"prompt": p, "choices": c, "label": y} for p, c, y in zip(prompts, choice_sets, labels)]
    for batch_size in (1, 3, 16):
        assert multiple_choice_loglik(model, tokenizer, examples, batch_size=batch_size).tolist() == [1.0, 1.0, 0.0]


def test_exact_match_scores_the_last_number_of_each_generation(model, tokenizer, monkeypatch):
    """generate is replaced: the answers are known, and the call's padding and options are checked."""
    replies = {"Q: 2+2?": "so it is 4", "x": "-7 no, 12.5", "ab": "no number here", "Q": "so it is 4", "R": "-7 no, 12.5"}
    calls = []

    def generate(input_ids, attention_mask, do_sample, max_new_tokens, pad_token_id, eos_token_id, stopping_criteria):
        calls.append((input_ids.clone(), attention_mask.clone(), do_sample, max_new_tokens, pad_token_id, eos_token_id))
        prompts = [tokenizer.decode(row[keep.bool()]) for row, keep in zip(input_ids, attention_mask)]
        new = [tokenizer(replies[p])["input_ids"] for p in prompts]
        width = max(map(len, new))
        new = torch.tensor([ids + [pad_token_id] * (width - len(ids)) for ids in new])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    examples = [{"prompt": "Q: 2+2?", "target": "4"}, {"prompt": "x", "target": " 12.5 "}, {"prompt": "ab", "target": "0"}]
    assert exact_match(model, tokenizer, examples, max_new_tokens=5).tolist() == [1.0, 1.0, 0.0]
    ids, mask, do_sample, max_new_tokens, pad, eos = calls[0]
    assert (do_sample, max_new_tokens, pad, eos) == (False, 5, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    # longest prompt first, left padding
    assert [tokenizer.decode(row, skip_special_tokens=True) for row in ids] == ["Q: 2+2?", "ab", "x"]
    assert ids[2][0].item() == pad
    assert mask.tolist()[2] == [0] * 6 + [1]
    # a regex with a group extracts the group
    examples = [{"prompt": "Q", "target": "is"}]
    assert exact_match(model, tokenizer, examples, answer_regex=r"it (\w+)").tolist() == [1.0]
    # GSM8K-style targets: the reference answer is extracted from the target too
    examples = [{"prompt": "Q", "target": "2 + 2 = 4\n#### 4"}, {"prompt": "R", "target": "so\n#### 12.5"}]
    assert exact_match(model, tokenizer, examples, target_regex=r"#### (\S+)").tolist() == [1.0, 1.0]
    assert exact_match(model, tokenizer, examples).tolist() == [0.0, 0.0]

    # stop strings cut the generation before the answer is searched; answer_fn replaces the regex
    replies.update({"Q": "12 Q: next 7", "R": "12.5\nQ: 3", "S": "0"})
    examples = [{"prompt": "Q", "target": "12"}, {"prompt": "R", "target": "12.5"}, {"prompt": "S", "target": "0"}]
    assert exact_match(model, tokenizer, examples).tolist() == [0.0, 0.0, 1.0]
    assert exact_match(model, tokenizer, examples, stop=["Q:"]).tolist() == [1.0, 1.0, 1.0]
    assert exact_match(model, tokenizer, examples, answer_fn="test_lm:first_word").tolist() == [1.0, 1.0, 1.0]


def first_word(text: str) -> str | None:
    """An answer extractor plugin (referenced as ``test_lm:first_word``)."""
    words = text.split()
    return words[0] if words else None


def test_truncate_at_stop():
    from evomerge.fitness.lm import truncate_at_stop

    assert truncate_at_stop("42\nQ: 7", ["\n", "Q:"]) == "42"
    assert truncate_at_stop("42 Q: 7", ["\n", "Q:"]) == "42 "
    assert truncate_at_stop("42", ["\n"]) == "42" and truncate_at_stop("42", []) == "42"


def test_batched_greedy_generation_matches_unbatched(model, tokenizer):
    whole = r"(?s)\A(.*)\Z"  # the whole generated text is the answer
    texts = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=6, pad_token_id=1)
        texts.append(extract_answer(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), whole))
    examples = [{"prompt": p, "target": t if i % 2 == 0 else t + "#"} for i, (p, t) in enumerate(zip(PROMPTS, texts))]
    scores = exact_match(model, tokenizer, examples, batch_size=4, max_new_tokens=6, answer_regex=whole)
    assert scores.tolist() == [1.0, 0.0] * 3


def test_extract_answer():
    assert extract_answer("The answer is 42. Or maybe 43.5") == "43.5"
    assert extract_answer("x = -7.") == "-7"
    assert extract_answer("none") is None
    assert extract_answer("#### 18\n", r"#### (\d+)") == "18"


def test_tokenizer_without_pad_token_pads_with_eos(model):
    tk = build_tokenizer(pad=False)
    assert tk.pad_token_id is None and tk.eos_token_id == 2
    examples = [{"prompt": p, "target": t} for p, t in zip(PROMPTS, TARGETS)]
    expected = negative_cross_entropy(model, build_tokenizer(), examples, batch_size=1)
    np.testing.assert_allclose(negative_cross_entropy(model, tk, examples, batch_size=4), expected, atol=1e-5)


def test_missing_example_fields_are_a_plugin_error(model, tokenizer):
    with pytest.raises(PluginError, match="example 0 has no choices, label"):
        multiple_choice_loglik(model, tokenizer, [{"prompt": "a", "target": "b"}])
    with pytest.raises(PluginError, match="needs text examples"):
        negative_cross_entropy(model, tokenizer, {"inputs": torch.zeros(2, 3), "labels": torch.zeros(2)})


# --- text data ------------------------------------------------------------------------------------

ROWS = [
    {"question": "2+2", "answer": 4, "options": ["3", "4"], "gold": 1, "split": "train"},
    {"question": "3+3", "answer": 6, "options": ["6", "7"], "gold": 0, "split": "test"},
    {"question": "1+1", "answer": 2, "options": ["2", "5"], "gold": 0, "split": "train"},
]
TEMPLATES = dict(template="Q: {question}\nA:", target="answer", choices="options", label="gold")


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_jsonl_rows_are_rendered_and_filtered_by_split(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", ROWS)
    examples = load_examples("qa.jsonl", "train", base_dir=tmp_path, **TEMPLATES)
    assert examples == [
        {"prompt": "Q: 2+2\nA:", "target": "4", "choices": ["3", "4"], "label": 1},
        {"prompt": "Q: 1+1\nA:", "target": "2", "choices": ["2", "5"], "label": 0},
    ]
    assert load_examples("qa.jsonl", "train", limit=1, base_dir=tmp_path, **TEMPLATES) == examples[:1]
    assert [e["prompt"] for e in load_examples("qa.jsonl", "test", base_dir=tmp_path, **TEMPLATES)] == ["Q: 3+3\nA:"]
    with pytest.raises(ConfigError, match="no rows have split 'dev'"):
        load_examples("qa.jsonl", "dev", base_dir=tmp_path, **TEMPLATES)
    # a target template; rows without a split field are all kept, whatever the split
    write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "hi", "a": 1, "b": 2}])
    assert load_examples("plain.jsonl", "test", base_dir=tmp_path, target="{a}-{b}") == [{"prompt": "hi", "target": "1-2"}]


def test_csv_rows_with_json_choices(tmp_path):
    (tmp_path / "mc.csv").write_text('question,options,gold\n2+2,"[""3"", ""4""]",1\n1+1,"[""2""]",0\n')
    examples = load_examples(str(tmp_path / "mc.csv"), template="{question}=", choices="options", label="gold")
    assert examples == [{"prompt": "2+2=", "choices": ["3", "4"], "label": 1}, {"prompt": "1+1=", "choices": ["2"], "label": 0}]


def test_missing_fields_name_the_file_row_and_field(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[2])]
    del rows[1]["answer"]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(ConfigError, match=r"qa\.jsonl: row 2 has no field 'answer'"):
        load_examples("qa.jsonl", base_dir=tmp_path, **TEMPLATES)
    with pytest.raises(ConfigError, match=r"qa\.jsonl: row 1 has no field 'topic'"):
        load_examples("qa.jsonl", base_dir=tmp_path, template="{topic}: {question}")
    with pytest.raises(ConfigError, match=r"row 1 has no field 'prompt'"):
        load_examples("qa.jsonl", base_dir=tmp_path)  # no template: the rows need a prompt field
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "choices": ["x"], "label": 3}])
    with pytest.raises(ConfigError, match="row 1: label 3 is outside its 1 choices"):
        load_examples("bad.jsonl", base_dir=tmp_path)
    (tmp_path / "mc.csv").write_text("question,gold\n2+2,1\n")
    with pytest.raises(ConfigError, match=r"mc\.csv: row 1 has no field 'options'"):
        load_examples("mc.csv", base_dir=tmp_path, template="{question}", choices="options", label="gold")
    with pytest.raises(ConfigError, match="apply to .jsonl and .csv"):
        load_examples("sklearn:digits", template="{x}")


# --- options and the worker -----------------------------------------------------------------------


def test_options_bind_to_built_ins_and_a_plugin_without_them_is_refused():
    assert with_options(exact_match, "exact_match", {}) is exact_match
    bound = with_options(exact_match, "exact_match", {"max_new_tokens": 4, "answer_regex": "x"})
    assert bound.keywords == {"max_new_tokens": 4, "answer_regex": "x"}

    def plugin(model, tokenizer, examples):
        return [1.0]

    with pytest.raises(PluginError, match=r"fitness 'my:plugin' does not accept options \['batch_size'\]"):
        with_options(plugin, "my:plugin", {"batch_size": 2})
    with pytest.raises(PluginError, match="does not accept options"):
        with_options(exact_match, "exact_match", {"max_tokens": 2})


def test_worker_renders_templates_and_passes_options(tmp_path, tokenizer, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.workers.whitebox import WhiteBoxWorker

    for i, name in enumerate(["base", "expert0", "expert1"]):
        torch.manual_seed(i)
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "base")
    write_jsonl(tmp_path / "qa.jsonl", ROWS)
    seen = {}

    def recording(model, tokenizer, examples, *, batch_size=16, max_new_tokens=32):
        seen.update(examples=examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
        return negative_cross_entropy(model, tokenizer, examples, batch_size=batch_size)

    monkeypatch.setitem(FITNESS_FUNCTIONS, "recording", recording)
    config = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "executor": "inline",
            "models": {"base": "base", "experts": ["expert0", "expert1"], "device": "cpu"},
            "merge": {"method": "task_arithmetic", "granularity": "per_layer_group", "search": ["weight"],
                      "fixed": {"lambda": 1.0}},
            "populations": [{"name": "cma", "strategy": "cmaes"}],
            "fitness": {
                "name": "recording",
                "options": {"batch_size": 2, "max_new_tokens": 3},
                "data": {"source": "qa.jsonl", "split": "train", **TEMPLATES},
                "test_data": {"source": "qa.jsonl", "split": "test", **TEMPLATES},
            },
            "budget": {"evaluations": 2},
        },
        base_dir=tmp_path,
    )
    worker = WhiteBoxWorker(RunPlan.from_config(config))
    scores = worker.score(worker.examples)
    assert seen["batch_size"] == 2 and seen["max_new_tokens"] == 3
    assert [e["prompt"] for e in seen["examples"]] == ["Q: 2+2\nA:", "Q: 1+1\nA:"]
    assert scores.shape == (2,) and np.all(scores < 0)
    assert np.isfinite(worker.score_on(config.fitness.test_data).fitness)
    config.fitness.options = {"temperature": 0.5}
    with pytest.raises(PluginError, match="does not accept options"):
        WhiteBoxWorker(RunPlan.from_config(config))


def test_hf_datasets_source_renders_a_local_dataset_split(tmp_path):
    """``hf:`` goes through datasets.load_dataset (here on a local directory of JSON lines: no hub)."""
    pytest.importorskip("datasets")
    data = tmp_path / "gsm"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"question": f"{i}+1?", "answer": f"so\n#### {i + 1}"} for i in range(5)])
    write_jsonl(data / "test.jsonl", [{"question": "9+1?", "answer": "#### 10"}])
    examples = load_examples(f"hf:{data}", "train[:3]", template="Q: {question}\nA:", target="answer")
    assert [e["prompt"] for e in examples] == ["Q: 0+1?\nA:", "Q: 1+1?\nA:", "Q: 2+1?\nA:"]
    assert examples[2]["target"] == "so\n#### 3"
    assert load_examples(f"hf:{data}", "test", template="{question}", target="answer") == [{"prompt": "9+1?", "target": "#### 10"}]
    with pytest.raises(ConfigError, match=r"cannot load split 'validation'"):
        load_examples(f"hf:{data}", "validation", template="{question}")
    with pytest.raises(ConfigError, match=r"row 1 has no field 'prompt'"):
        load_examples(f"hf:{data}", "test")
