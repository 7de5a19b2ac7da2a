"""Runs under faults: candidates that all fail, hang, or are stopped by signals (inline executor).

Fitness plugins are steered through files in the test's directory and block on events the test
releases, never on sleeps; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading

import pytest

from evomerge.budget import FailureStreak, failures_at_start_limit
from evomerge.cli import EXIT_CANNOT_SUCCEED, main
from evomerge.config import BudgetConfig, WorkersConfig
from evomerge.controller import Controller
from evomerge.executors.timeouts import AUTO_CAP, AUTO_FLOOR, CandidateTimeout
from evomerge.store import RunStore

BOUND = 30.0  # seconds any wait in these tests may take before the test fails


def write_plugin(tmp_path, monkeypatch, body: str) -> str:
    """A fitness plugin module with a name unique to the test (modules are cached by name)."""
    name = f"faults_fitness_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def statuses(run_dir) -> list[tuple[str, str, str | None]]:
    store = RunStore(run_dir, readonly=True)
    try:
        return [(ev.candidate_id, ev.status, ev.error) for ev in store.evaluations()]
    finally:
        store.close()


def run_info(run_dir) -> dict:
    store = RunStore(run_dir, readonly=True)
    try:
        return store.run_info()
    finally:
        store.close()


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_a_run_whose_first_candidates_all_fail_alike_stops_with_exit_3_and_resumes(
    tmp_path, digits_config, monkeypatch, capsys, failure
):
    mod = write_plugin(
        tmp_path,
        monkeypatch,
        f"""
        from pathlib import Path
        from evomerge.fitness.classification import classification_accuracy
        FIXED = Path({str(tmp_path / "fixed")!r})
        def fitness(model, tokenizer, examples):
            if not FIXED.exists():
                if {failure!r} == "raise":
                    raise RuntimeError("plugin is broken\\nsecond line differs per call")
                return [float("nan")] * len(examples["labels"])
            return classification_accuracy(model, tokenizer, examples)
        """,
    )
    path = digits_config(
        fitness={"name": f"{mod}:fitness", "data": {"source": "sklearn:digits", "limit": 50}},
        budget={"evaluations": 12, "max_failures_at_start": 3},
    )
    run_dir = tmp_path / "r"
    assert main(["run", str(path), "--run-dir", str(run_dir)]) == EXIT_CANNOT_SUCCEED
    err = capsys.readouterr().err.strip()
    expected = "RuntimeError: plugin is broken" if failure == "raise" else "fitness is NaN or infinite"
    assert len(err.splitlines()) == 1 and "first 3 candidates all failed with: " + expected in err
    assert "Traceback" not in err
    rows = statuses(run_dir)
    assert len(rows) == 3 and {status for _, status, _ in rows} == {"failed"}
    info = run_info(run_dir)
    assert info["state"] == "failed" and expected in info["summary"]["stop_reason"]

    (tmp_path / "fixed").touch()  # the user fixed their plugin: a resume tries again
    assert main(["resume", str(run_dir)]) == 0
    rows = statuses(run_dir)
    assert len(rows) == 12 and [status for _, status, _ in rows[3:]] == ["ok"] * 9
    assert run_info(run_dir)["state"] == "finished"


def test_a_budget_spent_without_one_candidate_scored_exits_3(tmp_path, digits_config, monkeypatch, capsys):
    """A budget below max_failures_at_start ends before the streak can stop the run: it must not
    end as a success (exit 0) with no candidate scored."""
    mod = write_plugin(tmp_path, monkeypatch, """
        def fitness(model, tokenizer, examples):
            raise RuntimeError("plugin is broken")
        """)
    path = digits_config(
        fitness={"name": f"{mod}:fitness", "data": {"source": "sklearn:digits", "limit": 50}},
        budget={"evaluations": 2, "max_failures_at_start": 3},
    )
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r")]) == EXIT_CANNOT_SUCCEED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "all 2 candidates failed" in err and "evomerge status" in err
    assert {status for _, status, _ in statuses(tmp_path / "r")} == {"failed"}


def test_failure_streak_counts_only_alike_failures_before_the_first_success():
    streak = FailureStreak(3)
    assert streak.observe(False, "A: x") is None and streak.observe(False, "B: y") is None  # different: restart
    assert streak.observe(False, "B: y\nmore") is None
    assert "first 3 candidates all failed with: B: y" in streak.observe(False, "B: y\nother")
    worked = FailureStreak(2)
    assert worked.observe(True, None) is None
    assert [worked.observe(False, "A") for _ in range(5)] == [None] * 5  # after a success: go on
    assert [FailureStreak(None).observe(False, "A") for _ in range(3)] == [None] * 3
    assert failures_at_start_limit(BudgetConfig(evaluations=1), 1) == 8
    assert failures_at_start_limit(BudgetConfig(evaluations=1), 16) == 32
    assert failures_at_start_limit(BudgetConfig(evaluations=1, max_failures_at_start=0), 4) is None
    assert failures_at_start_limit(BudgetConfig(evaluations=1, max_failures_at_start=None), 4) is None


def test_candidate_timeout_is_automatic_by_default():
    assert WorkersConfig().timeout == "auto"
    auto = CandidateTimeout("auto")
    assert auto.seconds() == AUTO_CAP  # nothing learned yet
    for duration in (0.1, 0.2, 0.3):
        auto.observe(duration)
    assert auto.seconds() == AUTO_FLOOR  # fast evaluations: never below the floor
    for _ in range(20):
        auto.observe(100.0)
    assert auto.seconds() == pytest.approx(500.0)  # five times the slow (95 %) evaluations
    assert CandidateTimeout(None).seconds() is None and CandidateTimeout(12.0).seconds() == 12.0
    assert CandidateTimeout.reason(12.0) == "timed out after 12s"


HANGING = """
import threading
from pathlib import Path
from evomerge.fitness.classification import classification_accuracy
STARTED = threading.Event()
RELEASE = threading.Event()
HANG = Path({hang!r})
def fitness(model, tokenizer, examples):
    if HANG.exists():
        HANG.unlink()  # only this call hangs
        STARTED.set()
        RELEASE.wait({bound})  # bounded, so that a broken test cannot leave a thread for ever
    return classification_accuracy(model, tokenizer, examples)
