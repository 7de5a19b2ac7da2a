"""Fitness plugins both ways: by "package.module:function" and through the evomerge.fitness
entry-point group of an installed distribution; broken plugins stop with one clear message."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from evomerge.cli import main
from cli_checks import refused
from evomerge.errors import PluginError
from evomerge.fitness import resolve_fitness
from evomerge.store import RunStore

PLUGIN = """
import torch

def balanced(model, tokenizer, examples):
    predictions = model(examples["inputs"]).argmax(-1)
    return (predictions == examples["labels"]).double()

def broken_shape(model, tokenizer, examples):
    return torch.zeros(3)

def nothing(model, tokenizer, examples):
    balanced(model, tokenizer, examples)

def no_tokenizer(model, examples):
    return balanced(model, None, examples)

async def served(model, examples):
    return [1.0] * len(examples)
"""


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution on sys.path, as pip would install it, declaring two entry points."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_fitness.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "acme_fitness-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-fitness\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[evomerge.fitness]\nacme-balanced = acme_fitness:balanced\nacme-missing = acme_missing_module:score\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_entry_point_and_module_references_resolve_to_the_same_function(installed_plugin):
    by_entry_point = resolve_fitness("acme-balanced")
    by_reference = resolve_fitness("acme_fitness:balanced")
    assert by_entry_point is by_reference and by_entry_point.__name__ == "balanced"


@pytest.mark.parametrize(
    "name,message",
    [
        ("acme-missing", "fitness entry point 'acme-missing' failed to load"),
        ("acme_fitness:nothing_here", "acme_fitness has no function 'nothing_here'"),
        ("no_such_module_xyz:score", "cannot import no_such_module_xyz"),
        ("not-registered-anywhere", "unknown fitness 'not-registered-anywhere'"),
        ("acme_fitness.balanced", "did you mean 'acme_fitness:balanced'"),
    ],
)
def test_broken_plugins_are_named(installed_plugin, name, message):
    with pytest.raises(PluginError, match=message):
        resolve_fitness(name)


def test_a_run_scores_with_an_entry_point_plugin(installed_plugin, digits_config):
    path = digits_config(fitness={"name": "acme-balanced", "data": {"source": "sklearn:digits", "split": "train"}},
                         budget={"evaluations": 4})
    assert main(["run", str(path)]) == 0
    run_dir = yaml.safe_load(path.read_text())["run_dir"]
    store = RunStore(run_dir, readonly=True)
    rows = list(store.evaluations(with_scores=True))
    store.close()
    assert len(rows) == 4 and all(r.status == "ok" and set(r.per_example) <= {0.0, 1.0} for r in rows)


def test_a_plugin_returning_the_wrong_shape_stops_the_run_with_exit_2(installed_plugin, digits_config, capsys):
    path = digits_config(fitness={"name": "acme_fitness:broken_shape", "data": {"source": "sklearn:digits", "split": "train"}},
                         budget={"evaluations": 4})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "returned scores of shape (3,)" in err and "Traceback" not in err


def test_a_plugin_returning_none_is_named_not_a_shape(installed_plugin, digits_config, capsys):
    """Before: "returned scores of shape (), expected (N,)" (numpy reads None as a NaN scalar)."""
    path = digits_config(fitness={"name": "acme_fitness:nothing", "data": {"source": "sklearn:digits", "split": "train"}},
                         budget={"evaluations": 4})
    refused(capsys, ["run", str(path)], "acme_fitness:nothing", "returned None", "one score per example")


def test_a_plugin_with_the_wrong_signature_is_refused_by_validate(installed_plugin, digits_config, capsys):
    """Before: validate passed it, and the run failed every candidate with a TypeError (exit 3)."""
    path = digits_config(fitness={"name": "acme_fitness:no_tokenizer", "data": {"source": "sklearn:digits"}},
                         budget={"evaluations": 4})
    for command in ("validate", "run"):
        refused(capsys, [command, str(path)], "acme_fitness:no_tokenizer", "fn(model, tokenizer, examples)")


def test_a_plugin_missing_from_the_working_directory_says_where_it_was_looked_for(digits_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = digits_config(fitness={"name": "acme_not_here.fitness:score", "data": {"source": "sklearn:digits"}})
    refused(capsys, ["validate", str(path)], "No module named 'acme_not_here'", f"nor in {tmp_path}",
            "run evomerge from the directory that holds acme_not_here")


def test_an_async_plugin_in_a_white_box_run_is_refused_by_validate(installed_plugin, digits_config, capsys):
    """Before: validate passed it, and every candidate failed with a TypeError (exit 3)."""
    path = digits_config(fitness={"name": "acme_fitness:served", "data": {"source": "sklearn:digits"}},
                         budget={"evaluations": 4})
    for command in ("validate", "run"):
        refused(capsys, [command, str(path)], "acme_fitness:served", "is async", "fn(model, tokenizer, examples)")
