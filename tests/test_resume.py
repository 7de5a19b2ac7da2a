"""`evomerge resume`: a run killed (SIGKILL) or interrupted mid-run continues to its full budget with
every recorded evaluation intact, none scored twice, and — on the inline executor with a fixed
seed — exactly the results of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.store import RunStore

REPO = Path(__file__).resolve().parents[1]

# Scores like the built-in accuracy, and SIGKILLs its own process on the call named in a file:
# a crash in the middle of an evaluation, at a point the test chooses (no timing involved).
KILLER_PLUGIN = """
import os, signal
from pathlib import Path
from evomerge.fitness.classification import classification_accuracy

def accuracy_or_die(model, tokenizer, examples):
    here = Path(__file__).parent
    calls = int((here / "calls").read_text()) + 1 if (here / "calls").exists() else 1
    (here / "calls").write_text(str(calls))
    die_at = here / "die_at"
    if die_at.exists() and calls == int(die_at.read_text()):
        os.kill(os.getpid(), signal.SIGKILL)
    return classification_accuracy(model, tokenizer, examples)
"""

POPULATIONS = [
    {"name": "cma", "strategy": "cmaes", "options": {"sigma0": 0.2}},
    {"name": "m2n2", "strategy": "m2n2", "options": {"archive_size": 4}},
]


def history(run_dir: Path) -> list[tuple[str, str, float | None]]:
    store = RunStore(run_dir, readonly=True)
    try:
        return [(r.candidate_id, r.genome.tobytes().hex(), r.fitness) for r in store.evaluations()]
    finally:
        store.close()


def plugin_dir(tmp_path: Path, name: str, die_at: int | None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "killer_fitness.py").write_text(textwrap.dedent(KILLER_PLUGIN))
    if die_at is not None:
        (folder / "die_at").write_text(str(die_at))
    return folder


def cli(args: list[str], plugins: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{plugins}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, digits_config):
    budget = 30
    config = digits_config(
        populations=POPULATIONS,
        budget={"evaluations": budget},
        checkpoint_every=7,
        fitness={"name": "killer_fitness:accuracy_or_die", "data": {"source": "sklearn:digits", "split": "train"}},
    )
    reference_plugins = plugin_dir(tmp_path, "reference", die_at=None)
    done = cli(["run", str(config), "--run-dir", str(tmp_path / "reference")], reference_plugins)
    assert done.returncode == 0, done.stderr
    reference = history(tmp_path / "reference")
    assert len(reference) == budget

    crash_plugins = plugin_dir(tmp_path, "crash", die_at=19)  # checkpoints at 7 and 14; 15-18 replayed
    killed = cli(["run", str(config), "--run-dir", str(tmp_path / "crashed")], crash_plugins)
    assert killed.returncode == -signal.SIGKILL
    before = history(tmp_path / "crashed")
    assert len(before) == 18  # the 19th was in flight when the process died
    assert RunStore(tmp_path / "crashed", readonly=True).run_info()["state"] == "killed"  # recorded as running; its process is gone

    resumed = cli(["resume", str(tmp_path / "crashed")], crash_plugins)
    assert resumed.returncode == 0, resumed.stderr
    after = history(tmp_path / "crashed")
    assert after[: len(before)] == before  # nothing recorded was lost or rewritten
    assert len({cid for cid, _, _ in after}) == len(after) == budget  # nothing scored twice
    assert after == reference  # the same candidates, in the same order, with the same scores
    assert int((crash_plugins / "calls").read_text()) == budget + 1  # only the in-flight one was scored again


def test_interrupted_run_resumes_to_its_budget(tmp_path, digits_config, monkeypatch, capsys):
    import evomerge.workers.whitebox as local

    original = local.WhiteBoxWorker.evaluate
    calls = {"n": 0}

    def interrupt_once(self, candidate):
        calls["n"] += 1
        if calls["n"] == 9:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, candidate)

    monkeypatch.setattr(local.WhiteBoxWorker, "evaluate", interrupt_once)
    config = digits_config(populations=POPULATIONS, budget={"evaluations": 20}, checkpoint_every=50)
    run_dir = tmp_path / "r"
    assert main(["run", str(config), "--run-dir", str(run_dir)]) == 0
    assert "signal SIGTERM" in capsys.readouterr().out
    store = RunStore(run_dir, readonly=True)
    assert store.run_info()["state"] == "interrupted"
    assert store.checkpoints()[1] == 9  # the clean stop wrote a checkpoint of everything scored
    store.close()
    assert main(["resume", str(run_dir)]) == 0
    rows = history(run_dir)
    assert len(rows) == 20 and len({r[0] for r in rows}) == 20
    assert calls["n"] == 20
    assert main(["resume", str(run_dir)]) == 2  # finished: nothing to resume
    assert "nothing to resume" in capsys.readouterr().err


def test_a_finished_run_goes_on_once_its_limit_is_raised_and_only_then(tmp_path, digits_config, capsys):
    """Its strategies continue from their state (as an Optuna study takes more trials); with the
    limits it finished under, a resume is "nothing to resume", naming the limit to raise."""
    config = digits_config(populations=POPULATIONS, budget={"evaluations": 12}, checkpoint_every=5)
    run_dir = tmp_path / "r"
    assert main(["run", str(config), "--run-dir", str(run_dir)]) == 0
    first = history(run_dir)
    assert len(first) == 12
    assert main(["resume", str(run_dir), "--max-time", "1h"]) == 2  # a limit that did not stop it
    err = capsys.readouterr().err
    assert "nothing to resume: budget exhausted" in err and "budget in config.yaml" in err
    snapshot = run_dir / "config.yaml"
    edited = yaml.safe_load(snapshot.read_text())
    edited["budget"]["evaluations"] = 20
    snapshot.write_text(yaml.safe_dump(edited))
    assert main(["resume", str(run_dir)]) == 0
    after = history(run_dir)
    assert after[:12] == first and len(after) == len({r[0] for r in after}) == 20
    store = RunStore(run_dir, readonly=True)
    assert store.run_info()["state"] == "finished"
    assert "run_reopened" in [e["kind"] for e in store.events()]
    store.close()
    assert main(["resume", str(run_dir)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    assert "not an evomerge run directory" in capsys.readouterr().err


def test_restore_without_checkpoints_replays_the_whole_log(tmp_path, digits_config):
    """With no checkpoint at all, replaying every recorded ask, tell and migration rebuilds the
    final state. (Replay after a checkpoint is covered by the SIGKILL test above.)"""
    import sqlite3

    from evomerge import plaindata

    from evomerge.config import load_config
    from evomerge.controller import Controller, Population
    from evomerge.executors import InlineExecutor
    from evomerge.plan import RunPlan

    config_path = digits_config(
        populations=POPULATIONS, budget={"evaluations": 16}, checkpoint_every=5, migration={"every": 3}
    )
    assert main(["run", str(config_path), "--run-dir", str(tmp_path / "r")]) == 0
    store = RunStore(tmp_path / "r", readonly=True)
    final, _ = store.checkpoints()  # taken at the end of the run
    store.close()
    members = plaindata.loads(final["m2n2"])["strategy"]["member_ids"]
    assert any(m.startswith("cma:") for m in members), "CMA-ES's best migrated into M2N2's archive"
    db = sqlite3.connect(tmp_path / "r" / "run.db")
    with db:
        db.execute("DELETE FROM checkpoints")
    db.close()

    config = load_config(config_path)
    executor = InlineExecutor(config)
    plan = RunPlan.from_config(config, str(config_path))
    _, strategies = plan.strategies(executor)
    store = RunStore(tmp_path / "r")
    pops = [Population(p.name, s, p.budget, p.share) for p, s in zip(plan.populations, strategies)]
    Controller(store, executor, pops, migration=(3, 1)).restore()
    store.close()
    _, loaded = plan.strategies(executor)
    for pop, reference in zip(pops, loaded):
        reference.load_state_dict(plaindata.loads(final[pop.name]))
        got, want = pop.strategy.state_dict(), reference.state_dict()
        assert got["next_number"] == want["next_number"] and got["n_told"] == want["n_told"]
        assert plaindata.dumps(got["best"]) == plaindata.dumps(want["best"])
        assert pop.finished == pop.submitted == plan.budgets[pop.name]
        for _ in range(3):  # same state: the same next candidates
            a, b = pop.strategy.ask(1), reference.ask(1)
            assert [c.id for c in a] == [c.id for c in b]
            for x, y in zip(a, b):
                assert x.genome.tobytes() == y.genome.tobytes()


def test_deadline_stops_resumably_and_resume_takes_a_new_deadline(tmp_path, digits_config, capsys):
    config = digits_config(budget={"evaluations": 10})
    run_dir = tmp_path / "r"
    assert main(["run", str(config), "--run-dir", str(run_dir), "--deadline", "2000-01-01T07:00"]) == 0
    assert "deadline reached" in capsys.readouterr().out
    store = RunStore(run_dir, readonly=True)
    assert store.run_info()["state"] == "interrupted" and list(store.evaluations()) == []
    store.close()
    assert main(["resume", str(run_dir)]) == 0  # the snapshot keeps the (past) deadline
    assert "deadline reached" in capsys.readouterr().out
    assert main(["resume", str(run_dir), "--deadline", "2999-01-01T07:00", "--max-time", "1h"]) == 0
    assert "budget exhausted" in capsys.readouterr().out
    assert len(history(run_dir)) == 10


def test_target_fitness_and_patience_stop_the_run(tmp_path, digits_config, capsys):
    assert main(["run", str(digits_config(budget={"evaluations": 200, "target_fitness": 0.5})), "--run-dir", str(tmp_path / "a")]) == 0
    assert "target fitness 0.5 reached" in capsys.readouterr().out
    rows = history(tmp_path / "a")
    assert len(rows) < 200 and rows[-1][2] >= 0.5 and all(f < 0.5 for _, _, f in rows[:-1])

    assert main(["run", str(digits_config(budget={"evaluations": 500, "patience": 6})), "--run-dir", str(tmp_path / "b")]) == 0
    assert "no improvement for 6 evaluations" in capsys.readouterr().out
    fitness = [f for _, _, f in history(tmp_path / "b")]
    best_at = max(range(len(fitness)), key=lambda i: (fitness[i], -i))
    assert len(fitness) - 1 - best_at == 6 and len(fitness) < 500


def test_deadline_values():
    from datetime import datetime

    from evomerge.config import resolve_deadline

    assert resolve_deadline("07:00", datetime(2026, 11, 25, 6, 0)) == datetime(2026, 11, 25, 7, 0)
    assert resolve_deadline("07:00", datetime(2026, 11, 25, 8, 0)) == datetime(2026, 11, 26, 7, 0)
    assert resolve_deadline("2026-12-01T03:30") == datetime(2026, 12, 1, 3, 30)
    for bad in ("25:00", "tomorrow"):
        with pytest.raises(ValueError):
            resolve_deadline(bad)


def test_bad_limit_flags_exit_2(tmp_path, digits_config):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(digits_config()), "--max-time", "soon"])
    assert exit_info.value.code == 2


def test_identical_genomes_are_scored_once(tmp_path, digits_config, monkeypatch):
    import evomerge.workers.whitebox as local

    scored = []
    original = local.WhiteBoxWorker.evaluate

    def counting(self, candidate):
        scored.append(candidate.id)
        return original(self, candidate)

    monkeypatch.setattr(local.WhiteBoxWorker, "evaluate", counting)
    # random search and TPE both start at x0, and random repeats it as its seed: one score for all
    populations = [
        {"name": "rand", "strategy": "random"},
        {"name": "tpe", "strategy": "tpe"},
    ]
    run_dir = tmp_path / "r"
    config = digits_config(populations=populations, budget={"evaluations": 8})
    assert main(["run", str(config), "--run-dir", str(run_dir)]) == 0
    store = RunStore(run_dir, readonly=True)
    rows = list(store.evaluations(with_scores=True))
    store.close()
    cached = [r for r in rows if "cached_from" in r.metrics]
    assert cached, "x0 was asked by both populations"
    for row in cached:
        source = next(r for r in rows if r.candidate_id == row.metrics["cached_from"])
        assert row.genome.tobytes() == source.genome.tobytes() and row.fitness == source.fitness
        assert row.worker == "cache" and row.candidate_id not in scored
    assert len(scored) + len(cached) == len(rows) == 8
