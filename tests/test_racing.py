"""Racing end to end on the inline executor: candidates that cannot matter stop early with their
fidelity recorded, survivors score exactly as without racing at the same cost, off by default, resumable, and old
run directories read as fully scored."""

from __future__ import annotations

import os
import signal
import sqlite3

import numpy as np
import pytest

from evomerge.analysis import load_run
from evomerge.cli import main
from evomerge.config import load_config
from evomerge.errors import ConfigError
from evomerge.plan import RunPlan
from evomerge.report import render_report
from evomerge.runs import run_status
from evomerge.store import SCHEMA_VERSION, RunStore
from evomerge.workers.whitebox import WhiteBoxWorker

RACING = {"stages": [0.1, 0.3], "z": 2.0, "top_k": 3, "seed": 0}
POPULATIONS = [
    {"name": "cma", "strategy": "cmaes", "options": {"sigma0": 0.3}},
    {"name": "m2n2", "strategy": "m2n2", "options": {"archive_size": 4}},
]


def fitness(racing=None) -> dict:
    section = {"name": "classification_accuracy", "data": {"source": "sklearn:digits", "split": "train"}}
    return section if racing is None else {**section, "racing": racing}


def rows(run_dir):
    store = RunStore(run_dir, readonly=True)
    try:
        return [(r.candidate_id, r.genome.tobytes(), r.fitness, r.fidelity) for r in store.evaluations()]
    finally:
        store.close()


@pytest.fixture(scope="module")
def n_examples():
    from evomerge.fitness.data import load_examples

    return len(load_examples("sklearn:digits", "train")["labels"])


def test_candidates_that_cannot_matter_stop_early_and_survivors_score_as_without_racing(
    tmp_path, digits_config, n_examples, capsys
):
    config = digits_config(populations=POPULATIONS, fitness=fitness(RACING), budget={"evaluations": 30})
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r")]) == 0
    store = RunStore(tmp_path / "r", readonly=True)
    evaluations = list(store.evaluations(with_scores=True))
    partial = [e for e in evaluations if e.fidelity < 1.0]
    full = [e for e in evaluations if e.fidelity == 1.0]
    assert partial and full
    paired_stops = 0
    for e in partial:  # stopped after a screening stage: its fitness is its own mean there, or the paired estimate
        scored = ~np.isnan(e.per_example)
        assert e.fidelity == pytest.approx(scored.mean())
        assert e.metrics["examples_scored"] == scored.sum() < n_examples
        rivals = [r for r in full if r.population == e.population and r.seq < e.seq]
        estimates = [r.fitness + float(np.mean(e.per_example[scored] - r.per_example[scored])) for r in rivals]
        paired = any(abs(e.fitness - x) < 1e-6 for x in estimates)  # a rival's fitness + the mean difference
        assert paired or e.fitness == pytest.approx(float(np.mean(e.per_example[scored])), abs=1e-6)
        paired_stops += paired
    assert paired_stops  # the controller sent the rival's scores along
    for e in full:  # screened or not, a survivor scored each example once: what a run without racing pays
        assert e.metrics["examples_scored"] == n_examples
    for population in ("cma", "m2n2"):  # a partial mean stays below its population's 3rd best full score
        ours = [e for e in evaluations if e.population == population]
        third = sorted((e.fitness for e in ours if e.fidelity == 1.0), reverse=True)[2]
        assert all(e.fitness < third for e in ours if e.fidelity < 1.0)
    assert store.best().fidelity == 1.0
    used = sum(e.metrics["examples_scored"] for e in evaluations)
    assert store.api_usage()["examples"] == used  # what the savings are measured in (benchmarks/racing.py)
    assert store.run_info()["summary"]["examples_scored"] == used
    store.close()
    assert (load_run(tmp_path / "r")["fidelity"] < 1.0).sum() == len(partial)

    # Reports and status see the fidelity: partial means stay out of best and median, and are counted.
    page = render_report(tmp_path / "r").html
    assert f"{len(partial)} evaluations were stopped early by racing" in page
    status = run_status(tmp_path / "r")
    assert status["examples_scored"] == used and status["stopped_early"] == len(partial)
    assert main(["status", str(tmp_path / "r")]) == 0
    assert f"examples scored: {used} ({len(partial)} evaluations stopped early by racing)" in capsys.readouterr().out
    # export --candidate refuses an estimate: its fitness would stand in the model card as a full score
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "m"), "--candidate", partial[0].candidate_id]) == 2
    assert f"--candidate {partial[0].candidate_id} was stopped early by racing" in capsys.readouterr().err

    # Survivors' stages and the rest put together: exactly what one call on every example gives.
    plain = WhiteBoxWorker(RunPlan.from_config(load_config(digits_config(populations=POPULATIONS, fitness=fitness()))), worker_id="check")
    try:
        for e in full[:6]:
            from evomerge.records import Candidate

            again = plain.evaluate(Candidate(e.candidate_id, e.population, e.genome))
            assert again.fitness == e.fitness and again.fidelity == 1.0
            np.testing.assert_array_equal(again.per_example.astype(np.float32), e.per_example.astype(np.float32))
    finally:
        plain.close()


