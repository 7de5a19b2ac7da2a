"""lm-eval tasks as fitness: tiny local YAML tasks over local JSONL (evomerge.testing.harness_tasks),
scored on a resident model; per-document scores equal those of lm-eval's own CLI on the export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.config import config_from_dict
from evomerge.errors import ConfigError
from evomerge.fitness import harness, own_examples, resolve_fitness, with_options
from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.store import RunStore
from evomerge.testing.harness_tasks import TASK_NAMES, tiny_harness_options, tiny_task_dir
from evomerge.testing.tiny_models import char_llama

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A base and two experts (the base nudged two ways), with their character tokenizer."""
    root = tmp_path_factory.mktemp("harness")
    base, tokenizer = char_llama(seed=0)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for i in range(2):
        torch.manual_seed(10 + i)
        expert, _ = char_llama(seed=0)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.3 * torch.randn_like(p))
        expert.save_pretrained(root / f"expert{i}")
        tokenizer.save_pretrained(root / f"expert{i}")
    return root


def _config(root, tmp_path, options, **fitness) -> dict:
    return {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "score_experts": False,
        "models": {"base": str(root / "base"), "experts": [str(root / "expert0"), str(root / "expert1")], "device": "cpu"},
        "merge": {"method": "task_arithmetic", "granularity": "per_model"},
        "populations": [{"name": "search", "strategy": "random"}],
        "fitness": {"name": "lm_eval", "options": options, **fitness},
        "budget": {"evaluations": 3},
    }


def test_documents_are_the_tasks_in_alphabetical_order_then_doc_id():
    documents = own_examples("lm_eval", tiny_harness_options())
    assert [d.task for d in documents] == ["tiny_sums_gen"] * 20 + ["tiny_sums_ll"] * 20 + ["tiny_sums_mc"] * 60
    assert [d.doc_id for d in documents[18:22]] == [18, 19, 0, 1]


def test_a_group_names_its_tasks():
    options = {**tiny_harness_options(), "tasks": ["tiny_sums"]}
    assert own_examples("lm_eval", options) == own_examples("lm_eval", tiny_harness_options())


def test_a_subset_of_documents_scores_as_in_the_full_set():
    model, tokenizer = char_llama(seed=3)
    fitness = with_options(resolve_fitness("lm_eval"), "lm_eval", tiny_harness_options())
    documents = own_examples("lm_eval", tiny_harness_options())
    full = fitness(model, tokenizer, documents)
    assert set(np.unique(full[:20])) | set(np.unique(full[40:])) <= {0.0, 1.0}  # exact match, accuracy
    assert (full[20:40] < 0).all()  # the answers' log-likelihoods
    picked = [99, 5, 47, 20, 19, 39]  # in no order: a subset is scored in the order given
    np.testing.assert_array_equal(fitness(model, tokenizer, [documents[i] for i in picked]), full[picked])


def test_the_metric_and_filter_of_a_task_are_chosen_in_options():
    options = {**tiny_harness_options(), "metrics": {"tiny_sums_mc": "acc_norm", "tiny_sums_gen": "exact_match,first_number"}}
    tasks = harness.harness_tasks(**{k: v for k, v in options.items()})
    assert tasks.metric == {
        "tiny_sums_gen": ("exact_match", "first_number"), "tiny_sums_ll": ("perplexity", "none"), "tiny_sums_mc": ("acc_norm", "none"),
    }
    with pytest.raises(ConfigError, match="task 'tiny_sums_mc' has no metric 'bleu' \\(it has acc, acc_norm\\)"):
        harness.harness_tasks(**{**tiny_harness_options(), "metrics": {"tiny_sums_mc": "bleu"}})
    with pytest.raises(ConfigError, match="metrics: 'tiny_sums' is not one of the tasks \\(tiny_sums_gen, tiny_sums_ll, tiny_sums_mc\\)"):
        harness.harness_tasks(**{**tiny_harness_options(), "metrics": {"tiny_sums": "acc"}})
    with pytest.raises(ConfigError, match="task 'tiny_sums_gen' has no filter 'last'"):
        harness.harness_tasks(**{**tiny_harness_options(), "metrics": {"tiny_sums_gen": "exact_match,last"}})


