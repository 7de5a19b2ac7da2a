"""End to end: run, status, export on the digits experts, and the failure paths a user meets."""

from __future__ import annotations

import json
import sqlite3
import textwrap

import numpy as np
import pytest

from evomerge.cli import main
from evomerge.store import RunStore
from cli_checks import refused

TRAIN_EXAMPLES = 1437


def run_ok(args):
    assert main(args) == 0


def test_run_records_every_candidate_with_per_example_scores(tmp_path, digits_config):
    run_dir = tmp_path / "elsewhere"
    run_ok(["run", str(digits_config()), "--run-dir", str(run_dir)])  # --run-dir wins over the config
    assert not (tmp_path / "run").exists()
    store = RunStore(run_dir, readonly=True)
    rows = list(store.evaluations(with_scores=True))
    assert len(rows) == 24
    assert all(r.status == "ok" for r in rows)
    for r in rows:
        assert r.per_example.shape == (TRAIN_EXAMPLES,)
        assert r.fitness == pytest.approx(float(np.mean(r.per_example)), abs=1e-6)
    assert "cma" in store.checkpoints()[0]
    info = store.run_info()
    assert info["state"] == "finished"
    assert info["summary"]["best"]["fitness"] == max(r.fitness for r in rows)
    assert (run_dir / "config.yaml").exists()
    store.close()


def test_status_json_for_scripts(tmp_path, digits_config, capsys):
    run_dir = tmp_path / "r"
    run_ok(["run", str(digits_config()), "--run-dir", str(run_dir)])
    capsys.readouterr()
    run_ok(["status", str(run_dir), "--json"])
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished"
    assert status["evaluations"] == {"total": 24, "ok": 24, "failed": 0, "cancelled": 0}
    assert status["populations"][0]["name"] == "cma"
    assert status["best"]["fitness"] == status["populations"][0]["best_fitness"]
    run_ok(["status", str(run_dir)])
    out = capsys.readouterr().out
    assert "cma" in out and f"examples scored: {status['examples_scored']}\n" in out
    assert "racing" not in out  # a run without racing is not told how many racing stopped


def test_status_reads_while_a_writer_holds_the_database(tmp_path, digits_config, capsys):
    run_dir = tmp_path / "r"
    run_ok(["run", str(digits_config()), "--run-dir", str(run_dir)])
    capsys.readouterr()
    writer = sqlite3.connect(run_dir / "run.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a run in the middle of a write
    writer.execute("INSERT INTO events (time, kind, message) VALUES (0, 'x', 'y')")
    try:
        run_ok(["status", str(run_dir), "--json"])
        assert json.loads(capsys.readouterr().out)["evaluations"]["total"] == 24
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_existing_run_dir_is_refused(tmp_path, digits_config, capsys):
    run_dir = tmp_path / "r"
    run_ok(["run", str(digits_config()), "--run-dir", str(run_dir)])
    capsys.readouterr()
    refused(capsys, ["run", str(digits_config()), "--run-dir", str(run_dir)], "already holds a run",
            f"evomerge resume {run_dir}")


def test_status_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not an evomerge run directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["status"], ["resume"], ["report"], ["export", "--out", "merged"]])
def test_a_config_file_or_a_missing_path_given_as_the_run_directory(tmp_path, digits_config, capsys, command):
    """Before: both read "not an evomerge run directory (no run.db)", which does not say that a
    config was given where its run directory belongs, nor that the path does not exist."""
    config = digits_config()
    name, *rest = command
    refused(capsys, [name, str(config), *rest], str(config), "is a config file", "give the run directory")
    refused(capsys, [name, str(tmp_path / "no-such-run"), *rest], "no such run directory")


