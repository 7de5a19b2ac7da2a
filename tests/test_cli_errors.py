"""Inputs a user can get wrong reach the command line as one line naming what to fix, exit 2, no
traceback; ``evomerge validate`` refuses what a run would fail on, before any model loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import evomerge
from evomerge.cli import main
from cli_checks import refused


def test_a_directory_or_binary_file_as_the_config(tmp_path, capsys):
    refused(capsys, ["validate", str(tmp_path)], str(tmp_path), "is a directory")
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01 not text")
    refused(capsys, ["run", str(binary)], str(binary), "not a YAML text file")


@pytest.mark.parametrize("content", ["", "# only a comment\n"])
def test_an_empty_config_is_named_empty(tmp_path, capsys, content):
    """Before: "expected a mapping of settings at the top level", for a file with nothing in it."""
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    refused(capsys, ["validate", str(path)], str(path), "the config is empty")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_config(tmp_path, capsys):
    path = tmp_path / "secret.yaml"
    path.write_text("name: x\n")
    path.chmod(0)
    try:
        refused(capsys, ["validate", str(path)], str(path), "cannot read")
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_a_truncated_expert_weights_file_is_named(tmp_path, digits_config, digit_models, capsys, keep):
    """safetensors' own "incomplete metadata" names no file; the message must."""
    broken = tmp_path / "broken-expert"
    shutil.copytree(digit_models["high"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * keep)])
    path = digits_config(
        models={"base": str(digit_models["base"]), "experts": [str(digit_models["low"]), str(broken)], "device": "cpu"}
    )
    refused(capsys, ["run", str(path)], str(weights), "safetensors")


def test_an_expert_path_that_is_a_file_or_not_a_model(tmp_path, digits_config, digit_models, capsys):
    weights = digit_models["low"] / "model.safetensors"
    path = digits_config(models={"base": str(digit_models["base"]), "experts": [str(weights)], "device": "cpu"})
    refused(capsys, ["run", str(path)], str(weights), "is a file")
    path = digits_config(models={"base": str(digit_models["base"]), "experts": [str(tmp_path)], "device": "cpu"})
    refused(capsys, ["run", str(path)], str(tmp_path), "config.json")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_cuda_on_a_machine_without_it_names_models_device(digits_config, digit_models, monkeypatch, capsys, command):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    path = digits_config(models={"base": str(digit_models["base"]), "experts": [str(digit_models["low"])], "device": "cuda"})
    refused(capsys, [command, str(path)], "models.device", "'cuda'")


@pytest.mark.parametrize(
    "section, value, words",
    [
        ("fitness", {"name": "classification_acuracy", "data": {"source": "sklearn:digits"}},
         ("fitness.name", "unknown fitness 'classification_acuracy'", "classification_accuracy")),
        ("fitness", {"name": "classification_accuracy", "data": {"source": "sklearn:digits", "classes": [42]}},
         ("fitness.data", "holds no examples")),
        ("fitness", {"name": "classification_accuracy", "data": {"source": "sklearn:digits"}, "options": {"scale": float("nan")}},
         ("fitness.options", "scale", "finite")),
        ("merge", {"method": "task_arithmetic", "search": ["weight"], "fixed": {"lambda": float("inf")}},
         ("merge.fixed.lambda", "finite")),
        ("merge", {"method": "task_arithmetic", "search": ["weight"], "fixed": {"lambda": 5.0}},
         ("merge.fixed.lambda", "[0.0, 2.0]", "merge.bounds")),
        ("budget", {"evaluations": 6},
         ("budget.evaluations", "6 evaluations", "10 populations", "4 of them")),
    ],
    ids=["unknown-fitness", "no-examples", "nan-option", "inf-fixed", "fixed-out-of-bounds", "starved-populations"],
)
def test_runs_that_cannot_succeed_are_refused_by_validate_and_run(tmp_path, digits_config, capsys, section, value, words):
    populations = [{"name": f"p{i}", "strategy": "random"} for i in range(10)]
    path = digits_config(**{"budget": {"evaluations": 24}, section: value}, populations=populations)
    refused(capsys, ["validate", str(path)], str(path), *words)
    refused(capsys, ["run", str(path)], *words)
    assert not (tmp_path / "run" / "run.db").exists()


def test_nan_in_numeric_fitness_data(tmp_path, digits_config, data_file, capsys):
    import numpy as np

    with np.load(data_file) as arrays:
        inputs, labels = arrays["inputs"].copy(), arrays["labels"]
    inputs[7, 3] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, inputs=inputs, labels=labels)
    path = digits_config(fitness={"name": "classification_accuracy", "data": {"source": str(bad)}})
    refused(capsys, ["validate", str(path)], "fitness.data", "NaN or inf", "index 7")