def test_an_unknown_task_names_itself_and_the_include_path(tmp_path):
    path = str(tiny_task_dir(tmp_path))
    with pytest.raises(ConfigError, match=f"no lm-eval task or group 'tiny_sums_typo' in {path}"):
        harness.harness_tasks(["tiny_sums_typo"], include_path=path)
    with pytest.raises(ConfigError, match="list the lm-eval task names"):
        harness.harness_tasks("tiny_sums_mc", include_path=path)


def test_a_missing_extra_is_one_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # what an environment without lm-eval imports
    with pytest.raises(ConfigError, match=r"pip install 'evomerge\[lmeval\]'"):
        harness.HarnessTasks(list(TASK_NAMES), str(tiny_task_dir(tmp_path)), None, {})


def test_lm_eval_refuses_fitness_data_and_entropy_descent_and_others_need_data(llamas, tmp_path):
    data = {"source": str(tmp_path / "rows.jsonl")}
    with pytest.raises(ConfigError, match="fitness.data: fitness 'lm_eval' scores the documents of its own tasks"):
        RunPlan.from_config(config_from_dict(_config(llamas, tmp_path, tiny_harness_options(), data=data)))
    with pytest.raises(ConfigError, match="fitness.test_data: fitness 'lm_eval' scores the documents of its own tasks"):
        RunPlan.from_config(config_from_dict(_config(llamas, tmp_path, tiny_harness_options(), test_data=data)))
    config = _config(llamas, tmp_path, tiny_harness_options())
    config["populations"] = [{"name": "ada", "strategy": "adamerging"}]
    with pytest.raises(ConfigError, match="populations.0.strategy: adamerging descends the entropy .* fitness 'lm_eval' does not read"):
        RunPlan.from_config(config_from_dict(config))
    config = _config(llamas, tmp_path, {})
    config["fitness"] = {"name": "negative_cross_entropy"}
    with pytest.raises(ConfigError, match="fitness.data: fitness 'negative_cross_entropy' needs examples"):
        RunPlan.from_config(config_from_dict(config))


def _worker(root, tmp_path):
    from evomerge.workers.whitebox import WhiteBoxWorker

    return WhiteBoxWorker(RunPlan.from_config(config_from_dict(_config(root, tmp_path, tiny_harness_options()))))


def test_no_state_leaks_between_candidates(llamas, tmp_path):
    """A then B on one worker, B again on a fresh worker with freshly built tasks: identical scores."""
    a = Candidate("a", "search", np.array([0.9, 0.1, 0.5]))
    b = Candidate("b", "search", np.array([0.2, 0.7, 0.9]))
    worker = _worker(llamas, tmp_path)
    first_a, first_b = worker.evaluate(a), worker.evaluate(b)
    harness._cached_tasks.cache_clear()
    fresh = _worker(llamas, tmp_path)
    again_b = fresh.evaluate(b)
    assert first_a.status.value == first_b.status.value == again_b.status.value == "ok", first_b.error
    assert not np.array_equal(first_a.per_example, first_b.per_example)  # the candidates differ at all
    np.testing.assert_array_equal(first_b.per_example, again_b.per_example)