def test_export_reproduces_the_best_candidate_or_the_one_named(tmp_path, digits_config, capsys):
    from transformers import AutoModel

    from evomerge.fitness.classification import classification_accuracy
    from evomerge.fitness.data import load_examples
    from evomerge.models.loading import register_builtin_architectures

    run_dir, out = tmp_path / "r", tmp_path / "merged"
    run_ok(["run", str(digits_config()), "--run-dir", str(run_dir)])
    run_ok(["export", str(run_dir), "--out", str(out)])
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    recipe = __import__("yaml").safe_load((out / "recipe.yaml").read_text())
    assert recipe["recipe"]["method"] == "task_arithmetic"
    assert len(recipe["recipe"]["groups"]) == 2  # two layers, one group each
    register_builtin_architectures()
    model = AutoModel.from_pretrained(out)
    accuracy = float(classification_accuracy(model, None, load_examples("sklearn:digits", "train")).mean())
    store = RunStore(run_dir, readonly=True)
    assert accuracy == pytest.approx(store.best().fitness, abs=1e-6)  # float32 vs float64 mean
    other = next(r for r in store.evaluations() if r.candidate_id != store.best().candidate_id and r.fitness < store.best().fitness)
    store.close()
    assert main(["export", str(run_dir), "--out", str(out)]) == 2  # never overwrite

    # --candidate: any scored candidate, not only the best
    picked = tmp_path / "picked"
    run_ok(["export", str(run_dir), "--out", str(picked), "--candidate", other.candidate_id])
    model = AutoModel.from_pretrained(picked)
    accuracy = float(classification_accuracy(model, None, load_examples("sklearn:digits", "train")).mean())
    assert accuracy == pytest.approx(other.fitness, abs=1e-6)
    assert f"one of 24 evaluated candidates, `{other.candidate_id}`" in (picked / "README.md").read_text()
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--candidate", "cma:999"]) == 2
    assert "--candidate cma:999: no such candidate was scored" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_same_seed_same_search(tmp_path, digits_config):
    genomes = []
    for name in ("a", "b"):
        run_ok(["run", str(digits_config()), "--run-dir", str(tmp_path / name)])
        store = RunStore(tmp_path / name, readonly=True)
        genomes.append(np.stack([r.genome for r in store.evaluations()]))
        store.close()
    np.testing.assert_array_equal(genomes[0], genomes[1])


def test_max_time_stops_the_run(tmp_path, digits_config, capsys, monkeypatch):
    import evomerge.controller as controller

    ticks = iter(range(10_000))  # a clock that advances one second per reading: no real waiting
    monkeypatch.setattr(controller.time, "time", lambda: float(next(ticks)))
    path = digits_config(budget={"evaluations": 10_000_000, "max_time": 5})
    run_ok(["run", str(path), "--run-dir", str(tmp_path / "r")])
    assert "max_time reached" in capsys.readouterr().out
    store = RunStore(tmp_path / "r", readonly=True)
    assert 0 < len(list(store.evaluations())) < 5
    store.close()


def write_plugin(tmp_path, monkeypatch, body: str) -> str:
    """A user plugin module with a name unique to the test (modules are cached by name)."""
    name = f"user_fitness_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_failing_candidates_are_recorded_and_the_run_goes_on(tmp_path, digits_config, monkeypatch):
    mod = write_plugin(
        tmp_path,
        monkeypatch,
        """
        import torch
        from evomerge.fitness.classification import classification_accuracy
        CALLS = {"n": 0}
        def flaky(model, tokenizer, examples):
            CALLS["n"] += 1
            if CALLS["n"] % 4 == 0:
                raise RuntimeError("CUDA error: pretend device hiccup")
            scores = classification_accuracy(model, tokenizer, examples)
            if CALLS["n"] % 4 == 1:
                scores[0] = float("nan")
            return scores
        """,
    )
    path = digits_config(fitness={"name": f"{mod}:flaky", "data": {"source": "sklearn:digits"}})
    run_ok(["run", str(path), "--run-dir", str(tmp_path / "r")])
    store = RunStore(tmp_path / "r", readonly=True)
    rows = list(store.evaluations())
    assert len(rows) == 24
    failed = [r for r in rows if r.status == "failed"]
    assert len(failed) == 12
    assert any("pretend device hiccup" in r.error for r in failed)
    assert any("NaN" in r.error for r in failed)
    assert store.best().status == "ok"
    store.close()