def test_racing_is_off_by_default_and_a_threshold_never_reached_changes_nothing(tmp_path, digits_config, n_examples):
    plain = digits_config(populations=POPULATIONS, fitness=fitness(), budget={"evaluations": 12})
    assert main(["run", str(plain), "--run-dir", str(tmp_path / "plain")]) == 0
    never = digits_config(populations=POPULATIONS, fitness=fitness({**RACING, "top_k": 50}), budget={"evaluations": 12})
    assert main(["run", str(never), "--run-dir", str(tmp_path / "never")]) == 0
    history = rows(tmp_path / "plain")
    assert all(fidelity == 1.0 for *_, fidelity in history)
    assert rows(tmp_path / "never") == history
    assert RunStore(tmp_path / "plain", readonly=True).api_usage()["examples"] == 12 * n_examples


def test_an_interrupted_racing_run_resumes_to_the_same_results(tmp_path, digits_config, monkeypatch):
    import evomerge.workers.whitebox as local

    config = digits_config(populations=POPULATIONS, fitness=fitness(RACING), budget={"evaluations": 20}, checkpoint_every=50)
    assert main(["run", str(config), "--run-dir", str(tmp_path / "whole")]) == 0
    original = local.WhiteBoxWorker.evaluate
    calls = {"n": 0}

    def interrupt_once(self, candidate):
        calls["n"] += 1
        if calls["n"] == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, candidate)

    monkeypatch.setattr(local.WhiteBoxWorker, "evaluate", interrupt_once)
    assert main(["run", str(config), "--run-dir", str(tmp_path / "cut")]) == 0
    assert RunStore(tmp_path / "cut", readonly=True).run_info()["state"] == "interrupted"
    assert main(["resume", str(tmp_path / "cut")]) == 0
    resumed, whole = rows(tmp_path / "cut"), rows(tmp_path / "whole")
    assert resumed == whole  # the same candidates, scores and fidelities
    assert any(fidelity < 1.0 for *_, fidelity in resumed[11:])  # racing went on after the resume


def test_a_run_directory_from_before_racing_reads_as_fully_scored_and_gains_the_column(tmp_path, digits_config):
    config = digits_config(budget={"evaluations": 4})
    assert main(["run", str(config), "--run-dir", str(tmp_path / "old")]) == 0
    db = sqlite3.connect(tmp_path / "old" / "run.db")
    db.execute("ALTER TABLE evaluations DROP COLUMN fidelity")  # as schema 4 wrote it
    db.execute("UPDATE runs SET schema_version = 4")
    db.commit()
    db.close()
    old = RunStore(tmp_path / "old", readonly=True)
    assert [e.fidelity for e in old.evaluations()] == [1.0] * 4 and old.best() is not None
    assert old.stopped_early() == 0
    old.close()
    assert render_report(tmp_path / "old").html.count("stopped early by racing") == 0  # reports it as before
    RunStore(tmp_path / "old").close()  # opened for writing, as a resume does
    store = RunStore(tmp_path / "old", readonly=True)
    assert store.run_info()["schema_version"] == SCHEMA_VERSION
    assert [e.fidelity for e in store.evaluations()] == [1.0] * 4
    store.close()


