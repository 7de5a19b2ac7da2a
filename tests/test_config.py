"""Config validation: every user mistake is one message naming the file and the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.config import DataConfig, load_config, parse_duration
from evomerge.errors import ConfigError
from evomerge.plan import RunPlan


def load_plan(path) -> RunPlan:
    """The config at ``path`` and its plan: where the registries' cross-checks happen."""
    return RunPlan.from_config(load_config(path), str(path))


def test_valid_config_loads_and_resolves_relative_paths(tmp_path, digits_config):
    path = digits_config(run_dir="runs/x")
    config = load_config(path)
    assert config.run_path() == (tmp_path / "runs" / "x").resolve()
    assert config.merge.method == "task_arithmetic"
    assert RunPlan.from_config(config).budgets == {"cma": 24}


@pytest.mark.parametrize(
    "override, field, words",
    [
        ({"modles": {}}, "modles", "did you mean 'models'?"),
        ({"merge": {"method": "ties", "granularty": "per_model"}}, "merge.granularty", "did you mean 'granularity'?"),
        ({"populations": [{"name": "a", "stratgy": "random"}]}, "populations.0.stratgy", "did you mean 'strategy'?"),
        ({"fitness": {"name": "exact_match", "data": {"source": "x.jsonl", "limt": 3}}}, "fitness.data.limt", "did you mean 'limit'?"),
        ({"zzz": 1}, "zzz", "unknown key (check its spelling and level)"),
        ({"merge": {"method": "tiess"}}, "merge.method", "unknown merge method"),
        ({"merge": {"method": "ties", "granularity": "per_layer"}}, "merge.granularity", "per_layer_group"),
        ({"budget": {}}, "budget", "evaluations"),
        ({"budget": {"evaluations": "many"}}, "budget.evaluations", "integer"),
        ({"budget": {"evaluations": True}}, "budget.evaluations", "a number, not true"),
        ({"populations": [{"name": "a", "share": False}]}, "populations.0.share", "a number, not false"),
        ({"budget": {"max_time": "soon"}}, "budget.max_time", "duration"),
        ({"merge": {"method": "linear", "layer_groups": 2}}, "merge", "layer_groups"),
        ({"merge": {"method": "ties", "fixed": {"dencity": 0.5}}}, "merge", "dencity"),
        ({"merge": {"method": "split_slerp", "granularity": "per_model"}}, "merge", "global"),
        ({"populations": [{"name": "a", "strategy": "nope"}]}, "populations.0.strategy", "unknown strategy"),
        ({"populations": [{"name": "a"}, {"name": "a"}]}, "populations", "duplicate"),
        ({"merge": {"method": "linear", "bounds": {"weight": [0.9, 0.1]}}}, "merge.bounds.weight", "low must be below high"),
        ({"merge": {"method": "linear", "bounds": {"weight": [float("nan"), 1.0]}}}, "merge.bounds.weight.0", "finite"),
        ({"merge": {"method": "linear", "init": {"weight": float("-inf")}}}, "merge.init.weight", "finite"),
        ({"populations": [{"name": "a", "share": float("inf")}]}, "populations.0.share", "finite"),
        ({"models": {"experts": ["x"], "device": "gpu"}}, "models.device", "not a device"),
        ({"export": {"tokenizer_source": "chat"}}, "export.tokenizer_source", "one of: base, digits-0-4, digits-5-9"),
        ({"export": {"chat_template": "digits-0"}}, "export.chat_template", "an expert's name or a Jinja template"),
        ({"export": {"base_model": "./models/base"}}, "export.base_model", "not a hub id"),
    ],
)
def test_invalid_configs_name_file_and_field(digits_config, override, field, words):
    path = digits_config(**override)
    with pytest.raises(ConfigError) as info:
        load_plan(path)
    message = str(info.value)
    assert str(path) in message
    assert field in message
    assert words in message


def test_export_sources_name_the_base_an_expert_or_a_template(digits_config):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    config = load_config(digits_config(export={"tokenizer_source": "digits-5-9", "chat_template": template}))
    assert config.export.tokenizer_source == "digits-5-9" and config.export.chat_template == template
    assert load_config(digits_config()).export.tokenizer_source == "base"


def test_method_needing_base_without_base(digits_config, digit_models):
    path = digits_config(models={"experts": [str(digit_models["low"]), str(digit_models["high"])]})
    with pytest.raises(ConfigError, match="needs models.base"):
        load_plan(path)


def test_slerp_needs_exactly_two_experts(digits_config, digit_models):
    experts = [str(digit_models["low"])] * 3
    path = digits_config(models={"base": str(digit_models["base"]), "experts": experts}, merge={"method": "slerp"})
    with pytest.raises(ConfigError, match="exactly 2 experts"):
        load_plan(path)


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  base: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_config(path)