"""


def hanging_plugin(tmp_path, monkeypatch):
    """A plugin whose next call hangs until ``RELEASE`` is set (after the file ``hang`` appears)."""
    import importlib

    mod = write_plugin(tmp_path, monkeypatch, HANGING.format(hang=str(tmp_path / "hang"), bound=BOUND))
    return mod, importlib.import_module(mod)


def test_a_hung_candidate_times_out_on_the_inline_executor_and_the_run_stops_resumably(
    tmp_path, digits_config, monkeypatch, capsys
):
    mod, plugin = hanging_plugin(tmp_path, monkeypatch)
    path = digits_config(
        fitness={"name": f"{mod}:fitness", "data": {"source": "sklearn:digits", "limit": 50}},
        budget={"evaluations": 6},
        workers={"timeout": 0.5},
    )
    run_dir = tmp_path / "r"
    (tmp_path / "hang").touch()
    try:
        assert main(["run", str(path), "--run-dir", str(run_dir)]) == EXIT_CANNOT_SUCCEED
    finally:
        plugin.RELEASE.set()
    err = capsys.readouterr().err
    assert "cma:0 timed out after 0.5s" in err and "inline executor cannot stop" in err
    assert statuses(run_dir) == [("cma:0", "failed", "timed out after 0.5s")]
    assert run_info(run_dir)["state"] == "failed"
    assert main(["resume", str(run_dir)]) == 0  # goes on without the hung candidate
    rows = statuses(run_dir)
    assert [cid for cid, _, _ in rows] == [f"cma:{i}" for i in range(6)]
    assert [status for _, status, _ in rows[1:]] == ["ok"] * 5


@pytest.mark.parametrize("second_signal", [True, False], ids=["second-signal", "grace-period-over"])
def test_signals_cancel_a_hung_candidate_and_resume_does_not_start_with_it(
    tmp_path, digits_config, monkeypatch, capsys, second_signal
):
    mod, plugin = hanging_plugin(tmp_path, monkeypatch)
    handled = threading.Event()
    original = Controller.signalled

    def signalled(self, name):
        original(self, name)
        handled.set()

    monkeypatch.setattr(Controller, "signalled", signalled)
    path = digits_config(
        fitness={"name": f"{mod}:fitness", "data": {"source": "sklearn:digits", "limit": 50}},
        budget={"evaluations": 6},
        workers={"grace_period": 600 if second_signal else 0.2},
    )
    run_dir = tmp_path / "r"

    def interrupt():
        """Once the candidate hangs: SIGINT, and (second_signal) another once the first was handled."""
        assert plugin.STARTED.wait(BOUND)
        os.kill(os.getpid(), signal.SIGINT)
        if second_signal:
            assert handled.wait(BOUND)
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=interrupt, daemon=True)
    calls = {"n": 0}  # the third candidate hangs: two are scored before
    score = plugin.fitness

    def third_hangs(model, tokenizer, examples):
        calls["n"] += 1
        if calls["n"] == 3:
            plugin.HANG.touch()
        return score(model, tokenizer, examples)

    monkeypatch.setattr(plugin, "fitness", third_hangs)
    thread.start()
    try:
        assert main(["run", str(path), "--run-dir", str(run_dir)]) == 0
    finally:
        plugin.RELEASE.set()
        thread.join(BOUND)
    out = capsys.readouterr().out
    assert "signal SIGINT; 1 running evaluation(s) cancelled after" in out
    assert ("a second signal" if second_signal else "grace period") in out
    rows = statuses(run_dir)
    assert [(cid, status) for cid, status, _ in rows] == [("cma:0", "ok"), ("cma:1", "ok"), ("cma:2", "cancelled")]
    assert rows[2][2].startswith("cancelled: the run was stopped")
    store = RunStore(run_dir, readonly=True)
    assert store.run_info()["state"] == "interrupted" and store.checkpoints()[1] == 3
    store.close()
    assert main(["status", str(run_dir)]) == 0
    assert "evaluations: 3 (0 failed, 1 cancelled)" in capsys.readouterr().out

    calls["n"] = 10  # nothing hangs any more
    assert main(["resume", str(run_dir)]) == 0
    rows = statuses(run_dir)
    assert [cid for cid, _, _ in rows] == [f"cma:{i}" for i in range(6)]  # cma:2 was not scored again
    assert [status for _, status, _ in rows[3:]] == ["ok"] * 3


@pytest.mark.parametrize("when", ["scoring the experts", "starting the workers"])
def test_sigterm_before_the_search_unwinds_to_exit_130_and_leaves_a_resumable_run_or_none(
    tmp_path, digits_config, monkeypatch, capsys, when
):
    """systemd stops a run while Ray starts or the experts are scored: cleanup runs (workers,
    lock), the run is recorded as interrupted, not failed, and resumes; stopped before the run
    was written, nothing is left to resume."""
    from evomerge import runs
    from evomerge.cli import EXIT_INTERRUPTED

    target = "_score_experts" if when == "scoring the experts" else "make_executor"
    real = getattr(runs, target)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this thread, before the next line
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, target, terminated)
    path = digits_config(budget={"evaluations": 4})
    run_dir = tmp_path / "r"
    found = signal.getsignal(signal.SIGTERM)  # Ray's, after an earlier test started Ray here
    assert main(["run", str(path), "--run-dir", str(run_dir)]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err == "interrupted (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is found  # main put back what it found
    monkeypatch.setattr(runs, target, real)
    if target == "make_executor":
        assert not (run_dir / "run.db").exists()
        return
    info = run_info(run_dir)
    assert info["state"] == "interrupted" and info["summary"]["stop_reason"] == "signal SIGTERM before the search"
    assert main(["status", str(run_dir)]) == 0
    assert "stopped: signal SIGTERM before the search" in capsys.readouterr().out
    assert main(["resume", str(run_dir)]) == 0
    assert [status for _, status, _ in statuses(run_dir)] == ["ok"] * 4