def test_plugin_with_wrong_shape_stops_with_a_message(tmp_path, digits_config, monkeypatch, capsys):
    mod = write_plugin(
        tmp_path,
        monkeypatch,
        """
        import torch
        def scalar(model, tokenizer, examples):
            return torch.tensor(0.5)
        """,
    )
    path = digits_config(fitness={"name": f"{mod}:scalar", "data": {"source": "sklearn:digits"}})
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "returned a single number (0.5)" in err and "not their mean" in err and "Traceback" not in err
    assert RunStore(tmp_path / "r", readonly=True).run_info()["state"] == "failed"


def test_sigint_stops_cleanly_with_a_checkpoint(tmp_path, digits_config, monkeypatch, capsys):
    mod = write_plugin(
        tmp_path,
        monkeypatch,
        """
        import os, signal
        from evomerge.fitness.classification import classification_accuracy
        CALLS = {"n": 0}
        def interrupted(model, tokenizer, examples):
            CALLS["n"] += 1
            if CALLS["n"] == 7:
                os.kill(os.getpid(), signal.SIGINT)
            return classification_accuracy(model, tokenizer, examples)
        """,
    )
    path = digits_config(fitness={"name": f"{mod}:interrupted", "data": {"source": "sklearn:digits"}})
    run_ok(["run", str(path), "--run-dir", str(tmp_path / "r")])
    assert "signal SIGINT" in capsys.readouterr().out
    store = RunStore(tmp_path / "r", readonly=True)
    assert store.run_info()["state"] == "interrupted"
    assert len(list(store.evaluations())) == 7  # the evaluation in flight finished and was recorded
    assert store.checkpoints()[1] == 7
    store.close()


def test_experts_with_different_shapes_are_refused(tmp_path, digits_config, digit_models, capsys):
    from evomerge.models.zoo.digits_mlp import DigitsMLP, DigitsMLPConfig, register

    register()
    odd = tmp_path / "odd"
    DigitsMLP(DigitsMLPConfig(hidden_sizes=[32])).save_pretrained(odd)
    path = digits_config(
        models={"base": str(digit_models["base"]), "experts": [str(digit_models["low"]), str(odd)], "device": "cpu"}
    )
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "layers.0.weight" in err and "(32, 64)" in err


def test_missing_model_directory_is_refused(tmp_path, digits_config, digit_models, capsys):
    path = digits_config(models={"base": str(digit_models["base"]), "experts": [str(tmp_path / "gone")]})
    assert main(["run", str(path)]) == 2
    assert "models.experts.0.path" in capsys.readouterr().err


def test_m2n2_seed_recipes_run_beside_cmaes_and_export(tmp_path, digits_config):
    from transformers import AutoModel

    from evomerge.fitness.classification import classification_accuracy
    from evomerge.fitness.data import load_examples
    from evomerge.models.loading import register_builtin_architectures

    populations = [
        {"name": "m2n2", "strategy": "m2n2", "share": 2, "options": {"archive": "seed_recipes", "split_grid": "rows"}},
        {"name": "cma", "strategy": "cmaes"},
    ]
    run_dir, out = tmp_path / "r", tmp_path / "merged"
    run_ok(["run", str(digits_config(populations=populations, budget={"evaluations": 30})), "--run-dir", str(run_dir)])
    store = RunStore(run_dir, readonly=True)
    m2n2 = list(store.evaluations("m2n2"))
    store.close()
    assert len(m2n2) == 20 and all(e.status == "ok" for e in m2n2)
    seeds = [e.fitness for e in m2n2[:2]]  # the two experts themselves come first
    assert max(e.fitness for e in m2n2) > max(seeds)  # children that beat both experts
    best_m2n2 = max(m2n2, key=lambda e: e.fitness)
    run_ok(["export", str(run_dir), "--out", str(out)])
    document = __import__("yaml").safe_load((out / "recipe.yaml").read_text())
    if document["population"] == "m2n2":
        pieces = document["recipe"]["pieces"]
        assert pieces[0]["start"] == 0 and all(a["end"] == b["start"] for a, b in zip(pieces, pieces[1:]))
        register_builtin_architectures()
        model = AutoModel.from_pretrained(out)
        accuracy = float(classification_accuracy(model, None, load_examples("sklearn:digits", "train")).mean())
        assert accuracy == pytest.approx(best_m2n2.fitness, abs=1e-6)
    else:
        assert document["fitness"] >= best_m2n2.fitness


