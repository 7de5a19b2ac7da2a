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
from evomerge.fitness.lm import (
    encode_pair,
    exact_match,
    extract_answer,
    multiple_choice_loglik,
    negative_cross_entropy,
    truncate_at_stop,
)

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


WHOLE = r"(?s)\A(.*)\Z"  # the whole (cut) generated text is the answer
MORE_PROMPTS = PROMPTS + ["Q: 7*6?\nA:", "z", "hello there, how are", "0 1 0 1 0 1 0 1 0 1 0"]


def old_exact_match_texts(model, tokenizer, prompts, batch_size, max_new_tokens, stop):
    """exact_match's texts as computed before length sorting and early stopping: batches in the
    examples' order, every row generated for max_new_tokens, then cut at its first stop string."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        enc = [tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), 1, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for row, seq in enumerate(enc):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=1
            )
        texts += [truncate_at_stop(t, stop) for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return texts


def test_exact_match_scores_equal_the_unsorted_full_length_reference(model, tokenizer):
    full = old_exact_match_texts(model, tokenizer, MORE_PROMPTS, 4, 12, [])
    # stop strings the generations hold: some rows are cut early, some run to the end
    stop = [full[0][3], full[2][4:6], "\n\n"]
    cut = old_exact_match_texts(model, tokenizer, MORE_PROMPTS, 4, 12, stop)
    assert 0 < sum(c != f for c, f in zip(cut, full)) < len(full)
    assert len(set(cut)) == len(cut)  # every row's text differs: a row scored against another's fails
    examples = [{"prompt": p, "target": t if i % 3 else t + "#"} for i, (p, t) in enumerate(zip(MORE_PROMPTS, cut))]
    expected = [0.0 if i % 3 == 0 else 1.0 for i in range(len(examples))]
    for batch_size in (1, 3, 4, 16):
        scores = exact_match(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=12,
                             stop=stop, answer_regex=WHOLE)
        assert scores.tolist() == expected, batch_size


def count_forward_calls(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def generated_ids(model, prompt: str, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([build_tokenizer()(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=1)
    return out[0, ids.shape[1] :].tolist()


def test_generation_stops_at_eos_without_running_max_new_tokens(tokenizer):
    """One forward pass per generated token: an EOS early in the row ends its generation there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, eos_token_id=2, pad_token_id=1)).eval()
    limit = 16
    ids = generated_ids(model, PROMPTS[0], limit)
    at = next(k for k in range(2, limit) if ids[k] not in ids[:k] and ids[k] != 2)
    model.generation_config.eos_token_id = ids[at]  # the model's EOS, early in its generation
    calls, handle = count_forward_calls(model)
    exact_match(model, tokenizer, [{"prompt": PROMPTS[0], "target": "x"}], max_new_tokens=limit)
    handle.remove()
    assert len(calls) == at + 1 < limit


def test_each_row_stops_at_its_settled_stop_string_and_the_batch_when_all_have(model, tokenizer):
    from evomerge.fitness.stopping import first_stop_is_settled

    limit = 16
    prompts = [PROMPTS[2], PROMPTS[3]]  # one batch, longest first
    full = old_exact_match_texts(model, tokenizer, prompts, 2, limit, [])
    ids = [generated_ids(model, p, limit) for p in prompts]

    def stops_after(row: int, stop: list[str]) -> int:
        """Forward passes until the row's stop is settled (limit if never)."""
        return next((n for n in range(1, limit + 1)
                     if first_stop_is_settled(tokenizer.decode(ids[row][:n], skip_special_tokens=True), stop)), limit)

    # a stop string only the first row generates, early: the second row still runs to the end
    only_first = next(c for c in full[0][2:] if c not in full[1] and stops_after(0, [c]) < limit)
    examples = [{"prompt": p, "target": t} for p, t in zip(prompts, [full[0].split(only_first)[0], full[1]])]
    calls, handle = count_forward_calls(model)
    assert exact_match(model, tokenizer, examples, batch_size=2, max_new_tokens=limit, stop=[only_first],
                       answer_regex=WHOLE).tolist() == [1.0, 1.0]
    assert len(calls) == limit
    # a stop for each row: the batch ends when the later one is settled
    second = next(c for c in full[1][2:] if stops_after(1, [only_first, c]) < limit)
    stop = [only_first, second]
    calls.clear()
    exact_match(model, tokenizer, examples, batch_size=2, max_new_tokens=limit, stop=stop)
    handle.remove()
    assert len(calls) == max(stops_after(0, stop), stops_after(1, stop)) < limit


def test_prompts_are_tokenized_once_across_candidates_and_never_stale(model, tokenizer, monkeypatch):
    from evomerge.fitness import packing

    packed = []
    real_pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda *a, **k: packed.append(1) or real_pack(*a, **k))
    full = old_exact_match_texts(model, tokenizer, PROMPTS, 16, 6, [])
    examples = [{"prompt": p, "target": t} for p, t in zip(PROMPTS, full)]
    for _ in range(3):  # three candidates
        assert exact_match(model, tokenizer, examples, max_new_tokens=6, answer_regex=WHOLE).tolist() == [1.0] * 6
    assert len(packed) == 1
    examples[1] = {"prompt": PROMPTS[0], "target": full[0]}  # the same list, another prompt
    assert exact_match(model, tokenizer, examples, max_new_tokens=6, answer_regex=WHOLE).tolist() == [1.0] * 6
    assert len(packed) == 2


def old_continuation_logprobs(model, tokenizer, pairs, batch_size):
    """continuation_logprobs as computed before: the whole [batch, seq, vocab] log-softmaxed."""
    encoded = [encode_pair(tokenizer, p, c) for p, c in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    results = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        seqs = [encoded[i][0] + encoded[i][1] for i in batch]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), 1, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            logprobs = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        token_logprobs = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, i in enumerate(batch):
            n_context, n_cont = len(encoded[i][0]), len(encoded[i][1])
            results[i] = token_logprobs[row, n_context - 1 : n_context - 1 + n_cont]
    return results


def test_continuation_logprobs_equal_the_full_log_softmax_from_the_scored_positions_only(model, tokenizer):
    from evomerge.fitness.lm import continuation_logprobs

    pairs = [(p, t) for p, t in zip(MORE_PROMPTS, TARGETS * 2)] + [("a long prompt " * 3, " and a longer target")]
    widths = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    for batch_size in (1, 3, 16):
        expected = old_continuation_logprobs(model, tokenizer, pairs, batch_size)
        widths.clear()
        got = continuation_logprobs(model, tokenizer, pairs, batch_size, "test")
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-5, rtol=0)
        if batch_size == 16:  # one batch: logits only at the columns some row scores
            columns = set()
            for p, c in pairs:
                context, cont = encode_pair(tokenizer, p, c)
                columns.update(range(len(context) - 1, len(context) - 1 + len(cont)))
            assert widths == [len(columns)]
            assert widths[0] < max(len(tokenizer(p + c)["input_ids"]) for p, c in pairs)
    handle.remove()


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
