"""PS+DFS end to end: a parameter-space run's best merge becomes a data-flow source (``run:``),
materialized once on the worker, and its layers are exactly that merge's weights."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.config import load_config
from evomerge.models.zoo.tiny_lm import build_tokenizer, tiny_llama
from evomerge.models.memory import tier_memory
from evomerge.plan import RunPlan
from evomerge.store import RunStore
from evomerge.workers.whitebox import WhiteBoxWorker

ROWS = [{"prompt": "12+30=", "target": "42"}, {"prompt": "abc>", "target": "cba"}]


@pytest.fixture(scope="module")
def ps_run(tmp_path_factory):
    """Two tiny Llamas of one shape, a third of another depth, and a finished linear PS run over the first two."""
    root = tmp_path_factory.mktemp("ps-dfs")
    tokenizer = build_tokenizer()
    for name, layers, seed in (("a", 2, 0), ("b", 2, 1), ("c", 3, 2)):
        tiny_llama(tokenizer, hidden=32, layers=layers, heads=2, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = {
        "run_dir": "ps",
        "executor": "inline",
        "models": {"experts": ["./a", "./b"], "device": "cpu"},
        "merge": {"method": "linear", "init": {"weight": 0.5}},
        "populations": [{"name": "cma", "strategy": "cmaes", "options": {"sigma0": 0.3, "popsize": 4}}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": "data.jsonl"}},
        "budget": {"evaluations": 4},
    }
    (root / "ps.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(root / "ps.yaml")]) == 0
    return root


def dfs_config(root, name: str, experts: list, **extra) -> str:
    config = {
        "run_dir": name,
        "executor": "inline",
        "models": {"experts": experts, "device": "cpu"},
        "merge": {"space": "dataflow", "dataflow": {"repeats": 1}},
        "populations": [{"name": "cma", "strategy": "cmaes", "options": {"sigma0": 0.3, "popsize": 4}}],
        "fitness": {"name": "negative_cross_entropy", "data": {"source": "data.jsonl"}},
        "budget": {"evaluations": 4},
        **extra,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_ps_runs_best_is_a_dataflow_source_with_its_merged_weights(ps_run):
    from transformers import AutoModelForCausalLM

    path = dfs_config(ps_run, "dfs", [{"run": "ps", "name": "ps-best"}, "./c"])
    assert main(["run", path]) == 0
    stores = {name: RunStore(ps_run / name, readonly=True) for name in ("ps", "dfs")}
    baselines = stores["dfs"].baselines()
    assert [b["name"] for b in baselines] == ["ps-best", "c"] and stores["dfs"].best() is not None
    # the source alone scores what the PS run recorded for its best
    assert baselines[0]["fitness"] == pytest.approx(stores["ps"].best().fitness, abs=1e-6)
    for store in stores.values():
        store.close()
    # the run keeps the source's directory resolved: its export (read from the run alone) rebuilds it
    assert main(["export", str(ps_run / "dfs"), "--out", str(ps_run / "dfs-out")]) == 0
    recipe = yaml.safe_load((ps_run / "dfs-out" / "recipe.yaml").read_text())
    assert recipe["experts"][0] == {"name": "ps-best", "run": str(ps_run / "ps")}
    assert "source 'ps-best' is a recorded merge" in recipe["mergekit"] or "scales the hidden state" in recipe["mergekit"]
    # the PS best's weights by hand: linear with normalize, the recorded weights of its best genome
    assert main(["export", str(ps_run / "ps"), "--out", str(ps_run / "ps-out")]) == 0
    weights = yaml.safe_load((ps_run / "ps-out" / "recipe.yaml").read_text())["recipe"]["groups"][0]["weight"]
    a, b = (AutoModelForCausalLM.from_pretrained(ps_run / n).state_dict() for n in ("a", "b"))
    merged = {k: (weights[0] * a[k] + weights[1] * b[k]) / sum(weights) for k in a}
    # starting, the worker first holds what the PS run's worker held (more than the merge and c together)
    cpu = torch.device("cpu")
    fastest = lambda config: next(iter(tier_memory(config, cpu).values()))  # noqa: E731
    assert fastest(load_config(path)).peak == fastest(load_config(ps_run / "ps.yaml")).peak
    worker = WhiteBoxWorker(RunPlan.from_config(load_config(path)))
    try:
        source = worker.models.materializer.layers[0]
        assert len(source) == 2
        for index, layer in enumerate(source):
            for name, tensor in layer.state_dict().items():
                torch.testing.assert_close(tensor, merged[f"model.layers.{index}.{name}"], rtol=0, atol=1e-6)
        embed = worker.models.model.get_input_embeddings().weight
        torch.testing.assert_close(embed, merged["model.embed_tokens.weight"], rtol=0, atol=1e-6)
    finally:
        worker.close()


def test_an_exported_recipe_is_a_source_equal_to_its_runs_best(ps_run):
    from evomerge.config import ExpertRef
    from evomerge.source_merges import recorded_merge
    from evomerge.workers.merge_source import materialize_merge

    assert main(["export", str(ps_run / "ps"), "--out", str(ps_run / "ps-export")]) == 0
    # the recipe travels alone: nothing of the run directory it came from is read
    document = yaml.safe_load((ps_run / "ps-export" / "recipe.yaml").read_text())
    document["config"]["run_dir"] = str(ps_run / "gone")
    (ps_run / "moved").mkdir()
    (ps_run / "moved" / "recipe.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    path = dfs_config(ps_run, "dfs-recipe", [{"recipe": "moved/recipe.yaml"}, "./c"])
    assert main(["run", path]) == 0
    store = RunStore(ps_run / "dfs-recipe", readonly=True)
    try:
        assert [b["name"] for b in store.baselines()] == ["moved", "c"] and store.best() is not None
    finally:
        store.close()
    config, cpu = load_config(path), torch.device("cpu")
    # the worker starts as a run source's does: the PS run's worker first, then the merge
    fastest = lambda config: next(iter(tier_memory(config, cpu).values()))  # noqa: E731
    assert fastest(config).peak == fastest(load_config(ps_run / "ps.yaml")).peak
    by_recipe, _ = materialize_merge(recorded_merge(config, config.models.experts[0]), cpu, torch.float32)
    by_run, _ = materialize_merge(recorded_merge(config, ExpertRef(run="ps")), cpu, torch.float32)
    ours, theirs = by_recipe.state_dict(), by_run.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "experts, extra, message",
    [
        ([{"run": "nowhere"}, "./c"], {}, "models.experts.0.run: "),
        ([{"recipe": "nowhere.yaml"}, "./c"], {}, "models.experts.0.recipe: recipe file not found"),
        ([{"recipe": "a"}, "./c"], {}, "is a directory; give the recipe.yaml an export wrote inside it"),
        ([{"recipe": "data.jsonl"}, "./c"], {}, "not a YAML recipe file as evomerge export writes it"),
        ([{"recipe": "ps.yaml"}, "./c"], {}, "the recipe has no candidate_id to rebuild its merge from"),
        ([{"recipe": "ps.yaml", "run": "ps"}], {}, "models.experts.0: give an expert exactly one of path"),
        ([{"run": "ps", "path": "./a"}], {}, "models.experts.0: give an expert exactly one of path"),
        ([{"run": "dfs-src"}, "./c"], {}, "a source must merge parameters"),
    ],
)
def test_bad_run_sources_are_one_line_and_exit_2(ps_run, capsys, experts, extra, message):
    if experts[0].get("run") == "dfs-src" and not (ps_run / "dfs-src").exists():
        assert main(["run", dfs_config(ps_run, "dfs-src", ["./a", "./c"])]) == 0
    assert main(["validate", dfs_config(ps_run, "bad", experts, **extra)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_run_source_outside_the_dataflow_space_is_refused(ps_run, capsys):
    config = yaml.safe_load((ps_run / "ps.yaml").read_text())
    config["models"]["experts"] = [{"run": "ps"}, "./b"]
    (ps_run / "ps-src.yaml").write_text(yaml.safe_dump(config))
    assert main(["validate", str(ps_run / "ps-src.yaml")]) == 2
    assert "models.experts.0.run: a recorded merge (run) is a source of merge.space 'dataflow' only" in capsys.readouterr().err
