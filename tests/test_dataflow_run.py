"""Data-flow runs end to end on the inline executor: CMA-ES and M2N2 search paths through two
tiny Llamas, a run interrupted mid-search resumes to its full budget, and bad configs are one
clear line with exit 2."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml

from evomerge import runs
from evomerge.cli import main
from evomerge.config import load_config
from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama
from evomerge.space.paths import PathSpace
from evomerge.store import RunStore
from evomerge.workers.path_model import PathMaterializer

ROWS = [{"prompt": "12+30=", "target": "42"}, {"prompt": "abc>", "target": "cba"}, {"prompt": "7+8=", "target": "15"}]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataflow")
    tokenizer = build_tokenizer()
    for name, layers, hidden, seed in (("a", 2, 32, 0), ("b", 3, 32, 1), ("wide", 2, 48, 2)):
        model = tiny_llama(tokenizer, hidden=hidden, layers=layers, heads=2, seed=seed)
        model.config.rms_norm_eps = 1e-12  # folded scales are exact up to the norms' epsilon: keep it out of the way
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def write_config(root, tmp_path, dataflow=None, experts=("a", "b"), evaluations=8, **merge) -> str:
    config = {
        "run_dir": str(tmp_path / "run"),
        "executor": "inline",
        "checkpoint_every": 2,
        "models": {"experts": [str(root / e) for e in experts], "device": "cpu"},
        "merge": {"space": "dataflow", "dataflow": {"repeats": 2, **(dataflow or {})}, **merge},
        "populations": [
            {"name": "cma", "strategy": "cmaes", "options": {"sigma0": 0.3, "popsize": 4}},
            {"name": "m2n2", "strategy": "m2n2", "options": {"archive_size": 3}},
        ],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": str(root / "data.jsonl")}},
        "budget": {"evaluations": evaluations},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def recorded(run_dir):
    store = RunStore(run_dir, readonly=True)
    try:
        return list(store.evaluations()), store.baselines()
    finally:
        store.close()


def test_cmaes_and_m2n2_search_paths_and_the_best_exports_as_a_plain_model(sources, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness.lm import negative_cross_entropy

    assert main(["run", write_config(sources, tmp_path)]) == 0
    evaluations, baselines = recorded(tmp_path / "run")
    space = PathSpace((2, 3), repeats=2)
    assert len(evaluations) == 8 and {e.population for e in evaluations} == {"cma", "m2n2"}
    assert all(e.genome.shape == (space.dim,) for e in evaluations)
    assert len({space.decode(e.genome).layers for e in evaluations if e.status == "ok"}) > 1  # it moved off a's path
    # source a alone, through the worker's path machinery, scores as the model on disk does
    load = lambda name: AutoModelForCausalLM.from_pretrained(sources / name).eval()  # noqa: E731
    direct = negative_cross_entropy(load("a"), AutoTokenizer.from_pretrained(sources / "a"), ROWS)
    assert baselines[0]["fitness"] == pytest.approx(float(torch.as_tensor(direct).double().mean()), abs=1e-6)
    # the export is a plain Hugging Face model of the best path, equal to the worker's path model
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    store = RunStore(tmp_path / "run", readonly=True)
    path = space.decode(store.best().genome)
    store.close()
    paths = PathMaterializer.from_models([load("a"), load("b")])
    paths.apply(path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == len(path)
    ids = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "out")("12+30=")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, paths.model(ids).logits, rtol=0, atol=1e-5)
    assert (tmp_path / "out" / "generation_config.json").exists()
    recipe = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert [(step["source"], step["layer"]) for step in recipe["recipe"]["path"]] == [
        (("a", "b")[s], layer) for s, layer in path.layers
    ]
    # the report's best recipe is the path: each layer passed, in order, with its scale
    from evomerge.analysis import best_recipe
    from evomerge.report import render_report

    table = best_recipe(tmp_path / "run").tables["scale"]
    assert list(table.index) == [f"{k}: {('a', 'b')[s]} layer {layer}" for k, (s, layer) in enumerate(path.layers, 1)]
    assert table["scale"].tolist() == pytest.approx(path.scales)
    assert "recipe" in render_report(tmp_path / "run").plots


def test_a_head_source_starts_from_its_own_model_and_exports_in_its_embeddings_and_head(sources, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.plan import RunPlan
    from evomerge.records import Candidate
    from evomerge.workers.whitebox import WhiteBoxWorker

    config_path = write_config(sources, tmp_path, dataflow={"head_source": "b"}, evaluations=6)
    load = lambda name: AutoModelForCausalLM.from_pretrained(sources / name).eval()  # noqa: E731
    ids = torch.tensor([AutoTokenizer.from_pretrained(sources / "b")("12+30=")["input_ids"]])
    worker = WhiteBoxWorker(RunPlan.from_config(load_config(config_path)))
    try:
        x0 = worker.space.search_spec().x0
        assert worker.space.decode(x0).layers == ((1, 0), (1, 1), (1, 2))
        worker.materialize(Candidate("x0", "cma", x0))
        with torch.no_grad():
            torch.testing.assert_close(worker.models.model(ids).logits, load("b")(ids).logits, rtol=0, atol=0)
    finally:
        worker.close()
    assert main(["run", config_path]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    store = RunStore(tmp_path / "run", readonly=True)
    path = PathSpace((2, 3), repeats=2, head=1).decode(store.best().genome)
    store.close()
    paths = PathMaterializer.from_models([load("a"), load("b")], head=1)
    paths.apply(path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, paths.model(ids).logits, rtol=0, atol=1e-5)
    head = load("b").lm_head.weight
    assert torch.equal(reloaded.lm_head.weight, head) and not torch.equal(load("a").lm_head.weight, head)
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["recipe"]["head"] == "b"


def test_matrix_scaling_runs_with_the_papers_w_genes(sources, tmp_path):
    assert main(["run", write_config(sources, tmp_path, dataflow={"scaling": "matrix"}, evaluations=4)]) == 0
    evaluations, _ = recorded(tmp_path / "run")
    space = PathSpace((2, 3), repeats=2, scaling="matrix")
    assert space.dim == 10 + 6 * 5 and all(e.genome.shape == (space.dim,) for e in evaluations)
    assert all(e.status == "ok" for e in evaluations)


def test_a_run_interrupted_mid_search_resumes_to_its_budget(sources, tmp_path):
    config = load_config(write_config(sources, tmp_path, evaluations=10))

    def interrupt(progress) -> None:
        if progress.evaluations == 4:
            os.kill(os.getpid(), signal.SIGINT)

    summary = runs.start_run(config, "run.yaml", on_progress=interrupt)
    assert summary["state"] == "interrupted"
    before = [e.candidate_id for e in recorded(tmp_path / "run")[0]]
    assert 4 <= len(before) < 10
    assert main(["resume", str(tmp_path / "run")]) == 0
    after = [e.candidate_id for e in recorded(tmp_path / "run")[0]]
    assert len(after) == 10 and len(set(after)) == 10 and after[: len(before)] == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(experts=("a", "wide")), "models.experts.1.path: hidden size 48 differs from the first source's 32"),
        (dict(dataflow={"max_layers": 1}), "merge.dataflow: max_layers 1 is shorter than the initial path"),
        (dict(dataflow={"repeats": 0}), "merge.dataflow.repeats"),
        (dict(method="ties"), "merge.method: merge parameters do not apply to merge.space 'dataflow'"),
        (dict(space="parameter"), "merge: dataflow only applies to space 'dataflow'"),
        (dict(dataflow={"head_source": "c"}), "merge.dataflow.head_source: 'c' is not a source's name (one of: a, b)"),
        (dict(dataflow={"head_source": 2}), "merge.dataflow.head_source: 2 is not a source's index (0 to 1)"),
    ],
)
def test_bad_dataflow_configs_are_one_line_and_exit_2(sources, tmp_path, capsys, edit, message):
    assert main(["validate", write_config(sources, tmp_path, **edit)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def _mergekit_rebuild(document: dict, out) -> dict:
    """The tensors mergekit writes for ``document`` (in-process, as ``mergekit-yaml`` would)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(document), str(out), options=options)
    return load_file(out / "model.safetensors")