def test_validate_command_exit_codes(digits_config, digit_models, capsys):
    assert main(["validate", str(digits_config())]) == 0
    assert "ok" in capsys.readouterr().out
    missing = digits_config(models={"base": "./does-not-exist", "experts": [str(digit_models["low"])]})
    assert main(["validate", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "models.base" in err and "does-not-exist" in err and "Traceback" not in err


def test_validate_rejects_broken_fitness_plugin(digits_config, capsys):
    path = digits_config(fitness={"name": "no_such_module_xyz:fn", "data": {"source": "sklearn:digits"}})
    assert main(["validate", str(path)]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_missing_config_file_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("text, seconds", [(90, 90.0), ("90s", 90.0), ("30m", 1800.0), ("8h", 28800.0), ("1h30m", 5400.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_budget_split_by_share(digits_config):
    path = digits_config(
        populations=[{"name": "a", "share": 1.0}, {"name": "b", "share": 2.0}],
        budget={"evaluations": 10},
    )
    budgets = load_plan(path).budgets
    assert sum(budgets.values()) == 10
    assert budgets["b"] > budgets["a"]


def test_strategy_options_are_validated(digits_config, tmp_path, capsys):
    path = digits_config(populations=[{"name": "a", "strategy": "cmaes", "options": {"sigma": 0.1}}])
    assert main(["run", str(path)]) == 2
    assert "sigma" in capsys.readouterr().err


def test_yaml_round_trip_of_snapshot(digits_config):
    from evomerge.config import config_from_dict
    from evomerge.runs import resolved_config_dict

    config = load_config(digits_config())
    snapshot = yaml.safe_load(yaml.safe_dump(resolved_config_dict(RunPlan.from_config(config))))
    again = config_from_dict(snapshot)
    assert again.models.base == config.model_ref(config.models.base)
    assert again.run_path() == config.run_path()


def test_validate_checks_fitness_options_against_the_function(tmp_path, digits_config, capsys):
    from evomerge.cli import main

    fitness = {"name": "classification_accuracy", "data": {"source": "sklearn:digits"}, "options": {"batch_size": 8}}
    assert main(["validate", str(digits_config(fitness=fitness))]) == 2
    assert "does not accept options ['batch_size']" in (err := capsys.readouterr().err) and "(it takes no options)" in err


@pytest.mark.parametrize(
    "options,words",
    [({"sigma": 0.2}, ["populations.0.options.sigma", "did you mean 'sigma0'?"]),
     ({"bogus": 1}, ["populations.0.options.bogus", "cmaes takes sigma0, popsize, separable"])],
)
def test_an_unknown_strategy_option_names_the_one_meant_or_those_there_are(digits_config, capsys, options, words):
    """Before: only "unknown option", leaving the user to find the strategy's options in the code."""
    from evomerge.cli import main

    path = digits_config(populations=[{"name": "cma", "strategy": "cmaes", "options": options}])
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


DEMOS = Path(__file__).resolve().parents[1] / "evomerge" / "demos"
VALIDATE_WITHOUT_TORCH = """
import sys
from evomerge.cli import main
rc = main(["validate", "--no-files", sys.argv[1]])
assert "torch" not in sys.modules, "evomerge validate imported torch"
sys.exit(rc)
"""


def lm_config(tmp_path: Path, merge: dict, fitness: dict) -> Path:
    """The shipped LM demo's config with another merge method and fitness."""
    config = yaml.safe_load((DEMOS / "lm.yaml").read_text())
    config["merge"] = merge
    config["fitness"] = {**config["fitness"], **fitness}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("case", ["digits", "ties_exact_match", "lora_compose_cross_entropy"])
def test_validate_imports_no_torch(tmp_path, case):
    """Validating a config reads declarations only: no merge kernel, fitness body or strategy
    internals, so no torch (a fresh interpreter, since this one has torch already)."""
    if case == "digits":
        path = DEMOS / "digits.yaml"
    elif case == "ties_exact_match":
        path = lm_config(
            tmp_path,
            {"method": "ties", "granularity": "per_layer_group", "search": ["weight", "density"], "fixed": {"lambda": 1.0}},
            {"name": "exact_match", "options": {"batch_size": 8, "max_new_tokens": 8, "answer_regex": "^\\s*(\\S+)"}},
        )
    else:
        path = lm_config(
            tmp_path,
            {"method": "lora_compose", "granularity": "per_model"},
            {"name": "negative_cross_entropy", "options": {"batch_size": 4}},
        )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", VALIDATE_WITHOUT_TORCH, str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert ": ok (" in done.stdout


def test_the_snapshot_makes_every_data_file_absolute_and_keeps_dataset_names(digits_config, tmp_path):
    """What resume and a recipe rebuild read: relative files resolved against the config's
    directory (fitness data, per-task data, an expert's own data), dataset names unchanged."""
    from evomerge.runs import resolved_config_dict

    config = load_config(digits_config())
    fitness = config.fitness.model_copy(update={
        "test_data": DataConfig(source="hf:openai/gsm8k:main", split="test"),
        "tasks": {"low": DataConfig(source="tasks/low.jsonl")},
    })
    experts = [e.model_copy(update={"data": DataConfig(source="own/data.npz")}) for e in config.models.experts]
    config = config.model_copy(update={"fitness": fitness, "models": config.models.model_copy(update={"experts": experts})})
    snapshot = resolved_config_dict(RunPlan(config))
    assert snapshot["fitness"]["data"]["source"] == "sklearn:digits"
    assert snapshot["fitness"]["test_data"]["source"] == "hf:openai/gsm8k:main"
    assert snapshot["fitness"]["tasks"]["low"]["source"] == str(config.base_dir.resolve() / "tasks" / "low.jsonl")
    assert {e["data"]["source"] for e in snapshot["models"]["experts"]} == {str(config.base_dir.resolve() / "own" / "data.npz")}