@pytest.mark.parametrize("label, words", [(1.5, ["1.5", "index 4"]), (-1, ["-1", "index 4"])], ids=["fraction", "negative"])
def test_labels_that_are_not_class_ids(tmp_path, digits_config, data_file, capsys, label, words):
    import numpy as np

    with np.load(data_file) as arrays:
        inputs, labels = arrays["inputs"], arrays["labels"].astype(np.float64)
    labels[4] = label
    bad = tmp_path / "labels.npz"
    np.savez(bad, inputs=inputs, labels=labels)
    path = digits_config(fitness={"name": "classification_accuracy", "data": {"source": str(bad)}})
    refused(capsys, ["validate", str(path)], "fitness.data", "class ids", *words)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs procfs: a directory where nothing can be created")
def test_a_run_directory_nothing_can_be_created_in(digits_config, capsys):
    refused(capsys, ["run", str(digits_config()), "--run-dir", "/proc/evomerge-run"], "/proc/evomerge-run", "cannot create")



@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00binary"], ids=["empty", "binary"])
def test_text_data_that_is_not_jsonl(tmp_path, digits_config, capsys, content):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(content)
    path = digits_config(fitness={"name": "exact_match", "data": {"source": str(data)}})
    refused(capsys, ["validate", str(path)], "fitness.data", str(data))


def test_a_thousand_populations_are_refused_at_once(digits_config, capsys):
    populations = [{"name": f"p{i}", "strategy": "random"} for i in range(1000)]
    refused(capsys, ["validate", str(digits_config(populations=populations, budget={"evaluations": 6}))], "populations", "100")