def test_lm_eval_cli_on_the_export_gives_the_recorded_per_document_scores(llamas, tmp_path):
    """A searched merge exported, then scored by lm-eval's own CLI with --log_samples."""
    config = _config(llamas, tmp_path, tiny_harness_options())
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    store = RunStore(tmp_path / "run", readonly=True)
    best = store.best()
    store.close()
    documents = own_examples("lm_eval", tiny_harness_options())
    subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={out},dtype=float32", "--device", "cpu", "--batch_size", "16",
         "--tasks", ",".join(TASK_NAMES), "--include_path", tiny_harness_options()["include_path"],
         "--log_samples", "--output_path", str(tmp_path / "lm_eval_out")],
        check=True, capture_output=True,
    )
    metric = {"tiny_sums_gen": "exact_match", "tiny_sums_ll": "perplexity", "tiny_sums_mc": "acc"}  # the defaults
    theirs = {}
    for file in (tmp_path / "lm_eval_out").rglob("samples_*.jsonl"):
        task = file.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in file.read_text().splitlines():
            sample = json.loads(line)
            theirs[(task, sample["doc_id"])] = float(sample[metric[task]])
    assert len(theirs) == len(documents) == len(best.per_example)
    expected = np.array([theirs[(d.task, d.doc_id)] for d in documents])
    loglik = np.array([d.task == "tiny_sums_ll" for d in documents])
    np.testing.assert_array_equal(best.per_example[~loglik], expected[~loglik])  # accuracy, exact match
    np.testing.assert_allclose(best.per_example[loglik], expected[loglik], rtol=0, atol=1e-4)  # fp32 log-likelihoods
    assert 0 < best.per_example[documents.index(harness.Document("tiny_sums_mc", 0)):].mean() < 1  # not all alike


def test_black_box_scores_equal_white_box_on_the_served_model(service, tiny_models, auth):
    """The same tasks through the API client (local-completions requests to `evomerge serve`)."""
    import asyncio

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.service.client import ApiClient
    from evomerge.service.served_model import ApiServedModel

    documents = own_examples("lm_eval", tiny_harness_options())

    async def black_box() -> np.ndarray:
        client = ApiClient(service, auth["Authorization"].removeprefix("Bearer "))

        async def served_name() -> str:
            return "tiny-base"

        try:
            return await harness.lm_eval_served(ApiServedModel(client, "base", None, served_name), documents, **tiny_harness_options())
        finally:
            await client.aclose()

    served = asyncio.run(black_box())
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()
    resident = harness.lm_eval_fitness(model, AutoTokenizer.from_pretrained(tiny_models["base"]), documents, **tiny_harness_options())
    loglik = np.array([d.task == "tiny_sums_ll" for d in documents])
    np.testing.assert_array_equal(served[~loglik], resident[~loglik])
    np.testing.assert_allclose(served[loglik], resident[loglik], rtol=0, atol=1e-4)