@pytest.mark.parametrize(
    ("racing", "message"),
    [
        ({"stages": [0.3, 0.1]}, "stages must grow"),
        ({"stages": [0.5, 1.0]}, "between 0 and 1"),
        ({"top_k": 0}, "top_k"),
        ({"scores": [1, 0]}, "scores is the range"),
    ],
)
def test_racing_config_errors_name_the_field(digits_config, racing, message):
    with pytest.raises(ConfigError, match=message):
        load_config(digits_config(fitness=fitness(racing)))


def test_scores_outside_the_stated_range_stop_the_run_with_what_to_fix(tmp_path, digits_config, capsys):
    """Accuracy is 0 or 1 per example: a stated range of [0.5, 1] is wrong, and racing's bound with it."""
    config = digits_config(fitness=fitness({**RACING, "top_k": 1, "scores": [0.5, 1.0]}), budget={"evaluations": 6})
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert "fitness.racing.scores: the fitness gave a score of 0, outside [0.5, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, bounds",
    [("classification_accuracy", (0.0, 1.0)), ("negative_cross_entropy", None), ("my_pkg.fitness:score", (0.0, 1.0))],
)
def test_racing_bounds_default_to_the_range_the_fitness_declares(tmp_path, digits_config, name, bounds):
    """An unbounded built-in is raced with the normal bound, not stopped as out of [0, 1]."""
    from evomerge.workers.base import racing_of

    config = load_config(digits_config(fitness={**fitness(RACING), "name": name}))
    assert config.fitness.racing.scores == "auto"
    assert racing_of(config).bounds == bounds
    explicit = load_config(digits_config(fitness={**fitness({**RACING, "scores": [-5, 0]}), "name": name}))
    assert racing_of(explicit).bounds == (-5.0, 0.0)


def test_m2n2_races_against_its_third_best(tmp_path, digits_config):
    """M2N2 admits children that cover examples the others miss, well below the best: a
    candidate goes on while it could beat the 3rd best (the option ``racing_rank``), not the best
    that ``top_k: 1`` names for other strategies."""
    populations = [{"name": "m2n2", "strategy": "m2n2", "options": {"archive_size": 4}}]
    config = digits_config(populations=populations, fitness=fitness({**RACING, "top_k": 1}), budget={"evaluations": 30})
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r")]) == 0
    store = RunStore(tmp_path / "r", readonly=True)
    evaluations = sorted(store.evaluations(with_scores=True), key=lambda e: e.seq)
    store.close()
    assert all(e.fidelity == 1.0 for e in evaluations[:3])  # no rival before three are known
    paired_stops = 0
    for e in (e for e in evaluations if e.fidelity < 1.0):
        earlier = sorted((r for r in evaluations if r.fidelity == 1.0 and r.seq < e.seq), key=lambda r: -r.fitness)
        third = earlier[2]  # the rival the controller sent: the 3rd best fully scored when it was asked
        scored = ~np.isnan(e.per_example)
        own = float(np.mean(e.per_example[scored]))
        paired = third.fitness + float(np.mean(e.per_example[scored] - third.per_example[scored]))
        if abs(e.fitness - paired) < 1e-6:  # stopped by the paired rule against the 3rd best
            paired_stops += 1
        else:  # by the unpaired one: its own mean cannot reach the 3rd best's fitness
            assert e.fitness == pytest.approx(own, abs=1e-6) and own < third.fitness
    assert paired_stops