@pytest.fixture
def plugin_in_cwd(tmp_path, monkeypatch):
    """A fitness module only the current directory holds; sys.path and sys.modules are restored."""
    package = "h16_cwd_plugin"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "scores.py").write_text(textwrap.dedent("""
        def accuracy(model, tokenizer, examples):
            return (model(examples["inputs"]).argmax(-1) == examples["labels"]).double()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield f"{package}.scores:accuracy"
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


def test_a_fitness_plugin_in_the_working_directory_validates_and_runs(plugin_in_cwd, digits_config, tmp_path, capsys):
    path = digits_config(fitness={"name": plugin_in_cwd, "data": {"source": "sklearn:digits"}}, budget={"evaluations": 2})
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    assert "stopped: " in capsys.readouterr().out


TORCH_FREE_ERRORS = """
import sys
from evomerge.cli import main
for argv in (["export", sys.argv[1], "--out", sys.argv[2]], ["status", sys.argv[1]], ["report", sys.argv[1]],
             ["validate", sys.argv[3]], ["run", sys.argv[3]], ["resume", sys.argv[1]]):
    assert main(argv) == 2, argv
    assert "torch" not in sys.modules, f"evomerge {argv[0]} imported torch before refusing"
"""


def test_error_paths_that_need_no_model_import_no_torch(tmp_path):
    """A fresh interpreter (this one holds torch already) runs each command on a missing run
    directory or config file: each refuses without loading torch (seconds on a cold cache)."""
    root = str(Path(evomerge.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_ERRORS, str(tmp_path / "no-run"), str(tmp_path / "out"), str(tmp_path / "no.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("error: ") == 6


def test_export_to_a_file_or_under_one_is_refused_before_loading(tmp_path, digits_config, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", str(digits_config(budget={"evaluations": 2})), "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    refused(capsys, ["export", str(run_dir), "--out", str(a_file)], str(a_file), "is a file")
    refused(capsys, ["export", str(run_dir), "--out", str(a_file / "sub" / "out")], f"{a_file} is a file, not a directory")


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"seed": -1}, ("seed", "greater than or equal to 0")),
        ({"seed": 2**32}, ("seed", "less than")),
        ({"fitness": {"name": "classification_accuracy", "data": {"source": "sklearn:digits"}, "racing": {"seed": -1}}},
         ("fitness.racing.seed", "greater than or equal to 0")),
    ],
    ids=["negative-seed", "seed-past-numpy", "negative-racing-seed"],
)
def test_seeds_numpy_cannot_take_are_refused_naming_the_field(digits_config, capsys, overrides, words):
    """A negative run seed reached the user as 'populations.0: Seed must be between 0 and 2**32 - 1'
    at run time; a negative racing seed failed every raced candidate and the run still exited 0."""
    path = digits_config(**overrides)
    refused(capsys, ["validate", str(path)], str(path), *words)


@pytest.mark.parametrize("content", [b"", b"\x80\x02 not a pickle"], ids=["empty", "garbage"])
def test_corrupt_bin_weights_are_named(tmp_path, digits_config, digit_models, capsys, content):
    """torch.load's UnpicklingError and EOFError escaped as tracebacks."""
    broken = tmp_path / "bin-expert"
    shutil.copytree(digit_models["high"], broken)
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(content)
    path = digits_config(models={"base": str(digit_models["base"]), "experts": [str(digit_models["low"]), str(broken)], "device": "cpu"})
    refused(capsys, ["run", str(path)], str(broken), ".bin weights")


def test_models_moved_after_the_run_started_are_named(tmp_path, digits_config, digit_models, capsys):
    """transformers reads a missing absolute path as a malformed hub id ('Repo id must be in the
    form ...'); export and resume, which read the run's own config, must say it is not found."""
    moved = tmp_path / "expert"
    shutil.copytree(digit_models["high"], moved)
    path = digits_config(models={"base": str(digit_models["base"]), "experts": [str(digit_models["low"]), str(moved)], "device": "cpu"})
    finished, stopped = tmp_path / "finished", tmp_path / "stopped"
    assert main(["run", str(path), "--run-dir", str(finished)]) == 0
    assert main(["run", str(path), "--run-dir", str(stopped), "--deadline", "2000-01-01T07:00"]) == 0
    capsys.readouterr()
    shutil.rmtree(moved)
    refused(capsys, ["export", str(finished), "--out", str(tmp_path / "out")], "model directory not found", str(moved))
    refused(capsys, ["resume", str(stopped), "--deadline", "2999-01-01T07:00"], "model directory not found", str(moved))


@pytest.mark.parametrize("template", ["{question", "{answer[0]}"], ids=["unclosed-brace", "index-into-a-number"])
def test_a_text_template_that_cannot_be_filled(tmp_path, digits_config, capsys, template):
    """str.format's own ValueError (a malformed template) and TypeError escaped as tracebacks."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "1+1", "answer": 2}\n')
    path = digits_config(fitness={"name": "exact_match", "data": {"source": str(data), "template": template, "target": "answer"}})
    refused(capsys, ["validate", str(path)], "fitness.data", str(data), template)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["run", "CONFIG", "--address", " "], ("--address", "leave address out")),
        (["report", "RUN", "--serve", "--port", "70000"], ("--port", "70000", "0 to 65535")),
        (["report", "RUN", "--serve", "--port", "-1"], ("--port", "0 to 65535")),
        (["serve", "--model", "MODEL", "--port", "65536"], ("--port", "0 to 65535")),
    ],
    ids=["blank-address", "report-port-too-high", "report-port-negative", "serve-port-too-high"],
)
def test_bad_address_and_ports_are_refused_as_the_command_line_is_read(tmp_path, capsys, argv, words):
    """A blank --address reached Ray (ValueError traceback); a port out of range reached bind()
    (OverflowError traceback; serve's only after loading its model)."""
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(word in err for word in words), err


def test_python_dash_m_evomerge_is_the_command(tmp_path):
    """``python -m evomerge`` where the script is not on PATH: same parser, same exit codes."""
    root = str(Path(evomerge.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "evomerge", "validate", str(tmp_path / "no.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "no.yaml" in done.stderr, done.stderr


def test_report_out_that_cannot_be_written(tmp_path, digits_config, capsys):
    """An --out that is a directory or lies under a file raised IsADirectoryError or
    FileExistsError from the write."""
    run_dir = tmp_path / "run"
    assert main(["run", str(digits_config(budget={"evaluations": 2})), "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    refused(capsys, ["report", str(run_dir), "--out", str(tmp_path)], str(tmp_path), "is a directory")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    refused(capsys, ["report", str(run_dir), "--out", str(a_file / "report.html")], "cannot write the report", "--out")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no directory can be made")
def test_export_out_where_nothing_can_be_written_is_refused_before_loading(tmp_path, digits_config, capsys):
    """The parent exists, so only writing the export (after the models loaded) failed, with a
    traceback; /proc refuses every user, root included, as a read-only parent refuses others."""
    run_dir = tmp_path / "run"
    assert main(["run", str(digits_config(budget={"evaluations": 2})), "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    refused(capsys, ["export", str(run_dir), "--out", "/proc/evomerge-export"], "--out /proc/evomerge-export", "cannot write in /proc")


def test_a_key_set_twice_is_refused_with_its_line(tmp_path, digits_config, capsys):
    """PyYAML keeps the last of two equal keys silently: a pasted second budget would win unseen."""
    path = digits_config()
    path.write_text(path.read_text() + "budget: {evaluations: 1000}\n")
    refused(capsys, ["validate", str(path)], str(path), "'budget' is set twice", "line")


def test_a_merge_space_the_model_cannot_hold_names_the_config_file(digits_config, capsys):
    """The worker builds its plan from the config alone: its errors named the file '<config>'."""
    path = digits_config(merge={"method": "task_arithmetic", "granularity": "per_layer_group", "layer_groups": 1000,
                                "search": ["weight"], "fixed": {"lambda": 1.0}})
    refused(capsys, ["run", str(path)], f"{path}: merge", "layer_groups")


def test_a_base_dir_setting_and_an_empty_run_dir_are_refused_not_ignored(tmp_path, digits_config, capsys):
    """``base_dir`` was accepted and overwritten with the config file's directory; ``--run-dir ""``
    (an unset shell variable) fell back to the config's run_dir."""
    path = digits_config()
    path.write_text(path.read_text() + "base_dir: /elsewhere\n")
    refused(capsys, ["validate", str(path)], "base_dir: not a setting")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(digits_config()), "--run-dir", ""])
    assert exit_info.value.code == 2 and "--run-dir: must not be empty" in capsys.readouterr().err


def test_version(capsys):
    """An ML engineer's first question for a bug report; before: 'the following arguments are required'."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"evomerge {evomerge.__version__}"