def test_structured_log_and_progress_per_population(tmp_path, digits_config):
    from evomerge.config import load_config
    from evomerge.runs import start_run

    populations = [{"name": "cma", "strategy": "cmaes"}, {"name": "rand", "strategy": "random"}]
    seen = []
    config = load_config(digits_config(populations=populations, budget={"evaluations": 10}))
    start_run(config, "config.yaml", tmp_path / "r", on_progress=seen.append)
    last = seen[-1]
    assert last.evaluations == 10 and set(last.population_best) == {"cma", "rand"}
    assert last.best == max(v for v in last.population_best.values() if v is not None)
    assert last.workers == 1 and 0 <= last.busy <= 1
    lines = [json.loads(line) for line in (tmp_path / "r" / "run.log").read_text().splitlines()]
    events = [entry["event"] for entry in lines]
    assert events[0] == "run_started" and events[-1] == "run_finished"
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)


def test_status_of_a_run_killed_mid_candidate_and_of_one_whose_every_candidate_failed(tmp_path, digits_config, monkeypatch, capsys):
    import socket
    import subprocess
    import sys

    mod = write_plugin(tmp_path, monkeypatch, """
        def broken(model, tokenizer, examples):
            raise RuntimeError("pretend out of memory")
        """)
    path = digits_config(fitness={"name": f"{mod}:broken", "data": {"source": "sklearn:digits"}}, budget={"evaluations": 3})
    run_dir = tmp_path / "r"
    assert main(["run", str(path), "--run-dir", str(run_dir)]) == 3  # cannot succeed
    capsys.readouterr()
    run_ok(["status", str(run_dir)])
    assert f"best: - (every evaluation failed; `evomerge report {run_dir}` lists why)" in capsys.readouterr().out
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 2
    assert f"no candidate of this run succeeded, nothing to export; `evomerge report {run_dir}`" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--candidate", "cma:0"]) == 2
    assert "--candidate cma:0 failed (RuntimeError: pretend out of memory" in capsys.readouterr().err

    # SIGKILL while a candidate was scored: recorded as running, and run.lock names a process that is gone
    store = RunStore(run_dir)
    store.set_state("running")
    store.close()
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    (run_dir / "run.lock").write_text(f"pid {child.pid} on {socket.gethostname()}\n")
    run_ok(["status", str(run_dir)])
    out = capsys.readouterr().out
    assert "[killed]" in out and f"evomerge resume {run_dir} continues the run" in out
    run_ok(["status", str(run_dir), "--json"])
    assert json.loads(capsys.readouterr().out)["state"] == "killed"


def test_status_into_a_reader_that_stops_reading_ends_quietly(tmp_path, digits_config):
    """`evomerge status RUN | head -1`: no BrokenPipeError traceback; 141 (128 + SIGPIPE), as shell tools end."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "r"
    run_ok(["run", str(digits_config(budget={"evaluations": 2})), "--run-dir", str(run_dir)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    status = subprocess.Popen(
        [sys.executable, "-m", "evomerge", "status", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    status.stdout.close()  # before it has imported evomerge, let alone printed
    assert status.wait(timeout=120) == 141
    assert status.stderr.read() == b""


def test_a_broken_pipe_that_is_not_standard_output_keeps_its_traceback(monkeypatch):
    """A worker's or a service's socket breaking is a bug to see, not a reader that stopped."""
    import evomerge.cli as cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_status", broken)
    with pytest.raises(BrokenPipeError):
        main(["status", "anywhere"])