def test_mergekit_passthrough_rebuilds_a_path_that_repeats_layers_and_starts_and_ends_elsewhere(sources, tmp_path):
    pytest.importorskip("mergekit", reason="the cross-check needs the mergekit extra: pip install 'evomerge[mergekit]'")
    from transformers import AutoModelForCausalLM

    from evomerge.mergekit_recipe import passthrough_config
    from evomerge.models.path_export import stacked_model
    from evomerge.space.paths import Path

    load = lambda name: AutoModelForCausalLM.from_pretrained(sources / name).eval()  # noqa: E731
    path = Path(((1, 1), (0, 0), (0, 1), (0, 1), (1, 2)), (1.0,) * 5)
    paths = PathMaterializer.from_models([load("a"), load("b")])
    ours = stacked_model(paths, path).state_dict()
    document = passthrough_config(path, [str(sources / "a"), str(sources / "b")], "float32")
    assert [s["sources"][0]["layer_range"] for s in document["slices"]] == [[0, 0], [1, 2], [0, 2], [1, 2], [2, 3], [0, 0]]
    theirs = _mergekit_rebuild(document, tmp_path / "mk")
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_an_unscaled_runs_export_writes_a_mergekit_yaml_and_a_scaled_one_says_why_not(sources, tmp_path):
    pytest.importorskip("mergekit", reason="the cross-check needs the mergekit extra: pip install 'evomerge[mergekit]'")
    from safetensors.torch import load_file

    assert main(["run", write_config(sources, tmp_path, dataflow={"scaling": "none"}, evaluations=4)]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    document = yaml.safe_load((tmp_path / "out" / "mergekit.yaml").read_text())
    assert document["merge_method"] == "passthrough"
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = _mergekit_rebuild(document, tmp_path / "mk")
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    # a path with scales other than 1 has no passthrough YAML, and the recipe says why
    from evomerge.export import _mergekit_document
    from evomerge.plan import RunPlan
    from evomerge.space.paths import Path

    plan = RunPlan.from_config(load_config(write_config(sources, tmp_path)))
    written, note = _mergekit_document(plan, Path(((0, 0), (0, 1)), (1.0, 1.5)))
    assert written is None and "scales the hidden state" in note