def test_validate_names_an_unknown_task_in_one_line(llamas, tmp_path, capsys):
    options = {**tiny_harness_options(), "tasks": ["tiny_sums_typo"]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(llamas, tmp_path, options)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no lm-eval task or group 'tiny_sums_typo'" in err, err
    path.write_text(yaml.safe_dump(_config(llamas, tmp_path, {"include_path": str(tmp_path)})))
    assert main(["validate", str(path)]) == 2
    assert "missing a required argument: 'tasks'" in capsys.readouterr().err


def test_racing_screens_a_candidate_on_a_seeded_subset_of_the_documents(llamas, tmp_path):
    """Staged scoring passes lm-eval a subset of documents; their scores are those of the full set."""
    from evomerge.workers.whitebox import WhiteBoxWorker

    racing = {"stages": [0.2], "z": 0.5, "scores": None}  # the log-likelihood task's scores are unbounded
    config = _config(llamas, tmp_path, tiny_harness_options(), racing=racing)
    raced = WhiteBoxWorker(RunPlan.from_config(config_from_dict(config)))
    genome = np.array([0.3, 0.6, 0.5])
    stopped = raced.evaluate(Candidate("hopeless", "search", genome, must_beat=10.0))
    full = _worker(llamas, tmp_path).evaluate(Candidate("full", "search", genome))
    assert stopped.status.value == "ok" and stopped.fidelity == pytest.approx(0.2)
    scored = ~np.isnan(stopped.per_example)
    assert scored.sum() == 20
    np.testing.assert_allclose(stopped.per_example[scored], full.per_example[scored], rtol=0, atol=1e-5)


def test_a_model_in_training_mode_is_scored_in_eval_mode_and_handed_back_training():
    model, tokenizer = char_llama(seed=1)
    documents = own_examples("lm_eval", tiny_harness_options())[40:50]
    evaluated = harness.lm_eval_fitness(model, tokenizer, documents, **tiny_harness_options())
    model.train()
    np.testing.assert_array_equal(harness.lm_eval_fitness(model, tokenizer, documents, **tiny_harness_options()), evaluated)
    assert all(m.training for m in model.modules())


def test_lm_eval_scores_a_data_flow_path_and_the_initial_path_as_its_head_source(llamas, tmp_path):
    """A path model is scored per document as a merge is; the initial genome is the first source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.workers.whitebox import WhiteBoxWorker

    config = _config(llamas, tmp_path, tiny_harness_options())
    config["models"] = {"experts": [str(llamas / "expert0"), str(llamas / "expert1")], "device": "cpu"}
    config["merge"] = {"space": "dataflow", "dataflow": {"repeats": 1}}
    worker = WhiteBoxWorker(RunPlan.from_config(config_from_dict(config)))
    space = worker.space
    initial = worker.evaluate(Candidate("initial", "search", space.x0()))
    crossed = worker.evaluate(Candidate("crossed", "search", space.encode([(0, 0), (1, 0), (1, 1)], [1.0, 1.5, 1.0])))
    documents = own_examples("lm_eval", tiny_harness_options())
    model = AutoModelForCausalLM.from_pretrained(llamas / "expert0").eval()
    alone = harness.lm_eval_fitness(model, AutoTokenizer.from_pretrained(llamas / "expert0"), documents, **tiny_harness_options())
    assert initial.status.value == crossed.status.value == "ok", crossed.error
    np.testing.assert_array_equal(initial.per_example, alone)
    assert crossed.per_example.shape == (len(documents),) and np.isfinite(crossed.per_example).all()
    assert not np.array_equal(crossed.per_example, initial.per_example)  # the path changed what is scored


def test_lm_evals_own_api_client_scores_the_served_model_as_its_hf_model(service, tiny_models, auth, monkeypatch):
    """lm-eval's ``local-completions`` model (its own HTTP client: token-id prompts, echo with
    logprobs) pointed at ``evomerge serve`` gives, document by document, what its ``hf`` model gives
    on the same checkpoint: a user can score a served merge with lm-eval as it is. It is given no
    tokenizer: it finds the server's ``/tokenizer_info`` and ``/tokenize`` (offline, a hub lookup of
    the model name would fail)."""
    pytest.importorskip("tenacity")  # lm-eval's API models need its `api` extra
    import lm_eval

    monkeypatch.setenv("OPENAI_API_KEY", auth["Authorization"].removeprefix("Bearer "))
    options = tiny_harness_options()

    def per_document(model: str, model_args: str) -> dict[tuple[str, int], dict]:
        results = lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=options["tasks"], log_samples=True,
            bootstrap_iters=0,  # its stderr bootstrap forks a Pool, which can hang in a process with threads (Ray's, the client's)
            task_manager=lm_eval.tasks.TaskManager(include_path=options["include_path"]),
        )
        return {(task, s["doc_id"]): s for task, samples in results["samples"].items() for s in samples}

    token = auth["Authorization"].removeprefix("Bearer ")
    served = per_document(
        "local-completions", f"model=tiny-base,base_url={service}/v1/completions,auth_token={token},num_concurrent=2,max_retries=1"
    )
    resident = per_document("hf", f"pretrained={tiny_models['base']},dtype=float32,device=cpu")
    assert served.keys() == resident.keys() and len(served) == len(own_examples("lm_eval", options))
    for key, theirs in resident.items():
        ours = served[key]
        if key[0] == "tiny_sums_gen":
            assert ours["filtered_resps"] == theirs["filtered_resps"], key
        else:  # (log-likelihood, is-greedy) of each choice, through echo=True logprobs
            for (ll_served, greedy_served), (ll_hf, greedy_hf) in zip(ours["filtered_resps"], theirs["filtered_resps"]):
                assert ll_served == pytest.approx(ll_hf, abs=1e-4), key
                assert greedy_served == greedy_hf, key
